//! Helpers shared by the CLI tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The real mini dataset (`MRREC_SHARED` overrides `../shared`).
pub fn mini() -> PathBuf {
    std::env::var_os("MRREC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
        .join("data/amazon23-mini")
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
