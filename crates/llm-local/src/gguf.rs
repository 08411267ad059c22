//! What a GGUF file says about its model: architecture, context window, tokenizer, chat template.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::Result;
use mrrec_llm::LlmError;

/// The model facts read from a GGUF header.
pub struct GgufInfo {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture` ("qwen2", "llama").
    pub arch: String,
    /// Context window in tokens.
    pub context_length: usize,
    /// The tokenizer rebuilt from `tokenizer.ggml.*`.
    pub tokenizer: Tokenizer,
    /// The same tokenizer as `tokenizer.json` (constrained decoding derives token bytes from it).
    pub tokenizer_json: serde_json::Value,
    /// Vocabulary size of the output layer (`tokenizer.ggml.tokens` length).
    pub vocab_size: usize,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Token ids that end a turn (EOS, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` when present).
    pub stop_ids: Vec<u32>,
    /// The BOS token text, if any.
    pub bos_token: Option<String>,
    /// The EOS token text.
    pub eos_token: Option<String>,
}

pub(crate) fn bad(path: &Path, message: impl Into<String>) -> crate::LocalError {
    crate::LocalError::Llm(LlmError::BadModelFile {
        path: path.to_path_buf(),
        message: message.into(),
    })
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a String> {
    md.get(key).and_then(|v| v.to_string().ok())
}

fn get_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

/// The pre-tokenizer regexes llama.cpp uses for each `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    const GPT2: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    match pre {
        "qwen2" | "deepseek-llm" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level]}),
        "llama3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level]}),
        // SmolLM and StarCoder split every digit, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            split(r"\p{N}"), split(GPT2), byte_level]}),
        _ => json!({"type": "Sequence", "pretokenizers": [split(GPT2), byte_level]}),
    }
}

/// Rebuilds the file's BPE tokenizer (byte-level, as llama.cpp's "gpt2" model) from its metadata.
/// Control and user-defined tokens are parsed as single tokens wherever they appear in text.
pub fn tokenizer_from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Tokenizer> {
    let spec = tokenizer_json_from_gguf(path, md)?;
    let text = serde_json::to_string(&spec).map_err(|e| bad(path, e.to_string()))?;
    text.parse::<Tokenizer>().map_err(|e| {
        crate::LocalError::Llm(LlmError::Tokenizer(format!("{}: {e}", path.display())))
    })
}

/// The file's tokenizer as a `tokenizer.json` document.
pub fn tokenizer_json_from_gguf(
    path: &Path,
    md: &HashMap<String, Value>,
) -> Result<serde_json::Value> {
    let model = get_str(md, "tokenizer.ggml.model")
        .map(String::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(bad(
            path,
            format!("tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"),
        ));
    }
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| bad(path, "no tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let merges: Vec<String> = md
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .filter_map(|x| x.to_string().ok().cloned())
                .collect()
        })
        .unwrap_or_default();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let t = t.to_string().map_err(|e| bad(path, e.to_string()))?;
        vocab.insert(t.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3}),
            );
        }
    }
    let pre = get_str(md, "tokenizer.ggml.pre")
        .map(String::as_str)
        .unwrap_or("default");
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    Ok(spec)
}

impl GgufInfo {
    /// The first 16 hex digits of the sha256 of the vocabulary (every token's text, by id, special
    /// tokens included): two models whose token ids mean the same text have the same fingerprint,
    /// so trajectories written by one can train the other.
    pub fn tokenizer_fingerprint(&self) -> String {
        use sha2::Digest;
        let mut vocab: Vec<(u32, String)> = self
            .tokenizer
            .get_vocab(true)
            .into_iter()
            .map(|(t, i)| (i, t))
            .collect();
        vocab.sort();
        let mut h = sha2::Sha256::new();
        for (i, t) in &vocab {
            h.update(i.to_le_bytes());
            h.update((t.len() as u32).to_le_bytes());
            h.update(t.as_bytes());
        }
        hex::encode(h.finalize())[..16].to_string()
    }

    /// Reads the header of `path` (tensors are not loaded).
    pub fn read(path: &Path) -> Result<(Self, Content)> {
        let mut f = std::fs::File::open(path).map_err(|e| {
            crate::LocalError::Llm(LlmError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        let content =
            Content::read(&mut f).map_err(|e| bad(path, format!("not a GGUF file: {e}")))?;
        let md = &content.metadata;
        let arch = get_str(md, "general.architecture")
            .cloned()
            .ok_or_else(|| bad(path, "no general.architecture"))?;
        let context_length =
            get_u32(md, &format!("{arch}.context_length")).unwrap_or(2048) as usize;
        let tokenizer_json = tokenizer_json_from_gguf(path, md)?;
        let tokenizer: Tokenizer = serde_json::to_string(&tokenizer_json)
            .map_err(|e| bad(path, e.to_string()))?
            .parse()
            .map_err(|e| {
                crate::LocalError::Llm(LlmError::Tokenizer(format!("{}: {e}", path.display())))
            })?;
        let vocab_size = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
            .unwrap_or(0);
        let token_text = |key: &str| get_u32(md, key).and_then(|id| tokenizer.id_to_token(id));
        let mut stop_ids: Vec<u32> = Vec::new();
        if let Some(id) = get_u32(md, "tokenizer.ggml.eos_token_id") {
            stop_ids.push(id);
        }
        for t in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let info = GgufInfo {
            path: path.to_path_buf(),
            arch,
            context_length,
            chat_template: get_str(md, "tokenizer.chat_template").cloned(),
            bos_token: token_text("tokenizer.ggml.bos_token_id"),
            eos_token: token_text("tokenizer.ggml.eos_token_id"),
            tokenizer,
            tokenizer_json,
            vocab_size,
            stop_ids,
        };
        Ok((info, content))
    }

    /// Token ids of `text`, special tokens parsed, no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| crate::LocalError::Llm(LlmError::Tokenizer(e.to_string())))
    }
}
