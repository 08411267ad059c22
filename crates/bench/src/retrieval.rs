//! Embedding, exact and HNSW search, BM25, C4 ingest and local-memory retrieval.

use crate::*;

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
pub(crate) fn realistic_vectors(base: &[f32], dim: usize, n: usize, seed: u64) -> Vec<f32> {
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
                writer: None,
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
