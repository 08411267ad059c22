//! Checks that prefilling a prompt in two chunks gives the logits (and the next decode step) of
//! one chunk: `cargo run --release -p mrrec-llm --example chunked`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let m = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct")?;
    let ids = m
        .info()
        .encode(&"A quiet kettle that boils fast and does not drip. ".repeat(8))?;
    let t = m.transformer();
    let mut c1 = t.new_cache();
    let a = t.prefill(&ids, &mut c1)?.to_vec1::<f32>()?;
    let a2 = t
        .decode_batch(&[42], &mut [&mut c1])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for split in [1usize, 10, 40, ids.len() - 1] {
        let mut c2 = t.new_cache();
        t.prefill(&ids[..split], &mut c2)?;
        let b = t.prefill(&ids[split..], &mut c2)?.to_vec1::<f32>()?;
        let b2 = t
            .decode_batch(&[42], &mut [&mut c2])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let d = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        println!(
            "split at {split} of {}: max |Δlogit| prefill {} then decode {}",
            ids.len(),
            d(&a, &b),
            d(&a2, &b2)
        );
    }
    Ok(())
}
