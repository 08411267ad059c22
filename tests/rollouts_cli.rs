//! `mrrec rollouts` end to end with the real tiny model: trajectories of `train` queries only,
//! written as JSONL with their token ids, log-probabilities, text and rewards; a rerun continues
//! an interrupted file instead of sampling again; a file of another model is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

fn rollouts(out: &std::path::Path, store: &std::path::Path, limit: &str) -> (bool, String, String) {
    let mut args: Vec<std::ffi::OsString> =
        vec!["rollouts".into(), "--data".into(), common::mini().into()];
    args.extend(
        [
            "--model",
            "smollm2-135m-instruct",
            "--max-items",
            "300",
            "--group",
            "2",
            "--train-limit",
            limit,
            "--store",
        ]
        .map(Into::into),
    );
    args.push(store.into());
    args.push("--out".into());
    args.push(out.into());
    common::mrrec(&args)
}

/// qid → split of the mini data set's queries.
fn splits() -> HashMap<String, String> {
    let text = std::fs::read_to_string(common::mini().join("queries.csv")).unwrap();
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let h = r.headers().unwrap().clone();
    let (qi, si) = (
        h.iter().position(|c| c == "qid").unwrap(),
        h.iter().position(|c| c == "split").unwrap(),
    );
    r.records()
        .map(|x| {
            let x = x.unwrap();
            (x[qi].to_string(), x[si].to_string())
        })
        .collect()
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn rollouts_write_train_trajectories_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (out, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let (ok, stdout, stderr) = rollouts(&out, &store, "2");
    assert!(ok, "{stderr}");
    let first = lines(&out);
    assert_eq!(first.len(), 4, "2 queries × G = 2");
    let splits = splits();
    for r in &first {
        assert_eq!(splits[r["qid"].as_str().unwrap()], "train", "{r}");
        assert_eq!(r["model"], "smollm2-135m-instruct");
        assert_eq!(r["group"], 2);
        let calls = r["calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for c in calls {
            let n = c["ids"].as_array().unwrap().len();
            assert_eq!(c["logprobs"].as_array().unwrap().len(), n);
            assert_eq!(c["constrained"].as_array().unwrap().len(), n);
            assert!(!c["prompt"].as_array().unwrap().is_empty());
            assert!(c["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x.as_f64().unwrap() <= 0.0));
        }
        assert!(r["rewards"]["total"].as_f64().is_some());
    }
    // The two trajectories of a group sampled with their own seeds.
    assert_ne!(first[0]["seed"], first[1]["seed"]);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["this_run"]["summary"]["trajectories"], 4);
    assert!(
        summary["this_run"]["summary"]["tokens_out"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(summary["this_run"]["summary"]["groups_rec_zero"]
        .as_f64()
        .is_some());

    // An interrupted run: half a line at the end. The rerun drops it, keeps both groups and
    // samples nothing again; a larger subset samples only what is new.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push_str("{\"qid\": \"9");
    std::fs::write(&out, text).unwrap();
    let (ok, stdout, stderr) = rollouts(&out, &store, "2");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("dropped 1 line"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["this_run"]["summary"]["groups"], 0);
    assert_eq!(lines(&out), first);
    let (ok, stdout, stderr) = rollouts(&out, &store, "3");
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["file_total"]["groups"], 3);
    assert!(summary["this_run"]["summary"]["groups"].as_u64().unwrap() <= 1);

    // Another model's file is refused.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text = text.replace("\"model\":\"smollm2-135m-instruct\"", "\"model\":\"other\"");
    std::fs::write(&out, text).unwrap();
    let (ok, _, stderr) = rollouts(&out, &store, "2");
    assert!(!ok && stderr.contains("use another --out"), "{stderr}");
}
