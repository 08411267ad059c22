//! `mrrec serve`: the assistant as an HTTP service (axum), one app for builders and trainers.
//!
//! Routes (documented in `openapi.json`, served at `/openapi.json`):
//! - `POST /v1/recommend` — `{user, request, k?, category?, method?, mode?, stream?}`; JSON answer
//!   (items, scores, trace, timing), or with `stream: true` server-sent events as the assistant
//!   works (`aspects`, `call`, `text`, `tool_call`, `profile`, `items`, `done`, `error`);
//! - `GET /v1/items/search?q=…&k=…&mode=dense|hybrid|bm25`;
//! - `GET /v1/users`, `GET /v1/users/{user}/memory`, `POST /v1/users/{user}/interactions`,
//!   `DELETE /v1/users/{user}` — the caller's tenant only;
//! - `POST /tools/memory_retrieve`, `POST /reward` — the memory tool and MR.Rec's rewards for
//!   an external (GPU) GRPO trainer, the same code the Rust trainer uses;
//! - `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus), `GET /openapi.json`, `GET /`
//!   (the web page).
//!
//! Every `/v1`, `/tools` and `/reward` request needs an API key (`Authorization: Bearer KEY` or
//! `X-API-Key`); the key decides the tenant. Limits: body size (413), requests per second per
//! key (429 with `Retry-After`), LLM work (a fixed number of slots and a bounded queue: 503 with
//! `Retry-After` when the queue is full or a request waited too long), CPU work (the same, for
//! embedding and ranking), and a deadline per answer (504).

pub mod auth;
mod edge;
pub mod listen;
pub mod metrics;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use mrrec_embed::TextEmbedder;
use mrrec_index::{ItemIndex, SearchQuery};
use mrrec_llm::{Batcher, Cancel, Cancellable, ChatModel, LlmError};
use mrrec_memory::{Level, MemoryWrite, Owner};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use auth::{check_id, KeyRing, Principal, RateLimiter};
use edge::{request_id, REQUEST_ID};
use metrics::Metrics;
use mrrec_agent::assistant::{Answer, Assistant, AssistantConfig, Event, Mode};
use mrrec_agent::Workspace;

/// Every route, as documented (the OpenAPI test checks the two agree).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/recommend"),
    ("get", "/v1/items/search"),
    ("get", "/v1/users"),
    ("get", "/v1/users/{user}/memory"),
    ("post", "/v1/users/{user}/interactions"),
    ("delete", "/v1/users/{user}"),
    ("post", "/tools/memory_retrieve"),
    ("post", "/reward"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/"),
];

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
const PAGE: &str = include_str!("web/index.html");

/// Limits and defaults.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest request / query text, characters.
    pub max_text_chars: usize,
    /// Most items per answer.
    pub max_k: usize,
    /// Most interactions per `POST .../interactions`.
    pub max_interactions: usize,
    /// Requests per second per key (0: unlimited).
    pub rate_per_key: f64,
    /// Burst per key.
    pub burst: f64,
    /// Answers the LLM works on at once.
    pub llm_slots: usize,
    /// Answers that may wait for a slot; beyond, 503.
    pub llm_queue: usize,
    /// CPU jobs (embedding, ranking) at once.
    pub cpu_slots: usize,
    /// CPU jobs that may wait; beyond, 503.
    pub cpu_queue: usize,
    /// Longest wait for a slot before a 503.
    pub queue_timeout: Duration,
    /// Deadline of one answer (504 after it).
    pub answer_timeout: Duration,
    /// Decode the model calls of the answers in the LLM slots together (a [`Batcher`]: one
    /// decoding step for all of them per token) instead of letting them compete for the cores.
    /// For a local model with `llm_slots` > 1; a server batches by itself. Streamed answers then
    /// send each call's text when the call ends rather than token by token.
    pub batch_llm: bool,
    /// Failed authentications per second allowed per client address, after a burst of
    /// `auth_failure_burst` (0: unlimited); beyond, the address gets 429 until it refills.
    pub auth_failures_per_second: f64,
    /// Failed authentications an address may make at once.
    pub auth_failure_burst: f64,
    /// Connections, timeouts and shutdown.
    pub conn: ConnLimits,
    /// The assistant's settings.
    pub assistant: AssistantConfig,
}

/// How long a client may take and how many connections it may hold; what shutdown waits for.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A request's headers must arrive within this, from the connection's start or the end of
    /// the previous response (otherwise the connection is closed); this is also the idle
    /// keep-alive timeout.
    pub header_timeout: Duration,
    /// A request's body must arrive within this once its headers are in (408 otherwise).
    pub body_timeout: Duration,
    /// Open connections at once; beyond, new ones get 503 and are closed.
    pub max_connections: usize,
    /// Open connections per client address; beyond, 503 and closed.
    pub max_connections_per_client: usize,
    /// Requests in flight per API key at once; beyond, 429.
    pub max_in_flight_per_key: usize,
    /// After a shutdown signal: how long requests in flight may take to finish before every
    /// remaining connection is dropped.
    pub shutdown_grace: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_client: 256,
            max_in_flight_per_key: 64,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_body_bytes: 256 << 10,
            max_text_chars: 2000,
            max_k: 100,
            max_interactions: 1000,
            rate_per_key: 50.0,
            burst: 100.0,
            llm_slots: 1,
            llm_queue: 16,
            cpu_slots: 4,
            cpu_queue: 512,
            queue_timeout: Duration::from_secs(60),
            answer_timeout: Duration::from_secs(180),
            batch_llm: false,
            auth_failures_per_second: 1.0,
            auth_failure_burst: 20.0,
            conn: ConnLimits::default(),
            assistant: AssistantConfig::default(),
        }
    }
}

/// A JSON error: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Seconds to wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// A refusal to retry after `wait` seconds (429 / 503 with `Retry-After`, at least 1 s).
    fn retry_after(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        wait: f64,
    ) -> Self {
        ApiError {
            retry_after: Some(wait.ceil().max(1.0) as u64),
            ..Self::new(status, code, message)
        }
    }
    /// 400.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    fn internal(e: anyhow::Error) -> Self {
        // The full error (file paths, upstream URLs) goes to the log under the request id;
        // the client gets a reason that names neither.
        let id = request_id().unwrap_or_default();
        if let Some(llm) = e.chain().find_map(|c| c.downcast_ref::<LlmError>()) {
            tracing::warn!(request_id = %id, "language model: {e:#}");
            return Self::new(
                StatusCode::BAD_GATEWAY,
                "llm_error",
                format!("{} (details in the server log)", llm_reason(llm)),
            );
        }
        if e.chain().any(|c| {
            matches!(
                c.downcast_ref::<mrrec_memory::MemoryError>(),
                Some(mrrec_memory::MemoryError::Store { .. })
            )
        }) {
            tracing::warn!(request_id = %id, "memory store: {e:#}");
            return Self::retry_after(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the memory store failed (details in the server log)",
                1.0,
            );
        }
        tracing::error!(request_id = %id, "internal error: {e:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (details in the server log)",
        )
    }
}

/// What went wrong with the language model, in words that name no server or file.
fn llm_reason(e: &LlmError) -> String {
    match e {
        LlmError::Http { status, .. } => {
            format!("the language model server answered HTTP {status}")
        }
        LlmError::Transport { message, .. } if message.contains("timed out") => {
            "the language model server timed out".into()
        }
        // A server error that outlived the retries ("HTTP 503 after 3 retries: …").
        LlmError::Transport { message, .. } if message.starts_with("HTTP ") => {
            let status: String = message[5..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            format!("the language model server answered HTTP {status} (after retries)")
        }
        LlmError::Transport { .. } => "the language model server could not be reached".into(),
        LlmError::BadResponse { .. } => "the language model server sent a malformed answer".into(),
        LlmError::ContextOverflow { .. } => "the request does not fit the model's context".into(),
        LlmError::Cancelled => "the answer was cancelled".into(),
        _ => "the language model failed".into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"code": self.code, "message": self.message});
        if let Some(id) = request_id() {
            err["request_id"] = json!(id);
        }
        let mut r = (self.status, Json(json!({ "error": err }))).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// A fixed number of slots and a bounded queue in front of them.
struct Gate {
    what: &'static str,
    slots: usize,
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
    wait: Duration,
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    fn new(what: &'static str, slots: usize, queue: usize, wait: Duration) -> Self {
        let slots = slots.max(1);
        Gate {
            what,
            slots,
            sem: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            queue,
            wait,
        }
    }

    fn busy(&self, why: String) -> ApiError {
        ApiError {
            retry_after: Some(self.wait.as_secs().clamp(1, 5)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", why)
        }
    }

    async fn enter(&self, metrics: &Metrics) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _w = Waiting(&self.waiting);
        if ahead >= self.queue {
            metrics.reject("queue_full");
            return Err(self.busy(format!(
                "{} work is at capacity ({} running, {} waiting); retry later",
                self.what, self.slots, self.queue
            )));
        }
        match tokio::time::timeout(self.wait, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(self.busy("the service is shutting down".into())),
            Err(_) => {
                metrics.reject("queue_timeout");
                Err(self.busy(format!(
                    "waited {:?} for a {} slot; retry later",
                    self.wait, self.what
                )))
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots - self.sem.available_permits()
    }
}

/// The service's state: one workspace, one store, one chat model, the keys and the limits.
pub struct Service {
    /// Catalogue, embedder, indexes.
    pub ws: Arc<Workspace>,
    /// Memory of every tenant.
    pub store: Arc<dyn MemoryWrite + Send + Sync>,
    /// The chat model.
    pub llm: Arc<dyn ChatModel>,
    /// The LLM response cache that forget cleans (the shared one under `$MRREC_HOME`, whatever
    /// model this service runs: other processes may have written the user's text there).
    pub llm_cache: Option<PathBuf>,
    /// Valid keys.
    pub keys: KeyRing,
    /// Limits.
    pub cfg: ServiceConfig,
    /// Counters.
    pub metrics: Metrics,
    limiter: RateLimiter,
    auth_failures: RateLimiter,
    key_in_flight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    llm_gate: Gate,
    cpu_gate: Gate,
    /// With `batch_llm` and several slots: the answers' model calls, decoded together.
    batcher: Option<Batcher<'static>>,
    workers: AtomicUsize,
}

impl Service {
    /// The service over these parts.
    pub fn new(
        ws: Arc<Workspace>,
        store: Arc<dyn MemoryWrite + Send + Sync>,
        llm: Arc<dyn ChatModel>,
        llm_cache: Option<PathBuf>,
        keys: KeyRing,
        cfg: ServiceConfig,
    ) -> Arc<Self> {
        Arc::new(Service {
            limiter: RateLimiter::new(cfg.rate_per_key, cfg.burst),
            auth_failures: RateLimiter::new(cfg.auth_failures_per_second, cfg.auth_failure_burst),
            key_in_flight: Default::default(),
            llm_gate: Gate::new("LLM", cfg.llm_slots, cfg.llm_queue, cfg.queue_timeout),
            cpu_gate: Gate::new("CPU", cfg.cpu_slots, cfg.cpu_queue, cfg.queue_timeout),
            batcher: (cfg.batch_llm && cfg.llm_slots > 1).then(|| Batcher::shared(llm.clone())),
            workers: AtomicUsize::new(0),
            ws,
            store,
            llm,
            llm_cache,
            keys,
            cfg,
            metrics: Metrics::default(),
        })
    }

    /// Answers on the calling (blocking) thread: every model call carries `cancel`, and goes
    /// through a worker of the batcher (registered for the answer's lifetime) when the service
    /// batches. A cancelled answer is counted.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        tenant: &str,
        cfg: AssistantConfig,
        observer: Option<&(dyn Fn(&Event) + Sync)>,
        cancel: Cancel,
        user: &str,
        request: &str,
        category: Option<&str>,
        k: usize,
    ) -> anyhow::Result<Answer> {
        let worker = self
            .batcher
            .as_ref()
            .map(|b| b.worker(self.workers.fetch_add(1, Ordering::Relaxed)));
        let model: &dyn ChatModel = match &worker {
            Some(w) => w,
            None => &*self.llm,
        };
        let llm = Cancellable::new(model, cancel);
        let mut a = self.assistant(tenant, cfg, observer);
        a.llm = &llm;
        let r = a.answer(user, request, category, k);
        if r.as_ref().is_err_and(cancelled) {
            self.metrics.reject("cancelled");
        }
        r
    }

    fn assistant<'a>(
        &'a self,
        tenant: &'a str,
        cfg: AssistantConfig,
        observer: Option<&'a (dyn Fn(&Event) + Sync)>,
    ) -> Assistant<'a> {
        Assistant {
            shop: self.ws.shop(),
            store: &*self.store,
            tenant,
            llm: &*self.llm,
            cfg,
            observer,
        }
    }

    fn builder<'a>(&'a self, tenant: &'a str, llm: bool) -> mrrec_agent::memory::MemoryBuilder<'a> {
        mrrec_agent::memory::MemoryBuilder {
            ws: &self.ws,
            store: &*self.store,
            tenant,
            llm: if llm { Some(&*self.llm) } else { None },
            batch: 4,
            progress: false,
        }
    }

    /// Runs CPU work (embedding, ranking, store reads) on the blocking pool behind the CPU gate.
    async fn cpu<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Service) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.cpu_gate.enter(&self.metrics).await?;
        let svc = self.clone();
        match tokio::task::spawn_blocking(move || {
            let _p = permit;
            f(&svc)
        })
        .await
        {
            Ok(r) => r.map_err(ApiError::internal),
            Err(e) => Err(ApiError::internal(anyhow::anyhow!("worker failed: {e}"))),
        }
    }
}

/// The caller, authenticated and within its rate.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        svc: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        // Failed authentications are limited per client address: once its bucket is empty, an
        // address is refused (429) before any key is checked, until the bucket refills.
        let client = client_addr(parts);
        if let Some(wait) = svc.auth_failures.empty(&client) {
            svc.metrics.reject("auth_rate_limited");
            return Err(ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "auth_rate_limited",
                "too many failed authentications from this address",
                wait,
            ));
        }
        let fail = |status: StatusCode, code: &'static str, message: String| {
            svc.metrics.reject(code);
            let _ = svc.auth_failures.take(&client);
            ApiError::new(status, code, message)
        };
        let values = |name: header::HeaderName| -> Vec<&[u8]> {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        };
        let key = match auth::presented_key(
            &values(header::AUTHORIZATION),
            &values(header::HeaderName::from_static("x-api-key")),
        ) {
            Ok(k) => k,
            Err(e @ auth::CredentialError::Conflict(_)) => {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "bad_credentials",
                    e.to_string(),
                ))
            }
            Err(e) => {
                return Err(fail(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    e.to_string(),
                ))
            }
        };
        let Some(key) = key else {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required (Authorization: Bearer KEY or X-API-Key: KEY)".into(),
            ));
        };
        let key = key.as_str();
        let Some(p) = svc.keys.check(key) else {
            return Err(fail(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API key is not valid".into(),
            ));
        };
        if let Err(wait) = svc.limiter.take(&auth::hash_key(key)) {
            svc.metrics.reject("rate_limited");
            return Err(ApiError::retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests per second with this key",
                    svc.cfg.rate_per_key
                ),
                wait,
            ));
        }
        Ok(Caller(p.clone()))
    }
}

/// The client's IP address as the connection gave it (`unknown` when the app is served
/// without connection info).
fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            },
            e.body_text(),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("{what}: {e}")))
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.trim().is_empty() {
        return Err(ApiError::bad(format!("`{what}` is empty")));
    }
    if !auth::has_visible(s) {
        return Err(ApiError::bad(format!("`{what}` has no visible character")));
    }
    let n = s.chars().count();
    if n > max {
        return Err(ApiError::bad(format!(
            "`{what}` has {n} characters; at most {max}"
        )));
    }
    Ok(())
}

fn check_user(user: &str) -> Result<(), ApiError> {
    check_id("user", user).map_err(ApiError::bad)
}

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

fn item_json(ws: &Workspace, rank: usize, item: u32, score: f32) -> Value {
    let it = ws.catalogue().get(item);
    json!({
        "rank": rank,
        "id": it.map(|i| i.id.as_str()),
        "title": it.map(|i| i.title.as_str()),
        "category": it.and_then(|i| i.main_category.as_deref()),
        "score": if score.is_finite() { Some(score) } else { None },
    })
}

fn items_json(ws: &Workspace, items: &[(u32, f32)]) -> Vec<Value> {
    items
        .iter()
        .enumerate()
        .map(|(i, (it, s))| item_json(ws, i + 1, *it, *s))
        .collect()
}

fn answer_json(ws: &Workspace, a: &Answer, method: &str, queue_ms: f64, total_ms: f64) -> Value {
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

fn has_memory(svc: &Service, tenant: &str, user: &str) -> anyhow::Result<bool> {
    Ok(svc.store.has_entries(Owner { tenant, user })?)
}

fn unknown_user(user: &str) -> ApiError {
    ApiError::not_found(
        "unknown_user",
        format!("no memory for user {user:?} in this tenant (add interactions first)"),
    )
}

fn sse(name: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

async fn recommend(
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
                Err(e) if cancelled(&e) => {}
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
        Ok(Err(e)) => return Err(ApiError::internal(anyhow::anyhow!("worker failed: {e}"))),
        Ok(Ok(r)) => r.map_err(ApiError::internal)?,
    };
    guard.disarm();
    svc.metrics.llm(&ans.trace.usage, ans.trace.fallback);
    let total = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Json(answer_json(&svc.ws, &ans, &method, queue_ms, total)).into_response())
}

/// Whether an answer failed because it was cancelled.
fn cancelled(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<LlmError>(), Some(LlmError::Cancelled)))
}

/// `GET /v1/items/search` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// The text.
    pub q: String,
    /// Items (default 10).
    #[serde(default)]
    pub k: Option<usize>,
    /// `dense` (default), `hybrid` or `bm25`.
    #[serde(default)]
    pub mode: Option<String>,
}

async fn search(
    State(svc): State<Arc<Service>>,
    Caller(_): Caller,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad(e.body_text()))?;
    check_text("q", &p.q, svc.cfg.max_text_chars)?;
    let k = p.k.unwrap_or(10);
    if k == 0 || k > svc.cfg.max_k {
        return Err(ApiError::bad(format!("`k` must be 1–{}", svc.cfg.max_k)));
    }
    let mode = p.mode.unwrap_or_else(|| "dense".into());
    if !["dense", "hybrid", "bm25"].contains(&mode.as_str()) {
        return Err(ApiError::bad(format!(
            "unknown mode {mode:?} (dense, hybrid, bm25)"
        )));
    }
    let q = p.q.clone();
    let hits = svc
        .cpu(move |s| {
            let v = if mode == "bm25" {
                None
            } else {
                Some(s.ws.embedder.embed(&[q.as_str()])?.remove(0))
            };
            let sq = SearchQuery {
                text: &q,
                vector: v.as_deref(),
            };
            Ok(match mode.as_str() {
                "bm25" => s.ws.lexical.search(&sq, k)?,
                "hybrid" => s.ws.hybrid().search(&sq, k)?,
                _ => s.ws.dense.search(&sq, k)?,
            })
        })
        .await?;
    let items: Vec<(u32, f32)> = hits.iter().map(|h| (h.item, h.score)).collect();
    Ok(Json(json!({"q": p.q, "items": items_json(&svc.ws, &items)})).into_response())
}

async fn users(State(svc): State<Arc<Service>>, Caller(c): Caller) -> Result<Response, ApiError> {
    let tenant = c.tenant.clone();
    let users = svc.cpu(move |s| Ok(s.store.users(&tenant)?)).await?;
    Ok(Json(json!({"tenant": c.tenant, "users": users})).into_response())
}

async fn memory_show(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let entries = svc
        .cpu(move |s| {
            Ok(s.store.entries(Owner {
                tenant: &tenant,
                user: &u,
            })?)
        })
        .await?;
    if entries.is_empty() {
        return Err(unknown_user(&user));
    }
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| json!({"id": e.id, "level": e.level.as_str(), "category": e.category, "text": e.text, "provenance": e.provenance}))
        .collect();
    Ok(Json(json!({"user": user, "entries": entries})).into_response())
}

/// `POST /v1/users/{user}/interactions` body, read.
#[derive(Debug)]
pub struct Interactions {
    /// The rows as reviews of the user.
    pub reviews: Vec<mrrec_data::Review>,
    /// Rewrite the touched summaries with the LLM.
    pub rebuild: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InteractionsBody {
    interactions: Vec<Value>,
    #[serde(default)]
    rebuild: bool,
}

/// Parses and checks an interactions body for `user` (errors name `interactions[i]`).
pub fn parse_interactions(
    body: &[u8],
    user: &str,
    cfg: &ServiceConfig,
) -> Result<Interactions, ApiError> {
    check_user(user)?;
    let b: InteractionsBody = parse_json(body, "interactions body")?;
    if b.interactions.is_empty() {
        return Err(ApiError::bad("`interactions` is empty"));
    }
    if b.interactions.len() > cfg.max_interactions {
        return Err(ApiError::bad(format!(
            "{} interactions; at most {} per request",
            b.interactions.len(),
            cfg.max_interactions
        )));
    }
    let mut reviews = Vec::with_capacity(b.interactions.len());
    for (i, v) in b.interactions.into_iter().enumerate() {
        let r = mrrec_agent::memory::review_from_json(v, user, &format!("interactions[{i}]"))
            .map_err(|e| ApiError::bad(format!("{e:#}")))?;
        if r.text.chars().count() > 20 * cfg.max_text_chars
            || r.title.chars().count() > cfg.max_text_chars
        {
            return Err(ApiError::bad(format!("interactions[{i}]: text too long")));
        }
        check_id(&format!("interactions[{i}].parent_asin"), &r.parent_asin)
            .map_err(ApiError::bad)?;
        if let Some(j) = reviews.iter().position(|o: &mrrec_data::Review| {
            o.parent_asin == r.parent_asin && o.timestamp == r.timestamp
        }) {
            return Err(ApiError::bad(format!(
                "interactions[{i}] repeats the item and timestamp of interactions[{j}]"
            )));
        }
        reviews.push(r);
    }
    Ok(Interactions {
        reviews,
        rebuild: b.rebuild,
    })
}

async fn memory_add(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Interactions { reviews, rebuild } =
        parse_interactions(&body_bytes(body)?, &user, &svc.cfg)?;
    let unknown: Vec<String> = reviews
        .iter()
        .filter(|r| svc.ws.catalogue().by_id(&r.parent_asin).is_none())
        .map(|r| r.parent_asin.clone())
        .collect();
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let added = svc
        .cpu(move |s| s.builder(&tenant, false).add_reviews(&u, &reviews))
        .await?;
    let mut out = json!({"user": user, "added": added.added, "updated": added.updated,
        "items_not_in_catalogue": unknown});
    if rebuild && added.changed() > 0 {
        let permit = svc.llm_gate.enter(&svc.metrics).await?;
        let s = svc.clone();
        let (tenant, u) = (c.tenant.clone(), user.clone());
        let report = tokio::task::spawn_blocking(move || {
            let _p = permit;
            let b = s.builder(&tenant, true);
            let mut report = mrrec_agent::memory::BuildReport::default();
            b.build_patterns(&[u.as_str()], &mut report)?;
            b.build_profiles(&[u.as_str()], &mut report)?;
            s.metrics.llm(&report.usage, false);
            anyhow::Ok(report)
        })
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("worker failed: {e}")))?
        .map_err(ApiError::internal)?;
        out["patterns_written"] = json!(report.patterns_written);
        out["profiles_written"] = json!(report.profiles_written);
    }
    Ok(Json(out).into_response())
}

async fn memory_forget(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let r = svc
        .cpu(move |s| {
            if !has_memory(s, &tenant, &u)? {
                return Ok(None);
            }
            s.builder(&tenant, false)
                .forget(&u, s.llm_cache.as_deref())
                .map(Some)
        })
        .await?;
    let Some(r) = r else {
        return Err(unknown_user(&user));
    };
    Ok(Json(json!({
        "user": user,
        "entries": r.store.entries,
        "query_aspects": r.store.query_aspects,
        "global_aspects": r.store.global_aspects,
        "cached_embeddings": r.embeddings,
        "cached_llm_responses": r.llm_responses,
    }))
    .into_response())
}

/// `POST /tools/memory_retrieve` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolBody {
    /// Whose memory.
    pub user: String,
    /// What to look up.
    #[serde(default)]
    pub query: String,
    /// Aspects to focus on.
    #[serde(default)]
    pub aspects: Vec<String>,
    /// Entries (default: the assistant's k).
    #[serde(default)]
    pub k: Option<usize>,
    /// Levels searched (default: all).
    #[serde(default)]
    pub levels: Option<Vec<String>>,
}

/// Parses and checks a memory-tool body into the body and the assistant settings it implies.
pub fn parse_tool(
    body: &[u8],
    cfg: &ServiceConfig,
) -> Result<(ToolBody, AssistantConfig), ApiError> {
    let b: ToolBody = parse_json(body, "tool body")?;
    check_user(&b.user)?;
    if b.query.chars().count() > cfg.max_text_chars
        || b.aspects.len() > 16
        || b.aspects.iter().any(|a| a.chars().count() > 200)
    {
        return Err(ApiError::bad("query or aspects too long"));
    }
    if !auth::has_visible(&b.query) && !b.aspects.iter().any(|a| auth::has_visible(a)) {
        return Err(ApiError::bad(
            "give a `query` or `aspects` with a visible character",
        ));
    }
    let mut a = cfg.assistant.clone();
    if let Some(k) = b.k {
        if k == 0 || k > 50 {
            return Err(ApiError::bad("`k` must be 1–50"));
        }
        a.k = k;
    }
    if let Some(ls) = &b.levels {
        a.levels = ls
            .iter()
            .map(|l| Level::parse(l).ok_or_else(|| ApiError::bad(format!("unknown level {l:?}"))))
            .collect::<Result<_, _>>()?;
    }
    Ok((b, a))
}

async fn tool_memory(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (b, cfg) = parse_tool(&body_bytes(body)?, &svc.cfg)?;
    let tenant = c.tenant.clone();
    let user = b.user.clone();
    let found = svc
        .cpu(move |s| {
            if !has_memory(s, &tenant, &b.user)? {
                return Ok(None);
            }
            s.assistant(&tenant, cfg, None)
                .memory_tool(&b.user, &json!({"query": b.query, "aspects": b.aspects}))
                .map(Some)
        })
        .await?;
    let Some((call, text)) = found else {
        return Err(unknown_user(&user));
    };
    Ok(Json(json!({"ok": call.ok, "error": call.error,
        "results": call.results.iter().map(|(id, l, sc, t)| json!({"id": id, "level": l.as_str(), "score": sc, "text": t})).collect::<Vec<_>>(),
        "tool_response": text}))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardBody {
    target: String,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    memory_calls_ok: Option<usize>,
    #[serde(default)]
    weights: Option<mrrec_agent::rewards::RewardWeights>,
}

/// A reward request, read: the target id, the profile (None when none parses), successful
/// memory calls, and the weights.
#[derive(Debug)]
pub struct RewardRequest {
    /// Catalogue id of the target.
    pub target: String,
    /// The profile to rank.
    pub profile: Option<String>,
    /// Successful memory calls.
    pub memory_calls_ok: usize,
    /// Weights.
    pub weights: mrrec_agent::rewards::RewardWeights,
}

/// Parses and checks a reward body.
pub fn parse_reward(body: &[u8], cfg: &ServiceConfig) -> Result<RewardRequest, ApiError> {
    let b: RewardBody = parse_json(body, "reward body")?;
    check_id("target", &b.target).map_err(ApiError::bad)?;
    let limit = 64 * cfg.max_text_chars;
    let (profile, calls) = match (&b.response, &b.profile) {
        (Some(r), None) => {
            if r.len() > limit {
                return Err(ApiError::bad("`response` is too long"));
            }
            (
                mrrec_agent::rewards::final_of_response(r).map(|(p, _)| p),
                mrrec_agent::rewards::successful_calls_in(r),
            )
        }
        (None, Some(p)) => {
            if p.len() > limit {
                return Err(ApiError::bad("`profile` is too long"));
            }
            (Some(p.trim().to_string()).filter(|p| !p.is_empty()), 0)
        }
        _ => {
            return Err(ApiError::bad(
                "give exactly one of `response` and `profile`",
            ))
        }
    };
    let weights = b.weights.unwrap_or_default();
    if ![weights.format, weights.rec, weights.mem]
        .iter()
        .all(|w| w.is_finite())
    {
        return Err(ApiError::bad("weights must be finite"));
    }
    Ok(RewardRequest {
        target: b.target,
        profile,
        memory_calls_ok: b.memory_calls_ok.unwrap_or(calls),
        weights,
    })
}

async fn reward(
    State(svc): State<Arc<Service>>,
    Caller(_): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let RewardRequest {
        target,
        profile,
        memory_calls_ok: calls,
        weights: w,
    } = parse_reward(&body_bytes(body)?, &svc.cfg)?;
    let target = svc
        .ws
        .catalogue()
        .position(&target)
        .ok_or_else(|| ApiError::bad(format!("target {target:?} is not in the catalogue")))?;
    let r = svc
        .cpu(move |s| mrrec_agent::rewards::reward(&s.ws.shop(), &w, profile, target, calls))
        .await?;
    Ok(Json(json!(r)).into_response())
}

async fn healthz() -> &'static str {
    "ok"
}

/// The tenant the readiness probe reads and writes: no API key can name it (tenants have no
/// control characters), and PostgreSQL text can hold it (no NUL).
const PROBE_TENANT: &str = "\u{1}mrrec-readyz";

/// A read and a write (a build-state mark set, then cleared) on the store.
fn probe_store(store: &dyn MemoryWrite) -> anyhow::Result<()> {
    store.users(PROBE_TENANT)?;
    let mark = vec!["probe".to_string()];
    store.mark_stale(PROBE_TENANT, &mark)?;
    store.replace(
        Owner {
            tenant: PROBE_TENANT,
            user: "probe",
        },
        &[],
        &[],
        &mark,
        &[],
    )?;
    Ok(())
}

/// Ready when the store answers a read and a write and the model's server (if any) is
/// reachable; otherwise 503 with the reason of each failing check (details in the log).
async fn readyz(State(svc): State<Arc<Service>>) -> Response {
    let s = svc.clone();
    let probe = tokio::task::spawn_blocking(move || (probe_store(&*s.store), s.llm.ready())).await;
    let (store, llm) = match probe {
        Ok(r) => r,
        Err(e) => (Err(anyhow::anyhow!("probe failed: {e}")), Ok(())),
    };
    let mut checks = serde_json::Map::new();
    checks.insert(
        "store".into(),
        json!(match &store {
            Ok(()) => "ok".to_string(),
            Err(e) => {
                tracing::warn!("readiness: memory store: {e:#}");
                "the memory store fails reads or writes (details in the server log)".to_string()
            }
        }),
    );
    checks.insert(
        "llm".into(),
        json!(match &llm {
            Ok(()) => "ok".to_string(),
            Err(e) => {
                tracing::warn!("readiness: language model: {e}");
                llm_reason(e)
            }
        }),
    );
    let ready = store.is_ok() && llm.is_ok();
    // The model's id without the server address it may carry (`openai:NAME@URL`).
    let model = svc
        .llm
        .id()
        .split('@')
        .next()
        .unwrap_or_default()
        .to_string();
    let body = json!({
        "ready": ready,
        "checks": checks,
        "items": svc.ws.catalogue().len(),
        "model": model,
        "llm_in_flight": svc.llm_gate.in_flight(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(svc): State<Arc<Service>>) -> Response {
    let gauges = [
        (
            "mrrec_llm_queue_depth",
            "Answers waiting for an LLM slot.",
            svc.llm_gate.waiting.load(Ordering::SeqCst) as f64,
        ),
        (
            "mrrec_llm_in_flight",
            "Answers the LLM is working on.",
            svc.llm_gate.in_flight() as f64,
        ),
        (
            "mrrec_cpu_queue_depth",
            "CPU jobs waiting for a slot.",
            svc.cpu_gate.waiting.load(Ordering::SeqCst) as f64,
        ),
        (
            "mrrec_cpu_in_flight",
            "CPU jobs running.",
            svc.cpu_gate.in_flight() as f64,
        ),
    ];
    let mut gauges = gauges.to_vec();
    if let Some(st) = svc.batcher.as_ref().map(Batcher::stats) {
        gauges.push((
            "mrrec_llm_batches",
            "Batches of model calls decoded together (with batch_llm).",
            st.batches as f64,
        ));
        gauges.push((
            "mrrec_llm_batched_calls",
            "Model calls answered in those batches.",
            st.calls as f64,
        ));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        svc.metrics.render(&gauges),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn track(
    State(svc): State<Arc<Service>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let t = Instant::now();
    let mut resp = next.run(req).await;
    let secs = t.elapsed().as_secs_f64();
    svc.metrics.observe(&route, resp.status().as_u16(), secs);
    if let Ok(v) = HeaderValue::from_str(&format!("total;dur={:.3}", secs * 1e3)) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route (see /openapi.json)")
}

/// The app.
pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/v1/items/search", get(search))
        .route("/v1/users", get(users))
        .route("/v1/users/{user}/memory", get(memory_show))
        .route("/v1/users/{user}/interactions", post(memory_add))
        .route("/v1/users/{user}", delete(memory_forget))
        .route("/tools/memory_retrieve", post(tool_memory))
        .route("/reward", post(reward))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .route("/", get(page))
        .fallback(not_found)
        .route_layer(axum::middleware::from_fn_with_state(svc.clone(), track))
        .layer(DefaultBodyLimit::max(svc.cfg.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            svc.clone(),
            edge::edge,
        ))
        .with_state(svc)
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in flight finish for
/// at most the configured grace period, and drops the connections left (see [`listen`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    svc: Arc<Service>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = svc.cfg.conn.clone();
    let counted = svc.clone();
    listen::serve(
        listener,
        router(svc),
        limits,
        move |why| counted.metrics.reject(why),
        shutdown,
    )
    .await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: no new connections; finishing requests in flight…");
}
