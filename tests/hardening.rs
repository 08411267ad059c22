//! Defects found by a hostile test of the CLI and the service, each reproduced first: forget
//! reaches every store and cache whatever model the server runs, and a mistyped forget is an
//! error.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PHRASE: &str = "ZEPHYRINE-4471 keeps her orchids by the north window";

/// A fresh `$MRREC_HOME` whose model files and indexes are the warm cache's (both are built
/// under locks, so sharing them is safe); every other cache starts empty.
fn fresh_home() -> tempfile::TempDir {
    let (ok, _, err) = common::mrrec(&["models", "fetch", "all-minilm-l6-v2"]);
    assert!(ok, "{err}");
    let h = tempfile::tempdir().unwrap();
    for d in ["models", "indexes"] {
        std::fs::create_dir_all(common::warm_home().join(d)).unwrap();
        std::os::unix::fs::symlink(common::warm_home().join(d), h.path().join(d)).unwrap();
    }
    h
}

fn mrrec_in(home: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(args)
        .env("MRREC_HOME", home)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A child process killed (and reaped) when the test ends, whether it passes or panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every regular file below `dir` (not following links) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            files_containing(&e.path(), needle, out);
        } else if std::fs::read(e.path())
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            out.push(e.path());
        }
    }
}

#[test]
fn a_service_forget_with_the_echo_model_cleans_every_cache_under_the_home() {
    let home = fresh_home();
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("memory.sqlite");
    let data = common::mini();
    let item = common::reviewed_items(1).remove(0);
    // The user's memory, written by the CLI (records only: no LLM).
    let reviews = work.path().join("new.jsonl");
    std::fs::write(
        &reviews,
        format!(
            "{}\n",
            serde_json::json!({"rating": 5.0, "title": "lovely", "text": PHRASE,
                "parent_asin": item, "asin": item, "user_id": "zoe", "timestamp": 1_700_000_000_000i64})
        ),
    )
    .unwrap();
    let (ok, _, err) = mrrec_in(
        home.path(),
        &[
            "memory",
            "add",
            "zoe",
            reviews.to_str().unwrap(),
            "--no-llm",
            "--max-items",
            "300",
            "--data",
            data.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    // An exchange quoting the memory entry the way the assistant's tool response does, as a CLI
    // run with a real model leaves in the shared response cache (written here through the cache
    // itself, over the instant model).
    let entry = {
        let st = mrrec_memory::SqliteStore::open(&store).unwrap();
        use mrrec_memory::MemoryRead;
        let es = st
            .entries(mrrec_memory::Owner {
                tenant: "default",
                user: "zoe",
            })
            .unwrap();
        assert_eq!(es.len(), 1);
        format!("<memory id=\"{}\">{}</memory>", es[0].id, es[0].text)
    };
    {
        let cache = mrrec_llm::CachedChatModel::open(
            mrrec_llm::EchoModel::from_id("echo").unwrap(),
            &home.path().join("cache/llm.sqlite"),
            mrrec_llm::CachePolicy::All,
        )
        .unwrap();
        let req = mrrec_llm::ChatRequest {
            messages: vec![mrrec_llm::Message::user(format!(
                "<tool_response>\n{entry}\n</tool_response>\nDescribe the ideal item."
            ))],
            ..Default::default()
        };
        use mrrec_llm::ChatModel;
        cache.chat(&req).unwrap();
    }
    let mut before = Vec::new();
    files_containing(home.path(), PHRASE.as_bytes(), &mut before);
    assert!(
        before
            .iter()
            .any(|p| p.to_string_lossy().contains("llm.sqlite")),
        "the setup wrote no cached exchange: {before:?}"
    );
    // The service runs the echo model, which it never caches.
    let key_file = work.path().join("keys.json");
    let (ok, key, err) = mrrec_in(
        home.path(),
        &[
            "keys",
            "new",
            "--tenant",
            "default",
            "--file",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args([
            "serve",
            "--model",
            "echo",
            "--max-items",
            "300",
            "--addr",
            "127.0.0.1:0",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--store")
        .arg(&store)
        .arg("--keys")
        .arg(&key_file)
        .env("MRREC_HOME", home.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = KillOnDrop(child);
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let l = lines.next().expect("server exited").unwrap();
        if let Some(rest) = l.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let resp = reqwest::blocking::Client::new()
        .delete(format!("{base}/v1/users/zoe"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["entries"], 1, "{body}");
    assert!(
        body["cached_llm_responses"].as_u64().unwrap() >= 1,
        "{body}"
    );
    assert!(body["cached_embeddings"].as_u64().unwrap() >= 1, "{body}");
    drop(child);
    // Raw bytes: no store or cache file (with its -wal/-shm) holds the phrase any more.
    let mut after = Vec::new();
    files_containing(home.path(), PHRASE.as_bytes(), &mut after);
    files_containing(work.path(), PHRASE.as_bytes(), &mut after);
    after.retain(|p| p != &reviews);
    assert!(after.is_empty(), "still holding the user's text: {after:?}");
}

#[test]
fn forgetting_an_unknown_user_is_an_error_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("memory.sqlite");
    let data = common::mini();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "memory".to_string(),
            "forget".into(),
            "no-such-user".into(),
            "--max-items".into(),
            "300".into(),
            "--data".into(),
            data.display().to_string(),
            "--store".into(),
            store.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (ok, _, err) = common::mrrec(&args(&[]));
    assert!(!ok, "a mistyped id must not pass unnoticed");
    assert!(err.contains("\"no-such-user\" has no memory"), "{err}");
    let (ok, out, err) = common::mrrec(&args(&["--missing-ok"]));
    assert!(ok, "{err}");
    assert!(out.contains("forgot no-such-user: 0 entries"), "{out}");
}

#[test]
fn sigterm_with_stalled_clients_exits_within_the_grace_period_after_the_answer_in_flight() {
    let work = tempfile::tempdir().unwrap();
    let (keys, key) = common::key_file(work.path());
    let store = work.path().join("memory.sqlite");
    let (child, base) = common::serve_with(
        store.to_str().unwrap(),
        &keys,
        None,
        "echo@400",
        &["--shutdown-grace", "3", "--header-timeout", "60"],
    );
    let mut child = KillOnDrop(child);
    let http = reqwest::blocking::Client::new();
    let item = common::reviewed_items(1).remove(0);
    let r = http
        .post(format!("{base}/v1/users/ann/interactions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"interactions": [{"parent_asin": item, "rating": 5, "text": "a soft toy", "timestamp": 5}]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Twenty clients that send half a request and stall.
    let addr = base.trim_start_matches("http://").to_string();
    let mut stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            std::io::Write::write_all(&mut c, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Partial: ")
                .unwrap();
            c
        })
        .collect();
    // An answer in flight (the slow model takes ~0.4 s per call).
    let flying = {
        let (base, key) = (base.clone(), key.clone());
        std::thread::spawn(move || {
            let r = reqwest::blocking::Client::new()
                .post(format!("{base}/v1/recommend"))
                .bearer_auth(&key)
                .json(&serde_json::json!({"user": "ann", "request": "a plush toy"}))
                .send()
                .unwrap();
            (r.status().as_u16(), r.text().unwrap())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    // SAFETY: signalling a child process we started and still own.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let (status, text) = flying.join().unwrap();
    assert_eq!(status, 200, "the answer in flight completes: {text}");
    let exited = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(8),
            "still running {:?} after SIGTERM (grace 3 s)",
            t.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(exited.success(), "{exited:?}");
    for c in &mut stalled {
        let mut buf = Vec::new();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert!(std::io::Read::read_to_end(c, &mut buf).is_ok());
    }
}
