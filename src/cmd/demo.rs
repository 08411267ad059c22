//! `mrrec demo`: the main job.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use mrrec_agent::Workspace;
use mrrec_data::{Purpose, QueryField, Split};
use mrrec_eval::{markdown_table, RunMetrics, RunSpec};

use crate::args::*;
use crate::cmd::eval::*;
use crate::cmd::memory::{build_levels, BuildLevel, GlobalQueries};

#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Splits to evaluate (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "val")]
    pub(crate) split: Vec<SplitArg>,
    /// Where run folders go.
    #[arg(long, default_value = "runs/demo")]
    pub(crate) out: PathBuf,
    /// Run the assistant (guided, the default local model) on this many seeded queries of
    /// the split, after building their users' memory, beside dense, hybrid and llm-rewrite on
    /// the same queries (0 skips it).
    #[arg(long, default_value_t = 40)]
    pub(crate) assistant: usize,
    /// Local model the assistant uses (registry id or GGUF path).
    #[arg(long, default_value = crate::args::DEFAULT_MODEL)]
    pub(crate) model: String,
    /// How the assistant's loop is driven (`free`: the model runs the paper's loop itself, as
    /// an adapter distilled from the controller does).
    #[arg(long, value_enum, default_value = "guided")]
    pub(crate) mode: LoopMode,
    /// A LoRA adapter from `mrrec train` / `mrrec iterate` for the assistant's model. Only the
    /// assistant uses it: the memory is written and llm-rewrite answers with the plain model, so
    /// the comparison shows what the adapter adds.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// The model that writes the users' patterns and profiles and the global aspects (registry
    /// id or GGUF path); default: the assistant's.
    #[arg(long)]
    pub(crate) memory_model: Option<String>,
    /// Memory levels built for the assistant's users (records alone is the fastest demo).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "records,patterns,profile,global"
    )]
    pub(crate) levels: Vec<BuildLevel>,
    /// Training queries the global memory's aspects are read from (the first N).
    #[arg(long, default_value_t = 32)]
    pub(crate) global_queries: usize,
    /// With `--rerank N`: one more row beside the assistant's, hybrid's first N items judged
    /// yes/no by the assistant's model (`--judge-adapter`: with a judge adapter from `mrrec train
    /// --judge`), paired against hybrid alone.
    #[command(flatten)]
    pub(crate) rerank: RerankArgs,
    /// With `--rerank`: a LoRA adapter for the judge (e.g. the 0.5B distilled from the 1.5B's
    /// judgements by `mrrec train --judge --judge-listwise`, see the README); the assistant and
    /// the memory stay on the plain model unless `--adapter` says otherwise.
    #[arg(long, value_name = "FILE")]
    pub(crate) judge_adapter: Option<PathBuf>,
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    let DemoArgs {
        data,
        split,
        out,
        assistant,
        model,
        mode,
        adapter,
        memory_model,
        levels,
        global_queries,
        rerank,
        judge_adapter,
    } = a;
    let rerank = rerank.params()?;
    if judge_adapter.is_some() && rerank.is_none() {
        anyhow::bail!("--judge-adapter is the judge's adapter: add --rerank N");
    }
    if rerank.is_some() && assistant == 0 {
        anyhow::bail!("--rerank adds a row to the assistant's table: it needs --assistant N > 0");
    }
    let splits = splits(&split);
    let split = split_names(&split);
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
        .for_purpose(&Purpose::Evaluate(splits.clone()))?
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
    let ranked: Vec<(u32, Option<f32>)> = hits.iter().map(|h| (h.item, Some(h.score))).collect();
    print_ranked(&ws, &ranked);
    let mut rows = Vec::new();
    for field in [QueryField::SimpleQuery, QueryField::Query] {
        for method in mrrec_agent::method_names() {
            let dir = out.join(format!("{method}-{field}"));
            let m = restarting(&dir, || {
                let job = EvalJob {
                    method,
                    field,
                    splits: &splits,
                    limit: None,
                    fold: None,
                    seed: 42,
                    out: &dir,
                    stages: Default::default(),
                };
                eval_one(&ws, None, job)
            })
            .with_context(|| format!("evaluating {method} on {field}"))?;
            rows.push((format!("{method} ({field})"), m));
        }
    }
    let refs: Vec<(String, &RunMetrics)> = rows.iter().map(|(n, m)| (n.clone(), m)).collect();
    println!("\nEvaluation on split(s) {split} ({} items in the catalogue), 95% bootstrap intervals over users:\n", ws.catalogue().len());
    print!("{}", markdown_table(&refs, true));
    if assistant > 0 {
        let memory = DemoMemory {
            model: memory_model.as_deref().unwrap_or(&model),
            levels: &levels,
            global_queries,
        };
        let who = DemoAssistant {
            model: &model,
            mode,
            adapter: adapter.as_deref(),
            judge: rerank.map(|p| (p, judge_adapter.as_deref())),
        };
        demo_assistant(&ws, &splits, assistant, &who, &memory, &out)?;
    }
    println!(
        "\nRun folders (metrics.json, per_query.jsonl, table.md, recall.svg) under {}",
        out.display()
    );
    Ok(())
}

/// The assistant the demo runs: its model, loop mode and adapter.
struct DemoAssistant<'a> {
    model: &'a str,
    mode: LoopMode,
    adapter: Option<&'a Path>,
    /// The judge's stage behind hybrid, and its adapter.
    judge: Option<(mrrec_agent::rerank::RerankParams, Option<&'a Path>)>,
}

impl DemoAssistant<'_> {
    fn args(&self, mode: LoopMode, adapter: Option<&Path>) -> AssistantArgs {
        AssistantArgs {
            llm: LlmArgs {
                model: self.model.to_string(),
                llm_url: None,
                batch: 16,
            },
            mode,
            store: None,
            hybrid_rank: false,
            rank_request: RankRequest::None,
            profile_weight: 1.0,
            guided_calls: 1,
            min_memory_score: mrrec_agent::assistant::DEFAULT_MIN_MEMORY_SCORE,
            min_profile_similarity: mrrec_agent::assistant::DEFAULT_MIN_PROFILE_SIMILARITY,
            no_global: false,
            global_min_support: mrrec_agent::assistant::DEFAULT_GLOBAL_MIN_SUPPORT,
            adapter: adapter.map(Path::to_path_buf),
        }
    }

    /// How the summary names it, e.g. `qwen2.5-coder-0.5b-instruct + adapter run/adapter.safetensors, free`.
    fn describe(&self, mode: mrrec_agent::assistant::Mode) -> String {
        match self.adapter {
            Some(a) => format!("{} + adapter {}, {}", self.model, a.display(), mode.name()),
            None => format!("{}, {}", self.model, mode.name()),
        }
    }
}

/// What memory the demo builds, and with which model.
struct DemoMemory<'a> {
    model: &'a str,
    levels: &'a [BuildLevel],
    global_queries: usize,
}

/// The demo's assistant part: the memory of the users of `n` seeded queries (records, then the
/// levels asked for, each phase timed), then `mrrec` and the strongest baselines on those
/// queries, with the paired comparisons. With an adapter, two contexts: the plain model writes
/// the memory and answers llm-rewrite, the adapted one answers `mrrec`.
fn demo_assistant(
    ws: &Workspace,
    splits: &[Split],
    n: usize,
    who: &DemoAssistant<'_>,
    memory: &DemoMemory<'_>,
    out: &Path,
) -> Result<()> {
    let model = who.model;
    let queries = ws
        .dataset
        .queries
        .for_purpose(&Purpose::Evaluate(splits.to_vec()))?;
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
    // Without an adapter one context answers both; with one, the baseline stays the default.
    let plain_mode = match who.adapter {
        Some(_) => LoopMode::Guided,
        None => who.mode,
    };
    let ctx = who.args(plain_mode, None).context(ws)?;
    let adapted = match who.adapter {
        Some(a) => Some(who.args(who.mode, Some(a)).context(ws)?),
        None => None,
    };
    let answering = adapted.as_ref().unwrap_or(&ctx);
    let writes = [
        BuildLevel::Patterns,
        BuildLevel::Profile,
        BuildLevel::Global,
    ];
    let writer = if memory.levels.iter().any(|l| writes.contains(l)) {
        if memory.model == model {
            None
        } else {
            Some(mrrec_agent::backend::cached_chat_model(
                memory.model,
                None,
                &Default::default(),
            )?)
        }
    } else {
        None
    };
    let b = mrrec_agent::memory::MemoryBuilder {
        progress: true,
        llm: Some(match &writer {
            Some(w) => w as &dyn mrrec_llm::ChatModel,
            None => &ctx.model,
        }),
        ..mrrec_agent::memory::MemoryBuilder::new(ws, &*ctx.store, TENANT)
    };
    let report = build_levels(
        &b,
        ws,
        &users,
        memory.levels,
        GlobalQueries {
            first: Some(memory.global_queries),
            negatives: 4,
        },
    )?;
    ctx.store.add_cost(TENANT, &report.cost())?;
    if memory.levels != [BuildLevel::Records] {
        println!(
            "\nMemory ({}): {}",
            memory.model,
            report.summary(memory.model)
        );
    }
    // The judge: the plain model unless it has an adapter of its own.
    let judge_ctx = match who.judge {
        Some((_, Some(a))) => Some(who.args(LoopMode::Guided, Some(a)).context(ws)?),
        _ => None,
    };
    let judge = who
        .judge
        .map(|(p, _)| (p, judge_ctx.as_ref().unwrap_or(&ctx)));
    let mut runs: Vec<(&str, String, Option<&LlmContext>, Stages)> = Vec::new();
    for method in ["dense", "hybrid", "llm-rewrite"] {
        // The LLM methods borrow the model and the store; dense and hybrid need neither.
        let c = (method == "llm-rewrite").then_some(&ctx);
        runs.push((
            method,
            format!("{method}-assistant-{n}"),
            c,
            Stages::default(),
        ));
    }
    let judged_at = runs.len();
    if let Some((p, c)) = judge {
        let stages = Stages {
            rerank: Some(p),
            ..Default::default()
        };
        runs.push((
            "hybrid",
            format!("hybrid-rerank{}-assistant-{n}", p.depth),
            Some(c),
            stages,
        ));
    }
    runs.push((
        "mrrec",
        format!("mrrec-assistant-{n}"),
        Some(answering),
        Stages::default(),
    ));
    let mut rows = Vec::new();
    for (method, name, c, stages) in runs {
        let dir = out.join(name);
        let m = restarting(&dir, || {
            let job = EvalJob {
                method,
                field: QueryField::SimpleQuery,
                splits,
                limit: Some(n),
                fold: None,
                seed: 42,
                out: &dir,
                stages,
            };
            eval_one(ws, c, job)
        })
        .with_context(|| format!("evaluating {method}"))?;
        rows.push((dir, m));
    }
    let refs: Vec<(String, &RunMetrics)> = rows
        .iter()
        .map(|(_, m)| (format!("{} (simple_query)", m.spec.method), m))
        .collect();
    println!(
        "\nThe assistant ({}) on {n} seeded queries, against the query-only baselines on the same queries:\n",
        who.describe(answering.cfg.mode)
    );
    print!("{}", markdown_table(&refs, true));
    let (mrrec_dir, mrrec_run) = rows.last().expect("mrrec ran");
    for (dir, _) in &rows[..rows.len() - 1] {
        let (_, table) = mrrec_eval::compare_runs(mrrec_dir, dir, 2000, 42)?;
        print!("\n{table}");
    }
    if let Some((p, c)) = judge {
        // What the judge adds to the ranking it re-orders.
        let (judged_dir, judged) = &rows[judged_at];
        let hybrid_dir = &rows[1].0;
        let (_, table) = mrrec_eval::compare_runs(judged_dir, hybrid_dir, 2000, 42)?;
        print!("\n{table}");
        let u = &judged.usage;
        println!(
            "Judge ({}{}, the first {} of hybrid, weight {}): {} tokens in, {:.0}s ({:.1} s/query)",
            mrrec_llm::ChatModel::id(&c.model),
            who.judge
                .and_then(|(_, a)| a)
                .map(|a| format!(", adapter {}", a.display()))
                .unwrap_or_default(),
            p.depth,
            p.weight,
            u.prompt_tokens,
            u.llm_seconds,
            u.llm_seconds / judged.n.max(1) as f64,
        );
    }
    let u = &mrrec_run.usage;
    println!(
        "LLM: {} tokens in, {} out, {:.0}s ({:.1} s/query); memory tokens per query {:.0}",
        u.prompt_tokens,
        u.completion_tokens,
        u.llm_seconds,
        u.llm_seconds / mrrec_run.n.max(1) as f64,
        mrrec_run.memory_tokens_per_query
    );
    Ok(())
}
