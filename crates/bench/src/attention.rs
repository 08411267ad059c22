//! Our attention kernel ([`mrrec_llm_local::attention`]) against the candle matrix products the
//! engine used before it (one product for a decoding step; 128-query blocks of a prompt), on the
//! same inputs in the same run.

use candle_core::{Device, Tensor};
use mrrec_llm_local::{attention, AttentionShape, KvLayer};
use serde_json::{json, Value};

use crate::prefill::timed;
use crate::Result;

/// Softmax of `s[..valid] · scale` in place, later keys zeroed (as the engine did).
fn causal_softmax(s: &mut [f32], valid: usize, scale: f32) {
    let (live, masked) = s.split_at_mut(valid.min(s.len()));
    let max = live
        .iter()
        .fold(f32::NEG_INFINITY, |m, x| m.max(*x * scale));
    let mut sum = 0f32;
    for x in live.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    live.iter_mut().for_each(|x| *x /= sum);
    masked.fill(0.0);
}

/// The engine's previous attention, from candle's matrix products: q (1, heads, t, d), k, v
/// (1, kv heads, pos + t, d); queries in blocks of 128 rows per key/value head.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, s: AttentionShape) -> Result<Tensor> {
    use rayon::prelude::*;
    let AttentionShape {
        n_head,
        n_kv,
        t,
        pos,
        d,
    } = s;
    let rep = n_head / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let q = q.reshape((1, n_kv, rep, t, d))?;
    let mut outs = Vec::new();
    for i0 in (0..t).step_by(128) {
        let b = 128.min(t - i0);
        let kv_end = pos + i0 + b;
        let qb = q
            .narrow(3, i0, b)?
            .contiguous()?
            .reshape((1, n_kv, rep * b, d))?;
        let kb = k.narrow(2, 0, kv_end)?.contiguous()?;
        let vb = v.narrow(2, 0, kv_end)?.contiguous()?;
        let mut p: Vec<f32> = qb.matmul(&kb.t()?)?.flatten_all()?.to_vec1()?;
        p.par_chunks_mut(kv_end).enumerate().for_each(|(row, s)| {
            causal_softmax(s, pos + i0 + row % b + 1, scale);
        });
        let p = Tensor::from_vec(p, (1, n_kv, rep * b, kv_end), q.device())?;
        outs.push(p.matmul(&vb)?.reshape((1, n_kv, rep, b, d))?);
    }
    Ok(Tensor::cat(&outs, 3)?.reshape((1, n_head, t, d))?)
}

/// Milliseconds per call, ours and candle's, for decoding steps and prompts of Qwen 0.5B's and
/// 1.5B's head layouts (one layer, one sequence), and the largest difference between the two.
pub fn attention_kernel() -> Result<Value> {
    let dev = Device::Cpu;
    let mut out = serde_json::Map::new();
    for (model, n_head, n_kv, d) in [
        ("qwen-0.5b", 14usize, 2usize, 64usize),
        ("qwen-1.5b", 12, 2, 128),
    ] {
        for (case, t, pos) in [
            ("decode_at_256", 1usize, 255usize),
            ("decode_at_1024", 1, 1023),
            ("decode_at_2048", 1, 2047),
            ("prompt_1024", 1024, 0),
            ("suffix_256_after_1024", 256, 1024),
        ] {
            let s = AttentionShape {
                n_head,
                n_kv,
                t,
                pos,
                d,
            };
            let q = Tensor::randn(0f32, 1.0, (1, n_head, t, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev)?;
            let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1()?) };
            // Ours takes the projections' rows: (positions, heads, d).
            let qs = flat(&q.transpose(1, 2)?)?;
            let mut cache = KvLayer::new(n_kv, d);
            cache.append(
                &flat(&k.transpose(1, 2)?)?,
                &flat(&v.transpose(1, 2)?)?,
                pos + t,
            );
            let reps = if t == 1 { 200 } else { 5 };
            let ours = timed(reps, || {
                std::hint::black_box(attention(&qs, &cache, s));
                Ok(())
            })?;
            let theirs = timed(reps, || {
                std::hint::black_box(candle_attention(&q, &k, &v, s)?);
                Ok(())
            })?;
            // Same values up to the order of additions: candle's (heads, t, d) → (t, heads, d).
            let reference = flat(&candle_attention(&q, &k, &v, s)?.transpose(1, 2)?)?;
            let ours_out = attention(&qs, &cache, s);
            let diff = ours_out
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            out.insert(
                format!("{model}/{case}"),
                json!({"ours_ms": ours * 1e3, "candle_ms": theirs * 1e3,
                       "speedup_vs_candle": theirs / ours, "max_abs_diff": diff}),
            );
        }
    }
    Ok(Value::Object(out))
}
