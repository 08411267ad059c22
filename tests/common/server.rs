//! The in-process service on loopback (a slice of the mini catalogue, real MiniLM embeddings,
//! a real SQLite store) for the service tests: two tenants, their keys, and a request helper.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};

use mrrec_agent::{Workspace, WorkspaceOptions};
use mrrec_embed::TextEmbedder;
use mrrec_llm::{ChatModel, EchoModel};
use mrrec_memory::{Level, MemoryEntry, MemoryWrite, Owner, SqliteStore};
use mrrec_server::auth::{hash_key, KeyRecord, KeyRing};
use mrrec_server::{Service, ServiceConfig};
use serde_json::Value;

pub const KEY_A: &str = "key-of-acme";
pub const KEY_B: &str = "key-of-globex";
pub const SECRET: &str = "BOB-SECRET-7731 loves vintage typewriters";

pub fn workspace() -> Arc<Workspace> {
    static WS: OnceLock<Arc<Workspace>> = OnceLock::new();
    WS.get_or_init(|| {
        let mut o = WorkspaceOptions::new(super::mini());
        o.max_items = Some(300);
        Arc::new(Workspace::open(&o).unwrap())
    })
    .clone()
}

pub fn entry(ws: &Workspace, id: &str, text: &str) -> MemoryEntry {
    MemoryEntry {
        id: id.into(),
        level: Level::Record,
        category: Some("Toys & Games".into()),
        text: text.into(),
        provenance: vec![],
        embedding: ws.embedder.embed(&[text]).unwrap().remove(0),
        writer: None,
    }
}

/// Tenant acme has alice; tenant globex has bob (with a secret) — and its own "alice".
pub fn store(ws: &Workspace, dir: &std::path::Path) -> Arc<SqliteStore> {
    let s = SqliteStore::open(&dir.join("m.sqlite")).unwrap();
    s.put(
        Owner {
            tenant: "acme",
            user: "alice",
        },
        &[entry(
            ws,
            "r-1",
            "Bought \"Soft plush bunny\" (Toys & Games), rated 5/5. Review: my toddler loves it.",
        )],
    )
    .unwrap();
    for user in ["bob", "alice"] {
        s.put(
            Owner {
                tenant: "globex",
                user,
            },
            &[entry(ws, "r-9", SECRET)],
        )
        .unwrap();
    }
    Arc::new(s)
}

pub fn keys() -> KeyRing {
    KeyRing::from_records(&[
        KeyRecord {
            name: "a".into(),
            tenant: "acme".into(),
            sha256: hash_key(KEY_A),
        },
        KeyRecord {
            name: "b".into(),
            tenant: "globex".into(),
            sha256: hash_key(KEY_B),
        },
    ])
    .unwrap()
}

pub struct Server {
    pub base: String,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
    pub svc: Arc<Service>,
    pub dir: tempfile::TempDir,
}

pub async fn start_with(llm: Arc<dyn ChatModel>, cfg: ServiceConfig) -> Server {
    start_on(llm, cfg, store).await
}

/// [`start_with`] on the store `make` builds (from the workspace, in the server's folder).
pub async fn start_on<S: MemoryWrite + Send + Sync + 'static>(
    llm: Arc<dyn ChatModel>,
    cfg: ServiceConfig,
    make: impl FnOnce(&Workspace, &std::path::Path) -> Arc<S> + Send + 'static,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ws = tokio::task::spawn_blocking(workspace).await.unwrap();
    let st = {
        let ws = ws.clone();
        let p = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || make(&ws, &p))
            .await
            .unwrap()
    };
    let svc = Service::new(ws, st, llm.into(), None, keys(), cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(mrrec_server::serve(listener, svc.clone(), async {
        let _ = rx.await;
    }));
    Server {
        base,
        stop: Some(tx),
        done,
        svc,
        dir,
    }
}

pub async fn start() -> Server {
    start_with(
        Arc::new(EchoModel::from_id("echo").unwrap()),
        ServiceConfig {
            rate_per_key: 0.0,
            // These tests send wrong keys on purpose; the per-address limit on failed
            // authentications has its own test.
            auth_failures_per_second: 0.0,
            ..Default::default()
        },
    )
    .await
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn call(
    c: &reqwest::Client,
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut r = match method {
        "GET" => c.get(url),
        "POST" => c.post(url),
        "DELETE" => c.delete(url),
        _ => unreachable!(),
    };
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}
