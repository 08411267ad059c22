//! The local backend: a GGUF model (qwen2 or llama architecture) run on the CPU by our own forward
//! pass ([`crate::model::Transformer`]) over candle's quantised kernels, with the tokenizer and
//! chat template read from the file. Sequences have their own KV caches, so many decode together
//! (`generate_many`) and one prompt computed once serves a group of samples (`generate_group`).

mod file;
mod prefix;

pub use file::{check_gguf, names_a_file, FILE_ID_PREFIX};

use prefix::*;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

use crate::constrain::{apply_mask, cerr, ConstraintCompiler};
use crate::gguf::GgufInfo;
use crate::model::{KvCache, Transformer};
use crate::template::ChatTemplate;
use crate::Result;
use mrrec_llm::Constraint;
use mrrec_llm::{ChatModel, ChatRequest, ChatResponse, FinishReason, LlmError, Sampling, Usage};

/// What one generation produced, token by token.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Sampled token ids (the end-of-turn token excluded).
    pub ids: Vec<u32>,
    /// Log-probability of each sampled token under the model's distribution at temperature 1
    /// (before penalties), for GRPO.
    pub logprobs: Vec<f32>,
    /// Decoded text (stop string removed).
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Per sampled token: the tokens the constraint allowed (`None` when unconstrained).
    pub masks: Vec<Option<crate::TokenSet>>,
    /// The end-of-turn token, when the model sampled one (not in `ids` or `text`), with its
    /// log-probability and mask: the model's decision to stop, which training learns too.
    pub end: Option<(u32, f32, Option<crate::TokenSet>)>,
}

/// One model call of an agent loop, as training needs it: the exact prompt ids, the sampled ids
/// (the only tokens the policy wrote, the end-of-turn token included when the model sampled
/// one), their log-probabilities and the constraint masks.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Prompt token ids (controller text and tool responses included: never trained on).
    pub prompt: Vec<u32>,
    /// Sampled ids.
    pub ids: Vec<u32>,
    /// Their log-probabilities when sampled (temperature 1, renormalised under a constraint).
    pub logprobs: Vec<f32>,
    /// Per sampled id, the allowed set under a constraint.
    pub masks: Vec<Option<crate::TokenSet>>,
    /// The constraint the call was decoded under, if any: what fine-tuning replays over recorded
    /// ids to rebuild `masks` ([`LocalModel::constraint_masks`]).
    pub constraint: Option<mrrec_llm::Constraint>,
}

impl Segment {
    /// A call's segment: its prompt and what it generated under `constraint`, the sampled
    /// end-of-turn token last.
    pub fn of(
        prompt: Vec<u32>,
        g: &Generation,
        constraint: Option<mrrec_llm::Constraint>,
    ) -> Segment {
        let (mut ids, mut logprobs, mut masks) =
            (g.ids.clone(), g.logprobs.clone(), g.masks.clone());
        if let Some((id, lp, mask)) = &g.end {
            ids.push(*id);
            logprobs.push(*lp);
            masks.push(mask.clone());
        }
        Segment {
            prompt,
            ids,
            logprobs,
            masks,
            constraint,
        }
    }
}

/// A local GGUF chat model.
pub struct LocalModel {
    id: String,
    info: GgufInfo,
    template: Option<ChatTemplate>,
    model: Transformer,
    compiler: Mutex<Option<std::sync::Arc<ConstraintCompiler>>>,
    prefixes: Mutex<Vec<Prefix>>,
    reuse_prefixes: std::sync::atomic::AtomicBool,
}

/// One sequence being generated.
struct Seq<'a> {
    /// Its own length, stop and sampling rules (sequences decoded together may differ).
    s: Sampling,
    cache: KvCache,
    logits: Tensor,
    sampler: LogitsProcessor,
    matcher: Option<llguidance::Matcher>,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    masks: Vec<Option<crate::TokenSet>>,
    /// The sampled end-of-turn token ([`Generation::end`]).
    end: Option<(u32, f32, Option<crate::TokenSet>)>,
    text: String,
    emitted: usize,
    done: Option<FinishReason>,
    /// Why it stopped early (a constraint the model could not follow…): the others go on.
    failed: Option<LlmError>,
    on_text: Option<&'a mut dyn FnMut(&str)>,
    hook: Option<&'a mut LogitHook<'a>>,
    /// Checked before each token: a cancelled sequence stops with `Cancelled`.
    cancel: Option<mrrec_llm::Cancel>,
}

/// Edits a sequence's logits before each token: `(ids so far, logits)`.
pub type LogitHook<'a> = dyn FnMut(&[u32], &mut [f32]) + 'a;

fn sampler(s: &Sampling, seed: u64) -> LogitsProcessor {
    let sampling = if s.temperature <= 0.0 {
        CandleSampling::ArgMax
    } else if s.top_p < 1.0 {
        CandleSampling::TopP {
            p: s.top_p,
            temperature: s.temperature,
        }
    } else {
        CandleSampling::All {
            temperature: s.temperature,
        }
    };
    LogitsProcessor::from_sampling(seed, sampling)
}

/// The log-probability (temperature 1) of `token` under a row of logits, as decoding records it.
/// Per-request results, each slot filled by then (an empty one is an error, never a panic).
fn filled<T>(out: Vec<Option<Result<T>>>) -> Vec<Result<T>> {
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(crate::LocalError::Llm(LlmError::Tokenizer(
                    "no result".into(),
                )))
            })
        })
        .collect()
}

fn logprob(logits: &Tensor, token: u32) -> Result<f32> {
    let v = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let x = v.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    Ok(x - crate::vector::log_sum_exp(&v))
}

impl LocalModel {
    /// Loads a GGUF file.
    pub fn load(id: &str, path: &Path) -> Result<Self> {
        let (info, content) = GgufInfo::read(path)?;
        let model = Transformer::load(path, content)?;
        let template = match &info.chat_template {
            Some(t) => Some(ChatTemplate::new(
                t,
                info.bos_token.as_deref(),
                info.eos_token.as_deref(),
            )?),
            None => None,
        };
        Ok(LocalModel {
            id: id.to_string(),
            info,
            template,
            model,
            compiler: Mutex::new(None),
            prefixes: Mutex::new(Vec::new()),
            reuse_prefixes: std::sync::atomic::AtomicBool::new(crate::switches().prefix_reuse),
        })
    }

    /// Fetches a registered model (converting slow quantisations to Q8_0 once) and loads it.
    pub fn from_registry(id: &str) -> Result<Self> {
        let (id, q8) = Self::resolve_registry(id)?;
        Self::load(&id, &q8)
    }

    /// What [`LocalModel::from_registry`] loads, without loading it: the model's id and its file
    /// (fetched and converted once, as loading does).
    pub(crate) fn resolve_registry(id: &str) -> Result<(String, std::path::PathBuf)> {
        let source = Self::source_file(id)?;
        let q8 = crate::ensure_q8_0(&source)?;
        // A file whose k-quants were converted is another model than the one earlier versions
        // ran (they kept those tensors): its answers get their own cache keys.
        if crate::convert::k_quant_tensors(&source)? > 0 {
            Ok((format!("{id}+{}", crate::convert::CONVERSION_TAG), q8))
        } else {
            Ok((id.to_string(), q8))
        }
    }

    /// The GGUF file of registered model `id` as fetched (what it is converted from, and what
    /// llama.cpp loads), fetching it if needed.
    pub fn source_file(id: &str) -> Result<std::path::PathBuf> {
        let spec = mrrec_models::find(id)?;
        let paths = mrrec_models::ensure(id)?;
        let file = spec.files.first().map(|f| f.name).unwrap_or_default();
        Ok(paths.file(file)?.to_path_buf())
    }

    /// Renames the model (its id keys the response cache: a model with an adapter must not
    /// replay the base model's answers).
    pub fn set_id(&mut self, id: impl Into<String>) {
        self.id = id.into();
    }

    /// The GGUF facts (tokenizer, template, stop tokens).
    pub fn info(&self) -> &GgufInfo {
        &self.info
    }

    /// The forward pass (for callers that manage KV caches themselves).
    pub fn transformer(&self) -> &Transformer {
        &self.model
    }

    /// The allowed set at each of `ids` as constrained decoding under `c` computed it when it
    /// wrote them (the end-of-turn token included): the masks of a call recorded without them,
    /// replayed, so that fine-tuning renormalises exactly as sampling did. An error names the
    /// first position whose token the constraint did not allow (those ids were not written under
    /// `c`).
    pub fn constraint_masks(&self, c: &Constraint, ids: &[u32]) -> Result<Vec<crate::TokenSet>> {
        let n = self.model.n_vocab;
        let mut m = self.compiler(n)?.matcher(c)?;
        let mut masks = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let at = format!("token {i} of {} (id {id})", ids.len());
            if m.is_stopped() {
                return Err(cerr(format!("the constraint had ended before {at}")));
            }
            let set = crate::TokenSet::from_mask(&m.compute_mask().map_err(cerr)?, n);
            if !set.contains(id) {
                return Err(cerr(format!("{at} is not one the constraint allows there")));
            }
            masks.push(set);
            if self.info.stop_ids.contains(&id) {
                if i + 1 < ids.len() {
                    return Err(cerr(format!("{at} ends the turn before the last id")));
                }
                break;
            }
            m.consume_token(id).map_err(cerr)?;
        }
        Ok(masks)
    }

    /// Renders a request into the prompt text (template + assistant prefix).
    pub fn prompt(&self, req: &ChatRequest) -> Result<String> {
        let tmpl = self.template.as_ref().ok_or_else(|| {
            crate::LocalError::Llm(LlmError::BadModelFile {
                path: self.info.path.clone(),
                message: "no tokenizer.chat_template in the file".into(),
            })
        })?;
        let mut p = tmpl.render(&req.messages, &req.tools, true)?;
        if let Some(prefix) = &req.assistant_prefix {
            p.push_str(prefix);
        }
        Ok(p)
    }

    fn compiler(&self, n_vocab: usize) -> Result<std::sync::Arc<ConstraintCompiler>> {
        let mut slot = self.compiler.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(ConstraintCompiler::new(&self.info, n_vocab)?);
        *slot = Some(c.clone());
        Ok(c)
    }

    fn check_window(&self, prompt: &[u32], s: &Sampling) -> Result<()> {
        if prompt.is_empty() {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(
                "empty prompt".into(),
            )));
        }
        let window = self.info.context_length.min(self.model.context_length);
        if prompt.len() + s.max_tokens > window {
            return Err(crate::LocalError::Llm(LlmError::ContextOverflow {
                prompt: prompt.len(),
                max_new: s.max_tokens,
                window,
            }));
        }
        Ok(())
    }

    fn new_seq<'a>(
        &self,
        cache: KvCache,
        logits: Tensor,
        s: &Sampling,
        seed: u64,
        constraint: Option<&Constraint>,
        on_text: Option<&'a mut dyn FnMut(&str)>,
    ) -> Result<Seq<'a>> {
        let matcher = match constraint {
            Some(c) => Some(self.compiler(logits.dim(0)?)?.matcher(c)?),
            None => None,
        };
        Ok(Seq {
            s: s.clone(),
            cache,
            logits,
            sampler: sampler(s, seed),
            matcher,
            ids: Vec::new(),
            logprobs: Vec::new(),
            masks: Vec::new(),
            end: None,
            text: String::new(),
            emitted: 0,
            done: None,
            failed: None,
            on_text,
            hook: None,
            cancel: None,
        })
    }

    /// Picks the next token of one sequence from its logits; marks it done when it stops.
    fn step(&self, q: &mut Seq<'_>) -> Result<()> {
        mrrec_llm::check_cancel(q.cancel.as_ref())?;
        // One copy of the row; the mask and the hook edit it in place; the chosen token's
        // log-probability is `v[next] − ln Σ e^v` (one pass, no whole log-softmax).
        let mut v = q
            .logits
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let mut allowed = None;
        if let Some(m) = q.matcher.as_mut() {
            if m.is_stopped() {
                q.done = Some(FinishReason::Stop);
                return Ok(());
            }
            let mask = m
                .compute_mask()
                .map_err(|e| crate::LocalError::Llm(LlmError::Constraint(e.to_string())))?;
            apply_mask(&mut v, &mask);
            allowed = Some(crate::TokenSet::from_mask(&mask, v.len()));
        }
        if let Some(h) = q.hook.as_mut() {
            h(&q.ids, &mut v);
        }
        let lse = crate::vector::log_sum_exp(&v);
        let n = v.len();
        let logits = Tensor::from_vec(v, n, q.logits.device())?;
        let next = if q.s.repetition_penalty != 1.0 && !q.ids.is_empty() {
            let start = q.ids.len().saturating_sub(q.s.repeat_last_n);
            q.sampler
                .sample(&candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    q.s.repetition_penalty,
                    &q.ids[start..],
                )?)?
        } else {
            q.sampler.sample(&logits)?
        };
        // The log-probability before the penalty (the model's, as training recomputes it).
        let lp = logits.get(next as usize)?.to_scalar::<f32>()? - lse;
        if self.info.stop_ids.contains(&next) {
            q.end = Some((next, lp, allowed));
            q.done = Some(FinishReason::Stop);
            return Ok(());
        }
        if let Some(m) = q.matcher.as_mut() {
            m.consume_token(next)
                .map_err(|e| crate::LocalError::Llm(LlmError::Constraint(e.to_string())))?;
        }
        q.logprobs.push(lp);
        q.masks.push(allowed);
        q.ids.push(next);
        q.text = self.decode(&q.ids)?;
        if let Some(cut) =
            q.s.stop
                .iter()
                .filter_map(|st| q.text.find(st.as_str()))
                .min()
        {
            q.text.truncate(cut);
            q.done = Some(FinishReason::Stop);
        } else if q.ids.len() >= q.s.max_tokens {
            q.done = Some(FinishReason::Length);
        }
        // Emit only complete characters (a byte-level token may end mid-character).
        let complete = q.done.is_some() || !q.text.ends_with('\u{FFFD}');
        if complete && q.text.len() > q.emitted && q.text.is_char_boundary(q.emitted) {
            if let Some(f) = q.on_text.as_mut() {
                f(&q.text[q.emitted..]);
            }
            q.emitted = q.text.len();
        }
        Ok(())
    }

    /// Runs sequences to completion, decoding every unfinished one together each step.
    fn run(&self, seqs: &mut [Seq<'_>]) -> Result<()> {
        for q in seqs.iter_mut().filter(|q| q.s.max_tokens == 0) {
            q.done = Some(FinishReason::Length);
        }
        loop {
            for q in seqs.iter_mut().filter(|q| q.done.is_none()) {
                if let Err(e) = self.step(q) {
                    q.failed = Some(e.into());
                    q.done = Some(FinishReason::Stop);
                }
            }
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].done.is_none())
                .collect();
            if active.is_empty() {
                return Ok(());
            }
            let tokens: Vec<u32> = active
                .iter()
                .map(|&i| *seqs[i].ids.last().unwrap_or(&0))
                .collect();
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(active.len());
            let mut rest: &mut [Seq<'_>] = seqs;
            let mut offset = 0;
            for &i in &active {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
                let (one, tail) = tail.split_at_mut(1);
                caches.push(&mut one[0].cache);
                rest = tail;
                offset = i + 1;
            }
            let logits = self.model.decode_batch(&tokens, &mut caches)?;
            for (row, &i) in active.iter().enumerate() {
                seqs[i].logits = logits.get(row)?;
            }
        }
    }

    fn finish(mut q: Seq<'_>) -> Result<Generation> {
        if let Some(e) = q.failed.take() {
            return Err(e.into());
        }
        Ok(Generation {
            ids: q.ids,
            logprobs: q.logprobs,
            text: q.text,
            finish_reason: q.done.unwrap_or(FinishReason::Length),
            masks: q.masks,
            end: q.end,
        })
    }

    /// Generates from token ids; `on_text` receives decoded text as it grows.
    pub fn generate(
        &self,
        prompt: &[u32],
        s: &Sampling,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_constrained(prompt, s, None, on_text)
    }

    /// Generates from token ids under an optional constraint: disallowed tokens are masked before
    /// sampling, and the returned log-probabilities are renormalised over the allowed tokens.
    pub fn generate_constrained(
        &self,
        prompt: &[u32],
        s: &Sampling,
        constraint: Option<&Constraint>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.check_window(prompt, s)?;
        let (cache, logits) = self.prefill_reusing(prompt, None)?;
        let mut seqs = vec![self.new_seq(cache, logits, s, s.seed, constraint, Some(on_text))?];
        self.run(&mut seqs)?;
        Self::finish(seqs.remove(0))
    }

    /// Generates with a logit-mask hook: before each token, `mask(ids_so_far, logits)` may edit
    /// the logits (set −∞ to forbid a token). Log-probabilities are taken after the hook.
    pub fn generate_masked(
        &self,
        prompt: &[u32],
        s: &Sampling,
        mask: &mut dyn FnMut(&[u32], &mut [f32]),
    ) -> Result<Generation> {
        self.check_window(prompt, s)?;
        let (cache, logits) = self.prefill_reusing(prompt, None)?;
        let mut seq = self.new_seq(cache, logits, s, s.seed, None, None)?;
        seq.hook = Some(mask);
        let mut seqs = vec![seq];
        self.run(&mut seqs)?;
        Self::finish(seqs.remove(0))
    }

    /// Generates for many independent prompts, decoding them together (each keeps its own seed,
    /// so results equal single-stream generation).
    pub fn generate_many(&self, prompts: &[Vec<u32>], s: &[Sampling]) -> Result<Vec<Generation>> {
        if prompts.len() != s.len() {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(format!(
                "{} prompts, {} samplings",
                prompts.len(),
                s.len()
            ))));
        }
        for (p, si) in prompts.iter().zip(s) {
            self.check_window(p, si)?;
        }
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| self.model.new_cache()).collect();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let logits = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            self.prefill_grouped(&rows, &mut refs, &|| false)?
        };
        let mut seqs = Vec::with_capacity(prompts.len());
        for ((cache, si), l) in caches.into_iter().zip(s).zip(logits) {
            seqs.push(self.new_seq(cache, l, si, si.seed, None, None)?);
        }
        self.run(&mut seqs)?;
        seqs.into_iter().map(Self::finish).collect()
    }

    /// `g` samples of one prompt: the prompt is computed once and its KV cache forked; sample `i`
    /// uses seed `s.seed + i`. Optionally constrained (each sample has its own matcher).
    pub fn generate_group(
        &self,
        prompt: &[u32],
        s: &Sampling,
        g: usize,
        constraint: Option<&Constraint>,
    ) -> Result<Vec<Generation>> {
        self.check_window(prompt, s)?;
        let mut cache = self.model.new_cache();
        let logits = self.model.prefill(prompt, &mut cache)?;
        let mut seqs = Vec::with_capacity(g);
        for i in 0..g {
            seqs.push(self.new_seq(
                cache.clone(),
                logits.clone(),
                s,
                s.seed.wrapping_add(i as u64),
                constraint,
                None,
            )?);
        }
        self.run(&mut seqs)?;
        seqs.into_iter().map(Self::finish).collect()
    }

    /// Log-probabilities (temperature 1) of `tokens` following `prompt`, by forced decoding through
    /// the same path as generation (prefill, then one token at a time).
    pub fn score_continuation(&self, prompt: &[u32], tokens: &[u32]) -> Result<Vec<f32>> {
        if prompt.is_empty() {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(
                "empty prompt".into(),
            )));
        }
        let mut cache = self.model.new_cache();
        let mut logits = self.model.prefill(prompt, &mut cache)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            out.push(logprob(&logits, t)?);
            if i + 1 < tokens.len() {
                logits = self.model.decode_batch(&[t], &mut [&mut cache])?.get(0)?;
            }
        }
        Ok(out)
    }

    /// The model's log-probability (temperature 1) of `next` after a fresh prefill of `prefix`.
    pub fn logprob_of_next(&self, prefix: &[u32], next: u32) -> Result<f32> {
        let mut cache = self.model.new_cache();
        logprob(&self.model.prefill(prefix, &mut cache)?, next)
    }

    /// A request's sequence, ready to decode: refused if already cancelled or too long for the
    /// window, its prompt prefilled (reusing a remembered prefix), its sampling, constraint and
    /// cancel token attached.
    fn start<'a>(
        &self,
        ids: &[u32],
        req: &ChatRequest,
        on_text: Option<&'a mut dyn FnMut(&str)>,
    ) -> Result<Seq<'a>> {
        self.admit(ids, req)?;
        let (cache, logits) = self.prefill_reusing(ids, req.cancel.as_ref())?;
        self.seq_for(req, cache, logits, on_text)
    }

    /// A request's prompt ids, refused when it is already cancelled or too long for the window.
    fn admitted_ids(&self, req: &ChatRequest) -> Result<Vec<u32>> {
        let ids = self.info.encode(&self.prompt(req)?)?;
        self.admit(&ids, req)?;
        Ok(ids)
    }

    /// Refuses a request already cancelled or too long for the window.
    fn admit(&self, ids: &[u32], req: &ChatRequest) -> Result<()> {
        mrrec_llm::check_cancel(req.cancel.as_ref())?;
        self.check_window(ids, &req.sampling)
    }

    /// A prefilled request's sequence with its sampling, constraint and cancel token.
    fn seq_for<'a>(
        &self,
        req: &ChatRequest,
        cache: KvCache,
        logits: Tensor,
        on_text: Option<&'a mut dyn FnMut(&str)>,
    ) -> Result<Seq<'a>> {
        let mut q = self.new_seq(
            cache,
            logits,
            &req.sampling,
            req.sampling.seed,
            req.constraint.as_ref(),
            on_text,
        )?;
        q.cancel = req.cancel.clone();
        Ok(q)
    }

    /// Answers `req` and returns, beside the answer, the call as a training [`Segment`].
    pub fn chat_segment(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(ChatResponse, Segment)> {
        let t0 = Instant::now();
        let prompt = self.prompt(req)?;
        let ids = self.info.encode(&prompt)?;
        let mut seqs = vec![self.start(&ids, req, Some(on_text))?];
        self.run(&mut seqs)?;
        let g = Self::finish(seqs.remove(0))?;
        let seg = Segment::of(ids.clone(), &g, req.constraint.clone());
        Ok((self.response(req, ids.len(), g, t0), seg))
    }

    /// Answers several requests together: each prompt is prefilled (reusing remembered
    /// prefixes), then every sequence decodes in one batch per step, each under its own sampling,
    /// stop rules and constraint; a sequence's tokens are the same as alone. Each response carries
    /// an equal share of the batch's wall time (the seconds of a batch add up to what it took).
    pub fn chat_segments(&self, reqs: &[ChatRequest]) -> Vec<Result<(ChatResponse, Segment)>> {
        let t0 = Instant::now();
        let mut out: Vec<Option<Result<(ChatResponse, Segment)>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut started: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut seqs = Vec::new();
        // Every request's prompt, checked; then their new tokens prefilled as one batch.
        let mut ready: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.admitted_ids(r) {
                Ok(ids) => ready.push((i, ids)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let prompts: Vec<&[u32]> = ready.iter().map(|(_, ids)| ids.as_slice()).collect();
        let stop = all_cancelled(ready.iter().map(|&(i, _)| reqs[i].cancel.clone()).collect());
        let prefilled = self.prefill_reusing_many(&prompts, &stop);
        for ((i, ids), pre) in ready.into_iter().zip(prefilled) {
            match pre.and_then(|(cache, logits)| self.seq_for(&reqs[i], cache, logits, None)) {
                Ok(q) => {
                    started.push((i, ids));
                    seqs.push(q);
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        if let Err(e) = self.run(&mut seqs) {
            let msg = e.to_string();
            for (i, _) in &started {
                out[*i] = Some(Err(crate::LocalError::Llm(LlmError::Tokenizer(format!(
                    "batch failed: {msg}"
                )))));
            }
        } else {
            let n = started.len().max(1) as f64;
            for ((i, ids), q) in started.into_iter().zip(seqs) {
                out[i] = Some(Self::finish(q).map(|g| {
                    let seg = Segment::of(ids.clone(), &g, reqs[i].constraint.clone());
                    let mut resp = self.response(&reqs[i], ids.len(), g, t0);
                    resp.usage.seconds /= n;
                    (resp, seg)
                }));
            }
        }
        filled(out)
    }

    /// Scores `choices` as the first token of each request's answer: every prompt is prefilled
    /// (those sharing a beginning — one judge's questions about many items — compute it once,
    /// then their new tokens go through as one batch), and the log-probability of each choice's
    /// first token is read from the logits after the prompt. Nothing is generated. Each result's
    /// time is an equal share of the batch's.
    pub fn score_choices_local(
        &self,
        reqs: &[ChatRequest],
        choices: &[&str],
    ) -> Vec<Result<mrrec_llm::ChoiceScores>> {
        let t0 = Instant::now();
        let tokens: Result<Vec<u32>> = choices
            .iter()
            .map(|c| {
                self.info.encode(c)?.first().copied().ok_or_else(|| {
                    crate::LocalError::Llm(LlmError::Tokenizer(format!(
                        "the choice {c:?} has no token"
                    )))
                })
            })
            .collect();
        let tokens = match tokens {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                return reqs
                    .iter()
                    .map(|_| Err(crate::LocalError::Llm(LlmError::Tokenizer(msg.clone()))))
                    .collect();
            }
        };
        let mut out: Vec<Option<Result<mrrec_llm::ChoiceScores>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut ready: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let one = ChatRequest {
                sampling: Sampling {
                    max_tokens: 1,
                    ..r.sampling.clone()
                },
                ..r.clone()
            };
            match self.admitted_ids(&one) {
                Ok(ids) => ready.push((i, ids)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let prompts: Vec<&[u32]> = ready.iter().map(|(_, ids)| ids.as_slice()).collect();
        let stop = all_cancelled(ready.iter().map(|&(i, _)| reqs[i].cancel.clone()).collect());
        let prefilled = self.prefill_reusing_many(&prompts, &stop);
        let n = ready.len().max(1) as f64;
        let seconds = t0.elapsed().as_secs_f64() / n;
        for ((i, ids), pre) in ready.into_iter().zip(prefilled) {
            out[i] = Some(pre.and_then(|(_, logits)| {
                let v = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
                let z = crate::vector::log_sum_exp(&v);
                Ok(mrrec_llm::ChoiceScores {
                    logprobs: tokens
                        .iter()
                        .map(|&t| v.get(t as usize).map_or(f32::NEG_INFINITY, |x| x - z))
                        .collect(),
                    usage: Usage {
                        prompt_tokens: ids.len() as u64,
                        completion_tokens: 0,
                        seconds,
                    },
                })
            }));
        }
        filled(out)
    }

    /// Decodes ids to text (special tokens kept as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.info
            .tokenizer
            .decode(ids, false)
            .map_err(|e| crate::LocalError::Llm(LlmError::Tokenizer(e.to_string())))
    }

    fn response(
        &self,
        req: &ChatRequest,
        prompt_len: usize,
        g: Generation,
        t0: Instant,
    ) -> ChatResponse {
        let full = format!(
            "{}{}",
            req.assistant_prefix.as_deref().unwrap_or(""),
            g.text
        );
        ChatResponse {
            tool_calls: mrrec_llm::parse::tool_calls(&full).calls,
            text: g.text,
            finish_reason: g.finish_reason,
            usage: Usage {
                prompt_tokens: prompt_len as u64,
                completion_tokens: g.ids.len() as u64,
                seconds: t0.elapsed().as_secs_f64(),
            },
        }
    }
}

/// Whether every one of a batch's requests' `tokens` is cancelled (a batch's prefill stops only
/// when none of its requests still wants an answer; a request without a token always does; each
/// sequence's own token is checked again before every decoding step).
fn all_cancelled(tokens: Vec<Option<mrrec_llm::Cancel>>) -> impl Fn() -> bool {
    let tokens: Option<Vec<mrrec_llm::Cancel>> = tokens.into_iter().collect();
    move || {
        tokens
            .as_ref()
            .is_some_and(|t| !t.is_empty() && t.iter().all(mrrec_llm::Cancel::is_cancelled))
    }
}

impl ChatModel for LocalModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> mrrec_llm::Result<ChatResponse> {
        Ok(self.chat_segment(req, on_text)?.0)
    }

    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<mrrec_llm::Result<ChatResponse>> {
        self.chat_segments(reqs)
            .into_iter()
            .map(|r| r.map(|(resp, _)| resp).map_err(Into::into))
            .collect()
    }

    fn score_choices(
        &self,
        reqs: &[ChatRequest],
        choices: &[&str],
    ) -> Vec<mrrec_llm::Result<mrrec_llm::ChoiceScores>> {
        self.score_choices_local(reqs, choices)
            .into_iter()
            .map(|r| r.map_err(Into::into))
            .collect()
    }
}
