//! `mrrec serve-llm`: any [`ChatModel`] exposed as an OpenAI-compatible chat-completions API
//! (`POST /v1/chat/completions`, JSON or server-sent events; `GET /v1/models`), so one binary
//! gives a local endpoint with no other dependency.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use mrrec_llm::{
    ChatModel, ChatRequest, ChatResponse, FinishReason, Message, Role, Sampling, ToolCall, ToolSpec,
};

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 4 << 20;

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": msg.into(), "type": "invalid_request_error"}})),
    )
        .into_response()
}

/// Turns an OpenAI chat-completions body into a request (and whether it asks to stream).
pub fn parse_request(body: &Value) -> Result<(ChatRequest, bool), String> {
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be an array")?;
    if msgs.is_empty() {
        return Err("`messages` is empty".into());
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            other => return Err(format!("messages[{i}].role: unsupported {other:?}")),
        };
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Some(_) => return Err(format!("messages[{i}].content must be a string")),
        };
        let mut msg = Message::new(role, content);
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            for c in calls {
                let f = c.get("function").unwrap_or(c);
                let name = f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or(format!("messages[{i}].tool_calls: missing name"))?;
                let arguments = match f.get("arguments") {
                    Some(Value::String(s)) => {
                        mrrec_llm::parse::parse_json_lenient(s).unwrap_or(json!({}))
                    }
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                msg.tool_calls.push(ToolCall {
                    name: name.to_string(),
                    arguments,
                });
            }
        }
        messages.push(msg);
    }
    let mut tools = Vec::new();
    if let Some(ts) = body.get("tools").and_then(Value::as_array) {
        for t in ts {
            let f = t.get("function").unwrap_or(t);
            tools.push(ToolSpec {
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("tools[].function.name missing")?
                    .to_string(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .unwrap_or(json!({"type": "object"})),
            });
        }
    }
    let num = |k: &str| body.get(k).and_then(Value::as_f64);
    let d = Sampling::default();
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .unwrap_or(d.max_tokens);
    let stop = match body.get("stop") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let sampling = Sampling {
        temperature: num("temperature").unwrap_or(d.temperature).clamp(0.0, 5.0),
        top_p: num("top_p").unwrap_or(d.top_p).clamp(0.0, 1.0),
        repetition_penalty: num("repetition_penalty").unwrap_or(1.0) as f32,
        max_tokens: max_tokens.min(32_768),
        stop,
        seed: body.get("seed").and_then(Value::as_u64).unwrap_or(d.seed),
        ..d
    };
    // vLLM's convention: continue the last assistant message instead of opening a new turn.
    let mut assistant_prefix = None;
    if body.get("continue_final_message").and_then(Value::as_bool) == Some(true)
        && messages.last().is_some_and(|m| m.role == Role::Assistant)
    {
        assistant_prefix = messages.pop().map(|m| m.content);
    }
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let constraint = if let Some(schema) = body.get("guided_json").filter(|v| !v.is_null()) {
        Some(mrrec_llm::Constraint::JsonSchema(schema.clone()))
    } else if let Some(schema) = body.pointer("/response_format/json_schema/schema") {
        Some(mrrec_llm::Constraint::JsonSchema(schema.clone()))
    } else if let Some(r) = body.get("guided_regex").and_then(Value::as_str) {
        Some(mrrec_llm::Constraint::Regex(r.to_string()))
    } else {
        body.get("guided_grammar")
            .and_then(Value::as_str)
            .map(|g| mrrec_llm::Constraint::Lark(g.to_string()))
    };
    Ok((
        ChatRequest {
            messages,
            tools,
            sampling,
            assistant_prefix,
            constraint,
            cancel: None,
        },
        stream,
    ))
}

fn completion_json(model: &str, r: &ChatResponse) -> Value {
    let calls: Vec<Value> = r
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"id": format!("call_{}", i + 1), "type": "function",
            "function": {"name": c.name, "arguments": serde_json::to_string(&c.arguments).unwrap_or_default()}}))
        .collect();
    let finish = if !calls.is_empty() {
        "tool_calls"
    } else if r.finish_reason == FinishReason::Length {
        "length"
    } else {
        "stop"
    };
    let mut message = json!({"role": "assistant", "content": r.text});
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    json!({
        "id": "chatcmpl-mrrec", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "total_tokens": r.usage.prompt_tokens + r.usage.completion_tokens},
    })
}

async fn completions(State(model): State<Arc<dyn ChatModel>>, body: axum::body::Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("body is not JSON: {e}")),
    };
    let (mut req, stream) = match parse_request(&body) {
        Ok(x) => x,
        Err(e) => return bad_request(e),
    };
    // Dropped with this handler's future (the client left) or with its event stream, the guard
    // stops the generation at the next token.
    let cancel = mrrec_llm::Cancel::new();
    req.cancel = Some(cancel.clone());
    let guard = cancel.on_drop();
    let id = model.id().to_string();
    if !stream {
        let m = model.clone();
        let r = tokio::task::spawn_blocking(move || m.chat(&req)).await;
        guard.disarm();
        return match r {
            Ok(Ok(r)) => Json(completion_json(&id, &r)).into_response(),
            Ok(Err(e)) => bad_request(e.to_string()),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    let m = model.clone();
    tokio::task::spawn_blocking(move || {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-mrrec", "object": "chat.completion.chunk",
            "model": id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let _ = tx.blocking_send(chunk(json!({"role": "assistant"}), Value::Null));
        let result = m.chat_stream(&req, &mut |t| {
            let _ = tx.blocking_send(chunk(json!({"content": t}), Value::Null));
        });
        match result {
            Ok(r) => {
                let full = completion_json(&id, &r);
                if let Some(calls) = full["choices"][0]["message"]["tool_calls"].as_array() {
                    let indexed: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let mut c = c.clone();
                            c["index"] = json!(i);
                            c
                        })
                        .collect();
                    let _ = tx.blocking_send(chunk(json!({"tool_calls": indexed}), Value::Null));
                }
                let _ = tx.blocking_send(chunk(
                    json!({}),
                    full["choices"][0]["finish_reason"].clone(),
                ));
                let _ = tx.blocking_send(json!({"id": "chatcmpl-mrrec", "object": "chat.completion.chunk", "choices": [], "usage": full["usage"]}));
            }
            Err(e) => {
                let _ = tx.blocking_send(json!({"error": {"message": e.to_string()}}));
            }
        }
    });
    let events = futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
        let _ = &guard;
        async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(v) => Some((
                    Ok::<Event, Infallible>(Event::default().data(v.to_string())),
                    (rx, false),
                )),
                None => Some((Ok(Event::default().data("[DONE]")), (rx, true))),
            }
        }
    });
    Sse::new(events).into_response()
}

/// The router serving `model` (mount it in a larger app, or run it with [`serve`]).
pub fn router(model: Arc<dyn ChatModel>) -> Router {
    let id = model.id().to_string();
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/v1/models",
            get(move || async move {
                Json(json!({"object": "list", "data": [{"id": id, "object": "model"}]}))
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(model)
}

/// Serves `model` on `addr` until Ctrl-C.
pub fn serve(model: Arc<dyn ChatModel>, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!(
            "serving {} on http://{}/v1",
            model.id(),
            listener.local_addr()?
        );
        axum::serve(listener, router(model))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}

/// Serves `model` on a free loopback port from a background thread; returns the base URL
/// (`http://127.0.0.1:PORT/v1`). For tests and embedding.
pub fn spawn_loopback(model: Arc<dyn ChatModel>) -> std::io::Result<String> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) {
                let _ = axum::serve(listener, router(model)).await;
            }
        });
    });
    Ok(format!("http://{addr}/v1"))
}
