//! `mrrec recommend` (one answer with its trace) and `mrrec chat`.

use anyhow::{bail, Context, Result};
use clap::Args;
use mrrec_data::QueryField;

use crate::args::*;
use crate::cmd::eval::*;

#[derive(Args)]
pub(crate) struct RecommendArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    #[command(flatten)]
    pub(crate) tenant: TenantArg,
    /// The user (memory is read for this user only).
    #[arg(long)]
    pub(crate) user: String,
    /// The store section the request comes from (context only; never a filter).
    #[arg(long)]
    pub(crate) category: Option<String>,
    /// Method: mrrec (default), an ablation, an LLM baseline (llm-rewrite, naive-memory,
    /// static-memory) or a retrieval one (bm25, dense, hybrid, hybrid-history: no LLM).
    #[arg(long, default_value = "mrrec", value_parser = method_names())]
    pub(crate) method: String,
    #[command(flatten)]
    pub(crate) stages: StageArgs,
    /// Items to show.
    #[arg(short, default_value_t = 10)]
    pub(crate) k: usize,
    /// Print the answer and trace as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// The request.
    pub(crate) request: String,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// Registered local model id; with --base-url, the server's model name.
    #[arg(
        long,
        env = "MRREC_LLM_MODEL",
        default_value = crate::args::DEFAULT_MODEL
    )]
    pub(crate) model: String,
    /// An OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) instead of the local model.
    #[arg(long, env = "MRREC_LLM_BASE_URL")]
    pub(crate) base_url: Option<String>,
    /// Offer the memory_retrieval_tool schema (demo of tool calling).
    #[arg(long)]
    pub(crate) tools: bool,
    /// System prompt.
    #[arg(long, default_value = "You are a helpful shopping assistant.")]
    pub(crate) system: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// One message to answer; without it, read messages from standard input, one per line.
    pub(crate) message: Option<String>,
}

pub(crate) fn run(a: RecommendArgs) -> Result<()> {
    let RecommendArgs {
        data,
        assistant: args,
        tenant,
        user,
        category,
        method,
        stages,
        k,
        json,
        request,
    } = a;
    let (user, method, request) = (user.as_str(), method.as_str(), request.as_str());
    let tenant = tenant.tenant.as_str();
    // Flags first: a wrong one is reported before any index or model is loaded.
    let stages = stages.params(method)?;
    let Stages {
        rerank,
        exclude_seen,
        ..
    } = stages;
    let is_llm = mrrec_agent::methods::llm_method_names().contains(&method);
    if !is_llm && args.adapter.is_some() && rerank.is_none() {
        bail!("--adapter sets the LLM's weights; method {method} calls no LLM (add --rerank N to re-rank its items with the adapted model as the judge)");
    }
    let ws = data.open()?;
    // The model and the memory store are opened only when the answer calls the LLM.
    let ctx = if is_llm || rerank.is_some() {
        let mut c = args.context(&ws)?;
        c.tenant = tenant.to_string();
        Some(c)
    } else {
        None
    };
    match &ctx {
        Some(c) => {
            let known = c.store.has_entries(mrrec_memory::Owner { tenant, user })?;
            if !known && !ws.dataset.histories.contains(user) {
                bail!("unknown user {user:?}: no memory in the store and no history in the data (build it with `mrrec memory build`)");
            }
            let reads_memory = mrrec_agent::methods::memory_levels(method, &c.cfg)
                .is_some_and(|l| !l.is_empty())
                || rerank.is_some_and(|r| r.memory == mrrec_agent::rerank::JudgeMemory::Profile);
            if !known && reads_memory {
                eprintln!("note: user {user:?} has a history but no memory in the store yet; run `mrrec memory build` for personalised answers");
            }
        }
        // Without the LLM only `hybrid-history` and `--exclude-seen` read the user (their past
        // items); the others rank the request alone, for anyone.
        None if (method == "hybrid-history" || exclude_seen)
            && !ws.dataset.histories.contains(user) =>
        {
            bail!("unknown user {user:?}: no history in the data ({method}{} reads the user's past items)", if exclude_seen { " with --exclude-seen" } else { "" });
        }
        None => {}
    }
    let t0 = std::time::Instant::now();
    // The assistant alone answers with its full trace and item scores; any other method, or
    // the assistant behind a re-ranking stage or the past-items filter, goes through the same
    // pipeline `eval` builds.
    let assistant_alone = ctx
        .as_ref()
        .and_then(|c| mrrec_agent::methods::llm_method(method, &c.cfg))
        .filter(|(kind, _)| {
            matches!(kind, mrrec_agent::methods::LlmKind::Assistant)
                && rerank.is_none()
                && !exclude_seen
        });
    let mut judged: std::collections::HashMap<String, f32> = Default::default();
    let mut stage: Option<serde_json::Value> = None;
    let ans = match (assistant_alone, &ctx) {
        (Some((_, cfg)), Some(c)) => mrrec_agent::assistant::Assistant {
            shop: ws.shop(),
            store: &*c.store,
            tenant,
            llm: &c.model,
            cfg,
            observer: None,
        }
        .answer(user, request, category.as_deref(), k)?,
        _ => {
            let p = pipeline(&ws, method, ctx.as_ref(), stages)?;
            let q = mrrec_data::Query {
                qid: "cli".into(),
                user_id: user.into(),
                query: request.into(),
                simple_query: None,
                category: category.clone(),
                timestamp: None,
                split: None,
            };
            let a = p
                .method
                .answer(&[&q], QueryField::Query, k)?
                .pop()
                .context("the method gave no answer")?;
            let raw = a.trace.unwrap_or_default();
            if let Some(st) = raw.get("rerank") {
                let ids = st["items"].as_array().cloned().unwrap_or_default();
                let scores = st["scores"].as_array().cloned().unwrap_or_default();
                judged = ids
                    .iter()
                    .zip(&scores)
                    .filter_map(|(i, s)| Some((i.as_str()?.to_string(), s.as_f64()? as f32)))
                    .collect();
                stage = Some(st.clone());
            }
            // An LLM method's trace is the assistant's; a retrieval method has none.
            let mut trace: mrrec_agent::assistant::Trace = if is_llm {
                serde_json::from_value(raw).unwrap_or_default()
            } else {
                Default::default()
            };
            trace.usage.prompt_tokens = a.usage.prompt_tokens;
            trace.usage.completion_tokens = a.usage.completion_tokens;
            trace.usage.seconds = a.usage.llm_seconds;
            mrrec_agent::assistant::Answer {
                ranked_with: trace.profile.clone().unwrap_or_else(|| request.into()),
                items: a.ranking.iter().map(|&i| (i, f32::NAN)).collect(),
                trace,
            }
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    // The judge's score of each item shown (those it read).
    let judge: Vec<Option<f32>> = ans
        .items
        .iter()
        .map(|&(i, _)| {
            let it = ws.catalogue().get(i)?;
            judged.get(&it.id).copied()
        })
        .collect();
    if json {
        let items: Vec<serde_json::Value> = ans
            .items
            .iter()
            .zip(&judge)
            .filter_map(|((i, sc), judge)| {
                ws.catalogue().get(*i).map(|it| {
                    serde_json::json!({"id": it.id, "title": it.title, "score": if sc.is_finite() { Some(*sc) } else { None }, "judge": judge})
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "user": user, "request": request, "method": method,
                "ranked_with": ans.ranked_with, "items": items, "trace": ans.trace,
                "rerank": stage, "exclude_seen": exclude_seen, "seconds": wall,
            }))?
        );
        print_cost(ctx.as_ref(), &ans.trace, wall);
        return Ok(());
    }
    let t = &ans.trace;
    if is_llm {
        print_trace(t);
    } else {
        println!("method: {method} (retrieval)");
    }
    if let Some((st, c)) = stage.as_ref().zip(ctx.as_ref()) {
        println!(
            "re-ranked the first {} items with {} as the judge (reads the request{}), fused with the method's order{}; scores below: the judge's log P(Yes) − log P(No)",
            st["depth"],
            mrrec_llm::ChatModel::id(&c.model),
            match rerank.map(|r| r.memory) {
                Some(mrrec_agent::rerank::JudgeMemory::Profile) => " and the user's stored profile",
                Some(mrrec_agent::rerank::JudgeMemory::Recent) => " and the user's last 10 items",
                _ => " alone",
            },
            rerank.map(|r| format!(" (weight {})", r.weight)).unwrap_or_default()
        );
    }
    if exclude_seen {
        println!("without the items the user reviewed before");
    }
    println!();
    // Scores shown: the judge's when it ran, else the method's own.
    let ranked: Vec<(u32, Option<f32>)> = ans
        .items
        .iter()
        .zip(&judge)
        .map(|(&(i, s), &j)| {
            (
                i,
                if stage.is_some() {
                    j
                } else {
                    s.is_finite().then_some(s)
                },
            )
        })
        .collect();
    print_ranked(&ws, &ranked);
    print_cost(ctx.as_ref(), &ans.trace, wall);
    Ok(())
}

/// The answer's cost on stderr: the LLM's tokens and time when one was called.
fn print_cost(ctx: Option<&LlmContext>, t: &mrrec_agent::assistant::Trace, wall: f64) {
    let Some(ctx) = ctx else {
        eprintln!("[no LLM; {wall:.2}s in all]");
        return;
    };
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
}

/// The assistant's trace: its mode, the global aspects, reasoning, tool calls and results, the
/// profile it wrote and the memories it cited.
fn print_trace(t: &mrrec_agent::assistant::Trace) {
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
}

pub(crate) fn chat(a: ChatArgs) -> Result<()> {
    let ChatArgs {
        model,
        base_url,
        tools,
        system,
        temperature,
        max_tokens,
        message,
    } = a;
    use mrrec_llm::{ChatModel, ChatRequest, Message, Sampling};
    use std::io::{BufRead, Write};
    let m = mrrec_agent::backend::chat_model(&model, base_url.as_deref(), server_options()?)?;
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
