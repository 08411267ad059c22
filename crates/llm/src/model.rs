//! Our own forward pass for GGUF qwen2 / llama models: shared immutable weights, one KV cache per
//! sequence (cloning a cache forks a prompt computed once), and batched decoding — many sequences
//! advance together, so the weight matrices are read once per step for all of them.
//!
//! Quantised matmuls in candle are row-independent, and attention is computed per sequence with
//! the same shapes in batched and single-stream decoding, so a sequence's tokens do not depend on
//! what it is batched with.

use std::path::Path;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use crate::{LlmError, Result};

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Model weights and shape, shared by every sequence.
pub struct Transformer {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    neox: bool,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Context window.
    pub context_length: usize,
}

/// One sequence's keys and values per layer, and how many positions they hold. Clone to fork.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache.
    pub pos: usize,
}

impl Transformer {
    /// Loads the weights of a GGUF file (qwen2 or llama architecture).
    pub fn load(path: &Path, ct: gguf_file::Content) -> Result<Self> {
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path).map_err(|e| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let bad = |m: String| LlmError::BadModelFile {
            path: path.to_path_buf(),
            message: m,
        };
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "qwen2" && arch != "llama" {
            return Err(bad(format!(
                "architecture {arch:?} is not supported (qwen2, llama)"
            )));
        }
        let u = |k: &str| -> Result<usize> {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("no {arch}.{k}")))
        };
        let n_head = u("attention.head_count")?;
        let n_kv = u("attention.head_count_kv")?;
        let hidden = u("embedding_length")?;
        let n_layers = u("block_count")?;
        let context_length = u("context_length").unwrap_or(4096);
        let eps = ct
            .metadata
            .get(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-6) as f64;
        let freq_base = ct
            .metadata
            .get(&format!("{arch}.rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let head_dim = hidden / n_head;
        if let Ok(rd) = u("rope.dimension_count") {
            if rd != head_dim {
                return Err(bad(format!(
                    "partial rotary embeddings ({rd} of {head_dim}) are not supported"
                )));
            }
        }
        let mut t = |name: &str| ct.tensor(&mut f, name, &device);
        let embed_q = t("token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(&device)?, hidden);
        let output = match t("output.weight") {
            Ok(w) => QMatMul::from_qtensor(w)?,
            Err(_) => QMatMul::from_qtensor(embed_q)?,
        };
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}");
            let mut q = |n: &str| t(&format!("{p}.{n}"));
            let bias = |r: candle_core::Result<candle_core::quantized::QTensor>| -> Result<Option<Tensor>> {
                Ok(match r {
                    Ok(b) => Some(b.dequantize(&Device::Cpu)?),
                    Err(_) => None,
                })
            };
            layers.push(Layer {
                wq: QMatMul::from_qtensor(q("attn_q.weight")?)?,
                wk: QMatMul::from_qtensor(q("attn_k.weight")?)?,
                wv: QMatMul::from_qtensor(q("attn_v.weight")?)?,
                wo: QMatMul::from_qtensor(q("attn_output.weight")?)?,
                bq: bias(q("attn_q.bias"))?,
                bk: bias(q("attn_k.bias"))?,
                bv: bias(q("attn_v.bias"))?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm.weight")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm.weight")?, eps)?,
                gate: QMatMul::from_qtensor(q("ffn_gate.weight")?)?,
                up: QMatMul::from_qtensor(q("ffn_up.weight")?)?,
                down: QMatMul::from_qtensor(q("ffn_down.weight")?)?,
            });
        }
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), &device)?;
        let idx = Tensor::arange(0, context_length as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((context_length, 1))?;
        let freqs = idx.matmul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(Transformer {
            embed,
            layers,
            norm,
            output,
            n_head,
            n_kv,
            head_dim,
            neox: arch == "qwen2",
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            device,
            context_length,
        })
    }

    /// A cache with no positions.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            pos: 0,
        }
    }

    fn rope(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let (_, _, t, _) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        if self.neox {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        }
    }

    /// Attention of one sequence: `q, k, v` are (1, t, heads·dim) rows of that sequence.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        pos: usize,
    ) -> candle_core::Result<Tensor> {
        let (_, t, _) = q.dims3()?;
        let q = q
            .reshape((1, t, self.n_head, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((1, t, self.n_kv, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((1, t, self.n_kv, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rope(&q, pos)?;
        let k = self.rope(&k, pos)?;
        let (k, v) = match cache.as_ref() {
            Some((kc, vc)) => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let rep = self.n_head / self.n_kv;
        let k = candle_transformers::utils::repeat_kv(k, rep)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let mut att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        if t > 1 {
            let kv_len = pos + t;
            let mask: Vec<u8> = (0..t)
                .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > pos + i)))
                .collect();
            let mask =
                Tensor::from_slice(&mask, (t, kv_len), &self.device)?.broadcast_as(att.shape())?;
            let neg = Tensor::new(f32::NEG_INFINITY, &self.device)?.broadcast_as(att.shape())?;
            att = mask.where_cond(&neg, &att)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?
            .transpose(1, 2)?
            .reshape((1, t, self.n_head * self.head_dim))
    }

    fn qkv(&self, l: &Layer, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let add = |y: Tensor, b: &Option<Tensor>| match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
        Ok((
            add(l.wq.forward(x)?, &l.bq)?,
            add(l.wk.forward(x)?, &l.bk)?,
            add(l.wv.forward(x)?, &l.bv)?,
        ))
    }

    fn mlp(&self, l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = l.ffn_norm.forward(x)?;
        let g = candle_nn::ops::silu(&l.gate.forward(&h)?)?;
        l.down.forward(&(g * l.up.forward(&h)?)?)
    }

    fn check(&self, cache: &KvCache, new: usize) -> Result<()> {
        if cache.pos + new > self.context_length {
            return Err(LlmError::ContextOverflow {
                prompt: cache.pos,
                max_new: new,
                window: self.context_length,
            });
        }
        Ok(())
    }

    /// Appends `tokens` to one sequence and returns the logits after its last token (vocab,).
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(LlmError::Tokenizer("empty input".into()));
        }
        self.check(cache, tokens.len())?;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        for (l, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = l.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(l, &h)?;
            let y = self.attend(&q, &k, &v, slot, cache.pos)?;
            x = (l.wo.forward(&y)? + x)?;
            x = (self.mlp(l, &x)? + x)?;
        }
        cache.pos += tokens.len();
        let last = x.narrow(1, tokens.len() - 1, 1)?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        Ok(logits.flatten_all()?)
    }

    /// Advances several sequences by one token each; returns their logits (batch, vocab).
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b != caches.len() || b == 0 {
            return Err(LlmError::Tokenizer(format!(
                "{b} tokens for {} sequences",
                caches.len()
            )));
        }
        for c in caches.iter() {
            self.check(c, 1)?;
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(1)?; // (b, 1)
        let mut x = self.embed.forward(&ids)?; // (b, 1, hidden)
        for (li, l) in self.layers.iter().enumerate() {
            let h = l.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(l, &h)?;
            let mut ys = Vec::with_capacity(b);
            for (s, cache) in caches.iter_mut().enumerate() {
                let pos = cache.pos;
                let y = self.attend(
                    &q.narrow(0, s, 1)?,
                    &k.narrow(0, s, 1)?,
                    &v.narrow(0, s, 1)?,
                    &mut cache.layers[li],
                    pos,
                )?;
                ys.push(y);
            }
            let y = Tensor::cat(&ys, 0)?;
            x = (l.wo.forward(&y)? + x)?;
            x = (self.mlp(l, &x)? + x)?;
        }
        for c in caches.iter_mut() {
            c.pos += 1;
        }
        let logits = self.output.forward(&self.norm.forward(&x)?)?; // (b, 1, vocab)
        Ok(logits.squeeze(1)?)
    }
}
