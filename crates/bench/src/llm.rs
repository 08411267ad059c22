//! The local LLM: decode, constrained decoding, batched decoding, the quantised matmul profile.

use crate::*;

/// Local LLM speed: 1,000-token prefill and single-stream decode (tokens/s) for each model, with
/// the llama.cpp figures measured on this machine's kind as the bar.
pub fn llm(models: &[&str]) -> Result<Value> {
    let reference: [(&str, f64, f64); 2] = [
        ("qwen2.5-coder-0.5b-instruct", 25.4, 161.0),
        ("smollm2-135m-instruct", 85.3, 399.0),
    ];
    let mut out = serde_json::Map::new();
    for &id in models {
        let before = resident_bytes();
        let m = mrrec_llm_local::LocalModel::open(id)?;
        let text = "The quick brown fox jumps over the lazy dog while the assistant writes notes. "
            .repeat(80);
        let mut ids = m.info().encode(&text)?;
        ids.truncate(1000);
        let greedy = |n| mrrec_llm::Sampling {
            max_tokens: n,
            ..Default::default()
        };
        m.generate(&ids[..16], &greedy(2), &mut |_| {})?; // warm-up
        let t = Instant::now();
        m.generate(&ids, &greedy(1), &mut |_| {})?;
        let prefill_s = t.elapsed().as_secs_f64();
        let short = &ids[..32];
        let t = Instant::now();
        m.generate(short, &greedy(1), &mut |_| {})?;
        let one = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = m.generate(short, &greedy(65), &mut |_| {})?;
        let decode_s = (t.elapsed().as_secs_f64() - one).max(1e-9);
        let decoded = g.ids.len().saturating_sub(1).max(1) as f64; // the first token came with the prefill
        let (decode, prefill) = (decoded / decode_s, 1000.0 / prefill_s);
        // Decoding after a 1,000-token prompt (an assistant turn's length): attention reads every
        // key at each step.
        let tf = m.transformer();
        let mut cache = tf.new_cache();
        let mut tok = argmax(&tf.prefill(&ids, &mut cache)?.to_vec1()?);
        let t = Instant::now();
        for _ in 0..32 {
            tok = argmax(
                &tf.decode_batch(&[tok], &mut [&mut cache])?
                    .get(0)?
                    .to_vec1()?,
            );
        }
        let decode_1k = 32.0 / t.elapsed().as_secs_f64();
        let (_, ref_dec, ref_pre) =
            reference
                .iter()
                .copied()
                .find(|r| r.0 == id)
                .unwrap_or((id, f64::NAN, f64::NAN));
        out.insert(id.to_string(), json!({
            "resident_bytes_model_and_1k_context": resident_bytes().saturating_sub(before),
            "decoded_tokens": decoded,
            "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
            "decode_after_1k_prompt_tokens_per_s": decode_1k,
            "llama_cpp_decode": ref_dec, "llama_cpp_prefill": ref_pre,
            "decode_ratio_vs_llama_cpp": decode / ref_dec, "prefill_ratio_vs_llama_cpp": prefill / ref_pre,
        }));
    }
    Ok(Value::Object(out))
}

/// The index of the largest logit.
fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// Per-token cost of JSON-schema-constrained decoding against free decoding, same model, prompt
/// and length (the schema's string field lets the model run the full length).
pub fn constrained(model: &str) -> Result<Value> {
    let m = mrrec_llm_local::LocalModel::from_registry(model)?;
    let prompt = m.info().encode(
        "<|im_start|>user\nDescribe a good pillow in detail.<|im_end|>\n<|im_start|>assistant\n",
    )?;
    let schema = json!({"type": "object", "properties": {"ideal_item_profile": {"type": "string"}},
        "required": ["ideal_item_profile"]});
    let c = mrrec_llm::Constraint::JsonSchema(schema);
    let s = mrrec_llm::Sampling {
        max_tokens: 48,
        temperature: 1.0,
        seed: 1,
        ..Default::default()
    };
    m.generate_constrained(&prompt, &s, Some(&c), &mut |_| {})?; // builds the token trie once
    let (mut free_t, mut free_n, mut con_t, mut con_n) = (0.0, 0usize, 0.0, 0usize);
    for seed in 0..3 {
        let s = mrrec_llm::Sampling { seed, ..s.clone() };
        let t = Instant::now();
        free_n += m.generate(&prompt, &s, &mut |_| {})?.ids.len();
        free_t += t.elapsed().as_secs_f64();
        let t = Instant::now();
        con_n += m
            .generate_constrained(&prompt, &s, Some(&c), &mut |_| {})?
            .ids
            .len();
        con_t += t.elapsed().as_secs_f64();
    }
    let (free, con) = (free_t / free_n.max(1) as f64, con_t / con_n.max(1) as f64);
    Ok(
        json!({"model": model, "free_ms_per_token": free * 1e3, "constrained_ms_per_token": con * 1e3,
        "overhead": con / free - 1.0, "tokens": [free_n, con_n]}),
    )
}

/// Aggregate decode throughput with 1, 4, 8 and 16 sequences decoding together, as a ratio to
/// single-stream decoding in the same run.
pub fn batched(model: &str) -> Result<Value> {
    let m = mrrec_llm_local::LocalModel::from_registry(model)?;
    let base = m.info().encode("<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n")?;
    let mut rows = serde_json::Map::new();
    let mut single = 0.0;
    for n in [1usize, 4, 8, 16] {
        let prompts: Vec<Vec<u32>> = (0..n).map(|_| base.clone()).collect();
        let s: Vec<mrrec_llm::Sampling> = (0..n)
            .map(|i| mrrec_llm::Sampling {
                max_tokens: 48,
                temperature: 1.0,
                seed: i as u64,
                ..Default::default()
            })
            .collect();
        // Prefill time is excluded: measure it alone and subtract.
        let t = Instant::now();
        let one: Vec<mrrec_llm::Sampling> = s
            .iter()
            .map(|x| mrrec_llm::Sampling {
                max_tokens: 1,
                ..x.clone()
            })
            .collect();
        m.generate_many(&prompts, &one)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let gens = m.generate_many(&prompts, &s)?;
        let secs = (t.elapsed().as_secs_f64() - prefill).max(1e-9);
        let tokens: usize = gens.iter().map(|g| g.ids.len().saturating_sub(1)).sum();
        let rate = tokens as f64 / secs;
        if n == 1 {
            single = rate;
        }
        rows.insert(
            n.to_string(),
            json!({"tokens_per_s": rate, "ratio_vs_single": rate / single}),
        );
    }
    Ok(json!({"model": model, "sequences": rows}))
}

/// Where batched decoding's time goes: for the shapes of Qwen 0.5B's projections, candle's Q8_0
/// matmul, an f32 GEMM on the dequantised weights, and our packed Q8_0 kernel ([`mrrec_llm::q8`],
/// which reads each weight block once for all rows), at 1 to 512 rows.
pub fn qmatmul_profile() -> Result<Value> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    let mut rows = serde_json::Map::new();
    for (name, out, inp) in [
        ("attn_q 896→896", 896usize, 896usize),
        ("ffn_up 896→4864", 4864, 896),
        ("ffn_down 4864→896", 896, 4864),
    ] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let packed = mrrec_llm_local::q8::PackedQ8::from_qtensor(&qt);
        let q = QMatMul::from_qtensor(qt)?;
        let wt = w.t()?.contiguous()?;
        // The k-quants Qwen2.5-0.5B's GGUF keeps for its ffn_down (Q6_K in 12 layers, Q4_K in
        // 12): candle multiplies those, the packed kernel does not take them.
        // (k-quant blocks span 256 inputs: only ffn_down's 4864 inputs divide.)
        let kq: Vec<(&str, QMatMul)> = [("q6k", GgmlDType::Q6K), ("q4k", GgmlDType::Q4K)]
            .into_iter()
            .filter(|_| inp.is_multiple_of(256))
            .map(|(n, d)| Ok((n, QMatMul::from_qtensor(QTensor::quantize(&w, d)?)?)))
            .collect::<Result<_>>()?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            f()?;
            let reps = 10;
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
        let mut by_rows = serde_json::Map::new();
        let (mut candle1, mut ours1) = (0.0, 0.0);
        for b in [1usize, 4, 8, 16, 64, 512] {
            let x = Tensor::randn(0f32, 1.0, (b, inp), &Device::Cpu)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let candle = time(&|| {
                std::hint::black_box(q.forward(&x)?);
                Ok(())
            })?;
            let dense = time(&|| {
                std::hint::black_box(x.matmul(&wt)?);
                Ok(())
            })?;
            let ours = match &packed {
                Some(p) => Some(time(&|| {
                    std::hint::black_box(p.matmul(&xs, b));
                    Ok(())
                })?),
                None => None,
            };
            if b == 1 {
                candle1 = candle;
                ours1 = ours.unwrap_or(f64::NAN);
            }
            let mut kq_ms = serde_json::Map::new();
            for (n, m) in &kq {
                let t = time(&|| {
                    std::hint::black_box(m.forward(&x)?);
                    Ok(())
                })?;
                kq_ms.insert(format!("candle_{n}_ms"), json!(t * 1e3));
                if let Some(o) = ours {
                    kq_ms.insert(format!("packed_q8_speedup_vs_candle_{n}"), json!(t / o));
                }
            }
            by_rows.insert(
                b.to_string(),
                json!({"k_quants": kq_ms, "candle_q8_ms": candle * 1e3, "f32_dense_ms": dense * 1e3,
                       "packed_q8_ms": ours.map(|t| t * 1e3),
                       "candle_vs_1_row": candle / candle1,
                       "packed_vs_1_row": ours.map(|t| t / ours1),
                       "packed_speedup_vs_candle": ours.map(|t| candle / t),
                       "packed_speedup_vs_dense": ours.map(|t| dense / t)}),
            );
        }
        rows.insert(name.into(), Value::Object(by_rows));
    }
    Ok(Value::Object(rows))
}

pub use mrrec_agent::progress::{resident_bytes, status_bytes};
