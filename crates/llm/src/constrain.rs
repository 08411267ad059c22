//! Constrained decoding: generation restricted to a JSON schema, a Lark grammar or a regex, by
//! masking the logits with llguidance (a token trie walked against an Earley parser, so the cost
//! per token stays small). Log-probabilities of constrained steps are renormalised over the
//! allowed tokens.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::gguf::GgufInfo;
use crate::{LlmError, Result};

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON schema (the output is one JSON value that validates).
    JsonSchema(serde_json::Value),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// A regular expression over the whole output.
    Regex(String),
}

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
        }
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

fn cerr(e: impl std::fmt::Display) -> LlmError {
    LlmError::Constraint(e.to_string())
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
        let parser = self
            .factory
            .create_parser(c.grammar())
            .map_err(|e| LlmError::Constraint(format!("invalid constraint: {e}")))?;
        let mut m = Matcher::new(Ok(parser));
        let mask = m.compute_mask().map_err(cerr)?;
        if mask.is_zero() {
            return Err(LlmError::Constraint(
                "the constraint admits no output".into(),
            ));
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
}

/// Sets every disallowed logit to −∞ (tokens beyond the mask's length are disallowed too).
pub(crate) fn apply_mask(logits: &mut [f32], mask: &toktrie::SimpleVob) {
    for (i, l) in logits.iter_mut().enumerate() {
        if !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Checks `v` against the JSON-schema subset mrrec's constraints use (`type`, `properties`,
/// `required`, `additionalProperties: false`, `items`, `enum`, `const`, `minLength`, `maxLength`,
/// `minItems`, `maxItems`). Used where a server cannot constrain its output.
pub fn validate(
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    let here = if at.is_empty() { "$" } else { at };
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!(
                "{here}: {v} is not one of {}",
                Value::Array(e.clone())
            ));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return Err(format!("{here}: {v} is not {c}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("number") => v.is_number(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        _ => true,
    };
    if !ok {
        return Err(format!("{here}: expected {}, got {v}", ty.unwrap_or("?")));
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_u64).map(|n| n as usize);
    if let Some(s) = v.as_str() {
        let n = s.chars().count();
        if num("minLength").is_some_and(|m| n < m) || num("maxLength").is_some_and(|m| n > m) {
            return Err(format!("{here}: string length {n} out of bounds"));
        }
    }
    if let Some(a) = v.as_array() {
        if num("minItems").is_some_and(|m| a.len() < m)
            || num("maxItems").is_some_and(|m| a.len() > m)
        {
            return Err(format!("{here}: {} items out of bounds", a.len()));
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(items, x, &format!("{here}[{i}]"))?;
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = r.as_str() {
                if !o.contains_key(k) {
                    return Err(format!("{here}: missing required `{k}`"));
                }
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, x, &format!("{here}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{here}: unexpected property `{k}`"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::json;

    #[test]
    fn validates_the_subset() {
        let s = json!({"type": "object", "properties": {
            "p": {"type": "string", "minLength": 1},
            "ids": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}},
            "required": ["p", "ids"], "additionalProperties": false});
        assert!(validate(&s, &json!({"p": "x", "ids": ["a"]}), "").is_ok());
        assert_eq!(
            validate(&s, &json!({"p": "x"}), "").unwrap_err(),
            "$: missing required `ids`"
        );
        assert_eq!(
            validate(&s, &json!({"p": "", "ids": []}), "").unwrap_err(),
            "$.p: string length 0 out of bounds"
        );
        assert!(validate(&s, &json!({"p": "x", "ids": ["c"]}), "")
            .unwrap_err()
            .starts_with("$.ids[0]: \"c\" is not one of"));
        assert_eq!(
            validate(&s, &json!({"p": "x", "ids": [], "z": 1}), "").unwrap_err(),
            "$: unexpected property `z`"
        );
        assert_eq!(
            validate(&s, &json!([1]), "").unwrap_err(),
            "$: expected object, got [1]"
        );
    }
}
