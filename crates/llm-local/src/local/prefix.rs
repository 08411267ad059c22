//! Prefix reuse and grouped prefill: a prompt that extends a remembered one (the previous call
//! of an assistant loop, a GRPO group's shared prompt) reuses its keys and values, and the new
//! rows of many prompts go through the projections together, in waves so that a prompt sharing
//! more with another of the batch than with a remembered one waits for it.

use candle_core::Tensor;

use super::*;

/// A prompt already run through the model: its keys and values and its last logits, so that a
/// later prompt sharing its beginning (the next turn of an agent loop, the same system prompt)
/// only prefills what differs.
pub(super) struct Prefix {
    pub(super) ids: Vec<u32>,
    pub(super) cache: KvCache,
    pub(super) logits: Tensor,
    pub(super) lora: u64,
    pub(super) used: u64,
}

/// Prompts kept for prefix reuse.
pub(super) const PREFIXES: usize = 4;
/// Shortest shared beginning worth reusing.
pub(super) const MIN_SHARED: usize = 32;

/// New prompt tokens per pass of batched prefill (see [`LocalModel::prefill_grouped`]).
pub(super) const PREFILL_ROWS: usize = 1024;

/// What a remembered prompt gives a new one.
pub(super) enum Reuse {
    /// The same prompt: its cache and logits.
    Whole(KvCache, Tensor),
    /// A cache holding the first positions to prefill from (none: a fresh cache).
    From(KvCache),
}

/// How many leading tokens `a` and `b` share.
pub(super) fn shared_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl LocalModel {
    /// Runs `prompt` through the model, reusing the keys and values of the longest remembered
    /// prompt that shares at least [`MIN_SHARED`] leading tokens with it; remembers this one.
    /// A cancelled `cancel` stops it before its next pass (`Cancelled`).
    pub(super) fn prefill_reusing(
        &self,
        prompt: &[u32],
        cancel: Option<&mrrec_llm::Cancel>,
    ) -> Result<(KvCache, Tensor)> {
        let stop = || cancel.is_some_and(mrrec_llm::Cancel::is_cancelled);
        self.prefill_reusing_many(&[prompt], &stop)
            .pop()
            .unwrap_or_else(|| {
                Err(crate::LocalError::Llm(LlmError::Tokenizer(
                    "no prompt".into(),
                )))
            })
    }

    /// [`Self::prefill_reusing`] for several prompts, their new tokens prefilled as one batch
    /// ([`Transformer::prefill_batch`]). A prompt that shares more with an earlier prompt of the
    /// batch than with any remembered one waits for a later wave, so that it reuses that
    /// prompt's keys and values as it would have one at a time (a GRPO group's identical
    /// prompts are computed once). Once `stop` returns true (asked before each pass of
    /// [`Self::prefill_grouped`]) the wave in progress and every later one are `Cancelled`.
    pub(super) fn prefill_reusing_many(
        &self,
        prompts: &[&[u32]],
        stop: &dyn Fn() -> bool,
    ) -> Vec<Result<(KvCache, Tensor)>> {
        let reuse = self
            .reuse_prefixes
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut out: Vec<Option<Result<(KvCache, Tensor)>>> =
            (0..prompts.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..prompts.len()).collect();
        while !pending.is_empty() {
            let mut wave: Vec<(usize, KvCache)> = Vec::new();
            let mut later = Vec::new();
            for i in pending {
                let p = prompts[i];
                if !reuse {
                    wave.push((i, self.model.new_cache()));
                    continue;
                }
                // Decided before any cache is copied: a prompt that waits costs nothing now.
                let known = self.reusable_len(p);
                let waits = wave.iter().any(|&(j, _)| {
                    let n = shared_len(p, prompts[j]);
                    n >= MIN_SHARED && n > known
                });
                if waits {
                    later.push(i);
                    continue;
                }
                match self.best_prefix(p) {
                    Ok(Reuse::Whole(c, l)) => out[i] = Some(Ok((c, l))),
                    Ok(Reuse::From(c)) => wave.push((i, c)),
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            let rests: Vec<&[u32]> = wave.iter().map(|(i, c)| &prompts[*i][c.pos..]).collect();
            let mut caches: Vec<&mut KvCache> = wave.iter_mut().map(|(_, c)| c).collect();
            match self.prefill_grouped(&rests, &mut caches, stop) {
                Ok(logits) => {
                    for ((i, cache), l) in wave.into_iter().zip(logits) {
                        if reuse {
                            self.remember(prompts[i], &cache, &l);
                        }
                        out[i] = Some(Ok((cache, l)));
                    }
                }
                // One prompt keeps its error as it is (a cancellation stays a cancellation).
                Err(e) if wave.len() == 1 => out[wave[0].0] = Some(Err(e)),
                Err(crate::LocalError::Llm(LlmError::Cancelled)) => {
                    for i in wave.into_iter().map(|(i, _)| i).chain(later) {
                        out[i] = Some(Err(crate::LocalError::Llm(LlmError::Cancelled)));
                    }
                    break;
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (i, _) in wave {
                        out[i] = Some(Err(crate::LocalError::Llm(LlmError::Tokenizer(format!(
                            "prefill failed: {msg}"
                        )))));
                    }
                }
            }
            pending = later;
        }
        filled(out)
    }

    /// Prefills the sequences in passes of [`Transformer::prefill_batch`] of at most
    /// [`PREFILL_ROWS`] new tokens (a longer prompt takes a pass of its own): short prompts share
    /// each weight read (measured: eight 32-token prompts in one pass 1.18–1.22× as fast as one
    /// by one; four 250-token prompts 0.86–1.06×, no gain), while a pass's activations stay
    /// bounded. Returns each sequence's logits; `Cancelled` when `stop` returns true before a
    /// pass (the caches are then partly filled and must not be used).
    pub(super) fn prefill_grouped(
        &self,
        rests: &[&[u32]],
        caches: &mut [&mut KvCache],
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(rests.len());
        let mut start = 0;
        while start < rests.len() {
            if stop() {
                return Err(crate::LocalError::Llm(LlmError::Cancelled));
            }
            let mut end = start + 1;
            let mut rows = rests[start].len();
            while end < rests.len() && rows + rests[end].len() <= PREFILL_ROWS {
                rows += rests[end].len();
                end += 1;
            }
            let logits = self
                .model
                .prefill_batch(&rests[start..end], &mut caches[start..end])?;
            for row in 0..end - start {
                out.push(logits.get(row)?);
            }
            start = end;
        }
        Ok(out)
    }

    /// The remembered prompt (of the current adapter) sharing the most leading tokens with
    /// `prompt`, and how many.
    pub(super) fn longest_match<'p>(
        prefixes: &'p mut [Prefix],
        prompt: &[u32],
        lora: u64,
    ) -> Option<(usize, &'p mut Prefix)> {
        prefixes
            .iter_mut()
            .filter(|x| x.lora == lora)
            .map(|x| (shared_len(&x.ids, prompt), x))
            .max_by_key(|(n, _)| *n)
    }

    /// How many leading positions of `prompt` [`Self::best_prefix`] would take from a
    /// remembered prompt (its length when it is remembered whole), without copying anything.
    pub(super) fn reusable_len(&self, prompt: &[u32]) -> usize {
        let lora = self.model.lora_generation();
        let mut p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        match Self::longest_match(&mut p, prompt, lora) {
            Some((n, x)) if n == prompt.len() && n == x.ids.len() => n,
            Some((n, _)) if n >= MIN_SHARED => n.min(prompt.len() - 1),
            _ => 0,
        }
    }

    /// The remembered prompt sharing the most leading tokens with `prompt`: its whole cache when
    /// it is `prompt`, else a fresh cache or one truncated to the shared part (at least
    /// [`MIN_SHARED`] tokens; at least one token is left to prefill, for the logits).
    pub(super) fn best_prefix(&self, prompt: &[u32]) -> Result<Reuse> {
        let lora = self.model.lora_generation();
        let mut p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let tick = p.iter().map(|x| x.used).max().unwrap_or(0) + 1;
        Ok(match Self::longest_match(&mut p, prompt, lora) {
            Some((n, x)) if n == prompt.len() && n == x.ids.len() => {
                x.used = tick;
                Reuse::Whole(x.cache.clone(), x.logits.clone())
            }
            Some((n, x)) if n >= MIN_SHARED => {
                x.used = tick;
                let mut c = x.cache.clone();
                c.truncate(n.min(prompt.len() - 1))?;
                Reuse::From(c)
            }
            _ => Reuse::From(self.model.new_cache()),
        })
    }

    /// Remembers a prefilled prompt (the least recently used of [`PREFIXES`] makes room).
    pub(super) fn remember(&self, prompt: &[u32], cache: &KvCache, logits: &Tensor) {
        let lora = self.model.lora_generation();
        let mut p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let tick = p.iter().map(|x| x.used).max().unwrap_or(0) + 1;
        p.retain(|x| x.ids != prompt);
        if p.len() >= PREFIXES {
            if let Some(i) = p
                .iter()
                .enumerate()
                .min_by_key(|(_, x)| x.used)
                .map(|(i, _)| i)
            {
                p.remove(i);
            }
        }
        p.push(Prefix {
            ids: prompt.to_vec(),
            cache: cache.clone(),
            logits: logits.clone(),
            lora,
            used: tick,
        });
    }

    /// Turns prompt-prefix reuse on or off (on by default; `MRREC_PREFIX_REUSE=0` turns it off).
    /// Reuse is exact for prefill, but Q8_0 decoding quantises activations, so a reused cache can
    /// move later log-probabilities by a few hundredths and, rarely, flip a near-tied greedy
    /// token; callers that need bit-identical replays (log-probability checks) turn it off.
    pub fn set_prefix_reuse(&self, on: bool) {
        self.reuse_prefixes
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if !on {
            self.prefixes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_stopped_prefill_gives_up_before_its_next_pass() {
        let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
        m.set_prefix_reuse(false);
        // Four prompts of 600 tokens: a pass each (two would exceed PREFILL_ROWS).
        let text = "A shopper asked for a warm wool blanket and a pair of trail shoes. ".repeat(80);
        let prompts: Vec<Vec<u32>> = (0..4u32)
            .map(|k| {
                let mut ids = m.info().encode(&text).unwrap();
                ids.truncate(599);
                ids.insert(0, 100 + k);
                ids
            })
            .collect();
        assert!(prompts
            .iter()
            .all(|p| p.len() == 600 && 2 * 600 > PREFILL_ROWS));
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        // Asked before each pass: the third time it says stop, so two passes ran.
        let asked = Cell::new(0);
        let out = m.prefill_reusing_many(&refs, &|| {
            asked.set(asked.get() + 1);
            asked.get() == 3
        });
        assert_eq!(asked.get(), 3);
        assert_eq!(out.len(), 4);
        for r in &out {
            assert!(
                matches!(r, Err(crate::LocalError::Llm(LlmError::Cancelled))),
                "{:?}",
                r.as_ref().err()
            );
        }
        // Never stopped: every prompt prefilled, once per pass.
        asked.set(0);
        let out = m.prefill_reusing_many(&refs, &|| {
            asked.set(asked.get() + 1);
            false
        });
        assert_eq!(asked.get(), 4);
        assert!(out.iter().all(Result::is_ok));
    }
}
