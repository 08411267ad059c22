//! `mrrec serve`: the assistant as an HTTP service (axum), one app for builders and trainers.
//!
//! Routes (documented in `openapi.json`, served at `/openapi.json`):
//! - `POST /v1/recommend` — `{user, request, k?, category?, method?, mode?, rerank?, stream?}`;
//!   JSON answer (items, scores, trace, timing), or with `stream: true` server-sent events as the
//!   assistant works (`aspects`, `call`, `text`, `tool_call`, `profile`, `items`, `done`,
//!   `error`); `rerank: {depth?, weight?, memory?}` has the model judge the method's first items;
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
mod config;
mod edge;
mod error;
pub mod listen;
pub mod llm;
pub mod metrics;
mod routes;
mod state;

pub use config::*;
pub use error::*;
pub use routes::*;
pub use state::*;

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
use mrrec_llm::{Cancel, Cancellable, ChatModel, LlmError};
use mrrec_llm_local::Batcher;
use mrrec_memory::{Level, MemoryWrite, Owner};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use auth::{check_id, KeyRing, Principal, RateLimiter};
use edge::{request_id, REQUEST_ID};
use metrics::Metrics;
use mrrec_agent::assistant::{Answer, Assistant, AssistantConfig, Event, Mode};
use mrrec_agent::{AgentError, Workspace};

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
