//! `POST /v1/recommend`: an answer as JSON or as server-sent events.

use crate::*;

/// `POST /v1/recommend` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    /// The user asking.
    pub user: String,
    /// What they ask for.
    pub request: String,
    /// Items to return (default 10).
    #[serde(default)]
    pub k: Option<usize>,
    /// The store section (context only; the catalogue is not filtered).
    #[serde(default)]
    pub category: Option<String>,
    /// `mrrec` (default), an ablation (`mrrec-no-global`, …), or `dense` (no LLM).
    #[serde(default)]
    pub method: Option<String>,
    /// `guided` or `free` (default: the service's).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Stream events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
}

/// Parses and checks a recommend body.
pub fn parse_recommend(body: &[u8], cfg: &ServiceConfig) -> Result<RecommendRequest, ApiError> {
    let r: RecommendRequest = parse_json(body, "recommend body")?;
    check_user(&r.user)?;
    check_text("request", &r.request, cfg.max_text_chars)?;
    if let Some(k) = r.k {
        if k == 0 || k > cfg.max_k {
            return Err(ApiError::bad(format!("`k` must be 1–{}", cfg.max_k)));
        }
    }
    if let Some(c) = &r.category {
        check_id("category", c).map_err(ApiError::bad)?;
    }
    if let Some(m) = &r.method {
        if m != "dense"
            && mrrec_agent::methods::llm_method(m, &cfg.assistant)
                .is_none_or(|(k, _)| !matches!(k, mrrec_agent::methods::LlmKind::Assistant))
        {
            return Err(ApiError::bad(format!(
                "unknown method {m:?}; available: dense, mrrec, mrrec-no-global, mrrec-no-local, mrrec-records-only, mrrec-patterns-only, mrrec-profile-only"
            )));
        }
    }
    Ok(r)
}

pub(crate) fn item_json(ws: &Workspace, rank: usize, item: u32, score: f32) -> Value {
    let it = ws.catalogue().get(item);
    json!({
        "rank": rank,
        "id": it.map(|i| i.id.as_str()),
        "title": it.map(|i| i.title.as_str()),
        "category": it.and_then(|i| i.main_category.as_deref()),
        "score": if score.is_finite() { Some(score) } else { None },
    })
}

pub(crate) fn items_json(ws: &Workspace, items: &[(u32, f32)]) -> Vec<Value> {
    items
        .iter()
        .enumerate()
        .map(|(i, (it, s))| item_json(ws, i + 1, *it, *s))
        .collect()
}

pub(crate) fn answer_json(
    ws: &Workspace,
    a: &Answer,
    method: &str,
    queue_ms: f64,
    total_ms: f64,
) -> Value {
    json!({
        "method": method,
        "ranked_with": a.ranked_with,
        "items": items_json(ws, &a.items),
        "trace": a.trace,
        "timing": {
            "total_ms": total_ms,
            "queue_ms": queue_ms,
            "llm_ms": a.trace.usage.seconds * 1e3,
            "memory_ms": a.trace.memory_ms,
            "ranking_ms": a.trace.ranking_ms,
        },
        "usage": {
            "prompt_tokens": a.trace.usage.prompt_tokens,
            "completion_tokens": a.trace.usage.completion_tokens,
        },
    })
}

pub(crate) fn has_memory(svc: &Service, tenant: &str, user: &str) -> mrrec_agent::Result<bool> {
    Ok(svc.store.has_entries(Owner { tenant, user })?)
}

pub(crate) fn unknown_user(user: &str) -> ApiError {
    ApiError::not_found(
        "unknown_user",
        format!("no memory for user {user:?} in this tenant (add interactions first)"),
    )
}

pub(crate) fn sse(name: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

pub(crate) async fn recommend(
    State(svc): State<Arc<Service>>,
    Caller(caller): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let req = parse_recommend(&body_bytes(body)?, &svc.cfg)?;
    let k = req.k.unwrap_or(10);
    let tenant = caller.tenant.clone();
    let method = req.method.clone().unwrap_or_else(|| "mrrec".into());
    {
        let (tenant, user) = (tenant.clone(), req.user.clone());
        if !svc.cpu(move |s| has_memory(s, &tenant, &user)).await? {
            return Err(unknown_user(&req.user));
        }
    }
    if method == "dense" {
        let text = req.request.clone();
        let hits = svc.cpu(move |s| s.ws.search_dense(&text, k)).await?;
        let items: Vec<(u32, f32)> = hits.iter().map(|h| (h.item, h.score)).collect();
        return Ok(Json(json!({
            "method": "dense", "ranked_with": req.request, "items": items_json(&svc.ws, &items),
            "timing": {"total_ms": t0.elapsed().as_secs_f64() * 1e3},
        }))
        .into_response());
    }
    let (_, mut cfg) = mrrec_agent::methods::llm_method(&method, &svc.cfg.assistant)
        .ok_or_else(|| ApiError::bad(format!("unknown method {method:?}")))?;
    if let Some(m) = req.mode {
        cfg.mode = m;
    }
    let permit = svc.llm_gate.enter(&svc.metrics).await?;
    let queue_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Every model call of the answer carries this token: a client that goes away, or an answer
    // past its time, stops the generation at the next token and frees the LLM slot.
    let cancel = Cancel::new();
    if req.stream {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SseEvent>();
        let s = svc.clone();
        // The stream dropped (the client left before the answer ended) cancels the work.
        let guard = cancel.on_drop();
        let rid = request_id();
        tokio::task::spawn_blocking(move || {
            let _p = permit;
            let send = |e: &Event| {
                let (name, data) = match e {
                    Event::Aspects { aspects } => ("aspects", json!({"aspects": aspects})),
                    Event::Call { index } => ("call", json!({"index": index})),
                    Event::Text { delta } => ("text", json!({"delta": delta})),
                    Event::ToolCall { call } => ("tool_call", json!(call)),
                    Event::Profile { .. } => ("profile", json!(e)),
                };
                let _ = tx.send(sse(name, &data));
            };
            let category = req.category.as_deref();
            match s.answer(
                &tenant,
                cfg,
                Some(&send),
                cancel,
                &req.user,
                &req.request,
                category,
                k,
            ) {
                Ok(ans) => {
                    s.metrics.llm(&ans.trace.usage, ans.trace.fallback);
                    let _ = tx.send(sse(
                        "items",
                        &json!({"items": items_json(&s.ws, &ans.items)}),
                    ));
                    let total = t0.elapsed().as_secs_f64() * 1e3;
                    let _ = tx.send(sse(
                        "done",
                        &answer_json(&s.ws, &ans, &method, queue_ms, total),
                    ));
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => {
                    let err = match &rid {
                        Some(id) => REQUEST_ID.sync_scope(id.clone(), || ApiError::internal(e)),
                        None => ApiError::internal(e),
                    };
                    let _ = tx.send(sse(
                        "error",
                        &json!({"code": err.code, "message": err.message, "request_id": rid}),
                    ));
                }
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| {
            let _ = &guard;
            rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let s = svc.clone();
    let user = req.user.clone();
    let request = req.request.clone();
    let category = req.category.clone();
    let guard = cancel.on_drop();
    let work = tokio::task::spawn_blocking(move || {
        let _p = permit;
        s.answer(
            &tenant,
            cfg,
            None,
            cancel,
            &user,
            &request,
            category.as_deref(),
            k,
        )
    });
    // Returning early (the timeout) or being dropped (the client left) cancels the work.
    let ans = match tokio::time::timeout(svc.cfg.answer_timeout, work).await {
        Err(_) => {
            svc.metrics.reject("answer_timeout");
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no answer within {:?}", svc.cfg.answer_timeout),
            ));
        }
        Ok(Err(e)) => return Err(ApiError::worker(e)),
        Ok(Ok(r)) => r.map_err(ApiError::internal)?,
    };
    guard.disarm();
    svc.metrics.llm(&ans.trace.usage, ans.trace.fallback);
    let total = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Json(answer_json(&svc.ws, &ans, &method, queue_ms, total)).into_response())
}
