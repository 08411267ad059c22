//! `mrrec rollouts` end to end with the real tiny model: trajectories of `train` queries only,
//! written as JSONL with their token ids, log-probabilities, text and rewards; a rerun continues
//! an interrupted file instead of sampling again; a file of another model is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

/// The arguments of `mrrec COMMAND` on the mini data with the tiny model and a 300-item slice,
/// its memory in `store`, its output at `out`, then `rest`.
fn tiny_args(
    command: &str,
    store: &std::path::Path,
    out: &std::path::Path,
    rest: &[&std::ffi::OsStr],
) -> Vec<std::ffi::OsString> {
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
    args
}

/// Runs `mrrec COMMAND` as [`tiny_args`] spells it.
fn tiny(
    command: &str,
    store: &std::path::Path,
    out: &std::path::Path,
    rest: &[&std::ffi::OsStr],
) -> (bool, String, String) {
    common::mrrec(&tiny_args(command, store, out, rest))
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
            // A constrained call records its constraint (fine-tuning replays it); others none.
            let restricted = c["constrained"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b == true);
            assert_eq!(c.get("constraint").is_some(), restricted, "{c}");
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

    // The rewards rank as the assistant is told to: the paper's ranking is not written, another
    // is named in every record, and one file never mixes them.
    assert!(first.iter().all(|r| r.get("ranking").is_none()));
    let fused = ["--rank-request", "fuse", "--hybrid-rank"].map(std::ffi::OsStr::new);
    let args = |limit| {
        let mut a = vec![std::ffi::OsStr::new("--group"), "2".as_ref()];
        a.extend(["--train-limit".as_ref(), std::ffi::OsStr::new(limit)]);
        a.extend(fused);
        a
    };
    let (ok, _, stderr) = tiny("rollouts", &store, &out, &args("2"));
    assert!(
        !ok && stderr.contains("rewarded by the profile/dense ranking"),
        "{stderr}"
    );
    let out_fused = dir.path().join("fused.jsonl");
    let (ok, _, stderr) = tiny("rollouts", &store, &out_fused, &args("1"));
    assert!(ok, "{stderr}");
    let fused_records = lines(&out_fused);
    assert_eq!(fused_records.len(), 2);
    assert!(fused_records
        .iter()
        .all(|r| r["ranking"] == "profile+request/hybrid"));

    // `--sample answer`: the reasoning and the memory call decoded greedily (the same in every
    // trajectory of a group, whatever its seed), only the profile sampled; the record says how
    // many calls were greedy, and one file never mixes the two kinds.
    let answer_args = |sample: &'static str| {
        let mut a = vec![std::ffi::OsStr::new("--group"), "2".as_ref()];
        a.extend(["--train-limit", "1", "--sample", sample].map(std::ffi::OsStr::new));
        a
    };
    let out_answer = dir.path().join("answer.jsonl");
    let (ok, _, stderr) = tiny("rollouts", &store, &out_answer, &answer_args("answer"));
    assert!(ok, "{stderr}");
    let answer = lines(&out_answer);
    assert_eq!(answer.len(), 2);
    assert_ne!(answer[0]["seed"], answer[1]["seed"]);
    for r in &answer {
        assert_eq!(r["greedy_calls"], 2, "reasoning + one memory call");
        assert!(r["calls"].as_array().unwrap().len() >= 3);
    }
    for c in 0..2 {
        assert_eq!(
            answer[0]["calls"][c]["ids"], answer[1]["calls"][c]["ids"],
            "call {c} is greedy"
        );
    }
    assert!(first.iter().all(|r| r.get("greedy_calls").is_none()));
    let (ok, _, stderr) = tiny("rollouts", &store, &out_answer, &answer_args("all"));
    assert!(
        !ok && stderr.contains("leading greedy call(s), not 0"),
        "{stderr}"
    );
    let mut free = answer_args("answer");
    free.extend(["--mode", "free"].map(std::ffi::OsStr::new));
    let (ok, _, stderr) = tiny("rollouts", &store, &dir.path().join("free.jsonl"), &free);
    assert!(!ok && stderr.contains("--sample answer"), "{stderr}");

    // Another model's file is refused.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text = text.replace("\"model\":\"smollm2-135m-instruct\"", "\"model\":\"other\"");
    std::fs::write(&out, text).unwrap();
    let (ok, _, stderr) = rollouts(&out, &store, "2");
    assert!(!ok && stderr.contains("use another --out"), "{stderr}");
}

/// `mrrec iterate`'s options in the iteration tests: two rounds of two trajectories of one query,
/// one step each, no validation; then `extra`.
fn iterate_args(extra: &[&'static str]) -> Vec<&'static std::ffi::OsStr> {
    let base = [
        "--rounds",
        "2",
        "--group",
        "2",
        "--train-limit",
        "1",
        "--steps",
        "1",
        "--queries-per-step",
        "1",
        "--lora-layers",
        "2",
        "--lr",
        "1e-3",
        "--val-every",
        "0",
        "--val-queries",
        "0",
    ];
    base.iter()
        .chain(extra)
        .map(|a| std::ffi::OsStr::new(*a))
        .collect()
}

/// One fine-tuning step on one example, validated on one query: the short run most tests need.
const ONE_STEP: [&str; 14] = [
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
];

/// The arguments of `mrrec train --sft FILE` with `options` into `run`.
fn sft_args(
    run: &std::path::Path,
    store: &std::path::Path,
    file: &std::path::Path,
    options: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut rest: Vec<&std::ffi::OsStr> = options.iter().map(std::ffi::OsStr::new).collect();
    rest.push("--sft".as_ref());
    rest.push(file.as_os_str());
    tiny_args("train", store, run, &rest)
}

/// `mrrec train --sft FILE` with `options` into `run`.
fn sft(
    run: &std::path::Path,
    store: &std::path::Path,
    file: &std::path::Path,
    options: &[&str],
) -> (bool, String, String) {
    common::mrrec(&sft_args(run, store, file, options))
}

/// Every LoRA factor pair of an adapter file, by layer and projection.
fn factors(path: &std::path::Path) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let ad = mrrec_llm_local::model::LoraAdapter::load(path).unwrap();
    let flat =
        |t: &candle_core::Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mut all = Vec::new();
    for l in 0..64 {
        for p in mrrec_llm_local::model::Proj::ALL {
            if let Some((a, b)) = ad.get(l, p) {
                all.push((format!("blk.{l}.{}", p.name()), flat(a), flat(b)));
            }
        }
    }
    all
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

/// `--sample answer` then `train --sft --sft-anchor`: a query none of whose samples beats the
/// greedy answer teaches that greedy answer (decoded again with its token ids), so fine-tuning has
/// an example there too; the adapter counts its anchors; the flag needs `--sft` and is not a free
/// form's.
#[test]
fn anchors_teach_the_greedy_answer_where_no_sample_beat_it() {
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let rest = ["--group", "2", "--train-limit", "1", "--sample", "answer"];
    let (ok, _, stderr) = tiny("rollouts", &store, &file, &rest.map(std::ffi::OsStr::new));
    assert!(ok, "{stderr}");
    rewrite(&file, |v| {
        v["rewards"]["rec"] = 0.0.into();
        v["rewards"]["total"] = 0.0.into();
    });
    let options = [
        "--steps",
        "1",
        "--queries-per-step",
        "1",
        "--val-queries",
        "0",
        "--val-every",
        "0",
        "--lora-layers",
        "2",
        "--lr",
        "1e-3",
        "--sft-anchor",
    ];
    let run = dir.path().join("run");
    let (ok, _, stderr) = sft(&run, &store, &file, &options);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("0 of 1 groups kept"), "{stderr}");
    assert!(stderr.contains(": 1 anchors"), "{stderr}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(step["tokens"].as_u64().unwrap() > 0, "{step}");
    assert!(step["loss"].as_f64().unwrap().is_finite(), "{step}");
    let ad = mrrec_llm_local::model::LoraAdapter::load(&run.join("adapter.safetensors")).unwrap();
    let source: serde_json::Value = serde_json::from_str(&ad.metadata["mrrec.sft"]).unwrap();
    assert_eq!(
        (source["kept"].clone(), source["anchors"].clone()),
        (0.into(), 1.into())
    );
    assert!(
        source["sampled"].as_str().unwrap().contains("first 2"),
        "{source}"
    );
    let mut free = options.to_vec();
    free.push("--sft-as-free");
    let (ok, _, stderr) = sft(&dir.path().join("free"), &store, &file, &free);
    assert!(!ok && stderr.contains("drop one of"), "{stderr}");
    let (ok, _, stderr) = tiny(
        "train",
        &store,
        &dir.path().join("none"),
        &["--sft-anchor"].map(std::ffi::OsStr::new),
    );
    assert!(
        !ok && stderr.contains("give it with --sft FILE"),
        "{stderr}"
    );
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
    let (ok, _, stderr) = sft(&run, &store, &file, &ONE_STEP);
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
    // Its constrained calls were learnt over the sets their recorded constraints allowed.
    assert_eq!(source["constrained_calls_learnt_unconstrained"], 0);

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
    let again = factors(&second.join("adapter.safetensors"));
    assert!(!again.is_empty());
    assert_eq!(factors(&run.join("adapter.safetensors")), again);
    let ended = step["val_ndcg100"].as_f64().unwrap();
    assert!(
        stderr2.contains(&format!("validation N@100 before training: {ended:.4}")),
        "{ended}: {stderr2}"
    );

    // Resuming the run with another file is refused.
    rewrite(&file, |v| v["request"] = "changed".into());
    let (ok, _, stderr) = sft(&run, &store, &file, &ONE_STEP);
    assert!(!ok && stderr.contains("sft"), "{stderr}");
    // A file whose token ids come from another tokenizer, or that holds a `val` query, or whose
    // rewards ranked otherwise than this run's greedy bar would, is refused.
    let other = dir.path().join("other-run");
    let fused: Vec<&str> = ONE_STEP
        .iter()
        .copied()
        .chain(["--rank-request", "fuse"])
        .collect();
    let (ok, _, stderr) = sft(&other, &store, &file, &fused);
    assert!(
        !ok && stderr.contains(
            "rewarded by the profile/dense ranking, but this run ranks by profile+request/dense"
        ),
        "{stderr}"
    );
    rewrite(&file, |v| v["tokenizer"] = "0123456789abcdef".into());
    let (ok, _, stderr) = sft(&other, &store, &file, &ONE_STEP);
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
    let (ok, _, stderr) = sft(&other, &store, &file, &ONE_STEP);
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
    let options: Vec<&str> = ONE_STEP
        .into_iter()
        .chain(["--mode", "free", "--sft-as-free"])
        .collect();
    let (ok, _, stderr) = sft(&run, &store, &file, &options);
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

/// The toy task: fine-tuning the free loop on the chosen guided trajectories of two
/// `train` queries raises the reward the model's own greedy free-mode answers earn on them — from
/// the bar `train --sft` measures first (the untrained tiny model's free answers do not parse) to
/// what greedy rollouts with the adapter score. Real model, real rewards, nothing rewritten.
#[test]
fn fine_tuning_on_chosen_trajectories_raises_the_greedy_reward() {
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let rest =
        ["--group", "2", "--train-limit", "2", "--temperature", "0.5"].map(std::ffi::OsStr::new);
    let (ok, _, stderr) = tiny("rollouts", &store, &file, &rest);
    assert!(ok, "{stderr}");
    let run = dir.path().join("run");
    let options = [
        "--steps",
        "10",
        "--queries-per-step",
        "2",
        "--lr",
        "1e-2",
        "--kl",
        "0",
        "--lora-layers",
        "4",
        "--lora-targets",
        "q,k,v,o,gate,up,down",
        "--val-every",
        "0",
        "--val-queries",
        "0",
        "--mode",
        "free",
        "--sft-as-free",
    ];
    let (ok, _, stderr) = sft(&run, &store, &file, &options);
    assert!(ok, "{stderr}");
    // "greedy bar k/n: QID REWARD (…)": the untrained model's greedy free answer per query.
    let before: Vec<f64> = stderr
        .lines()
        .filter(|l| l.starts_with("greedy bar "))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse().unwrap())
        .collect();
    assert_eq!(before.len(), 2, "{stderr}");
    let before = before.iter().sum::<f64>() / 2.0;
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["loss"].as_f64().unwrap() < 0.5, "not learnt: {last}");
    // The same two queries answered greedily in free mode with the adapter.
    let adapter = run.join("adapter.safetensors");
    let rest: Vec<&std::ffi::OsStr> = [
        "--group",
        "1",
        "--temperature",
        "0",
        "--train-limit",
        "2",
        "--mode",
        "free",
        "--adapter",
    ]
    .into_iter()
    .map(std::ffi::OsStr::new)
    .chain([adapter.as_os_str()])
    .collect();
    let (ok, stdout, stderr) = tiny("rollouts", &store, &dir.path().join("after.jsonl"), &rest);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let after = &summary["this_run"]["summary"];
    assert_eq!(after["trajectories"], 2, "{summary}");
    assert!(
        after["mean_reward"].as_f64().unwrap() > before + 1.0,
        "greedy reward {before} before fine-tuning, {after} after"
    );
    assert!(after["parsed"].as_f64().unwrap() > 0.0, "{after}");
}

/// A fine-tuning run killed after its first step and run again ends with the same adapter, bit
/// for bit, and the same log, as a run that was never interrupted.
#[test]
fn a_killed_fine_tuning_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let (ok, _, stderr) = rollouts(&file, &store, "1");
    assert!(ok, "{stderr}");
    let options = [
        "--steps",
        "3",
        "--queries-per-step",
        "1",
        "--lr",
        "1e-3",
        "--lora-layers",
        "2",
        "--val-every",
        "0",
        "--val-queries",
        "0",
        "--mode",
        "free",
        "--sft-as-free",
    ];
    let whole = dir.path().join("whole");
    let (ok, _, stderr) = sft(&whole, &store, &file, &options);
    assert!(ok, "{stderr}");

    let killed = dir.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args(sft_args(&killed, &store, &file, &options))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = killed.join("log.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 1 {
        assert!(t0.elapsed().as_secs() < 900, "no step logged");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (ok, _, stderr) = sft(&killed, &store, &file, &options);
    assert!(ok, "{stderr}");
    // The bar (the greedy answer) was measured by the whole run: replayed, not decoded again.
    assert!(
        stderr.contains("greedy bar: 1 of 1 answers replayed from the LLM cache"),
        "{stderr}"
    );

    let a = factors(&whole.join("adapter.safetensors"));
    assert!(!a.is_empty());
    assert_eq!(a, factors(&killed.join("adapter.safetensors")));
    let losses = |run: &std::path::Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(run.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(losses(&whole).len(), 3);
    assert_eq!(losses(&whole), losses(&killed));
}

/// Trajectories sampled from a server (here `mrrec`'s own OpenAI-compatible server over the real
/// tiny model, as a teacher served elsewhere would be): text only — each call's text, the free
/// form, the tokens the server reported — so plain fine-tuning refuses them (no token ids) and
/// `--sft-as-free` learns them re-tokenised.
#[test]
fn a_servers_trajectories_are_recorded_as_text_and_distilled_re_tokenised() {
    let model = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let url = mrrec_server::llm::spawn_loopback(std::sync::Arc::new(model)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (file, store) = (dir.path().join("r.jsonl"), dir.path().join("m.sqlite"));
    let rest = [
        "--llm-url",
        &url,
        "--mode",
        "guided",
        "--group",
        "2",
        "--train-limit",
        "2",
    ]
    .map(std::ffi::OsStr::new);
    let (ok, stdout, stderr) = tiny("rollouts", &store, &file, &rest);
    assert!(ok, "{stderr}");
    let records = lines(&file);
    assert_eq!(records.len(), 4, "2 queries × G = 2");
    let splits = splits();
    for r in &records {
        assert_eq!(splits[r["qid"].as_str().unwrap()], "train", "{r}");
        assert_eq!(r["model"], format!("openai:smollm2-135m-instruct@{url}"));
        assert_eq!(r["tokenizer"], "");
        let calls = r["calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{r}");
        for c in calls {
            assert!(c["ids"].as_array().unwrap().is_empty());
            assert!(!c["text"].as_str().unwrap().is_empty(), "{r}");
        }
        assert!(r["reported_tokens"][1].as_u64().unwrap() > 0, "{r}");
    }
    // Each trajectory sampled with its own seed: the two of a group differ.
    assert_ne!(records[0]["calls"], records[1]["calls"]);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(summary["file_total"]["tokens_out"].as_u64().unwrap() > 0);
    // Plain fine-tuning needs the sampled ids; the free form re-tokenised trains the student.
    let (ok, _, stderr) = sft(&dir.path().join("plain"), &store, &file, &ONE_STEP);
    assert!(!ok && stderr.contains("unrecorded"), "{stderr}");
    if records.iter().any(|r| r.get("free_form").is_some()) {
        let run = dir.path().join("run");
        let options: Vec<&str> = ONE_STEP
            .into_iter()
            .chain(["--mode", "free", "--sft-as-free"])
            .collect();
        let (ok, _, stderr) = sft(&run, &store, &file, &options);
        assert!(ok, "{stderr}");
        let ad =
            mrrec_llm_local::model::LoraAdapter::load(&run.join("adapter.safetensors")).unwrap();
        let source: serde_json::Value = serde_json::from_str(&ad.metadata["mrrec.sft"]).unwrap();
        assert_eq!(
            source["written_by"][0],
            format!("openai:smollm2-135m-instruct@{url}")
        );
    }
}

/// `mrrec iterate`: round 1 continues the rollouts file already in its folder (one trajectory
/// made the clear best, so it is kept) and fine-tunes on it; round 2 samples with round 1's
/// adapter; rerunning the finished command redoes nothing.
#[test]
fn expert_iteration_samples_with_each_rounds_adapter_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("m.sqlite");
    let out = dir.path().join("iter");
    let first = out.join("round-1").join("rollouts.jsonl");
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    let (ok, _, stderr) = rollouts(&first, &store, "1");
    assert!(ok, "{stderr}");
    rewrite(&first, |v| {
        if v["index"] == 1 {
            v["rewards"]["rec"] = 2.0.into();
            v["rewards"]["total"] = 100.0.into();
        }
    });
    let rest = iterate_args(&[]);
    let (ok, stdout, stderr) = tiny("iterate", &store, &out, &rest);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 rounds"), "{stdout}");
    let rounds = lines(&out.join("rounds.jsonl"));
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["kept"], 1, "{}", rounds[0]);
    assert_eq!(rounds[0]["anchors"], 0, "{}", rounds[0]);
    let adapter1 = out.join("round-1").join("run").join("adapter.safetensors");
    assert_eq!(rounds[0]["adapter"], adapter1.to_str().unwrap());
    // Round 1 sampled nothing again (the file's group was complete); round 2 sampled with round
    // 1's adapter (its id joins the model's).
    assert_eq!(lines(&first).len(), 2);
    let second = lines(&out.join("round-2").join("rollouts.jsonl"));
    assert_eq!(second.len(), 2);
    assert!(
        second[0]["model"].as_str().unwrap().contains("+lora-"),
        "{}",
        second[0]["model"]
    );
    let last = factors(&out.join("adapter.safetensors"));
    let expected = rounds[1]["adapter"].as_str().unwrap();
    assert_eq!(last, factors(std::path::Path::new(expected)));
    // Done: a rerun only reports.
    let (ok, stdout, stderr) = tiny("iterate", &store, &out, &rest);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 rounds"), "{stdout}");
    assert!(!stderr.contains(": sampling ("), "{stderr}");
    assert_eq!(lines(&out.join("rounds.jsonl")), rounds);
}

/// `iterate --sample answer`: each round's rollouts sample only the profile (the record says
/// its greedy calls); it cannot go with `--sft-as-free`, whose later rounds sample the free loop.
/// A round none of whose samples beats the greedy answer keeps its adapter, anchors or not.
#[test]
fn expert_iteration_can_sample_only_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("m.sqlite");
    let out = dir.path().join("iter");
    let mut rest = iterate_args(&["--sample", "answer"]);
    let (ok, _, stderr) = tiny(
        "iterate",
        &store,
        &out,
        &[rest.clone(), vec!["--sft-as-free".as_ref()]].concat(),
    );
    assert!(!ok && stderr.contains("drop one of them"), "{stderr}");
    rest[1] = "1".as_ref();
    rest.push("--sft-anchor".as_ref());
    let (ok, _, stderr) = tiny("iterate", &store, &out, &rest);
    assert!(ok, "{stderr}");
    let sampled = lines(&out.join("round-1").join("rollouts.jsonl"));
    assert_eq!(sampled.len(), 2);
    assert!(
        sampled.iter().all(|v| v["greedy_calls"] == 2),
        "{sampled:?}"
    );
    // Neither sample beat the greedy answer: with --sft-anchor the round still learns nothing
    // (its anchor would only teach what the model already answers) and the adapter stays.
    let rounds = lines(&out.join("rounds.jsonl"));
    assert_eq!(
        (
            &rounds[0]["kept"],
            &rounds[0]["steps"],
            &rounds[0]["adapter"]
        ),
        (
            &0.into(),
            &serde_json::Value::Null,
            &serde_json::Value::Null
        ),
        "{}",
        rounds[0]
    );
    assert!(
        stderr.contains("no sample beat the greedy answer"),
        "{stderr}"
    );
}

/// `iterate --sft-as-free` distils the controller, then iterates on the student's own loop:
/// round 1 samples guided trajectories (the controller teaching) and learns their free form;
/// round 2 samples the free loop with round 1's adapter, and those records — the free loop
/// already, in the student's own token ids — compete with its greedy answer and are learnt.
#[test]
fn expert_iteration_distils_the_controller_then_iterates_on_the_free_loop() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("m.sqlite");
    let out = dir.path().join("iter");
    let round = |r: usize| out.join(format!("round-{r}"));
    let first = round(1).join("rollouts.jsonl");
    std::fs::create_dir_all(round(1)).unwrap();
    let (ok, _, stderr) = rollouts(&first, &store, "1");
    assert!(ok, "{stderr}");
    // One sample of each round beats any greedy answer (and is well formed, as selection asks),
    // so each round keeps one.
    let best = |v: &mut serde_json::Value| {
        if v["index"] == 1 {
            v["rewards"]["total"] = 100.0.into();
            v["rewards"]["format"] = 1.0.into();
        }
    };
    rewrite(&first, best);
    let rest = iterate_args(&["--sft-as-free"]);
    let (ok, _, stderr) = tiny("iterate", &store, &out, &rest);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("round 1/2: sampling (guided mode) with the base model"),
        "{stderr}"
    );
    let rounds = lines(&out.join("rounds.jsonl"));
    assert_eq!(rounds[0]["kept"], 1, "{}", rounds[0]);
    let learnt = |r: usize| -> serde_json::Value {
        let t = std::fs::read_to_string(round(r).join("run").join("train.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&t).unwrap()
    };
    assert_eq!(learnt(1)["assistant"]["mode"], "free");
    assert!(lines(&first).iter().all(|v| v["mode"] == "guided"));
    let second = round(2).join("rollouts.jsonl");
    let sampled = lines(&second);
    assert_eq!(sampled.len(), 2);
    for v in &sampled {
        assert_eq!(v["mode"], "free", "{v}");
        assert!(v["model"].as_str().unwrap().contains("+lora-"), "{v}");
    }
    // Round 2 again, with one of its free-loop samples the best: it is kept and learnt.
    rewrite(&second, best);
    std::fs::write(out.join("rounds.jsonl"), format!("{}\n", rounds[0])).unwrap();
    std::fs::remove_dir_all(round(2).join("run")).ok();
    let (ok, _, stderr) = tiny("iterate", &store, &out, &rest);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("round 2/2: sampling (free mode) with"),
        "{stderr}"
    );
    assert_eq!(lines(&second).len(), 2, "round 2 sampled again");
    let rounds = lines(&out.join("rounds.jsonl"));
    assert_eq!(rounds[1]["kept"], 1, "{}", rounds[1]);
    let adapter2 = round(2).join("run").join("adapter.safetensors");
    assert_eq!(rounds[1]["adapter"], adapter2.to_str().unwrap());
    let source = &learnt(2)["sft"];
    assert_eq!(source["left_out_without_free_form"], 0, "{source}");
    assert_eq!(source["kept"], 1, "{source}");
}

/// An adapter `iterate` could not fine-tune is refused before round 1 samples anything (each
/// round's fine-tuning checks it too, but only after its sampling).
#[test]
fn expert_iteration_refuses_an_adapter_it_cannot_train_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("m.sqlite");
    for (extra, says) in [
        (
            &["--lora-rank", "0"][..],
            "an adapter needs rank 1 and one layer at least",
        ),
        (&["--lora-targets", "q,x"][..], "unknown LoRA target \"x\""),
        (
            &["--frozen-memo-gb=-1"][..],
            "--frozen-memo-gb -1: a size in GiB",
        ),
    ] {
        let out = dir.path().join("iter");
        let mut rest = iterate_args(&[]);
        rest.extend(extra.iter().map(std::ffi::OsStr::new));
        let (ok, _, stderr) = tiny("iterate", &store, &out, &rest);
        assert!(!ok && stderr.contains(says), "{extra:?}: {stderr}");
        assert!(
            !stderr.contains("round 1/"),
            "{extra:?} sampled first: {stderr}"
        );
        assert!(!out.exists(), "{extra:?} created {}", out.display());
    }
}

/// Distilled text spells the tokenizer's added tokens with ordinary ones: Qwen's `<tool_call>`
/// tags (added tokens whose rarely trained rows a small model fails to produce) come out as
/// ordinary tokens that decode to the same text, and a chat-template token inside a turn's text
/// cannot smuggle in a turn boundary.
#[test]
fn distilled_text_spells_added_tokens_with_ordinary_ones() {
    let path = mrrec_llm_local::LocalModel::source_file("qwen2.5-coder-0.5b-instruct").unwrap();
    let (info, _) = mrrec_llm_local::GgufInfo::read(&path).unwrap();
    let text = "Which of the user's preferences matter here: size?\n<tool_call>\n{\"name\": \"memory_retrieval_tool\", \"arguments\": {\"query\": \"a <|im_end|> mug\"}}\n</tool_call>";
    let added: Vec<u32> = ["<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>"]
        .iter()
        .map(|t| info.tokenizer.token_to_id(t).unwrap())
        .collect();
    // The plain encoding uses the added tokens…
    let plain = info.encode(text).unwrap();
    assert!(plain.iter().any(|id| added.contains(id)));
    // …the distilled one never does, and reads back the same.
    let ids = mrrec_train::trajectories::encode_plain(&info, text).unwrap();
    assert!(!ids.iter().any(|id| added.contains(id)), "{ids:?}");
    assert_eq!(info.tokenizer.decode(&ids, false).unwrap(), text);
    // Text without an added token is encoded as before.
    let simple = "a warm scarf, wool, under $30";
    assert_eq!(
        mrrec_train::trajectories::encode_plain(&info, simple).unwrap(),
        info.encode(simple).unwrap()
    );
}

/// `mrrec derive-queries` with the real tiny model: a data directory of `train` rows only, the
/// derived ones asked by snapshot users whose history — and so the memory built from it — ends
/// before the purchase the request must find (`memory build` reads that file like any other);
/// derived for `val`, a directory of `val` rows that rollouts refuse.
#[test]
fn derived_queries_are_train_rows_asked_by_snapshots_that_never_saw_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("derived");
    // `mrrec derive-queries` on the mini data with the tiny model into `out`, then `rest`.
    let mini = common::mini();
    let derive_into = |out: &std::path::Path, rest: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "derive-queries".as_ref(),
            "--data".as_ref(),
            mini.as_os_str(),
            "--model".as_ref(),
            "smollm2-135m-instruct".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        args.extend(rest.iter().map(std::ffi::OsStr::new));
        common::mrrec(&args)
    };
    let derive = |rest: &[&str]| derive_into(&out, rest);
    // The rows of a written query file and the position of each column.
    let read_rows = |dir: &std::path::Path| {
        let text = std::fs::read_to_string(dir.join("queries.csv")).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let h = r.headers().unwrap().clone();
        let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
        (h, rows)
    };
    let (ok, stdout, stderr) = derive(&["--users", "8", "--per-user", "1"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("targets: 8 train users"), "{stderr}");
    assert!(
        stdout.contains("of them after a repair turn), each asked by its own snapshot user")
            && stdout.contains("refused in the end: "),
        "{stdout}"
    );
    assert!(stdout.contains("tokens in"), "{stdout}");
    // The same derivation into another folder: every answer replays from the LLM cache, so the
    // model is never loaded, and the data set written is the same, byte for byte.
    let again = dir.path().join("again");
    let (ok, _, replayed) = derive_into(&again, &["--users", "8", "--per-user", "1"]);
    assert!(ok, "{replayed}");
    assert!(
        !replayed.contains("loading smollm2-135m-instruct"),
        "{replayed}"
    );
    for f in ["queries.csv", "reviews.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    let source = splits();
    let (h, rows) = read_rows(&out);
    let col = |n: &str| h.iter().position(|c| c == n).unwrap();
    assert!(rows.iter().all(|x| &x[col("split")] == "train"));
    let derived: Vec<&csv::StringRecord> = rows
        .iter()
        .filter(|x| x[col("qid")].starts_with("d-"))
        .collect();
    assert!(
        !derived.is_empty(),
        "the tiny model wrote no usable request"
    );
    assert_eq!(
        rows.len() - derived.len(),
        source.values().filter(|s| *s == "train").count()
    );
    // Each snapshot's history in the new reviews file ends strictly before its target.
    let reviews = std::fs::read_to_string(out.join("reviews.jsonl")).unwrap();
    let history = |user: &str| -> Vec<serde_json::Value> {
        reviews
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["user_id"] == user)
            .collect()
    };
    let d = derived[0];
    let snapshot = d[col("user_id")].to_string();
    let (at, target) = (
        d[col("timestamp")].parse::<i64>().unwrap(),
        d[col("item_id")].to_string(),
    );
    assert!(snapshot.ends_with(&format!("@{at}")), "{snapshot}");
    let h = history(&snapshot);
    assert!(h.len() >= 2);
    assert!(h.iter().all(|v| v["timestamp"].as_i64().unwrap() < at));
    assert!(h.iter().all(|v| v["parent_asin"] != target.as_str()));
    // A second run into the same directory is refused, naming it.
    let (ok, _, stderr) = derive(&["--users", "1"]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    // A slice of the catalogue is refused rather than ignored.
    let (ok, _, stderr) = derive(&["--users", "1", "--max-items", "100"]);
    assert!(
        !ok && stderr.contains("--max-items does not apply here"),
        "{stderr}"
    );
    // Derived for `val`: every row `val` (the source's and any derived), and rollouts refuse it.
    let val_out = dir.path().join("derived-val");
    let (ok, stdout, stderr) = derive_into(
        &val_out,
        &["--split", "val", "--users", "2", "--per-user", "1"],
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("targets: 2 val users"), "{stderr}");
    assert!(stdout.contains("--for-split val"), "{stdout}");
    let (h, rows) = read_rows(&val_out);
    let split = h.iter().position(|c| c == "split").unwrap();
    assert_eq!(
        rows.iter().filter(|x| !x[0].starts_with("d-")).count(),
        source.values().filter(|s| *s == "val").count()
    );
    assert!(rows.iter().all(|x| &x[split] == "val"));
    let (ok, _, stderr) = common::mrrec(
        &[
            "rollouts",
            "--data",
            val_out.to_str().unwrap(),
            "--model",
            "smollm2-135m-instruct",
            "--out",
            dir.path().join("r.jsonl").to_str().unwrap(),
        ]
        .map(std::ffi::OsStr::new),
    );
    assert!(
        !ok && stderr.contains("no `train` queries: `mrrec rollouts` reads `train` rows only"),
        "{stderr}"
    );
    // `aspect` users cannot be derived for (their targets are in their histories).
    let (ok, _, stderr) = derive(&["--users", "1", "--split", "aspect"]);
    assert!(
        !ok && stderr.contains("derive for train, val or test"),
        "{stderr}"
    );
}
