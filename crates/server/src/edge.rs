//! The outermost middleware of the service (see [`edge`]): the request id every error carries,
//! the per-key cap on requests in flight, the body read under its timeout, and the JSON shape of
//! every error response.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{auth, ApiError, Service};

tokio::task_local! {
    /// The id of the request being served (set by the `edge` middleware).
    pub(super) static REQUEST_ID: String;
}

/// The id of the request this task serves, if any.
pub(super) fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A fresh request id (16 hex digits).
fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A client's `X-Request-Id` worth keeping: 1–64 of `[A-Za-z0-9._-]`.
fn client_request_id(req: &Request) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| v.to_string())
}

/// The outermost middleware: gives every request an id (the client's `X-Request-Id` when
/// valid, else a new one; echoed in the response and in every error body), caps the requests
/// in flight per presented key, reads the body within `body_timeout`, and gives every error
/// response the JSON shape (axum's own 405s and plain-text rejections included).
pub(super) async fn edge(State(svc): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let id = client_request_id(&req).unwrap_or_else(new_request_id);
    let mut resp = REQUEST_ID
        .scope(id.clone(), async move {
            let resp = edge_inner(&svc, req, next).await;
            json_errors(resp).await
        })
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn edge_inner(svc: &Arc<Service>, req: Request, next: Next) -> Response {
    let key = {
        let values = |name: header::HeaderName| -> Vec<&[u8]> {
            req.headers()
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        };
        auth::presented_key(
            &values(header::AUTHORIZATION),
            &values(header::HeaderName::from_static("x-api-key")),
        )
    };
    let slot = match key {
        Ok(Some(k)) => match InFlight::take(svc, auth::hash_key(&k)) {
            Some(slot) => Some(slot),
            None => {
                svc.metrics.reject("key_in_flight");
                return ApiError::retry_after(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_in_flight",
                    format!(
                        "more than {} requests in flight with this key",
                        svc.cfg.conn.max_in_flight_per_key
                    ),
                    1.0,
                )
                .into_response();
            }
        },
        // Bad credentials are refused by the route's `Caller`, with the reason.
        _ => None,
    };
    let (parts, body) = req.into_parts();
    let limit = svc.cfg.max_body_bytes;
    let read = tokio::time::timeout(svc.cfg.conn.body_timeout, axum::body::to_bytes(body, limit));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body is over {limit} bytes"),
                )
            } else {
                ApiError::bad(format!("the body could not be read: {e}"))
            }
            .into_response();
        }
        Err(_) => {
            svc.metrics.reject("body_timeout");
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {:.0?}",
                    svc.cfg.conn.body_timeout
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    let resp = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    match slot {
        // The slot is held until the response body (an event stream too) is done or dropped.
        Some(slot) => resp.map(|b| {
            axum::body::Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                let _ = &slot;
                f
            }))
        }),
        None => resp,
    }
}

/// Requests in flight for one key hash; the place is given back on drop.
struct InFlight {
    svc: Arc<Service>,
    key: String,
}

impl InFlight {
    fn take(svc: &Arc<Service>, key: String) -> Option<InFlight> {
        let mut m = svc.key_in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= svc.cfg.conn.max_in_flight_per_key {
            return None;
        }
        *n += 1;
        Some(InFlight {
            svc: svc.clone(),
            key,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self
            .svc
            .key_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// An error response that is not JSON (axum's 405 with an empty body, its plain-text
/// rejections) rewritten in the JSON error shape; every other response as it is.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
