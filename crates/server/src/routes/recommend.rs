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
    /// `mrrec` (default), an ablation (`mrrec-no-global`, …), or `dense` / `hybrid` (no LLM).
    #[serde(default)]
    pub method: Option<String>,
    /// Re-rank the method's first items with the service's model as a yes/no judge.
    #[serde(default)]
    pub rerank: Option<RerankBody>,
    /// `guided` or `free` (default: the service's).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Stream events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
}

/// `rerank` in a recommend body: the judge reads the method's first `depth` items (default 20,
/// at most [`MAX_RERANK_DEPTH`]) and its order is fused with the method's, weighted `weight`
/// (default 1); `memory` is what it reads of the user beside the request (`none`, the default,
/// or `profile`: the user's stored profile).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankBody {
    #[serde(default)]
    pub depth: Option<usize>,
    #[serde(default)]
    pub weight: Option<f32>,
    #[serde(default)]
    pub memory: Option<mrrec_agent::rerank::JudgeMemory>,
}

/// The most items one request may have judged (each is a prompt prefill of the model).
pub const MAX_RERANK_DEPTH: usize = 50;

/// The methods `/v1/recommend` answers with.
pub const SERVICE_METHODS: &str = "dense, hybrid, mrrec, mrrec-no-global, mrrec-no-local, mrrec-records-only, mrrec-patterns-only, mrrec-profile-only";

impl RerankBody {
    /// The checked stage (400 naming the field).
    pub fn params(&self) -> Result<mrrec_agent::rerank::RerankParams, ApiError> {
        use mrrec_agent::rerank::{JudgeMemory, RerankParams};
        let d = RerankParams::default();
        let p = RerankParams {
            depth: self.depth.unwrap_or(d.depth),
            weight: self.weight.unwrap_or(d.weight),
            memory: self.memory.unwrap_or(d.memory),
        };
        if p.depth == 0 || p.depth > MAX_RERANK_DEPTH {
            return Err(ApiError::bad(format!(
                "`rerank.depth` must be 1–{MAX_RERANK_DEPTH}"
            )));
        }
        if let Err((field, why)) = p.check() {
            return Err(ApiError::bad(format!("`rerank.{field}`: {why}")));
        }
        if p.memory == JudgeMemory::Recent {
            return Err(ApiError::bad(
                "`rerank.memory`: \"recent\" reads the bundled data's review histories, not the service's users; use \"profile\" (the user's stored profile) or \"none\"",
            ));
        }
        Ok(p)
    }
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
        if !is_retrieval(m)
            && mrrec_agent::methods::llm_method(m, &cfg.assistant)
                .is_none_or(|(k, _)| !matches!(k, mrrec_agent::methods::LlmKind::Assistant))
        {
            return Err(ApiError::bad(format!(
                "unknown method {m:?}; available: {SERVICE_METHODS}"
            )));
        }
    }
    if let Some(rr) = &r.rerank {
        rr.params()?;
    }
    Ok(r)
}

/// The methods that rank the request alone, without the LLM.
fn is_retrieval(method: &str) -> bool {
    method == "dense" || method == "hybrid"
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
    rerank: Option<&Value>,
    queue_ms: f64,
    total_ms: f64,
) -> Value {
    let mut v = json!({
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
    });
    if let Some(r) = rerank {
        v["rerank"] = r.clone();
    }
    v
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
    let rerank = req.rerank.as_ref().map(RerankBody::params).transpose()?;
    // The method ranks as many items as the judge reads.
    let want = rerank.map_or(k, |p| k.max(p.depth));
    {
        let (tenant, user) = (tenant.clone(), req.user.clone());
        if !svc.cpu(move |s| has_memory(s, &tenant, &user)).await? {
            return Err(unknown_user(&req.user));
        }
    }
    if is_retrieval(&method) {
        let (text, m) = (req.request.clone(), method.clone());
        let hits = svc
            .cpu(move |s| {
                if m == "hybrid" {
                    let v = s.ws.embedder.embed(&[text.as_str()])?.remove(0);
                    let q = SearchQuery {
                        text: &text,
                        vector: Some(&v),
                    };
                    Ok(s.ws.hybrid().search(&q, want)?)
                } else {
                    s.ws.search_dense(&text, want)
                }
            })
            .await?;
        let items: Vec<(u32, f32)> = hits.iter().map(|h| (h.item, h.score)).collect();
        let Some(p) = rerank else {
            return Ok(retrieval_answer(
                json!({
                    "method": method, "ranked_with": req.request, "items": items_json(&svc.ws, &items),
                    "timing": {"total_ms": t0.elapsed().as_secs_f64() * 1e3},
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0},
                }),
                req.stream,
            ));
        };
        let permit = svc.llm_gate.enter(&svc.metrics).await?;
        let queue_ms = t0.elapsed().as_secs_f64() * 1e3;
        let s = svc.clone();
        let (user, request, category) =
            (req.user.clone(), req.request.clone(), req.category.clone());
        let Reranked {
            items,
            stage,
            usage,
        } = within_deadline(&svc, permit, move |cancel| {
            s.rerank(
                &tenant,
                &user,
                &request,
                category.as_deref(),
                &items,
                p,
                cancel,
                k,
            )
        })
        .await?;
        svc.metrics.llm(&usage, false);
        return Ok(retrieval_answer(
            json!({
                "method": method, "ranked_with": req.request, "items": items_json(&svc.ws, &items),
                "rerank": stage,
                "timing": {
                    "total_ms": t0.elapsed().as_secs_f64() * 1e3,
                    "queue_ms": queue_ms,
                    "llm_ms": usage.seconds * 1e3,
                },
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
            }),
            req.stream,
        ));
    }
    let (_, mut cfg) = mrrec_agent::methods::llm_method(&method, &svc.cfg.assistant)
        .ok_or_else(|| ApiError::bad(format!("unknown method {method:?}")))?;
    if let Some(m) = req.mode {
        cfg.mode = m;
    }
    let permit = svc.llm_gate.enter(&svc.metrics).await?;
    let queue_ms = t0.elapsed().as_secs_f64() * 1e3;
    if req.stream {
        // Every model call of the answer carries this token: the stream dropped (the client
        // left before the answer ended) cancels the work and frees the LLM slot.
        let cancel = Cancel::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SseEvent>();
        let s = svc.clone();
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
            let answered = s
                .answer(
                    &tenant,
                    cfg,
                    Some(&send),
                    cancel.clone(),
                    &req.user,
                    &req.request,
                    category,
                    want,
                )
                .and_then(|ans| {
                    reranked(
                        &s,
                        &tenant,
                        &req.user,
                        &req.request,
                        category,
                        ans,
                        rerank,
                        cancel,
                        k,
                    )
                });
            match answered {
                Ok((ans, stage)) => {
                    s.metrics.llm(&ans.trace.usage, ans.trace.fallback);
                    let _ = tx.send(sse(
                        "items",
                        &json!({"items": items_json(&s.ws, &ans.items)}),
                    ));
                    let total = t0.elapsed().as_secs_f64() * 1e3;
                    let _ = tx.send(sse(
                        "done",
                        &answer_json(&s.ws, &ans, &method, stage.as_ref(), queue_ms, total),
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
    let (user, request, category) = (req.user.clone(), req.request.clone(), req.category.clone());
    let (ans, stage) = within_deadline(&svc, permit, move |cancel| {
        let category = category.as_deref();
        let ans = s.answer(
            &tenant,
            cfg,
            None,
            cancel.clone(),
            &user,
            &request,
            category,
            want,
        )?;
        reranked(
            &s, &tenant, &user, &request, category, ans, rerank, cancel, k,
        )
    })
    .await?;
    svc.metrics.llm(&ans.trace.usage, ans.trace.fallback);
    let total = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Json(answer_json(
        &svc.ws,
        &ans,
        &method,
        stage.as_ref(),
        queue_ms,
        total,
    ))
    .into_response())
}

/// A retrieval method's answer: one JSON object, or with `stream: true` the events every
/// streamed answer ends with — `items`, then `done` carrying the whole answer (there is no
/// reasoning to stream before them).
fn retrieval_answer(answer: Value, stream: bool) -> Response {
    if !stream {
        return Json(answer).into_response();
    }
    let events = [
        sse("items", &json!({"items": answer["items"]})),
        sse("done", &answer),
    ];
    Sse::new(futures_util::stream::iter(
        events.into_iter().map(Ok::<_, Infallible>),
    ))
    .into_response()
}

/// The assistant's answer with the re-ranking stage behind it when asked (its cost added to the
/// answer's), cut to `k` items; the stage for the response.
#[allow(clippy::too_many_arguments)]
fn reranked(
    s: &Service,
    tenant: &str,
    user: &str,
    request: &str,
    category: Option<&str>,
    mut ans: Answer,
    rerank: Option<mrrec_agent::rerank::RerankParams>,
    cancel: Cancel,
    k: usize,
) -> mrrec_agent::Result<(Answer, Option<Value>)> {
    let Some(p) = rerank else {
        ans.items.truncate(k);
        return Ok((ans, None));
    };
    let Reranked {
        items,
        stage,
        usage,
    } = s.rerank(tenant, user, request, category, &ans.items, p, cancel, k)?;
    ans.items = items;
    ans.trace.usage.add(&usage);
    Ok((ans, Some(stage)))
}

/// Runs LLM work on the blocking pool holding `permit`, within the answer deadline
/// (`--answer-timeout`, 504). Every model call of the work carries the token it is given:
/// returning early (the timeout) or being dropped (the client left) cancels the work and frees
/// the LLM slot.
async fn within_deadline<T: Send + 'static>(
    svc: &Arc<Service>,
    permit: tokio::sync::OwnedSemaphorePermit,
    f: impl FnOnce(Cancel) -> mrrec_agent::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let cancel = Cancel::new();
    let guard = cancel.on_drop();
    let work = tokio::task::spawn_blocking(move || {
        let _p = permit;
        f(cancel)
    });
    let r = match tokio::time::timeout(svc.cfg.answer_timeout, work).await {
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
    Ok(r)
}
