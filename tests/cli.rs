//! The `mrrec` binary end to end on a slice of the real data: the README's main command, eval
//! resume, compare, and clear errors.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn mini() -> PathBuf {
    std::env::var_os("MRREC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
        .join("data/amazon23-mini")
}

fn mrrec(args: &[&str]) -> (bool, String, String) {
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

fn parse_cell(table: &str, row: &str, col: usize) -> f64 {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {row} |")))
        .unwrap_or_else(|| panic!("no row {row} in\n{table}"));
    let cell = line.split('|').nth(col + 1).unwrap().trim();
    cell.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn demo_on_a_slice_prints_the_table_for_every_baseline_and_field() {
    let out = tempfile::tempdir().unwrap();
    let data = mini();
    let (ok, stdout, stderr) = mrrec(&[
        "demo",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "1500",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Example request:"), "{stdout}");
    for m in ["bm25", "dense", "hybrid"] {
        for f in ["simple_query", "query"] {
            let row = format!("{m} ({f})");
            let n100 = parse_cell(&stdout, &row, 3);
            assert!(n100 > 0.1 && n100 <= 1.0, "{row}: N@100 {n100}\n{stdout}");
            assert!(out.path().join(format!("{m}-{f}/metrics.json")).exists());
            assert!(out.path().join(format!("{m}-{f}/recall.svg")).exists());
        }
    }
    // Dense beats BM25 on the C4-style query (as the data README's baselines show).
    assert!(
        parse_cell(&stdout, "dense (query)", 3) > parse_cell(&stdout, "bm25 (query)", 3),
        "{stdout}"
    );
    // per_query.jsonl has one line per val query.
    let pq = std::fs::read_to_string(out.path().join("dense-query/per_query.jsonl")).unwrap();
    assert_eq!(pq.lines().count(), 62);
    // Compare two finished runs.
    let (ok, table, stderr) = mrrec(&[
        "compare",
        out.path().join("dense-query").to_str().unwrap(),
        out.path().join("bm25-query").to_str().unwrap(),
        "--rounds",
        "300",
    ]);
    assert!(ok, "{stderr}");
    assert!(table.contains("| N@100 |"), "{table}");
    // Rerunning the demo resumes every run instead of recomputing.
    let (ok, stdout2, stderr) = mrrec(&[
        "demo",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "1500",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        parse_cell(&stdout, "hybrid (simple_query)", 3),
        parse_cell(&stdout2, "hybrid (simple_query)", 3)
    );
}

#[test]
fn eval_refuses_aspect_queries_and_unknown_methods() {
    let data = mini();
    let out = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = mrrec(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "200",
        "--method",
        "bm25",
        "--split",
        "aspect",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("`aspect` queries cannot be evaluated"),
        "{stderr}"
    );
    let (ok, _, stderr) = mrrec(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "200",
        "--method",
        "magic",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown method \"magic\"; available: bm25, dense, hybrid"),
        "{stderr}"
    );
}

#[test]
fn a_missing_data_directory_says_how_to_point_at_real_data() {
    let (ok, _, stderr) = mrrec(&["demo", "--data", "/nonexistent/amazon"]);
    assert!(!ok);
    assert!(
        stderr.contains("data directory /nonexistent/amazon not found"),
        "{stderr}"
    );
    assert!(stderr.contains("Amazon-C4"), "{stderr}");
}

#[test]
fn search_ranks_an_items_own_title_first_with_every_index() {
    let data = mini();
    for index in ["exact", "hnsw"] {
        for method in ["dense", "bm25", "hybrid"] {
            let (ok, stdout, stderr) = mrrec(&[
                "search",
                "--data",
                data.to_str().unwrap(),
                "--max-items",
                "300",
                "--dense-index",
                index,
                "--method",
                method,
                "-k",
                "3",
                "Angela's Ashes [DVD]. Category: Movies & TV",
            ]);
            assert!(ok, "{stderr}");
            let first = stdout.lines().next().unwrap_or_default();
            assert!(first.contains("0792163087"), "{index}/{method}: {stdout}");
        }
    }
    let (ok, _, stderr) = mrrec(&[
        "search",
        "--data",
        data.to_str().unwrap(),
        "--dense-index",
        "fancy",
        "x",
    ]);
    assert!(!ok);
    assert!(stderr.contains("unknown dense index \"fancy\""), "{stderr}");
}

#[test]
fn memory_build_show_retrieve_forget() {
    let data = mini();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--data",
                data.to_str().unwrap(),
                "--max-items",
                "300",
                "--store",
                store.to_str().unwrap(),
            ]
            .map(String::from),
        );
        v
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        mrrec(&refs)
    };
    let (ok, out, err) = run(args(&["memory", "build", "--users", "5"]));
    assert!(ok, "{err}");
    assert!(out.starts_with("5 users, "), "{out}");
    let (ok, stats, _) = run(args(&["memory", "stats"]));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["users"], 5);
    let first_user = {
        let reviews = std::fs::read_to_string(data.join("reviews.jsonl")).unwrap();
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
        users[0].clone()
    };
    let (ok, shown, err) = run(args(&["memory", "show", &first_user]));
    assert!(ok, "{err}");
    assert!(
        shown
            .lines()
            .all(|l| l.starts_with("[r-") && l.contains(" record ")),
        "{shown}"
    );
    let (ok, got, err) = run(args(&[
        "memory",
        "retrieve",
        &first_user,
        "something I liked",
        "-k",
        "2",
    ]));
    assert!(ok, "{err}");
    assert_eq!(got.lines().count(), 2.min(shown.lines().count()));
    // Another user's id sees nothing of the first user's.
    let (ok, _, err) = run(args(&["memory", "retrieve", "NOBODY", "something I liked"]));
    assert!(!ok);
    assert!(err.contains("no memory for user \"NOBODY\""), "{err}");
    let (ok, out, _) = run(args(&["memory", "forget", &first_user]));
    assert!(ok);
    assert!(
        out.starts_with(&format!("removed {} entries", shown.lines().count())),
        "{out}"
    );
    let (ok, _, err) = run(args(&["memory", "show", &first_user]));
    assert!(!ok && err.contains("no memory for user"), "{err}");
}

#[test]
fn memory_build_writes_patterns_and_a_profile_with_the_tiny_model() {
    let data = mini();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let (ok, out, err) = mrrec(&[
        "memory",
        "build",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "300",
        "--store",
        store.to_str().unwrap(),
        "--users",
        "1",
        "--levels",
        "records,patterns,profile",
        "--model",
        "smollm2-135m-instruct",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("faithfulness: "), "{out}");
    assert!(out.contains("tokens in"), "{out}");
    let (ok, stats, _) = mrrec(&[
        "memory",
        "stats",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "300",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    for level in ["record", "pattern", "profile"] {
        assert!(
            v["entries"][level].as_u64().unwrap_or(0) >= 1,
            "{level}: {stats}"
        );
    }
}
