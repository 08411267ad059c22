//! `mrrec train` end to end with the real tiny model: a step, an interruption, a resume that
//! continues at the next step, a refused resume with other settings, and the adapter used by
//! `mrrec recommend --adapter` and `mrrec demo --adapter`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

/// `mrrec train` with the tiny model on 300 items of the mini data, into `out` with `store`.
fn train_command(out: &std::path::Path, store: &std::path::Path) -> Command {
    tiny_command("train", out, store)
}

/// `mrrec SUB` with the tiny model on 300 items of the mini data.
fn tiny(sub: &str) -> Command {
    tiny_on(sub, &common::mini())
}

/// `mrrec SUB` with the tiny model on 300 items of `data`.
fn tiny_on(sub: &str, data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mrrec"));
    c.args([
        sub,
        "--model",
        "smollm2-135m-instruct",
        "--max-items",
        "300",
    ])
    .arg("--data")
    .arg(data);
    c
}

/// `mrrec SUB` with the tiny model on 300 items of the mini data, into `out` with `store`.
fn tiny_command(sub: &str, out: &std::path::Path, store: &std::path::Path) -> Command {
    let mut c = tiny(sub);
    c.arg("--store").arg(store).arg("--out").arg(out);
    c
}

fn train(
    out: &std::path::Path,
    store: &std::path::Path,
    steps: &str,
    lr: &str,
) -> (bool, String, String) {
    let o = train_command(out, store)
        .args([
            "--group",
            "2",
            "--queries-per-step",
            "1",
            "--train-limit",
            "2",
            "--val-queries",
            "1",
        ])
        .args([
            "--val-every",
            "2",
            "--patience",
            "0",
            "--lora-layers",
            "2",
            "--steps",
            steps,
            "--lr",
            lr,
        ])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn steps_logged(out: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn train_resumes_and_its_adapter_serves_recommendations() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let store = dir.path().join("mem.sqlite");
    let (ok, stdout, err) = train(&out, &store, "1", "1e-3");
    assert!(ok, "{err}");
    assert!(stdout.starts_with("1 steps"), "{stdout}");
    assert_eq!(steps_logged(&out), [1]);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for k in [
        "reward",
        "r_format",
        "r_rec",
        "r_mem",
        "flat_groups",
        "rec_zero_groups",
        "tokens",
        "seconds",
        "peak_rss",
    ] {
        assert!(!line[k].is_null(), "{k} missing: {line}");
    }
    // Train longer: resumes at step 1, adds step 2 (with a validation).
    let (ok, stdout, err) = train(&out, &store, "2", "1e-3");
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    assert!(stdout.starts_with("2 steps"), "{stdout}");
    assert_eq!(steps_logged(&out), [1, 2]);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(last["val_ndcg100"].is_f64(), "{last}");
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("validation N@100")
    );
    // Other settings in the same folder: refused, naming the file.
    let (ok, _, err) = train(&out, &store, "3", "5e-4");
    assert!(!ok);
    assert!(
        err.contains("train.json") && err.contains("other settings"),
        "{err}"
    );
    // The adapter drives recommendations.
    let adapter = out.join("adapter.safetensors");
    let ad = mrrec_llm_local::model::LoraAdapter::load(&adapter).unwrap();
    assert_eq!(ad.rank, 8);
    let user = common::users()[0].clone();
    let recommend = |adapter: Option<&std::path::Path>| -> serde_json::Value {
        let mut c = tiny("recommend");
        c.arg("--json")
            .arg("--store")
            .arg(&store)
            .args(["--user", &user, "a gift for a child"]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = recommend(Some(&adapter));
    assert!(!v["items"].as_array().unwrap().is_empty());
    // The adapter changes what the model answers: the trained adapter's factors with every B set
    // to a clearly non-zero value (two steps of training may leave B near its zero start) make
    // the greedy outputs (reasoning, tool call, final object) differ from the base model's. With
    // `--adapter` ignored, both answers would be the base model's (and the second replayed from
    // the response cache).
    let mut strong = mrrec_llm_local::model::LoraAdapter::new(ad.rank, ad.alpha);
    let mut adapted = 0;
    for layer in 0..64 {
        for p in mrrec_llm_local::model::Proj::ALL {
            if let Some((a, b)) = ad.get(layer, p) {
                let b = (b.ones_like().unwrap() * 0.05).unwrap();
                strong.insert(layer, p, a.clone(), b);
                adapted += 1;
            }
        }
    }
    assert!(adapted > 0, "the trained adapter adapts no projection");
    let strong_path = dir.path().join("strong.safetensors");
    strong.save(&strong_path).unwrap();
    let base = recommend(None);
    let with = recommend(Some(&strong_path));
    assert_ne!(
        base["trace"]["outputs"], with["trace"]["outputs"],
        "the adapter did not change the answer: {base} vs {with}"
    );
    // The demo runs the assistant with an adapter in free mode; llm-rewrite, its baseline,
    // answers with the plain model (and guided), so the table shows what the adapter adds.
    let demo = dir.path().join("demo");
    let (ok, stdout, err) = common::mrrec(&[
        "demo",
        "--data",
        common::mini().to_str().unwrap(),
        "--max-items",
        "300",
        "--out",
        demo.to_str().unwrap(),
        "--assistant",
        "1",
        "--levels",
        "records",
        "--model",
        "smollm2-135m-instruct",
        "--mode",
        "free",
        "--adapter",
        strong_path.to_str().unwrap(),
        "--rerank",
        "5",
        "--judge-adapter",
        strong_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // With --rerank, hybrid's first 5 judged by the model with the judge's adapter: a row of its
    // own, paired against hybrid alone, its cost reported.
    assert!(
        stdout.contains("| hybrid+rerank5 (simple_query) |"),
        "{stdout}"
    );
    let judge = format!(
        ", adapter {}, the first 5 of hybrid, weight 1): ",
        strong_path.display()
    );
    assert!(
        stdout.contains("Judge (smollm2-135m-instruct+lora-") && stdout.contains(&judge),
        "{stdout}"
    );
    let who = format!(
        "The assistant (smollm2-135m-instruct + adapter {}, free) on 1 seeded queries",
        strong_path.display()
    );
    assert!(stdout.contains(&who), "{stdout}");
    for row in ["mrrec@free", "llm-rewrite@guided"] {
        assert!(
            stdout.contains(&format!("| {row} (simple_query) |")),
            "{row}\n{stdout}"
        );
    }
    let settings = |run: &str| -> serde_json::Value {
        let spec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(demo.join(run).join("run.json")).unwrap(),
        )
        .unwrap();
        spec["settings"].clone()
    };
    let llm = |run: &str| -> String { settings(run)["llm"].as_str().unwrap().to_string() };
    assert!(llm("mrrec-assistant-1").contains("+lora-"));
    let judged = settings("hybrid-rerank5-assistant-1");
    assert!(
        judged["judge"].as_str().unwrap().contains("+lora-"),
        "{judged}"
    );
    assert_eq!(judged["rerank"]["depth"], 5, "{judged}");
    assert!(!llm("llm-rewrite-assistant-1").contains("lora"));
}

#[test]
fn grpo_can_sample_and_learn_only_the_guided_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let run = |out: &str, extra: &[&str]| {
        let o = train_command(&dir.path().join(out), &store)
            .args([
                "--group",
                "4",
                "--queries-per-step",
                "1",
                "--train-limit",
                "1",
                "--val-every",
                "0",
                "--val-queries",
                "0",
                "--lora-layers",
                "2",
                "--steps",
                "1",
            ])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        (o.status.success(), err)
    };
    let step = |out: &str| -> serde_json::Value {
        let log = std::fs::read_to_string(dir.path().join(out).join("log.jsonl")).unwrap();
        serde_json::from_str(log.lines().next().unwrap()).unwrap()
    };
    let config = |out: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(out).join("train.json")).unwrap(),
        )
        .unwrap()
    };
    let (ok, err) = run("answer", &["--mode", "guided", "--sample", "answer"]);
    assert!(ok, "{err}");
    let (ok, err) = run("all", &["--mode", "guided"]);
    assert!(ok, "{err}");
    // Guided with the memory tool: the reasoning and the tool call are decoded greedily and not
    // learnt, so a trajectory adds its profile call (and a repair, if one was asked) to the loss,
    // where sampling every call adds at least three.
    let (answer, all) = (step("answer"), step("all"));
    for (s, lo, hi) in [(&answer, 1, 2), (&all, 3, 6)] {
        let learnt = s["groups"].as_u64().unwrap() - s["flat_groups"].as_u64().unwrap();
        let calls = s["calls"].as_u64().unwrap();
        assert!(
            calls >= lo * 4 * learnt && calls <= hi * 4 * learnt,
            "{calls} calls learnt in {learnt} groups of 4: {s}"
        );
    }
    assert_eq!(config("answer")["train"]["greedy_calls"], 2);
    assert!(config("all")["train"].get("greedy_calls").is_none());
    // What the flag cannot mean: a fine-tuning file (it says what it sampled), the free loop.
    for (extra, says) in [
        (
            &[
                "--mode",
                "guided",
                "--sample",
                "answer",
                "--sft",
                "nothing.jsonl",
            ][..],
            "fine-tuning learns what its rollouts file sampled",
        ),
        (
            &["--sample", "answer", "--mode", "free"][..],
            "the free loop's answer is whichever turn ends it",
        ),
    ] {
        let (ok, err) = run("refused", extra);
        assert!(!ok && err.contains(says), "{extra:?}: {err}");
    }
}

#[test]
fn a_judge_learns_yes_for_train_targets_reranks_from_eval_teaches_a_student_and_learns_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let out = dir.path().join("judge");
    let judge = |out: &std::path::Path, extra: &[&str]| {
        let o = train_command(out, &store)
            .args(["--judge", "--train-limit", "2", "--queries-per-step", "2"])
            .args([
                "--rerank",
                "5",
                "--judge-negatives",
                "2",
                "--lora-layers",
                "2",
            ])
            .args(["--val-every", "0", "--val-queries", "0", "--kl", "0"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        (o.status.success(), err)
    };
    let (ok, err) = judge(&out, &["--steps", "6", "--lr", "1e-2"]);
    assert!(ok, "{err}");
    // Each step learns the two queries' target and two negatives each: one token a call.
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 6);
    for s in &steps {
        assert_eq!(
            (s["calls"].as_u64(), s["tokens"].as_u64()),
            (Some(6), Some(6)),
            "{s}"
        );
    }
    let loss = |s: &serde_json::Value| s["loss"].as_f64().unwrap();
    assert!(loss(&steps[5]) < loss(&steps[0]), "{log}");
    // Every step is an epoch of the same 2 lists: after the first, their frozen layers' states
    // are remembered, not computed — and the adapter is the same bytes as a run that computes
    // them every time (and learns the step's two queries at once, on two threads).
    let reused: Vec<f64> = steps
        .iter()
        .map(|s| s["lower_reused"].as_f64().unwrap())
        .collect();
    assert_eq!(reused, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0], "{log}");
    let plain = dir.path().join("judge-no-memo");
    let (ok, err) = judge(
        &plain,
        &[
            "--steps",
            "6",
            "--lr",
            "1e-2",
            "--frozen-memo-gb",
            "0",
            "--parallel-runs",
            "2",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        std::fs::read(plain.join("adapter.safetensors")).unwrap()
            == std::fs::read(out.join("adapter.safetensors")).unwrap()
    );
    let log0 = std::fs::read_to_string(plain.join("log.jsonl")).unwrap();
    assert!(
        log0.lines().all(|l| l.contains("\"lower_reused\":0.0")),
        "{log0}"
    );
    // What it learnt from is recorded in train.json and in the adapter.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["sft"]["judge"]["stage"]["depth"], 5);
    assert_eq!(cfg["sft"]["judge"]["negatives"], 2);
    assert_eq!(cfg["sft"]["calls"], 6);
    let adapter = out.join("adapter.safetensors");
    let ad = mrrec_llm_local::model::LoraAdapter::load(&adapter).unwrap();
    assert!(ad.metadata["mrrec.sft"].contains("\"judge\""));
    // `eval --rerank` with and without the adapter on the queries it learnt: the trained judge
    // prefers the targets to the other items more than the untrained one.
    let rerank = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let o = dir.path().join(name);
        let mut c = tiny_command("eval", &o, &store);
        c.args([
            "--method", "hybrid", "--rerank", "5", "--split", "train", "--limit", "2",
        ])
        .args(extra);
        let r = c.output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read_to_string(o.join("per_query.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // The target's score minus the mean of the others', over the queries whose target was judged.
    let margin = |rows: &[serde_json::Value]| -> f64 {
        let mut m = 0.0;
        for r in rows {
            let t = &r["trace"]["rerank"];
            let items: Vec<&str> = t["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let scores: Vec<f64> = t["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(items.len(), scores.len());
            if let Some(i) = items
                .iter()
                .position(|&x| x == r["target"].as_str().unwrap())
            {
                let others: f64 = scores
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, s)| s)
                    .sum();
                m += scores[i] - others / (scores.len() - 1) as f64;
            }
        }
        m
    };
    let before = rerank("untrained", &[]);
    let after = rerank("trained", &["--adapter", adapter.to_str().unwrap()]);
    assert!(
        before
            .iter()
            .any(|r| r["rank"].as_u64().is_some_and(|k| k <= 5)),
        "no target in the first 5: {before:?}"
    );
    assert!(
        margin(&after) > margin(&before),
        "{} vs {}",
        margin(&after),
        margin(&before)
    );
    // Distillation: a fresh judge learns the trained judge's scores (its P(Yes) of each item)
    // instead of the targets. The teacher's scores are kept in the run folder, as the stage's
    // judge computes them. (lr 3e-3: soft labels near the student's own scores leave a small
    // gradient, and Adam's steps at 1e-2 overshoot it on two queries.)
    let student = dir.path().join("student");
    let (ok, err) = judge(
        &student,
        &[
            "--steps",
            "6",
            "--lr",
            "3e-3",
            "--judge-teacher",
            "smollm2-135m-instruct",
            "--judge-teacher-adapter",
            adapter.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("teacher: 2 queries scored (0 kept from before)"),
        "{err}"
    );
    // The student and, asked, the teacher (the same base model) were loaded.
    assert_eq!(
        err.matches("loading smollm2-135m-instruct…").count(),
        2,
        "{err}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("train.json")).unwrap())
            .unwrap();
    let teacher_id = cfg["sft"]["judge"]["teacher"].as_str().unwrap().to_string();
    assert!(
        teacher_id.starts_with("smollm2-135m-instruct+lora-"),
        "{cfg}"
    );
    let kept: Vec<serde_json::Value> = std::fs::read_to_string(student.join("judge-teacher.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kept.len(), 2);
    // The kept scores are the trained judge's as `eval --rerank --adapter` traced them (the
    // items both judged: the target and the negatives within the top 5).
    let mut compared = 0;
    for k in &kept {
        assert_eq!(k["teacher"], teacher_id.as_str());
        assert_eq!(k["items"].as_array().unwrap().len(), 3);
        let row = after.iter().find(|r| r["qid"] == k["qid"]).unwrap();
        let t = &row["trace"]["rerank"];
        for (item, score) in k["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(k["scores"].as_array().unwrap())
        {
            if let Some(j) = t["items"]
                .as_array()
                .unwrap()
                .iter()
                .position(|x| x == item)
            {
                let traced = t["scores"][j].as_f64().unwrap();
                assert!(
                    (traced - score.as_f64().unwrap()).abs() < 1e-2,
                    "{item}: {traced} vs {score}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 2, "{kept:?}");
    // Each step learns every judged item's soft label: the cross-entropy to the teacher falls.
    let log = std::fs::read_to_string(student.join("log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 6);
    assert_eq!(steps[0]["calls"], 6);
    assert!(loss(&steps[5]) < loss(&steps[0]), "{log}");
    // The student, untrained at first, now prefers the targets as its teacher does.
    let distilled = rerank(
        "distilled",
        &[
            "--adapter",
            student.join("adapter.safetensors").to_str().unwrap(),
        ],
    );
    assert!(
        margin(&distilled) > margin(&before),
        "{} vs {}",
        margin(&distilled),
        margin(&before)
    );
    // Resumed to a longer run, the teacher is not asked again; another teacher is refused.
    let (ok, err) = judge(
        &student,
        &[
            "--steps",
            "7",
            "--lr",
            "3e-3",
            "--judge-teacher",
            "smollm2-135m-instruct",
            "--judge-teacher-adapter",
            adapter.to_str().unwrap(),
        ],
    );
    assert!(ok && err.contains("(2 kept from before)"), "{err}");
    let (ok, err) = judge(
        &student,
        &[
            "--steps",
            "8",
            "--lr",
            "3e-3",
            "--judge-teacher",
            "smollm2-135m-instruct",
        ],
    );
    // The refusal names the setting that differs, down to its leaf.
    assert!(
        !ok && err.contains("sft differ: sft.judge.teacher: \"smollm2-135m-instruct+lora-"),
        "{err}"
    );
    // One step of a student on `data` from the student's kept teacher scores (the trained judge
    // as the teacher, as above), given as another run's file (`--judge-teacher-scores`),
    // `negatives` a list.
    let one_step =
        |data: &std::path::Path, out: &std::path::Path, negatives: &str, extra: &[&str]| {
            tiny_on("train", data)
                .arg("--store")
                .arg(&store)
                .arg("--out")
                .arg(out)
                .args(["--judge", "--train-limit", "2", "--queries-per-step", "2"])
                .args(["--rerank", "5", "--judge-negatives", negatives])
                .args([
                    "--lora-layers",
                    "2",
                    "--val-every",
                    "0",
                    "--val-queries",
                    "0",
                ])
                .args(["--kl", "0", "--steps", "1"])
                .args(["--judge-teacher", "smollm2-135m-instruct"])
                .arg("--judge-teacher-adapter")
                .arg(&adapter)
                .args(extra)
                .output()
                .unwrap()
        };
    let kept_file = student.join("judge-teacher.jsonl");
    let from_kept =
        |data: &std::path::Path, out: &std::path::Path, negatives: &str, extra: &[&str]| {
            let extra = [
                &["--judge-teacher-scores", kept_file.to_str().unwrap()],
                extra,
            ]
            .concat();
            let o = one_step(data, out, negatives, &extra);
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(
                o.status.success()
                    && err.contains("teacher: 2 queries scored (2 kept from before), 0 tokens in"),
                "{err}"
            );
            // The lists it learnt are copied into its own file: the run holds what it learnt.
            let own = std::fs::read_to_string(out.join("judge-teacher.jsonl")).unwrap();
            assert_eq!(own.lines().count(), 2, "{own}");
            err
        };
    // The teacher's scores are kept per item: a run judging fewer of the same items asks it for
    // nothing — and a teacher whose every score is kept is never loaded: only the student is.
    let err = from_kept(&common::mini(), &dir.path().join("fewer"), "1", &[]);
    let loads = |err: &str| err.matches("loading smollm2-135m-instruct…").count();
    assert_eq!(loads(&err), 1, "{err}");
    // The negatives are drawn by the question asked, not by the query's id: the same `train`
    // requests under other ids (a data set derived again numbers its requests anew) are the
    // same lists — 2 of the 4 or more other items of each top 5 — so every score is kept.
    let renamed = dir.path().join("renamed-data");
    std::fs::create_dir_all(&renamed).unwrap();
    for f in ["meta.jsonl", "reviews.jsonl"] {
        std::os::unix::fs::symlink(common::mini().join(f), renamed.join(f)).unwrap();
    }
    let mut r = csv::Reader::from_path(common::mini().join("queries.csv")).unwrap();
    let mut w = csv::Writer::from_path(renamed.join("queries.csv")).unwrap();
    w.write_record(r.headers().unwrap()).unwrap();
    for row in r.records() {
        let mut row: Vec<String> = row.unwrap().iter().map(String::from).collect();
        row[0] = format!("renamed-{}", row[0]);
        w.write_record(&row).unwrap();
    }
    w.flush().unwrap();
    let again = dir.path().join("renamed");
    let err = from_kept(&renamed, &again, "2", &[]);
    assert_eq!(loads(&err), 1, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("train.json")).unwrap()).unwrap();
    assert_eq!(cfg["sft"]["judge"]["negatives_by"], "question", "{cfg}");
    // The teacher's lists with the target mixed in (--judge-target-weight): recorded with the
    // judge's settings (absent when 0, so earlier runs keep their identity), and learnt as
    // other labels — the first step's loss is not the teacher-only list's.
    let first_loss = |out: &std::path::Path| {
        let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
        loss(&serde_json::from_str(log.lines().next().unwrap()).unwrap())
    };
    let lists = dir.path().join("lists");
    from_kept(&common::mini(), &lists, "2", &["--judge-listwise"]);
    let mixed = dir.path().join("mixed");
    from_kept(
        &common::mini(),
        &mixed,
        "2",
        &["--judge-listwise", "--judge-target-weight", "0.5"],
    );
    let judge_cfg = |out: &std::path::Path| -> serde_json::Value {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap())
                .unwrap();
        cfg["sft"]["judge"].clone()
    };
    assert!(judge_cfg(&lists).get("target_weight").is_none());
    assert_eq!(judge_cfg(&mixed)["target_weight"], 0.5);
    assert!(
        (first_loss(&mixed) - first_loss(&lists)).abs() > 1e-6,
        "{} vs {}",
        first_loss(&mixed),
        first_loss(&lists)
    );
    // Another run's file named on purpose and not there: an error naming it, not a teacher
    // asked again.
    let missing = dir.path().join("no-such-run/judge-teacher.jsonl");
    let o = one_step(
        &common::mini(),
        &dir.path().join("missing"),
        "2",
        &["--judge-teacher-scores", missing.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!(
                "the teacher's kept scores {}: no such file",
                missing.display()
            )),
        "{err}"
    );
    // Listwise from the targets alone: each query's items are one list whose label is its
    // target; the loss (a KL divergence, ≥ 0) falls and the judge prefers the targets.
    let listwise = dir.path().join("listwise");
    let (ok, err) = judge(
        &listwise,
        &["--steps", "6", "--lr", "1e-2", "--judge-listwise"],
    );
    assert!(ok, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(listwise.join("train.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["sft"]["judge"]["listwise"], true, "{cfg}");
    let log = std::fs::read_to_string(listwise.join("log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 6);
    assert_eq!(steps[0]["calls"], 6);
    assert!(steps.iter().all(|s| loss(s) >= -1e-6), "{log}");
    assert!(loss(&steps[5]) < loss(&steps[0]), "{log}");
    // A step's lists learnt at once (by default as many as the threads) or one after another:
    // the same adapter, byte for byte, and the same losses.
    for parallel in ["1", "3"] {
        let other = dir.path().join(format!("listwise-{parallel}"));
        let (ok, err) = judge(
            &other,
            &[
                "--steps",
                "6",
                "--lr",
                "1e-2",
                "--judge-listwise",
                "--parallel-runs",
                parallel,
            ],
        );
        assert!(ok, "{err}");
        assert!(
            std::fs::read(other.join("adapter.safetensors")).unwrap()
                == std::fs::read(listwise.join("adapter.safetensors")).unwrap(),
            "--parallel-runs {parallel}"
        );
        let losses = |out: &std::path::Path| -> Vec<f64> {
            std::fs::read_to_string(out.join("log.jsonl"))
                .unwrap()
                .lines()
                .map(|l| loss(&serde_json::from_str(l).unwrap()))
                .collect()
        };
        assert_eq!(losses(&other), losses(&listwise));
    }
    let ranked = rerank(
        "listwise",
        &[
            "--adapter",
            listwise.join("adapter.safetensors").to_str().unwrap(),
        ],
    );
    assert!(
        margin(&ranked) > margin(&before),
        "{} vs {}",
        margin(&ranked),
        margin(&before)
    );
    // Pointwise runs keep their identity: no `listwise` key in their train.json.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train.json")).unwrap()).unwrap();
    assert!(cfg["sft"]["judge"].get("listwise").is_none(), "{cfg}");
    // What --judge cannot mean, and its flags without it: refused before anything loads.
    for (extra, says) in [
        (
            &["--judge", "--sft", "x.jsonl"][..],
            "--judge learns the re-ranking judge from `train` targets",
        ),
        (
            &["--judge", "--rerank-weight", "2"][..],
            "--rerank-weight is the judge's weight when it answers",
        ),
        (
            &["--judge", "--judge-negatives", "0"][..],
            "--judge-negatives 0",
        ),
        (&["--judge", "--rerank", "0"][..], "--rerank: 0 items"),
        (&["--rerank", "5"][..], "add --judge"),
        (&["--judge-teacher", "x"][..], "add --judge"),
        (&["--judge-listwise"][..], "add --judge"),
        (&["--judge-target-weight", "0.5"][..], "add --judge"),
        (&["--judge-own-repeat", "2"][..], "add --judge"),
        (
            &["--judge", "--frozen-memo-gb=-1"][..],
            "--frozen-memo-gb -1: a size in GiB",
        ),
        (
            &["--judge", "--lora-rank", "0"][..],
            "an adapter needs rank 1 and one layer at least",
        ),
        (
            &["--judge", "--judge-own-repeat", "0"][..],
            "--judge-own-repeat 0: each list is learnt at least once",
        ),
        (
            &["--judge", "--judge-teacher-scores", "kept.jsonl"][..],
            "--judge-teacher-scores reuses a teacher's kept scores: add --judge-teacher MODEL",
        ),
        (
            &[
                "--judge",
                "--judge-listwise",
                "--judge-target-weight",
                "0.5",
            ][..],
            "needs --judge-teacher and --judge-listwise",
        ),
        (
            &[
                "--judge",
                "--judge-listwise",
                "--judge-teacher",
                "x",
                "--judge-target-weight",
                "1.5",
            ][..],
            "a weight in [0, 1]",
        ),
        (
            &["--judge", "--judge-teacher-url", "http://127.0.0.1:9"][..],
            "add --judge-teacher MODEL",
        ),
        (
            &[
                "--judge",
                "--judge-teacher",
                "x",
                "--judge-teacher-url",
                "http://127.0.0.1:9",
                "--judge-teacher-adapter",
                "a.safetensors",
            ][..],
            "serves its own weights",
        ),
    ] {
        let o = train_command(&dir.path().join("refused"), &store)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
}

/// `mrrec distil-judge` in one command with the real tiny model as teacher and student: it
/// derives requests (past a half-written data set a killed run left), keeps the teacher's
/// scores of each list, trains the listwise judge and copies its adapter, which `recommend
/// --rerank` then uses; a rerun keeps what was done, one with more steps trains on, and one
/// with other settings is refused naming them.
#[test]
fn distil_judge_derives_scores_trains_and_resumes_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let out = dir.path().join("distil");
    // What a derivation killed while writing its data set leaves.
    std::fs::create_dir_all(out.join("data.partial")).unwrap();
    std::fs::write(out.join("data.partial/queries.csv"), "half a file").unwrap();
    let distil = |steps: &str, depth: &str, extra: &[&str]| {
        let o = tiny("distil-judge")
            .arg("--out")
            .arg(&out)
            .args(["--teacher", "smollm2-135m-instruct"])
            .args(["--per-user", "1", "--users", "3", "--depth", depth])
            .args(["--train-limit", "2", "--steps", steps])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, stdout, stderr) = distil("2", "4", &[]);
    assert!(ok, "{stderr}");
    assert!(!out.join("data.partial").exists());
    // Step 1: derive-queries by the teacher into OUT/data (3 users, one purchase each).
    assert!(stderr.contains("targets: 3 train users"), "{stderr}");
    assert!(stdout.contains("derived ("), "{stdout}");
    // derive-queries' own next steps are this command's: not printed.
    assert!(!stdout.contains("next: mrrec memory build"), "{stdout}");
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["teacher"], "smollm2-135m-instruct");
    assert_eq!(recipe["depth"], 4);
    // Step 2: the listwise judge learnt the teacher's scores of each list of 4, two steps.
    let run = out.join("train");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    let judge = &cfg["sft"]["judge"];
    assert_eq!(judge["stage"]["depth"], 4, "{cfg}");
    assert_eq!(judge["negatives"], 3, "{cfg}");
    assert_eq!(judge["listwise"], true, "{cfg}");
    // The item bought is mixed into the teacher's lists with weight .3 unless told otherwise.
    assert_eq!(judge["target_weight"], 0.3, "{cfg}");
    assert!(
        judge["teacher"]
            .as_str()
            .unwrap()
            .starts_with("smollm2-135m-instruct"),
        "{cfg}"
    );
    let kept = std::fs::read_to_string(run.join("judge-teacher.jsonl")).unwrap();
    assert_eq!(kept.lines().count(), 2, "{kept}");
    assert_eq!(steps_logged(&run), vec![1, 2]);
    let adapter = out.join("adapter.safetensors");
    let bytes = std::fs::read(&adapter).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(run.join("adapter.safetensors")).unwrap()
    );
    let ad = mrrec_llm_local::model::LoraAdapter::load(&adapter).unwrap();
    assert!(ad.metadata["mrrec.sft"].contains("\"judge\""));
    let f = adapter.to_str().unwrap();
    assert!(
        stdout.contains(&format!(
            "mrrec eval --model smollm2-135m-instruct --method hybrid --rerank 4 --rerank-weight 0.5 --adapter {f}"
        )),
        "{stdout}"
    );
    // A rerun keeps the data set, the scores and the steps: the same adapter.
    let (ok, _, stderr) = distil("2", "4", &[]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("(kept)"), "{stderr}");
    assert!(!stderr.contains("targets:"), "{stderr}");
    assert_eq!(steps_logged(&run), vec![1, 2]);
    assert_eq!(std::fs::read(&adapter).unwrap(), bytes);
    // More steps train on from the last checkpoint. Each step is an epoch of the 2 lists: the
    // second step reused the first's frozen layers; a run told to remember nothing (not a
    // setting of the recipe: the same adapter) computes them at its second step too.
    let reused = |step: usize| {
        let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
        let s: serde_json::Value =
            serde_json::from_str(log.lines().nth(step - 1).unwrap()).unwrap();
        s["lower_reused"].as_f64().unwrap()
    };
    assert_eq!(reused(2), 1.0);
    let (ok, _, stderr) = distil("4", "4", &["--frozen-memo-gb", "0"]);
    assert!(ok, "{stderr}");
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4]);
    assert_eq!((reused(3), reused(4)), (0.0, 0.0));
    assert_ne!(std::fs::read(&adapter).unwrap(), bytes);
    // Other settings: refused, naming what differs, nothing touched.
    let (ok, _, stderr) = distil("4", "5", &[]);
    assert!(!ok);
    assert!(stderr.contains("depth: 4 then, 5 now"), "{stderr}");
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4]);
    // The target mixed into the teacher's lists is a setting of the recipe (.3 by default): a
    // rerun without it is refused too, told the flag that repeats it.
    assert_eq!(recipe["target_weight"], 0.3, "{recipe}");
    let (ok, _, stderr) = distil("4", "4", &["--target-weight", "0"]);
    assert!(!ok);
    assert!(
        stderr
            .contains("target_weight: 0.3 then, 0 now): rerun with --target-weight 0.3 to resume"),
        "{stderr}"
    );
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4]);
    // The adapter judges hybrid's first 4 for a user.
    let user = common::users()[0].clone();
    let o = tiny("recommend")
        .arg("--store")
        .arg(&store)
        .args([
            "--user",
            &user,
            "a gift for a friend who cooks",
            "--method",
            "hybrid",
        ])
        .args([
            "--rerank",
            "4",
            "--rerank-weight",
            "0.5",
            "--adapter",
            f,
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let judged = answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["judge"].is_number())
        .count();
    assert_eq!(judged, 4, "{text}");
}

/// Settings distil-judge cannot train with are refused before anything is derived or asked of
/// the teacher (the training step would refuse them only after ~45 minutes of both), the out
/// folder not even created.
#[test]
fn distil_judge_refuses_a_setting_it_cannot_train_with_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("distil");
    for (extra, want) in [
        (
            &["--lora-targets", "q,mlp"][..],
            "unknown LoRA target \"mlp\" (q,k,v,o,gate,up,down)",
        ),
        (
            &["--lora-layers", "0"][..],
            "an adapter needs rank 1 and one layer at least",
        ),
        (
            &["--lora-rank", "0"][..],
            "an adapter needs rank 1 and one layer at least",
        ),
        (
            &["--frozen-memo-gb=-1"][..],
            "--frozen-memo-gb -1: a size in GiB",
        ),
        (&["--depth", "1"][..], "a list needs 2 items at least"),
        (
            &["--target-weight", "1.5"][..],
            "--judge-target-weight 1.5: a weight in [0, 1]",
        ),
        (
            &["--per-user", "0", "--users", "3"][..],
            "--per-user 0 derives none: drop one",
        ),
    ] {
        let o = tiny("distil-judge")
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
        assert!(!out.exists(), "{extra:?}");
    }
}

/// Cross-validation of the recipe inside `train`: `distil-judge --hold-out 1/2` derives from
/// and trains on the other fold's users only, the adapter is checked with `eval --split train
/// --fold 1/2`, and `compare` joins the folds' runs into one paired comparison.
#[test]
fn distil_judge_holds_a_fold_out_and_the_folds_runs_compare_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mem.sqlite");
    let out = dir.path().join("fold1");
    let fold = |i| mrrec_data::Fold { index: i, of: 2 };
    // The recipe on fold 1's complement, small.
    let fold1 = |out: &std::path::Path, extra: &[&str]| {
        tiny("distil-judge")
            .arg("--out")
            .arg(out)
            .args(["--teacher", "smollm2-135m-instruct"])
            .args(["--per-user", "1", "--users", "3", "--depth", "4"])
            .args(["--train-limit", "2", "--steps", "1", "--hold-out", "1/2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = fold1(&out, &["--target-weight", "0.3"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("users of fold 1/2 held out)"), "{stderr}");
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["hold_out"], "1/2");
    // The target mixed into the teacher's lists reaches the training run.
    assert_eq!(recipe["target_weight"], 0.3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train/train.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["sft"]["judge"]["target_weight"], 0.3, "{cfg}");
    // The same fold's recipe without the target and with the real requests' lists learnt 3
    // times an epoch, given that run's teacher scores: the teacher is asked nothing, and the
    // file given is not part of the recipe.
    let plain = dir.path().join("fold1-plain");
    let kept = out.join("train/judge-teacher.jsonl");
    let o = fold1(
        &plain,
        &[
            "--teacher-scores",
            kept.to_str().unwrap(),
            "--own-repeat",
            "3",
            "--target-weight",
            "0",
            "--lora-layers",
            "2",
            "--lora-targets",
            "q, v",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("queries scored (2 kept from before), 0 tokens in"),
        "{err}"
    );
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("recipe.json")).unwrap()).unwrap();
    assert!(recipe.get("teacher_scores").is_none(), "{recipe}");
    assert_eq!(recipe["own_repeat"], 3, "{recipe}");
    assert!(recipe.get("target_weight").is_none(), "{recipe}");
    // The adapter's size is the recipe's too, the targets as one list however spaced; the
    // rank left at its default is not written.
    assert_eq!(recipe["lora_layers"], 2, "{recipe}");
    assert_eq!(recipe["lora_targets"], "q,v", "{recipe}");
    assert!(recipe.get("lora_rank").is_none(), "{recipe}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("train/train.json")).unwrap())
            .unwrap();
    let lora = cfg["lora"].as_str().unwrap();
    assert!(
        lora.contains("rank: 8") && lora.contains("targets: [Q, V]") && lora.contains("layers: 2"),
        "{lora}"
    );
    let sft = &cfg["sft"];
    assert_eq!(sft["judge"]["own_repeat"], 3, "{cfg}");
    // Its 2 lists, each of an own request 3 times: what an epoch holds.
    let own = sft["own_lists"].as_u64().unwrap();
    assert!(own <= 2 && sft["queries"] == 2, "{sft}");
    assert_eq!(sft["kept"].as_u64().unwrap(), 2 + 2 * own, "{sft}");
    assert!(
        err.contains(&format!(
            "{own} of 2 lists are the data's own requests, each learnt 3 times an epoch"
        )),
        "{err}"
    );
    // The real requests' lists are learnt twice by default.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train/train.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["sft"]["judge"]["own_repeat"], 2, "{cfg}");
    // No request, history or snapshot of a fold-1 user reached the data it learnt from.
    let ds =
        mrrec_data::Dataset::load(&out.join("data"), None, &mrrec_data::LoadOptions::default())
            .unwrap();
    assert!(ds.queries.len() > 3);
    for q in ds.queries.all() {
        assert!(!fold(1).holds(&q.query().user_id), "{}", q.query().user_id);
    }
    let reviews = std::fs::read_to_string(out.join("data/reviews.jsonl")).unwrap();
    for line in reviews.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(!fold(1).holds(r["user_id"].as_str().unwrap()), "{line}");
    }
    // It says how to check it, on the fold it never saw (not how to ship it).
    let adapter = out.join("adapter.safetensors");
    let f = adapter.to_str().unwrap();
    assert!(
        stdout.contains("--split train --fold 1/2 --method hybrid --rerank 4 --rerank-weight 0.5")
            && stdout.contains(f),
        "{stdout}"
    );
    assert!(!stdout.contains("mrrec serve"), "{stdout}");
    // The check: fold 1 with the adapter, fold 2 (here the plain method), and the whole.
    let eval = |name: &str, extra: &[&str]| {
        let run = dir.path().join(name);
        let o = tiny("eval")
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(&run)
            .args(["--split", "train", "--method", "hybrid"])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            run,
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, f1, err) = eval(
        "f1",
        &[
            "--limit",
            "4",
            "--fold",
            "1/2",
            "--rerank",
            "4",
            "--rerank-weight",
            "0.5",
            "--adapter",
            f,
        ],
    );
    assert!(ok, "{err}");
    let (ok, f2, err) = eval("f2", &["--limit", "4", "--fold", "2/2"]);
    assert!(ok, "{err}");
    let users = |run: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(run.join("per_query.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["user_id"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(users(&f1).len(), 4);
    assert!(users(&f1).iter().all(|u| fold(1).holds(u)));
    assert!(users(&f2).iter().all(|u| fold(2).holds(u)));
    // A fold is part of the run: fold 2 does not resume into fold 1's folder.
    let (ok, _, err) = eval("f1", &["--limit", "4", "--fold", "2/2"]);
    assert!(!ok && err.contains("different run"), "{err}");
    // A fold of `val` is refused: it is read whole.
    let o = tiny("eval")
        .arg("--out")
        .arg(dir.path().join("v"))
        .args(["--split", "val", "--method", "bm25", "--fold", "1/2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cross-validation inside `train`"),
        "{err}"
    );
    // The folds joined against the whole `train` set: paired on the 8 queries of both folds.
    let (ok, whole, err) = eval("whole", &[]);
    assert!(ok, "{err}");
    let joined = format!("{},{}", f1.display(), f2.display());
    let o = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .args([
            "compare",
            &joined,
            whole.to_str().unwrap(),
            "--rounds",
            "100",
        ])
        .arg("--data")
        .arg(common::mini())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("2 folds joined"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("| N@100 |") && l.contains("| 8 |")),
        "{text}"
    );
    assert!(!text.contains("Per origin"), "{text}");
    // On a derived data set `compare` also splits the data's own requests from the derived
    // ones (asked by snapshot users), each paired.
    let derived = out.join("data");
    let on_derived = |method: &str| {
        let run = dir.path().join(format!("derived-{method}"));
        let o = tiny_on("eval", &derived)
            .arg("--store")
            .arg(dir.path().join("derived.sqlite"))
            .arg("--out")
            .arg(&run)
            .args(["--split", "train", "--method", method])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        run
    };
    let (bm25, hybrid) = (on_derived("bm25"), on_derived("hybrid"));
    let o = Command::new(env!("CARGO_BIN_EXE_mrrec"))
        .arg("compare")
        .args([&hybrid, &bm25])
        .args(["--rounds", "100"])
        .arg("--data")
        .arg(&derived)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds =
        mrrec_data::Dataset::load(&derived, None, &mrrec_data::LoadOptions::default()).unwrap();
    let (mut own, mut snapshots) = (0, 0);
    for q in ds.queries.all() {
        match mrrec_data::derive::snapshot_of(&q.query().user_id) {
            Some(_) => snapshots += 1,
            None => own += 1,
        }
    }
    assert!(own > 0 && snapshots > 0, "{own} {snapshots}");
    let row = |name: &str, n: usize| {
        text.lines()
            .any(|l| l.starts_with(&format!("| {name} | {n} |")))
    };
    assert!(
        text.contains("Per origin") && row("own", own) && row("derived", snapshots),
        "{text}"
    );
}
