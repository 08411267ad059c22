//! Test support (feature `testing`): races between processes, which threads of one process do
//! not reproduce (SQLite's file locks are per process).
#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// In a copy started by [`race_copies`], the file the copy works on; `None` in a normal run.
pub fn raced_file(env_var: &str) -> Option<PathBuf> {
    std::env::var_os(env_var).map(PathBuf::from)
}

/// `rounds` times: starts `n` copies of the running test binary at once, each running only the
/// test named `child_test` with `env_var` set to a new file `name` in a fresh directory (the
/// child test reads it with [`raced_file`] and returns at once in a normal run), waits for all of
/// them, panics naming the round and the copy if one failed (with its stderr), then calls
/// `check(file, round)`.
pub fn race_copies(
    child_test: &str,
    env_var: &str,
    name: &str,
    rounds: usize,
    n: usize,
    mut check: impl FnMut(&Path, usize),
) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
    for round in 0..rounds {
        let dir = std::env::temp_dir().join(format!(
            "mrrec-race-{}-{round}-{}",
            std::process::id(),
            name.replace('/', "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("new").join(name);
        let children: Vec<_> = (0..n)
            .map(|i| {
                Command::new(&exe)
                    .args(["--exact", child_test, "--test-threads", "1", "--nocapture"])
                    .env(env_var, &file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("round {round}, copy {i}: {e}"))
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c
                .wait_with_output()
                .unwrap_or_else(|e| panic!("round {round}, copy {i}: {e}"));
            assert!(
                out.status.success(),
                "round {round}, copy {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        check(&file, round);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
