//! `mrrec bench`: throughput and latency of the foundation, as ratios against baselines measured
//! in the same run. Writes JSON; BENCHMARKS.md records results.

pub mod hostile;
pub mod load;
pub mod prefill;

use std::time::Instant;

use anyhow::Result;
use mrrec_embed::{BertEmbedder, TextEmbedder};
use mrrec_index::{Bm25Index, ExactIndex, HnswIndex, HnswParams, ItemIndex, SearchQuery};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};

use mrrec_agent::Workspace;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Embedding throughput at batch 1 and 32 on real item texts.
pub fn embedding(ws: &Workspace, n: usize) -> Result<Value> {
    let texts: Vec<&str> = ws
        .catalogue()
        .items()
        .iter()
        .take(n)
        .map(|i| i.text.as_str())
        .collect();
    let e = BertEmbedder::default_model()?;
    let t = Instant::now();
    for chunk in texts.chunks(1).take(n.min(128)) {
        e.embed(chunk)?;
    }
    let b1 = n.min(128) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    e.embed(&texts)?;
    let b32 = texts.len() as f64 / t.elapsed().as_secs_f64();
    Ok(
        json!({"sentences_per_s_batch1": b1, "sentences_per_s_batch32": b32,
        "ratio_batch32_vs_candle_reference_162": b32 / 162.0, "texts": texts.len()}),
    )
}

/// Synthetic vectors that look like real ones: real item embeddings plus small noise, normalised.
fn realistic_vectors(base: &[f32], dim: usize, n: usize, seed: u64) -> Vec<f32> {
    let rows = base.len() / dim;
    let mut out = vec![0f32; n * dim];
    out.par_chunks_mut(dim).enumerate().for_each(|(i, row)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i as u64);
        let src = &base[(i % rows) * dim..][..dim];
        for (o, s) in row.iter_mut().zip(src) {
            *o = s + rng.gen_range(-0.04f32..0.04);
        }
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    });
    out
}

/// Exact search over `n` vectors and HNSW over `n_hnsw`, against exact.
pub fn search(ws: &Workspace, n: usize, n_hnsw: usize, queries: usize) -> Result<Value> {
    let dim = ws.embedder.dim();
    let base = ExactIndex::open(&ws.index_dir.join("exact"))?;
    let vecs = realistic_vectors(base.vectors(), dim, n, 1);
    let bw = mrrec_index::read_bandwidth(&vecs);
    let qs = realistic_vectors(base.vectors(), dim, queries, 2);
    let exact = ExactIndex::new(dim, vecs)?;
    let mut lat = Vec::new();
    for q in qs.chunks(dim) {
        let t = Instant::now();
        exact.search(&SearchQuery::vector(q), 100)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    let p50 = median(&mut lat);
    let bytes = (n * dim * 4) as f64;
    let exact_json = json!({"items": n, "dim": dim, "p50_ms": p50 * 1e3, "bytes_per_s": bytes / p50,
        "read_bandwidth_bytes_per_s": bw, "ratio_of_bandwidth": bytes / p50 / bw});
    // HNSW on the first n_hnsw vectors.
    let sub = &exact.vectors()[..n_hnsw.min(n) * dim];
    let ex_sub = ExactIndex::new(dim, sub.to_vec())?;
    let t = Instant::now();
    let h = HnswIndex::build(dim, sub, HnswParams::default())?;
    let build_s = t.elapsed().as_secs_f64();
    let (mut hl, mut el, mut found) = (Vec::new(), Vec::new(), 0usize);
    for q in qs.chunks(dim) {
        let t = Instant::now();
        let got = h.search(&SearchQuery::vector(q), 100)?;
        hl.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let truth = ex_sub.search(&SearchQuery::vector(q), 100)?;
        el.push(t.elapsed().as_secs_f64());
        let truth: std::collections::HashSet<u32> = truth.iter().map(|x| x.item).collect();
        found += got.iter().filter(|x| truth.contains(&x.item)).count();
    }
    let hp50 = median(&mut hl);
    let hnsw_json = json!({"items": n_hnsw.min(n), "build_s": build_s, "p50_ms": hp50 * 1e3,
        "p99_ms": pct(&mut hl, 0.99) * 1e3, "recall_at_100": found as f64 / (queries * 100) as f64,
        "exact_p50_ms_same_items": median(&mut el) * 1e3, "speedup_vs_exact": median(&mut el) / hp50});
    Ok(json!({"exact": exact_json, "hnsw": hnsw_json}))
}

/// BM25 latency on the workspace catalogue and on a synthetic catalogue of `n` documents.
pub fn bm25(ws: &Workspace, n: usize, queries: usize) -> Result<Value> {
    let qs: Vec<String> = ws
        .dataset
        .queries
        .all()
        .iter()
        .take(queries)
        .map(|q| q.query().query.clone())
        .collect();
    let time = |ix: &dyn ItemIndex| -> Result<f64> {
        let mut lat = Vec::new();
        for q in &qs {
            let t = Instant::now();
            ix.search(&SearchQuery::text(q), 100)?;
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(median(&mut lat) * 1e3)
    };
    let mini = time(ws.lexical.as_ref())?;
    // Synthetic: real item texts recombined word by word.
    let words: Vec<&str> = ws
        .catalogue()
        .items()
        .iter()
        .flat_map(|i| i.text.split_whitespace())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let docs: Vec<String> = (0..n)
        .map(|_| {
            (0..12)
                .map(|_| words[rng.gen_range(0..words.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let t = Instant::now();
    let big = Bm25Index::build(
        docs.iter().enumerate().map(|(i, d)| (i as u32, d.as_str())),
        None,
    )?;
    let build_s = t.elapsed().as_secs_f64();
    let big_ms = time(&big)?;
    Ok(
        json!({"mini_items": ws.catalogue().len(), "mini_p50_ms": mini,
        "synthetic_items": n, "synthetic_build_s": build_s, "synthetic_p50_ms": big_ms}),
    )
}

/// Ingest of a generated Amazon-C4 pool (`item_id, category, metadata` rows) of `n` items built
/// from real item texts: rows per second through the real loader.
pub fn c4_ingest(ws: &Workspace, n: usize) -> Result<Value> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sampled_item_metadata_1M.jsonl");
    let items = ws.catalogue().items();
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..n {
            let it = &items[i % items.len()];
            let row = json!({"item_id": format!("G{i:09}"), "category": it.main_category, "metadata": it.text});
            writeln!(w, "{row}")?;
        }
        w.flush()?;
    }
    let bytes = std::fs::metadata(&path)?.len();
    let t = Instant::now();
    let (cat, report) = mrrec_data::Catalogue::load(&path, &Default::default())?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(cat.len() == n && report.total_skipped() == 0, "{report}");
    Ok(json!({"items": n, "file_bytes": bytes, "seconds": secs, "items_per_s": n as f64 / secs}))
}

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
        let m = mrrec_llm::LocalModel::from_registry(id)?;
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
            "llama_cpp_decode": ref_dec, "llama_cpp_prefill": ref_pre,
            "decode_ratio_vs_llama_cpp": decode / ref_dec, "prefill_ratio_vs_llama_cpp": prefill / ref_pre,
        }));
    }
    Ok(Value::Object(out))
}

/// Per-token cost of JSON-schema-constrained decoding against free decoding, same model, prompt
/// and length (the schema's string field lets the model run the full length).
pub fn constrained(model: &str) -> Result<Value> {
    let m = mrrec_llm::LocalModel::from_registry(model)?;
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
    let m = mrrec_llm::LocalModel::from_registry(model)?;
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
        let packed = mrrec_llm::q8::PackedQ8::from_qtensor(&qt);
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

/// Local-memory retrieval latency for one user in a store of `users` synthetic users with
/// `per_user` entries each (384-d), against the same user's retrieval in a store holding only
/// that user: the ratio shows whether a lookup scans other users. `location` is a SQLite file
/// (created) or a postgres:// URL.
pub fn memory_retrieval(
    location: &str,
    users: usize,
    per_user: usize,
    queries: usize,
) -> Result<Value> {
    use mrrec_memory::{Level, MemoryEntry, MemoryWrite, Owner};
    let dim = 384;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let unit = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    };
    let text = "Bought \"Stainless steel kettle, 1.7 L\" (Home & Kitchen), rated 5/5. Review: Boils fast, quiet, and the lid does not drip.";
    let entries_for = |u: usize,
                       rng: &mut ChaCha8Rng,
                       unit: &dyn Fn(&mut ChaCha8Rng) -> Vec<f32>|
     -> Vec<MemoryEntry> {
        (0..per_user)
            .map(|i| MemoryEntry {
                id: format!("r-{u}-{i}"),
                level: if i % 5 == 4 {
                    Level::Pattern
                } else {
                    Level::Record
                },
                category: Some("Home_and_Kitchen".into()),
                text: text.to_string(),
                provenance: vec![format!("B{u:08}{i}")],
                embedding: unit(rng),
            })
            .collect()
    };
    let store = mrrec_memory::open_store(location)?;
    let t = Instant::now();
    let have = store.users("bench")?.len();
    for u in have..users {
        let es = entries_for(u, &mut rng, &unit);
        let user = format!("user{u:07}");
        store.put(
            Owner {
                tenant: "bench",
                user: &user,
            },
            &es,
        )?;
        if u % 10_000 == 0 {
            eprintln!("memory bench: {u}/{users} users written");
        }
    }
    let fill_s = t.elapsed().as_secs_f64();
    let time = |store: &dyn mrrec_memory::MemoryWrite,
                pick: &mut dyn FnMut() -> String,
                rng: &mut ChaCha8Rng|
     -> Result<(f64, f64)> {
        let mut lat = Vec::with_capacity(queries);
        for _ in 0..queries {
            let user = pick();
            let q = unit(rng);
            let t = Instant::now();
            let r = store.retrieve(
                Owner {
                    tenant: "bench",
                    user: &user,
                },
                &q,
                3,
                &Level::ALL,
            )?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                r.len() == 3.min(per_user),
                "retrieval returned {} entries",
                r.len()
            );
        }
        Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
    };
    let mut pick_rng = ChaCha8Rng::seed_from_u64(11);
    let (p50, p99) = time(
        &*store,
        &mut || format!("user{:07}", pick_rng.gen_range(0..users)),
        &mut rng,
    )?;
    // Baseline: the same retrieval in a store that holds one user.
    let dir = tempfile::tempdir()?;
    let one = mrrec_memory::SqliteStore::open(&dir.path().join("one.sqlite"))?;
    one.put(
        Owner {
            tenant: "bench",
            user: "user0000000",
        },
        &entries_for(0, &mut rng, &unit),
    )?;
    let (b50, b99) = time(&one, &mut || "user0000000".to_string(), &mut rng)?;
    let stats = store.stats("bench")?;
    Ok(json!({
        "store": if location.starts_with("postgres") { "postgres" } else { "sqlite" },
        "users": users, "entries": users * per_user, "fill_seconds": fill_s,
        "retrieve_p50_ms": p50, "retrieve_p99_ms": p99,
        "one_user_store_p50_ms": b50, "one_user_store_p99_ms": b99,
        "ratio_p50_vs_one_user_store": p50 / b50,
        "store_bytes": stats.bytes, "bytes_per_user": stats.bytes as f64 / users as f64,
    }))
}

/// The benchmarks' API key, of tenant "bench".
const BENCH_KEY: &str = "bench-key";

/// A key ring holding [`BENCH_KEY`].
fn bench_keys() -> Result<mrrec_server::auth::KeyRing> {
    use mrrec_server::auth::{hash_key, KeyRecord, KeyRing};
    KeyRing::from_records(&[KeyRecord {
        name: "b".into(),
        tenant: "bench".into(),
        sha256: hash_key(BENCH_KEY),
    }])
}

/// Serves `svc` on a free loopback port; returns its base URL and the sender that stops it.
async fn serve_loopback(
    svc: std::sync::Arc<mrrec_server::Service>,
) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", l.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mrrec_server::serve(l, svc, async {
        let _ = rx.await;
    }));
    Ok((base, tx))
}

/// A fresh SQLite store (in a temporary folder, kept alive by the returned guard) holding the
/// record memory of the first `users` dataset users, for tenant `bench`.
fn record_store(
    ws: &Workspace,
    users: usize,
) -> Result<(
    tempfile::TempDir,
    std::sync::Arc<mrrec_memory::SqliteStore>,
    Vec<String>,
)> {
    let dir = tempfile::tempdir()?;
    let store = std::sync::Arc::new(mrrec_memory::SqliteStore::open(
        &dir.path().join("m.sqlite"),
    )?);
    let all: Vec<&str> = ws
        .dataset
        .histories
        .user_ids()
        .into_iter()
        .take(users)
        .collect();
    let b = mrrec_agent::memory::MemoryBuilder {
        ws,
        store: &*store,
        tenant: "bench",
        llm: None,
        batch: 8,
        progress: true,
    };
    b.build_records(&all, &mut mrrec_agent::memory::BuildReport::default())?;
    let users = all.iter().map(|u| u.to_string()).collect();
    Ok((dir, store, users))
}

/// The service with a real local model: `clients` closed-loop clients send `requests`
/// recommendations, first with one LLM slot (answers one after another: the baseline), then with
/// `clients` slots whose model calls are decoded together (`batch_llm`). A fresh model each time
/// (no response cache, no remembered prompts). Answers/min, latency, and the ratio.
pub fn service_llm(
    ws: std::sync::Arc<Workspace>,
    model: &str,
    clients: usize,
    requests: usize,
) -> Result<Value> {
    use crate::load::{run, LoadOptions, MakeRequest};
    use mrrec_server::{Service, ServiceConfig};
    use std::sync::Arc;
    use std::time::Duration;

    let dir = tempfile::tempdir()?;
    let store = Arc::new(mrrec_memory::SqliteStore::open(
        &dir.path().join("m.sqlite"),
    )?);
    let queries: Vec<(String, String)> = ws
        .dataset
        .queries
        .all()
        .iter()
        .map(|q| q.query())
        .filter(|q| q.split == Some(mrrec_data::Split::Val))
        .take(requests)
        .map(|q| {
            let text = q.simple_query.clone().unwrap_or_else(|| q.query.clone());
            (q.user_id.clone(), text)
        })
        .collect();
    let users: Vec<&str> = queries.iter().map(|(u, _)| u.as_str()).collect();
    let mut report = mrrec_agent::memory::BuildReport::default();
    mrrec_agent::memory::MemoryBuilder {
        ws: &ws,
        store: &*store,
        tenant: "bench",
        llm: None,
        batch: 8,
        progress: false,
    }
    .build_records(&users, &mut report)?;
    let queries = Arc::new(queries);
    let make: MakeRequest = {
        let q = queries.clone();
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            let (user, text) = &q[i % q.len()];
            c.post(format!("{base}/v1/recommend"))
                .bearer_auth(BENCH_KEY)
                .json(&json!({"user": user, "request": text, "k": 10}))
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = serde_json::Map::new();
    for slots in [1, clients] {
        let llm: Arc<dyn mrrec_llm::ChatModel> =
            Arc::from(mrrec_agent::backend::chat_model(model, None)?);
        let svc = Service::new(
            ws.clone(),
            store.clone(),
            llm,
            None,
            bench_keys()?,
            ServiceConfig {
                rate_per_key: 0.0,
                llm_slots: slots,
                llm_queue: 256,
                batch_llm: true,
                answer_timeout: Duration::from_secs(3600),
                queue_timeout: Duration::from_secs(3600),
                ..Default::default()
            },
        );
        eprintln!("service with {model}: {slots} slot(s), {clients} clients, {requests} answers…");
        let r = rt.block_on(async {
            let (base, stop) = serve_loopback(svc).await?;
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(3600))
                .build()?;
            let r = run(
                client,
                &base,
                make.clone(),
                &LoadOptions {
                    concurrency: clients,
                    rate: None,
                    duration: Duration::from_secs(3600),
                    max_requests: requests,
                },
            )
            .await;
            let _ = stop.send(());
            anyhow::Ok(r)
        })?;
        out.insert(
            format!("slots_{slots}"),
            json!({
                "answers": r.count(200), "seconds": r.seconds,
                "answers_per_min": r.count(200) as f64 * 60.0 / r.seconds,
                "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "max_ms": r.max_ms,
            }),
        );
    }
    let apm = |k: &str| out[k]["answers_per_min"].as_f64().unwrap_or(0.0);
    let ratio = apm(&format!("slots_{clients}")) / apm("slots_1").max(1e-9);
    out.insert("batched_vs_one_slot".into(), json!(ratio));
    out.insert("model".into(), json!(model));
    Ok(Value::Object(out))
}

/// The service under load on loopback, with the instant `echo` model (so the service is
/// measured, not the LLM): a real store holding the record memory of `users` dataset users,
/// the real catalogue, MiniLM with a warm embedding cache. Closed loop (capacity) and open loop
/// at `rate` requests/s (latency at that load) for `/v1/items/search` and `/v1/recommend`, then
/// overload: the LLM queue and a per-key rate limit, which must answer only 200/503 and 200/429.
/// Client and server share the machine's cores.
pub fn service(
    ws: std::sync::Arc<Workspace>,
    users: usize,
    rate: f64,
    seconds: f64,
) -> Result<Value> {
    use crate::load::{run, LoadOptions, LoadReport, MakeRequest};
    use mrrec_server::{Service, ServiceConfig};
    use std::sync::Arc;
    use std::time::Duration;

    let (_dir, store, users) = record_store(&ws, users)?;
    let texts: Vec<String> = ws
        .dataset
        .queries
        .all()
        .iter()
        .take(200)
        .map(|q| q.query().query.clone())
        .collect();
    // Baseline in the same run: the same work called directly (no HTTP, no auth, one thread),
    // after one warming pass; the service's closed-loop throughput is reported against it.
    let echo = mrrec_llm::EchoModel::from_id("echo").expect("echo");
    let direct = {
        let a = mrrec_agent::assistant::Assistant {
            shop: ws.shop(),
            store: &*store,
            tenant: "bench",
            llm: &echo,
            cfg: mrrec_agent::assistant::AssistantConfig::default(),
            observer: None,
        };
        for (i, t) in texts.iter().enumerate() {
            ws.search_dense(t, 10)?;
            a.answer(&users[i % users.len()], t, None, 10)?;
        }
        let n = 2000;
        let t0 = Instant::now();
        for i in 0..n {
            ws.search_dense(&texts[i % texts.len()], 10)?;
        }
        let search_ops = n as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for i in 0..n {
            a.answer(&users[i % users.len()], &texts[i % texts.len()], None, 10)?;
        }
        let answer_ops = n as f64 / t0.elapsed().as_secs_f64();
        (search_ops, answer_ops)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let texts = Arc::new(texts);
    let users = Arc::new(users);
    let search: MakeRequest = {
        let texts = texts.clone();
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            c.get(format!("{base}/v1/items/search"))
                .query(&[("q", texts[i % texts.len()].as_str()), ("k", "10")])
                .bearer_auth(BENCH_KEY)
        })
    };
    let recommend = |key: &'static str| -> MakeRequest {
        let (texts, users) = (texts.clone(), users.clone());
        Arc::new(move |c: &reqwest::Client, base: &str, i: usize| {
            c.post(format!("{base}/v1/recommend"))
                .bearer_auth(key)
                .json(&json!({
                    "user": users[i % users.len()], "request": texts[i % texts.len()], "k": 10
                }))
        })
    };
    let json_of = |r: &LoadReport| serde_json::to_value(r).unwrap_or(Value::Null);
    let out = rt.block_on(async {
        let start = |cfg: ServiceConfig| {
            let svc = Service::new(
                ws.clone(),
                store.clone(),
                Arc::new(mrrec_llm::EchoModel::from_id("echo").expect("echo")),
                None,
                bench_keys().expect("keys"),
                cfg,
            );
            serve_loopback(svc)
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(30))
            .build()?;
        let base_cfg = ServiceConfig {
            rate_per_key: 0.0,
            llm_slots: 8,
            llm_queue: 256,
            cpu_slots: 4,
            cpu_queue: 1024,
            ..Default::default()
        };
        let (base, stop) = start(base_cfg.clone()).await?;
        let (s, r) = (search.clone(), recommend(BENCH_KEY));
        // Warm the embedding cache with every text (cold MiniLM is ~10 ms a text).
        let n = texts.len();
        let warm = LoadOptions {
            concurrency: 4,
            rate: None,
            duration: Duration::from_secs(600),
            max_requests: n,
        };
        run(client.clone(), &base, s.clone(), &warm).await;
        run(client.clone(), &base, r.clone(), &warm).await;
        let secs = Duration::from_secs_f64(seconds);
        let closed = LoadOptions {
            concurrency: 32,
            rate: None,
            duration: secs,
            max_requests: usize::MAX,
        };
        let open = LoadOptions {
            concurrency: 512,
            rate: Some(rate),
            duration: secs,
            max_requests: usize::MAX,
        };
        let mut res = serde_json::Map::new();
        eprintln!("service: closed loop, search…");
        res.insert(
            "search_closed_c32".into(),
            json_of(&run(client.clone(), &base, s.clone(), &closed).await),
        );
        eprintln!("service: closed loop, recommend…");
        let cap = run(client.clone(), &base, r.clone(), &closed).await;
        res.insert("recommend_closed_c32".into(), json_of(&cap));
        // Open loop: a sweep up to `rate` (latency at a given load, no coordinated omission).
        for r_s in [100.0, 250.0, rate] {
            let open = LoadOptions {
                rate: Some(r_s),
                ..open.clone()
            };
            eprintln!("service: open loop at {r_s}/s…");
            res.insert(
                format!("search_open_{r_s}"),
                json_of(&run(client.clone(), &base, s.clone(), &open).await),
            );
            res.insert(
                format!("recommend_open_{r_s}"),
                json_of(&run(client.clone(), &base, r.clone(), &open).await),
            );
        }
        let _ = stop.send(());
        // Overload 1: the LLM gate (2 slots, 8 waiting, 250 ms at most in the queue) at twice
        // the measured capacity.
        let (base, stop) = start(ServiceConfig {
            llm_slots: 2,
            llm_queue: 8,
            queue_timeout: Duration::from_millis(250),
            ..base_cfg.clone()
        })
        .await?;
        let over = LoadOptions {
            concurrency: 512,
            rate: Some((cap.rps * 2.0).max(50.0)),
            duration: secs,
            max_requests: usize::MAX,
        };
        eprintln!("service: overload, LLM queue…");
        res.insert(
            "recommend_overload_llm_queue".into(),
            json_of(&run(client.clone(), &base, recommend(BENCH_KEY), &over).await),
        );
        let _ = stop.send(());
        // Overload 2: 100 requests/s per key, sent at 300/s.
        let (base, stop) = start(ServiceConfig {
            rate_per_key: 100.0,
            burst: 100.0,
            ..base_cfg
        })
        .await?;
        let over = LoadOptions {
            concurrency: 512,
            rate: Some(300.0),
            duration: secs,
            max_requests: usize::MAX,
        };
        eprintln!("service: overload, rate limit…");
        res.insert(
            "search_overload_rate_limit".into(),
            json_of(&run(client.clone(), &base, search.clone(), &over).await),
        );
        let _ = stop.send(());
        let rps = |k: &str| res.get(k).and_then(|v| v["rps"].as_f64()).unwrap_or(0.0);
        let ratios = json!({
            "direct_search_per_s_one_thread": direct.0,
            "direct_answer_per_s_one_thread": direct.1,
            "search_service_vs_direct": rps("search_closed_c32") / direct.0,
            "recommend_service_vs_direct": rps("recommend_closed_c32") / direct.1,
        });
        res.insert("baseline".into(), ratios);
        anyhow::Ok(Value::Object(res))
    })?;
    Ok(
        json!({"users": users.len(), "items": ws.catalogue().len(), "texts": texts.len(), "rate": rate, "seconds": seconds, "results": out}),
    )
}

/// The training model's cost per trajectory segment as the prompt and the response grow: one
/// forward with the adapter and the reference pass (sharing the frozen lower layers), then the
/// backward of the summed log-probabilities — what a GRPO step does per segment (a step costs
/// G × segments × this). Real weights of `model`, LoRA r8 on q,v of the top 4 layers.
pub fn grpo(model: &str) -> Result<Value> {
    let local = mrrec_llm::LocalModel::from_registry(model)?;
    let policy =
        mrrec_train::Policy::from_gguf(&local.info().path, mrrec_train::LoraConfig::default())?;
    let text = "A user asks for a soft plush toy for a toddler. Memories: bought a wooden train set, rated 5/5; prefers washable fabrics. ";
    let ids = local.info().encode(text)?;
    let mut out = Vec::new();
    for (prompt, response) in [(256usize, 32usize), (256, 128), (512, 128), (1024, 128)] {
        let n = prompt + response;
        let toks: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
        let mut cache = mrrec_train::LowerCache::new(2);
        let t0 = Instant::now();
        let (lp, _) =
            policy.token_logprobs_with_reference(&toks, prompt, &[], 64, Some(&mut cache))?;
        let fwd = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let _ = lp.sum_all()?.backward()?;
        let bwd = t1.elapsed().as_secs_f64();
        // Another response to the same prompt (the next trajectory of a group): the frozen
        // lower layers run on the response only.
        let mut other = toks[..prompt].to_vec();
        other.extend(toks[prompt..].iter().rev());
        let t2 = Instant::now();
        let (lp2, _) =
            policy.token_logprobs_with_reference(&other, prompt, &[], 64, Some(&mut cache))?;
        let fwd_shared = t2.elapsed().as_secs_f64();
        drop(lp2);
        out.push(json!({
            "prompt": prompt, "response": response,
            "forward_s": fwd, "backward_s": bwd,
            "forward_shared_prompt_s": fwd_shared,
            "forward_ratio_shared_vs_full": fwd_shared / fwd,
            "tokens_per_s": n as f64 / (fwd + bwd),
            "peak_rss": resident_bytes(),
        }));
        eprintln!("grpo {model}: prompt {prompt} + response {response}: forward {fwd:.2} s, backward {bwd:.2} s");
    }
    Ok(json!({"model": model, "segments": out}))
}

/// GRPO rollouts of real training queries with the real memory: a group's `g` trajectories one
/// after another, then decoded together (a thread each, one batch per model step), same seeds.
/// Reports sampled tokens per second of both and their ratio. Needs the users' record memory
/// (`mrrec memory build`).
pub fn rollouts(
    ws: &Workspace,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    model: &str,
    queries: usize,
    g: usize,
) -> Result<Value> {
    let local = mrrec_llm::LocalModel::from_registry(model)?;
    let all = ws
        .dataset
        .queries
        .for_purpose(&mrrec_data::Purpose::Evaluate(vec![
            mrrec_data::Split::Train,
        ]))
        .map_err(anyhow::Error::msg)?;
    let r = mrrec_train::rollout::Rollouts {
        ws,
        store,
        tenant,
        local: &local,
        cfg: mrrec_agent::assistant::AssistantConfig::default(),
        temperature: 1.0,
        weights: mrrec_agent::rewards::RewardWeights::default(),
    };
    let mut rows = Vec::new();
    let (mut tot_seq, mut tot_bat) = ((0usize, 0f64), (0usize, 0f64));
    for (i, q) in all.iter().take(queries).enumerate() {
        let Some(target) = ws.catalogue().position(q.target()) else {
            continue;
        };
        let query = q.query();
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let run = |batched: bool| -> Result<(usize, f64)> {
            let t = Instant::now();
            let group = r.group(
                &query.user_id,
                request,
                query.category.as_deref(),
                target,
                g,
                100 + i as u64,
                batched,
            )?;
            let tokens: usize = group
                .iter()
                .flat_map(|t| &t.segments)
                .map(|s| s.ids.len())
                .sum();
            Ok((tokens, t.elapsed().as_secs_f64()))
        };
        if i == 0 {
            run(false)?; // warm-up: constraint compiler, caches
        }
        let s = run(false)?;
        let b = run(true)?;
        tot_seq = (tot_seq.0 + s.0, tot_seq.1 + s.1);
        tot_bat = (tot_bat.0 + b.0, tot_bat.1 + b.1);
        eprintln!(
            "rollouts {model} G={g} query {}: sequential {} tokens in {:.1} s, batched {} tokens in {:.1} s",
            query.qid, s.0, s.1, b.0, b.1
        );
        rows.push(
            json!({"qid": query.qid, "sequential": {"tokens": s.0, "seconds": s.1},
                          "batched": {"tokens": b.0, "seconds": b.1}}),
        );
    }
    let rate = |(t, s): (usize, f64)| t as f64 / s.max(1e-9);
    Ok(json!({"model": model, "group": g, "queries": rows,
              "sequential_tokens_per_s": rate(tot_seq), "batched_tokens_per_s": rate(tot_bat),
              "ratio_batched_vs_sequential": rate(tot_bat) / rate(tot_seq)}))
}
