//! Resumable evaluation runs.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use mrrec_data::{Catalogue, LabeledQuery, Query, QueryField, Split};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::report::{markdown_table, recall_curve_svg};
use crate::stats::{bootstrap, Estimate};
use crate::{io_err, EvalError, Metric, Result};

/// LLM and memory cost of answering one query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens sent to the LLM.
    pub prompt_tokens: u64,
    /// Tokens the LLM generated.
    pub completion_tokens: u64,
    /// Tokens of user memory injected into prompts (the paper's Table 4).
    pub memory_tokens: u64,
    /// Wall time spent in the LLM, seconds.
    pub llm_seconds: f64,
}

impl Usage {
    fn add(&mut self, o: &Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.memory_tokens += o.memory_tokens;
        self.llm_seconds += o.llm_seconds;
    }
}

/// A method's answer to one query: the ranking (catalogue positions, best first) and its why.
#[derive(Debug, Clone, Default)]
pub struct MethodAnswer {
    /// Catalogue positions, best first.
    pub ranking: Vec<u32>,
    /// What the method did (reasoning, tool calls, profile…), kept in `per_query.jsonl`.
    pub trace: Option<serde_json::Value>,
    /// What it cost.
    pub usage: Usage,
}

/// Why a method could not answer a batch.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// A query lacks what the method reads (e.g. no `simple_query`), named.
    #[error("{0}")]
    Query(String),
    /// The answer was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The method failed; its error is the source.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl MethodError {
    /// A failure with its error kept as the source.
    pub fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        MethodError::Failed(e.into())
    }
}

/// Something `mrrec eval` can score: it sees only [`Query`] values (no target, no original
/// review) and ranks the whole catalogue.
pub trait Method: Send + Sync {
    /// Its registry name ("bm25", "dense", "mrrec"…).
    fn name(&self) -> &str;
    /// Its settings, recorded in the run's provenance.
    fn settings(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Answers a batch of queries, reading `field`, returning at most `k` items each, in order.
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> std::result::Result<Vec<MethodAnswer>, MethodError>;
}

/// What a run evaluates; stored as `run.json`, and a rerun into the same folder must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Method name.
    pub method: String,
    /// Which query text the method reads.
    pub query_field: QueryField,
    /// Splits evaluated.
    pub splits: Vec<Split>,
    /// A seeded subset of this many queries (all when `None`).
    pub limit: Option<usize>,
    /// Seed of the subset and the bootstrap.
    pub seed: u64,
    /// Cut-offs reported (R@k, N@k).
    pub ks: Vec<usize>,
    /// Bootstrap resamples.
    pub bootstrap_rounds: usize,
    /// Method settings.
    pub settings: serde_json::Value,
    /// Where the inputs came from (git commit, data and model sha256, prompt version…).
    pub provenance: BTreeMap<String, String>,
}

impl RunSpec {
    fn depth(&self) -> usize {
        self.ks.iter().copied().max().unwrap_or(1000)
    }

    /// The same spec without provenance fields that may change between resumptions.
    fn identity(&self) -> RunSpec {
        let mut s = self.clone();
        s.provenance.remove("git_commit");
        s.provenance.remove("started");
        // Recorded, not part of the identity: a run may resume with another batch.
        s.provenance.remove("query_batch");
        // The memory may be built further between resumptions.
        s.provenance.remove("memory_writers");
        s.provenance.remove("memory_coverage");
        s.provenance.remove("memory_incomplete");
        s
    }
}

/// One evaluated query, as stored in `per_query.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryOutcome {
    /// Query id.
    pub qid: String,
    /// Asking user.
    pub user_id: String,
    /// Scenario.
    pub category: Option<String>,
    /// Target item id.
    pub target: String,
    /// 1-based rank of the target within the returned ranking, `None` when absent.
    pub rank: Option<usize>,
    /// The first ten item ids returned.
    pub top10: Vec<String>,
    /// Cost.
    #[serde(default)]
    pub usage: Usage,
    /// The method's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<serde_json::Value>,
}

/// The numbers of a finished run (`metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMetrics {
    /// The run's spec.
    pub spec: RunSpec,
    /// Queries evaluated.
    pub n: usize,
    /// Queries skipped (e.g. no text in the asked field).
    pub skipped: usize,
    /// Metric name → mean with 95% interval.
    pub metrics: BTreeMap<String, Estimate>,
    /// Category → (queries, metric name → mean).
    pub per_category: BTreeMap<String, (usize, BTreeMap<String, f64>)>,
    /// Summed cost.
    pub usage: Usage,
    /// Memory tokens injected per query, on average.
    pub memory_tokens_per_query: f64,
    /// Wall time of the method, seconds (all sessions of a resumed run).
    pub method_seconds: f64,
}

const RUN_FILE: &str = "run.json";
const PER_QUERY: &str = "per_query.jsonl";
const METRICS: &str = "metrics.json";

fn read_outcomes(path: &Path) -> Result<Vec<QueryOutcome>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    let mut bad = 0usize;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<QueryOutcome>(&line) {
            Ok(o) => out.push(o),
            Err(_) => bad += 1, // a line cut by an interrupted write: that query is redone
        }
    }
    if bad > 0 {
        tracing::warn!(
            "{}: dropped {bad} incomplete line(s); those queries will be redone",
            path.display()
        );
    }
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Chooses the queries of a run: those of the asked splits that have text in the asked field,
/// then a seeded subset of `limit` (kept in file order). Returns them and how many lacked text.
pub fn select_queries<'a>(
    queries: Vec<&'a LabeledQuery>,
    spec: &RunSpec,
) -> (Vec<&'a LabeledQuery>, usize) {
    let before = queries.len();
    let mut with_text: Vec<(usize, &LabeledQuery)> = queries
        .into_iter()
        .filter(|q| {
            q.query()
                .text(spec.query_field)
                .is_some_and(|t| !t.trim().is_empty())
        })
        .enumerate()
        .collect();
    let skipped = before - with_text.len();
    if let Some(limit) = spec.limit {
        if limit < with_text.len() {
            let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
            with_text.shuffle(&mut rng);
            with_text.truncate(limit);
            with_text.sort_by_key(|(i, _)| *i);
        }
    }
    (with_text.into_iter().map(|(_, q)| q).collect(), skipped)
}

/// Runs (or resumes) an evaluation into `out`: answers every selected query not yet in
/// `per_query.jsonl`, appending as it goes, then writes `metrics.json`, `table.md` and
/// `recall.svg`. `progress(done, total)` is called after each batch.
pub fn run_eval(
    method: &dyn Method,
    queries: Vec<&LabeledQuery>,
    catalogue: &Catalogue,
    spec: &RunSpec,
    out: &Path,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RunMetrics> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let run_path = out.join(RUN_FILE);
    if run_path.exists() {
        let old: RunSpec = serde_json::from_slice(
            &std::fs::read(&run_path).map_err(io_err(&run_path))?,
        )
        .map_err(|e| EvalError::BadRun {
            path: run_path.clone(),
            message: e.to_string(),
        })?;
        if old.identity() != spec.identity() {
            return Err(EvalError::BadRun {
                path: run_path,
                message: "this folder holds a different run (method, field, splits, limit, seed or settings differ); choose another --out or delete it".into(),
            });
        }
    } else {
        write_atomic(
            &run_path,
            &serde_json::to_vec_pretty(spec).unwrap_or_default(),
        )?;
    }
    let (selected, skipped) = select_queries(queries, spec);
    let pq_path = out.join(PER_QUERY);
    let mut done = read_outcomes(&pq_path)?;
    let wanted: HashSet<&str> = selected.iter().map(|q| q.query().qid.as_str()).collect();
    done.retain(|o| wanted.contains(o.qid.as_str()));
    let mut seen = HashSet::new();
    done.retain(|o| seen.insert(o.qid.clone()));
    // Rewrite without cut or foreign lines before appending.
    write_outcomes(&pq_path, &done)?;
    let todo: Vec<&LabeledQuery> = selected
        .iter()
        .copied()
        .filter(|q| !seen.contains(&q.query().qid))
        .collect();
    let total = selected.len();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&pq_path)
        .map_err(io_err(&pq_path))?;
    let depth = spec.depth();
    let mut elapsed = 0.0;
    progress(done.len(), total);
    for chunk in todo.chunks(batch.max(1)) {
        let qs: Vec<&Query> = chunk.iter().map(|q| q.query()).collect();
        let t0 = std::time::Instant::now();
        let answers =
            method
                .answer(&qs, spec.query_field, depth)
                .map_err(|e| EvalError::Method {
                    method: method.name().to_string(),
                    qid: qs.first().map(|q| q.qid.clone()).unwrap_or_default(),
                    message: e.to_string(),
                })?;
        elapsed += t0.elapsed().as_secs_f64();
        if answers.len() != chunk.len() {
            return Err(EvalError::Method {
                method: method.name().to_string(),
                qid: qs[0].qid.clone(),
                message: format!(
                    "returned {} answers for {} queries",
                    answers.len(),
                    chunk.len()
                ),
            });
        }
        let mut lines = Vec::new();
        for (lq, ans) in chunk.iter().zip(answers) {
            let target = catalogue.position(lq.target());
            let mut seen_items = HashSet::new();
            let ranking: Vec<u32> = ans
                .ranking
                .into_iter()
                .filter(|i| seen_items.insert(*i))
                .take(depth)
                .collect();
            let rank = target.and_then(|t| crate::rank_of(&ranking, &t));
            let top10 = ranking
                .iter()
                .take(10)
                .filter_map(|&i| catalogue.get(i).map(|it| it.id.clone()))
                .collect();
            let o = QueryOutcome {
                qid: lq.query().qid.clone(),
                user_id: lq.query().user_id.clone(),
                category: lq.query().category.clone(),
                target: lq.target().to_string(),
                rank,
                top10,
                usage: ans.usage,
                trace: ans.trace,
            };
            lines.extend(serde_json::to_vec(&o).unwrap_or_default());
            lines.push(b'\n');
            done.push(o);
        }
        file.write_all(&lines).map_err(io_err(&pq_path))?;
        file.flush().map_err(io_err(&pq_path))?;
        progress(done.len(), total);
    }
    // Keep file order in the outputs.
    let order: BTreeMap<&str, usize> = selected
        .iter()
        .enumerate()
        .map(|(i, q)| (q.query().qid.as_str(), i))
        .collect();
    done.sort_by_key(|o| order.get(o.qid.as_str()).copied().unwrap_or(usize::MAX));
    let mut metrics = summarise(spec, &done, skipped);
    let prev_seconds = std::fs::read(out.join(METRICS))
        .ok()
        .and_then(|b| serde_json::from_slice::<RunMetrics>(&b).ok())
        .map(|m| m.method_seconds)
        .unwrap_or(0.0);
    metrics.method_seconds = prev_seconds + elapsed;
    write_outputs(out, &metrics, &done)?;
    Ok(metrics)
}

/// Computes a run's numbers from its per-query outcomes.
pub fn summarise(spec: &RunSpec, outcomes: &[QueryOutcome], skipped: usize) -> RunMetrics {
    let users: Vec<&str> = outcomes.iter().map(|o| o.user_id.as_str()).collect();
    let mut metrics = BTreeMap::new();
    for m in Metric::standard(&spec.ks) {
        let values: Vec<f64> = outcomes.iter().map(|o| m.of(o.rank)).collect();
        metrics.insert(
            m.name(),
            bootstrap(&values, &users, spec.bootstrap_rounds, spec.seed),
        );
    }
    let mut per_category: BTreeMap<String, (usize, BTreeMap<String, f64>)> = BTreeMap::new();
    let mut by_cat: BTreeMap<String, Vec<&QueryOutcome>> = BTreeMap::new();
    for o in outcomes {
        by_cat
            .entry(o.category.clone().unwrap_or_else(|| "(none)".into()))
            .or_default()
            .push(o);
    }
    for (cat, os) in by_cat {
        let mut m = BTreeMap::new();
        for metric in Metric::standard(&spec.ks) {
            let mean = os.iter().map(|o| metric.of(o.rank)).sum::<f64>() / os.len() as f64;
            m.insert(metric.name(), mean);
        }
        per_category.insert(cat, (os.len(), m));
    }
    let mut usage = Usage::default();
    for o in outcomes {
        usage.add(&o.usage);
    }
    RunMetrics {
        spec: spec.clone(),
        n: outcomes.len(),
        skipped,
        metrics,
        per_category,
        usage,
        memory_tokens_per_query: if outcomes.is_empty() {
            0.0
        } else {
            usage.memory_tokens as f64 / outcomes.len() as f64
        },
        method_seconds: 0.0,
    }
}

fn write_outputs(out: &Path, m: &RunMetrics, outcomes: &[QueryOutcome]) -> Result<()> {
    write_atomic(
        &out.join(METRICS),
        &serde_json::to_vec_pretty(m).unwrap_or_default(),
    )?;
    let name = format!("{} ({})", m.spec.method, m.spec.query_field);
    write_atomic(
        &out.join("table.md"),
        markdown_table(&[(name.clone(), m)], true).as_bytes(),
    )?;
    let ranks: Vec<Option<usize>> = outcomes.iter().map(|o| o.rank).collect();
    write_atomic(
        &out.join("recall.svg"),
        recall_curve_svg(&[(name, ranks)], m.spec.depth()).as_bytes(),
    )
}

/// Writes a whole run computed elsewhere (e.g. a finished run's judged items fused again at
/// another weight) as a run folder `eval` and `compare` read: `run.json`, `per_query.jsonl`,
/// `metrics.json`, `table.md`, `recall.svg`. Refuses a folder that already holds a run.
pub fn save_run(out: &Path, m: &RunMetrics, outcomes: &[QueryOutcome]) -> Result<()> {
    let run_path = out.join(RUN_FILE);
    if run_path.exists() {
        return Err(EvalError::BadRun {
            path: run_path,
            message: "this folder already holds a run; choose another --out or delete it".into(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_atomic(
        &run_path,
        &serde_json::to_vec_pretty(&m.spec).unwrap_or_default(),
    )?;
    write_outcomes(&out.join(PER_QUERY), outcomes)?;
    write_outputs(out, m, outcomes)
}

/// `outcomes` as `per_query.jsonl` (one JSON line each), replacing the file in one step.
fn write_outcomes(path: &Path, outcomes: &[QueryOutcome]) -> Result<()> {
    let mut buf = Vec::new();
    for o in outcomes {
        buf.extend(serde_json::to_vec(o).unwrap_or_default());
        buf.push(b'\n');
    }
    write_atomic(path, &buf)
}

/// A finished run read back from its folder: its metrics and per-query outcomes.
pub fn load_run(dir: &Path) -> Result<(RunMetrics, Vec<QueryOutcome>)> {
    let mp: PathBuf = dir.join(METRICS);
    let m: RunMetrics =
        serde_json::from_slice(&std::fs::read(&mp).map_err(io_err(&mp))?).map_err(|e| {
            EvalError::BadRun {
                path: mp.clone(),
                message: e.to_string(),
            }
        })?;
    let outcomes = read_outcomes(&dir.join(PER_QUERY))?;
    Ok((m, outcomes))
}
