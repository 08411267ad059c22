//! API errors: one JSON shape, a status per kind, the reason of an LLM failure.

use crate::*;

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
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// A refusal to retry after `wait` seconds (429 / 503 with `Retry-After`, at least 1 s).
    pub(crate) fn retry_after(
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
    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// The response to an agent error, decided by its kind: the model's failures (a cancelled
    /// answer among them) are 502 with a reason that names no server or file, a failing store is
    /// 503 (retry), anything else 500. The full error goes to the log under the request id.
    pub(crate) fn internal(e: AgentError) -> Self {
        let id = request_id().unwrap_or_default();
        match e.root() {
            AgentError::Cancelled => {
                tracing::info!(request_id = %id, "cancelled: {e}");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    "llm_error",
                    format!(
                        "{} (details in the server log)",
                        llm_reason(&LlmError::Cancelled)
                    ),
                )
            }
            AgentError::Llm(llm) => {
                tracing::warn!(request_id = %id, "language model: {e}");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    "llm_error",
                    format!("{} (details in the server log)", llm_reason(llm)),
                )
            }
            AgentError::Memory(mrrec_memory::MemoryError::Store { .. }) => {
                tracing::warn!(request_id = %id, "memory store: {e}");
                Self::retry_after(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the memory store failed (details in the server log)",
                    1.0,
                )
            }
            AgentError::Memory(_)
            | AgentError::Index(_)
            | AgentError::Embed(_)
            | AgentError::Data(_)
            | AgentError::Model(_)
            | AgentError::Io(_)
            | AgentError::Invalid(_)
            | AgentError::Context { .. } => {
                tracing::error!(request_id = %id, "internal error: {e}");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error (details in the server log)",
                )
            }
        }
    }

    /// A worker thread that died (a panic): 500, the reason logged.
    pub(crate) fn worker(e: impl std::fmt::Display) -> Self {
        let id = request_id().unwrap_or_default();
        tracing::error!(request_id = %id, "worker failed: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (details in the server log)",
        )
    }
}

/// What went wrong with the language model, in words that name no server or file.
pub(crate) fn llm_reason(e: &LlmError) -> String {
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
        // Only answer scoring is unsupported by some backends (the echo model, a server that
        // returns no log-probabilities): `rerank` needs it.
        LlmError::Unsupported(_) => "the language model cannot score answers, which `rerank` needs (a local model or a server that returns log-probabilities can)".into(),
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
