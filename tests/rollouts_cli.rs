//! `mrrec rollouts` end to end with the real tiny model: trajectories of `train` queries only,
//! written as JSONL with their token ids, log-probabilities, text and rewards; a rerun continues
//! an interrupted file instead of sampling again; a file of another model is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

/// `mrrec COMMAND` on the mini data with the tiny model and a 300-item slice, its memory in
/// `store`, its output at `out`, then `rest`.
fn tiny(
    command: &str,
    store: &std::path::Path,
    out: &std::path::Path,
    rest: &[&std::ffi::OsStr],
) -> (bool, String, String) {
    let mut args: Vec<std::ffi::OsString> = vec![
        command.into(),
        "--data".into(),
        common::mini().into(),
        "--model".into(),
        "smollm2-135m-instruct".into(),
        "--max-items".into(),
        "300".into(),
        "--store".into(),
        store.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(rest.iter().map(|a| a.to_os_string()));
    common::mrrec(&args)
}

fn rollouts(out: &std::path::Path, store: &std::path::Path, limit: &str) -> (bool, String, String) {
    let rest = ["--group", "2", "--train-limit", limit].map(std::ffi::OsStr::new);
    tiny("rollouts", store, out, &rest)
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

fn sft(
    run: &std::path::Path,
    store: &std::path::Path,
    file: &std::path::Path,
) -> (bool, String, String) {
    let mut rest = [
        "--steps",
        "1",
        "--queries-per-step",
        "1",
        "--val-queries",
        "1",
        "--val-every",
        "1",
        "--patience",
        "0",
        "--lora-layers",
        "2",
        "--lr",
        "1e-3",
        "--sft",
    ]
    .map(std::ffi::OsStr::new)
    .to_vec();
    rest.push(file.as_os_str());
    tiny("train", store, run, &rest)
}

/// Rewrites every record of a rollouts file through `f`.
fn rewrite(path: &std::path::Path, f: impl Fn(&mut serde_json::Value)) {
    let text: String = lines(path)
        .into_iter()
        .map(|mut v| {
            f(&mut v);
            format!("{v}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn fine_tuning_learns_the_chosen_trajectories_of_a_rollouts_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let (ok, _, stderr) = rollouts(&file, &store, "1");
    assert!(ok, "{stderr}");
    let fingerprint = lines(&file)[0]["tokenizer"].clone();
    assert_eq!(fingerprint.as_str().unwrap().len(), 16);
    // The tiny model rarely ranks a target: make trajectory 1 of the group the clear best, so that
    // it beats the greedy answer and is the one chosen.
    rewrite(&file, |v| {
        if v["index"] == 1 {
            v["rewards"]["format"] = 1.0.into();
            v["rewards"]["rec"] = 2.0.into();
            v["rewards"]["total"] = 100.0.into();
        }
    });
    let run = dir.path().join("run");
    let (ok, _, stderr) = sft(&run, &store, &file);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("1 of 1 groups kept"), "{stderr}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(step["step"], 1);
    assert!(step["tokens"].as_u64().unwrap() > 0, "{step}");
    let nll = step["loss"].as_f64().unwrap();
    assert!(
        nll.is_finite() && nll > 0.0,
        "the chosen tokens' negative log-likelihood: {step}"
    );
    assert_eq!(
        step["reward"], 100.0,
        "the chosen trajectory's reward: {step}"
    );
    // The adapter says what it learnt.
    let ad = mrrec_llm_local::model::LoraAdapter::load(&run.join("adapter.safetensors")).unwrap();
    assert_eq!(ad.metadata["mrrec.trained_by"], "sft");
    let source: serde_json::Value = serde_json::from_str(&ad.metadata["mrrec.sft"]).unwrap();
    assert_eq!(
        (source["kept"].clone(), source["groups"].clone()),
        (1.into(), 1.into())
    );

    // Another run starting from that adapter (--init-adapter) validates where the first ended.
    let second = dir.path().join("second");
    let init = run.join("adapter.safetensors");
    let rest = [
        "--steps",
        "0",
        "--val-queries",
        "1",
        "--lora-layers",
        "2",
        "--init-adapter",
    ]
    .map(std::ffi::OsStr::new);
    let rest: Vec<&std::ffi::OsStr> = rest.into_iter().chain([init.as_os_str()]).collect();
    let (ok, _, stderr2) = tiny("train", &store, &second, &rest);
    assert!(ok, "{stderr2}");
    // It holds the same factors (nothing trained: 0 steps).
    let again =
        mrrec_llm_local::model::LoraAdapter::load(&second.join("adapter.safetensors")).unwrap();
    let mut compared = 0;
    for l in 0..64 {
        for p in mrrec_llm_local::model::Proj::ALL {
            if let (Some((a1, b1)), Some((a2, b2))) = (ad.get(l, p), again.get(l, p)) {
                let flat = |t: &candle_core::Tensor| -> Vec<f32> {
                    t.flatten_all().unwrap().to_vec1().unwrap()
                };
                assert_eq!(
                    (flat(a1), flat(b1)),
                    (flat(a2), flat(b2)),
                    "blk.{l}.{}",
                    p.name()
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 0);
    let ended = step["val_ndcg100"].as_f64().unwrap();
    assert!(
        stderr2.contains(&format!("validation N@100 before training: {ended:.4}")),
        "{ended}: {stderr2}"
    );

    // Resuming the run with another file is refused.
    rewrite(&file, |v| v["request"] = "changed".into());
    let (ok, _, stderr) = sft(&run, &store, &file);
    assert!(!ok && stderr.contains("sft"), "{stderr}");
    // A file whose token ids come from another tokenizer, or that holds a `val` query, is refused.
    let other = dir.path().join("other-run");
    rewrite(&file, |v| v["tokenizer"] = "0123456789abcdef".into());
    let (ok, _, stderr) = sft(&other, &store, &file);
    assert!(!ok && stderr.contains("tokenizer"), "{stderr}");
    let val_qid = splits()
        .into_iter()
        .find(|(_, s)| s == "val")
        .map(|(q, _)| q)
        .unwrap();
    rewrite(&file, |v| {
        v["tokenizer"] = fingerprint.clone();
        v["qid"] = val_qid.clone().into();
    });
    let (ok, _, stderr) = sft(&other, &store, &file);
    assert!(!ok && stderr.contains("not a `train` query"), "{stderr}");
}

#[test]
fn the_controller_distils_into_the_free_loop_from_guided_trajectories() {
    use mrrec_llm::Role;
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let (ok, _, stderr) = rollouts(&file, &store, "2");
    assert!(ok, "{stderr}");
    let records: Vec<mrrec_train::trajectories::TrajectoryRecord> = lines(&file)
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    // Every guided trajectory with a parsed profile and clean calls is also written as the free
    // loop: system, request, (call, tool response)…, boxed answer.
    let with = records.iter().filter(|r| !r.free_form.is_empty()).count();
    assert!(with > 0, "no free form in {} records", records.len());
    let local = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    for r in records.iter().filter(|r| !r.free_form.is_empty()) {
        assert_eq!(r.mode, "guided");
        assert_eq!(r.free_form.len() % 2, 1);
        assert_eq!(r.free_form.last().unwrap().role, Role::Assistant);
        let segs = mrrec_train::trajectories::free_segments(r, &local).unwrap();
        let said: Vec<&str> = r
            .free_form
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(segs.len(), said.len());
        for (k, (seg, text)) in segs.iter().zip(&said).enumerate() {
            // Only the model's turns carry loss: the ids are exactly the turn's text (and the
            // end of turn after the last); the system, request and tool turns are all prompt.
            let written = local.decode(&seg.ids).unwrap();
            let expected = if k + 1 == said.len() {
                format!("{text}<|im_end|>")
            } else {
                text.to_string()
            };
            assert_eq!(written, expected);
            for m in r.free_form.iter().filter(|m| m.role != Role::Assistant) {
                let tail: String = m
                    .content
                    .chars()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                assert!(
                    !written.contains(&tail),
                    "a {:?} turn leaked into the loss: {tail}",
                    m.role
                );
            }
            let prompt = local.decode(&seg.prompt).unwrap();
            assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
            assert!(prompt.contains(&format!("Request: {}", r.request)));
        }
        // The final turn reads back as the answer that was scored.
        let v = mrrec_llm::parse::boxed_json(said.last().unwrap()).unwrap();
        let (profile, _) = mrrec_agent::assistant::read_final(&v).unwrap();
        assert_eq!(Some(profile), r.rewards.profile);
    }
    // Make one trajectory the clear best so that it is kept, then fine-tune the free loop on it.
    let chosen = records
        .iter()
        .find(|r| !r.free_form.is_empty())
        .map(|r| (r.qid.clone(), r.index))
        .unwrap();
    rewrite(&file, |v| {
        if v["qid"] == chosen.0.as_str() && v["index"] == chosen.1 {
            v["rewards"]["rec"] = 2.0.into();
            v["rewards"]["total"] = 100.0.into();
        }
    });
    let run = dir.path().join("run");
    let rest = [
        "--steps",
        "1",
        "--queries-per-step",
        "1",
        "--val-queries",
        "1",
        "--val-every",
        "1",
        "--lora-layers",
        "2",
        "--lr",
        "1e-3",
        "--mode",
        "free",
        "--sft-as-free",
        "--sft",
    ]
    .map(std::ffi::OsStr::new);
    let rest: Vec<&std::ffi::OsStr> = rest.into_iter().chain([file.as_os_str()]).collect();
    let (ok, _, stderr) = tiny("train", &store, &run, &rest);
    assert!(ok, "{stderr}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    // (The untrained tiny model's free answers score nothing, so every group beats that bar and
    // the step may have drawn either query's best.)
    assert!(step["reward"].as_f64().unwrap() > 0.0, "{step}");
    assert!(step["tokens"].as_u64().unwrap() > 0, "{step}");
    let ad = mrrec_llm_local::model::LoraAdapter::load(&run.join("adapter.safetensors")).unwrap();
    let source: serde_json::Value = serde_json::from_str(&ad.metadata["mrrec.sft"]).unwrap();
    assert!(source["kept"].as_u64().unwrap() >= 1, "{source}");
    assert!(
        source["as"].as_str().unwrap().starts_with("free loop"),
        "{source}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["assistant"]["mode"], "free");
}
