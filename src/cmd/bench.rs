//! `mrrec bench`: calls the benchmarks of `mrrec-bench`; prints JSON.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use crate::args::*;

/// The benchmark parts (`--parts`).
const PARTS: [&str; 17] = [
    "embed",
    "search",
    "bm25",
    "ingest",
    "llm",
    "prefill",
    "attention",
    "constrained",
    "batched",
    "profile",
    "memory",
    "service",
    "hostile",
    "llmslots",
    "grpo",
    "judge",
    "rollout",
];

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Items for the exact-search benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) exact_items: usize,
    /// Items for the HNSW benchmark.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) hnsw_items: usize,
    /// Documents for the synthetic BM25 benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) bm25_items: usize,
    /// How many queries to time.
    #[arg(long, default_value_t = 200)]
    pub(crate) bench_queries: usize,
    /// Synthetic users (10 entries each) for the memory-retrieval benchmark.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) memory_users: usize,
    /// Store for the memory benchmark (SQLite file, postgres:// URL, or `pg-throwaway` for a
    /// PostgreSQL cluster started and removed by the benchmark).
    #[arg(long)]
    pub(crate) memory_store: Option<String>,
    /// Which parts (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(PARTS),
        default_value = "embed,search,bm25,ingest"
    )]
    pub(crate) parts: Vec<String>,
    /// Open-loop rate of the service benchmark, requests/s.
    #[arg(long, default_value_t = 500.0)]
    pub(crate) service_rate: f64,
    /// Seconds per service-benchmark scenario.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) service_seconds: f64,
    /// `prefill`: build llama.cpp (llama-cpp-python from PyPI, once, ~15 min) when it is not
    /// built yet, to measure it in the same run (without: measured only when already built).
    #[arg(long)]
    pub(crate) llama_cpp: bool,
    /// `prefill` and `llm`: the local models measured (registry ids or GGUF paths), in one run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct"
    )]
    pub(crate) bench_models: Vec<String>,
}

pub(crate) fn run(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        data,
        exact_items,
        hnsw_items,
        bm25_items,
        bench_queries,
        memory_users,
        memory_store,
        parts,
        service_rate,
        service_seconds,
        llama_cpp,
        bench_models,
    } = a;
    let bench_models: Vec<&str> = bench_models.iter().map(String::as_str).collect();
    let queries = bench_queries;
    let parts: std::collections::BTreeSet<&str> = parts.iter().map(String::as_str).collect();
    let mut out = serde_json::Map::new();
    out.insert("threads".into(), rayon::current_num_threads().into());
    if parts.contains("prefill") {
        out.insert(
            "prefill".into(),
            mrrec_bench::prefill::prefill(
                &bench_models,
                &mrrec_bench::prefill::LlamaCpp {
                    venv: std::env::var_os("LLAMA_CPP_VENV").map_or_else(
                        || mrrec_models::home().join("bench/llama-cpp-venv"),
                        PathBuf::from,
                    ),
                    build: llama_cpp,
                },
            )?,
        );
    }
    if parts.contains("attention") {
        out.insert("attention".into(), mrrec_bench::attention_kernel()?);
    }
    if parts.contains("llm") {
        out.insert("llm".into(), mrrec_bench::llm(&bench_models)?);
    }
    if parts.contains("batched") {
        out.insert(
            "batched".into(),
            json_pair(
                mrrec_bench::batched("smollm2-135m-instruct")?,
                mrrec_bench::batched("qwen2.5-coder-0.5b-instruct")?,
            ),
        );
    }
    if parts.contains("profile") {
        out.insert("qmatmul_profile".into(), mrrec_bench::qmatmul_profile()?);
    }
    if parts.contains("constrained") {
        out.insert(
            "constrained".into(),
            mrrec_bench::constrained("qwen2.5-coder-0.5b-instruct")?,
        );
    }
    if parts.contains("grpo") {
        let mut g = serde_json::Map::new();
        for m in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
            g.insert(m.into(), mrrec_bench::grpo(m)?);
        }
        out.insert("grpo".into(), serde_json::Value::Object(g));
    }
    if parts.contains("judge") {
        let mut g = Vec::new();
        let model = std::env::var("MRREC_BENCH_JUDGE_MODEL")
            .unwrap_or_else(|_| "qwen2.5-coder-0.5b-instruct".into());
        let sizes: Vec<usize> = match std::env::var("MRREC_BENCH_JUDGE_ITEMS") {
            Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            Err(_) => vec![8, 20],
        };
        for items in sizes {
            g.push(mrrec_bench::judge_step(&model, items)?);
        }
        out.insert("judge_step".into(), serde_json::Value::Array(g));
    }
    // The model parts alone need no catalogue.
    const MODEL_ONLY: [&str; 8] = [
        "judge",
        "prefill",
        "attention",
        "llm",
        "batched",
        "profile",
        "constrained",
        "grpo",
    ];
    if parts.iter().all(|p| MODEL_ONLY.contains(p)) {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let ws = Arc::new(data.open()?);
    if parts.contains("rollout") {
        let store = open_store(&ws, None)?;
        let mut g = Vec::new();
        for m in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
            g.push(mrrec_bench::rollouts(&ws, &*store, TENANT, m, 3, 5)?);
        }
        out.insert("rollout".into(), serde_json::Value::Array(g));
    }
    if parts.contains("llmslots") {
        out.insert(
            "service_llm".into(),
            mrrec_bench::service_llm(ws.clone(), "qwen2.5-coder-0.5b-instruct", 4, 12)?,
        );
    }
    if parts.contains("service") {
        out.insert(
            "service".into(),
            mrrec_bench::service(ws.clone(), 50, service_rate, service_seconds)?,
        );
    }
    if parts.contains("hostile") {
        out.insert(
            "hostile".into(),
            mrrec_bench::hostile::hostile(ws.clone(), 500, 100.0, service_seconds, 100_000)?,
        );
    }
    if parts.contains("embed") {
        out.insert("embedding".into(), mrrec_bench::embedding(&ws, 1024)?);
    }
    if parts.contains("search") {
        out.insert(
            "search".into(),
            mrrec_bench::search(&ws, exact_items, hnsw_items, queries)?,
        );
    }
    if parts.contains("ingest") {
        out.insert(
            "c4_ingest".into(),
            mrrec_bench::c4_ingest(&ws, exact_items)?,
        );
    }
    if parts.contains("memory") {
        let loc = memory_store.clone().unwrap_or_else(|| {
            mrrec_models::home()
                .join("bench")
                .join("memory-1m.sqlite")
                .display()
                .to_string()
        });
        // `pg-throwaway`: a PostgreSQL cluster started for the benchmark and removed after.
        let cluster;
        let loc = if loc == "pg-throwaway" {
            cluster = mrrec_bench::ThrowawayPostgres::start().map_err(anyhow::Error::msg)?;
            cluster
                .fresh_database("bench")
                .map_err(anyhow::Error::msg)?
        } else {
            loc
        };
        out.insert(
            "memory_retrieval".into(),
            mrrec_bench::memory_retrieval(&loc, memory_users, 10, queries)?,
        );
    }
    if parts.contains("bm25") {
        out.insert("bm25".into(), mrrec_bench::bm25(&ws, bm25_items, queries)?);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn json_pair(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(vec![a, b])
}
