//! `mrrec bench --parts prefill`: prompt prefill against this machine's int8 compute ceiling and
//! against llama.cpp on the same GGUF files and threads, measured in the same run.
//!
//! - `ceiling`: multiply-adds per second of `vpdpbusd` alone on every thread (no memory traffic);
//! - `kernel`: the packed Q8_0 GEMM at 1,300 rows on each of Qwen 0.5B's projection shapes, as
//!   GMAC/s and a share of the ceiling;
//! - per model: 1,000-token prefill and single-stream decode (tokens/s), the prefill's share of
//!   the ceiling (multiply-adds of its projections per token × tokens/s ÷ ceiling), four
//!   250-token and eight 32-token prompts prefilled together against one at a time, and
//!   llama.cpp's prefill and decode on the file
//!   the model was converted from (`scripts/llama-cpp-bench.sh`; skipped, and said so, when its
//!   build is absent and `--llama-cpp` was not given).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use mrrec_llm::Sampling;
use mrrec_llm_local::model::Proj;
use mrrec_llm_local::LocalModel;
use serde_json::{json, Value};

/// Median of `reps` timings of `f` (after one warm-up call).
pub(crate) fn timed(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(crate::median(&mut v))
}

/// Median seconds to prefill `parts` as one batch, and one by one.
fn together_vs_apart(
    tf: &mrrec_llm_local::model::Transformer,
    parts: &[&[u32]],
    reps: usize,
) -> Result<(f64, f64)> {
    let together = timed(reps, || {
        let mut cs: Vec<_> = parts.iter().map(|_| tf.new_cache()).collect();
        let mut refs: Vec<_> = cs.iter_mut().collect();
        tf.prefill_batch(parts, &mut refs)?;
        Ok(())
    })?;
    let apart = timed(reps, || {
        for p in parts {
            tf.prefill(p, &mut tf.new_cache())?;
        }
        Ok(())
    })?;
    Ok((together, apart))
}

/// The int8 ceiling on `threads` threads at once (MAC/s, summed).
fn ceiling(threads: usize) -> Option<f64> {
    let iters = 20_000_000;
    mrrec_llm_local::q8::vnni_peak_macs_per_s(iters / 10)?; // warm-up (clocks)
    let per: Vec<Option<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || mrrec_llm_local::q8::vnni_peak_macs_per_s(iters)))
            .collect();
        hs.into_iter().map(|h| h.join().ok().flatten()).collect()
    });
    per.into_iter().sum()
}

/// The packed GEMM alone at Qwen 0.5B's shapes, 1,300 rows.
fn kernel(ceiling: Option<f64>) -> Result<Value> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let mut out = serde_json::Map::new();
    for (name, n, k) in [
        ("attn_k 896→128", 128usize, 896usize),
        ("attn_q 896→896", 896, 896),
        ("ffn_up 896→4864", 4864, 896),
        ("ffn_down 4864→896", 896, 4864),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
        let Some(p) =
            mrrec_llm_local::q8::PackedQ8::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0)?)
        else {
            return Ok(json!(
                "no AVX512-VNNI on this CPU: the packed kernel does not run"
            ));
        };
        let m = 1300;
        let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let q = mrrec_llm_local::q8::quantise(&xs, m, k);
        let secs = timed(5, || {
            std::hint::black_box(p.matmul_quantised(&q));
            Ok(())
        })?;
        let quantise = timed(5, || {
            std::hint::black_box(mrrec_llm_local::q8::quantise(&xs, m, k));
            Ok(())
        })?;
        let rate = p.macs(m) as f64 / secs;
        out.insert(
            name.into(),
            json!({"rows": m, "ms": secs * 1e3, "quantise_ms": quantise * 1e3, "gmac_per_s": rate / 1e9,
                   "share_of_ceiling": ceiling.map(|c| rate / c)}),
        );
    }
    Ok(Value::Object(out))
}

/// Where llama.cpp is measured from: the build the script keeps (its virtual environment, by
/// default `<home>/bench/llama-cpp-venv`; the binary passes `LLAMA_CPP_VENV`), and whether to
/// build it when absent.
#[derive(Debug, Clone)]
pub struct LlamaCpp {
    /// The virtual environment holding llama-cpp-python.
    pub venv: PathBuf,
    /// Build it when absent (about 15 minutes).
    pub build: bool,
}

/// llama.cpp's figures for `files`, from `scripts/llama-cpp-bench.sh` (JSON on stdout).
fn llama_cpp(files: &[PathBuf], threads: usize, venv: &Path) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llama-cpp-bench.sh");
    let out = Command::new("bash")
        .env("LLAMA_CPP_VENV", venv)
        .env("MRREC_HOME", mrrec_models::home())
        .arg(&script)
        .arg("--threads")
        .arg(threads.to_string())
        .args(files)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("llama.cpp benchmark output")
}

/// The whole part (see the module doc).
pub fn prefill(models: &[&str], llama: &LlamaCpp) -> Result<Value> {
    let threads = candle_core::utils::get_num_threads();
    let ceiling_all = ceiling(threads);
    let ceiling_one = ceiling(1);
    let mut out = serde_json::Map::new();
    out.insert(
        "ceiling".into(),
        json!({"threads": threads, "gmac_per_s": ceiling_all.map(|c| c / 1e9),
               "gmac_per_s_one_thread": ceiling_one.map(|c| c / 1e9),
               "how": "16 independent vpdpbusd zmm accumulators per thread, no memory traffic"}),
    );
    out.insert("kernel_1300_rows".into(), kernel(ceiling_all)?);
    let reference = if llama.build || llama.venv.join("bin/python").exists() {
        let files = models
            .iter()
            .map(|m| {
                Ok(if mrrec_llm_local::names_a_file(m) {
                    PathBuf::from(m)
                } else {
                    LocalModel::source_file(m)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let r = llama_cpp(&files, threads, &llama.venv)?;
        Some((files, r))
    } else {
        None
    };
    let mut per_model = serde_json::Map::new();
    for (mi, &id) in models.iter().enumerate() {
        let m = LocalModel::open(id)?;
        let tf = m.transformer();
        let macs_per_token: usize = (0..tf.n_layers())
            .map(|_| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let (o, i) = tf.proj_shape(p);
                        o * i
                    })
                    .sum::<usize>()
            })
            .sum();
        let text = "The quick brown fox jumps over the lazy dog while the assistant writes notes. "
            .repeat(80);
        let mut ids = m.info().encode(&text)?;
        ids.truncate(1000);
        anyhow::ensure!(ids.len() == 1000, "prompt of {} tokens", ids.len());
        let prefill_s = timed(3, || {
            let mut c = tf.new_cache();
            tf.prefill(&ids, &mut c)?;
            Ok(())
        })?;
        let prefill = 1000.0 / prefill_s;
        // Four 250-token prompts, then eight 32-token ones (short new suffixes, as a batch's
        // tool turns are): together (one weight read for all) and one by one.
        let long = together_vs_apart(tf, &ids.chunks(250).collect::<Vec<_>>(), 3)?;
        let suffixes = together_vs_apart(tf, &ids.chunks(32).take(8).collect::<Vec<_>>(), 5)?;
        let greedy = |n| Sampling {
            max_tokens: n,
            ..Default::default()
        };
        let short = &ids[..32];
        let one = timed(3, || {
            m.generate(short, &greedy(1), &mut |_| {})?;
            Ok(())
        })?;
        let mut decoded = 0usize;
        let many = timed(3, || {
            decoded = m.generate(short, &greedy(65), &mut |_| {})?.ids.len();
            Ok(())
        })?;
        let decode = decoded.saturating_sub(1).max(1) as f64 / (many - one).max(1e-9);
        let rate = macs_per_token as f64 * prefill;
        let mut row = json!({
            "prompt_tokens": 1000,
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode,
            "projection_gmac_per_token": macs_per_token as f64 / 1e9,
            "prefill_share_of_ceiling": ceiling_all.map(|c| rate / c),
            "batched_prefill_4x250_tokens_per_s": 1000.0 / long.0,
            "batched_prefill_ratio_vs_one_by_one": long.1 / long.0,
            "batched_prefill_8x32_ratio_vs_one_by_one": suffixes.1 / suffixes.0,
        });
        if let Some((files, r)) = &reference {
            let key = files[mi].to_string_lossy().to_string();
            if let Some(l) = r["models"].get(&key) {
                let (lp, ld) = (
                    l["prefill_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                    l["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                );
                row["llama_cpp"] = l.clone();
                row["prefill_ratio_vs_llama_cpp"] = json!(prefill / lp);
                row["decode_ratio_vs_llama_cpp"] = json!(decode / ld);
            }
        }
        per_model.insert(id.to_string(), row);
    }
    out.insert("models".into(), Value::Object(per_model));
    match reference {
        Some((_, r)) => {
            out.insert("llama_cpp_python".into(), r["llama_cpp_python"].clone());
            out.insert("llama_cpp_system_info".into(), r["system_info"].clone());
        }
        None => {
            out.insert(
                "llama_cpp_python".into(),
                json!("not measured: build it with `mrrec bench --parts prefill --llama-cpp` (once, ~15 min)"),
            );
        }
    }
    Ok(Value::Object(out))
}
