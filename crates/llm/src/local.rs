//! The local backend: a GGUF model (qwen2 or llama architecture) run by candle on the CPU, with
//! the tokenizer and chat template read from the file.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use candle_transformers::models::{quantized_llama, quantized_qwen2};

use crate::constrain::{apply_mask, Constraint, ConstraintCompiler};
use crate::gguf::GgufInfo;
use crate::template::ChatTemplate;
use crate::{
    ChatModel, ChatRequest, ChatResponse, FinishReason, LlmError, Result, Sampling, Usage,
};

enum Weights {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Llama(m) => m.forward(x, pos),
        }
    }
}

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
}

/// A local GGUF chat model.
pub struct LocalModel {
    id: String,
    info: GgufInfo,
    template: Option<ChatTemplate>,
    weights: Mutex<Weights>,
    device: Device,
    compiler: Mutex<Option<std::sync::Arc<ConstraintCompiler>>>,
}

impl LocalModel {
    /// Loads a GGUF file.
    pub fn load(id: &str, path: &Path) -> Result<Self> {
        let (info, content) = GgufInfo::read(path)?;
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path).map_err(|e| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let weights = match info.arch.as_str() {
            "qwen2" => Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                content, &mut f, &device,
            )?),
            "llama" => Weights::Llama(quantized_llama::ModelWeights::from_gguf(
                content, &mut f, &device,
            )?),
            other => {
                return Err(LlmError::BadModelFile {
                    path: path.to_path_buf(),
                    message: format!("architecture {other:?} is not supported (qwen2, llama)"),
                })
            }
        };
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
            weights: Mutex::new(weights),
            device,
            compiler: Mutex::new(None),
        })
    }

    /// Fetches a registered model (converting slow quantisations to Q8_0 once) and loads it.
    pub fn from_registry(id: &str) -> Result<Self> {
        let spec = mrrec_models::find(id)?;
        let paths = mrrec_models::ensure(id)?;
        let file = spec.files.first().map(|f| f.name).unwrap_or_default();
        let q8 = crate::ensure_q8_0(paths.file(file)?)?;
        Self::load(id, &q8)
    }

    /// The GGUF facts (tokenizer, template, stop tokens).
    pub fn info(&self) -> &GgufInfo {
        &self.info
    }

    /// Renders a request into the prompt text (template + assistant prefix).
    pub fn prompt(&self, req: &ChatRequest) -> Result<String> {
        let tmpl = self
            .template
            .as_ref()
            .ok_or_else(|| LlmError::BadModelFile {
                path: self.info.path.clone(),
                message: "no tokenizer.chat_template in the file".into(),
            })?;
        let mut p = tmpl.render(&req.messages, &req.tools, true)?;
        if let Some(prefix) = &req.assistant_prefix {
            p.push_str(prefix);
        }
        Ok(p)
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

    fn compiler(&self, n_vocab: usize) -> Result<std::sync::Arc<ConstraintCompiler>> {
        let mut slot = self.compiler.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(ConstraintCompiler::new(&self.info, n_vocab)?);
        *slot = Some(c.clone());
        Ok(c)
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
        if prompt.is_empty() {
            return Err(LlmError::Tokenizer("empty prompt".into()));
        }
        let window = self.info.context_length;
        if prompt.len() + s.max_tokens > window {
            return Err(LlmError::ContextOverflow {
                prompt: prompt.len(),
                max_new: s.max_tokens,
                window,
            });
        }
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
        let mut sampler = LogitsProcessor::from_sampling(s.seed, sampling);
        let mut weights = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut logits = weights.forward(&input, 0)?.squeeze(0)?;
        let mut matcher = match constraint {
            Some(c) => Some(self.compiler(logits.dim(0)?)?.matcher(c)?),
            None => None,
        };
        let mut ids: Vec<u32> = Vec::new();
        let mut logprobs = Vec::new();
        let mut emitted = 0usize;
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        for step in 0..s.max_tokens {
            let mut logits32 = logits.to_dtype(candle_core::DType::F32)?;
            if let Some(m) = matcher.as_mut() {
                if m.is_stopped() {
                    finish = FinishReason::Stop;
                    break;
                }
                let mask = m
                    .compute_mask()
                    .map_err(|e| LlmError::Constraint(e.to_string()))?;
                let mut v = logits32.to_vec1::<f32>()?;
                apply_mask(&mut v, &mask);
                logits32 = Tensor::new(v, &self.device)?;
            }
            let logp = candle_nn::ops::log_softmax(&logits32, D::Minus1)?;
            let penalised = if s.repetition_penalty != 1.0 && !ids.is_empty() {
                let start = ids.len().saturating_sub(s.repeat_last_n);
                candle_transformers::utils::apply_repeat_penalty(
                    &logits32,
                    s.repetition_penalty,
                    &ids[start..],
                )?
            } else {
                logits32
            };
            let next = sampler.sample(&penalised)?;
            if self.info.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            if let Some(m) = matcher.as_mut() {
                m.consume_token(next)
                    .map_err(|e| LlmError::Constraint(e.to_string()))?;
            }
            logprobs.push(logp.get(next as usize)?.to_scalar::<f32>()?);
            ids.push(next);
            text = self.decode(&ids)?;
            if let Some(cut) = s.stop.iter().filter_map(|st| text.find(st.as_str())).min() {
                text.truncate(cut);
                finish = FinishReason::Stop;
                if text.len() > emitted {
                    on_text(&text[emitted..]);
                }
                emitted = text.len();
                break;
            }
            // Emit only complete characters (a byte-level token may end mid-character).
            if !text.ends_with('\u{FFFD}') && text.len() > emitted && text.is_char_boundary(emitted)
            {
                on_text(&text[emitted..]);
                emitted = text.len();
            }
            if step + 1 == s.max_tokens {
                break;
            }
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            logits = weights
                .forward(&input, prompt.len() + ids.len() - 1)?
                .squeeze(0)?;
        }
        if text.len() > emitted && text.is_char_boundary(emitted) {
            on_text(&text[emitted..]);
        }
        Ok(Generation {
            ids,
            logprobs,
            text,
            finish_reason: finish,
        })
    }

    /// Log-probabilities (temperature 1) of `tokens` following `prompt`, by forced decoding through
    /// the same incremental path as [`LocalModel::generate`] (prefill, then one token at a time).
    pub fn score_continuation(&self, prompt: &[u32], tokens: &[u32]) -> Result<Vec<f32>> {
        if prompt.is_empty() {
            return Err(LlmError::Tokenizer("empty prompt".into()));
        }
        let mut weights = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut logits = weights.forward(&input, 0)?.squeeze(0)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            let logp =
                candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
            out.push(logp.get(t as usize)?.to_scalar::<f32>()?);
            if i + 1 < tokens.len() {
                let input = Tensor::new(&[t], &self.device)?.unsqueeze(0)?;
                logits = weights.forward(&input, prompt.len() + i)?.squeeze(0)?;
            }
        }
        Ok(out)
    }

    /// The model's log-probability (temperature 1) of `next` following `prefix`, computed afresh.
    pub fn logprob_of_next(&self, prefix: &[u32], next: u32) -> Result<f32> {
        let mut weights = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        let input = Tensor::new(prefix, &self.device)?.unsqueeze(0)?;
        let logits = weights
            .forward(&input, 0)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok(logp.get(next as usize)?.to_scalar::<f32>()?)
    }

    /// Decodes ids to text (special tokens kept as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.info
            .tokenizer
            .decode(ids, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
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
    ) -> Result<ChatResponse> {
        let t0 = Instant::now();
        let prompt = self.prompt(req)?;
        let ids = self.info.encode(&prompt)?;
        let g = self.generate_constrained(&ids, &req.sampling, req.constraint.as_ref(), on_text)?;
        let full = format!(
            "{}{}",
            req.assistant_prefix.as_deref().unwrap_or(""),
            g.text
        );
        let tool_calls = crate::parse::tool_calls(&full).calls;
        Ok(ChatResponse {
            text: g.text,
            tool_calls,
            finish_reason: g.finish_reason,
            usage: Usage {
                prompt_tokens: ids.len() as u64,
                completion_tokens: g.ids.len() as u64,
                seconds: t0.elapsed().as_secs_f64(),
            },
        })
    }
}
