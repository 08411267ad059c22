//! The `mrrec` command line: a thin shell over the library crates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mrrec_agent::{DenseMethod, LexicalMethod, Workspace, WorkspaceOptions};
use mrrec_data::{Purpose, QueryField, Split};
use mrrec_eval::{markdown_table, Method, RunMetrics, RunSpec};

#[derive(Parser)]
#[command(
    name = "mrrec",
    version,
    about = "MR.Rec: a recommendation assistant with hierarchical memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List or fetch models (the embedder now; chat LLMs as they land).
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Read a data directory and report what was accepted and skipped.
    Check(DataArgs),
    /// Build (or reuse) the item indexes of a data directory.
    Index(DataArgs),
    /// Rank the catalogue for one request and print the top items.
    Search {
        #[command(flatten)]
        data: DataArgs,
        /// The request.
        text: String,
        /// Method: dense, bm25 or hybrid.
        #[arg(long, default_value = "dense")]
        method: String,
        /// How many items to show.
        #[arg(short, default_value_t = 10)]
        k: usize,
    },
    /// Evaluate a method on the queries of a data directory.
    Eval(EvalArgs),
    /// Ask the assistant for a user: it reasons, fetches memories, writes the ideal item profile
    /// and ranks the catalogue with it; prints the trace.
    Recommend {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        assistant: AssistantArgs,
        /// The user (memory is read for this user only).
        #[arg(long)]
        user: String,
        /// The store section the request comes from (context only; never a filter).
        #[arg(long)]
        category: Option<String>,
        /// Method: mrrec (default), an ablation, or a baseline (llm-rewrite, naive-memory,
        /// static-memory).
        #[arg(long, default_value = "mrrec")]
        method: String,
        /// Items to show.
        #[arg(short, default_value_t = 10)]
        k: usize,
        /// Print the answer and trace as JSON.
        #[arg(long)]
        json: bool,
        /// The request.
        request: String,
    },
    /// One Markdown report across finished runs: the paper's table with intervals, paired
    /// significance of the best method, costs, trace health, per category, and a bar chart.
    Report {
        /// Run folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Write report.md and the charts here (default: print the Markdown).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Bootstrap resamples.
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Compare two finished runs on their shared queries (paired bootstrap).
    Compare {
        /// Run folder A.
        a: PathBuf,
        /// Run folder B.
        b: PathBuf,
        /// Bootstrap resamples.
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Chat with a model from the terminal (streams tokens).
    Chat {
        /// Registered local model id; with --base-url, the server's model name.
        #[arg(
            long,
            env = "MRREC_LLM_MODEL",
            default_value = "qwen2.5-coder-0.5b-instruct"
        )]
        model: String,
        /// An OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) instead of the local model.
        #[arg(long, env = "MRREC_LLM_BASE_URL")]
        base_url: Option<String>,
        /// Offer the memory_retrieval_tool schema (demo of tool calling).
        #[arg(long)]
        tools: bool,
        /// System prompt.
        #[arg(long, default_value = "You are a helpful shopping assistant.")]
        system: String,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// One message to answer; without it, read messages from standard input, one per line.
        message: Option<String>,
    },
    /// Build, inspect and erase users' local memory.
    Memory {
        #[command(subcommand)]
        action: MemoryAction,
    },
    /// Serve a local model as an OpenAI-compatible API (POST /v1/chat/completions).
    ServeLlm {
        /// Registered local model id.
        #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
        model: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8088")]
        addr: std::net::SocketAddr,
    },
    /// Serve the assistant over HTTP: recommend (JSON or streamed), memory, item search, the
    /// GRPO tool and reward endpoints, metrics, OpenAPI and a web page (see ARCHITECTURE.md).
    Serve {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        assistant: AssistantArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Train the assistant's policy with GRPO on `train` queries (LoRA on a local model);
    /// resumable: rerun the same command after an interruption.
    Train {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        assistant: AssistantArgs,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Manage the service's API keys (stored hashed).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Measure embedding, search and BM25 speed; prints JSON (see BENCHMARKS.md).
    Bench {
        #[command(flatten)]
        data: DataArgs,
        /// Items for the exact-search benchmark.
        #[arg(long, default_value_t = 1_000_000)]
        exact_items: usize,
        /// Items for the HNSW benchmark.
        #[arg(long, default_value_t = 200_000)]
        hnsw_items: usize,
        /// Documents for the synthetic BM25 benchmark.
        #[arg(long, default_value_t = 1_000_000)]
        bm25_items: usize,
        /// How many queries to time.
        #[arg(long, default_value_t = 200)]
        bench_queries: usize,
        /// Synthetic users (10 entries each) for the memory-retrieval benchmark.
        #[arg(long, default_value_t = 100_000)]
        memory_users: usize,
        /// Store for the memory benchmark (SQLite file, postgres:// URL, or `pg-throwaway` for a
        /// PostgreSQL cluster started and removed by the benchmark).
        #[arg(long)]
        memory_store: Option<String>,
        /// Which parts: embed,search,bm25,ingest,llm,prefill,constrained,batched,profile,memory,service,llmslots,grpo,rollout.
        #[arg(long, default_value = "embed,search,bm25,ingest")]
        parts: String,
        /// Open-loop rate of the service benchmark, requests/s.
        #[arg(long, default_value_t = 500.0)]
        service_rate: f64,
        /// Seconds per service-benchmark scenario.
        #[arg(long, default_value_t = 10.0)]
        service_seconds: f64,
        /// `prefill`: build llama.cpp (llama-cpp-python from PyPI, once, ~15 min) when it is not
        /// built yet, to measure it in the same run (without: measured only when already built).
        #[arg(long)]
        llama_cpp: bool,
    },
    /// The main job: fetch the embedder, build the indexes, answer an example request and print
    /// the evaluation of the query-only baselines on both query fields.
    Demo {
        #[command(flatten)]
        data: DataArgs,
        /// Splits to evaluate (comma-separated: train, val).
        #[arg(long, default_value = "val")]
        split: String,
        /// Where run folders go.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Run the assistant (guided, the default local model) on this many seeded queries of
        /// the split, after building record memory for their users, beside dense on the same
        /// queries (0 skips it).
        #[arg(long, default_value_t = 40)]
        assistant: usize,
        /// Local model the assistant uses.
        #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
        model: String,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// List registered models and whether they are cached.
    List,
    /// Fetch models (all embedders by default), verifying sha256.
    Fetch {
        /// Model ids; `all` for every registered model.
        #[arg(default_value = "all-minilm-l6-v2")]
        ids: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct LlmArgs {
    /// Local model (registry id) that writes patterns, profiles and aspects; with --llm-url,
    /// the server's model name.
    #[arg(
        long,
        env = "MRREC_LLM_MODEL",
        default_value = "qwen2.5-coder-0.5b-instruct"
    )]
    model: String,
    /// An OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI) instead of a local model.
    #[arg(long, env = "MRREC_LLM_BASE_URL")]
    llm_url: Option<String>,
    /// Requests per LLM batch (memory builds; in `eval`, queries answered together); also the
    /// unit a killed build or eval loses at most.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Key file (default $MRREC_HOME/keys.json; created with one key for tenant `default`,
    /// printed once, when missing).
    #[arg(long, env = "MRREC_KEYS")]
    keys: Option<PathBuf>,
    /// Requests per second per key (0: unlimited).
    #[arg(long, default_value_t = 50.0)]
    rate_per_key: f64,
    /// Burst per key.
    #[arg(long, default_value_t = 100.0)]
    burst: f64,
    /// Answers the LLM works on at once (default 1 for a local model, 8 for a server). With a
    /// local model and more than one slot, the answers' model calls are decoded together (one
    /// batch per token).
    #[arg(long)]
    llm_slots: Option<usize>,
    /// Answers that may wait for the LLM; beyond, 503.
    #[arg(long, default_value_t = 16)]
    llm_queue: usize,
    /// Embedding/ranking jobs at once.
    #[arg(long, default_value_t = 4)]
    cpu_slots: usize,
    /// Embedding/ranking jobs that may wait; beyond, 503.
    #[arg(long, default_value_t = 512)]
    cpu_queue: usize,
    /// Longest wait for a slot, seconds (then 503).
    #[arg(long, default_value_t = 60.0)]
    queue_timeout: f64,
    /// Deadline of one answer, seconds (then 504).
    #[arg(long, default_value_t = 180.0)]
    answer_timeout: f64,
    /// Per-request timeout of an --llm-url server, seconds.
    #[arg(long, default_value_t = 120.0)]
    llm_timeout: f64,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 256 << 10)]
    max_body_bytes: usize,
    /// Seconds a client has to send a request's headers (from connecting, or from the end of
    /// the previous response: also the idle keep-alive timeout); then the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers are in (then 408).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Open connections at once (beyond: 503 and closed).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Open connections per client address (beyond: 503 and closed).
    #[arg(long, default_value_t = 256)]
    max_connections_per_client: usize,
    /// Requests in flight per API key (beyond: 429).
    #[arg(long, default_value_t = 64)]
    max_in_flight_per_key: usize,
    /// Seconds requests in flight may take to finish after SIGTERM / Ctrl-C; then the
    /// connections left are dropped and the server exits.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Failed authentications per second allowed per client address after the burst (0:
    /// unlimited); beyond, 429.
    #[arg(long, default_value_t = 1.0)]
    auth_failures_per_second: f64,
    /// Failed authentications a client address may make in a burst.
    #[arg(long, default_value_t = 20.0)]
    auth_failure_burst: f64,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Run folder: train.json, log.jsonl, checkpoint/, adapter.safetensors, best-adapter.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Trajectories per query (G).
    #[arg(long, default_value_t = 5)]
    group: usize,
    /// Queries per optimiser step.
    #[arg(long, default_value_t = 2)]
    queries_per_step: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Use a seeded subset of this many training queries.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Run a group's trajectories one after another instead of decoding them together.
    #[arg(long)]
    sequential_rollouts: bool,
    /// Rollout temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Clip range ε.
    #[arg(long, default_value_t = 0.2)]
    clip: f64,
    /// KL coefficient to the reference policy (0: none).
    #[arg(long, default_value_t = 0.001)]
    kl: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// Adapt the top this-many layers.
    #[arg(long, default_value_t = 4)]
    lora_layers: usize,
    /// Projections adapted (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "q,v")]
    lora_targets: String,
    /// Validate and keep the best adapter every this many steps.
    #[arg(long, default_value_t = 10)]
    val_every: usize,
    /// Validation queries (seeded subset of `val`).
    #[arg(long, default_value_t = 20)]
    val_queries: usize,
    /// Stop after this many validations without improvement (0: never).
    #[arg(long, default_value_t = 1)]
    patience: usize,
    /// Seed of the query order and the sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Reward weights: R_format, R_rec, R_mem.
    #[arg(long, default_value = "0.1,5,0.1")]
    reward_weights: String,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key for a tenant: its hash goes into the key file, the key is printed once.
    New {
        /// Tenant the key acts for.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// A label for people.
        #[arg(long, default_value = "key")]
        name: String,
        /// Key file (default $MRREC_HOME/keys.json).
        #[arg(long, env = "MRREC_KEYS")]
        file: Option<PathBuf>,
    },
    /// List the keys of the key file (names and tenants; the keys themselves are not stored).
    List {
        /// Key file (default $MRREC_HOME/keys.json).
        #[arg(long, env = "MRREC_KEYS")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MemoryAction {
    /// Build memory for every user with a history: idempotent and resumable (kill it and rerun).
    Build {
        #[command(flatten)]
        data: DataArgs,
        /// Store: a SQLite file (default: under $MRREC_HOME/memory, one per catalogue) or a
        /// postgres:// URL.
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// Only the first N users (sorted by id).
        #[arg(long)]
        users: Option<usize>,
        /// Only users who have a query in these splits (comma-separated: train, val).
        #[arg(long)]
        for_split: Option<String>,
        /// Only these users (comma-separated ids).
        #[arg(long)]
        only: Option<String>,
        /// Levels: records, patterns, profile (LLM), global (LLM, from train/aspect queries).
        #[arg(long, default_value = "records")]
        levels: String,
        #[command(flatten)]
        llm: LlmArgs,
        /// Only the first N train/aspect queries for global memory.
        #[arg(long)]
        global_queries: Option<usize>,
        /// Hard negatives per query in global-memory step A (3–5).
        #[arg(long, default_value_t = 4)]
        negatives: usize,
    },
    /// Add new interactions of one user (JSONL, Amazon Reviews 2023 rows) and rewrite only the
    /// affected patterns and profile.
    Add {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// The user.
        user: String,
        /// JSONL file of reviews (rating, title, text, parent_asin, timestamp).
        file: PathBuf,
        /// Only store the records and mark the summaries stale (no LLM now).
        #[arg(long)]
        no_llm: bool,
        #[command(flatten)]
        llm: LlmArgs,
    },
    /// Print a user's entries.
    Show {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// The user.
        user: String,
    },
    /// The user's entries most similar to a text.
    Retrieve {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// The user.
        user: String,
        /// What to look for.
        text: String,
        /// How many entries.
        #[arg(short, default_value_t = 3)]
        k: usize,
        /// Levels to search (comma-separated).
        #[arg(long, default_value = "records,patterns,profile")]
        levels: String,
    },
    /// Global aspects of a category (all, or the n nearest to a text).
    Global {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// The category (scenario), e.g. Books.
        category: String,
        /// Rank by similarity to this text.
        text: Option<String>,
        #[arg(short, default_value_t = 5)]
        n: usize,
    },
    /// Remove every trace of a user: store, embedding cache, LLM response cache, global aspects.
    Forget {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
        /// The user.
        user: String,
        /// Succeed when the user has no memory (for scripts); by default that is an error.
        #[arg(long)]
        missing_ok: bool,
    },
    /// Entries per level, users, global aspects, store size.
    Stats {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, env = "MRREC_STORE")]
        store: Option<String>,
    },
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Data directory (Amazon Reviews 2023 meta/reviews + queries, or Amazon-C4 files).
    #[arg(
        long,
        env = "MRREC_DATA",
        default_value = "../shared/data/amazon23-mini"
    )]
    data: PathBuf,
    /// Query file (default: queries.csv / test.csv in the data directory).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Use a slice: every query target and history item plus this many other items.
    #[arg(long)]
    max_items: Option<usize>,
    /// Treat any bad record as an error.
    #[arg(long)]
    strict: bool,
    /// Dense index: exact, hnsw, or auto (HNSW above 200,000 items).
    #[arg(long, default_value = "auto")]
    dense_index: String,
}

#[derive(Args, Clone)]
struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Method: bm25, dense or hybrid.
    #[arg(long)]
    method: String,
    /// Which query text methods read.
    #[arg(long, default_value = "simple_query")]
    query_field: String,
    /// Splits to evaluate (comma-separated: train, val).
    #[arg(long, default_value = "val")]
    split: String,
    /// Evaluate a seeded subset of this many queries.
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the subset and the bootstrap.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run folder (resumed when it already holds this run).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    assistant: AssistantArgs,
}

#[derive(Args, Clone)]
struct AssistantArgs {
    #[command(flatten)]
    llm: LlmArgs,
    /// Loop mode: guided (the controller owns the structure), free (the paper's), or auto
    /// (guided for local models, free for servers).
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Memory store (SQLite file or postgres:// URL; default: the catalogue's store under
    /// $MRREC_HOME/memory).
    #[arg(long, env = "MRREC_STORE")]
    store: Option<String>,
    /// Rank with BM25 + dense fusion instead of dense alone.
    #[arg(long)]
    hybrid_rank: bool,
    /// Tool calls the controller opens in guided mode.
    #[arg(long, default_value_t = 1)]
    guided_calls: usize,
    /// The memory tool drops entries less similar than this to the call (0: the paper's plain
    /// top-3).
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_MIN_MEMORY_SCORE)]
    min_memory_score: f32,
    /// Guided mode: a profile less similar than this to the request (a memory's item copied
    /// instead of what was asked) is repaired once, then the request is ranked (0: no check).
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_MIN_PROFILE_SIMILARITY)]
    min_profile_similarity: f32,
    /// Do not show the global memory's aspects (what matters in the scenario, learnt from other
    /// users) even where they are built.
    #[arg(long)]
    no_global: bool,
    /// Show only global aspects derived from at least this many distinct training queries.
    #[arg(long, default_value_t = mrrec_agent::assistant::DEFAULT_GLOBAL_MIN_SUPPORT)]
    global_min_support: usize,
    /// A LoRA adapter from `mrrec train` (local models), applied beside the quantised weights.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

/// What the LLM methods borrow: the memory store and the (cached) chat model.
struct LlmContext {
    store: Box<dyn mrrec_memory::MemoryWrite + Send + Sync>,
    model: mrrec_llm::CachedChatModel<Box<dyn mrrec_llm::ChatModel>>,
    cfg: mrrec_agent::assistant::AssistantConfig,
    /// Queries answered together in `eval` (their model calls decode as one batch).
    batch: usize,
}

impl AssistantArgs {
    fn config(&self) -> Result<mrrec_agent::assistant::AssistantConfig> {
        let mode = match self.mode.as_str() {
            "auto" if self.llm.llm_url.is_some() => mrrec_agent::assistant::Mode::Free,
            "auto" => mrrec_agent::assistant::Mode::Guided,
            m => m.parse().map_err(anyhow::Error::msg)?,
        };
        Ok(mrrec_agent::assistant::AssistantConfig {
            mode,
            hybrid: self.hybrid_rank,
            guided_calls: self.guided_calls,
            min_memory_score: self.min_memory_score,
            min_profile_similarity: self.min_profile_similarity,
            use_global: !self.no_global,
            global_min_support: self.global_min_support,
            ..Default::default()
        })
    }

    fn context(&self, ws: &Workspace) -> Result<LlmContext> {
        Ok(LlmContext {
            store: open_store(ws, self.store.clone())?,
            model: mrrec_agent::backend::cached_chat_model_with_adapter(
                &self.llm.model,
                self.llm.llm_url.as_deref(),
                self.adapter.as_deref(),
            )?,
            cfg: self.config()?,
            batch: self.llm.batch.max(1),
        })
    }
}

impl DataArgs {
    fn options(&self) -> Result<WorkspaceOptions> {
        let mut o = WorkspaceOptions::new(&self.data);
        o.queries = self.queries.clone();
        o.max_items = self.max_items;
        o.strict = self.strict;
        o.progress = true;
        o.dense = self.dense_index.parse().map_err(anyhow::Error::msg)?;
        Ok(o)
    }

    fn open(&self) -> Result<Workspace> {
        self.check_dir()?;
        let ws = Workspace::open(&self.options()?)?;
        for r in &ws.dataset.reports {
            eprintln!("{r}");
        }
        Ok(ws)
    }

    fn check_dir(&self) -> Result<()> {
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

fn parse_splits(s: &str) -> Result<Vec<Split>> {
    s.split(',')
        .map(|x| x.parse::<Split>().map_err(anyhow::Error::msg))
        .collect()
}

fn method_for<'a>(
    ws: &'a Workspace,
    name: &str,
    ctx: Option<&'a LlmContext>,
) -> Result<Box<dyn Method + 'a>> {
    if let Some(ctx) = ctx {
        if let Some((kind, cfg)) = mrrec_agent::methods::llm_method(name, &ctx.cfg) {
            return Ok(Box::new(mrrec_agent::methods::LlmMethod {
                name: name.to_string(),
                kind,
                assistant: mrrec_agent::assistant::Assistant {
                    shop: ws.shop(),
                    store: &*ctx.store,
                    tenant: TENANT,
                    llm: &ctx.model,
                    cfg,
                    observer: None,
                },
            }));
        }
    }
    Ok(match name {
        "bm25" => Box::new(LexicalMethod {
            index: ws.lexical.clone(),
        }),
        "dense" => Box::new(DenseMethod {
            name: "dense".into(),
            embedder: ws.embedder.clone(),
            index: ws.dense.clone(),
        }),
        "hybrid" => Box::new(DenseMethod {
            name: "hybrid".into(),
            embedder: ws.embedder.clone(),
            index: Arc::new(ws.hybrid()),
        }),
        other => bail!(
            "unknown method {other:?}; available: {}, {}",
            mrrec_agent::method_names().join(", "),
            mrrec_agent::methods::llm_method_names().join(", ")
        ),
    })
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn eval_one(
    ws: &Workspace,
    ctx: Option<&LlmContext>,
    method: &str,
    field: QueryField,
    splits: &[Split],
    limit: Option<usize>,
    seed: u64,
    out: &Path,
) -> Result<RunMetrics> {
    let m = method_for(ws, method, ctx)?;
    // LLM runs are named with their mode (a free and a guided run are different runs), and go
    // in batches of `--batch` (default 8) queries answered together (their model calls decode
    // as one batch); a killed run loses at most one batch's outcomes, and their model answers
    // are replayed from the response cache.
    let (run_name, batch, prompts) = match ctx {
        Some(c) if mrrec_agent::methods::llm_method(method, &c.cfg).is_some() => (
            format!(
                "{method}@{}",
                serde_json::to_value(c.cfg.mode)?.as_str().unwrap_or("?")
            ),
            c.batch,
            format!(
                "{} / {} / {}",
                mrrec_agent::prompts::ASSISTANT_PROMPT_VERSION,
                mrrec_agent::prompts::CONTROLLER_VERSION,
                mrrec_llm::ChatModel::id(&c.model)
            ),
        ),
        _ => (method.to_string(), 32, "none".to_string()),
    };
    let queries = ws
        .dataset
        .queries
        .for_purpose(&Purpose::Evaluate(splits.to_vec()))
        .map_err(anyhow::Error::msg)?;
    if queries.is_empty() {
        bail!("no queries of split(s) {splits:?} in the query file");
    }
    let mut provenance = std::collections::BTreeMap::new();
    provenance.insert("git_commit".into(), git_commit());
    provenance.insert("data_sha256".into(), ws.data_sha256.clone());
    provenance.insert("data_dir".into(), ws_data_name(ws));
    provenance.insert("catalogue_items".into(), ws.catalogue().len().to_string());
    provenance.insert(
        "embedder".into(),
        format!(
            "{} sha256 {}",
            mrrec_embed::DEFAULT_EMBEDDER,
            embedder_sha()
        ),
    );
    provenance.insert("prompt_version".into(), prompts);
    // Greedy answers of models with k-quant matrices (candle multiplies those, and its batched
    // product differs in the last bits from its one-row product) can change with the batch, so
    // the batch a run was made with is recorded.
    provenance.insert("query_batch".into(), batch.to_string());
    let spec = RunSpec {
        method: run_name.clone(),
        query_field: field,
        splits: splits.to_vec(),
        limit,
        seed,
        ks: vec![10, 100, 1000],
        bootstrap_rounds: 1000,
        settings: m.settings(),
        provenance,
    };
    let mut pb = mrrec_agent::progress::Progress::new(&format!("eval {run_name} on {field}"), true);
    let metrics = mrrec_eval::run_eval(
        m.as_ref(),
        queries,
        ws.catalogue(),
        &spec,
        out,
        batch,
        &mut |d, t| pb.set(d, t),
    )?;
    pb.finish();
    Ok(metrics)
}

/// Runs an evaluation into a folder the caller owns (the demo's): a folder holding an earlier run
/// with other settings (an older version's, say) is started again instead of refused.
fn restarting(out: &Path, run: impl Fn() -> Result<RunMetrics>) -> Result<RunMetrics> {
    match run() {
        Err(e)
            if matches!(
                e.downcast_ref::<mrrec_eval::EvalError>(),
                Some(mrrec_eval::EvalError::BadRun { .. })
            ) && out.join("run.json").exists() =>
        {
            eprintln!(
                "{}: an earlier run with other settings ({e}); starting it again",
                out.display()
            );
            std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
            run()
        }
        r => r,
    }
}

fn ws_data_name(ws: &Workspace) -> String {
    ws.index_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn embedder_sha() -> String {
    mrrec_models::find(mrrec_embed::DEFAULT_EMBEDDER)
        .ok()
        .and_then(|m| m.files.first().map(|f| f.sha256[..16].to_string()))
        .unwrap_or_default()
}

/// Prints ranked items (with their score when the method gives one).
fn print_ranked(ws: &Workspace, ranked: &[(u32, Option<f32>)]) {
    for (i, &(pos, score)) in ranked.iter().enumerate() {
        if let Some(item) = ws.catalogue().get(pos) {
            let title = if item.title.is_empty() {
                &item.text
            } else {
                &item.title
            };
            let short: String = title.chars().take(90).collect();
            let score = score.map(|s| format!("{s:.3}  ")).unwrap_or_default();
            println!("{:>3}. {score}{}  {}", i + 1, item.id, short);
        }
    }
}

const TENANT: &str = "default";

fn train_cmd(data: DataArgs, assistant: AssistantArgs, args: TrainArgs) -> Result<()> {
    use mrrec_llm::model::Proj;
    if assistant.llm.llm_url.is_some() {
        bail!("`mrrec train` trains a local model's adapter; for a server-side model use the /tools/memory_retrieve and /reward endpoints with your trainer (see ARCHITECTURE.md)");
    }
    let targets = args
        .lora_targets
        .split(',')
        .map(|t| match t.trim() {
            "q" => Ok(Proj::Q),
            "k" => Ok(Proj::K),
            "v" => Ok(Proj::V),
            "o" => Ok(Proj::O),
            "gate" => Ok(Proj::Gate),
            "up" => Ok(Proj::Up),
            "down" => Ok(Proj::Down),
            o => Err(anyhow::anyhow!(
                "unknown LoRA target {o:?} (q,k,v,o,gate,up,down)"
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let w: Vec<f64> = args
        .reward_weights
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .ok()
        .filter(|w: &Vec<f64>| w.len() == 3 && w.iter().all(|x| x.is_finite()))
        .with_context(|| {
            format!(
                "--reward-weights {:?}: three numbers, R_format,R_rec,R_mem",
                args.reward_weights
            )
        })?;
    let weights = mrrec_agent::rewards::RewardWeights {
        format: w[0],
        rec: w[1],
        mem: w[2],
    };
    let ws = data.open()?;
    let cfg = assistant.config()?;
    let store = open_store(&ws, assistant.store.clone())?;
    let local = mrrec_agent::backend::local_with_adapter(&assistant.llm.model, None)?;
    let lora = mrrec_train::LoraConfig {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        targets,
        layers: args.lora_layers,
        seed: args.seed,
    };
    let policy = mrrec_train::Policy::from_gguf(&local.info().path, lora)?;
    let pick = |split: mrrec_data::Split,
                n: Option<usize>|
     -> Result<Vec<&mrrec_data::LabeledQuery>> {
        let all = ws
            .dataset
            .queries
            .for_purpose(&mrrec_data::Purpose::Evaluate(vec![split]))
            .map_err(anyhow::Error::msg)?;
        // A seeded subset, in file order.
        let mut idx: Vec<usize> = (0..all.len()).collect();
        if let Some(n) = n.filter(|&n| n < all.len()) {
            use rand::seq::SliceRandom;
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(args.seed);
            idx.shuffle(&mut rng);
            idx.truncate(n);
            idx.sort();
        }
        Ok(idx.into_iter().map(|i| all[i]).collect())
    };
    let train_q = pick(mrrec_data::Split::Train, args.train_limit)?;
    let val_q = pick(mrrec_data::Split::Val, Some(args.val_queries))?;
    // Record memory (no LLM) for every user the run touches; summaries come from `memory build`.
    let mut users: Vec<&str> = train_q
        .iter()
        .chain(&val_q)
        .map(|q| q.query().user_id.as_str())
        .collect();
    users.sort();
    users.dedup();
    let b = mrrec_agent::memory::MemoryBuilder {
        ws: &ws,
        store: &*store,
        tenant: TENANT,
        llm: None,
        batch: 8,
        progress: true,
    };
    let mut report = mrrec_agent::memory::BuildReport::default();
    b.build_records(&users, &mut report)?;
    eprintln!(
        "{} training queries, {} validation queries, {} users (+{} records)",
        train_q.len(),
        val_q.len(),
        users.len(),
        report.records_added
    );
    let t = mrrec_train::trainer::Trainer {
        ws: &ws,
        store: &*store,
        tenant: TENANT,
        local: &local,
        policy: &policy,
        cfg,
        train: mrrec_train::trainer::TrainConfig {
            group: args.group,
            queries_per_step: args.queries_per_step,
            steps: args.steps,
            temperature: args.temperature,
            grpo: mrrec_train::GrpoParams {
                clip: args.clip,
                kl: args.kl,
            },
            adamw: mrrec_train::AdamWParams {
                lr: args.lr,
                ..Default::default()
            },
            val_every: args.val_every,
            val_queries: args.val_queries,
            patience: args.patience,
            seed: args.seed,
            weights,
            batched_rollouts: !args.sequential_rollouts,
            ..Default::default()
        },
        out: args.out.clone(),
        progress: true,
    };
    let st = t.run(&train_q, &val_q)?;
    println!(
        "{} steps; validation N@100 {} → best {}{}; adapter in {}",
        st.step,
        st.baseline.map_or("-".into(), |v| format!("{v:.4}")),
        st.best
            .map_or("-".into(), |(v, s)| format!("{v:.4} (step {s})")),
        if st.stopped { " (stopped early)" } else { "" },
        args.out.display()
    );
    Ok(())
}

fn default_keys() -> PathBuf {
    mrrec_models::home().join("keys.json")
}

fn keys(action: KeysAction) -> Result<()> {
    match action {
        KeysAction::New { tenant, name, file } => {
            let path = file.unwrap_or_else(default_keys);
            let key = mrrec_server::auth::add_key(&path, &tenant, &name)?;
            eprintln!(
                "added key {name:?} for tenant {tenant:?} to {} (only its hash is stored; this is the only time it is shown):",
                path.display()
            );
            println!("{key}");
        }
        KeysAction::List { file } => {
            let path = file.unwrap_or_else(default_keys);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a key file", path.display()))?;
            mrrec_server::auth::KeyRing::load(&path)?;
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{}\ttenant {}\tsha256 {}…",
                    k["name"].as_str().unwrap_or(""),
                    k["tenant"].as_str().unwrap_or(""),
                    &k["sha256"].as_str().unwrap_or("")
                        [..12.min(k["sha256"].as_str().unwrap_or("").len())]
                );
            }
        }
    }
    Ok(())
}

fn serve(data: DataArgs, assistant: AssistantArgs, args: ServeArgs) -> Result<()> {
    let keys_path = args.keys.clone().unwrap_or_else(default_keys);
    if !keys_path.exists() {
        let key = mrrec_server::auth::add_key(&keys_path, TENANT, "first")?;
        eprintln!(
            "created {} with a key for tenant {TENANT:?} (shown only now; `mrrec keys new` makes more):\n\n    {key}\n",
            keys_path.display()
        );
    }
    let keys = mrrec_server::auth::KeyRing::load(&keys_path)?;
    if keys.is_empty() {
        bail!(
            "{} holds no keys: add one with `mrrec keys new`",
            keys_path.display()
        );
    }
    let ws = Arc::new(data.open()?);
    let echo = mrrec_llm::EchoModel::from_id(&assistant.llm.model);
    let local = assistant.llm.llm_url.is_none() && echo.is_none();
    // The instant model is never cached (it measures the service, and would fill the cache).
    // Whatever the model, forget cleans the shared response cache under $MRREC_HOME: the CLI
    // and other servers may have written the user's text there.
    let llm_cache = Some(mrrec_agent::backend::llm_cache_path());
    let llm: Arc<dyn mrrec_llm::ChatModel> = match echo {
        Some(m) if assistant.llm.llm_url.is_none() => Arc::new(m),
        _ => Arc::new(mrrec_llm::CachedChatModel::open(
            match &assistant.adapter {
                Some(a) if assistant.llm.llm_url.is_none() => Box::new(
                    mrrec_agent::backend::local_with_adapter(&assistant.llm.model, Some(a))?,
                ),
                Some(_) => bail!("--adapter applies to a local model, not --llm-url"),
                None => mrrec_agent::backend::chat_model_with(
                    &assistant.llm.model,
                    assistant.llm.llm_url.as_deref(),
                    Some(std::time::Duration::from_secs_f64(args.llm_timeout)),
                    None,
                )?,
            },
            &mrrec_agent::backend::llm_cache_path(),
            mrrec_llm::CachePolicy::All,
        )?),
    };
    let store: Arc<dyn mrrec_memory::MemoryWrite + Send + Sync> =
        Arc::from(open_store(&ws, assistant.store.clone())?);
    let cfg = mrrec_server::ServiceConfig {
        max_body_bytes: args.max_body_bytes,
        rate_per_key: args.rate_per_key,
        burst: args.burst,
        llm_slots: args.llm_slots.unwrap_or(if local { 1 } else { 8 }),
        llm_queue: args.llm_queue,
        cpu_slots: args.cpu_slots,
        cpu_queue: args.cpu_queue,
        queue_timeout: std::time::Duration::from_secs_f64(args.queue_timeout),
        answer_timeout: std::time::Duration::from_secs_f64(args.answer_timeout),
        batch_llm: local,
        auth_failures_per_second: args.auth_failures_per_second,
        auth_failure_burst: args.auth_failure_burst,
        conn: mrrec_server::ConnLimits {
            header_timeout: secs("--header-timeout", args.header_timeout)?,
            body_timeout: secs("--body-timeout", args.body_timeout)?,
            max_connections: args.max_connections.max(1),
            max_connections_per_client: args.max_connections_per_client.max(1),
            max_in_flight_per_key: args.max_in_flight_per_key.max(1),
            shutdown_grace: secs("--shutdown-grace", args.shutdown_grace)?,
        },
        assistant: assistant.config()?,
        ..Default::default()
    };
    let svc = mrrec_server::Service::new(ws, store, llm, llm_cache, keys, cfg);
    // Clients that own a runtime (PostgreSQL, the OpenAI client) must not be dropped inside one:
    // the last reference to the service is released here, after the runtime has stopped.
    let keep = svc.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        eprintln!(
            "mrrec serving {} items with {} on http://{} (web page at /, API at /openapi.json; {} keys from {})",
            svc.ws.catalogue().len(),
            svc.llm.id(),
            listener.local_addr()?,
            svc.keys.len(),
            keys_path.display()
        );
        mrrec_server::serve(listener, svc, mrrec_server::shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // Work a dropped connection left on the blocking pool (an answer being cancelled) gets a
    // moment to end; the process does not wait for it beyond that.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(keep);
    eprintln!("stopped");
    Ok(())
}

/// A duration flag in seconds: positive and finite.
fn secs(flag: &str, v: f64) -> Result<std::time::Duration> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a positive number of seconds, not {v}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

fn open_store(
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
fn store_only(
    data: &DataArgs,
    store: Option<String>,
) -> Result<Box<dyn mrrec_memory::MemoryWrite + Send + Sync>> {
    match store {
        Some(loc) => Ok(mrrec_memory::open_store(&loc)?),
        None => open_store(&data.open()?, None),
    }
}

fn parse_levels(s: &str) -> Result<Vec<mrrec_memory::Level>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            mrrec_memory::Level::parse(x)
                .with_context(|| format!("unknown level {x:?} (records, patterns, profile)"))
        })
        .collect()
}

fn memory(action: MemoryAction) -> Result<()> {
    use mrrec_agent::memory::{BuildReport, MemoryBuilder};
    use mrrec_embed::TextEmbedder;
    use mrrec_memory::Owner;
    match action {
        MemoryAction::Build {
            data,
            store,
            users,
            for_split,
            only,
            levels,
            llm,
            global_queries,
            negatives,
        } => {
            let wanted: Vec<&str> = levels.split(',').map(str::trim).collect();
            for l in &wanted {
                if ![
                    "records", "record", "patterns", "pattern", "profile", "profiles", "global",
                ]
                .contains(l)
                {
                    bail!("unknown level {l:?} (records, patterns, profile, global)");
                }
            }
            let has = |a: &str| wanted.iter().any(|w| w.starts_with(a));
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let needs_llm = has("pattern") || has("profile") || has("global");
            let model = if needs_llm {
                Some(mrrec_agent::backend::cached_chat_model(
                    &llm.model,
                    llm.llm_url.as_deref(),
                )?)
            } else {
                None
            };
            let b = MemoryBuilder {
                ws: &ws,
                store: &*st,
                tenant: TENANT,
                llm: model.as_ref().map(|m| m as &dyn mrrec_llm::ChatModel),
                batch: llm.batch,
                progress: true,
            };
            let mut ids = ws.dataset.histories.user_ids();
            if let Some(sp) = &for_split {
                let splits = parse_splits(sp)?;
                let askers: std::collections::HashSet<&str> = ws
                    .dataset
                    .queries
                    .all()
                    .iter()
                    .filter(|q| q.query().split.is_some_and(|s| splits.contains(&s)))
                    .map(|q| q.query().user_id.as_str())
                    .collect();
                ids.retain(|u| askers.contains(u));
            }
            if let Some(only) = &only {
                let keep: std::collections::HashSet<&str> =
                    only.split(',').map(str::trim).collect();
                ids.retain(|u| keep.contains(u));
            }
            let ids = &ids[..users.unwrap_or(ids.len()).min(ids.len())];
            let t0 = std::time::Instant::now();
            let mut report = BuildReport::default();
            if has("record") || has("pattern") || has("profile") {
                // Summaries read the stored records: make sure they are there.
                b.build_records(ids, &mut report)?;
            }
            if has("pattern") {
                b.build_patterns(ids, &mut report)?;
            }
            if has("profile") {
                b.build_profiles(ids, &mut report)?;
            }
            if has("global") {
                let qs = ws
                    .dataset
                    .queries
                    .for_purpose(&mrrec_data::Purpose::GlobalMemory)
                    .map_err(anyhow::Error::msg)?;
                let qs = &qs[..global_queries.unwrap_or(qs.len()).min(qs.len())];
                b.build_global_aspects(qs, negatives.clamp(1, 8), &mut report)?;
                b.merge_global(Default::default(), &mut report)?;
            }
            report.seconds = t0.elapsed().as_secs_f64();
            st.add_cost(TENANT, &report.cost())?;
            if report.faithful.1 > 0 {
                println!(
                    "faithfulness: {} of {} named attributes and numbers in the summaries appear in the user's records ({:.0}%); {} unfaithful segments dropped",
                    report.faithful.0,
                    report.faithful.1,
                    100.0 * report.faithfulness(),
                    report.unfaithful_segments_dropped
                );
            }
            println!(
                "{}; prompts {} / {}",
                report.summary(if needs_llm { &llm.model } else { "none" }),
                mrrec_agent::prompts::MEMORY_PROMPT_VERSION,
                mrrec_agent::prompts::GLOBAL_PROMPT_VERSION
            );
        }
        MemoryAction::Add {
            data,
            store,
            user,
            file,
            no_llm,
            llm,
        } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let reviews = mrrec_agent::memory::read_reviews(&file, &user)?;
            let model = if no_llm {
                None
            } else {
                Some(mrrec_agent::backend::cached_chat_model(
                    &llm.model,
                    llm.llm_url.as_deref(),
                )?)
            };
            let b = MemoryBuilder {
                ws: &ws,
                store: &*st,
                tenant: TENANT,
                llm: model.as_ref().map(|m| m as &dyn mrrec_llm::ChatModel),
                batch: llm.batch,
                progress: true,
            };
            let n = b.add_reviews(&user, &reviews)?;
            let mut report = BuildReport::default();
            if model.is_some() {
                b.build_patterns(&[&user], &mut report)?;
                b.build_profiles(&[&user], &mut report)?;
                st.add_cost(TENANT, &report.cost())?;
            }
            println!(
                "{user}: {} new records, {} updated (same item and moment, new text), {} already stored; {} patterns and {} profiles rewritten; LLM {} tokens in, {} out, {:.1}s",
                n.added,
                n.updated,
                reviews.len() - n.changed(),
                report.patterns_written,
                report.profiles_written,
                report.usage.prompt_tokens,
                report.usage.completion_tokens,
                report.usage.seconds
            );
        }
        MemoryAction::Show { data, store, user } => {
            let st = store_only(&data, store)?;
            let es = st.entries(Owner {
                tenant: TENANT,
                user: &user,
            })?;
            if es.is_empty() {
                bail!(
                    "no memory for user {user:?} (run `mrrec memory build` first, or check the id)"
                );
            }
            for e in es {
                println!(
                    "[{}] {:<8} {:<22} {}",
                    e.id,
                    e.level.as_str(),
                    e.category.as_deref().unwrap_or("-"),
                    e.text
                );
            }
            let stale = st.stale(TENANT, "")?;
            let mine: Vec<&String> = stale
                .iter()
                .filter(|k| {
                    mrrec_memory::parse_pattern_key(k).is_some_and(|(u, _)| u == user)
                        || mrrec_memory::parse_profile_key(k).is_some_and(|u| u == user)
                })
                .collect();
            if !mine.is_empty() {
                println!("stale (rewritten by the next build): {mine:?}");
            }
        }
        MemoryAction::Retrieve {
            data,
            store,
            user,
            text,
            k,
            levels,
        } => {
            let levels = parse_levels(&levels)?;
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let q = ws.embedder.embed(&[text.as_str()])?.remove(0);
            let t = std::time::Instant::now();
            let hits = st.retrieve(
                Owner {
                    tenant: TENANT,
                    user: &user,
                },
                &q,
                k,
                &levels,
            )?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if hits.is_empty() {
                bail!("no memory for user {user:?}");
            }
            for h in hits {
                println!("{:.3} [{}] {}", h.score, h.entry.id, h.entry.text);
            }
            eprintln!("retrieved in {ms:.2} ms");
        }
        MemoryAction::Global {
            data,
            store,
            category,
            text,
            n,
        } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let all = st.global_aspects(TENANT, Some(&category))?;
            if all.is_empty() {
                bail!("no global aspects for category {category:?} (run `mrrec memory build --levels global`)");
            }
            let shown: Vec<(mrrec_memory::GlobalAspect, Option<f32>)> = match text {
                Some(t) => {
                    let q = ws.embedder.embed(&[t.as_str()])?.remove(0);
                    st.global(TENANT, &category, &q, n, 1)?
                        .into_iter()
                        .map(|(a, s)| (a, Some(s)))
                        .collect()
                }
                None => all.into_iter().map(|a| (a, None)).collect(),
            };
            for (a, s) in shown {
                println!(
                    "{}[{}] {} ({} queries)",
                    s.map(|s| format!("{s:.3} ")).unwrap_or_default(),
                    a.id,
                    a.text(),
                    a.queries.len()
                );
            }
        }
        MemoryAction::Forget {
            data,
            store,
            user,
            missing_ok,
        } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let b = MemoryBuilder {
                ws: &ws,
                store: &*st,
                tenant: TENANT,
                llm: None,
                batch: 8,
                progress: false,
            };
            if !missing_ok
                && !st.has_entries(mrrec_memory::Owner {
                    tenant: TENANT,
                    user: &user,
                })?
            {
                bail!(
                    "user {user:?} has no memory in tenant {TENANT:?} of this store: nothing to forget (a mistyped id? --missing-ok accepts this)"
                );
            }
            let r = b.forget(&user, Some(&mrrec_agent::backend::llm_cache_path()))?;
            println!(
                "forgot {user}: {} entries, {} step-A results, {} global aspects (their categories will be merged again), {} cached embeddings, {} cached LLM exchanges",
                r.store.entries,
                r.store.query_aspects,
                r.store.global_aspects,
                r.embeddings,
                r.llm_responses
            );
        }
        MemoryAction::Stats { data, store } => {
            let st = store_only(&data, store)?;
            println!("{}", serde_json::to_string_pretty(&st.stats(TENANT)?)?);
        }
    }
    Ok(())
}

/// The demo's assistant part: record memory for the users of `n` seeded queries, then `mrrec`
/// (guided) and `dense` on those queries, with the paired comparison.
fn demo_assistant(
    ws: &Workspace,
    splits: &[Split],
    n: usize,
    model: &str,
    out: &Path,
) -> Result<()> {
    let queries = ws
        .dataset
        .queries
        .for_purpose(&Purpose::Evaluate(splits.to_vec()))
        .map_err(anyhow::Error::msg)?;
    // The same seeded subset `eval --limit n --seed 42` picks.
    let spec = RunSpec {
        method: String::new(),
        query_field: QueryField::SimpleQuery,
        splits: splits.to_vec(),
        limit: Some(n),
        seed: 42,
        ks: vec![10, 100, 1000],
        bootstrap_rounds: 1000,
        settings: serde_json::Value::Null,
        provenance: Default::default(),
    };
    let (picked, _) = mrrec_eval::run::select_queries(queries, &spec);
    let mut users: Vec<&str> = picked.iter().map(|q| q.query().user_id.as_str()).collect();
    users.sort();
    users.dedup();
    let ctx = AssistantArgs {
        llm: LlmArgs {
            model: model.to_string(),
            llm_url: None,
            batch: 8,
        },
        mode: "guided".into(),
        store: None,
        hybrid_rank: false,
        guided_calls: 1,
        min_memory_score: mrrec_agent::assistant::DEFAULT_MIN_MEMORY_SCORE,
        min_profile_similarity: mrrec_agent::assistant::DEFAULT_MIN_PROFILE_SIMILARITY,
        no_global: false,
        global_min_support: mrrec_agent::assistant::DEFAULT_GLOBAL_MIN_SUPPORT,
        adapter: None,
    }
    .context(ws)?;
    let b = mrrec_agent::memory::MemoryBuilder {
        ws,
        store: &*ctx.store,
        tenant: TENANT,
        llm: None,
        batch: 8,
        progress: true,
    };
    let mut report = mrrec_agent::memory::BuildReport::default();
    b.build_records(&users, &mut report)?;
    eprintln!(
        "record memory for {} users (+{} records); preference patterns and profiles are used when built (`mrrec memory build --levels patterns,profile`)",
        users.len(),
        report.records_added
    );
    let mut rows = Vec::new();
    for method in ["dense", "mrrec"] {
        let dir = out.join(format!("{method}-assistant-{n}"));
        let c = (method != "dense").then_some(&ctx);
        let m = restarting(&dir, || {
            eval_one(
                ws,
                c,
                method,
                QueryField::SimpleQuery,
                splits,
                Some(n),
                42,
                &dir,
            )
        })
        .with_context(|| format!("evaluating {method}"))?;
        rows.push((dir, m));
    }
    let refs: Vec<(String, &RunMetrics)> = rows
        .iter()
        .map(|(_, m)| (format!("{} (simple_query)", m.spec.method), m))
        .collect();
    println!(
        "\nThe assistant ({model}, guided) on {n} seeded queries, against dense on the same queries:\n"
    );
    print!("{}", markdown_table(&refs, true));
    let (_, table) = mrrec_eval::compare_runs(&rows[1].0, &rows[0].0, 2000, 42)?;
    print!("\n{table}");
    let u = &rows[1].1.usage;
    println!(
        "LLM: {} tokens in, {} out, {:.0}s ({:.1} s/query); memory tokens per query {:.0}",
        u.prompt_tokens,
        u.completion_tokens,
        u.llm_seconds,
        u.llm_seconds / rows[1].1.n.max(1) as f64,
        rows[1].1.memory_tokens_per_query
    );
    Ok(())
}

fn recommend(
    data: DataArgs,
    args: AssistantArgs,
    user: &str,
    category: Option<String>,
    method: &str,
    k: usize,
    json: bool,
    request: &str,
) -> Result<()> {
    let ws = data.open()?;
    let ctx = args.context(&ws)?;
    let Some((kind, cfg)) = mrrec_agent::methods::llm_method(method, &ctx.cfg) else {
        bail!(
            "unknown method {method:?}; available: {}",
            mrrec_agent::methods::llm_method_names().join(", ")
        );
    };
    let known = ctx.store.has_entries(mrrec_memory::Owner {
        tenant: TENANT,
        user,
    })?;
    if !known && !ws.dataset.histories.contains(user) {
        bail!("unknown user {user:?}: no memory in the store and no history in the data (build it with `mrrec memory build`)");
    }
    if !known {
        eprintln!("note: user {user:?} has a history but no memory in the store yet; run `mrrec memory build` for personalised answers");
    }
    let assistant = mrrec_agent::assistant::Assistant {
        shop: ws.shop(),
        store: &*ctx.store,
        tenant: TENANT,
        llm: &ctx.model,
        cfg,
        observer: None,
    };
    let t0 = std::time::Instant::now();
    let ans = match kind {
        mrrec_agent::methods::LlmKind::Assistant => {
            assistant.answer(user, request, category.as_deref(), k)?
        }
        _ => {
            let m = mrrec_agent::methods::LlmMethod {
                name: method.into(),
                kind,
                assistant,
            };
            let q = mrrec_data::Query {
                qid: "cli".into(),
                user_id: user.into(),
                query: request.into(),
                simple_query: None,
                category: category.clone(),
                timestamp: None,
                split: None,
            };
            let a = m
                .answer(&[&q], QueryField::Query, k)
                .map_err(|e| anyhow::anyhow!(e.0))?
                .remove(0);
            let trace: mrrec_agent::assistant::Trace =
                serde_json::from_value(a.trace.unwrap_or_default()).unwrap_or_default();
            mrrec_agent::assistant::Answer {
                ranked_with: trace.profile.clone().unwrap_or_else(|| request.into()),
                items: a.ranking.iter().map(|&i| (i, f32::NAN)).collect(),
                trace,
            }
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    if json {
        let items: Vec<serde_json::Value> = ans
            .items
            .iter()
            .filter_map(|(i, sc)| {
                ws.catalogue().get(*i).map(|it| {
                    serde_json::json!({"id": it.id, "title": it.title, "score": if sc.is_finite() { Some(*sc) } else { None }})
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "user": user, "request": request, "method": method,
                "ranked_with": ans.ranked_with, "items": items, "trace": ans.trace,
                "seconds": wall,
            }))?
        );
        return Ok(());
    }
    let t = &ans.trace;
    println!(
        "mode: {:?}",
        t.mode.unwrap_or(mrrec_agent::assistant::Mode::Guided)
    );
    if !t.global_aspects.is_empty() {
        println!(
            "global aspects of {}:",
            t.category.as_deref().unwrap_or("-")
        );
        for (id, text) in &t.global_aspects {
            println!("  [{id}] {text}");
        }
    }
    for r in &t.reasoning {
        println!("reasoning: {}", r.trim());
    }
    for (i, c) in t.tool_calls.iter().enumerate() {
        println!(
            "tool call {}: query {:?} aspects {:?}{}",
            i + 1,
            c.query,
            c.aspects,
            c.error
                .as_ref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default()
        );
        for (id, level, score, text) in &c.results {
            let short: String = text.chars().take(110).collect();
            println!("    {score:.3} [{id}] {:<7} {short}", level.as_str());
        }
    }
    match &t.profile {
        Some(p) => println!("ideal item profile: {p}"),
        None => println!("no profile parsed: ranked the request itself (fallback)"),
    }
    if !t.cited.is_empty() {
        println!(
            "memories cited: {:?} ({} of them retrieved here)",
            t.cited, t.cited_valid
        );
    }
    println!();
    let ranked: Vec<(u32, Option<f32>)> = ans
        .items
        .iter()
        .map(|&(i, s)| (i, s.is_finite().then_some(s)))
        .collect();
    print_ranked(&ws, &ranked);
    eprintln!(
        "[LLM {}: {} tokens in, {} out, {:.1}s; memory {:.1} ms, ranking {:.1} ms; {:.1}s in all]",
        mrrec_llm::ChatModel::id(&ctx.model),
        t.usage.prompt_tokens,
        t.usage.completion_tokens,
        t.usage.seconds,
        t.memory_ms,
        t.ranking_ms,
        wall
    );
    Ok(())
}

fn json_pair(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(vec![a, b])
}

fn chat(
    model: &str,
    base_url: Option<String>,
    tools: bool,
    system: &str,
    temperature: f64,
    max_tokens: usize,
    message: Option<String>,
) -> Result<()> {
    use mrrec_llm::{ChatModel, ChatRequest, Message, Sampling};
    use std::io::{BufRead, Write};
    let m = mrrec_agent::backend::chat_model(model, base_url.as_deref())?;
    let mut messages = vec![Message::system(system)];
    let mut total = mrrec_llm::Usage::default();
    let inputs: Box<dyn Iterator<Item = String>> = match message {
        Some(m) => Box::new(std::iter::once(m)),
        None => Box::new(std::io::stdin().lock().lines().map_while(|l| l.ok())),
    };
    for line in inputs {
        if line.trim().is_empty() {
            continue;
        }
        messages.push(Message::user(line));
        let req = ChatRequest {
            messages: messages.clone(),
            tools: if tools {
                vec![mrrec_agent::prompts::assistant::memory_tool_spec()]
            } else {
                Vec::new()
            },
            sampling: Sampling {
                temperature,
                max_tokens,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut out = std::io::stdout();
        let r = m.chat_stream(&req, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        for c in &r.tool_calls {
            println!("[tool call] {} {}", c.name, c.arguments);
        }
        total.add(&r.usage);
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1}s, {:.1} tokens/s]",
            r.usage.prompt_tokens,
            r.usage.completion_tokens,
            r.usage.seconds,
            r.usage.completion_tokens as f64 / r.usage.seconds.max(1e-9)
        );
        let mut reply = Message::assistant(r.text.clone());
        reply.tool_calls = r.tool_calls.clone();
        messages.push(reply);
    }
    eprintln!(
        "[total: {} tokens in, {} out, {:.1}s]",
        total.prompt_tokens, total.completion_tokens, total.seconds
    );
    Ok(())
}

/// At most two malloc arenas (unless `MALLOC_ARENA_MAX` says otherwise): with glibc's default of
/// 8 per core, the threads of batched rollouts and validation each kept freed training buffers in
/// their own arena — a SmolLM2 training process peaked at 14.2 GB, 4.9 GB with two arenas.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> Result<()> {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MRREC_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Models {
            action: ModelsAction::List,
        } => {
            for m in mrrec_models::registry() {
                let cached = m.files.iter().all(|f| {
                    mrrec_models::home()
                        .join("models")
                        .join(m.id)
                        .join(f.name)
                        .exists()
                });
                println!(
                    "{:<30} {:<9} {}  {}",
                    m.id,
                    format!("{:?}", m.kind),
                    if cached { "cached " } else { "missing" },
                    m.description
                );
            }
        }
        Command::Models {
            action: ModelsAction::Fetch { ids },
        } => {
            let specs = if ids.iter().any(|i| i == "all") {
                mrrec_models::registry()
            } else {
                ids.iter()
                    .map(|i| mrrec_models::find(i))
                    .collect::<Result<Vec<_>, _>>()?
            };
            for spec in specs {
                let paths = mrrec_models::fetch_model(&spec, &Default::default(), &mut |m| {
                    eprintln!("{m}")
                })?;
                println!("{}: {}", spec.id, paths.dir.display());
            }
        }
        Command::Check(data) => {
            let ds = mrrec_data::Dataset::load(
                &data.data,
                data.queries.as_deref(),
                &mrrec_data::LoadOptions {
                    strict: data.strict,
                    ..Default::default()
                },
            )?;
            for r in &ds.reports {
                println!("{r}");
            }
            println!(
                "{} items, {} users with {} reviews, {} queries",
                ds.catalogue.len(),
                ds.histories.users(),
                ds.histories.total(),
                ds.queries.len()
            );
        }
        Command::Index(data) => {
            let ws = data.open()?;
            println!(
                "{} items indexed in {}",
                ws.catalogue().len(),
                ws.index_dir.display()
            );
        }
        Command::Search {
            data,
            text,
            method,
            k,
        } => {
            let ws = data.open()?;
            let m = method_for(&ws, &method, None)?;
            let q = mrrec_data::Query {
                qid: "cli".into(),
                user_id: String::new(),
                query: text.clone(),
                simple_query: None,
                category: None,
                timestamp: None,
                split: None,
            };
            let ans = m
                .answer(&[&q], QueryField::Query, k)
                .map_err(|e| anyhow::anyhow!(e.0))?;
            let ranked: Vec<(u32, Option<f32>)> =
                ans[0].ranking.iter().map(|&item| (item, None)).collect();
            print_ranked(&ws, &ranked);
        }
        Command::Eval(a) => {
            let ws = a.data.open()?;
            let field: QueryField = a.query_field.parse().map_err(anyhow::Error::msg)?;
            let splits = parse_splits(&a.split)?;
            let ctx = if mrrec_agent::methods::llm_method_names().contains(&a.method.as_str()) {
                Some(a.assistant.context(&ws)?)
            } else {
                None
            };
            let m = eval_one(
                &ws,
                ctx.as_ref(),
                &a.method,
                field,
                &splits,
                a.limit,
                a.seed,
                &a.out,
            )?;
            print!(
                "{}",
                markdown_table(&[(format!("{} ({})", m.spec.method, field), &m)], true)
            );
            if m.usage.prompt_tokens > 0 {
                println!(
                    "LLM: {} tokens in, {} out, {:.0}s; memory tokens per query {:.0}",
                    m.usage.prompt_tokens,
                    m.usage.completion_tokens,
                    m.usage.llm_seconds,
                    m.memory_tokens_per_query
                );
            }
            println!("\nwrote {}", a.out.display());
        }
        Command::Bench {
            data,
            exact_items,
            hnsw_items,
            bm25_items,
            bench_queries: queries,
            parts,
            memory_users,
            memory_store,
            service_rate,
            service_seconds,
            llama_cpp,
        } => {
            // Whole names: `llmslots` is not `llm`.
            const PARTS: [&str; 15] = [
                "embed",
                "search",
                "bm25",
                "ingest",
                "llm",
                "prefill",
                "constrained",
                "batched",
                "profile",
                "memory",
                "service",
                "hostile",
                "llmslots",
                "grpo",
                "rollout",
            ];
            let parts: std::collections::BTreeSet<&str> = parts
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            if let Some(p) = parts.iter().find(|p| !PARTS.contains(p)) {
                bail!("unknown benchmark part {p:?} (known: {})", PARTS.join(","));
            }
            let mut out = serde_json::Map::new();
            out.insert("threads".into(), rayon::current_num_threads().into());
            if parts.contains("prefill") {
                out.insert(
                    "prefill".into(),
                    mrrec_bench::prefill::prefill(
                        &["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"],
                        llama_cpp,
                    )?,
                );
            }
            if parts.contains("llm") {
                out.insert(
                    "llm".into(),
                    mrrec_bench::llm(&["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])?,
                );
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
            // The model parts alone need no catalogue.
            const MODEL_ONLY: [&str; 5] = ["prefill", "llm", "batched", "profile", "constrained"];
            if parts.iter().all(|p| MODEL_ONLY.contains(p)) {
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let ws = Arc::new(data.open()?);
            if parts.contains("grpo") {
                let mut g = serde_json::Map::new();
                for m in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
                    g.insert(m.into(), mrrec_bench::grpo(m)?);
                }
                out.insert("grpo".into(), serde_json::Value::Object(g));
            }
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
                    mrrec_bench::hostile::hostile(
                        ws.clone(),
                        500,
                        100.0,
                        service_seconds,
                        100_000,
                    )?,
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
                    cluster =
                        mrrec_memory::pgtest::TestCluster::start().map_err(anyhow::Error::msg)?;
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
        }
        Command::Chat {
            model,
            base_url,
            tools,
            system,
            temperature,
            max_tokens,
            message,
        } => {
            chat(
                &model,
                base_url,
                tools,
                &system,
                temperature,
                max_tokens,
                message,
            )?;
        }
        Command::Memory { action } => memory(action)?,
        Command::ServeLlm { model, addr } => {
            let m: Arc<dyn mrrec_llm::ChatModel> =
                Arc::new(mrrec_llm::LocalModel::from_registry(&model)?);
            mrrec_llm::serve::serve(m, addr)?;
        }
        Command::Serve {
            data,
            assistant,
            serve: args,
        } => serve(data, assistant, args)?,
        Command::Keys { action } => keys(action)?,
        Command::Train {
            data,
            assistant,
            train,
        } => train_cmd(data, assistant, train)?,
        Command::Recommend {
            data,
            assistant,
            user,
            category,
            method,
            k,
            json,
            request,
        } => recommend(data, assistant, &user, category, &method, k, json, &request)?,
        Command::Report {
            runs,
            out,
            rounds,
            seed,
        } => {
            let dirs: Vec<&Path> = runs.iter().map(PathBuf::as_path).collect();
            let (md, charts) = mrrec_eval::report_runs(&dirs, rounds, seed)?;
            match out {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    let mut md = md;
                    for (field, svg) in &charts {
                        let name = format!("n100-{field}.svg");
                        std::fs::write(dir.join(&name), svg)?;
                        md.push_str(&format!("![N@100, {field}]({name})\n"));
                    }
                    std::fs::write(dir.join("report.md"), &md)?;
                    print!("{md}");
                    println!("\nwrote {}", dir.join("report.md").display());
                }
                None => print!("{md}"),
            }
        }
        Command::Compare { a, b, rounds, seed } => {
            let (_, table) = mrrec_eval::compare_runs(&a, &b, rounds, seed)?;
            print!("{table}");
        }
        Command::Demo {
            data,
            split,
            out,
            assistant,
            model,
        } => {
            let splits = parse_splits(&split)?;
            data.check_dir()?;
            eprintln!("mrrec demo: data {}", data.data.display());
            let paths = mrrec_models::fetch_model(
                &mrrec_models::find(mrrec_embed::DEFAULT_EMBEDDER)?,
                &Default::default(),
                &mut |m| eprintln!("{m}"),
            )?;
            eprintln!("embedder ready in {}", paths.dir.display());
            let t0 = std::time::Instant::now();
            let ws = data.open()?;
            eprintln!(
                "indexes ready ({} items) in {:.1}s: {}",
                ws.catalogue().len(),
                t0.elapsed().as_secs_f64(),
                ws.index_dir.display()
            );
            let example = ws
                .dataset
                .queries
                .for_purpose(&Purpose::Evaluate(splits.clone()))
                .map_err(anyhow::Error::msg)?
                .first()
                .map(|q| {
                    q.query()
                        .simple_query
                        .clone()
                        .unwrap_or_else(|| q.query().query.clone())
                })
                .unwrap_or_else(|| "a comfortable pillow for sleeping with a CPAP mask".into());
            println!("Example request: {example:?}\nTop 5 (dense):");
            let hits = ws.search_dense(&example, 5)?;
            let ranked: Vec<(u32, Option<f32>)> =
                hits.iter().map(|h| (h.item, Some(h.score))).collect();
            print_ranked(&ws, &ranked);
            let mut rows = Vec::new();
            for field in [QueryField::SimpleQuery, QueryField::Query] {
                for method in mrrec_agent::method_names() {
                    let dir = out.join(format!("{method}-{field}"));
                    let m = restarting(&dir, || {
                        eval_one(&ws, None, method, field, &splits, None, 42, &dir)
                    })
                    .with_context(|| format!("evaluating {method} on {field}"))?;
                    rows.push((format!("{method} ({field})"), m));
                }
            }
            let refs: Vec<(String, &RunMetrics)> =
                rows.iter().map(|(n, m)| (n.clone(), m)).collect();
            println!("\nEvaluation on split(s) {split} ({} items in the catalogue), 95% bootstrap intervals over users:\n", ws.catalogue().len());
            print!("{}", markdown_table(&refs, true));
            if assistant > 0 {
                demo_assistant(&ws, &splits, assistant, &model, &out)?;
            }
            println!(
                "\nRun folders (metrics.json, per_query.jsonl, table.md, recall.svg) under {}",
                out.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
