//! `mrrec bench`: throughput and latency of the foundation, as ratios against baselines measured
//! in the same run. Writes JSON; BENCHMARKS.md records results.

mod attention;
pub mod hostile;
mod llm;
pub mod load;
pub mod prefill;
mod retrieval;
mod service;
mod train;

pub use attention::attention_kernel;
pub use llm::*;
/// A PostgreSQL cluster started for a benchmark and removed after (`--memory-store pg-throwaway`).
pub use mrrec_memory::pgtest::TestCluster as ThrowawayPostgres;
pub use retrieval::*;
pub use service::*;
pub use train::*;

use std::time::Instant;

use anyhow::Result;
use mrrec_embed::{BertEmbedder, TextEmbedder};
use mrrec_index::{Bm25Index, ExactIndex, HnswIndex, HnswParams, ItemIndex, SearchQuery};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{json, Value};

use mrrec_agent::Workspace;

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}
