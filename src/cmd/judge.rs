//! `mrrec distil-judge`: the re-ranking stage's judge distilled from a stronger model in one
//! command — more `train` requests written by the teacher (`derive-queries`), the teacher's
//! scores of each request's hybrid top N, and the student's LoRA adapter trained on them as
//! lists (`train --judge --judge-listwise --judge-teacher`), with the settings of the best judge
//! measured so far (BENCHMARKS.md, session 33; α .3 and the real requests' lists learnt twice
//! chosen by cross-validation inside `train`, sessions 37–40) as defaults. Resumable: rerun the
//! same command.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};

use crate::args::DataArgs;
use crate::cmd::train::{derive_queries, DeriveQueriesCmd, TrainCmd};

#[derive(Args)]
pub(crate) struct DistilJudgeCmd {
    /// The source data: its `train` users' purchases become the derived requests, and its
    /// `train` rows are learnt too (`--max-items` slices the catalogue for training only).
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// The student: the local model the adapter is for (a registry id or a GGUF path).
    #[arg(long, env = "MRREC_LLM_MODEL", default_value = crate::args::DEFAULT_MODEL)]
    pub(crate) model: String,
    /// The teacher: writes the derived requests and scores every judged item (a registry id or
    /// a GGUF path; with --teacher-url, the server's model name).
    #[arg(long, default_value = "qwen2.5-coder-1.5b-instruct")]
    pub(crate) teacher: String,
    /// The teacher is served by this OpenAI-compatible server (it must return `top_logprobs`).
    #[arg(long)]
    pub(crate) teacher_url: Option<String>,
    /// The run's folder: recipe.json, data/ (the derived data set), train/ (the training run,
    /// with the teacher's scores in train/judge-teacher.jsonl), adapter.safetensors.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Derived requests per `train` user, the latest purchases first (`derive-queries
    /// --per-user`); 0 learns the data's own `train` rows only.
    #[arg(long, default_value_t = 8)]
    pub(crate) per_user: usize,
    /// Derive from the first N `train` users only (sorted by id).
    #[arg(long)]
    pub(crate) users: Option<usize>,
    /// Optimiser steps (4 requests each); a rerun with more trains on from where it stopped.
    #[arg(long, default_value_t = 200)]
    pub(crate) steps: usize,
    /// Items judged per request: the stage's depth (`--rerank N` where the adapter is used).
    #[arg(long, default_value_t = 20)]
    pub(crate) depth: usize,
    /// Learn a seeded subset of this many `train` requests.
    #[arg(long)]
    pub(crate) train_limit: Option<usize>,
    /// Seed of the subset and the order the requests are learnt in.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Leave out the `train` users of fold I of K (`derive-queries --hold-out`): the adapter
    /// never learns from them, and is checked on their `train` queries (`eval --split train
    /// --fold I/K`) — cross-validation of a recipe inside `train`, so `val` is read once.
    #[arg(long, value_name = "I/K")]
    pub(crate) hold_out: Option<mrrec_data::Fold>,
    /// Mix each request's own answer (the item bought) into the teacher's labels with this
    /// weight α (`train --judge-target-weight`); 0: the teacher's scores alone. .3 by default:
    /// chosen by cross-validation inside `train` (BENCHMARKS.md, sessions 37–40) — a tie with 0
    /// (+.0005 N@100 on 288 requests of users each fold never saw, p = .97), which the rule
    /// written before the result gave to .3.
    #[arg(long, value_name = "ALPHA", default_value_t = 0.3)]
    pub(crate) target_weight: f64,
    /// Learn each list of the source data's own requests K times an epoch and the derived
    /// ones once (`train --judge-own-repeat`); 1: every list once. 2 by default: chosen by
    /// cross-validation inside `train` (BENCHMARKS.md, session 40) — a tie with 1 (+.0025 N@100
    /// on the 106 real requests of users each fold never saw, −.007 on all 288, p = .36), which
    /// the rule written before the result gave to 2.
    #[arg(long, value_name = "K", default_value_t = 2)]
    pub(crate) own_repeat: usize,
    /// Reuse the teacher's scores kept by another run (its train/judge-teacher.jsonl;
    /// repeatable; `train --judge-teacher-scores`): e.g. the same fold's run with another
    /// α, or every fold's file for the whole-data adapter — the teacher is asked only for
    /// lists found in none. Not part of the recipe: the scores are the same teacher's.
    #[arg(long, value_name = "FILE")]
    pub(crate) teacher_scores: Vec<PathBuf>,
    /// The adapter's size: LoRA rank (`train --lora-rank`).
    #[arg(long, default_value_t = 8)]
    pub(crate) lora_rank: usize,
    /// The adapter's size: the top this-many layers adapted (`train --lora-layers`; the frozen
    /// layers below are computed once per request and remembered, so more adapted layers cost
    /// more per step).
    #[arg(long, default_value_t = 4)]
    pub(crate) lora_layers: usize,
    /// The adapter's size: projections adapted in each of those layers (q,k,v,o,gate,up,down;
    /// `train --lora-targets`).
    #[arg(long, default_value = "q,k,v,o")]
    pub(crate) lora_targets: String,
    /// Remember the frozen layers' states of the lists up to this many GiB, so that epochs
    /// after the first run only the adapted layers (`train --frozen-memo-gb`; 0 on a machine
    /// short of memory). Not part of the recipe: the same adapter either way.
    #[arg(long, value_name = "GIB", default_value_t = 4.0)]
    pub(crate) frozen_memo_gb: f64,
    /// A step's lists learnt at once, one per thread (`train --parallel-runs`; unset: as many
    /// as the threads, `RAYON_NUM_THREADS`). Not part of the recipe: the same adapter either
    /// way; each list at once keeps its graph in memory meanwhile (~1.2 GB on Qwen 0.5B).
    #[arg(long, value_name = "N")]
    pub(crate) parallel_runs: Option<usize>,
}

/// A command's arguments parsed as its command line would be: the defaults and checks of the
/// command itself, not a copy of them.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct Parsed<T: Args> {
    #[command(flatten)]
    inner: T,
}

fn parse<T: Args>(what: &str, args: &[String]) -> Result<T> {
    Parsed::<T>::try_parse_from(args)
        .map(|p| p.inner)
        .with_context(|| format!("the {what} step's arguments {args:?}"))
}

fn os(p: &Path) -> String {
    p.display().to_string()
}

/// The settings a folder was started with: a rerun must repeat them (all but `--steps`, which
/// a rerun may raise to train on from the last checkpoint, and the data's parsing options).
fn recipe(a: &DistilJudgeCmd) -> serde_json::Value {
    let mut r = serde_json::json!({
        "data": os(&a.data.data),
        "queries": a.data.queries.as_deref().map(os),
        "model": a.model,
        "teacher": a.teacher,
        "teacher_url": a.teacher_url,
        "per_user": a.per_user,
        "users": a.users,
        "depth": a.depth,
        "train_limit": a.train_limit,
        "seed": a.seed,
    });
    // Written only when set, so folders started before it existed still resume.
    if let Some(f) = &a.hold_out {
        r["hold_out"] = serde_json::json!(f.to_string());
    }
    let later = [
        ("target_weight", serde_json::json!(a.target_weight)),
        ("own_repeat", serde_json::json!(a.own_repeat)),
        ("lora_rank", serde_json::json!(a.lora_rank)),
        ("lora_layers", serde_json::json!(a.lora_layers)),
        (
            "lora_targets",
            serde_json::json!(targets_written(&a.lora_targets)),
        ),
    ];
    for (k, v) in later {
        if !same(&v, &unwritten(k)) {
            r[k] = v;
        }
    }
    r
}

/// `--lora-targets` as the recipe keeps it: "q, v" and "q,v" are the same adapter.
fn targets_written(list: &str) -> String {
    list.split(',').map(str::trim).collect::<Vec<_>>().join(",")
}

/// Settings added to the recipe later, and what a recipe without one meant: written only when
/// they differ from it, so a folder started before a setting existed still resumes (`null`:
/// a setting that was always written, or not given).
fn unwritten(k: &str) -> serde_json::Value {
    match k {
        "target_weight" => serde_json::json!(0),
        "own_repeat" => serde_json::json!(1),
        "lora_rank" => serde_json::json!(8),
        "lora_layers" => serde_json::json!(4),
        "lora_targets" => serde_json::json!("q,k,v,o"),
        _ => serde_json::Value::Null,
    }
}

/// A recipe's setting, an unwritten one read as what it meant then.
fn setting(r: &serde_json::Value, k: &str) -> serde_json::Value {
    r.get(k).cloned().unwrap_or_else(|| unwritten(k))
}

/// Two settings' values equal, a number whichever way it was written (1 and 1.0).
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The command-line words that give a recipe's setting `k` the value `v`.
fn flag(k: &str, v: &serde_json::Value) -> String {
    let name = k.replace('_', "-");
    match v {
        serde_json::Value::Null => format!("without --{name}"),
        serde_json::Value::String(s) => format!("--{name} {s}"),
        v => format!("--{name} {v}"),
    }
}

/// What differs between the recipe a folder was started with and a rerun's, each with the
/// flag that repeats the first: every setting either names, an unwritten one read as its
/// meaning then (a folder started with α .3 is not resumed at 0 because a rerun left it out).
fn recipe_differences(was: &serde_json::Value, now: &serde_json::Value) -> Vec<(String, String)> {
    let mut keys: Vec<&String> = now
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    for (k, _) in was.as_object().into_iter().flatten() {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .filter_map(|k| {
            let (then, at) = (setting(was, k), setting(now, k));
            (!same(&then, &at)).then(|| (format!("{k}: {then} then, {at} now"), flag(k, &then)))
        })
        .collect()
}

/// Writes `OUT/recipe.json`, or checks a rerun repeats it (naming what differs and how to
/// repeat it).
fn check_recipe(out: &Path, now: &serde_json::Value) -> Result<()> {
    let path = out.join("recipe.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let was: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a distil-judge recipe", path.display()))?;
            let differ = recipe_differences(&was, now);
            if !differ.is_empty() {
                let (what, flags): (Vec<String>, Vec<String>) = differ.into_iter().unzip();
                bail!(
                    "{} was started with other settings ({}): rerun with {} to resume, or give a new --out",
                    out.display(),
                    what.join("; "),
                    flags.join(" ")
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(now)?;
            std::fs::write(&path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The training step's command line, parsed as `mrrec train` parses it (its data set is the
/// derived one, set once it exists).
fn training_cmd(a: &DistilJudgeCmd, run_dir: &Path) -> Result<TrainCmd> {
    let mut args: Vec<String> = [
        "--out",
        &os(run_dir),
        "--judge",
        "--judge-listwise",
        "--judge-teacher",
        &a.teacher,
        "--rerank",
        &a.depth.to_string(),
        "--rerank-memory",
        "none",
        "--judge-negatives",
        &(a.depth - 1).to_string(),
        "--steps",
        &a.steps.to_string(),
        "--queries-per-step",
        "4",
        "--lr",
        "1e-3",
        "--lora-rank",
        &a.lora_rank.to_string(),
        "--lora-layers",
        &a.lora_layers.to_string(),
        "--lora-targets",
        &targets_written(&a.lora_targets),
        "--kl",
        "0",
        "--val-every",
        "0",
        "--val-queries",
        "0",
        "--seed",
        &a.seed.to_string(),
        // One word each, so a negative value reaches the step's own check as a value.
        &format!("--frozen-memo-gb={}", a.frozen_memo_gb),
    ]
    .map(String::from)
    .to_vec();
    if let Some(url) = &a.teacher_url {
        args.extend(["--judge-teacher-url".into(), url.clone()]);
    }
    if let Some(n) = a.train_limit {
        args.extend(["--train-limit".into(), n.to_string()]);
    }
    if a.target_weight != 0.0 {
        args.push(format!("--judge-target-weight={}", a.target_weight));
    }
    if a.own_repeat != 1 {
        args.extend(["--judge-own-repeat".into(), a.own_repeat.to_string()]);
    }
    for f in &a.teacher_scores {
        args.extend(["--judge-teacher-scores".into(), os(f)]);
    }
    if let Some(n) = a.parallel_runs {
        args.extend(["--parallel-runs".into(), n.to_string()]);
    }
    parse("training", &args)
}

/// `mrrec distil-judge`: derive → teacher scores → listwise training → `OUT/adapter.safetensors`.
pub(crate) fn run(a: DistilJudgeCmd) -> Result<()> {
    anyhow::ensure!(
        a.depth >= 2,
        "--depth {}: a list needs 2 items at least",
        a.depth
    );
    anyhow::ensure!(a.steps >= 1, "--steps must be at least 1");
    // The training step's command is checked before the derivation and the teacher, not
    // after them.
    let run_dir = a.out.join("train");
    let mut t = training_cmd(&a, &run_dir)?;
    crate::cmd::train::checked(&t)?;
    if a.per_user == 0 && a.users.is_some() {
        bail!("--users says whose purchases are derived, but --per-user 0 derives none: drop one");
    }
    if a.per_user == 0 && a.hold_out.is_some() {
        bail!("--hold-out leaves a fold out of the derived data set, but --per-user 0 trains on the data's own rows: give --per-user 1 or more");
    }
    a.data.check_dir()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    check_recipe(&a.out, &recipe(&a))?;
    let started = std::time::Instant::now();
    // 1. The derived data set, written beside and renamed when whole (a killed derivation leaves
    //    no half data set; its LLM answers are cached, so the rerun is quick up to where it was).
    let data = if a.per_user == 0 {
        a.data.clone()
    } else {
        let dir = a.out.join("data");
        if dir.join("queries.csv").exists() {
            eprintln!("step 1/2: the derived requests of {} (kept)", dir.display());
        } else {
            let partial = a.out.join("data.partial");
            if partial.exists() {
                std::fs::remove_dir_all(&partial)
                    .with_context(|| format!("removing {}", partial.display()))?;
            }
            eprintln!(
                "step 1/2: {} writes up to {} requests per `train` user (derive-queries)",
                a.teacher, a.per_user
            );
            let mut args = vec![
                "--out".to_string(),
                os(&partial),
                "--per-user".into(),
                a.per_user.to_string(),
            ];
            if let Some(n) = a.users {
                args.extend(["--users".into(), n.to_string()]);
            }
            if let Some(f) = &a.hold_out {
                args.extend(["--hold-out".into(), f.to_string()]);
            }
            let mut d: DeriveQueriesCmd = parse("derive", &args)?;
            // The derived directory links the whole item file; a slice applies to training.
            d.data = DataArgs {
                max_items: None,
                ..a.data.clone()
            };
            d.llm.model = a.teacher.clone();
            d.llm.llm_url = a.teacher_url.clone();
            d.as_step = true;
            derive_queries(d)?;
            std::fs::rename(&partial, &dir)
                .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
        }
        DataArgs {
            data: dir,
            queries: None,
            ..a.data.clone()
        }
    };
    // 2. The student learns the teacher's scores of each request's hybrid top N as one list
    //    (the teacher's scores are kept in train/judge-teacher.jsonl; a rerun resumes).
    eprintln!(
        "step 2/2: {} learns {}'s scores of each request's hybrid top {} ({} steps; run {})",
        a.model,
        a.teacher,
        a.depth,
        a.steps,
        run_dir.display()
    );
    t.data = data;
    t.assistant.llm.model = a.model.clone();
    t.assistant.llm.llm_url = None;
    crate::cmd::train::run(t)?;
    let trained = run_dir.join("adapter.safetensors");
    let adapter = a.out.join("adapter.safetensors");
    std::fs::copy(&trained, &adapter)
        .with_context(|| format!("copying {} to {}", trained.display(), adapter.display()))?;
    println!(
        "{}: the judge adapter of {} distilled from {} ({:.0}s)",
        adapter.display(),
        a.model,
        a.teacher,
        started.elapsed().as_secs_f64()
    );
    let f = os(&adapter);
    // The adapter fits its own model: name it unless it is the default.
    let m = if a.model == crate::args::DEFAULT_MODEL {
        String::new()
    } else {
        format!(" --model {}", a.model)
    };
    if let Some(fold) = &a.hold_out {
        // A fold's adapter is a check of the recipe, not the judge to ship.
        let data = os(&a.data.data);
        println!(
            "check it on the fold it never saw: mrrec eval{m} --data {data} --split train --fold {fold} --method hybrid --rerank {d} --rerank-weight 0.5 --adapter {f} --out RUN-{i}
                     then, with every fold's run: mrrec compare RUN-1,RUN-2,... BASELINE --data {data}  (BASELINE: the same eval on --split train without --fold and --adapter, or another recipe's folds)",
            d = a.depth,
            i = fold.index
        );
        return Ok(());
    }
    println!(
        "use it: mrrec eval{m} --method hybrid --rerank {d} --rerank-weight 0.5 --adapter {f} ...\n        \
         mrrec recommend{m} --user U \"request\" --method hybrid --rerank {d} --rerank-weight 0.5 --adapter {f}\n        \
         mrrec demo{m} --rerank {d} --rerank-weight 0.5 --judge-adapter {f}\n        \
         mrrec serve{m} --adapter {f}   (requests: \"method\": \"hybrid\", \"rerank\": {{\"depth\": {d}, \"weight\": 0.5}})",
        d = a.depth
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rerun_is_refused_for_any_setting_either_recipe_names_with_the_flags_that_repeat_the_first()
    {
        let base = json!({"data": "d", "depth": 20, "hold_out": "1/2", "teacher_url": null});
        let with = |k: &str, v: Option<serde_json::Value>| {
            let mut r = base.clone();
            match v {
                Some(v) => r[k] = v,
                None => drop(r.as_object_mut().unwrap().remove(k)),
            }
            r
        };
        let mixed = with("target_weight", Some(json!(0.3)));
        let cases = [
            (base.clone(), base.clone(), None),
            // A setting given differently, only by the first run, or only by the rerun.
            (
                base.clone(),
                with("depth", Some(json!(10))),
                Some(("depth: 20 then, 10 now", "--depth 20")),
            ),
            (
                base.clone(),
                with("hold_out", None),
                Some(("hold_out: \"1/2\" then, null now", "--hold-out 1/2")),
            ),
            (
                with("hold_out", None),
                base.clone(),
                Some(("hold_out: null then, \"1/2\" now", "without --hold-out")),
            ),
            // An unwritten α or repetition is what it meant before it existed: 0 and 1.
            (
                base.clone(),
                mixed.clone(),
                Some(("target_weight: 0 then, 0.3 now", "--target-weight 0")),
            ),
            (
                mixed,
                base.clone(),
                Some(("target_weight: 0.3 then, 0 now", "--target-weight 0.3")),
            ),
            (
                base.clone(),
                json!({"data": "d", "depth": 20, "hold_out": "1/2", "teacher_url": null, "own_repeat": 1, "target_weight": 0.0}),
                None,
            ),
            (
                with("own_repeat", Some(json!(2))),
                base.clone(),
                Some(("own_repeat: 2 then, 1 now", "--own-repeat 2")),
            ),
            // The adapter's size: unwritten is the size before it was a flag (rank 8, the top 4
            // layers' q,k,v,o).
            (
                base.clone(),
                json!({"data": "d", "depth": 20, "hold_out": "1/2", "teacher_url": null, "lora_rank": 8, "lora_layers": 4, "lora_targets": "q,k,v,o"}),
                None,
            ),
            (
                with("lora_layers", Some(json!(8))),
                base.clone(),
                Some(("lora_layers: 8 then, 4 now", "--lora-layers 8")),
            ),
            (
                base.clone(),
                with("lora_targets", Some(json!("q,k,v,o,gate,up,down"))),
                Some((
                    "lora_targets: \"q,k,v,o\" then, \"q,k,v,o,gate,up,down\" now",
                    "--lora-targets q,k,v,o",
                )),
            ),
        ];
        for (was, now, want) in cases {
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(w, f)| (w.into(), f.into()))
                .collect();
            assert_eq!(
                recipe_differences(&was, &now),
                want,
                "{was} then, {now} now"
            );
        }
    }
}
