//! What a slow or hostile client meets (each found by a hostile test of the service first):
//! stalled connections are closed while others are served, connection caps refuse cleanly,
//! shutdown drops what is left after its grace period, one request presents one credential,
//! failed authentications are limited per address, readiness reflects the store and the model
//! server, and every error is JSON with a request id that names no file or server.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::*;
use mrrec_llm::EchoModel;
use mrrec_memory::{
    BuildCost, Forgotten, GlobalAspect, Level, MemoryEntry, MemoryError, MemoryRead, MemoryStats,
    MemoryWrite, Owner, QueryAspects, Retrieved, SqliteStore,
};
use mrrec_server::{ConnLimits, ServiceConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn echo() -> Arc<dyn mrrec_llm::ChatModel> {
    Arc::new(EchoModel::from_id("echo").unwrap())
}

fn limits(header: f64, body: f64) -> ConnLimits {
    ConnLimits {
        header_timeout: Duration::from_secs_f64(header),
        body_timeout: Duration::from_secs_f64(body),
        ..Default::default()
    }
}

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (`None` if it is still open after `wait`).
async fn until_closed(c: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(wait, c.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).to_string()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_in_time_while_other_clients_are_served() {
    let s = start_with(
        echo(),
        ServiceConfig {
            rate_per_key: 0.0,
            conn: limits(1.0, 1.0),
            ..Default::default()
        },
    )
    .await;
    let a = addr(&s);
    let mut stalled = Vec::new();
    for i in 0..30 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        match i % 3 {
            0 => {} // connects and says nothing
            1 => c
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Partial: ")
                .await
                .unwrap(),
            _ => c
                .write_all(
                    format!(
                        "POST /v1/users/u/interactions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"interactions\": ["
                    )
                    .as_bytes(),
                )
                .await
                .unwrap(),
        }
        stalled.push(c);
    }
    // Meanwhile other clients are served.
    let c = client();
    for _ in 0..10 {
        let (status, _) = call(&c, "GET", &format!("{}/healthz", s.base), None, None).await;
        assert_eq!(status, 200);
    }
    // An idle keep-alive connection is closed too, after a request it was served.
    let mut idle = TcpStream::connect(&a).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    for (i, mut c) in stalled.into_iter().enumerate() {
        let got = until_closed(&mut c, Duration::from_secs(20)).await;
        let got =
            got.unwrap_or_else(|| panic!("connection {i} still open after {:?}", t.elapsed()));
        if i % 3 == 2 {
            // A partial body gets its answer: 408, in the JSON shape, then the close.
            assert!(got.starts_with("HTTP/1.1 408"), "{got}");
            assert!(got.contains("\"body_timeout\""), "{got}");
        }
    }
    let got = until_closed(&mut idle, Duration::from_secs(20)).await;
    assert!(got.unwrap().starts_with("HTTP/1.1 200"));
    // A new connection: the client's pooled one has been idle past the 1 s header timeout, and
    // the server may close it just as the client reuses it (seen on a loaded machine as
    // `IncompleteMessage`), which is the server doing its job, not what this line checks.
    let fresh = reqwest::Client::new();
    let (_, m) = call(&fresh, "GET", &format!("{}/metrics", s.base), None, None).await;
    assert!(
        m.contains("mrrec_rejected_total{reason=\"body_timeout\"} 10"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_caps_get_a_json_503_and_are_closed() {
    let s = start_with(
        echo(),
        ServiceConfig {
            rate_per_key: 0.0,
            conn: ConnLimits {
                max_connections_per_client: 4,
                ..limits(30.0, 30.0)
            },
            ..Default::default()
        },
    )
    .await;
    let a = addr(&s);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&a).await.unwrap());
    }
    // Give the server the moment to admit them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&a).await.unwrap();
    let got = until_closed(&mut extra, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(
        got.contains("too many open connections from this address"),
        "{got}"
    );
    assert!(got.to_ascii_lowercase().contains("retry-after: 1"), "{got}");
    // One place freed, a request goes through again.
    drop(held.pop());
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.get(format!("{}/healthz", s.base)).send().await {
            Ok(r) if r.status() == 200 => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("not served after a place was freed: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_answers_in_flight_and_drops_stalled_clients_after_the_grace() {
    let grace = Duration::from_secs(3);
    let mut s = start_with(
        Arc::new(EchoModel::from_id("echo@300").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            conn: ConnLimits {
                shutdown_grace: grace,
                ..limits(60.0, 60.0)
            },
            ..Default::default()
        },
    )
    .await;
    let a = addr(&s);
    // Stalled clients that no timeout closes before the grace ends.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Partial: ")
            .await
            .unwrap();
        stalled.push(c);
    }
    let c = client();
    let url = format!("{}/v1/recommend", s.base);
    let flying = tokio::spawn(async move {
        let r = c
            .post(&url)
            .bearer_auth(KEY_A)
            .json(&json!({"user": "alice", "request": "a plush bunny"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    s.stop.take().unwrap().send(()).unwrap();
    let (status, text) = flying.await.unwrap();
    assert_eq!(status, 200, "{text}");
    tokio::time::timeout(grace + Duration::from_secs(3), &mut s.done)
        .await
        .expect("the server exits within its grace period")
        .unwrap()
        .unwrap();
    assert!(
        t.elapsed() < grace + Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    for mut c in stalled {
        assert!(until_closed(&mut c, Duration::from_secs(2)).await.is_some());
    }
}

async fn raw_get(s: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut r = client().get(format!("{}{path}", s.base));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_presents_one_credential_and_failed_logins_are_limited() {
    let s = start_with(
        echo(),
        ServiceConfig {
            rate_per_key: 0.0,
            auth_failure_burst: 5.0,
            auth_failures_per_second: 0.5,
            ..Default::default()
        },
    )
    .await;
    // The scheme in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (status, v) = raw_get(
            &s,
            "/v1/users",
            &[("authorization", &format!("{scheme} {KEY_A}"))],
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["tenant"], "acme");
    }
    // The same key twice is fine; two keys of two tenants are refused, never one of them served.
    let (status, _) = raw_get(
        &s,
        "/v1/users",
        &[
            ("authorization", &format!("Bearer {KEY_A}")),
            ("x-api-key", KEY_A),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = raw_get(
        &s,
        "/v1/users",
        &[
            ("authorization", &format!("Bearer {KEY_B}")),
            ("x-api-key", KEY_A),
        ],
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_credentials");
    // A non-Bearer Authorization does not fall through to X-API-Key.
    let (status, v) = raw_get(
        &s,
        "/v1/users",
        &[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("x-api-key", KEY_A),
        ],
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"Basic\""),
        "{v}"
    );
    // That was 2 failures; 3 more bad keys fill the burst of 5, then the address waits.
    for _ in 0..3 {
        let (status, _) = raw_get(&s, "/v1/users", &[("x-api-key", "wrong")]).await;
        assert_eq!(status, 401);
    }
    let (status, v) = raw_get(&s, "/v1/users", &[("x-api-key", "wrong")]).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "auth_rate_limited");
    // Even a good key waits out the address's penalty (a guesser cannot tell a hit).
    let (status, _) = raw_get(&s, "/v1/users", &[("x-api-key", KEY_A)]).await;
    assert_eq!(status, 429);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = raw_get(&s, "/v1/users", &[("x-api-key", KEY_A)]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_a_request_id_and_names_no_file() {
    let s = start().await;
    // axum's own 405 (an empty body before) and a percent-escape that is not UTF-8 (plain text
    // before).
    let resp = client()
        .put(format!("{}/v1/recommend", s.base))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert!(resp.headers().get("allow").is_some());
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed");
    assert_eq!(v["error"]["request_id"], id.as_str());
    let (status, v) = raw_get(&s, "/v1/users/%FF/memory", &[("x-api-key", KEY_A)]).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_request");
    // A client's request id is kept.
    let (_, v) = raw_get(
        &s,
        "/nope",
        &[("x-request-id", "trace-42.a_b"), ("x-api-key", KEY_A)],
    )
    .await;
    assert_eq!(v["error"]["request_id"], "trace-42.a_b");
}

/// A SQLite store whose writes fail while `broken` is set (a full disk, a lost volume).
struct BreakableStore {
    inner: SqliteStore,
    broken: AtomicBool,
}

impl BreakableStore {
    fn check(&self) -> mrrec_memory::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(MemoryError::Store {
                path: "/secret/volume/memory.sqlite".into(),
                message: "disk I/O error".into(),
            });
        }
        Ok(())
    }
}

impl MemoryRead for BreakableStore {
    fn entries(&self, o: Owner<'_>) -> mrrec_memory::Result<Vec<MemoryEntry>> {
        self.inner.entries(o)
    }
    fn retrieve(
        &self,
        o: Owner<'_>,
        q: &[f32],
        k: usize,
        l: &[Level],
    ) -> mrrec_memory::Result<Vec<Retrieved>> {
        self.inner.retrieve(o, q, k, l)
    }
    fn users(&self, t: &str) -> mrrec_memory::Result<Vec<String>> {
        self.inner.users(t)
    }
    fn stats(&self, t: &str) -> mrrec_memory::Result<MemoryStats> {
        self.inner.stats(t)
    }
    fn global_aspects(&self, t: &str, c: Option<&str>) -> mrrec_memory::Result<Vec<GlobalAspect>> {
        self.inner.global_aspects(t, c)
    }
    fn query_aspects(&self, t: &str, c: Option<&str>) -> mrrec_memory::Result<Vec<QueryAspects>> {
        self.inner.query_aspects(t, c)
    }
    fn stale(
        &self,
        t: &str,
        p: Option<mrrec_memory::StaleKind>,
    ) -> mrrec_memory::Result<Vec<mrrec_memory::Stale>> {
        self.inner.stale(t, p)
    }
}

impl MemoryWrite for BreakableStore {
    fn replace(
        &self,
        o: Owner<'_>,
        r: &[String],
        p: &[MemoryEntry],
        d: &[mrrec_memory::Stale],
        m: &[mrrec_memory::Stale],
    ) -> mrrec_memory::Result<()> {
        self.check()?;
        self.inner.replace(o, r, p, d, m)
    }
    fn mark_stale(&self, t: &str, k: &[mrrec_memory::Stale]) -> mrrec_memory::Result<()> {
        self.check()?;
        self.inner.mark_stale(t, k)
    }
    fn add_cost(&self, t: &str, c: &BuildCost) -> mrrec_memory::Result<()> {
        self.check()?;
        self.inner.add_cost(t, c)
    }
    fn put_query_aspects(&self, t: &str, r: &[QueryAspects]) -> mrrec_memory::Result<()> {
        self.check()?;
        self.inner.put_query_aspects(t, r)
    }
    fn put_global(&self, t: &str, c: &str, a: &[GlobalAspect]) -> mrrec_memory::Result<()> {
        self.check()?;
        self.inner.put_global(t, c, a)
    }
    fn forget(&self, o: Owner<'_>) -> mrrec_memory::Result<Forgotten> {
        self.check()?;
        self.inner.forget(o)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reflects_failing_store_writes_and_an_unreachable_model_server() {
    let shared: Arc<std::sync::OnceLock<Arc<BreakableStore>>> = Default::default();
    let keep = shared.clone();
    let s = start_on(echo(), ServiceConfig::default(), move |ws, dir| {
        let st = store(ws, dir);
        drop(st);
        let b = Arc::new(BreakableStore {
            inner: SqliteStore::open(&dir.join("m.sqlite")).unwrap(),
            broken: AtomicBool::new(false),
        });
        let _ = keep.set(b.clone());
        b
    })
    .await;
    let st = shared.get().unwrap().clone();
    let (status, v) = raw_get(&s, "/readyz", &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["checks"], json!({"store": "ok", "llm": "ok"}));
    st.broken.store(true, Ordering::SeqCst);
    let (status, v) = raw_get(&s, "/readyz", &[]).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["ready"], false);
    assert!(
        v["checks"]["store"].as_str().unwrap().contains("fails"),
        "{v}"
    );
    assert!(!v.to_string().contains("/secret/volume"), "{v}");
    // A write through the API fails the same way, opaquely.
    let (status, text) = call(
        &client(),
        "DELETE",
        &format!("{}/v1/users/alice", s.base),
        Some(KEY_A),
        None,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(
        !text.contains("/secret/volume") && text.contains("request_id"),
        "{text}"
    );
    st.broken.store(false, Ordering::SeqCst);
    let (status, _) = raw_get(&s, "/readyz", &[]).await;
    assert_eq!(status, 200);

    // A model server nobody listens on: not ready, with the reason, without its address.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let llm: Arc<dyn mrrec_llm::ChatModel> = Arc::new(
        tokio::task::spawn_blocking(move || {
            let mut cfg = mrrec_llm::OpenAiConfig::new(&url, "m");
            cfg.timeout = Duration::from_secs(2);
            mrrec_llm::OpenAiModel::new(cfg).unwrap()
        })
        .await
        .unwrap(),
    );
    let s2 = start_with(llm, ServiceConfig::default()).await;
    let (status, v) = raw_get(&s2, "/readyz", &[]).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["checks"]["store"], "ok");
    assert!(
        v["checks"]["llm"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{v}"
    );
    assert!(!v.to_string().contains(&port.to_string()), "{v}");
}
