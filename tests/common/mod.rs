//! Helpers shared by the CLI tests.

#![allow(dead_code)]

pub mod server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The real mini dataset (`MRREC_SHARED` overrides `../shared`).
pub fn mini() -> PathBuf {
    std::env::var_os("MRREC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
        .join("data/amazon23-mini")
}

/// The warm cache root (`$MRREC_HOME`, else `~/.cache/mrrec`) whose model files a cold home
/// may link to.
pub fn warm_home() -> PathBuf {
    std::env::var_os("MRREC_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/mrrec")
        })
}

/// Runs the binary: (success, stdout, stderr).
pub fn mrrec<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The sorted user ids of the mini dataset's reviews.
pub fn users() -> Vec<String> {
    let reviews = std::fs::read_to_string(mini().join("reviews.jsonl")).unwrap();
    let mut users: Vec<String> = reviews
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["user_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    users.sort();
    users.dedup();
    users
}

/// A key file in `dir` with one key for tenant `shop` (made by `mrrec keys new`): (path, key).
pub fn key_file(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let path = dir.join("keys.json");
    let out = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args([
            "keys",
            "new",
            "--tenant",
            "shop",
            "--name",
            "crash-test",
            "--file",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("mrk_"));
    (path, key)
}

/// Starts `mrrec serve` with the echo model on a 300-item slice, the store in `dir` and the
/// key file `keys`; returns it and its base URL (read from its log line).
pub fn serve(
    dir: &std::path::Path,
    keys: &std::path::Path,
    failpoint: Option<usize>,
) -> (Child, String) {
    serve_store(
        &dir.join("memory.sqlite").display().to_string(),
        keys,
        failpoint,
    )
}

/// [`serve`] on any store location (a SQLite file or a `postgres://` URL).
pub fn serve_store(
    store: &str,
    keys: &std::path::Path,
    failpoint: Option<usize>,
) -> (Child, String) {
    serve_with(store, keys, failpoint, "echo", &[])
}

/// [`serve_store`] with another model (`echo@MS`: a slow instant model) and more flags.
pub fn serve_with(
    store: &str,
    keys: &std::path::Path,
    failpoint: Option<usize>,
    model: &str,
    extra: &[&str],
) -> (Child, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mrrec"));
    c.args([
        "serve",
        "--model",
        model,
        "--max-items",
        "300",
        "--addr",
        "127.0.0.1:0",
    ])
    .args(extra)
    .arg("--data")
    .arg(mini())
    .arg("--store")
    .arg(store)
    .arg("--keys")
    .arg(keys)
    .args(["--rate-per-key", "0"])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(n) = failpoint {
        c.env("MRREC_FAILPOINT", n.to_string());
    }
    let mut child = c.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let l = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(rest) = l.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, base)
}

/// The first `n` distinct items of the mini dataset's reviews (all in any catalogue slice).
pub fn reviewed_items(n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(mini().join("reviews.jsonl")).unwrap();
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let a = v["parent_asin"].as_str().unwrap().to_string();
        if !out.contains(&a) {
            out.push(a);
        }
        if out.len() == n {
            break;
        }
    }
    out
}
