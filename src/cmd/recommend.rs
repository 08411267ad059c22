//! `mrrec recommend` (one answer with its trace) and `mrrec chat`.

use anyhow::{bail, Result};
use clap::Args;
use mrrec_data::QueryField;
use mrrec_eval::Method;

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
    /// Method: mrrec (default), an ablation, or a baseline (llm-rewrite, naive-memory,
    /// static-memory).
    #[arg(long, default_value = "mrrec", value_parser = clap::builder::PossibleValuesParser::new(mrrec_agent::methods::llm_method_names()))]
    pub(crate) method: String,
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
        default_value = "qwen2.5-coder-0.5b-instruct"
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
        k,
        json,
        request,
    } = a;
    let (user, method, request) = (user.as_str(), method.as_str(), request.as_str());
    let tenant = tenant.tenant.as_str();
    let ws = data.open()?;
    let ctx = args.context(&ws)?;
    let Some((kind, cfg)) = mrrec_agent::methods::llm_method(method, &ctx.cfg) else {
        bail!(
            "unknown method {method:?}; available: {}",
            mrrec_agent::methods::llm_method_names().join(", ")
        );
    };
    let known = ctx
        .store
        .has_entries(mrrec_memory::Owner { tenant, user })?;
    if !known && !ws.dataset.histories.contains(user) {
        bail!("unknown user {user:?}: no memory in the store and no history in the data (build it with `mrrec memory build`)");
    }
    if !known {
        eprintln!("note: user {user:?} has a history but no memory in the store yet; run `mrrec memory build` for personalised answers");
    }
    let assistant = mrrec_agent::assistant::Assistant {
        shop: ws.shop(),
        store: &*ctx.store,
        tenant,
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
            let a = m.answer(&[&q], QueryField::Query, k)?.remove(0);
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
