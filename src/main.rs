//! The `mrrec` command line: a thin shell over the library crates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mrrec::{DenseMethod, LexicalMethod, Workspace, WorkspaceOptions};
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
        /// Registered local model id, ignored when --base-url is given.
        #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
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
        /// Which parts: embed,search,bm25,ingest,llm,constrained,batched,profile.
        #[arg(long, default_value = "embed,search,bm25,ingest")]
        parts: String,
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

#[derive(Subcommand)]
enum MemoryAction {
    /// Build behaviour-record memory for every user with a history (idempotent, resumable).
    Build {
        #[command(flatten)]
        data: DataArgs,
        /// Store file (default: under $MRREC_HOME/memory, one per catalogue).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Only the first N users (sorted by id).
        #[arg(long)]
        users: Option<usize>,
        /// Levels to build: records, patterns, profile (patterns and profile call the LLM).
        #[arg(long, default_value = "records")]
        levels: String,
        /// Local model that writes patterns and profiles.
        #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
        model: String,
    },
    /// Print a user's entries.
    Show {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        store: Option<PathBuf>,
        /// The user.
        user: String,
    },
    /// The user's entries most similar to a text.
    Retrieve {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        store: Option<PathBuf>,
        /// The user.
        user: String,
        /// What to look for.
        text: String,
        /// How many entries.
        #[arg(short, default_value_t = 3)]
        k: usize,
    },
    /// Remove every trace of a user from the store.
    Forget {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        store: Option<PathBuf>,
        /// The user.
        user: String,
    },
    /// Entries per level, users, store size.
    Stats {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        store: Option<PathBuf>,
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

fn method_for(ws: &Workspace, name: &str) -> Result<Box<dyn Method>> {
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
            "unknown method {other:?}; available: {}",
            mrrec::method_names().join(", ")
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
    method: &str,
    field: QueryField,
    splits: &[Split],
    limit: Option<usize>,
    seed: u64,
    out: &Path,
) -> Result<RunMetrics> {
    let m = method_for(ws, method)?;
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
    provenance.insert("prompt_version".into(), "none".into());
    let spec = RunSpec {
        method: method.to_string(),
        query_field: field,
        splits: splits.to_vec(),
        limit,
        seed,
        ks: vec![10, 100, 1000],
        bootstrap_rounds: 1000,
        settings: m.settings(),
        provenance,
    };
    let mut pb = mrrec::progress::Progress::new(&format!("eval {method} on {field}"), true);
    let metrics = mrrec_eval::run_eval(
        m.as_ref(),
        queries,
        ws.catalogue(),
        &spec,
        out,
        32,
        &mut |d, t| pb.set(d, t),
    )?;
    pb.finish();
    Ok(metrics)
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

/// Runs summary requests (user index, request) in batches of 8 with progress; adds their usage
/// and the faithfulness of each answer against that user's entries; returns the texts in order.
fn summarise_all(
    llm: &dyn mrrec_llm::ChatModel,
    jobs: &[(usize, mrrec_llm::ChatRequest)],
    per_user: &[Vec<mrrec_memory::MemoryEntry>],
    what: &str,
    usage: &mut mrrec_llm::Usage,
    faithful: &mut (usize, usize),
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut pb = mrrec::progress::Progress::new(what, true);
    for chunk in jobs.chunks(8) {
        let reqs: Vec<mrrec_llm::ChatRequest> = chunk.iter().map(|j| j.1.clone()).collect();
        for ((ui, _), r) in chunk.iter().zip(llm.chat_batch(&reqs)) {
            let r = r?;
            usage.add(&r.usage);
            let source: Vec<&str> = per_user[*ui].iter().map(|e| e.text.as_str()).collect();
            let (ok, total) = mrrec_memory::summaries::faithfulness(&r.text, &source.join("\n"));
            *faithful = (faithful.0 + ok, faithful.1 + total);
            out.push(r.text);
        }
        pb.set(out.len(), jobs.len());
    }
    pb.finish();
    Ok(out)
}

fn open_store(ws: &Workspace, store: Option<PathBuf>) -> Result<mrrec_memory::SqliteStore> {
    let path = store.unwrap_or_else(|| {
        mrrec_models::home()
            .join("memory")
            .join(format!("{}.sqlite", ws_data_name(ws)))
    });
    Ok(mrrec_memory::SqliteStore::open(&path)?)
}

fn memory(action: MemoryAction) -> Result<()> {
    use mrrec_embed::TextEmbedder;
    use mrrec_memory::{Level, MemoryRead, MemoryWrite, Owner};
    match action {
        MemoryAction::Build {
            data,
            store,
            users,
            levels,
            model,
        } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let ids = ws.dataset.histories.user_ids();
            let ids = &ids[..users.unwrap_or(ids.len()).min(ids.len())];
            let t0 = std::time::Instant::now();
            let mut per_user: Vec<Vec<mrrec_memory::MemoryEntry>> = ids
                .iter()
                .map(|u| mrrec_memory::record_entries(ws.dataset.histories.of(u), ws.catalogue()))
                .collect();
            // One embedding pass over every text: length-sorted batches, cached, resumable.
            let texts: Vec<&str> = per_user.iter().flatten().map(|e| e.text.as_str()).collect();
            let mut pb = mrrec::progress::Progress::new("embedding record memory", true);
            let vecs = ws
                .embedder
                .embed_with_progress(&texts, &mut |d, t| pb.set(d, t))?;
            pb.finish();
            drop(texts);
            let mut vecs = vecs.into_iter();
            for e in per_user.iter_mut().flatten() {
                e.embedding = vecs.next().unwrap_or_default();
            }
            let mut n = 0usize;
            let want_patterns = levels.contains("pattern");
            let want_profile = levels.contains("profile");
            let mut usage = mrrec_llm::Usage::default();
            let mut llm_entries = 0usize;
            if want_patterns || want_profile {
                use mrrec_memory::summaries;
                let cache = mrrec_models::home().join("cache").join("llm.sqlite");
                let llm = mrrec_llm::CachedChatModel::open(
                    mrrec_llm::LocalModel::from_registry(&model)?,
                    &cache,
                    mrrec_llm::CachePolicy::All,
                )?;
                // Patterns: one request per (user, category) with records.
                let mut jobs: Vec<(usize, String, Vec<String>, mrrec_llm::ChatRequest)> =
                    Vec::new();
                for (ui, entries) in per_user.iter().enumerate() {
                    let mut by_cat: std::collections::BTreeMap<
                        String,
                        Vec<&mrrec_memory::MemoryEntry>,
                    > = Default::default();
                    for e in entries {
                        by_cat
                            .entry(e.category.clone().unwrap_or_else(|| "Other".into()))
                            .or_default()
                            .push(e);
                    }
                    for (cat, es) in by_cat {
                        let texts: Vec<&str> = es.iter().map(|e| e.text.as_str()).collect();
                        let sources: Vec<String> = es.iter().map(|e| e.id.clone()).collect();
                        jobs.push((
                            ui,
                            cat.clone(),
                            sources,
                            summaries::pattern_request(&cat, &texts),
                        ));
                    }
                }
                let mut faithful = (0usize, 0usize);
                let pattern_jobs: Vec<(usize, mrrec_llm::ChatRequest)> =
                    jobs.iter().map(|j| (j.0, j.3.clone())).collect();
                let texts = summarise_all(
                    &llm,
                    &pattern_jobs,
                    &per_user,
                    "writing preference patterns",
                    &mut usage,
                    &mut faithful,
                )?;
                let mut pattern_texts: Vec<Vec<(String, String, Vec<String>)>> =
                    vec![Vec::new(); ids.len()];
                for (j, text) in jobs.iter().zip(texts) {
                    pattern_texts[j.0].push((j.1.clone(), text, j.2.clone()));
                }
                let mut profile_jobs = Vec::new();
                let mut profile_sources = Vec::new();
                for (ui, pats) in pattern_texts.iter().enumerate() {
                    if want_patterns {
                        for (cat, text, sources) in pats {
                            let es = summaries::pattern_entries(cat, text, sources);
                            llm_entries += es.len();
                            per_user[ui].extend(es);
                        }
                    }
                    if want_profile && !pats.is_empty() {
                        let pairs: Vec<(String, String)> = pats
                            .iter()
                            .map(|(c, t, _)| (c.clone(), t.clone()))
                            .collect();
                        profile_sources.push(
                            pats.iter()
                                .map(|(c, _, _)| format!("pattern:{c}"))
                                .collect::<Vec<_>>(),
                        );
                        profile_jobs.push((ui, summaries::profile_request(&pairs)));
                    }
                }
                let texts = summarise_all(
                    &llm,
                    &profile_jobs,
                    &per_user,
                    "writing user profiles",
                    &mut usage,
                    &mut faithful,
                )?;
                for (((ui, _), sources), text) in
                    profile_jobs.iter().zip(&profile_sources).zip(texts)
                {
                    let es = summaries::profile_entries(&text, sources);
                    llm_entries += es.len();
                    per_user[*ui].extend(es);
                }
                println!(
                    "faithfulness: {} of {} named attributes and numbers in the summaries appear in the user's records ({:.0}%)",
                    faithful.0,
                    faithful.1,
                    100.0 * faithful.0 as f64 / faithful.1.max(1) as f64
                );
                // Embed the new segments.
                let texts: Vec<&str> = per_user
                    .iter()
                    .flatten()
                    .filter(|e| e.embedding.is_empty())
                    .map(|e| e.text.as_str())
                    .collect();
                let vecs = ws.embedder.embed(&texts)?;
                drop(texts);
                let mut vecs = vecs.into_iter();
                for e in per_user
                    .iter_mut()
                    .flatten()
                    .filter(|e| e.embedding.is_empty())
                {
                    e.embedding = vecs.next().unwrap_or_default();
                }
            }
            for (u, entries) in ids.iter().zip(per_user.iter_mut()) {
                st.put(
                    Owner {
                        tenant: TENANT,
                        user: u,
                    },
                    entries,
                )?;
                n += entries.len();
            }
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "{} users, {n} entries ({llm_entries} written by {}) in {:.1}s; LLM: {} tokens in, {} out, {:.1}s ({:.2} s/LLM entry); prompts {} → {}",
                ids.len(),
                if llm_entries > 0 { model.as_str() } else { "no LLM" },
                secs,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.seconds,
                usage.seconds / llm_entries.max(1) as f64,
                mrrec_memory::summaries::PROMPT_VERSION,
                st.path().display()
            );
        }
        MemoryAction::Show { data, store, user } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
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
        }
        MemoryAction::Retrieve {
            data,
            store,
            user,
            text,
            k,
        } => {
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
                &Level::ALL,
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
        MemoryAction::Forget { data, store, user } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            let n = st.forget(Owner {
                tenant: TENANT,
                user: &user,
            })?;
            println!("removed {n} entries of {user}");
        }
        MemoryAction::Stats { data, store } => {
            let ws = data.open()?;
            let st = open_store(&ws, store)?;
            println!("{}", serde_json::to_string_pretty(&st.stats(TENANT)?)?);
        }
    }
    Ok(())
}

fn json_pair(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(vec![a, b])
}

fn memory_tool() -> mrrec_llm::ToolSpec {
    mrrec_llm::ToolSpec {
        name: "memory_retrieval_tool".into(),
        description: "Retrieve the current user's memories relevant to a query.".into(),
        parameters: serde_json::json!({"type": "object", "properties": {
            "query": {"type": "string", "description": "what to look up in the user's memory"},
            "aspects": {"type": "array", "items": {"type": "string"}}}, "required": ["query"]}),
    }
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
    let m: Box<dyn ChatModel> = match base_url {
        Some(url) => {
            let mut cfg = mrrec_llm::OpenAiConfig::from_env()
                .unwrap_or_else(|| mrrec_llm::OpenAiConfig::new(&url, model));
            cfg.base_url = url;
            Box::new(mrrec_llm::OpenAiModel::new(cfg)?)
        }
        None => {
            eprintln!("loading {model}…");
            Box::new(mrrec_llm::LocalModel::from_registry(model)?)
        }
    };
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
                vec![memory_tool()]
            } else {
                Vec::new()
            },
            sampling: Sampling {
                temperature,
                max_tokens,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            assistant_prefix: None,
            constraint: None,
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

fn main() -> Result<()> {
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
            let m = method_for(&ws, &method)?;
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
            let m = eval_one(&ws, &a.method, field, &splits, a.limit, a.seed, &a.out)?;
            print!(
                "{}",
                markdown_table(&[(format!("{} ({})", a.method, field), &m)], true)
            );
            println!("\nwrote {}", a.out.display());
        }
        Command::Bench {
            data,
            exact_items,
            hnsw_items,
            bm25_items,
            bench_queries: queries,
            parts,
        } => {
            let ws = data.open()?;
            let mut out = serde_json::Map::new();
            out.insert("threads".into(), rayon::current_num_threads().into());
            if parts.contains("embed") {
                out.insert("embedding".into(), mrrec::bench::embedding(&ws, 1024)?);
            }
            if parts.contains("search") {
                out.insert(
                    "search".into(),
                    mrrec::bench::search(&ws, exact_items, hnsw_items, queries)?,
                );
            }
            if parts.contains("llm") {
                out.insert(
                    "llm".into(),
                    mrrec::bench::llm(&["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])?,
                );
            }
            if parts.contains("batched") {
                out.insert(
                    "batched".into(),
                    json_pair(
                        mrrec::bench::batched("smollm2-135m-instruct")?,
                        mrrec::bench::batched("qwen2.5-coder-0.5b-instruct")?,
                    ),
                );
            }
            if parts.contains("profile") {
                out.insert("qmatmul_profile".into(), mrrec::bench::qmatmul_profile()?);
            }
            if parts.contains("constrained") {
                out.insert(
                    "constrained".into(),
                    mrrec::bench::constrained("qwen2.5-coder-0.5b-instruct")?,
                );
            }
            if parts.contains("ingest") {
                out.insert(
                    "c4_ingest".into(),
                    mrrec::bench::c4_ingest(&ws, exact_items)?,
                );
            }
            if parts.contains("bm25") {
                out.insert("bm25".into(), mrrec::bench::bm25(&ws, bm25_items, queries)?);
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
        Command::Compare { a, b, rounds, seed } => {
            let (_, table) = mrrec_eval::compare_runs(&a, &b, rounds, seed)?;
            print!("{table}");
        }
        Command::Demo { data, split, out } => {
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
                for method in mrrec::method_names() {
                    let dir = out.join(format!("{method}-{field}"));
                    let m = eval_one(&ws, method, field, &splits, None, 42, &dir)
                        .with_context(|| format!("evaluating {method} on {field}"))?;
                    rows.push((format!("{method} ({field})"), m));
                }
            }
            let refs: Vec<(String, &RunMetrics)> =
                rows.iter().map(|(n, m)| (n.clone(), m)).collect();
            println!("\nEvaluation on split(s) {split} ({} items in the catalogue), 95% bootstrap intervals over users:\n", ws.catalogue().len());
            print!("{}", markdown_table(&refs, true));
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
