//! `mrrec train`: GRPO on `train` queries.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::args::*;

#[derive(clap::Args, Clone)]
pub(crate) struct TrainArgs {
    /// Run folder: train.json, log.jsonl, checkpoint/, adapter.safetensors, best-adapter.safetensors.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Trajectories per query (G).
    #[arg(long, default_value_t = 5)]
    pub(crate) group: usize,
    /// Queries per optimiser step.
    #[arg(long, default_value_t = 2)]
    pub(crate) queries_per_step: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 50)]
    pub(crate) steps: usize,
    /// Use a seeded subset of this many training queries.
    #[arg(long)]
    pub(crate) train_limit: Option<usize>,
    /// Run a group's trajectories one after another instead of decoding them together.
    #[arg(long)]
    pub(crate) sequential_rollouts: bool,
    /// Compute the frozen layers below the adapter with the training model's dense f32 copy
    /// (exact) instead of the inference model's prompt prefill (faster; the default).
    #[arg(long)]
    pub(crate) exact_lower: bool,
    /// Fine-tuning (--sft, --judge): remember the frozen layers' states of the examples up to
    /// this many GiB, so that every epoch after the first runs only the adapted layers (the
    /// same adapter as without; 0: compute them every time).
    #[arg(long, value_name = "GIB", default_value_t = 4.0)]
    pub(crate) frozen_memo_gb: f64,
    /// Fine-tuning: lists (or groups) of a step whose adapted layers' forward and backward
    /// passes run at once, one per thread — the same adapter as one after another, each
    /// keeping its graph in memory meanwhile (a judge's list of 20 items ~1.2 GB on Qwen 0.5B).
    /// Unset: a listwise judge's lists as many as the threads (`RAYON_NUM_THREADS`),
    /// anything else one at a time.
    #[arg(long, value_name = "N")]
    pub(crate) parallel_runs: Option<usize>,
    /// Rollout temperature.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub(crate) lr: f64,
    /// Clip range ε.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) clip: f64,
    /// KL coefficient to the reference policy (0: none).
    #[arg(long, default_value_t = 0.001)]
    pub(crate) kl: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub(crate) lora_rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) lora_alpha: f32,
    /// Adapt the top this-many layers.
    #[arg(long, default_value_t = 4)]
    pub(crate) lora_layers: usize,
    /// Projections adapted (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "q,v")]
    pub(crate) lora_targets: String,
    /// Validate and keep the best adapter every this many steps.
    #[arg(long, default_value_t = 10)]
    pub(crate) val_every: usize,
    /// Validation queries (seeded subset of `val`).
    #[arg(long, default_value_t = 20)]
    pub(crate) val_queries: usize,
    /// Stop after this many validations without improvement (0: never).
    #[arg(long, default_value_t = 1)]
    pub(crate) patience: usize,
    /// Seed of the query order and the sampling.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Reward weights: R_format, R_rec, R_mem.
    #[arg(long, default_value = "0.1,5,0.1")]
    pub(crate) reward_weights: String,
    /// Supervised fine-tuning instead of GRPO: learn the chosen trajectories of this rollouts
    /// file (`mrrec rollouts`, by this model or one with the same tokenizer — a distillation
    /// teacher): per query the best of G when it beats this model's greedy answer.
    #[arg(long)]
    pub(crate) sft: Option<PathBuf>,
    /// With --sft: learn the kept guided trajectories as the paper's free loop (the controller's
    /// openings written as the model's own text: reasoning, `<tool_call>…</tool_call>`, the tool's
    /// response as the next turn, `\boxed{…}`), re-tokenised from their text with this model's
    /// template — distilling the controller into the model; pair with `--mode free`. Records from
    /// a model with another tokenizer are accepted (they are text here). Free-mode records of this
    /// model's tokenizer are already the free loop: learnt from their own token ids. In `mrrec
    /// iterate`: round 1 samples the controller (guided), later rounds the free loop with the
    /// current adapter.
    #[arg(long)]
    pub(crate) sft_as_free: bool,
    /// With --sft: every query whose samples do not beat the greedy answer teaches that greedy
    /// answer (its calls after the file's greedy ones, decoded again with their token ids), so
    /// that imitating the kept samples does not move the model where it already answered best.
    #[arg(long)]
    pub(crate) sft_anchor: bool,
    /// Start from this adapter (e.g. GRPO after fine-tuning); a checkpoint in --out wins.
    #[arg(long)]
    pub(crate) init_adapter: Option<PathBuf>,
    /// R_rec's two NDCG cutoffs (the paper's 100,1000; e.g. 100,3000 gives profiles that rank
    /// the target below 1,000 a signal).
    #[arg(long, default_value = "100,1000")]
    pub(crate) rec_cutoffs: String,
}

#[derive(Args)]
pub(crate) struct TrainCmd {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    #[command(flatten)]
    pub(crate) tenant: TenantArg,
    /// GRPO: which calls each rollout samples and the loss learns — `answer`: only the guided
    /// loop's final profile, in the context of the greedy reasoning and memory calls (as
    /// `mrrec rollouts --sample answer`); `all`: every call.
    #[arg(long, value_enum, default_value_t = SampleCalls::All)]
    pub(crate) sample: SampleCalls,
    /// Fine-tune the re-ranking stage's judge instead of the assistant (`mrrec eval --rerank N
    /// --adapter OUT/adapter.safetensors` uses it): per `train` query, its target is a `Yes`
    /// and `--judge-negatives` other items of the request's hybrid top `--rerank N` (default 20)
    /// are a `No`, asked as the stage asks, with the memory of `--rerank-memory`. No validation
    /// during training (compare with `eval --rerank` on `train`).
    #[arg(long)]
    pub(crate) judge: bool,
    /// With --judge: negatives per query (with a teacher: the other items judged per query,
    /// e.g. 19 for the whole top 20).
    #[arg(long, default_value_t = 3)]
    pub(crate) judge_negatives: usize,
    /// With --judge: distil a teacher judge — each item's label is this model's P(`Yes`) as the
    /// stage's judge (a registry id or GGUF path; with --judge-teacher-url, the server's model
    /// name) instead of the query's own target/negative label. Its scores are kept in
    /// OUT/judge-teacher.jsonl, found again by the question asked (request, category, memory),
    /// not the query's id: a resumed run, a second student given the file, or a data set derived
    /// again reuses them.
    #[arg(long, value_name = "MODEL")]
    pub(crate) judge_teacher: Option<String>,
    /// With --judge-teacher: the teacher is served by this OpenAI-compatible server (it must
    /// return `top_logprobs`).
    #[arg(long, value_name = "URL")]
    pub(crate) judge_teacher_url: Option<String>,
    /// With --judge-teacher: the teacher is the local model with this adapter (e.g. a judge
    /// trained before).
    #[arg(long, value_name = "FILE")]
    pub(crate) judge_teacher_adapter: Option<PathBuf>,
    /// With --judge-teacher: also reuse the same teacher's scores kept by another run (its
    /// judge-teacher.jsonl; repeatable) — e.g. the other folds' of a cross-validation, or a
    /// second student's. Lists found there are not asked again and are copied into this run's
    /// own OUT/judge-teacher.jsonl; other teachers' lines are ignored.
    #[arg(long, value_name = "FILE")]
    pub(crate) judge_teacher_scores: Vec<PathBuf>,
    /// With --judge: learn each query's judged items as one list — the order (and spacing) of
    /// the labels' scores within the query, KL(softmax(labels) ‖ softmax(judge scores)) —
    /// instead of each item's label on its own. Labels: the teacher's P(`Yes`), or without a
    /// teacher 1 for the target and 0 for the others.
    #[arg(long)]
    pub(crate) judge_listwise: bool,
    /// With --judge-listwise and --judge-teacher: mix the query's own answer into each list's
    /// labels with this weight α — (1 − α)·the teacher's order + α·the target the shopper took —
    /// so the student learns the true label beside its teacher's (0: the teacher's alone).
    #[arg(long, value_name = "ALPHA", default_value_t = 0.0)]
    pub(crate) judge_target_weight: f64,
    /// With --judge: learn each list of the data's own requests K times an epoch, the ones
    /// `derive-queries` wrote from a purchase (asked by a snapshot user) once — a judge's gain
    /// shows on real requests (BENCHMARKS, session 38). 1: every list once.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub(crate) judge_own_repeat: usize,
    #[command(flatten)]
    pub(crate) rerank: RerankArgs,
}

/// `--sft-anchor` learns the greedy answer's own token ids: never with a free form.
fn check_anchor(train: &TrainArgs) -> Result<()> {
    if train.sft_as_free && train.sft_anchor {
        bail!("--sft-anchor learns the greedy answer's own token ids, not a free form: drop one of --sft-anchor, --sft-as-free");
    }
    Ok(())
}

/// The adapter's settings checked (`--lora-rank`, `--lora-layers`, `--frozen-memo-gb`) and
/// `--lora-targets` read: the projections adapted, comma-separated (q,k,v,o,gate,up,down).
pub(crate) fn adapter_settings(args: &TrainArgs) -> Result<Vec<mrrec_llm_local::model::Proj>> {
    use mrrec_llm_local::model::Proj;
    let gb = args.frozen_memo_gb;
    if !(gb >= 0.0 && gb.is_finite()) {
        bail!("--frozen-memo-gb {gb}: a size in GiB, 0 or more (0: remember nothing)");
    }
    anyhow::ensure!(
        args.lora_rank >= 1 && args.lora_layers >= 1,
        "--lora-rank {} --lora-layers {}: an adapter needs rank 1 and one layer at least",
        args.lora_rank,
        args.lora_layers
    );
    args.lora_targets
        .split(',')
        .map(|t| match t.trim() {
            "q" => Ok(Proj::Q),
            "k" => Ok(Proj::K),
            "v" => Ok(Proj::V),
            "o" => Ok(Proj::O),
            "gate" => Ok(Proj::Gate),
            "up" => Ok(Proj::Up),
            "down" => Ok(Proj::Down),
            o => Err(anyhow::anyhow!(
                "unknown LoRA target {o:?} (q,k,v,o,gate,up,down)"
            )),
        })
        .collect()
}

/// The command's settings checked without reading anything (what `--judge` learns when given):
/// `distil-judge` runs it before the derivation and the teacher its training step follows.
pub(crate) fn checked(a: &TrainCmd) -> Result<Option<JudgeJob>> {
    if (a.train.sft_as_free || a.train.sft_anchor) && a.train.sft.is_none() {
        bail!("--sft-as-free and --sft-anchor say how to learn a rollouts file: give it with --sft FILE");
    }
    check_anchor(&a.train)?;
    if a.train.sft.is_some() && a.sample == SampleCalls::Answer {
        bail!("--sample answer says what GRPO's rollouts sample; fine-tuning learns what its rollouts file sampled (`mrrec rollouts --sample`): drop --sample");
    }
    adapter_settings(&a.train)?;
    judge_data(a)
}

pub(crate) fn run(a: TrainCmd) -> Result<()> {
    let judge = checked(&a)?;
    train_cmd(
        a.data,
        a.assistant,
        a.train,
        a.sample,
        &a.tenant.tenant,
        false,
        judge,
    )?;
    Ok(())
}

/// The teacher judge of `--judge-teacher`.
pub(crate) struct TeacherSpec {
    model: String,
    url: Option<String>,
    adapter: Option<PathBuf>,
    /// `--judge-teacher-scores`: other runs' kept scores.
    also: Vec<PathBuf>,
}

/// What `--judge` learns: the examples' settings and, distilling, the teacher.
pub(crate) struct JudgeJob {
    data: mrrec_train::judge::JudgeData,
    teacher: Option<TeacherSpec>,
}

/// What `--judge` learns from, checked (`None` without it; its flags are refused then).
fn judge_data(a: &TrainCmd) -> Result<Option<JudgeJob>> {
    if a.judge_teacher.is_none()
        && (a.judge_teacher_url.is_some() || a.judge_teacher_adapter.is_some())
    {
        bail!("--judge-teacher-url and --judge-teacher-adapter say where the teacher is: add --judge-teacher MODEL");
    }
    if a.judge_teacher.is_none() && !a.judge_teacher_scores.is_empty() {
        bail!("--judge-teacher-scores reuses a teacher's kept scores: add --judge-teacher MODEL (the teacher that wrote them)");
    }
    if a.judge_teacher_url.is_some() && a.judge_teacher_adapter.is_some() {
        bail!("--judge-teacher-adapter applies to a local teacher; a server (--judge-teacher-url) serves its own weights: drop one");
    }
    if !a.judge {
        if a.rerank.rerank.is_some() || a.rerank.rerank_memory.is_some() {
            bail!("--rerank and --rerank-memory say which judge `--judge` trains: add --judge");
        }
        if a.judge_teacher.is_some() {
            bail!("--judge-teacher gives the labels of the judge `--judge` trains: add --judge");
        }
        if a.judge_listwise {
            bail!("--judge-listwise says how `--judge` learns its labels: add --judge");
        }
        if a.judge_target_weight != 0.0 {
            bail!("--judge-target-weight mixes the target into the labels of the judge `--judge` trains: add --judge");
        }
        if a.judge_own_repeat != 1 {
            bail!("--judge-own-repeat says how often `--judge` learns each real request's list: add --judge");
        }
        return Ok(None);
    }
    if a.train.sft.is_some() || a.train.sft_as_free || a.train.sft_anchor {
        bail!("--judge learns the re-ranking judge from `train` targets, not a rollouts file: drop --sft");
    }
    if a.sample == SampleCalls::Answer {
        bail!("--sample answer says what GRPO's rollouts sample; --judge samples nothing: drop --sample");
    }
    if a.rerank.rerank_weight.is_some() {
        bail!("--rerank-weight is the judge's weight when it answers (`eval --rerank-weight`), not in training: drop it");
    }
    if a.judge_negatives == 0 {
        bail!("--judge-negatives 0: the judge needs items to say No to");
    }
    if a.judge_own_repeat == 0 {
        bail!("--judge-own-repeat 0: each list is learnt at least once (1: every list once)");
    }
    if !(0.0..=1.0).contains(&a.judge_target_weight) {
        bail!(
            "--judge-target-weight {}: a weight in [0, 1] (0: the teacher's labels alone, 1: the target alone)",
            a.judge_target_weight
        );
    }
    if a.judge_target_weight > 0.0 && (a.judge_teacher.is_none() || !a.judge_listwise) {
        bail!("--judge-target-weight mixes the target into a teacher's lists: it needs --judge-teacher and --judge-listwise (without a teacher the listwise labels are the target already)");
    }
    let stage = match a.rerank.params()? {
        Some(p) => p,
        None => {
            let mut p = mrrec_agent::rerank::RerankParams::default();
            if let Some(m) = a.rerank.rerank_memory {
                p.memory = m.into();
            }
            p
        }
    };
    Ok(Some(JudgeJob {
        data: mrrec_train::judge::JudgeData {
            stage,
            negatives: a.judge_negatives,
            seed: a.train.seed,
            negatives_by: mrrec_train::judge::NegativesSeed::Question,
            teacher: None,
            listwise: a.judge_listwise,
            target_weight: a.judge_target_weight,
            own_repeat: a.judge_own_repeat,
        },
        teacher: a.judge_teacher.as_ref().map(|m| TeacherSpec {
            model: m.clone(),
            url: a.judge_teacher_url.clone(),
            adapter: a.judge_teacher_adapter.clone(),
            also: a.judge_teacher_scores.clone(),
        }),
    }))
}

/// Trains (or resumes) a run; returns its final state and, fine-tuning, how many samples were
/// kept and how many greedy answers anchored (`--sft-anchor`). `Ok(None)` when fine-tuning kept
/// no sample and `allow_nothing` (an expert-iteration round whose samples never beat the greedy
/// answer, anchors or not), an error when there is nothing at all to learn.
fn train_cmd(
    data: DataArgs,
    assistant: AssistantArgs,
    args: TrainArgs,
    sample: SampleCalls,
    tenant: &str,
    allow_nothing: bool,
    judge: Option<JudgeJob>,
) -> Result<Option<(mrrec_train::trainer::TrainState, usize, usize)>> {
    let targets = adapter_settings(&args)?;
    if assistant.llm.llm_url.is_some() {
        bail!("`mrrec train` trains a local model's adapter; for a server-side model use the /tools/memory_retrieve and /reward endpoints with your trainer (see ARCHITECTURE.md)");
    }
    data.ensure_train_rows("`mrrec train`")?;
    let weights = reward_weights(&args.reward_weights, &args.rec_cutoffs)?;
    let cfg = assistant.config()?;
    let greedy_calls = greedy_calls(sample, &cfg)?;
    let ws = data.open()?;
    let store = open_store(&ws, assistant.store.clone())?;
    let local = mrrec_agent::backend::local_with_adapter(&assistant.llm.model, None)?;
    if assistant.adapter.is_some() {
        bail!("`mrrec train` takes --init-adapter to start from an adapter (--adapter is for answering)");
    }
    let lora = mrrec_train::LoraConfig {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        targets,
        layers: args.lora_layers,
        seed: args.seed,
    };
    let policy = mrrec_train::Policy::from_gguf(&local.info().path, lora)?;
    if let Some(p) = &args.init_adapter {
        let ad = mrrec_llm_local::model::LoraAdapter::load(p)
            .with_context(|| format!("reading the adapter {}", p.display()))?;
        policy
            .load_adapter(&ad)
            .with_context(|| format!("--init-adapter {}", p.display()))?;
        local.transformer().set_lora(Some(std::sync::Arc::new(ad)));
    }
    let pick = |split: mrrec_data::Split, n: Option<usize>| {
        seeded_subset(
            &ws,
            &mrrec_data::Purpose::Evaluate(vec![split]),
            n,
            args.seed,
        )
    };
    let train_q = pick(mrrec_data::Split::Train, args.train_limit)?;
    let val_q = pick(mrrec_data::Split::Val, Some(args.val_queries))?;
    // Record memory (no LLM) for every user the run touches; summaries come from `memory build`.
    let mut users: Vec<&str> = train_q
        .iter()
        .chain(&val_q)
        .map(|q| q.query().user_id.as_str())
        .collect();
    users.sort();
    users.dedup();
    let b = mrrec_agent::memory::MemoryBuilder {
        progress: true,
        ..mrrec_agent::memory::MemoryBuilder::new(&ws, &*store, tenant)
    };
    let mut report = mrrec_agent::memory::BuildReport::default();
    b.build_records(&users, &mut report)?;
    // A judge that reads the request alone needs no built memory: no warning then.
    let reads_memory = judge
        .as_ref()
        .is_none_or(|j| j.data.stage.memory != mrrec_agent::rerank::JudgeMemory::None);
    for (qs, split) in [
        (&train_q, mrrec_data::Split::Train),
        (&val_q, mrrec_data::Split::Val),
    ]
    .into_iter()
    .filter(|_| reads_memory)
    {
        let users: Vec<&str> = qs.iter().map(|q| q.query().user_id.as_str()).collect();
        let cov = mrrec_agent::memory::coverage(
            &ws.dataset.histories,
            &*store,
            tenant,
            &users,
            &cfg.levels,
        )?;
        crate::cmd::eval::warn_coverage(&cov, &format!("training's {split} queries"), &[split]);
    }
    eprintln!(
        "{} training queries, {} validation queries, {} users (+{} records)",
        train_q.len(),
        val_q.len(),
        users.len(),
        report.records_added
    );
    let judging = judge.is_some();
    let listwise_judge = judge.as_ref().is_some_and(|j| j.data.listwise);
    let sft = match (&args.sft, judge) {
        (_, Some(JudgeJob { data, teacher })) => {
            let (teacher, also) = match teacher {
                // Loaded only when a list's scores are not kept (a resumed or repeated
                // distillation may need none).
                Some(t) => (
                    Some(
                        mrrec_agent::backend::lazy_chat_model_with_adapter(
                            &t.model,
                            t.url.as_deref(),
                            server_options()?,
                            t.adapter.as_deref(),
                        )
                        .with_context(|| format!("the teacher judge {}", t.model))?,
                    ),
                    t.also,
                ),
                None => (None, Vec::new()),
            };
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let teacher = teacher.as_ref().map(|m| mrrec_train::judge::Teacher {
                model: m,
                scores: Some(args.out.join("judge-teacher.jsonl")),
                also,
            });
            Some(mrrec_train::judge::judge_examples(
                &ws,
                &*store,
                tenant,
                &local,
                &train_q,
                &data,
                teacher.as_ref(),
            )?)
        }
        (Some(path), None) => Some(sft_examples(
            path,
            (args.sft_as_free, args.sft_anchor),
            &ws,
            &*store,
            tenant,
            &local,
            &cfg,
            weights,
        )?),
        (None, None) => None,
    };
    // Chosen samples and anchors (the greedy answers taught where no sample beat them).
    let count = |k: &str| sft.as_ref().and_then(|s| s.source[k].as_u64()).unwrap_or(0) as usize;
    let (kept, anchors) = (count("kept"), count("anchors"));
    // A round whose samples never beat the greedy answers has nothing to learn: anchors alone
    // would only teach the model what it already answers.
    if allow_nothing && sft.is_some() && kept == 0 {
        return Ok(None);
    }
    let t = mrrec_train::trainer::Trainer {
        ws: &ws,
        store: &*store,
        tenant,
        local: &local,
        policy: &policy,
        cfg,
        train: mrrec_train::trainer::TrainConfig {
            group: args.group,
            queries_per_step: args.queries_per_step,
            steps: args.steps,
            temperature: args.temperature,
            grpo: mrrec_train::GrpoParams {
                clip: args.clip,
                kl: args.kl,
            },
            adamw: mrrec_train::AdamWParams {
                lr: args.lr,
                ..Default::default()
            },
            val_every: args.val_every,
            val_queries: args.val_queries,
            patience: args.patience,
            seed: args.seed,
            weights,
            greedy_calls,
            exact_lower: args.exact_lower,
            batched_rollouts: !args.sequential_rollouts,
            frozen_memo_bytes: (args.frozen_memo_gb.max(0.0) * (1u64 << 30) as f64) as usize,
            parallel_runs: args
                .parallel_runs
                .unwrap_or(if listwise_judge {
                    rayon::current_num_threads()
                } else {
                    1
                })
                .max(1),
            ..Default::default()
        },
        out: args.out.clone(),
        progress: true,
        sft,
    };
    // The judge is not validated by the assistant's answers: compare it with `eval --rerank`.
    let st = t.run(&train_q, if judging { &[] } else { &val_q })?;
    println!(
        "{} steps; validation N@100 {} → best {}{}; adapter in {}",
        st.step,
        st.baseline.map_or("-".into(), |v| format!("{v:.4}")),
        st.best
            .map_or("-".into(), |(v, s)| format!("{v:.4} (step {s})")),
        if st.stopped { " (stopped early)" } else { "" },
        args.out.display()
    );
    Ok(Some((st, kept, anchors)))
}

/// The leading calls `--sample` decodes greedily (0: every call sampled).
fn greedy_calls(
    sample: SampleCalls,
    cfg: &mrrec_agent::assistant::AssistantConfig,
) -> Result<usize> {
    Ok(match sample {
        SampleCalls::All => 0,
        SampleCalls::Answer => mrrec_train::rollout::answer_only(cfg).context(
            "--sample answer samples the guided loop's final profile: the free loop's answer is whichever turn ends it (use --mode guided, or --sample all)",
        )?,
    })
}

/// `--reward-weights` (three numbers, R_format,R_rec,R_mem) and `--rec-cutoffs` (two).
fn reward_weights(text: &str, cutoffs: &str) -> Result<mrrec_agent::rewards::RewardWeights> {
    let w: Vec<f64> = text
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .ok()
        .filter(|w: &Vec<f64>| w.len() == 3 && w.iter().all(|x| x.is_finite()))
        .with_context(|| {
            format!("--reward-weights {text:?}: three numbers, R_format,R_rec,R_mem")
        })?;
    let c: Vec<usize> = cutoffs
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .ok()
        .filter(|c: &Vec<usize>| c.len() == 2)
        .with_context(|| format!("--rec-cutoffs {cutoffs:?}: two whole numbers, e.g. 100,1000"))?;
    let w = mrrec_agent::rewards::RewardWeights {
        format: w[0],
        rec: w[1],
        mem: w[2],
        rec_cutoffs: [c[0], c[1]],
    };
    w.check()
        .map_err(|e| anyhow::anyhow!("--reward-weights / --rec-cutoffs: {e}"))?;
    Ok(w)
}

#[derive(Args)]
pub(crate) struct RolloutsCmd {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    #[command(flatten)]
    pub(crate) tenant: TenantArg,
    /// The trajectories file (JSONL, one trajectory per line); rerun the same command to continue
    /// an interrupted run.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Trajectories per query (G).
    #[arg(long, default_value_t = 5)]
    pub(crate) group: usize,
    /// Use a seeded subset of this many `train` queries.
    #[arg(long)]
    pub(crate) train_limit: Option<usize>,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// Seed of the subset and of the sampling (each query's seed also depends on its id).
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Reward weights: R_format, R_rec, R_mem.
    #[arg(long, default_value = "0.1,5,0.1")]
    pub(crate) reward_weights: String,
    /// R_rec's two NDCG cutoffs (the paper's 100,1000; e.g. 100,3000 gives profiles that rank
    /// the target below 1,000 a signal).
    #[arg(long, default_value = "100,1000")]
    pub(crate) rec_cutoffs: String,
    /// Run a group's trajectories one after another instead of decoding them together.
    #[arg(long)]
    pub(crate) sequential_rollouts: bool,
    /// Which calls are sampled: `all` (GRPO's rollouts), or `answer` — the guided loop's
    /// reasoning and memory calls decoded greedily, as the assistant answers, and only the final
    /// profile sampled, so that a group differs from the greedy answer only in its profile
    /// (fine-tuning then learns the sampled profile in the context the model will see).
    #[arg(long, value_enum, default_value_t = SampleCalls::All)]
    pub(crate) sample: SampleCalls,
}

/// Which calls of a trajectory `mrrec rollouts` samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SampleCalls {
    /// Every call.
    All,
    /// The guided loop's answer only.
    Answer,
}

/// `mrrec rollouts`: G sampled trajectories per `train` query, scored with the training rewards,
/// written to a JSONL file a group at a time (resumable).
pub(crate) fn rollouts(a: RolloutsCmd) -> Result<()> {
    let summary = sample_rollouts(a)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Samples (or continues) a rollouts file; returns what `mrrec rollouts` prints.
fn sample_rollouts(a: RolloutsCmd) -> Result<serde_json::Value> {
    use mrrec_train::trajectories::{query_seed, summarise, RolloutsFile, TrajectoryRecord};
    anyhow::ensure!(a.group >= 1, "--group must be at least 1");
    let weights = reward_weights(&a.reward_weights, &a.rec_cutoffs)?;
    a.data.ensure_train_rows("`mrrec rollouts`")?;
    let ws = a.data.open()?;
    let cfg = a.assistant.config()?;
    let store = open_store(&ws, a.assistant.store.clone())?;
    let tenant = &a.tenant.tenant;
    // Training's purpose admits `train` rows only (never `val`, `aspect` or held-out ones).
    let queries = seeded_subset(&ws, &mrrec_data::Purpose::Training, a.train_limit, a.seed)?;
    // A local model records every call's ids and log-probabilities; a server (a teacher served
    // elsewhere) gives text only: its records carry each call's text, the trace's free form and
    // the tokens it reported, and train a student only re-tokenised (`train --sft-as-free`).
    enum Model {
        Local(Box<mrrec_llm_local::LocalModel>),
        Server(Box<dyn mrrec_llm::ChatModel>),
    }
    let model = match a.assistant.llm.llm_url.as_deref() {
        Some(url) => {
            if a.assistant.adapter.is_some() {
                bail!("--adapter applies to a local model; a server (--llm-url) serves its own weights");
            }
            Model::Server(mrrec_agent::backend::chat_model(
                &a.assistant.llm.model,
                Some(url),
                server_options()?,
            )?)
        }
        None => Model::Local(Box::new(mrrec_agent::backend::local_with_adapter(
            &a.assistant.llm.model,
            a.assistant.adapter.as_deref(),
        )?)),
    };
    let (sampler, model_id, fingerprint) = match &model {
        Model::Local(l) => (
            mrrec_train::rollout::Sampler::Local(l.as_ref()),
            mrrec_llm::ChatModel::id(l.as_ref()).to_string(),
            l.info().tokenizer_fingerprint(),
        ),
        Model::Server(m) => (
            mrrec_train::rollout::Sampler::Server(m.as_ref()),
            m.id().to_string(),
            String::new(),
        ),
    };
    let ranking = mrrec_agent::assistant::Ranking::of(ws.shop(), &cfg).name();
    let greedy_calls = greedy_calls(a.sample, &cfg)?;
    let (file, reopened) = RolloutsFile::open(&a.out, a.group)?;
    if reopened.dropped_lines > 0 {
        eprintln!(
            "{}: dropped {} line(s) an interrupted run left incomplete",
            a.out.display(),
            reopened.dropped_lines
        );
    }
    if let Some(r) = reopened.groups.values().flatten().next() {
        anyhow::ensure!(
            r.model == model_id && r.temperature == a.temperature,
            "{} holds trajectories of {} at temperature {}, not {model_id} at {}: use another --out",
            a.out.display(),
            r.model,
            r.temperature,
            a.temperature
        );
        anyhow::ensure!(
            r.ranking == ranking,
            "{} holds trajectories rewarded by the {} ranking, not {ranking} (--rank-request, --hybrid-rank): use another --out",
            a.out.display(),
            r.ranking
        );
        anyhow::ensure!(
            r.greedy_calls == greedy_calls,
            "{} holds trajectories with {} leading greedy call(s), not {greedy_calls} (--sample, --guided-calls): use another --out",
            a.out.display(),
            r.greedy_calls
        );
    }
    let todo: Vec<&&mrrec_data::LabeledQuery> = queries
        .iter()
        .filter(|q| !reopened.groups.contains_key(&q.query().qid))
        .collect();
    let mut users: Vec<&str> = todo.iter().map(|q| q.query().user_id.as_str()).collect();
    users.sort();
    users.dedup();
    let b = mrrec_agent::memory::MemoryBuilder {
        progress: true,
        ..mrrec_agent::memory::MemoryBuilder::new(&ws, &*store, tenant)
    };
    let mut report = mrrec_agent::memory::BuildReport::default();
    b.build_records(&users, &mut report)?;
    let cov =
        mrrec_agent::memory::coverage(&ws.dataset.histories, &*store, tenant, &users, &cfg.levels)?;
    crate::cmd::eval::warn_coverage(&cov, "rollouts", &[mrrec_data::Split::Train]);
    eprintln!(
        "{} train queries: {} done before, {} to sample ({} trajectories each) with {model_id}",
        queries.len(),
        queries.len() - todo.len(),
        todo.len(),
        a.group
    );
    let roll = mrrec_train::rollout::Rollouts {
        ws: &ws,
        store: &*store,
        tenant,
        sampler,
        cfg,
        temperature: a.temperature,
        weights,
        greedy_calls,
    };
    let t0 = std::time::Instant::now();
    let mut written: Vec<Vec<TrajectoryRecord>> = Vec::new();
    let mut skipped = 0usize;
    for (k, q) in todo.iter().enumerate() {
        let query = q.query();
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let Some(target) = ws.catalogue().position(q.target()) else {
            skipped += 1;
            continue;
        };
        let seed = query_seed(a.seed, &query.qid);
        let t = std::time::Instant::now();
        let g = roll.group(
            &query.user_id,
            request,
            query.category.as_deref(),
            target,
            a.group,
            seed,
            !a.sequential_rollouts,
        )?;
        let records: Vec<TrajectoryRecord> = g
            .iter()
            .enumerate()
            .map(|(j, tr)| {
                TrajectoryRecord::new(
                    tr,
                    &query.qid,
                    &query.user_id,
                    request,
                    query.category.as_deref(),
                    (j, a.group),
                    seed.wrapping_add(1000 * j as u64),
                    (&model_id, &fingerprint),
                    (a.temperature, &ranking),
                    &|ids| match &model {
                        Model::Local(l) => l.decode(ids).unwrap_or_default(),
                        Model::Server(_) => String::new(),
                    },
                )
            })
            .collect();
        file.append(&records)?;
        let totals: Vec<String> = records
            .iter()
            .map(|r| format!("{:.2}", r.rewards.total))
            .collect();
        eprintln!(
            "[{}/{}] {}: rewards {} ({:.1} s)",
            k + 1,
            todo.len(),
            query.qid,
            totals.join(" "),
            t.elapsed().as_secs_f64()
        );
        written.push(records);
    }
    let secs = t0.elapsed().as_secs_f64();
    let new = summarise(written.iter().map(Vec::as_slice));
    let whole = summarise(
        reopened
            .groups
            .values()
            .map(Vec::as_slice)
            .chain(written.iter().map(Vec::as_slice)),
    );
    eprintln!(
        "{} groups sampled in {secs:.1} s; tokens in {} / out {}",
        new.groups, new.tokens_in, new.tokens_out
    );
    Ok(serde_json::json!({
        "file": a.out,
        "model": model_id,
        "this_run": {"summary": new, "seconds": secs,
                     "skipped_target_not_in_catalogue": skipped},
        "file_total": whole,
    }))
}

#[derive(Args)]
pub(crate) struct IterateCmd {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) assistant: AssistantArgs,
    /// Each round's fine-tuning (`--out` is the iteration's folder; `--group`, `--temperature`,
    /// `--train-limit`, `--seed`, `--reward-weights` and `--rec-cutoffs` also drive the sampling;
    /// `--init-adapter` is where round 1 samples and starts from).
    #[command(flatten)]
    pub(crate) train: TrainArgs,
    #[command(flatten)]
    pub(crate) tenant: TenantArg,
    /// Rounds of sample → select → fine-tune.
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: usize,
    /// Which calls each round samples (as `mrrec rollouts --sample`).
    #[arg(long, value_enum, default_value_t = SampleCalls::All)]
    pub(crate) sample: SampleCalls,
}

/// `mrrec iterate`: expert iteration in one command. Round r samples G trajectories per `train`
/// query with the adapter of round r − 1 (`OUT/round-r/rollouts.jsonl`), keeps per query the best
/// that beats that adapter's greedy answer, and fine-tunes from that adapter (`OUT/round-r/run`).
/// A round whose samples never beat the greedy answers keeps the adapter it started from. Every
/// finished round appends a line to `OUT/rounds.jsonl`; rerun the same command after an
/// interruption (a finished round is not redone, an unfinished one resumes). The last adapter is
/// copied to `OUT/adapter.safetensors`. With `--sft-as-free` it distils the controller and then
/// iterates on the student's own loop: a round without an adapter samples guided trajectories
/// and learns their free form; a round with one samples the free loop with it (its records are
/// the free loop already); every round trains in free mode.
pub(crate) fn iterate(a: IterateCmd) -> Result<()> {
    anyhow::ensure!(a.rounds >= 1, "--rounds must be at least 1");
    if a.train.sft.is_some() {
        bail!("`mrrec iterate` writes each round's trajectories itself: drop --sft (use `mrrec train --sft` to learn a given file)");
    }
    if a.assistant.adapter.is_some() {
        bail!("`mrrec iterate` starts from --init-adapter (--adapter is for answering)");
    }
    check_anchor(&a.train)?;
    // Each round's fine-tuning checks these too, but only after the round's sampling.
    adapter_settings(&a.train)?;
    if a.train.sft_as_free && a.sample == SampleCalls::Answer {
        bail!("--sample answer samples the guided loop's profile, but --sft-as-free's later rounds sample the free loop: drop one of them");
    }
    let out = a.train.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let rounds_path = out.join("rounds.jsonl");
    let done: Vec<serde_json::Value> = match std::fs::read_to_string(&rounds_path) {
        Ok(t) => t
            .lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: not a round record", rounds_path.display(), i + 1)
                })
            })
            .collect::<Result<_>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", rounds_path.display())),
    };
    let mut adapter: Option<PathBuf> = match done.last() {
        Some(r) => r["adapter"].as_str().map(PathBuf::from),
        None => a.train.init_adapter.clone(),
    };
    for round in done.len() + 1..=a.rounds {
        let dir = out.join(format!("round-{round}"));
        let mut sampler = a.assistant.clone();
        sampler.adapter = adapter.clone();
        if a.train.sft_as_free {
            // Distillation: the controller teaches until there is a student to run the loop.
            sampler.mode = if adapter.is_some() {
                LoopMode::Free
            } else {
                LoopMode::Guided
            };
        }
        eprintln!(
            "round {round}/{}: sampling ({} mode) with {}",
            a.rounds,
            sampler.config()?.mode.name(),
            adapter
                .as_ref()
                .map_or("the base model".into(), |p| p.display().to_string())
        );
        let t0 = std::time::Instant::now();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("rollouts.jsonl");
        let sampled = sample_rollouts(RolloutsCmd {
            data: a.data.clone(),
            assistant: sampler,
            tenant: a.tenant.clone(),
            out: file.clone(),
            group: a.train.group,
            train_limit: a.train.train_limit,
            temperature: a.train.temperature,
            seed: a.train.seed,
            reward_weights: a.train.reward_weights.clone(),
            rec_cutoffs: a.train.rec_cutoffs.clone(),
            sequential_rollouts: a.train.sequential_rollouts,
            sample: a.sample,
        })?;
        let run = dir.join("run");
        let mut train = a.train.clone();
        train.out = run.clone();
        train.sft = Some(file.clone());
        train.init_adapter = adapter.clone();
        let mut learner = a.assistant.clone();
        if a.train.sft_as_free {
            learner.mode = LoopMode::Free;
        }
        let trained = train_cmd(
            a.data.clone(),
            learner,
            train,
            SampleCalls::All,
            &a.tenant.tenant,
            true,
            None,
        )?;
        let (steps, kept, anchors) = match trained {
            Some((state, kept, anchors)) => {
                adapter = Some(run.join("adapter.safetensors"));
                (Some(state.step), kept, anchors)
            }
            None => {
                eprintln!("round {round}: no sample beat the greedy answer; the adapter stays");
                (None, 0, 0)
            }
        };
        let line = serde_json::json!({
            "round": round,
            "sampled": sampled["file_total"],
            "kept": kept,
            "anchors": anchors,
            "steps": steps,
            "adapter": adapter,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&rounds_path)
                .with_context(|| format!("writing {}", rounds_path.display()))?;
            writeln!(f, "{line}")?;
            f.sync_all()?;
        }
        eprintln!(
            "round {round}/{}: mean sampled reward {:.3}, {kept} kept, {anchors} anchors, {:.0} s",
            a.rounds,
            sampled["file_total"]["mean_reward"]
                .as_f64()
                .unwrap_or(f64::NAN),
            t0.elapsed().as_secs_f64()
        );
    }
    let last = out.join("adapter.safetensors");
    match &adapter {
        Some(p) => {
            std::fs::copy(p, &last)
                .with_context(|| format!("copying {} to {}", p.display(), last.display()))?;
            println!("{} rounds; adapter in {}", a.rounds, last.display());
        }
        None => println!(
            "{} rounds; no round kept a trajectory: no adapter written",
            a.rounds
        ),
    }
    Ok(())
}

/// The fine-tuning examples of a rollouts file: its complete groups, checked (`train` queries
/// only, the policy's tokenizer), each query's greedy answer scored as the bar, and per query the
/// best trajectory of G kept when it beats it. `as_free`: only trajectories with a free form
/// compete, and the kept ones are learnt as that free form, re-tokenised. `anchor`: every other
/// query (its greedy answer parsed) teaches its greedy answer.
#[allow(clippy::too_many_arguments)]
fn sft_examples(
    path: &std::path::Path,
    (as_free, anchor): (bool, bool),
    ws: &mrrec_agent::Workspace,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    local: &mrrec_llm_local::LocalModel,
    cfg: &mrrec_agent::assistant::AssistantConfig,
    weights: mrrec_agent::rewards::RewardWeights,
) -> Result<mrrec_train::trainer::Sft> {
    use mrrec_train::trajectories::{
        free_segments, segments_of, select_best, RolloutsFile, TrajectoryRecord,
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let first: TrajectoryRecord = text
        .lines()
        .next()
        .with_context(|| format!("{}: no trajectories", path.display()))
        .and_then(|l| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:1: not a trajectory record", path.display()))
        })?;
    let (_, mut file) = RolloutsFile::open(path, first.group)?;
    let fingerprint = local.info().tokenizer_fingerprint();
    let train: std::collections::HashMap<&str, &mrrec_data::LabeledQuery> = ws
        .dataset
        .queries
        .for_purpose(&mrrec_data::Purpose::Training)?
        .into_iter()
        .map(|q| (q.query().qid.as_str(), q))
        .collect();
    let mut teachers = std::collections::BTreeSet::new();
    // The greedy bar is scored with this run's ranking: the trajectories must have been too.
    let ranking = mrrec_agent::assistant::Ranking::of(ws.shop(), cfg).name();
    for r in file.groups.values().flatten() {
        anyhow::ensure!(
            r.ranking == ranking,
            "{}: query {} was rewarded by the {} ranking, but this run ranks by {ranking}: pass the --rank-request / --hybrid-rank the rollouts used",
            path.display(),
            r.qid,
            r.ranking
        );
        anyhow::ensure!(
            as_free || r.tokenizer == fingerprint,
            "{}: query {} was written by {} whose tokenizer ({}) is not this model's ({fingerprint}): its token ids cannot train it",
            path.display(),
            r.qid,
            r.model,
            if r.tokenizer.is_empty() { "unrecorded" } else { &r.tokenizer }
        );
        anyhow::ensure!(
            train.contains_key(r.qid.as_str()),
            "{}: query {} is not a `train` query of this data: only `train` queries are trained on",
            path.display(),
            r.qid
        );
        teachers.insert(r.model.clone());
    }
    let mut without_free_form = 0;
    // A free-mode record of this tokenizer is the free loop already, in its own token ids.
    let own_free_loop = |r: &TrajectoryRecord| {
        r.mode == "free" && r.tokenizer == fingerprint && r.reported_tokens.is_none()
    };
    if as_free {
        for g in file.groups.values_mut() {
            let n = g.len();
            g.retain(|r| !r.free_form.is_empty() || own_free_loop(r));
            without_free_form += n - g.len();
        }
        file.groups.retain(|_, g| !g.is_empty());
        eprintln!(
            "{}: {without_free_form} trajectories without a free form (guided fallbacks or broken calls, another model's free loop) left out",
            path.display()
        );
    }
    // The bar: this model's greedy answer to each query, scored with the training rewards. The
    // answers go through the shared response cache (keyed by the model with its adapter), so a
    // second run over the same queries, or an eval of the same model before, replays them.
    let cached = mrrec_llm::CachedChatModel::open(
        local,
        &mrrec_agent::backend::llm_cache_path(),
        mrrec_llm::CachePolicy::All,
    )?;
    let assistant = mrrec_agent::assistant::Assistant {
        shop: ws.shop(),
        store,
        tenant,
        llm: &cached,
        cfg: cfg.clone(),
        observer: None,
    };
    let t0 = std::time::Instant::now();
    let (mut tin, mut tout, mut replayed) = (0u64, 0u64, 0usize);
    let mut greedy = std::collections::HashMap::new();
    for (k, qid) in file.groups.keys().enumerate() {
        let q = train[qid.as_str()];
        let query = q.query();
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let Some(target) = ws.catalogue().position(q.target()) else {
            continue;
        };
        let a = assistant.answer(&query.user_id, request, query.category.as_deref(), 10)?;
        tin += a.trace.usage.prompt_tokens;
        tout += a.trace.usage.completion_tokens;
        // A replayed answer costs no model time.
        replayed += usize::from(a.trace.usage.seconds == 0.0);
        let r = mrrec_agent::rewards::reward_of(&assistant.ranking(), &weights, &a.trace, target)?;
        greedy.insert(qid.clone(), r.total);
        eprintln!(
            "greedy bar {}/{}: {qid} {:.6} ({tin} tokens in, {tout} out, {:.0} s)",
            k + 1,
            file.groups.len(),
            r.total,
            t0.elapsed().as_secs_f64()
        );
    }
    if !greedy.is_empty() {
        eprintln!(
            "greedy bar: {replayed} of {} answers replayed from the LLM cache",
            greedy.len()
        );
    }
    let kept = select_best(&file.groups, &|q| greedy.get(q).copied());
    let degenerate = file
        .groups
        .values()
        .flatten()
        .filter(|r| mrrec_train::trajectories::degenerate(r))
        .count();
    eprintln!(
        "{}: {} of {} groups kept (best of {} over the greedy answer); {degenerate} of {} samples never chosen (letters from a script neither the request nor the memories use)",
        path.display(),
        kept.len(),
        file.groups.len(),
        first.group,
        file.groups.values().map(Vec::len).sum::<usize>()
    );
    // A constrained call is learnt over the sets its recorded constraint allowed, as sampled.
    let replay = |c: &mrrec_llm::Constraint, ids: &[u32]| {
        local
            .constraint_masks(c, ids)
            .map_err(mrrec_train::TrainError::from)
    };
    let mut unreplayed = 0;
    let mut examples = kept
        .iter()
        .map(|r| {
            Ok(mrrec_train::trainer::SftExample {
                qid: r.qid.clone(),
                // A free form is re-tokenised; anything else (plain fine-tuning, or a free-mode
                // record of this tokenizer) is learnt as its recorded ids.
                segments: if as_free && !r.free_form.is_empty() {
                    free_segments(r, local)?
                } else {
                    let (segments, n) =
                        segments_of(r, &replay).with_context(|| format!("{}", path.display()))?;
                    unreplayed += n;
                    segments
                },
                rewards: r.rewards.clone(),
                soft: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if unreplayed > 0 {
        eprintln!(
            "{}: {unreplayed} constrained call(s) recorded without their constraint (written before constraints were recorded): learnt under the whole vocabulary",
            path.display()
        );
    }
    let anchors = if anchor {
        let chosen: std::collections::HashSet<&str> = kept.iter().map(|r| r.qid.as_str()).collect();
        let rest: Vec<&String> = file
            .groups
            .keys()
            .filter(|q| !chosen.contains(q.as_str()))
            .collect();
        // The greedy answer again, now with its token ids: every call decoded as the assistant
        // asks it (the same answer as the bar's, which the cache replayed as text).
        let roll = mrrec_train::rollout::Rollouts {
            ws,
            store,
            tenant,
            sampler: mrrec_train::rollout::Sampler::Local(local),
            cfg: cfg.clone(),
            temperature: 0.0,
            weights,
            greedy_calls: usize::MAX,
        };
        let t0 = std::time::Instant::now();
        let mut n = 0;
        for (k, qid) in rest.iter().enumerate() {
            let q = train[qid.as_str()];
            let query = q.query();
            let request = query.simple_query.as_deref().unwrap_or(&query.query);
            let Some(target) = ws.catalogue().position(q.target()) else {
                continue;
            };
            let Some(t) = roll
                .group(
                    &query.user_id,
                    request,
                    query.category.as_deref(),
                    target,
                    1,
                    0,
                    false,
                )?
                .pop()
            else {
                continue;
            };
            if t.rewards.format <= 0.0 || t.answer.trace.fallback {
                continue;
            }
            let segments = mrrec_train::trajectories::learnable(t.segments, first.greedy_calls);
            if segments.is_empty() {
                continue;
            }
            examples.push(mrrec_train::trainer::SftExample {
                qid: (*qid).clone(),
                segments,
                rewards: t.rewards,
                soft: None,
            });
            n += 1;
            eprintln!(
                "anchor {}/{}: {qid} ({:.0} s)",
                k + 1,
                rest.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        eprintln!(
            "{}: {n} anchors (queries whose samples did not beat the greedy answer teach it)",
            path.display()
        );
        n
    } else {
        0
    };
    let source = serde_json::json!({
        "file": path,
        "sha256": mrrec_agent::workspace::files_sha256(&[path])?,
        "groups": file.groups.len(),
        "kept": kept.len(),
        "selection": "per query the best of G (never one whose profile writes letters from a script neither the request nor the memories use) when it beats the greedy answer's reward",
        "degenerate_samples": degenerate,
        "anchors": anchors,
        "constrained_calls_learnt_unconstrained": unreplayed,
        "sampled": if first.greedy_calls > 0 {
            format!("the calls after the first {} (decoded greedily, context only)", first.greedy_calls)
        } else {
            "every call".into()
        },
        "written_by": teachers,
        "tokenizer": fingerprint,
        "as": if as_free {
            "free loop (guided trajectories' free form, re-tokenised from text with this model's template; free-mode trajectories of this tokenizer as their own token ids)"
        } else {
            "the recorded token ids of each model call"
        },
        "left_out_without_free_form": without_free_form,
    });
    Ok(mrrec_train::trainer::Sft {
        examples,
        source,
        listwise: false,
        target_weight: 0.0,
    })
}

/// The queries `purpose` admits, or a seeded subset of `n` of them, in file order.
fn seeded_subset<'w>(
    ws: &'w mrrec_agent::Workspace,
    purpose: &mrrec_data::Purpose,
    n: Option<usize>,
    seed: u64,
) -> Result<Vec<&'w mrrec_data::LabeledQuery>> {
    let all = ws.dataset.queries.for_purpose(purpose)?;
    let mut idx: Vec<usize> = (0..all.len()).collect();
    if let Some(n) = n.filter(|&n| n < all.len()) {
        use rand::seq::SliceRandom;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        idx.shuffle(&mut rng);
        idx.truncate(n);
        idx.sort();
    }
    Ok(idx.into_iter().map(|i| all[i]).collect())
}

#[derive(Args)]
pub(crate) struct DeriveQueriesCmd {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// The model that writes the requests.
    #[command(flatten)]
    pub(crate) llm: LlmArgs,
    /// The new data directory (must not hold a data set yet).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Targets per user, the latest first.
    #[arg(long, default_value_t = 2)]
    pub(crate) per_user: usize,
    /// Whose earlier purchases: `train` users' (more training requests) or `val`/`test` users'
    /// (a larger evaluation set: the directory's rows are all that split, never trainable).
    #[arg(long, default_value = "train")]
    pub(crate) split: mrrec_data::Split,
    /// Reviews the user must have written before a target (the memory its request reads).
    #[arg(long, default_value_t = 2)]
    pub(crate) min_history: usize,
    /// Lowest rating of a target.
    #[arg(long, default_value_t = 4.0)]
    pub(crate) min_rating: f32,
    /// Only the first N users (sorted by id).
    #[arg(long)]
    pub(crate) users: Option<usize>,
    /// Repair turns for a refused request: the model sees its answer and the words it must
    /// not repeat (the product's title, the review) and writes it again.
    #[arg(long, default_value_t = 1)]
    pub(crate) repairs: usize,
    /// Leave out the `train` users of fold I of K (`1/2`: the first half, by a fixed hash of
    /// the user id): their rows, histories and purchases. A model trained on the result is
    /// checked on that fold's `train` queries (`mrrec eval --split train --fold I/K`), so a
    /// recipe is chosen by cross-validation inside `train` and `val` is read once.
    #[arg(long, value_name = "I/K")]
    pub(crate) hold_out: Option<mrrec_data::Fold>,
    /// Run as a step of another command (`distil-judge`), which says what comes next itself.
    #[arg(skip)]
    pub(crate) as_step: bool,
}

/// `mrrec derive-queries`: more `train` requests from the `train` users' earlier purchases (or
/// a larger `val`/`test` evaluation set from those users'), each asked by the user as they were
/// then (see `mrrec_data::derive`), written as a new data directory that `memory build`,
/// `rollouts`, `train` and `iterate` (or, for `val`, `eval` and `compare`) read like any other.
pub(crate) fn derive_queries(a: DeriveQueriesCmd) -> Result<()> {
    use mrrec_data::derive::{derive_targets, kept_rows, write_dataset, DeriveOptions};
    anyhow::ensure!(
        a.data.max_items.is_none(),
        "derive-queries writes a data directory that links the whole item file, so --max-items does not apply here: pass it to the commands that read {}",
        a.out.display()
    );
    anyhow::ensure!(
        a.hold_out.is_none() || a.split == mrrec_data::Split::Train,
        "--hold-out leaves a fold of `train` users out of training data; a `{}` set is never trained on: drop --hold-out",
        a.split
    );
    a.data.check_dir()?;
    let ds = mrrec_data::Dataset::load(
        &a.data.data,
        a.data.queries.as_deref(),
        &mrrec_data::LoadOptions {
            strict: a.data.strict,
            ..Default::default()
        },
    )?;
    for r in &ds.reports {
        eprintln!("{r}");
    }
    let items = mrrec_data::DatasetFiles::discover(&a.data.data)?.items;
    let opts = DeriveOptions {
        per_user: a.per_user,
        min_history: a.min_history,
        min_rating: a.min_rating,
        max_users: a.users,
        split: a.split,
        hold_out: a.hold_out,
    };
    let (targets, report) = derive_targets(&ds, &opts)?;
    eprintln!("targets: {report}");
    anyhow::ensure!(
        !targets.is_empty(),
        "no review of a `{}` user qualifies ({report}); lower --min-history or --min-rating",
        a.split
    );
    // Loaded by the first answer not in the LLM cache (a rerun after a kill replays them all).
    let llm = mrrec_agent::backend::lazy_chat_model_with_adapter(
        &a.llm.model,
        a.llm.llm_url.as_deref(),
        server_options()?,
        None,
    )?;
    let started = std::time::Instant::now();
    let (written, wr) = mrrec_agent::memory::write_derived_queries(
        &llm,
        &ds.catalogue,
        &targets,
        a.llm.batch,
        a.repairs,
        true,
    );
    let pairs: Vec<_> = written.into_iter().map(|(i, q)| (&targets[i], q)).collect();
    write_dataset(&a.out, &items, &ds, &opts, &pairs)?;
    let counts = |m: &std::collections::BTreeMap<String, usize>| {
        let v: Vec<String> = m.iter().map(|(why, n)| format!("{n} {why}")).collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "{}: {} {} queries of the source + {} derived ({} of them after a repair turn), each asked by its own snapshot user (first answers refused: {}; refused in the end: {}); LLM {}: {} tokens in, {} out, {:.0}s ({:.0}s in all); prompt {}",
        a.out.display(),
        kept_rows(&ds, &opts)?.len(),
        a.split,
        pairs.len(),
        wr.repaired,
        counts(&wr.refused_first),
        counts(&wr.refused),
        a.llm.model,
        wr.usage.prompt_tokens,
        wr.usage.completion_tokens,
        wr.usage.seconds,
        started.elapsed().as_secs_f64(),
        mrrec_agent::prompts::DERIVE_PROMPT_VERSION
    );
    if a.as_step {
        return Ok(());
    }
    let out = a.out.display();
    let then = if a.split == mrrec_data::Split::Train {
        format!("mrrec train --data {out} ...  |  mrrec rollouts --data {out} ...")
    } else {
        format!(
            "mrrec eval --data {out} --split {} ...  (paired by query id with runs on the source: mrrec compare)",
            a.split
        )
    };
    println!(
        "next: mrrec memory build --data {out} --for-split {} --levels records,patterns,profile  (the snapshots' memory; no global level: build global aspects on the source data)\n      {then}",
        a.split
    );
    Ok(())
}
