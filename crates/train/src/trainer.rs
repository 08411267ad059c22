//! `mrrec train`: GRPO on the assistant's own trajectories (issue 6).
//!
//! Each step takes the next `queries_per_step` training queries (seeded order, `train` split
//! only — never `aspect`, whose targets sit in the users' memory), runs `group` rollouts of the
//! real assistant loop per query with the current adapter, scores them with MR.Rec's rewards,
//! normalises advantages per group, recomputes old (and reference) log-probabilities with the
//! training model, and takes one AdamW step on the GRPO loss accumulated over the groups.
//! Every step appends a JSON line to `log.jsonl`; every `val_every` steps N@100 on a seeded `val`
//! subset is measured (greedy, guided) and the adapter and optimiser state are checkpointed, so a
//! killed run resumes where it stopped; early stopping after `patience` validations without
//! improvement.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::{
    group_advantages, grpo_loss, AdamW, AdamWParams, GrpoParams, LowerCache, Policy, TokenBatch,
};
use crate::{Context, Result, TrainError};
use mrrec_data::LabeledQuery;
use mrrec_llm_local::LocalModel;
use mrrec_memory::MemoryRead;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rollout::{group_log, Rollouts};
use mrrec_agent::assistant::{Assistant, AssistantConfig};
use mrrec_agent::rewards::RewardWeights;
use mrrec_agent::Workspace;

/// The leaves where `was` and `now` differ, as `path: WAS then, NOW now` (`absent` where a side
/// lacks the key): what a refused resume names.
fn json_differences(
    path: &str,
    was: &serde_json::Value,
    now: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (was, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => json_differences(&sub, x, y, out),
                    (x, y) => {
                        let show = |v: Option<&Value>| v.map_or("absent".into(), Value::to_string);
                        out.push(format!("{sub}: {} then, {} now", show(x), show(y)));
                    }
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} then, {b} now")),
        _ => {}
    }
}

/// Settings of a run (saved in `train.json`; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Trajectories per query.
    pub group: usize,
    /// Queries per optimiser step.
    pub queries_per_step: usize,
    /// Steps in all.
    pub steps: usize,
    /// Rollout temperature.
    pub temperature: f64,
    /// The objective.
    pub grpo: GrpoParams,
    /// The optimiser.
    pub adamw: AdamWParams,
    /// Reward weights.
    pub weights: RewardWeights,
    /// Validate (and checkpoint) every this many steps.
    pub val_every: usize,
    /// Validation queries (seeded subset of `val`).
    pub val_queries: usize,
    /// Stop after this many validations without a better N@100 (0: never).
    pub patience: usize,
    /// Seed of the query order and the sampling.
    pub seed: u64,
    /// Rows per chunk of the log-softmax.
    pub logprob_chunk: usize,
    /// GRPO: the leading calls of every rollout decoded greedily, as the assistant asks, and not
    /// learnt — [`crate::rollout::answer_only`] samples and learns the guided loop's profile
    /// alone (`mrrec train --sample answer`); 0 samples and learns every call. Written only
    /// when not 0, so earlier runs keep their identity.
    #[serde(default, skip_serializing_if = "crate::trajectories::is_zero")]
    pub greedy_calls: usize,
    /// Compute the frozen layers below the adapter with the policy's dense f32 copy (exact with
    /// respect to the policy) instead of the inference model's prompt prefill (the default:
    /// quantised kernels, ~3× faster on Qwen 0.5B, and the very states generation and the judge's
    /// scoring start the adapted layers from). Written only when set, so earlier runs keep
    /// their identity (they resume on the default).
    #[serde(default, skip_serializing_if = "crate::trajectories::is_false")]
    pub exact_lower: bool,
    /// Decode a group's trajectories together (a thread per trajectory, one batch per model
    /// step); the same tokens as one after another, faster. Not part of a run's identity.
    #[serde(skip, default = "yes")]
    pub batched_rollouts: bool,
    /// Fine-tuning: remember the frozen layers' states of each example's groups up to this many
    /// bytes ([`crate::FrozenMemo`]), so that later epochs run only the adapted layers. The same
    /// adapter with any budget. Not part of a run's identity.
    #[serde(skip, default = "frozen_memo_default")]
    pub frozen_memo_bytes: usize,
    /// Runs of a step (a listwise judge's lists, a group's segments) whose adapted layers'
    /// forward and backward passes run at once on the rayon pool, each run's frozen layers
    /// computed first; their gradients are summed in the runs' order, so the adapter is the
    /// same as with 1 (one run after another). Each run at once keeps its graph alive: a
    /// judge's list of 20 items ~1.2 GB on Qwen 0.5B, a GRPO group's several. Not part of a
    /// run's identity.
    #[serde(skip, default = "one")]
    pub parallel_runs: usize,
}

/// [`TrainConfig::frozen_memo_bytes`] by default: 4 GiB (a judge's list of 20 items on Qwen
/// 0.5B is ~10 MB, so ~400 lists).
pub const FROZEN_MEMO_DEFAULT: usize = 4 << 30;

fn frozen_memo_default() -> usize {
    FROZEN_MEMO_DEFAULT
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            group: 5,
            queries_per_step: 2,
            steps: 50,
            temperature: 1.0,
            grpo: GrpoParams::default(),
            adamw: AdamWParams {
                lr: 1e-4,
                ..Default::default()
            },
            weights: RewardWeights::default(),
            val_every: 10,
            val_queries: 20,
            patience: 1,
            seed: 42,
            logprob_chunk: 64,
            greedy_calls: 0,
            exact_lower: false,
            batched_rollouts: true,
            frozen_memo_bytes: FROZEN_MEMO_DEFAULT,
            parallel_runs: 1,
        }
    }
}

/// Where a run stands (saved with each checkpoint).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done.
    pub step: usize,
    /// Best validation N@100 so far, and its step.
    pub best: Option<(f64, usize)>,
    /// Validations since the best.
    pub since_best: usize,
    /// Validation N@100 before any training.
    pub baseline: Option<f64>,
    /// Stopped early.
    pub stopped: bool,
}

/// One step's log line.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    /// Step number (1-based).
    pub step: usize,
    /// Mean total reward, and its components.
    pub reward: f64,
    /// Mean R_format.
    pub r_format: f64,
    /// Mean R_rec.
    pub r_rec: f64,
    /// Mean R_mem.
    pub r_mem: f64,
    /// Groups whose rewards were all equal (no signal).
    pub flat_groups: usize,
    /// Groups in the step.
    pub groups: usize,
    /// Groups where no trajectory earned R_rec > 0 (the target below every cutoff).
    #[serde(default)]
    pub rec_zero_groups: usize,
    /// The loss (None when every group was flat); fine-tuning: the mean negative
    /// log-likelihood of the chosen tokens before the update.
    pub loss: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Policy tokens in the loss.
    pub tokens: usize,
    /// Model calls whose tokens are in the loss (with `greedy_calls`, only the sampled ones).
    #[serde(default)]
    pub calls: usize,
    /// Seconds: rollouts, forward, backward, optimiser.
    pub seconds: [f64; 4],
    /// Peak resident memory so far, bytes.
    pub peak_rss: u64,
    /// Share of the step's training-forward tokens whose frozen lower-layer state was reused.
    #[serde(default)]
    pub lower_reused: f64,
    /// Validation N@100 when measured at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_ndcg100: Option<f64>,
}

/// A training run over one workspace, store and model.
pub struct Trainer<'a> {
    /// Data.
    pub ws: &'a Workspace,
    /// Memory.
    pub store: &'a dyn MemoryRead,
    /// Tenant of the users.
    pub tenant: &'a str,
    /// The inference model (rollouts, validation); the adapter is applied to it after each step.
    pub local: &'a LocalModel,
    /// The differentiable policy.
    pub policy: &'a Policy,
    /// The assistant's settings.
    pub cfg: AssistantConfig,
    /// The run's settings.
    pub train: TrainConfig,
    /// Run folder.
    pub out: PathBuf,
    /// Print progress.
    pub progress: bool,
    /// Supervised fine-tuning on chosen trajectories instead of GRPO rollouts.
    pub sft: Option<Sft>,
}

/// One chosen trajectory to fine-tune on.
#[derive(Debug, Clone)]
pub struct SftExample {
    /// Its query.
    pub qid: String,
    /// Its model calls (prompt ids never trained on; sampled ids learnt).
    pub segments: Vec<mrrec_llm_local::Segment>,
    /// Its rewards when sampled (logged as the step's rewards).
    pub rewards: mrrec_agent::rewards::Rewards,
    /// Soft labels (a distilled judge): per segment, the probability the loss gives its one
    /// learnt token within its allowed pair (the other token gets the rest) — the two-way
    /// cross-entropy to a teacher's answer instead of the token's likelihood. `None`: every
    /// learnt token is the label.
    pub soft: Option<Vec<f32>>,
}

/// Supervised fine-tuning: the examples, and what they are (saved in `train.json`, so a resume
/// with another file is refused, and in the adapter's metadata).
#[derive(Debug, Clone)]
pub struct Sft {
    /// The chosen trajectories.
    pub examples: Vec<SftExample>,
    /// Where they came from and how they were chosen.
    pub source: serde_json::Value,
    /// Each example's soft-labelled segments are one list, learnt by
    /// [`crate::grpo::listwise_soft_loss`] (a judge's items of one query).
    pub listwise: bool,
    /// With [`Sft::listwise`]: the weight of each list's first item — its query's target — mixed
    /// into the soft labels ([`crate::grpo::listwise_mixed_loss`]); 0: the labels alone.
    pub target_weight: f64,
}

impl Trainer<'_> {
    /// The adapter as saved: its metadata says how it was trained and on what.
    fn adapter_to_save(&self) -> Result<mrrec_llm_local::model::LoraAdapter> {
        let mut ad = self.policy.adapter()?;
        let m = &mut ad.metadata;
        m.insert(
            "mrrec.trained_by".into(),
            if self.sft.is_some() { "sft" } else { "grpo" }.into(),
        );
        m.insert(
            "mrrec.base_model".into(),
            mrrec_llm::ChatModel::id(self.local).to_string(),
        );
        m.insert("mrrec.lora".into(), format!("{:?}", self.policy.lora_cfg));
        m.insert("mrrec.train".into(), serde_json::to_string(&self.train)?);
        if let Some(sft) = &self.sft {
            m.insert("mrrec.sft".into(), sft.source.to_string());
        }
        Ok(ad)
    }

    fn apply_adapter(&self) -> Result<()> {
        self.local
            .transformer()
            .set_lora(Some(Arc::new(self.policy.adapter()?)));
        Ok(())
    }

    /// N@100 of greedy guided answers on `queries` with the current adapter. Eight queries at a
    /// time are answered together (a thread each, their model calls decoded as one batch).
    pub fn validate(&self, queries: &[&LabeledQuery]) -> Result<f64> {
        self.apply_adapter()?;
        // Ranked as the assistant serves it (the paper's profile alone by default).
        let ranking = mrrec_agent::assistant::Ranking::of(self.ws.shop(), &self.cfg);
        let mut sum = 0.0;
        let t0 = Instant::now();
        let (mut tin, mut tout) = (0u64, 0u64);
        let mut done = 0;
        for chunk in queries.chunks(8) {
            let answers = mrrec_llm_local::Batcher::new(self.local).map(chunk.len(), |w, i| {
                let a = Assistant {
                    shop: self.ws.shop(),
                    store: self.store,
                    tenant: self.tenant,
                    llm: w,
                    cfg: self.cfg.clone(),
                    observer: None,
                };
                let query = chunk[i].query();
                let request = query.simple_query.as_deref().unwrap_or(&query.query);
                a.answer(&query.user_id, request, query.category.as_deref(), 10)
            });
            for (q, ans) in chunk.iter().zip(answers) {
                let ans = ans.unwrap_or_else(|| {
                    Err(mrrec_agent::AgentError::Invalid(
                        "a validation thread panicked".into(),
                    ))
                })?;
                tin += ans.trace.usage.prompt_tokens;
                tout += ans.trace.usage.completion_tokens;
                let Some(target) = self.ws.catalogue().position(q.target()) else {
                    continue;
                };
                let rank = ranking.target_rank(
                    &ans.ranked_with,
                    &ans.trace.request,
                    target,
                    100,
                    &ans.trace,
                )?;
                sum += mrrec_eval::metrics::ndcg_at(rank, 100);
            }
            done += chunk.len();
            eprintln!(
                "validation: {done}/{} queries, {tin} tokens in, {tout} out, {:.0}s",
                queries.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(sum / queries.len().max(1) as f64)
    }

    fn save(&self, opt: &AdamW, state: &TrainState) -> Result<()> {
        let tmp = self.out.join("checkpoint.tmp");
        std::fs::create_dir_all(&tmp)?;
        self.adapter_to_save()?
            .save(&tmp.join("adapter.safetensors"))?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
        let dst = self.out.join("checkpoint");
        let old = self.out.join("checkpoint.old");
        let _ = std::fs::remove_dir_all(&old);
        if dst.exists() {
            std::fs::rename(&dst, &old)?;
        }
        std::fs::rename(&tmp, &dst)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Runs (or resumes) the training; returns the final state.
    pub fn run(&self, train: &[&LabeledQuery], val: &[&LabeledQuery]) -> Result<TrainState> {
        match &self.sft {
            Some(s) if s.examples.is_empty() => {
                return Err(TrainError::Invalid(
                    "no trajectory was selected for fine-tuning".into(),
                ))
            }
            None if train.is_empty() => {
                return Err(TrainError::Invalid(
                    "no training queries (split `train`)".into(),
                ))
            }
            _ => {}
        }
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let cfg_path = self.out.join("train.json");
        // `steps` may grow between runs (train longer); everything else must match.
        let fixed = TrainConfig {
            steps: 0,
            ..self.train.clone()
        };
        let mut cfg_json = json!({"train": fixed, "assistant": self.cfg, "model": self.local.info().path, "lora": format!("{:?}", self.policy.lora_cfg)});
        if let Some(sft) = &self.sft {
            cfg_json["sft"] = sft.source.clone();
        }
        if cfg_path.exists() {
            let mut old: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)
                    .with_context(|| format!("reading {}", cfg_path.display()))?;
            // Settings added since the run began take their defaults: read the old sections
            // back through today's types before comparing.
            if let Some(a) = old.get_mut("assistant") {
                if let Ok(c) = serde_json::from_value::<AssistantConfig>(a.clone()) {
                    *a = serde_json::to_value(c)?;
                }
            }
            if let Some(t) = old.get_mut("train") {
                if let Ok(c) = serde_json::from_value::<TrainConfig>(t.clone()) {
                    *t = serde_json::to_value(c)?;
                }
            }
            if old != cfg_json {
                let mut what = Vec::new();
                json_differences("", &old, &cfg_json, &mut what);
                // The sections that differ: each leaf's first key (the leaves come sorted).
                let mut differ: Vec<&str> = what
                    .iter()
                    .filter_map(|w| w.split([':', '.']).next())
                    .collect();
                differ.dedup();
                let shown = what.len().min(4);
                let more = match what.len() - shown {
                    0 => String::new(),
                    n => format!("; {n} more"),
                };
                return Err(TrainError::Invalid(format!(
                    "{} holds a run with other settings ({} differ: {}{more}); use another --out or the same settings",
                    cfg_path.display(),
                    differ.join(", "),
                    what[..shown].join("; ")
                )));
            }
        } else {
            std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg_json)?)?;
        }
        let mut opt = AdamW::new(self.policy.params(), self.train.adamw)?;
        // The frozen lower layers' states of recent sequences: valid across steps (nothing below
        // the adapter changes), so a group's shared prompt and a trajectory's previous call are
        // computed once below the adapted layers.
        let mut lower = LowerCache::new(4);
        // Fine-tuning's examples come back every epoch (GRPO's samples never do): their groups'
        // frozen-layer states are remembered.
        let mut memo = crate::FrozenMemo::new(if self.sft.is_some() {
            self.train.frozen_memo_bytes
        } else {
            0
        });
        let ck = self.out.join("checkpoint");
        let mut state = if ck.join("state.json").exists() {
            let ad = mrrec_llm_local::model::LoraAdapter::load(&ck.join("adapter.safetensors"))?;
            self.policy.load_adapter(&ad)?;
            opt.load(&ck.join("optimizer.safetensors"))?;
            let s: TrainState =
                serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)?;
            eprintln!("resuming at step {}", s.step);
            s
        } else {
            TrainState::default()
        };
        // Drop log lines written after the checkpoint (a killed run's partial progress).
        let log_path = self.out.join("log.jsonl");
        if log_path.exists() {
            let kept: Vec<String> = std::fs::read_to_string(&log_path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= state.step)
                })
                .map(str::to_string)
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(&log_path, text)?;
        }
        if state.baseline.is_none() && !val.is_empty() {
            let v = self.validate(val)?;
            eprintln!("validation N@100 before training: {v:.4}");
            state.baseline = Some(v);
            state.best = Some((v, 0));
            self.save(&opt, &state)?;
        }
        // The query (or, fine-tuning, example) order: a seeded shuffle, repeated per epoch.
        let mut order: Vec<usize> =
            (0..self.sft.as_ref().map_or(train.len(), |s| s.examples.len())).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.train.seed);
        order.shuffle(&mut rng);
        let roll = Rollouts {
            ws: self.ws,
            store: self.store,
            tenant: self.tenant,
            sampler: crate::rollout::Sampler::Local(self.local),
            cfg: self.cfg.clone(),
            temperature: self.train.temperature,
            weights: self.train.weights,
            greedy_calls: self.train.greedy_calls,
        };
        while state.step < self.train.steps && !state.stopped {
            let step = state.step + 1;
            self.apply_adapter()?;
            let t0 = Instant::now();
            let mut groups = Vec::new();
            let mut chosen: Vec<&SftExample> = Vec::new();
            for k in 0..self.train.queries_per_step {
                let qi = order[((step - 1) * self.train.queries_per_step + k) % order.len()];
                if let Some(sft) = &self.sft {
                    chosen.push(&sft.examples[qi]);
                    continue;
                }
                let q = train[qi];
                let query = q.query();
                let request = query.simple_query.as_deref().unwrap_or(&query.query);
                let Some(target) = self.ws.catalogue().position(q.target()) else {
                    continue;
                };
                let seed = self.train.seed ^ ((step as u64) << 20) ^ (k as u64) << 8;
                let g = roll.group(
                    &query.user_id,
                    request,
                    query.category.as_deref(),
                    target,
                    self.train.group,
                    seed,
                    self.train.batched_rollouts,
                )?;
                groups.push((query.qid.clone(), g));
            }
            let t_roll = t0.elapsed().as_secs_f64();
            // The loss is a token-mean over every policy token of the step, so each segment's
            // share can be back-propagated on its own and the gradients summed: only one
            // segment's graph is alive at a time (memory), and the result is the same.
            let mut flat = 0;
            let rec_zero = groups
                .iter()
                .filter(|(_, g)| g.iter().all(|t| t.rewards.rec <= 0.0))
                .count();
            let (mut rf, mut rr, mut rm, mut rt, mut n) = (0.0, 0.0, 0.0, 0.0, 0usize);
            // (segment, advantage, soft label).
            let mut work: Vec<(&mrrec_llm_local::Segment, f32, Option<f32>)> = Vec::new();
            // Supervised fine-tuning: every kept trajectory's tokens with advantage 1 — with the
            // old log-probabilities the current ones (ratio 1, no clipping) the GRPO loss's
            // gradient is exactly the negative log-likelihood's, KL term included.
            // Per work item, its example's index in the step (fine-tuning).
            let mut example_of: Vec<usize> = Vec::new();
            for (e, ex) in chosen.iter().enumerate() {
                rf += ex.rewards.format;
                rr += ex.rewards.rec;
                rm += ex.rewards.mem;
                rt += ex.rewards.total;
                n += 1;
                for (i, seg) in ex.segments.iter().enumerate() {
                    if !seg.ids.is_empty() {
                        let soft = ex.soft.as_ref().and_then(|s| s.get(i).copied());
                        work.push((seg, 1.0, soft));
                        example_of.push(e);
                    }
                }
            }
            for (qid, g) in &groups {
                let log = group_log(qid, g);
                for t in g {
                    rf += t.rewards.format;
                    rr += t.rewards.rec;
                    rm += t.rewards.mem;
                    rt += t.rewards.total;
                    n += 1;
                }
                let Some(adv) = group_advantages(&log.totals) else {
                    flat += 1;
                    continue;
                };
                for (t, a) in g.iter().zip(adv) {
                    // The greedy leading calls are the same in every trajectory of the group:
                    // context, not a choice the advantage rewards.
                    for seg in crate::trajectories::learnt(&t.segments, t.greedy_calls, |s| &s.ids)
                    {
                        work.push((seg, a as f32, None));
                    }
                }
            }
            let tokens: usize = work.iter().map(|(s, _, _)| s.ids.len()).sum();
            let (hits0, total0) = (
                lower.hits_tokens + memo.hits_tokens,
                lower.total_tokens + memo.total_tokens,
            );
            let (mut t_fwd, mut t_bwd, mut t_opt) = (0.0, 0.0, 0.0);
            let (mut loss_v, mut norm) = (None, None);
            if tokens > 0 {
                let mut acc: Option<Vec<candle_core::Tensor>> = None;
                let mut total_loss = 0.0;
                let chunk = self.train.logprob_chunk;
                let seqs: Vec<Vec<u32>> = work
                    .iter()
                    .map(|(seg, _, _)| [&seg.prompt[..], &seg.ids[..]].concat())
                    .collect();
                // Segments that begin alike (a judge's items, a group's trajectories) go
                // through the adapted layers together: their shared beginning once, and one
                // backward pass of their summed losses.
                // A list (a listwise judge's query) is one pass whatever its length: its loss
                // couples its items.
                let listwise = self.sft.as_ref().is_some_and(|s| s.listwise);
                let target_weight = self.sft.as_ref().map_or(0.0, |s| s.target_weight);
                let runs = if listwise {
                    runs_of(&example_of)
                } else {
                    shared_groups(&seqs, SHARED_MIN, SHARED_SUFFIX_TOKENS)
                };
                // Runs at once (their adapted layers' forward and backward passes on the
                // rayon pool); each run's frozen layers first, one run after another (the memo
                // and cache are shared). Gradients are summed in the runs' order: the same
                // adapter as one run after another.
                let width = self.train.parallel_runs.max(1);
                let policy = &self.policy;
                let grpo = &self.train.grpo;
                let is_sft = self.sft.is_some();
                let lists = chosen.len().max(1) as f64;
                let opt_ref = &opt;
                // One run's loss terms (as logged, in order), gradients and seconds.
                let run_one = |range: &std::ops::Range<usize>,
                               scored: &[crate::Scored<'_>],
                               lowers: &[candle_core::Tensor]|
                 -> Result<RunOut> {
                    let t1 = Instant::now();
                    let mut logged_terms = Vec::new();
                    let (lps, references) =
                        policy.token_logprobs_above(scored, lowers, grpo.kl > 0.0, chunk)?;
                    let mut group_loss: Option<candle_core::Tensor> = None;
                    // A list of one item orders nothing: it adds no loss.
                    if listwise && range.len() > 1 {
                        let labels = range
                            .clone()
                            .map(|i| {
                                work[i].2.ok_or_else(|| {
                                    TrainError::Invalid(
                                        "a listwise example without soft labels".into(),
                                    )
                                })
                            })
                            .collect::<Result<Vec<f32>>>()?;
                        // The mean over the step's lists.
                        let l = crate::grpo::listwise_mixed_loss(
                            &lps,
                            &labels,
                            (target_weight > 0.0).then_some((0, target_weight)),
                            references.as_deref(),
                            grpo.kl,
                        )?
                        .affine(1.0 / lists, 0.0)?;
                        logged_terms.push(l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
                        group_loss = Some(l);
                    }
                    let pointwise = if listwise { Vec::new() } else { lps };
                    for (j, (lp, i)) in pointwise.into_iter().zip(range.clone()).enumerate() {
                        let (_, a, soft) = &work[i];
                        let reference = references.as_ref().map(|r| r[j].clone());
                        // Old log-probabilities: the training model's own, before this update.
                        let old: Vec<f32> =
                            lp.detach().to_dtype(candle_core::DType::F32)?.to_vec1()?;
                        let len = old.len();
                        let old_sum: f64 = old.iter().map(|&x| x as f64).sum();
                        let (l, logged) = if let Some(p) = soft {
                            // A soft label: the two-way cross-entropy (its value is logged).
                            let l = crate::grpo::soft_label_loss(
                                &lp,
                                *p,
                                reference.as_deref(),
                                grpo.kl,
                            )?;
                            let l = l.affine(1.0 / tokens as f64, 0.0)?;
                            let v = l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                            (l, Some(v))
                        } else {
                            let b = TokenBatch {
                                old,
                                reference,
                                mask: vec![1.0; len],
                                advantage: *a,
                            };
                            let (l, _) = grpo_loss(&[lp], &[b], grpo)?;
                            ((l * (len as f64 / tokens as f64))?, None)
                        };
                        logged_terms.push(if let Some(v) = logged {
                            v
                        } else if is_sft {
                            // Fine-tuning logs the mean negative log-likelihood of the tokens
                            // (the surrogate is −1 at ratio 1 whatever the model).
                            -old_sum / tokens as f64
                        } else {
                            l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?
                        });
                        group_loss = Some(match group_loss {
                            Some(g) => (g + l)?,
                            None => l,
                        });
                    }
                    let forward = t1.elapsed().as_secs_f64();
                    let t2 = Instant::now();
                    let grads = match group_loss {
                        Some(l) => Some(opt_ref.grads(&l)?),
                        None => None,
                    };
                    Ok(RunOut {
                        logged: logged_terms,
                        grads,
                        seconds: [forward, t2.elapsed().as_secs_f64()],
                    })
                };
                for batch in runs.chunks(width) {
                    let t1 = Instant::now();
                    let scored: Vec<Vec<crate::Scored<'_>>> = batch
                        .iter()
                        .map(|range| {
                            range
                                .clone()
                                .map(|i| crate::Scored {
                                    tokens: &seqs[i],
                                    from: work[i].0.prompt.len(),
                                    allowed: &work[i].0.masks,
                                })
                                .collect()
                        })
                        .collect();
                    let mut lowers = Vec::with_capacity(batch.len());
                    for sc in &scored {
                        // With β > 0 the reference pass shares the frozen lower layers.
                        let frozen = if self.train.exact_lower {
                            crate::Lower::Exact(Some(&mut lower))
                        } else {
                            crate::Lower::Remembered(self.local.transformer(), &mut memo)
                        };
                        lowers.push(self.policy.lowers(sc, frozen)?);
                    }
                    t_fwd += t1.elapsed().as_secs_f64();
                    let t2 = Instant::now();
                    let outs: Vec<Result<RunOut>> = if batch.len() > 1 {
                        use rayon::prelude::*;
                        batch
                            .par_iter()
                            .zip(scored.par_iter())
                            .zip(lowers.par_iter())
                            .map(|((r, sc), xs)| run_one(r, sc, xs))
                            .collect()
                    } else {
                        batch
                            .iter()
                            .zip(&scored)
                            .zip(&lowers)
                            .map(|((r, sc), xs)| run_one(r, sc, xs))
                            .collect()
                    };
                    let wall = t2.elapsed().as_secs_f64();
                    let (mut fwd, mut bwd) = (0.0, 0.0);
                    for out in outs {
                        let out = out?;
                        for v in out.logged {
                            total_loss += v;
                        }
                        if let Some(g) = out.grads {
                            acc = Some(crate::AdamW::add_grads(acc, g)?);
                        }
                        fwd += out.seconds[0];
                        bwd += out.seconds[1];
                    }
                    // Runs at once overlap: the batch's wall time is shared between the two
                    // phases as their thread time is, so the phases add up to the step's time.
                    let share = fwd / (fwd + bwd).max(f64::MIN_POSITIVE);
                    t_fwd += wall * share;
                    t_bwd += wall * (1.0 - share);
                }
                let t3 = Instant::now();
                if let Some(g) = acc {
                    norm = Some(opt.step(&g)?);
                }
                t_opt = t3.elapsed().as_secs_f64();
                loss_v = Some(total_loss);
            }
            state.step = step;
            let nn = n.max(1) as f64;
            let mut log = StepLog {
                step,
                reward: rt / nn,
                r_format: rf / nn,
                r_rec: rr / nn,
                r_mem: rm / nn,
                flat_groups: flat,
                rec_zero_groups: rec_zero,
                groups: groups.len(),
                loss: loss_v,
                grad_norm: norm,
                tokens,
                calls: work.len(),
                seconds: [t_roll, t_fwd, t_bwd, t_opt],
                peak_rss: mrrec_agent::progress::status_bytes("VmHWM:"),
                lower_reused: (lower.hits_tokens + memo.hits_tokens - hits0) as f64
                    / (lower.total_tokens + memo.total_tokens - total0).max(1) as f64,
                val_ndcg100: None,
            };
            let validate_now = self.train.val_every > 0
                && (step % self.train.val_every == 0 || step == self.train.steps);
            if validate_now && !val.is_empty() {
                let v = self.validate(val)?;
                log.val_ndcg100 = Some(v);
                match state.best {
                    Some((b, _)) if v <= b => {
                        state.since_best += 1;
                        if self.train.patience > 0 && state.since_best >= self.train.patience {
                            state.stopped = true;
                        }
                    }
                    _ => {
                        state.best = Some((v, step));
                        state.since_best = 0;
                        self.adapter_to_save()?
                            .save(&self.out.join("best-adapter.safetensors"))?;
                    }
                }
            }
            // The log line first, then the checkpoint: a run killed between the two redoes
            // this step on resume (and drops the line), never skips one.
            let line = serde_json::to_string(&log)?;
            {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)?;
                writeln!(f, "{line}")?;
            }
            write_plot(&log_path, &self.out.join("plot.svg"))?;
            self.save(&opt, &state)?;
            let val_text = log
                .val_ndcg100
                .map_or(String::new(), |v| format!(", val N@100 {v:.4}"));
            if self.progress && self.sft.is_some() {
                // Supervised steps (trajectories, a judge) have a loss and no rewards.
                eprintln!(
                    "step {step}/{}: loss {}, {:.0} s forward / {:.0} s backward{val_text}",
                    self.train.steps,
                    loss_v.map_or("-".into(), |l| format!("{l:.4}")),
                    t_fwd,
                    t_bwd,
                );
            } else if self.progress {
                eprintln!(
                    "step {step}/{}: reward {:.3} (format {:.2}, rec {:.3}, mem {:.2}), flat groups {flat}/{}, loss {}, {:.0} s rollout / {:.0} s forward / {:.0} s backward{}",
                    self.train.steps,
                    log.reward,
                    log.r_format,
                    log.r_rec,
                    log.r_mem,
                    log.groups,
                    loss_v.map_or("-".into(), |l| format!("{l:.4}")),
                    t_roll,
                    t_fwd,
                    t_bwd,
                    val_text
                );
            }
        }
        self.adapter_to_save()?
            .save(&self.out.join("adapter.safetensors"))?;
        self.save(&opt, &state)?;
        Ok(state)
    }
}

/// Segments sharing fewer leading tokens than this are scored on their own.
const SHARED_MIN: usize = 16;
/// At most this many tokens after the shared beginning in one pass (the graph of every
/// sequence of a group is alive until its backward pass).
const SHARED_SUFFIX_TOKENS: usize = 2048;

/// One run's part of a step ([`TrainConfig::parallel_runs`]): the loss terms as logged (in
/// order), the gradients of its loss (None: it adds none) and its forward and backward seconds.
struct RunOut {
    logged: Vec<f64>,
    grads: Option<Vec<candle_core::Tensor>>,
    seconds: [f64; 2],
}

/// The ranges of equal consecutive values of `keys` (a step's work items per example).
fn runs_of(keys: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=keys.len() {
        if i == keys.len() || keys[i] != keys[start] {
            if i > start {
                out.push(start..i);
            }
            start = i;
        }
    }
    out
}

/// Consecutive runs of `seqs` that share at least `min` leading tokens with the run's first
/// and whose tokens after that shared beginning number at most `budget` (a run has at least
/// one sequence, whatever its length).
fn shared_groups(seqs: &[Vec<u32>], min: usize, budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start + 1;
        let mut shared = seqs[start].len();
        while end < seqs.len() {
            let s = shared.min(crate::policy::common_prefix(&seqs[start], &seqs[end]));
            let rest: usize = (start..=end).map(|i| seqs[i].len() - s).sum();
            if s < min || rest > budget {
                break;
            }
            shared = s;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The checkpointed adapter of a run folder, if any.
pub fn run_adapter(out: &Path) -> Option<PathBuf> {
    [
        out.join("best-adapter.safetensors"),
        out.join("adapter.safetensors"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Writes `plot.svg` beside `log.jsonl`: the mean reward and its weighted components per step,
/// and validation N@100 (right axis) where measured.
pub fn write_plot(log: &Path, svg: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let (w, h, m) = (720.0f64, 360.0f64, 48.0f64);
    let steps = rows.len().max(2) as f64;
    let x = |i: f64| m + (i - 1.0) / (steps - 1.0).max(1.0) * (w - 2.0 * m);
    let series: [(&str, &str, f64, &str); 4] = [
        ("reward", "total reward", 1.0, "#1f5fbf"),
        ("r_rec", "5 · R_rec", 5.0, "#2a9d4b"),
        ("r_format", "0.1 · R_format", 0.1, "#999999"),
        ("r_mem", "0.1 · R_mem", 0.1, "#c77d00"),
    ];
    let ymax = rows
        .iter()
        .map(|r| r["reward"].as_f64().unwrap_or(0.0))
        .fold(1.0f64, f64::max);
    let y = |v: f64| h - m - v / ymax * (h - 2.0 * m);
    let vmax = rows
        .iter()
        .filter_map(|r| r["val_ndcg100"].as_f64())
        .fold(0.05f64, f64::max);
    let yv = |v: f64| h - m - v / vmax * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n<text x=\"{m}\" y=\"{}\">reward (max {ymax:.2})</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">step</text>\n",
        h - m,
        w - m,
        h - m,
        h - m,
        m - 8.0,
        w - m,
        h - m + 16.0
    );
    for (k, (key, label, weight, colour)) in series.iter().enumerate() {
        let pts: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{:.1},{:.1}",
                    x(i as f64 + 1.0),
                    y(r[*key].as_f64().unwrap_or(0.0) * weight)
                )
            })
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>\n",
            pts.join(" "),
            w - m - 150.0,
            m + 14.0 * k as f64
        ));
    }
    let vals: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r["val_ndcg100"].as_f64().map(|v| (i + 1, v)))
        .collect();
    for (i, v) in &vals {
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#b02a2a\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#b02a2a\">{v:.3}</text>\n",
            x(*i as f64),
            yv(*v),
            x(*i as f64) + 5.0,
            yv(*v) - 5.0
        ));
    }
    if !vals.is_empty() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"#b02a2a\">● validation N@100 (max {vmax:.3})</text>\n",
            w - m - 150.0,
            m + 14.0 * series.len() as f64
        ));
    }
    s.push_str("</svg>\n");
    std::fs::write(svg, s).with_context(|| format!("writing {}", svg.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_refused_resume_names_each_differing_leaf_and_what_is_absent() {
        let was =
            json!({"sft": {"judge": {"seed": 42, "negatives": 19}, "calls": 3}, "model": "m"});
        let now = json!({"sft": {"judge": {"seed": 42, "negatives": 9, "negatives_by": "question"}, "calls": 3}, "model": "m"});
        let mut d = Vec::new();
        json_differences("", &was, &now, &mut d);
        assert_eq!(
            d,
            vec![
                "sft.judge.negatives: 19 then, 9 now",
                "sft.judge.negatives_by: absent then, \"question\" now"
            ]
        );
        let mut none = Vec::new();
        json_differences("", &was, &was, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn segments_are_grouped_by_their_shared_beginning_within_a_budget() {
        let p: Vec<u32> = (0..20).collect();
        let seqs: Vec<Vec<u32>> = vec![
            [&p[..], &[90, 91]].concat(),          // 0: a judge's first item
            [&p[..], &[92, 93, 94]].concat(),      // 1: the same request, another item
            [&p[..10], &[95; 6]].concat(),         // 2: shares 10 < 16 tokens: a new run
            [&p[..10], &[96; 30]].concat(),        // 3: shares 10 with 2: its own run
            vec![7; 40],                           // 4: nothing shared
            vec![7; 40],                           // 5: all shared, 0 tokens after it
            [&vec![7; 40][..], &[1; 30]].concat(), // 6: 40 shared, 30 after it
        ];
        assert_eq!(shared_groups(&seqs, 16, 100), vec![0..2, 2..3, 3..4, 4..7]);
        // The budget counts every member's tokens after the shared beginning.
        assert_eq!(
            shared_groups(&seqs, 16, 29),
            vec![0..2, 2..3, 3..4, 4..6, 6..7]
        );
        // A sequence longer than the budget is a run of its own; nothing is dropped.
        assert_eq!(
            shared_groups(&seqs, 16, 1),
            vec![0..1, 1..2, 2..3, 3..4, 4..6, 6..7]
        );
        assert_eq!(
            shared_groups(&[], 16, 100),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!(runs_of(&[0, 0, 0, 1, 2, 2]), vec![0..3, 3..4, 4..6]);
        assert_eq!(runs_of(&[]), Vec::<std::ops::Range<usize>>::new());
    }

    #[test]
    fn the_plot_draws_every_series_and_the_validations() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut text = String::new();
        for i in 1..=6 {
            let mut v = json!({"step": i, "reward": 1.0 + i as f64 * 0.3, "r_format": 1.0, "r_rec": 0.2 + i as f64 * 0.05, "r_mem": 1.0});
            if i % 3 == 0 {
                v["val_ndcg100"] = json!(0.1 + i as f64 * 0.01);
            }
            text.push_str(&format!("{v}\n"));
        }
        std::fs::write(&log, text).unwrap();
        let svg = dir.path().join("plot.svg");
        write_plot(&log, &svg).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        assert_eq!(s.matches("<polyline").count(), 4);
        assert_eq!(s.matches("<circle").count(), 2);
        assert!(s.contains("0.160"));
        if let Ok(out) = std::env::var("MRREC_PLOT_OUT") {
            std::fs::copy(&svg, out).unwrap();
        }
    }
}
