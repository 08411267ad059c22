//! Several processes on a cold `$MRREC_HOME` at once (parallel test processes, `eval` beside
//! `serve` on a fresh machine): every artefact is built once, atomically, and shared.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn tree(dir: &Path, out: &mut Vec<String>, root: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if p.is_dir() {
            tree(&p, out, root);
        }
        out.push(rel);
    }
}

#[test]
fn processes_opening_one_new_catalogue_at_once_all_succeed_with_identical_indexes() {
    // The embedder's files come from the warm cache (fetched there once, under its own lock);
    // indexes, the embedding cache and everything else start empty.
    let (ok, _, err) = common::mrrec(&["models", "fetch", "all-minilm-l6-v2"]);
    assert!(ok, "{err}");
    let cold = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::warm_home().join("models"),
        cold.path().join("models"),
    )
    .unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_mrrec"))
                .args(["search", "--max-items", "150", "-k", "5", "--data"])
                .arg(common::mini())
                .arg("a soft plush toy for a toddler")
                .env("MRREC_HOME", cold.path())
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(
            o.status.success(),
            "a process failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let first = String::from_utf8_lossy(&outs[0].stdout).to_string();
    assert!(first.lines().count() >= 5, "{first}");
    for o in &outs[1..] {
        assert_eq!(String::from_utf8_lossy(&o.stdout), first);
    }
    // One index folder per kind, complete, and no temporary folder left behind.
    let mut files = Vec::new();
    tree(
        &cold.path().join("indexes"),
        &mut files,
        &cold.path().join("indexes"),
    );
    assert!(
        !files
            .iter()
            .any(|f| f.contains(".tmp-") || f.contains(".old-")),
        "{files:?}"
    );
    let exact: Vec<_> = files.iter().filter(|f| f.ends_with("/exact")).collect();
    assert_eq!(exact.len(), 1, "{files:?}");
    assert!(files.iter().any(|f| f.ends_with("exact/vectors.f32")));
    assert!(files.iter().any(|f| f.ends_with("bm25/index.kind")));
    // A later process reuses them as they are.
    let again = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(["search", "--max-items", "150", "-k", "5", "--data"])
        .arg(common::mini())
        .arg("a soft plush toy for a toddler")
        .env("MRREC_HOME", cold.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), first);
}
