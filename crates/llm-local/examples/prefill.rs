//! Prompt-prefill speed of a registered model with the quantised kernel alone and with the dense
//! f32 prefill copy: `cargo run --release -p mrrec-llm --example prefill [MODEL] [TOKENS]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let id = args
        .get(1)
        .map_or("qwen2.5-coder-0.5b-instruct", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(600);
    let mut out = Vec::new();
    for dense in ["0", "1"] {
        std::env::set_var("MRREC_DENSE_PREFILL", dense);
        let m = mrrec_llm_local::LocalModel::from_registry(id)?;
        let text = "The shopper bought a stainless steel kettle and praised how quickly it boils. "
            .repeat(n / 12 + 1);
        let mut ids = m.info().encode(&text)?;
        ids.truncate(n);
        let t = m.transformer();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let mut cache = t.new_cache();
            let t0 = std::time::Instant::now();
            t.prefill(&ids, &mut cache)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{id}: dense_prefill={dense}: {n} tokens in {best:.2}s = {:.1} tokens/s",
            n as f64 / best
        );
        out.push(n as f64 / best);
    }
    println!("ratio dense / quantised: {:.2}", out[1] / out[0]);
    Ok(())
}
