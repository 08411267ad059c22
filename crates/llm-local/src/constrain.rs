//! Constrained decoding: generation restricted to a JSON schema, a Lark grammar or a regex, by
//! masking the logits with llguidance (a token trie walked against an Earley parser, so the cost
//! per token stays small). Log-probabilities of constrained steps are renormalised over the
//! allowed tokens.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::gguf::GgufInfo;
use mrrec_llm::{Constraint, LlmError};

use crate::Result;

/// The llguidance grammar of a constraint.
fn grammar(c: &Constraint) -> TopLevelGrammar {
    match c {
        Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
        Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
    }
}

struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Builds matchers for one model's vocabulary (the trie is built once per model).
pub struct ConstraintCompiler {
    factory: ParserFactory,
}

pub(crate) fn cerr(e: impl std::fmt::Display) -> crate::LocalError {
    crate::LocalError::Llm(LlmError::Constraint(e.to_string()))
}

impl ConstraintCompiler {
    /// A compiler for the model described by `info`, whose output layer has `n_vocab` rows.
    pub fn new(info: &GgufInfo, n_vocab: usize) -> Result<Self> {
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&info.tokenizer_json).map_err(cerr)?;
        while words.len() < n_vocab {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let eos = info.stop_ids.first().copied().unwrap_or(0);
        let mut rx = TokRxInfo::new(words.len() as u32, eos);
        rx.tok_end_of_turn = info.stop_ids.get(1).copied();
        let trie = TokTrie::from(&rx, &words).with_eos_tokens(&info.stop_ids);
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: info.tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(cerr)?;
        factory.quiet();
        Ok(ConstraintCompiler { factory })
    }

    /// A fresh matcher for `c`; an error when the constraint is malformed or admits nothing.
    pub fn matcher(&self, c: &Constraint) -> Result<Matcher> {
        let parser = self.factory.create_parser(grammar(c)).map_err(|e| {
            crate::LocalError::Llm(LlmError::Constraint(format!("invalid constraint: {e}")))
        })?;
        let mut m = Matcher::new(Ok(parser));
        let mask = m.compute_mask().map_err(cerr)?;
        if mask.is_zero() {
            return Err(crate::LocalError::Llm(LlmError::Constraint(
                "the constraint admits no output".into(),
            )));
        }
        Ok(m)
    }
}

/// A set of token ids (a bitset over the vocabulary): which tokens a constraint allowed at one
/// step, kept so that training renormalises exactly as sampling did. Same layout as
/// llguidance's mask (bit `i % 32` of word `i / 32`), so recording one is a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    words: Vec<u32>,
    len: usize,
}

impl TokenSet {
    /// The tokens `0..n` for which `f` holds.
    pub fn from_fn(n: usize, f: impl Fn(u32) -> bool) -> Self {
        let mut words = vec![0u32; n.div_ceil(32)];
        for i in 0..n {
            if f(i as u32) {
                words[i / 32] |= 1 << (i % 32);
            }
        }
        TokenSet { words, len: n }
    }

    /// The tokens `0..n` a constraint's mask allows (tokens beyond the mask are not).
    pub(crate) fn from_mask(mask: &toktrie::SimpleVob, n: usize) -> Self {
        let mut words = mask.as_slice().to_vec();
        words.truncate(n.div_ceil(32));
        TokenSet { words, len: n }
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        let i = id as usize;
        i < self.len
            && self
                .words
                .get(i / 32)
                .is_some_and(|w| w & (1 << (i % 32)) != 0)
    }

    /// Vocabulary size the set ranges over.
    pub fn universe(&self) -> usize {
        self.len
    }

    /// How many tokens are in the set.
    pub fn count(&self) -> usize {
        (0..self.len as u32).filter(|&i| self.contains(i)).count()
    }

    /// The tokens in the set, ascending.
    pub fn ids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let id = w * 32 + bits.trailing_zeros() as usize;
                if id >= self.len {
                    return out;
                }
                out.push(id as u32);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// Sets every disallowed logit to −∞ (tokens beyond the mask's length are disallowed too).
pub(crate) fn apply_mask(logits: &mut [f32], mask: &toktrie::SimpleVob) {
    // A word of the mask at a time: most words of a constrained step allow nothing.
    let words = mask.as_slice();
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        match words.get(i).copied().unwrap_or(0) {
            0 => chunk.fill(f32::NEG_INFINITY),
            u32::MAX => {}
            w => {
                for (b, l) in chunk.iter_mut().enumerate() {
                    if w & (1 << b) == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_keeps_exactly_the_allowed_logits() {
        // Words that allow nothing, everything, and some; a vocabulary that ends mid-word and
        // runs past the mask.
        let n = 32 * 6 + 7;
        let mut mask = toktrie::SimpleVob::alloc(32 * 6);
        for i in (32..64).chain([70, 71, 100, 191]) {
            mask.set(i, true);
        }
        let mut logits: Vec<f32> = (0..n).map(|i| i as f32).collect();
        apply_mask(&mut logits, &mask);
        for (i, l) in logits.iter().enumerate() {
            let allowed = i < 32 * 6 && mask.is_allowed(i as u32);
            assert_eq!(
                *l,
                if allowed { i as f32 } else { f32::NEG_INFINITY },
                "{i}"
            );
        }
        // The set of the same mask lists exactly its allowed tokens, ascending, none past the
        // vocabulary (the mask's bits beyond `len` are cut off).
        for len in [0, 5, 64, 100, 191, 192] {
            let set = TokenSet::from_mask(&mask, len);
            let want: Vec<u32> = (0..len as u32).filter(|&i| set.contains(i)).collect();
            assert_eq!(set.ids(), want, "len {len}");
            assert_eq!(set.count(), want.len());
        }
        let odd = TokenSet::from_fn(70, |i| i % 3 == 0 || i == 69);
        assert_eq!(odd.ids().len(), 24);
        assert_eq!(odd.ids().last(), Some(&69));
    }
}
