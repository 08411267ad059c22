//! Arguments shared by several commands (data, LLM, assistant, evaluation) and the helpers
//! that turn them into library configuration.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mrrec_agent::{Workspace, WorkspaceOptions};
use mrrec_data::{QueryField, Split};

use crate::cmd::eval::ws_data_name;

/// The local model commands use unless told otherwise.
pub(crate) const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

#[derive(Args, Clone)]
pub(crate) struct LlmArgs {
    /// Local model: a registry id (`mrrec models list`) or the path of a qwen2 / llama GGUF
    /// file; with --llm-url, the server's model name. In `memory` commands, the model that
    /// writes patterns, profiles and aspects; elsewhere, the assistant's.
    #[arg(long, env = "MRREC_LLM_MODEL", default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// An OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI) instead of a local model.
    #[arg(long, env = "MRREC_LLM_BASE_URL")]
    pub(crate) llm_url: Option<String>,
    /// Requests per LLM batch (memory builds; in `eval`, queries answered together); also the
    /// unit a killed build or eval loses at most. Answers do not depend on it (every sequence
    /// computes the same bits whatever it is batched with); 16 decodes ~15% faster than 8.
    #[arg(long, default_value_t = 16)]
    pub(crate) batch: usize,
}

#[derive(Args, Clone)]
pub(crate) struct DataArgs {
    /// Data directory (Amazon Reviews 2023 meta/reviews + queries, or Amazon-C4 files).
    #[arg(
        long,
        env = "MRREC_DATA",
        default_value = "../shared/data/amazon23-mini"
    )]
    pub(crate) data: PathBuf,
    /// Query file (default: queries.csv / test.csv in the data directory).
    #[arg(long)]
    pub(crate) queries: Option<PathBuf>,
    /// Use a slice: every query target and history item plus this many other items.
    #[arg(long)]
    pub(crate) max_items: Option<usize>,
    /// Treat any bad record as an error.
    #[arg(long)]
    pub(crate) strict: bool,
    /// Dense index.
    #[arg(long, value_enum, default_value_t = DenseArg::Auto)]
    pub(crate) dense_index: DenseArg,
}

#[derive(Args, Clone)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Method: a retrieval baseline, an LLM baseline, MR.Rec or one of its ablations.
    #[arg(long, value_parser = method_names())]
    pub(crate) method: String,
    /// Which query text methods read.
    #[arg(long, value_enum, default_value_t = FieldArg::SimpleQuery)]
    pub(crate) query_field: FieldArg,
    /// Splits to evaluate (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "val")]
    pub(crate) split: Vec<SplitArg>,
    /// Evaluate a seeded subset of this many queries.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Only the `train` queries of the users of fold I of K (by a fixed hash of the user id):
    /// the check of a model trained on data that held that fold out (`derive-queries
    /// --hold-out I/K`, `distil-judge --hold-out I/K`). `mrrec compare` joins the folds' runs.
    #[arg(long, value_name = "I/K")]
    pub(crate) fold: Option<mrrec_data::Fold>,
    /// Seed of the subset and the bootstrap.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Run folder (resumed when it already holds this run).
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[command(flatten)]
    pub(crate) stages: StageArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    #[command(flatten)]
    pub(crate) tenant: TenantArg,
}

/// What runs with a method (`eval`, `recommend`): how `hybrid-history` weighs the user's past
/// items, the re-ranking stage behind it, the past-items filter after both.
#[derive(Args, Clone)]
pub(crate) struct StageArgs {
    #[command(flatten)]
    pub(crate) history: HistoryArgs,
    #[command(flatten)]
    pub(crate) rerank: RerankArgs,
    /// Drop from the method's ranking the items the user reviewed before the request (after any
    /// re-ranking): what a shop would not offer again.
    #[arg(long)]
    pub(crate) exclude_seen: bool,
}

/// [`StageArgs`] checked for a method.
#[derive(Clone, Copy, Default)]
pub(crate) struct Stages {
    pub(crate) history: mrrec_agent::shop::HistoryParams,
    pub(crate) rerank: Option<mrrec_agent::rerank::RerankParams>,
    pub(crate) exclude_seen: bool,
}

impl StageArgs {
    /// The checked stages for `method` (a wrong flag is an error naming it).
    pub(crate) fn params(&self, method: &str) -> Result<Stages> {
        Ok(Stages {
            history: self.history.params(method)?,
            rerank: self.rerank.params()?,
            exclude_seen: self.exclude_seen,
        })
    }
}

/// The re-ranking stage behind any method (`--rerank N`).
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct RerankArgs {
    /// Re-rank the method's first N items with the LLM as a yes/no judge (the model of
    /// `--model` / `--llm-url`: a local model, or a server that returns `top_logprobs`), fused
    /// with the method's order by reciprocal-rank fusion.
    #[arg(long, value_name = "N")]
    pub(crate) rerank: Option<usize>,
    /// With `--rerank`: the judge's order's weight in the fusion (the method's is 1) [default: 1].
    #[arg(long)]
    pub(crate) rerank_weight: Option<f32>,
    /// With `--rerank`: what the judge reads of the user beside the request [default: none].
    #[arg(long, value_enum)]
    pub(crate) rerank_memory: Option<JudgeMemoryArg>,
}

/// What the judge reads of the user (`--rerank-memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum JudgeMemoryArg {
    /// The request alone.
    None,
    /// The user's stored profile.
    Profile,
    /// The user's last 10 interactions before the request.
    Recent,
}

impl From<JudgeMemoryArg> for mrrec_agent::rerank::JudgeMemory {
    fn from(m: JudgeMemoryArg) -> Self {
        match m {
            JudgeMemoryArg::None => mrrec_agent::rerank::JudgeMemory::None,
            JudgeMemoryArg::Profile => mrrec_agent::rerank::JudgeMemory::Profile,
            JudgeMemoryArg::Recent => mrrec_agent::rerank::JudgeMemory::Recent,
        }
    }
}

impl RerankArgs {
    /// The checked stage, `None` without `--rerank` (its other flags are refused then).
    pub(crate) fn params(&self) -> anyhow::Result<Option<mrrec_agent::rerank::RerankParams>> {
        let Some(depth) = self.rerank else {
            if self.rerank_weight.is_some() || self.rerank_memory.is_some() {
                anyhow::bail!(
                    "--rerank-weight and --rerank-memory set the re-ranking stage; add --rerank N"
                );
            }
            return Ok(None);
        };
        let default = mrrec_agent::rerank::RerankParams::default();
        let p = mrrec_agent::rerank::RerankParams {
            depth,
            weight: self.rerank_weight.unwrap_or(default.weight),
            memory: self.rerank_memory.map_or(default.memory, Into::into),
        };
        p.check().map_err(|(field, why)| {
            let flag = if field == "depth" {
                "--rerank".to_string()
            } else {
                format!("--rerank-{field}")
            };
            anyhow::anyhow!("{flag}: {why}")
        })?;
        Ok(Some(p))
    }
}

/// `--history-recent`: a number of items, or `all`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Recent {
    All,
    Last(usize),
}

fn parse_recent(s: &str) -> Result<Recent, String> {
    if s == "all" {
        return Ok(Recent::All);
    }
    s.parse()
        .map(Recent::Last)
        .map_err(|_| format!("expected a number of items or `all`, got {s:?}"))
}

/// How `--method hybrid-history` weighs the user's past items.
#[derive(Args, Clone)]
pub(crate) struct HistoryArgs {
    /// `hybrid-history`: the weight of the ranking by the user's past items (the mean of their
    /// texts' embeddings) in the fusion with the request's hybrid ranking, whose weight is 1
    /// [default: 0.1].
    #[arg(long)]
    pub(crate) history_weight: Option<f32>,
    /// `hybrid-history`: only the user's last this many items before the request [default: 5;
    /// `--history-recent all` for every item].
    #[arg(long, value_parser = parse_recent)]
    pub(crate) history_recent: Option<Recent>,
}

impl HistoryArgs {
    /// The checked parameters for `method` (the flags are refused with any other method).
    pub(crate) fn params(&self, method: &str) -> anyhow::Result<mrrec_agent::shop::HistoryParams> {
        let given = self.history_weight.is_some() || self.history_recent.is_some();
        if given && method != "hybrid-history" {
            anyhow::bail!(
                "--history-weight and --history-recent set how `--method hybrid-history` weighs a user's past items; method {method} does not read them"
            );
        }
        let default = mrrec_agent::shop::HistoryParams::default();
        let p = mrrec_agent::shop::HistoryParams {
            weight: self.history_weight.unwrap_or(default.weight),
            recent: match self.history_recent {
                None => default.recent,
                Some(Recent::All) => None,
                Some(Recent::Last(n)) => Some(n),
            },
        };
        p.check()
            .map_err(|(field, why)| anyhow::anyhow!("--history-{field}: {why}"))?;
        Ok(p)
    }
}

#[derive(Args, Clone)]
pub(crate) struct AssistantArgs {
    #[command(flatten)]
    pub(crate) llm: LlmArgs,
    /// Loop mode.
    #[arg(long, value_enum, default_value_t = LoopMode::Auto)]
    pub(crate) mode: LoopMode,
    /// Memory store (SQLite file or postgres:// URL; default: the catalogue's store under
    /// $MRREC_HOME/memory).
    #[arg(long, env = "MRREC_STORE")]
    pub(crate) store: Option<String>,
    /// Rank with BM25 + dense fusion instead of dense alone.
    #[arg(long)]
    pub(crate) hybrid_rank: bool,
    /// The request beside the profile in the ranking: `none` ranks the profile alone (the
    /// paper's); `fuse` the reciprocal-rank fusion (c = 60) of the profile's ranking and the
    /// request's own; `join` the request and the profile as one text. The request keeps what the
    /// shopper said, the profile adds what the memory and the reasoning inferred. `rollouts`,
    /// `train` and `iterate` reward the ranking these flags set (with `--hybrid-rank`).
    #[arg(long, value_enum, default_value_t = RankRequest::None)]
    pub(crate) rank_request: RankRequest,
    /// With `--rank-request fuse`: the profile ranking's weight in the fusion (the request's is
    /// 1). Below 1 the request leads and the profile reorders what it ranks alike.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) profile_weight: f32,
    /// Tool calls the controller opens in guided mode.
    #[arg(long, default_value_t = 1)]
    pub(crate) guided_calls: usize,
    /// The memory tool drops entries less similar than this to the call (0: the paper's plain
    /// top-3).
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_MIN_MEMORY_SCORE)]
    pub(crate) min_memory_score: f32,
    /// Guided mode: a profile less similar than this to the request (a memory's item copied
    /// instead of what was asked) is repaired once, then the request is ranked (0: no check).
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_MIN_PROFILE_SIMILARITY)]
    pub(crate) min_profile_similarity: f32,
    /// Do not show the global memory's aspects (what matters in the scenario, learnt from other
    /// users) even where they are built.
    #[arg(long)]
    pub(crate) no_global: bool,
    /// Show only global aspects derived from at least this many distinct training queries.
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_GLOBAL_MIN_SUPPORT)]
    pub(crate) global_min_support: usize,
    /// A LoRA adapter from `mrrec train` (local models), applied beside the quantised weights.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
}

/// What the LLM methods borrow: the memory store and the (cached) chat model.
pub(crate) struct LlmContext {
    /// Whose memory the methods read.
    pub(crate) tenant: String,
    pub(crate) store: Box<dyn mrrec_memory::MemoryWrite + Send + Sync>,
    pub(crate) model: mrrec_llm::CachedChatModel<Box<dyn mrrec_llm::ChatModel>>,
    pub(crate) cfg: mrrec_agent::assistant::AssistantConfig,
    /// Queries answered together in `eval` (their model calls decode as one batch).
    pub(crate) batch: usize,
}

impl AssistantArgs {
    pub(crate) fn config(&self) -> Result<mrrec_agent::assistant::AssistantConfig> {
        let mode = match self.mode {
            LoopMode::Auto if self.llm.llm_url.is_some() => mrrec_agent::assistant::Mode::Free,
            LoopMode::Auto | LoopMode::Guided => mrrec_agent::assistant::Mode::Guided,
            LoopMode::Free => mrrec_agent::assistant::Mode::Free,
        };
        Ok(mrrec_agent::assistant::AssistantConfig {
            mode,
            hybrid: self.hybrid_rank,
            rank_request: match self.rank_request {
                RankRequest::None => mrrec_agent::assistant::RequestInRanking::None,
                RankRequest::Fuse => mrrec_agent::assistant::RequestInRanking::Fuse,
                RankRequest::Join => mrrec_agent::assistant::RequestInRanking::Join,
            },
            profile_weight: self.profile_weight,
            guided_calls: self.guided_calls,
            min_memory_score: self.min_memory_score,
            min_profile_similarity: self.min_profile_similarity,
            use_global: !self.no_global,
            global_min_support: self.global_min_support,
            ..Default::default()
        })
        .and_then(|c| {
            c.check_ranking()
                .map_err(|e| anyhow::anyhow!("--profile-weight: {e}"))?;
            Ok(c)
        })
    }

    pub(crate) fn context(&self, ws: &Workspace) -> Result<LlmContext> {
        // Flags first: a wrong one is reported before the store and the model are opened.
        let cfg = self.config()?;
        Ok(LlmContext {
            tenant: TENANT.to_string(),
            store: open_store(ws, self.store.clone())?,
            model: mrrec_agent::backend::cached_chat_model_with_adapter(
                &self.llm.model,
                self.llm.llm_url.as_deref(),
                server_options()?,
                self.adapter.as_deref(),
            )?,
            cfg,
            batch: self.llm.batch.max(1),
        })
    }
}

impl DataArgs {
    pub(crate) fn options(&self) -> Result<WorkspaceOptions> {
        let mut o = WorkspaceOptions::new(&self.data);
        o.queries = self.queries.clone();
        o.max_items = self.max_items;
        o.strict = self.strict;
        o.progress = true;
        o.dense = match self.dense_index {
            DenseArg::Exact => mrrec_agent::DenseKind::Exact,
            DenseArg::Hnsw => mrrec_agent::DenseKind::Hnsw,
            DenseArg::Auto => mrrec_agent::DenseKind::Auto,
        };
        Ok(o)
    }

    pub(crate) fn open(&self) -> Result<Workspace> {
        self.check_dir()?;
        let ws = Workspace::open(&self.options()?)?;
        for r in &ws.dataset.reports {
            eprintln!("{r}");
        }
        Ok(ws)
    }

    /// Refuses, before any index or model is loaded, a query file without `train` rows (a
    /// directory `derive-queries --split val` wrote is for evaluation): `command` reads only
    /// those. A missing or split-less file is left to the normal load to report.
    pub(crate) fn ensure_train_rows(&self, command: &str) -> Result<()> {
        self.check_dir()?;
        let files = mrrec_data::DatasetFiles::discover(&self.data)?;
        let Some(path) = self.queries.clone().or(files.queries) else {
            return Ok(());
        };
        let (q, _) = mrrec_data::QuerySet::load(&path, None, &Default::default())?;
        let Ok(rows) = q.for_purpose(&mrrec_data::Purpose::Training) else {
            return Ok(());
        };
        anyhow::ensure!(
            !rows.is_empty(),
            "{}: no `train` queries: {command} reads `train` rows only (a directory written by `derive-queries --split val` is for evaluation)",
            path.display()
        );
        Ok(())
    }

    pub(crate) fn check_dir(&self) -> Result<()> {
        if !self.data.is_dir() {
            bail!(
                "data directory {} not found.\n\
                 Point --data (or MRREC_DATA) at a folder holding Amazon Reviews 2023 files \
                 (meta.jsonl[.gz], reviews.jsonl[.gz]) and a queries.csv in Amazon-C4 columns, or the \
                 Amazon-C4 files (sampled_item_metadata_1M.jsonl, test.csv).",
                self.data.display()
            );
        }
        Ok(())
    }
}

/// The request beside the profile in the ranking (`--rank-request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RankRequest {
    /// The profile alone (the paper's).
    None,
    /// Reciprocal-rank fusion of the profile's and the request's rankings.
    Fuse,
    /// The request and the profile ranked as one text.
    Join,
}

/// How the assistant's loop is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LoopMode {
    /// Guided for local models, free for servers.
    Auto,
    /// The controller owns the structure; the model fills constrained slots.
    Guided,
    /// The model drives (the paper's protocol).
    Free,
}

/// Which query text methods read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum FieldArg {
    /// MR.Rec's one-sentence request.
    #[value(name = "simple_query")]
    SimpleQuery,
    /// The C4-style request (1–3 sentences).
    Query,
}

impl From<FieldArg> for QueryField {
    fn from(f: FieldArg) -> Self {
        match f {
            FieldArg::SimpleQuery => QueryField::SimpleQuery,
            FieldArg::Query => QueryField::Query,
        }
    }
}

/// A query split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum SplitArg {
    /// Global memory, tuning and training.
    Train,
    /// Choosing prompts, settings and checkpoints.
    Val,
    /// Held-out evaluation (Amazon-C4's rows).
    Test,
    /// Earlier held-out reviews (never evaluated).
    Aspect,
}

/// The library's splits of `--split` values.
pub(crate) fn splits(v: &[SplitArg]) -> Vec<Split> {
    v.iter()
        .map(|s| match s {
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Val,
            SplitArg::Test => Split::Test,
            SplitArg::Aspect => Split::Aspect,
        })
        .collect()
}

/// `--split` values as written (`train,val`).
pub(crate) fn split_names(v: &[SplitArg]) -> String {
    v.iter()
        .filter_map(|s| s.to_possible_value().map(|p| p.get_name().to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The dense index a workspace ranks with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DenseArg {
    /// Exact inner product over every item.
    Exact,
    /// HNSW graph (approximate).
    Hnsw,
    /// HNSW above 200,000 items, exact below.
    Auto,
}

/// A level of a user's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LevelArg {
    /// Raw interactions (no LLM).
    #[value(alias = "record")]
    Records,
    /// Per-category preference summaries (LLM).
    #[value(alias = "pattern")]
    Patterns,
    /// The user profile (LLM).
    #[value(alias = "profiles")]
    Profile,
}

impl From<LevelArg> for mrrec_memory::Level {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Records => mrrec_memory::Level::Record,
            LevelArg::Patterns => mrrec_memory::Level::Pattern,
            LevelArg::Profile => mrrec_memory::Level::Profile,
        }
    }
}

/// A duration flag in seconds: positive and finite.
pub(crate) fn secs(flag: &str, v: f64) -> Result<std::time::Duration> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a positive number of seconds, not {v}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// How servers are reached, from the environment (read once, here): the key from
/// `MRREC_LLM_API_KEY`, else `OPENAI_API_KEY`; `MRREC_LLM_TIMEOUT` (seconds per request) and
/// `MRREC_LLM_RETRIES`.
pub(crate) fn server_options() -> Result<&'static mrrec_agent::backend::ServerOptions> {
    static OPTIONS: std::sync::OnceLock<mrrec_agent::backend::ServerOptions> =
        std::sync::OnceLock::new();
    if let Some(o) = OPTIONS.get() {
        return Ok(o);
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let number = |k: &str| -> Result<Option<f64>> {
        var(k)
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .with_context(|| format!("{k}={v:?} is not a non-negative number"))
            })
            .transpose()
    };
    let o = mrrec_agent::backend::ServerOptions {
        api_key: var("MRREC_LLM_API_KEY").or_else(|| var("OPENAI_API_KEY")),
        timeout: number("MRREC_LLM_TIMEOUT")?
            .filter(|t| *t > 0.0)
            .map(std::time::Duration::from_secs_f64),
        retries: number("MRREC_LLM_RETRIES")?.map(|r| r as u32),
    };
    Ok(OPTIONS.get_or_init(|| o))
}

/// Every method `eval` and `recommend` know (retrieval baselines, LLM baselines, MR.Rec and its
/// ablations), for clap to list and check.
pub(crate) fn method_names() -> clap::builder::PossibleValuesParser {
    let all: Vec<&'static str> = mrrec_agent::method_names()
        .iter()
        .chain(mrrec_agent::methods::llm_method_names())
        .copied()
        .collect();
    clap::builder::PossibleValuesParser::new(all)
}

/// The tenant a command acts for when `--tenant` is not given (the service's first key's tenant).
pub(crate) const TENANT: &str = "default";

/// The tenant whose memory a command reads or writes.
#[derive(Args, Clone, Debug)]
pub(crate) struct TenantArg {
    /// Tenant whose memory is read and written: the CLI acts for the tenants the service's API
    /// keys name (`mrrec keys list`); each tenant's users and memory are separate.
    #[arg(long, default_value = TENANT, value_parser = parse_tenant, env = "MRREC_TENANT")]
    pub(crate) tenant: String,
}

fn parse_tenant(s: &str) -> std::result::Result<String, String> {
    mrrec_server::auth::check_id("tenant", s)?;
    Ok(s.to_string())
}

pub(crate) fn open_store(
    ws: &Workspace,
    store: Option<String>,
) -> Result<Box<dyn mrrec_memory::MemoryWrite + Send + Sync>> {
    let loc = store.unwrap_or_else(|| {
        mrrec_models::home()
            .join("memory")
            .join(format!("{}.sqlite", ws_data_name(ws)))
            .display()
            .to_string()
    });
    Ok(mrrec_memory::open_store(&loc)?)
}

/// For commands that read the store alone: the `--store` named, opened without loading the data
/// or building its indexes (a cold cache would embed the whole catalogue first); without
/// `--store`, the data directory's default store (named by its catalogue fingerprint).
pub(crate) fn store_only(
    data: &DataArgs,
    store: Option<String>,
) -> Result<Box<dyn mrrec_memory::MemoryWrite + Send + Sync>> {
    match store {
        Some(loc) => Ok(mrrec_memory::open_store(&loc)?),
        None => open_store(&data.open()?, None),
    }
}
