//! `mrrec eval`: a method over the queries of a split, resumable, with its provenance.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mrrec_agent::{DenseMethod, LexicalMethod, Workspace};
use mrrec_data::{Purpose, QueryField, Split};
use mrrec_eval::{markdown_table, Method, RunMetrics, RunSpec};

use crate::args::*;

pub(crate) fn method_for<'a>(
    ws: &'a Workspace,
    name: &str,
    ctx: Option<&'a LlmContext>,
    history: mrrec_agent::shop::HistoryParams,
) -> Result<Box<dyn Method + 'a>> {
    if let Some(ctx) = ctx {
        if let Some((kind, cfg)) = mrrec_agent::methods::llm_method(name, &ctx.cfg) {
            return Ok(Box::new(mrrec_agent::methods::LlmMethod {
                name: name.to_string(),
                kind,
                assistant: mrrec_agent::assistant::Assistant {
                    shop: ws.shop(),
                    store: &*ctx.store,
                    tenant: &ctx.tenant,
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
        "hybrid-history" => Box::new(mrrec_agent::methods::HistoryMethod {
            shop: ws.shop(),
            params: history,
        }),
        other => bail!(
            "unknown method {other:?}; available: {}, {}",
            mrrec_agent::method_names().join(", "),
            mrrec_agent::methods::llm_method_names().join(", ")
        ),
    })
}

/// Warns on stderr when some users' memory is missing or out of date, naming who and the
/// command that builds it.
pub(crate) fn warn_coverage(cov: &mrrec_agent::memory::Coverage, what: &str, splits: &[Split]) {
    if cov.complete() {
        return;
    }
    let mut who: Vec<&str> = cov
        .without_records
        .iter()
        .chain(&cov.unsummarised)
        .map(String::as_str)
        .collect();
    who.truncate(3);
    eprintln!(
        "warning: {what}: the memory of {} of {} users is missing or out of date ({}; e.g. {}); they answer with less memory than the method reads. Build it first: mrrec memory build --for-split {} --levels records,patterns,profile",
        cov.incomplete(),
        cov.users,
        cov.summary(),
        who.join(", "),
        split_label(splits)
    );
}

fn split_label(splits: &[Split]) -> String {
    splits
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// One evaluation run: which method, on which query field and splits, into which folder.
pub(crate) struct EvalJob<'a> {
    pub(crate) method: &'a str,
    pub(crate) field: QueryField,
    pub(crate) splits: &'a [Split],
    /// A seeded subset of this many queries.
    pub(crate) limit: Option<usize>,
    /// Only the queries of this fold's users.
    pub(crate) fold: Option<mrrec_data::Fold>,
    pub(crate) seed: u64,
    pub(crate) out: &'a Path,
    /// What runs with the method (a re-ranking stage needs the LLM context).
    pub(crate) stages: Stages,
}

/// A method as a run answers with it: the method, the re-ranking stage behind it and the
/// past-items filter after both, with the run's name, batch and prompt versions (`eval` and
/// `recommend` build the same thing).
pub(crate) struct Pipeline<'a> {
    pub(crate) method: Box<dyn Method + 'a>,
    /// The run's name: the method's, `@mode` for LLM methods, `+rerankN`, `+unseen`.
    pub(crate) name: String,
    /// Queries answered together.
    pub(crate) batch: usize,
    /// The prompt versions and models the answers depend on.
    pub(crate) prompts: String,
}

/// The method `method` with `stages.rerank` behind it and, with `stages.exclude_seen`, the
/// user's past items dropped from the result.
pub(crate) fn pipeline<'a>(
    ws: &'a Workspace,
    method: &str,
    ctx: Option<&'a LlmContext>,
    stages: Stages,
) -> Result<Pipeline<'a>> {
    let Stages {
        history,
        rerank,
        exclude_seen,
    } = stages;
    let mut m = method_for(ws, method, ctx, history)?;
    // LLM runs are named with their mode (a free and a guided run are different runs), and go
    // in batches of `--batch` (default 16) queries answered together (their model calls decode
    // as one batch); a killed run loses at most one batch's outcomes, and their model answers
    // are replayed from the response cache.
    let (run_name, batch, prompts) = match ctx {
        Some(c) if mrrec_agent::methods::llm_method(method, &c.cfg).is_some() => (
            format!("{method}@{}", c.cfg.mode.name()),
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
    // The re-ranking stage wraps the method: the run is named for both, and its LLM calls
    // (one prefill per judged item) go in batches of queries like an LLM method's.
    let (run_name, batch, prompts) = match (rerank, ctx) {
        (Some(p), Some(c)) => {
            m = Box::new(mrrec_agent::rerank::RerankMethod {
                inner: m,
                name: format!("{method}+rerank{}", p.depth),
                llm: &c.model,
                shop: ws.shop(),
                store: c.store.as_ref(),
                tenant: &c.tenant,
                params: p,
            });
            (
                format!("{run_name}+rerank{}", p.depth),
                batch.min(c.batch),
                format!(
                    "{prompts} / {} / {}",
                    mrrec_agent::rerank::RERANK_PROMPT_VERSION,
                    mrrec_llm::ChatModel::id(&c.model)
                ),
            )
        }
        (Some(_), None) => {
            bail!("--rerank needs the judge model (an internal error: no LLM context)")
        }
        (None, _) => (run_name, batch, prompts),
    };
    let run_name = if exclude_seen {
        m = Box::new(mrrec_agent::methods::ExcludeSeen {
            inner: m,
            name: format!("{run_name}+unseen"),
            shop: ws.shop(),
        });
        format!("{run_name}+unseen")
    } else {
        run_name
    };
    Ok(Pipeline {
        method: m,
        name: run_name,
        batch,
        prompts,
    })
}

pub(crate) fn eval_one(
    ws: &Workspace,
    ctx: Option<&LlmContext>,
    job: EvalJob<'_>,
) -> Result<RunMetrics> {
    let EvalJob {
        method,
        field,
        splits,
        limit,
        fold,
        seed,
        out,
        stages,
    } = job;
    let Pipeline {
        method: m,
        name: run_name,
        batch,
        prompts,
    } = pipeline(ws, method, ctx, stages)?;
    let mut queries = ws
        .dataset
        .queries
        .for_purpose(&Purpose::Evaluate(splits.to_vec()))?;
    if let Some(f) = &fold {
        if splits != [Split::Train] {
            bail!("--fold {f} picks `train` users for cross-validation inside `train`; evaluate {} whole (add --split train to check a fold)", split_label(splits));
        }
        queries.retain(|q| f.holds(&q.query().user_id));
    }
    if queries.is_empty() {
        match fold {
            Some(f) => bail!("no `train` query of a user of fold {f} in the query file"),
            None => bail!("no queries of split(s) {splits:?} in the query file"),
        }
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
    // The fold is part of the run's identity: a folder of fold 1 never resumes as fold 2.
    if let Some(f) = &fold {
        provenance.insert("fold".into(), f.to_string());
    }
    // Greedy answers of models with k-quant matrices (candle multiplies those, and its batched
    // product differs in the last bits from its one-row product) can change with the batch, so
    // the batch a run was made with is recorded.
    provenance.insert("query_batch".into(), batch.to_string());
    // Whose memory the LLM methods read (recorded when not the default tenant, so that runs made
    // before `--tenant` existed still resume).
    if let Some(c) = ctx.filter(|c| c.tenant != TENANT) {
        provenance.insert("tenant".into(), c.tenant.clone());
    }
    // Which models wrote the memory the LLM methods read (`--memory-model` may differ from the
    // assistant's): LLM-written entries and query aspects per model.
    if let Some(c) = ctx {
        let writers = c.store.stats(&c.tenant)?.writers;
        let text: Vec<String> = writers.iter().map(|(w, n)| format!("{w}: {n}")).collect();
        provenance.insert("memory_writers".into(), text.join(", "));
    }
    let mut spec = RunSpec {
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
    // Whether the memory the method reads exists for the users it answers: a user whose
    // memory was never built answers memory-free, and a comparison with a memory-free method
    // then understates what memory adds.
    if let Some(c) = ctx {
        let levels = mrrec_agent::methods::memory_levels(method, &c.cfg).unwrap_or_default();
        if !levels.is_empty() {
            let (picked, _) = mrrec_eval::run::select_queries(queries.clone(), &spec);
            let users: Vec<&str> = picked.iter().map(|q| q.query().user_id.as_str()).collect();
            let cov = mrrec_agent::memory::coverage(
                &ws.dataset.histories,
                c.store.as_ref(),
                &c.tenant,
                &users,
                &levels,
            )?;
            warn_coverage(
                &cov,
                &format!("{run_name} on {}", split_label(splits)),
                splits,
            );
            spec.provenance
                .insert("memory_coverage".into(), cov.summary());
            spec.provenance
                .insert("memory_incomplete".into(), cov.incomplete().to_string());
        }
    }
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
pub(crate) fn restarting(out: &Path, run: impl Fn() -> Result<RunMetrics>) -> Result<RunMetrics> {
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

pub(crate) fn ws_data_name(ws: &Workspace) -> String {
    ws.index_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

pub(crate) fn embedder_sha() -> String {
    mrrec_models::find(mrrec_embed::DEFAULT_EMBEDDER)
        .ok()
        .and_then(|m| m.files.first().map(|f| f.sha256[..16].to_string()))
        .unwrap_or_default()
}

/// Prints ranked items (with their score when the method gives one).
pub(crate) fn print_ranked(ws: &Workspace, ranked: &[(u32, Option<f32>)]) {
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

pub(crate) fn run(a: EvalArgs) -> Result<()> {
    let stages = a.stages.params(&a.method)?;
    let ws = a.data.open()?;
    let field: QueryField = a.query_field.into();
    let splits = splits(&a.split);
    let ctx = if stages.rerank.is_some()
        || mrrec_agent::methods::llm_method_names().contains(&a.method.as_str())
    {
        let mut c = a.assistant.context(&ws)?;
        c.tenant = a.tenant.tenant.clone();
        Some(c)
    } else {
        None
    };
    let m = eval_one(
        &ws,
        ctx.as_ref(),
        EvalJob {
            method: &a.method,
            field,
            splits: &splits,
            limit: a.limit,
            fold: a.fold,
            seed: a.seed,
            out: &a.out,
            stages,
        },
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
    // The judge's scores are in the trace: other weights need no model (unless a stage follows).
    if stages.rerank.is_some() && !stages.exclude_seen {
        println!(
            "other fusion weights of this run without a model: mrrec reweigh {} --weight 0.5,2",
            a.out.display()
        );
    }
    Ok(())
}
