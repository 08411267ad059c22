//! GRPO rollouts: the real assistant loop (guided or free) with the real memory tool, sampled at
//! a rollout temperature, every model call recorded as a [`Segment`] (exact prompt ids, sampled
//! ids, their log-probabilities, constraint masks) so that the loss never re-tokenises text, and
//! each trajectory scored with MR.Rec's rewards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Result, TrainError};
use mrrec_llm::{ChatModel, ChatRequest, ChatResponse};
use mrrec_llm_local::{Batcher, LocalModel, Segment, SegmentModel};
use mrrec_memory::MemoryRead;
use serde::Serialize;

use mrrec_agent::assistant::{Answer, Assistant, AssistantConfig};
use mrrec_agent::rewards::{RewardWeights, Rewards};
use mrrec_agent::Workspace;

/// `req` as a rollout samples it: at `temperature` with `seed`, the whole distribution (top-p 1)
/// and no repetition penalty — so the recorded log-probabilities are those of the distribution
/// sampled from.
fn rollout_request(req: &ChatRequest, temperature: f64, seed: u64) -> ChatRequest {
    let mut r = req.clone();
    r.sampling.temperature = temperature;
    r.sampling.top_p = 1.0;
    r.sampling.seed = seed;
    r.sampling.repetition_penalty = 1.0;
    r
}

/// A local model (alone or a [`Batcher`]'s worker) that samples every call at `temperature`
/// with its own seed — after the first [`Recording::greedy_first`] calls, which it decodes as the
/// assistant asked (greedily) — and records it.
pub struct Recording<'a> {
    local: &'a dyn SegmentModel,
    temperature: f64,
    seed: u64,
    greedy: u64,
    calls: AtomicU64,
    segments: Mutex<Vec<Segment>>,
}

impl<'a> Recording<'a> {
    /// Records calls to `local`; call `i` samples with seed `seed + i`.
    pub fn new(local: &'a dyn SegmentModel, temperature: f64, seed: u64) -> Self {
        Recording {
            local,
            temperature,
            seed,
            greedy: 0,
            calls: AtomicU64::new(0),
            segments: Mutex::new(Vec::new()),
        }
    }

    /// Decodes the first `n` calls as the assistant's request says (greedily, its own repetition
    /// penalty) instead of sampling them: a group then shares the greedy answer's reasoning and
    /// memory calls and differs only in what follows.
    pub fn greedy_first(mut self, n: usize) -> Self {
        self.greedy = n as u64;
        self
    }

    /// The calls recorded so far, in order, each with the constraint it was decoded under (and
    /// forgets them).
    pub fn take(&self) -> Vec<Segment> {
        std::mem::take(&mut *self.segments.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ChatModel for Recording<'_> {
    fn id(&self) -> &str {
        self.local.id()
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> mrrec_llm::Result<ChatResponse> {
        let i = self.calls.fetch_add(1, Ordering::SeqCst);
        let r = if i < self.greedy {
            req.clone()
        } else {
            rollout_request(req, self.temperature, self.seed.wrapping_add(i))
        };
        let (resp, seg) = self.local.chat_segment(&r, on_text)?;
        self.segments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(seg);
        Ok(resp)
    }
}

/// Any chat model — a server behind an OpenAI-compatible API — sampled at `temperature`, call
/// `i` with seed `seed + i` (servers that honour a seed repeat themselves). A server returns text,
/// not token ids, so nothing is recorded beyond the answer's trace.
pub struct Sampled<'a> {
    llm: &'a dyn ChatModel,
    temperature: f64,
    seed: u64,
    greedy: u64,
    calls: AtomicU64,
}

impl<'a> Sampled<'a> {
    /// Samples calls to `llm`; call `i` with seed `seed + i`.
    pub fn new(llm: &'a dyn ChatModel, temperature: f64, seed: u64) -> Self {
        Sampled {
            llm,
            temperature,
            seed,
            greedy: 0,
            calls: AtomicU64::new(0),
        }
    }

    /// As [`Recording::greedy_first`]: the first `n` calls as the assistant asked them.
    pub fn greedy_first(mut self, n: usize) -> Self {
        self.greedy = n as u64;
        self
    }
}

impl ChatModel for Sampled<'_> {
    fn id(&self) -> &str {
        self.llm.id()
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> mrrec_llm::Result<ChatResponse> {
        let i = self.calls.fetch_add(1, Ordering::SeqCst);
        if i < self.greedy {
            return self.llm.chat_stream(req, on_text);
        }
        let r = rollout_request(req, self.temperature, self.seed.wrapping_add(i));
        self.llm.chat_stream(&r, on_text)
    }
}

/// What samples the trajectories.
#[derive(Clone, Copy)]
pub enum Sampler<'a> {
    /// The policy's local model (with the current adapter applied): every call recorded as a
    /// [`Segment`] (ids, log-probabilities, masks).
    Local(&'a LocalModel),
    /// Any chat model, e.g. a teacher served elsewhere: text only (the trace), no segments —
    /// trainable only as text re-tokenised by the student (`--sft-as-free`).
    Server(&'a dyn ChatModel),
}

/// One trajectory.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// The model calls.
    pub segments: Vec<Segment>,
    /// The answer (trace included).
    pub answer: Answer,
    /// Its reward.
    pub rewards: Rewards,
    /// Its leading calls decoded greedily ([`Rollouts::greedy_calls`]).
    pub greedy_calls: usize,
}

/// Summary of a group for logs.
#[derive(Debug, Clone, Serialize)]
pub struct GroupLog {
    /// Query id.
    pub qid: String,
    /// Rewards of the trajectories.
    pub totals: Vec<f64>,
    /// Mean R_format, R_rec, R_mem.
    pub format: f64,
    /// Mean R_rec.
    pub rec: f64,
    /// Mean R_mem.
    pub mem: f64,
    /// Policy tokens sampled.
    pub tokens: usize,
}

/// What a rollout needs.
pub struct Rollouts<'a> {
    /// Catalogue and indexes.
    pub ws: &'a Workspace,
    /// Memory.
    pub store: &'a dyn MemoryRead,
    /// Tenant of the users.
    pub tenant: &'a str,
    /// The model that samples.
    pub sampler: Sampler<'a>,
    /// The assistant's settings (mode, levels, lengths).
    pub cfg: AssistantConfig,
    /// Sampling temperature.
    pub temperature: f64,
    /// Reward weights.
    pub weights: RewardWeights,
    /// Leading calls of each trajectory decoded as the assistant asks (greedily) rather than
    /// sampled: 0 samples every call (GRPO's rollouts); [`answer_only`] samples the guided
    /// loop's answer alone.
    pub greedy_calls: usize,
}

/// The guided loop's calls before its answer — the reasoning, then one per memory-tool call —
/// so that a [`Rollouts`] with this many `greedy_calls` samples only the final profile (and any
/// repair after it); `None` for the free loop, whose answer is whichever turn ends it.
pub fn answer_only(cfg: &AssistantConfig) -> Option<usize> {
    match cfg.mode {
        mrrec_agent::assistant::Mode::Guided => {
            let with_tool = !cfg.levels.is_empty() && cfg.guided_calls > 0;
            Some(1 + if with_tool { cfg.guided_calls } else { 0 })
        }
        _ => None,
    }
}

impl Rollouts<'_> {
    /// `g` trajectories of one query (`user`, `request`, `category`) whose purchased item is the
    /// catalogue position `target`; trajectory `j` samples with seeds from `seed + 1000·j`. With
    /// `batched`, the trajectories run on their own threads and every model call of the group is
    /// decoded in one batch (a [`Batcher`]); otherwise one after another. Either way the first
    /// call's prompt is the same for the whole group, so the model's prefix cache computes it once,
    /// and each trajectory samples the same tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn group(
        &self,
        user: &str,
        request: &str,
        category: Option<&str>,
        target: u32,
        g: usize,
        seed: u64,
        batched: bool,
    ) -> Result<Vec<Trajectory>> {
        let local = match self.sampler {
            Sampler::Local(l) => l,
            Sampler::Server(llm) => {
                return (0..g)
                    .map(|j| {
                        let s =
                            Sampled::new(llm, self.temperature, seed.wrapping_add(1000 * j as u64))
                                .greedy_first(self.greedy_calls);
                        let (answer, rewards) = self.answer(&s, user, request, category, target)?;
                        Ok(Trajectory {
                            segments: Vec::new(),
                            answer,
                            rewards,
                            greedy_calls: self.greedy_calls,
                        })
                    })
                    .collect();
            }
        };
        if !batched || g < 2 {
            return (0..g)
                .map(|j| self.trajectory(local, user, request, category, target, seed, j))
                .collect();
        }
        Batcher::new(local)
            .map(g, |w, j| {
                self.trajectory(w, user, request, category, target, seed, j)
            })
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(TrainError::Invalid("a rollout thread panicked".into())))
            })
            .collect()
    }

    /// Trajectory `j` of a group.
    #[allow(clippy::too_many_arguments)]
    fn trajectory(
        &self,
        model: &dyn SegmentModel,
        user: &str,
        request: &str,
        category: Option<&str>,
        target: u32,
        seed: u64,
        j: usize,
    ) -> Result<Trajectory> {
        let rec = Recording::new(model, self.temperature, seed.wrapping_add(1000 * j as u64))
            .greedy_first(self.greedy_calls);
        let (answer, rewards) = self.answer(&rec, user, request, category, target)?;
        Ok(Trajectory {
            segments: rec.take(),
            answer,
            rewards,
            greedy_calls: self.greedy_calls,
        })
    }

    /// The assistant's answer with `llm` and its reward.
    fn answer(
        &self,
        llm: &dyn ChatModel,
        user: &str,
        request: &str,
        category: Option<&str>,
        target: u32,
    ) -> Result<(Answer, Rewards)> {
        let a = Assistant {
            shop: self.ws.shop(),
            store: self.store,
            tenant: self.tenant,
            llm,
            cfg: self.cfg.clone(),
            observer: None,
        };
        let answer = a.answer(user, request, category, 10)?;
        let rewards =
            mrrec_agent::rewards::reward_of(&a.ranking(), &self.weights, &answer.trace, target)?;
        Ok((answer, rewards))
    }
}

/// The log line of a group.
pub fn group_log(qid: &str, group: &[Trajectory]) -> GroupLog {
    let n = group.len().max(1) as f64;
    GroupLog {
        qid: qid.to_string(),
        totals: group.iter().map(|t| t.rewards.total).collect(),
        format: group.iter().map(|t| t.rewards.format).sum::<f64>() / n,
        rec: group.iter().map(|t| t.rewards.rec).sum::<f64>() / n,
        mem: group.iter().map(|t| t.rewards.mem).sum::<f64>() / n,
        tokens: group
            .iter()
            .flat_map(|t| &t.segments)
            .map(|s| s.ids.len())
            .sum(),
    }
}
