//! Operations: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, the web page, and the
//! middleware that counts and times every request.

use crate::*;

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// The tenant the readiness probe reads and writes: no API key can name it (tenants have no
/// control characters), and PostgreSQL text can hold it (no NUL).
pub(crate) const PROBE_TENANT: &str = "\u{1}mrrec-readyz";

/// A read and a write (a build-state mark set, then cleared) on the store.
pub(crate) fn probe_store(store: &dyn MemoryWrite) -> Result<(), mrrec_memory::MemoryError> {
    store.users(PROBE_TENANT)?;
    let mark = vec![mrrec_memory::Stale::global("probe")];
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
pub(crate) async fn readyz(State(svc): State<Arc<Service>>) -> Response {
    let s = svc.clone();
    let probe = tokio::task::spawn_blocking(move || (probe_store(&*s.store), s.llm.ready())).await;
    let (store, llm) = match probe {
        Ok(r) => r,
        Err(e) => (
            Err(mrrec_memory::MemoryError::Store {
                path: String::new(),
                message: format!("probe failed: {e}"),
            }),
            Ok(()),
        ),
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

pub(crate) async fn metrics_text(State(svc): State<Arc<Service>>) -> Response {
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

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub(crate) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

pub(crate) async fn track(
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

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route (see /openapi.json)")
}
