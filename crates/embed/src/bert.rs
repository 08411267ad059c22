use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use rayon::prelude::*;
use tokenizers::{Tokenizer, TruncationParams};

use crate::{EmbedError, Result, TextEmbedder};

/// The registry id of the default embedder.
pub const DEFAULT_EMBEDDER: &str = "all-minilm-l6-v2";

/// A BERT-family sentence embedder (mean pooling over real tokens, then L2 normalisation), run
/// by candle on the CPU. Texts are sorted by length and padded per batch.
pub struct BertEmbedder {
    id: String,
    model: BertModel,
    tokenizer: Tokenizer,
    dim: usize,
    batch_size: usize,
    device: Device,
}

impl BertEmbedder {
    /// Loads the default embedder, fetching it on first use.
    pub fn default_model() -> Result<Self> {
        let paths = mrrec_models::ensure(DEFAULT_EMBEDDER)?;
        Self::from_files(
            DEFAULT_EMBEDDER,
            paths.file("config.json")?,
            paths.file("tokenizer.json")?,
            paths.file("model.safetensors")?,
            256,
        )
    }

    /// Loads a model from its `config.json`, `tokenizer.json` and safetensors weights; inputs are
    /// cut at `max_tokens` tokens.
    pub fn from_files(
        id: &str,
        config: &Path,
        tokenizer: &Path,
        weights: &Path,
        max_tokens: usize,
    ) -> Result<Self> {
        let bad = |p: &Path, m: String| EmbedError::BadModelFile {
            path: p.to_path_buf(),
            message: m,
        };
        let cfg_text = std::fs::read_to_string(config).map_err(|e| bad(config, e.to_string()))?;
        let cfg: Config =
            serde_json::from_str(&cfg_text).map_err(|e| bad(config, e.to_string()))?;
        let dim = cfg.hidden_size;
        let mut tok = Tokenizer::from_file(tokenizer).map_err(|e| EmbedError::Tokenizer {
            context: tokenizer.display().to_string(),
            message: e.to_string(),
        })?;
        tok.with_padding(None);
        tok.with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .map_err(|e| EmbedError::Tokenizer {
            context: "truncation".into(),
            message: e.to_string(),
        })?;
        let device = Device::Cpu;
        // SAFETY: the weights file is in our verified cache and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
        let model = BertModel::load(vb, &cfg)?;
        Ok(BertEmbedder {
            id: id.to_string(),
            model,
            tokenizer: tok,
            dim,
            batch_size: 32,
            device,
        })
    }

    /// Sets how many texts go through the model together (default 32).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    fn embed_batch(&self, encodings: &[&tokenizers::Encoding]) -> Result<Vec<Vec<f32>>> {
        let max_len = encodings
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let n = encodings.len();
        let mut ids = vec![0u32; n * max_len];
        let mut mask = vec![0u32; n * max_len];
        for (row, enc) in encodings.iter().enumerate() {
            for (j, (&id, &m)) in enc
                .get_ids()
                .iter()
                .zip(enc.get_attention_mask())
                .enumerate()
            {
                ids[row * max_len + j] = id;
                mask[row * max_len + j] = m;
            }
        }
        let ids = Tensor::from_vec(ids, (n, max_len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, max_len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, dim)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}

impl TextEmbedder for BertEmbedder {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer {
                context: "encode".into(),
                message: e.to_string(),
            })?;
        // Length-sorted batches waste little on padding.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        // candle's CPU kernels use few threads on matrices this small: run batches side by side.
        let chunks: Vec<&[usize]> = order.chunks(self.batch_size).collect();
        let results: Vec<Result<Vec<Vec<f32>>>> = chunks
            .par_iter()
            .map(|chunk| {
                let batch: Vec<&tokenizers::Encoding> =
                    chunk.iter().map(|&i| &encodings[i]).collect();
                self.embed_batch(&batch)
            })
            .collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (chunk, vecs) in chunks.iter().zip(results) {
            for (&i, v) in chunk.iter().zip(vecs?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}
