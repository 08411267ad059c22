//! Prompt-prefill speed of a registered model with the quantised kernel alone or with the dense
//! f32 prefill copy: `cargo run --release -p mrrec-llm-local --example prefill [MODEL] [TOKENS]`,
//! once with `MRREC_DENSE_PREFILL=0` and once without (the switch is read once per process).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let id = args
        .get(1)
        .map_or("qwen2.5-coder-0.5b-instruct", String::as_str);
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(600);
    let dense = mrrec_llm_local::switches().dense_prefill;
    {
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
    }
    Ok(())
}
