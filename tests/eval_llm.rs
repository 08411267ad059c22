//! Every LLM method runs from `mrrec eval` (real tiny model, real users, a seeded subset), and
//! `mrrec report` builds the paper's table from the real run folders.

#![allow(clippy::unwrap_used)]

mod common;

use common::{mini, mrrec};

#[test]
fn every_llm_method_runs_from_eval_and_the_report_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let data = mini();
    let base = |extra: &[&str]| -> Vec<String> {
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
    // Record memory for the val users (no LLM needed).
    let (ok, _, err) = mrrec(&base(&["memory", "build", "--for-split", "val"]));
    assert!(ok, "{err}");
    let mut dirs = Vec::new();
    for method in [
        "dense",
        "llm-rewrite",
        "naive-memory",
        "static-memory",
        "mrrec",
        "mrrec-no-global",
        "mrrec-no-local",
        "mrrec-records-only",
        "mrrec-patterns-only",
        "mrrec-profile-only",
    ] {
        let out = dir.path().join(method);
        let (ok, stdout, err) = mrrec(&base(&[
            "eval",
            "--method",
            method,
            "--limit",
            "2",
            "--model",
            "smollm2-135m-instruct",
            "--out",
            out.to_str().unwrap(),
        ]));
        assert!(ok, "{method}: {err}");
        // Only records were built: a method that reads patterns or profiles is told (and the
        // run records) that its users' memory is incomplete; one reading records alone or no
        // stored memory is not.
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        let coverage = run["provenance"]["memory_coverage"].as_str();
        let incomplete = run["provenance"]["memory_incomplete"].as_str();
        match method {
            "dense" | "llm-rewrite" | "naive-memory" | "mrrec-no-local" => {
                assert_eq!((coverage, incomplete), (None, None), "{method}");
                assert!(!err.contains("warning:"), "{method}: {err}");
            }
            "mrrec-records-only" => {
                assert_eq!(
                    coverage,
                    Some("2 users: 2 with the memory read, 0 without records, 0 without up-to-date patterns/profile")
                );
                assert_eq!(incomplete, Some("0"));
                assert!(!err.contains("warning:"), "{method}: {err}");
            }
            _ => {
                assert_eq!(
                    coverage,
                    Some("2 users: 0 with the memory read, 0 without records, 2 without up-to-date patterns/profile"),
                    "{method}"
                );
                assert_eq!(incomplete, Some("2"), "{method}");
                assert!(
                    err.contains(&format!("warning: {method}@guided on val: the memory of 2 of 2 users is missing or out of date"))
                        && err.contains("mrrec memory build --for-split val --levels records,patterns,profile"),
                    "{method}: {err}"
                );
            }
        }
        if method != "dense" {
            assert!(
                stdout.contains(&format!("| {method}@guided (simple_query) |")),
                "{stdout}"
            );
            assert!(stdout.contains("LLM: "), "{stdout}");
            let per_query = std::fs::read_to_string(out.join("per_query.jsonl")).unwrap();
            assert_eq!(per_query.lines().count(), 2);
            for l in per_query.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["trace"]["mode"], "guided", "{l}");
                assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
            }
        }
        dirs.push(out);
    }
    // The mode is part of the run: a free run cannot resume into a guided folder.
    let (ok, _, err) = mrrec(&base(&[
        "eval",
        "--method",
        "mrrec",
        "--limit",
        "2",
        "--model",
        "smollm2-135m-instruct",
        "--mode",
        "free",
        "--out",
        dirs[4].to_str().unwrap(),
    ]));
    assert!(!ok, "a different run resumed into the same folder");
    assert!(
        err.contains("mrrec@free") || err.contains("different"),
        "{err}"
    );
    let mut args = vec!["report".to_string()];
    args.extend(dirs.iter().map(|d| d.to_str().unwrap().to_string()));
    let rep = dir.path().join("report");
    args.extend([
        "--out".into(),
        rep.to_str().unwrap().into(),
        "--rounds".into(),
        "200".into(),
    ]);
    let (ok, md, err) = mrrec(&args);
    assert!(ok, "{err}");
    assert!(md.contains("## Query field `simple_query`"), "{md}");
    assert!(md.contains("| mrrec@guided |"), "{md}");
    assert!(md.contains("| dense |"), "{md}");
    assert!(md.contains("Best by N@100"), "{md}");
    assert!(md.contains("memory tokens / query"), "{md}");
    // The runs that read summaries which were never written are flagged.
    assert!(md.contains("**Incomplete memory**"), "{md}");
    assert!(
        md.contains("- mrrec@guided: 2 users: 0 with the memory read"),
        "{md}"
    );
    assert!(!md.contains("- mrrec-records-only@guided:"), "{md}");
    assert!(rep.join("report.md").exists());
    assert!(std::fs::read_to_string(rep.join("n100-simple_query.svg"))
        .unwrap()
        .starts_with("<svg"));
    // An unknown method names the choices.
    let (ok, _, err) = mrrec(&base(&[
        "eval",
        "--method",
        "mrrec-magic",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]));
    assert!(!ok && err.contains("naive-memory"), "{err}");
}
