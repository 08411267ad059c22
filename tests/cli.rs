//! The `mrrec` binary end to end on a slice of the real data: the README's main command, eval
//! resume, compare, and clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use common::{mini, mrrec};

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
        "--assistant",
        "2",
        "--model",
        "smollm2-135m-instruct",
        "--global-queries",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Example request:"), "{stdout}");
    // The assistant part: the users' whole memory built phase by phase, then mrrec beside
    // dense, hybrid and llm-rewrite on the same seeded queries, with a paired test against each.
    for phase in [
        "memory: records of",
        "preference patterns in",
        "profiles in",
        "global aspects of 2 training queries in",
    ] {
        assert!(stderr.contains(phase), "{phase}\n{stderr}");
    }
    assert!(
        stdout.contains("Memory (smollm2-135m-instruct):"),
        "{stdout}"
    );
    assert!(
        stdout.contains("The assistant (smollm2-135m-instruct, guided) on 2 seeded queries"),
        "{stdout}"
    );
    for row in ["mrrec@guided", "llm-rewrite@guided", "hybrid", "dense"] {
        assert!(
            stdout.contains(&format!("| {row} (simple_query) |")),
            "{row}\n{stdout}"
        );
    }
    assert_eq!(stdout.matches("A = mrrec@guided").count(), 3, "{stdout}");
    for m in ["bm25", "dense", "hybrid", "hybrid-history"] {
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
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(table.contains("| N@100 |"), "{table}");
    // … and per history length: the three buckets hold every one of the 62 queries.
    assert!(table.contains("| past reviews |"), "{table}");
    let in_buckets: usize = ["≤ 4", "5–9", "≥ 10"]
        .iter()
        .map(|b| parse_cell(&table, b, 1) as usize)
        .sum();
    assert_eq!(in_buckets, 62, "{table}");
    // A run folder written by an older version (a setting it did not have): the demo owns its
    // folders, so it starts that run again instead of refusing.
    let spec_path = out.path().join("mrrec-assistant-2/run.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    spec["settings"]["assistant"]
        .as_object_mut()
        .unwrap()
        .remove("global_min_support")
        .unwrap();
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    // Rerunning the demo resumes every run instead of recomputing.
    let (ok, stdout2, stderr) = mrrec(&[
        "demo",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "1500",
        "--out",
        out.path().to_str().unwrap(),
        "--assistant",
        "2",
        "--model",
        "smollm2-135m-instruct",
        "--global-queries",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("mrrec-assistant-2: an earlier run with other settings"),
        "{stderr}"
    );
    assert!(
        stdout2.contains("| mrrec@guided (simple_query) |"),
        "{stdout2}"
    );
    assert_eq!(
        parse_cell(&stdout, "hybrid (simple_query)", 3),
        parse_cell(&stdout2, "hybrid (simple_query)", 3)
    );
}

#[test]
fn eval_refuses_aspect_queries_and_unknown_methods() {
    let data = mini();
    let out = tempfile::tempdir().unwrap();
    // `eval` on the mini data with `extra`: it must fail; its stderr.
    let refused = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--max-items",
            "200",
            "--out",
            out.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = mrrec(&args);
        assert!(!ok, "{extra:?}: {stderr}");
        stderr
    };
    let stderr = refused(&["--method", "bm25", "--split", "aspect"]);
    assert!(
        stderr.contains("`aspect` queries cannot be evaluated"),
        "{stderr}"
    );
    let stderr = refused(&["--method", "magic"]);
    assert!(
        stderr.contains("invalid value 'magic' for '--method <METHOD>'")
            && stderr.contains("possible values: bm25, dense, hybrid"),
        "{stderr}"
    );
    // The profile's weight is a weight in the fusion: refused without it, and refused negative,
    // before any model is opened.
    let mrrec_method = ["--method", "mrrec", "--model", "no-such-model"];
    for (flags, says) in [
        (
            &["--profile-weight", "0.5"][..],
            "--profile-weight: the profile weight weighs the profile beside the request",
        ),
        (
            &["--rank-request", "fuse", "--profile-weight=-1"][..],
            "--profile-weight: the profile weight must be a number ≥ 0 (the request's is 1), not -1",
        ),
    ] {
        let stderr = refused(&[&mrrec_method[..], flags].concat());
        assert!(stderr.contains(says), "{stderr}");
    }
    // The history's weight and depth: checked, and only with the method that reads them.
    for (flags, says) in [
        (
            &["--method", "hybrid-history", "--history-weight=-1"][..],
            "--history-weight: must be finite and >= 0, got -1",
        ),
        (
            &["--method", "hybrid-history", "--history-recent", "0"][..],
            "--history-recent: must be at least 1",
        ),
        (
            &["--method", "hybrid-history", "--history-recent", "most"][..],
            "expected a number of items or `all`, got \"most\"",
        ),
        (
            &["--method", "hybrid", "--history-weight", "0.5"][..],
            "method hybrid does not read them",
        ),
        // The re-ranking stage's flags: checked before the workspace and the judge load.
        (
            &["--method", "hybrid", "--rerank-weight", "2"][..],
            "--rerank-weight and --rerank-memory set the re-ranking stage; add --rerank N",
        ),
        (
            &["--method", "hybrid", "--rerank", "0"][..],
            "--rerank: 0 items: the judge reads 1 to 200",
        ),
        (
            &["--method", "hybrid", "--rerank", "20", "--rerank-weight=-1"][..],
            "--rerank-weight: -1: a weight is a finite number ≥ 0",
        ),
    ] {
        let stderr = refused(flags);
        assert!(stderr.contains(says), "{stderr}");
    }
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
    // The judge's flags are checked before anything is read.
    for (flags, says) in [
        (
            &["--judge-adapter", "j.safetensors"][..],
            "--judge-adapter is the judge's adapter: add --rerank N",
        ),
        (
            &["--rerank", "5", "--assistant", "0"][..],
            "--rerank adds a row to the assistant's table",
        ),
        (&["--rerank", "0"][..], "--rerank"),
    ] {
        let (ok, _, stderr) =
            mrrec(&[&["demo", "--data", "/nonexistent/amazon"][..], flags].concat());
        assert!(!ok);
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(!stderr.contains("not found"), "{flags:?}: {stderr}");
    }
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
    assert!(
        stderr.contains("invalid value 'fancy' for '--dense-index <DENSE_INDEX>'")
            && stderr.contains("possible values: exact, hnsw, auto"),
        "{stderr}"
    );
}

/// `recommend` answers with any method `eval` runs, through the same pipeline: a retrieval
/// method without loading a model (its ranking is `search`'s), the judge's re-ranking behind it
/// (the real tiny model: the judged items are the method's first, re-ordered by the fusion of
/// the two orders, the items below unmoved), the user's past items left out on request, and
/// refusals that name what is wrong.
#[test]
fn recommend_runs_any_method_behind_the_judge_and_without_past_items() {
    let data = mini();
    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().join("memory.sqlite");
    // A user and an item they reviewed; the request is that item's title, so the item ranks
    // high for any method that reads only the request.
    let reviews = std::fs::read_to_string(data.join("reviews.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(reviews.lines().next().unwrap()).unwrap();
    let user = first["user_id"].as_str().unwrap().to_string();
    let item = first["parent_asin"].as_str().unwrap().to_string();
    let seen: Vec<String> = reviews
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["user_id"] == user.as_str())
        .map(|v| v["parent_asin"].as_str().unwrap().to_string())
        .collect();
    let meta = std::fs::read_to_string(data.join("meta.jsonl")).unwrap();
    let title = meta
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["parent_asin"] == item.as_str())
        .and_then(|v| v["title"].as_str().map(String::from))
        .unwrap();
    let recommend = |extra: &[&str], user: &str| -> (bool, serde_json::Value, String) {
        let mut args: Vec<&str> = vec![
            "recommend",
            "--data",
            data.to_str().unwrap(),
            "--max-items",
            "300",
            "--store",
            store_path.to_str().unwrap(),
            "--model",
            "smollm2-135m-instruct",
            "-k",
            "10",
            "--json",
            "--user",
            user,
        ];
        args.extend_from_slice(extra);
        args.push(&title);
        let (ok, stdout, stderr) = mrrec(&args);
        (
            ok,
            serde_json::from_str(&stdout).unwrap_or_default(),
            stderr,
        )
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    // A retrieval method: no model, the same ranking as `search`.
    let (ok, hybrid, stderr) = recommend(&["--method", "hybrid"], &user);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("[no LLM;"), "{stderr}");
    let h = ids(&hybrid);
    assert_eq!(h.len(), 10);
    assert!(h.contains(&item), "{item} not in {h:?}");
    assert!(hybrid["rerank"].is_null());
    assert!(hybrid["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["judge"].is_null()));
    let (ok, stdout, stderr) = mrrec(&[
        "search",
        "--data",
        data.to_str().unwrap(),
        "--max-items",
        "300",
        "--method",
        "hybrid",
        "-k",
        "10",
        &title,
    ]);
    assert!(ok, "{stderr}");
    let searched: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    assert_eq!(searched, h, "{stdout}");
    // The judge re-ranks the first 5: the same 5 items, in the fused order of the method's
    // order and the judge's scores; the rest unmoved.
    let (ok, judged, stderr) = recommend(&["--method", "hybrid", "--rerank", "5"], &user);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("[LLM smollm2-135m-instruct") && stderr.contains("tokens in"),
        "{stderr}"
    );
    let r = ids(&judged);
    let stage = &judged["rerank"];
    assert_eq!(stage["depth"], 5);
    let stage_items: Vec<String> = stage["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(stage_items, h[..5]);
    let scores: Vec<f32> = stage["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap() as f32)
        .collect();
    assert!(scores.iter().all(|s| s.is_finite()), "{scores:?}");
    let fused = mrrec_agent::rerank::fuse_judged(&(0..10).collect::<Vec<u32>>(), &scores, 1.0);
    let expected: Vec<String> = fused.iter().map(|&p| h[p as usize].clone()).collect();
    assert_eq!(r, expected, "scores {scores:?}");
    for (i, it) in judged["items"].as_array().unwrap().iter().enumerate() {
        if i < 5 {
            let at = h.iter().position(|x| x == &r[i]).unwrap();
            assert!(
                (it["judge"].as_f64().unwrap() as f32 - scores[at]).abs() < 1e-6,
                "{it}"
            );
        } else {
            assert!(it["judge"].is_null(), "{it}");
        }
    }
    // The user's past items left out: the method's ranking without them, still 10 items.
    let (ok, unseen, stderr) = recommend(&["--method", "hybrid", "--exclude-seen"], &user);
    assert!(ok, "{stderr}");
    let u = ids(&unseen);
    assert_eq!(u.len(), 10);
    assert!(
        u.iter().all(|i| !seen.contains(i)),
        "{u:?} has one of {seen:?}"
    );
    let kept: Vec<String> = h.iter().filter(|i| !seen.contains(i)).cloned().collect();
    assert_eq!(u[..kept.len()], kept[..]);
    // A request that reads no user answers anyone; one that reads their past refuses a stranger.
    let (ok, anyone, stderr) = recommend(&["--method", "hybrid"], "nobody-at-all");
    assert!(ok, "{stderr}");
    assert_eq!(ids(&anyone), h);
    for (flags, says) in [
        (
            &["--method", "hybrid-history"][..],
            "unknown user \"nobody-at-all\": no history in the data",
        ),
        (
            &["--method", "hybrid", "--exclude-seen"][..],
            "reads the user's past items",
        ),
        (
            &[
                "--method",
                "hybrid",
                "--adapter",
                "/nonexistent.safetensors",
            ][..],
            "method hybrid calls no LLM",
        ),
        (
            &["--method", "hybrid", "--rerank-memory", "profile"][..],
            "add --rerank N",
        ),
    ] {
        let (ok, _, stderr) = recommend(flags, "nobody-at-all");
        assert!(!ok && stderr.contains(says), "{flags:?}: {stderr}");
    }
}

#[test]
fn a_reranked_run_reweighed_equals_the_run_made_at_that_weight() {
    let data = mini();
    let dir = tempfile::tempdir().unwrap();
    // `eval` of hybrid on 4 queries into `name`, with `extra` flags; its folder and stdout.
    let eval = |name: &str, extra: &[&str]| -> (std::path::PathBuf, String) {
        let out = dir.path().join(name);
        let mut args = vec![
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--max-items",
            "300",
            "--method",
            "hybrid",
            "--limit",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = mrrec(&args);
        assert!(ok, "{err}");
        (out, stdout)
    };
    let judged = |weight| {
        [
            "--rerank",
            "5",
            "--rerank-weight",
            weight,
            "--model",
            "smollm2-135m-instruct",
        ]
    };
    let (at_1, stdout) = eval("w1", &judged("1"));
    let (at_4, _) = eval("w4", &judged("4"));
    // eval points at reweigh.
    assert!(
        stdout.contains(&format!("mrrec reweigh {} --weight", at_1.display())),
        "{stdout}"
    );
    type Ranked = Vec<(String, Option<u64>, Vec<String>)>;
    let ranks = |run: &std::path::Path| -> Ranked {
        std::fs::read_to_string(run.join("per_query.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["qid"].as_str().unwrap().to_string(),
                    v["rank"].as_u64(),
                    serde_json::from_value(v["top10"].clone()).unwrap(),
                )
            })
            .collect()
    };
    // The weight moves the judged items (else this test would prove nothing).
    assert_ne!(ranks(&at_1), ranks(&at_4));
    // The run at weight 1, fused again at 4 without a model, is the run made at 4.
    let again = dir.path().join("w1-as-4");
    let (ok, stdout, err) = mrrec(&[
        "reweigh",
        at_1.to_str().unwrap(),
        "--weight",
        "4",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("| hybrid+rerank5 w 4 (simple_query) |"),
        "{stdout}"
    );
    assert_eq!(ranks(&again), ranks(&at_4));
    let metrics = |run: &std::path::Path| -> serde_json::Value {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap())
                .unwrap();
        m["metrics"].clone()
    };
    assert_eq!(metrics(&again), metrics(&at_4));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("run.json")).unwrap()).unwrap();
    assert_eq!(spec["settings"]["rerank"]["weight"], 4.0);
    assert!(spec["provenance"]["reweighed_from"].is_string());
    // `compare` reads it as any run.
    let (ok, table, err) = mrrec(&[
        "compare",
        again.to_str().unwrap(),
        at_4.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(table.contains("| N@100 |"), "{table}");
    // Several weights print one row each; refusals name the reason.
    let (ok, stdout, err) = mrrec(&["reweigh", at_1.to_str().unwrap(), "--weight", "0,1,2"]);
    assert!(ok, "{err}");
    for w in ["w 0 ", "w 1 ", "w 2 "] {
        assert!(stdout.contains(w), "{w}: {stdout}");
    }
    for (args, says) in [
        (
            vec!["--weight", "1,2", "--out", "x"],
            "--out writes one run: give one --weight",
        ),
        (vec!["--weight=-1"], "--weight -1"),
        (
            vec!["--weight", "2", "--out", at_4.to_str().unwrap()],
            "already holds a run",
        ),
    ] {
        let (ok, _, err) = mrrec(&[&["reweigh", at_1.to_str().unwrap()][..], &args[..]].concat());
        assert!(!ok);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A run without a judge is refused, naming it.
    let (plain, _) = eval("plain", &[]);
    let (ok, _, err) = mrrec(&["reweigh", plain.to_str().unwrap(), "--weight", "2"]);
    assert!(!ok);
    assert!(err.contains("its last stage is not a judge"), "{err}");
}

/// The model named on the command line is the model asked of a server, and the key comes from
/// `OPENAI_API_KEY` when `MRREC_LLM_API_KEY` is unset (both read once, by the binary); the echo
/// model with a server URL from the environment is an error naming both, never a silent switch.
#[test]
fn a_server_gets_the_model_named_and_the_key_from_the_environment() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then the body up to its Content-Length.
        loop {
            let n = s.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some(h) = text.find("\r\n\r\n") {
                let len = text[..h]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if req.len() >= h + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let body = r#"{"choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}"#;
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&req).to_string()
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(["chat", "--model", "served-x", "--base-url", &url, "hi"])
        .env("OPENAI_API_KEY", "sk-from-openai-env")
        .env_remove("MRREC_LLM_API_KEY")
        .env("MRREC_LLM_MODEL", "not-this-one")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));
    let req = seen.join().unwrap();
    let lower = req.to_ascii_lowercase();
    assert!(
        lower.contains("authorization: bearer sk-from-openai-env"),
        "{req}"
    );
    assert!(req.contains(r#""model":"served-x""#), "{req}");
    // Echo with a server URL from the environment: an error naming both.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(["chat", "--model", "echo", "hi"])
        .env("MRREC_LLM_BASE_URL", "http://127.0.0.1:9/v1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--model echo") && stderr.contains("http://127.0.0.1:9/v1"),
        "{stderr}"
    );
}
