//! The differentiable policy: a qwen2 / llama transformer on dense weights (dequantised from the
//! GGUF the inference model runs, or random for tests) with LoRA factors as the only trainable
//! parameters. candle's fused kernels (RMS norm, softmax, rotary embeddings) have no backward
//! pass, so this forward is written with differentiable primitives; it is checked against the
//! inference model's dense path (`Transformer::logits_dense`).
//!
//! Memory: layers below the first adapted one run without building a graph (their weights are
//! constants and nothing below them is trainable); log-probabilities are computed in chunks of
//! rows and only at the positions asked for — a 0.5B model's full logits for one 1k-token
//! sequence are already 600 MB.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var, D};
use mrrec_llm_local::model::{LoraAdapter, Proj};
use rand::{Rng, SeedableRng};

use crate::{Result, TrainError};

/// Shape of a transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Vocabulary.
    pub vocab: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// RMS-norm epsilon.
    pub eps: f64,
    /// Rotary base.
    pub rope_theta: f32,
    /// qwen2 (rotate halves) or llama (rotate interleaved pairs, as GGUF stores llama).
    pub neox: bool,
    /// Longest sequence.
    pub context: usize,
    /// q/k/v projections carry biases (qwen2).
    pub qkv_bias: bool,
}

impl Shape {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn proj_shape(&self, p: Proj) -> (usize, usize) {
        let kv = self.kv_heads * self.head_dim();
        match p {
            Proj::Q | Proj::O => (self.hidden, self.hidden),
            Proj::K | Proj::V => (kv, self.hidden),
            Proj::Gate | Proj::Up => (self.intermediate, self.hidden),
            Proj::Down => (self.hidden, self.intermediate),
        }
    }
}

/// Which LoRA factors exist.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub rank: usize,
    /// Scale numerator (the update is `alpha / rank · B A x`).
    pub alpha: f32,
    /// Projections adapted.
    pub targets: Vec<Proj>,
    /// Adapt the top this-many layers (the rest run frozen, without a graph).
    pub layers: usize,
    /// Seed of the initialisation of `A` (`B` starts at zero, so the adapter starts as a no-op).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Proj::Q, Proj::V],
            layers: 4,
            seed: 0,
        }
    }
}

struct Layer {
    /// (projection) → weight transposed, (in, out).
    w: BTreeMap<Proj, Tensor>,
    bias: BTreeMap<Proj, Tensor>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
}

/// The policy (see the module docs).
pub struct Policy {
    /// Its shape.
    pub shape: Shape,
    /// Its LoRA settings.
    pub lora_cfg: LoraConfig,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// Output matrix transposed, (hidden, vocab).
    output_t: Tensor,
    lora: BTreeMap<(usize, Proj), (Var, Var)>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Attention's softmax as one operation ([`crate::softmax::causal_softmax`], the default)
    /// or composed from tensor operations (the baseline benchmarks compare it with).
    fused_softmax: bool,
}

fn bad(path: &Path, m: impl Into<String>) -> TrainError {
    TrainError::Model(format!("{}: {}", path.display(), m.into()))
}

impl Policy {
    /// Loads the weights of a GGUF file (qwen2 or llama), dequantised to f32.
    pub fn from_gguf(path: &Path, lora: LoraConfig) -> Result<Self> {
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        let ct = gguf_file::Content::read(&mut f).map_err(|e| bad(path, e.to_string()))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "qwen2" && arch != "llama" {
            return Err(bad(path, format!("architecture {arch:?} (qwen2, llama)")));
        }
        let u = |k: &str| -> Result<usize> {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| bad(path, format!("no {arch}.{k}")))
        };
        let fl = |k: &str, d: f32| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(d)
        };
        let mut t = |name: &str| -> Result<Tensor> {
            Ok(ct
                .tensor(&mut f, name, &device)
                .map_err(|e| bad(path, format!("{name}: {e}")))?
                .dequantize(&device)?)
        };
        let embed = t("token_embd.weight")?;
        let vocab = embed.dim(0)?;
        let mut shape = Shape {
            vocab,
            hidden: u("embedding_length")?,
            intermediate: u("feed_forward_length")?,
            layers: u("block_count")?,
            heads: u("attention.head_count")?,
            kv_heads: u("attention.head_count_kv")?,
            eps: fl("attention.layer_norm_rms_epsilon", 1e-6) as f64,
            rope_theta: fl("rope.freq_base", 10_000.0),
            neox: arch == "qwen2",
            context: u("context_length").unwrap_or(4096),
            qkv_bias: false,
        };
        let output = match t("output.weight") {
            Ok(w) => w,
            Err(_) => embed.clone(),
        };
        let norm = t("output_norm.weight")?;
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let mut w = BTreeMap::new();
            let mut bias = BTreeMap::new();
            for p in Proj::ALL {
                w.insert(
                    p,
                    t(&format!("blk.{i}.{}.weight", p.name()))?
                        .t()?
                        .contiguous()?,
                );
            }
            for p in [Proj::Q, Proj::K, Proj::V] {
                if let Ok(b) = t(&format!("blk.{i}.{}.bias", p.name())) {
                    bias.insert(p, b);
                    shape.qkv_bias = true;
                }
            }
            layers.push(Layer {
                w,
                bias,
                attn_norm: t(&format!("blk.{i}.attn_norm.weight"))?,
                ffn_norm: t(&format!("blk.{i}.ffn_norm.weight"))?,
            });
        }
        let output_t = output.t()?.contiguous()?;
        Self::assemble(shape, lora, DType::F32, embed, layers, norm, output_t)
    }

    /// A randomly initialised model (for tests of learning and gradients), in `dtype`.
    pub fn random(shape: Shape, lora: LoraConfig, dtype: DType, seed: u64) -> Result<Self> {
        let device = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut mat = |r: usize, c: usize, scale: f64| -> Result<Tensor> {
            let v: Vec<f64> = (0..r * c).map(|_| rng.gen_range(-scale..scale)).collect();
            Ok(Tensor::from_vec(v, (r, c), &device)?.to_dtype(dtype)?)
        };
        let h = shape.hidden;
        let embed = mat(shape.vocab, h, 1.0)?;
        let mut layers = Vec::new();
        for _ in 0..shape.layers {
            let mut w = BTreeMap::new();
            for p in Proj::ALL {
                let (out, inp) = shape.proj_shape(p);
                w.insert(p, mat(inp, out, (1.0 / inp as f64).sqrt())?);
            }
            let mut bias = BTreeMap::new();
            if shape.qkv_bias {
                for p in [Proj::Q, Proj::K, Proj::V] {
                    let (out, _) = shape.proj_shape(p);
                    bias.insert(p, mat(1, out, 0.1)?.squeeze(0)?);
                }
            }
            layers.push(Layer {
                w,
                bias,
                attn_norm: (mat(1, h, 0.1)?.squeeze(0)? + 1.0)?,
                ffn_norm: (mat(1, h, 0.1)?.squeeze(0)? + 1.0)?,
            });
        }
        let norm = Tensor::ones(h, dtype, &device)?;
        // Logits of order 1–10, as a trained model has (a 1/sqrt(h) scale would cap them near 2).
        let output_t = mat(h, shape.vocab, 1.0)?;
        Self::assemble(shape, lora, dtype, embed, layers, norm, output_t)
    }

    fn assemble(
        shape: Shape,
        lora_cfg: LoraConfig,
        dtype: DType,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output_t: Tensor,
    ) -> Result<Self> {
        let device = Device::Cpu;
        if shape.heads == 0
            || shape.kv_heads == 0
            || !shape.hidden.is_multiple_of(shape.heads)
            || !shape.heads.is_multiple_of(shape.kv_heads)
        {
            return Err(TrainError::Model(format!("inconsistent heads: {shape:?}")));
        }
        let hd = shape.head_dim();
        let theta: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / shape.rope_theta.powf(i as f32 / hd as f32))
            .collect();
        let n = shape.context.min(8192);
        let theta = Tensor::new(theta.as_slice(), &device)?.reshape((1, hd / 2))?;
        let idx = Tensor::arange(0, n as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = idx.matmul(&theta)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(lora_cfg.seed);
        let mut lora = BTreeMap::new();
        let first = shape.layers.saturating_sub(lora_cfg.layers);
        for li in first..shape.layers {
            for &p in &lora_cfg.targets {
                let (out, inp) = shape.proj_shape(p);
                let bound = (1.0 / inp as f64).sqrt();
                let a: Vec<f64> = (0..lora_cfg.rank * inp)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (lora_cfg.rank, inp), &device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, lora_cfg.rank), dtype, &device)?;
                lora.insert((li, p), (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        Ok(Policy {
            shape,
            lora_cfg,
            dtype,
            embed,
            layers,
            norm,
            output_t,
            lora,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            device,
            fused_softmax: true,
        })
    }

    /// Computes attention's softmax composed from tensor operations (`false`: the way before
    /// [`crate::softmax::causal_softmax`], for benchmarks) or as one operation (`true`, the
    /// default). Both give the same values and gradients up to rounding.
    pub fn set_fused_softmax(&mut self, fused: bool) {
        self.fused_softmax = fused;
    }

    /// The trainable parameters, in a fixed order: (name, var).
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for ((l, p), (a, b)) in &self.lora {
            out.push((format!("blk.{l}.{}.lora_a", p.name()), a.clone()));
            out.push((format!("blk.{l}.{}.lora_b", p.name()), b.clone()));
        }
        out
    }

    /// The first adapted layer (layers below it run without a graph).
    pub fn first_adapted(&self) -> usize {
        self.lora
            .keys()
            .map(|(l, _)| *l)
            .min()
            .unwrap_or(self.shape.layers)
    }

    /// The adapter as the inference model applies it.
    pub fn adapter(&self) -> Result<LoraAdapter> {
        let mut ad = LoraAdapter::new(self.lora_cfg.rank, self.lora_cfg.alpha);
        for ((l, p), (a, b)) in &self.lora {
            ad.insert(
                *l,
                *p,
                a.as_tensor().to_dtype(DType::F32)?,
                b.as_tensor().to_dtype(DType::F32)?,
            );
        }
        Ok(ad)
    }

    /// Sets the factors from an adapter (shapes must match; missing factors are left alone).
    pub fn load_adapter(&self, ad: &LoraAdapter) -> Result<()> {
        for ((l, p), (a, b)) in &self.lora {
            if let Some((na, nb)) = ad.get(*l, *p) {
                if na.dims() != a.dims() || nb.dims() != b.dims() {
                    return Err(TrainError::Model(format!(
                        "adapter blk.{l}.{}: shapes {:?}/{:?}, the policy has {:?}/{:?}",
                        p.name(),
                        na.dims(),
                        nb.dims(),
                        a.dims(),
                        b.dims()
                    )));
                }
                a.set(&na.to_dtype(self.dtype)?)?;
                b.set(&nb.to_dtype(self.dtype)?)?;
            }
        }
        Ok(())
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.shape.eps)?.sqrt()?)?
            .broadcast_mul(w)
    }

    fn proj(
        &self,
        li: usize,
        p: Proj,
        l: &Layer,
        x: &Tensor,
        lora: bool,
    ) -> candle_core::Result<Tensor> {
        let mut y = frozen_matmul(x, &l.w[&p])?;
        if let Some(b) = l.bias.get(&p) {
            y = y.broadcast_add(b)?;
        }
        if lora {
            if let Some((a, b)) = self.lora.get(&(li, p)) {
                let scale = (self.lora_cfg.alpha / self.lora_cfg.rank.max(1) as f32) as f64;
                let d = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                y = (y + (d * scale)?)?;
            }
        }
        Ok(y)
    }

    /// Rotary embedding of `x` (n, t, hd) at positions `offset..offset + t`.
    fn rope(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (n, t, hd) = x.dims3()?;
        let cos = self.cos.narrow(0, offset, t)?.unsqueeze(0)?;
        let sin = self.sin.narrow(0, offset, t)?.unsqueeze(0)?;
        if self.shape.neox {
            let x1 = x.narrow(2, 0, hd / 2)?;
            let x2 = x.narrow(2, hd / 2, hd / 2)?;
            let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[a, b], 2)
        } else {
            let x = x.reshape((n, t, hd / 2, 2))?;
            let e = x.narrow(3, 0, 1)?.squeeze(3)?;
            let o = x.narrow(3, 1, 1)?.squeeze(3)?;
            let a = (e.broadcast_mul(&cos)? - o.broadcast_mul(&sin)?)?;
            let b = (e.broadcast_mul(&sin)? + o.broadcast_mul(&cos)?)?;
            Tensor::stack(&[a, b], 3)?.reshape((n, t, hd))
        }
    }

    /// Causal attention of the rows `offset..offset + t` (k, v: (t, width); q: (m, width), the
    /// last m ≤ t of them, whose outputs alone are computed) over `past`
    /// keys and values of positions `0..offset` (rotated, (kv heads, offset, head dim)) and
    /// their own, each row seeing the positions up to its own ([`crate::softmax::causal_softmax`],
    /// which keeps 2 rather than 6 attention-sized tensors in the graph). Returns the output
    /// and this block's keys and values, past included.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let (m, _) = q.dims2()?;
        let (t, _) = k.dims2()?;
        let offset = past.map_or(Ok(0), |(k, _)| k.dim(1))?;
        let (nh, nkv, hd) = (self.shape.heads, self.shape.kv_heads, self.shape.head_dim());
        // The queries may be the last m of the t rows (the causal softmax's rows are the last
        // of its columns either way).
        let q = self.rope(
            &q.reshape((m, nh, hd))?.transpose(0, 1)?.contiguous()?,
            offset + t - m,
        )?;
        let k = self.rope(
            &k.reshape((t, nkv, hd))?.transpose(0, 1)?.contiguous()?,
            offset,
        )?;
        let v = v.reshape((t, nkv, hd))?.transpose(0, 1)?.contiguous()?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            None => (k, v),
        };
        let all = offset + t;
        let rep = nh / nkv;
        let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return x.contiguous();
            }
            x.unsqueeze(1)?
                .broadcast_as((nkv, rep, all, hd))?
                .contiguous()?
                .reshape((nh, all, hd))
        };
        let (ke, ve) = (expand(&k)?, expand(&v)?);
        let softmax = if self.fused_softmax {
            crate::softmax::causal_softmax
        } else {
            crate::softmax::composed_causal_softmax
        };
        let att = softmax(&q.matmul(&ke.t()?)?, 1.0 / (hd as f64).sqrt())?;
        let y = att.matmul(&ve)?.transpose(0, 1)?.reshape((m, nh * hd))?;
        Ok((y, (k, v)))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let t = tokens.len();
        if t == 0 || t > self.cos.dim(0)? {
            return Err(TrainError::Model(format!(
                "sequence of {t} tokens (1–{})",
                self.cos.dim(0)?
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&x| x as usize >= self.shape.vocab) {
            return Err(TrainError::Model(format!(
                "token {bad} outside the vocabulary of {}",
                self.shape.vocab
            )));
        }
        Ok(())
    }

    /// Layer `li` on the residual stream `x` (t rows after `past`'s): the output of its last
    /// `rows` rows (all when `None`) and the keys and values of all of them, past included.
    fn layer(
        &self,
        li: usize,
        x: Tensor,
        past: Option<&(Tensor, Tensor)>,
        lora: bool,
        rows: Option<usize>,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let l = &self.layers[li];
        let t = x.dim(0)?;
        let m = rows.map_or(t, |r| r.clamp(1, t));
        let h = self.rms(&x, &l.attn_norm)?;
        let last = |a: &Tensor| {
            if m < t {
                a.narrow(0, t - m, m)
            } else {
                Ok(a.clone())
            }
        };
        let q = self.proj(li, Proj::Q, l, &last(&h)?, lora)?;
        let k = self.proj(li, Proj::K, l, &h, lora)?;
        let v = self.proj(li, Proj::V, l, &h, lora)?;
        let (y, kv) = self.attention(&q, &k, &v, past)?;
        let x = (self.proj(li, Proj::O, l, &y, lora)? + last(&x)?)?;
        let h = self.rms(&x, &l.ffn_norm)?;
        let g = self.proj(li, Proj::Gate, l, &h, lora)?.silu()?;
        let u = self.proj(li, Proj::Up, l, &h, lora)?;
        Ok(((self.proj(li, Proj::Down, l, &(g * u)?, lora)? + x)?, kv))
    }

    /// The residual stream entering layer `upto` (embedding and layers below it, no graph),
    /// reusing `cache`'s longest shared prefix of `tokens` and remembering this sequence there.
    fn lower(&self, tokens: &[u32], upto: usize, cache: Option<&mut LowerCache>) -> Result<Tensor> {
        self.check_tokens(tokens)?;
        let upto = upto.min(self.shape.layers);
        let (reuse, hit) = match cache.as_deref() {
            Some(c) => c.longest(tokens),
            None => (0, None),
        };
        // At least the last token is computed (its row is needed); a full hit is cut by one.
        let reuse = reuse.min(tokens.len() - 1);
        let hit = hit.filter(|_| reuse > 0);
        let ids = Tensor::new(&tokens[reuse..], &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mut kvs = Vec::with_capacity(upto);
        for li in 0..upto {
            let past = match hit {
                Some(st) => {
                    let (k, v) = &st.kv[li];
                    Some((k.narrow(1, 0, reuse)?, v.narrow(1, 0, reuse)?))
                }
                None => None,
            };
            let (y, kv) = self.layer(li, x, past.as_ref(), false, None)?;
            x = y;
            kvs.push(kv);
        }
        let x = match hit {
            Some(st) => Tensor::cat(&[&st.x.narrow(0, 0, reuse)?, &x], 0)?,
            None => x,
        }
        .detach();
        if let Some(c) = cache {
            c.hits_tokens += reuse as u64;
            c.total_tokens += tokens.len() as u64;
            c.remember(LowerState {
                tokens: tokens.to_vec(),
                kv: kvs,
                x: x.clone(),
            });
        }
        Ok(x)
    }

    /// Layers from `from` up and the final norm, on the residual stream `x`.
    fn upper(&self, x: Tensor, from: usize, lora: bool) -> Result<Tensor> {
        let (x, _) = self.upper_layers(x, from, lora, None, None)?;
        Ok(self.rms(&x, &self.norm)?)
    }

    /// Layers from `from` up (no final norm) on the residual stream `x` of the positions after
    /// `past`'s (per layer from `from`: keys and values of the positions before), returning
    /// the stream and each layer's keys and values, past included.
    /// With `last_rows`, the top layer computes only the output of the last that many rows
    /// (the positions a loss reads; every row's keys and values below it are still needed).
    fn upper_layers(
        &self,
        mut x: Tensor,
        from: usize,
        lora: bool,
        past: Option<&[(Tensor, Tensor)]>,
        last_rows: Option<usize>,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let mut kvs = Vec::with_capacity(self.shape.layers.saturating_sub(from));
        for li in from..self.shape.layers {
            let rows = last_rows.filter(|_| li + 1 == self.shape.layers);
            let (y, kv) = self.layer(li, x, past.and_then(|p| p.get(li - from)), lora, rows)?;
            x = y;
            kvs.push(kv);
        }
        Ok((x, kvs))
    }

    /// Final hidden states (t, hidden) of `tokens`; `lora` applies the adapter (off: the
    /// reference policy). Layers below the first adapted one run detached.
    pub fn hidden(&self, tokens: &[u32], lora: bool) -> Result<Tensor> {
        let first = self.first_adapted();
        let x = self.lower(tokens, first, None)?;
        self.upper(x, first, lora)
    }

    /// Logits at every position (t, vocab). For tests and small models: the full matrix.
    pub fn logits(&self, tokens: &[u32], lora: bool) -> Result<Tensor> {
        Ok(self.hidden(tokens, lora)?.matmul(&self.output_t)?)
    }

    /// Log-probabilities of `tokens[p]` given `tokens[..p]` for every `p` in `from..len`
    /// (shape `(len - from,)`), differentiable with respect to the adapter. `allowed[i]`, when
    /// given, renormalises position `from + i` over those token ids (constrained decoding), the
    /// same way the sampler did. Logits are computed `chunk` rows at a time.
    pub fn token_logprobs(
        &self,
        tokens: &[u32],
        from: usize,
        allowed: &[Option<mrrec_llm_local::TokenSet>],
        lora: bool,
        chunk: usize,
    ) -> Result<Tensor> {
        self.token_logprobs_cached(tokens, from, allowed, lora, chunk, None)
    }

    /// [`Policy::token_logprobs`] reusing (and filling) a [`LowerCache`].
    pub fn token_logprobs_cached(
        &self,
        tokens: &[u32],
        from: usize,
        allowed: &[Option<mrrec_llm_local::TokenSet>],
        lora: bool,
        chunk: usize,
        cache: Option<&mut LowerCache>,
    ) -> Result<Tensor> {
        self.check_from(tokens, from)?;
        let first = self.first_adapted();
        let x = self.lower(tokens, first, cache)?;
        let h = self.upper(x, first, lora)?;
        self.logprobs_of(&h, tokens, from, allowed, chunk)
    }

    /// [`Policy::token_logprobs`] with the adapter (differentiable) and without it (the
    /// reference policy's values), sharing the frozen lower layers between the two passes and,
    /// through `cache`, with earlier sequences that share a prefix (a group's common prompt, a
    /// trajectory's previous call).
    pub fn token_logprobs_with_reference(
        &self,
        tokens: &[u32],
        from: usize,
        allowed: &[Option<mrrec_llm_local::TokenSet>],
        chunk: usize,
        cache: Option<&mut LowerCache>,
    ) -> Result<(Tensor, Vec<f32>)> {
        self.check_from(tokens, from)?;
        let first = self.first_adapted();
        let x = self.lower(tokens, first, cache)?;
        let reference = {
            let h = self.upper(x.clone(), first, false)?;
            self.logprobs_of(&h, tokens, from, allowed, chunk)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
        };
        let h = self.upper(x, first, true)?;
        Ok((
            self.logprobs_of(&h, tokens, from, allowed, chunk)?,
            reference,
        ))
    }

    /// [`Policy::token_logprobs`] of several sequences at once (with the adapter), and with
    /// `reference` also without it (the reference policy's values, as
    /// [`Policy::token_logprobs_with_reference`]). The tokens every sequence begins with —
    /// up to the first scored position's context, e.g. a judge's request before the item, a
    /// group's prompt — run through the adapted layers once; each sequence's remaining tokens
    /// attend to that prefix's keys and values, so one backward pass of the summed losses
    /// carries the prefix's gradient from all of them. Exact: a position's state depends only
    /// on the positions before it. The frozen lower layers reuse `cache` as
    /// [`Policy::token_logprobs_cached`] does.
    pub fn token_logprobs_shared(
        &self,
        seqs: &[Scored<'_>],
        reference: bool,
        chunk: usize,
        lower: Lower<'_>,
    ) -> Result<ScoredMany> {
        let lowers = self.lowers(seqs, lower)?;
        self.token_logprobs_above(seqs, &lowers, reference, chunk)
    }

    /// The residual stream entering the first adapted layer of every sequence of `seqs`
    /// (detached: nothing below the adapter learns), from `lower` — the first half of
    /// [`Policy::token_logprobs_shared`]; [`Policy::token_logprobs_above`] is the second.
    pub fn lowers(&self, seqs: &[Scored<'_>], lower: Lower<'_>) -> Result<Vec<Tensor>> {
        for s in seqs {
            self.check_from(s.tokens, s.from)?;
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let first = self.first_adapted();
        match lower {
            Lower::Exact(mut cache) => seqs
                .iter()
                .map(|s| self.lower(s.tokens, first, cache.as_deref_mut()))
                .collect::<Result<Vec<_>>>(),
            Lower::Inference(model) => self.lower_by(model, seqs, first),
            Lower::Remembered(model, memo) => match memo.get(seqs, first) {
                Some(xs) => Ok(xs),
                None => {
                    let xs = self.lower_by(model, seqs, first)?;
                    memo.put(seqs, first, &xs);
                    Ok(xs)
                }
            },
        }
    }

    /// [`Policy::token_logprobs_shared`] from the frozen layers' states of `seqs` as
    /// [`Policy::lowers`] gives them: only the adapted layers run, and nothing mutable is
    /// touched (no cache, memo or inference model), so several groups can run at once on
    /// other threads (`TrainConfig::parallel_runs`) — the same values as one after another.
    pub fn token_logprobs_above(
        &self,
        seqs: &[Scored<'_>],
        lowers: &[Tensor],
        reference: bool,
        chunk: usize,
    ) -> Result<ScoredMany> {
        if seqs.is_empty() {
            return Ok((Vec::new(), reference.then(Vec::new)));
        }
        if lowers.len() != seqs.len() {
            return Err(TrainError::Model(format!(
                "{} frozen-layer states for {} sequences",
                lowers.len(),
                seqs.len()
            )));
        }
        let head = &seqs[0];
        for s in seqs {
            self.check_from(s.tokens, s.from)?;
        }
        // Shared, and before every sequence's first scored row (which its own pass computes).
        let shared = seqs
            .iter()
            .map(|s| common_prefix(head.tokens, s.tokens).min(s.from - 1))
            .min()
            .unwrap_or(0);
        let first = self.first_adapted();
        let pass = |lora: bool| -> Result<Vec<Tensor>> {
            if shared == 0 || seqs.len() == 1 {
                return seqs
                    .iter()
                    .zip(lowers)
                    .map(|(s, x)| {
                        let h = self.upper(x.clone(), first, lora)?;
                        self.logprobs_of(&h, s.tokens, s.from, s.allowed, chunk)
                    })
                    .collect();
            }
            let (_, past) =
                self.upper_layers(lowers[0].narrow(0, 0, shared)?, first, lora, None, None)?;
            seqs.iter()
                .zip(lowers)
                .map(|(s, x)| {
                    // The scored tokens s.from.. are read from the rows before each, s.from − 1
                    // up to the second-to-last: the last row feeds nothing (causal), and the top
                    // layer computes only the rows read (a judge's item: one).
                    let read = s.tokens.len() - s.from;
                    let rest = x.narrow(0, shared, s.tokens.len() - 1 - shared)?;
                    let (h, _) = self.upper_layers(rest, first, lora, Some(&past), Some(read))?;
                    let h = self.rms(&h, &self.norm)?;
                    self.logprobs_of(&h, &s.tokens[s.from - 1..], 1, s.allowed, chunk)
                })
                .collect()
        };
        let reference = if reference {
            Some(
                pass(false)?
                    .iter()
                    .map(|t| Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok((pass(true)?, reference))
    }

    /// The residual stream entering layer `upto` of every sequence, from the inference model:
    /// the beginning all of them share prefilled once (all but each one's last token), then
    /// every sequence's rest together in one batch from a fork of it.
    fn lower_by(
        &self,
        model: &mrrec_llm_local::model::Transformer,
        seqs: &[Scored<'_>],
        upto: usize,
    ) -> Result<Vec<Tensor>> {
        if model.n_layers() != self.shape.layers || model.hidden_size != self.shape.hidden {
            return Err(TrainError::Model(format!(
                "the inference model ({} layers of {}) is not the policy's ({} of {})",
                model.n_layers(),
                model.hidden_size,
                self.shape.layers,
                self.shape.hidden
            )));
        }
        let model_err = |e: mrrec_llm_local::LocalError| TrainError::Model(e.to_string());
        let head = seqs.first().map_or(&[][..], |s| s.tokens);
        let shared = seqs
            .iter()
            .map(|s| common_prefix(head, s.tokens).min(s.tokens.len() - 1))
            .min()
            .unwrap_or(0);
        let mut base = model.new_cache();
        let prefix = if shared > 0 {
            let x = model
                .residual_batch(&[&head[..shared]], &mut [&mut base], upto)
                .map_err(model_err)?;
            x.into_iter().next()
        } else {
            None
        };
        let mut caches: Vec<_> = seqs.iter().map(|_| base.clone()).collect();
        let mut refs: Vec<&mut mrrec_llm_local::model::KvCache> = caches.iter_mut().collect();
        let rests: Vec<&[u32]> = seqs.iter().map(|s| &s.tokens[shared..]).collect();
        let xs = model
            .residual_batch(&rests, &mut refs, upto)
            .map_err(model_err)?;
        xs.into_iter()
            .map(|x| {
                let x = match &prefix {
                    Some(p) => Tensor::cat(&[p, &x], 0)?,
                    None => x,
                };
                Ok(x.to_dtype(self.dtype)?.detach())
            })
            .collect()
    }

    fn check_from(&self, tokens: &[u32], from: usize) -> Result<()> {
        if from == 0 || from >= tokens.len() {
            return Err(TrainError::Model(format!(
                "scored positions start at {from} of {} tokens (1..len)",
                tokens.len()
            )));
        }
        Ok(())
    }

    fn logprobs_of(
        &self,
        h: &Tensor,
        tokens: &[u32],
        from: usize,
        allowed: &[Option<mrrec_llm_local::TokenSet>],
        chunk: usize,
    ) -> Result<Tensor> {
        let n = tokens.len() - from;
        let chunk = chunk.max(1);
        let mut parts = Vec::new();
        let mut i = 0;
        while i < n {
            let m = chunk.min(n - i);
            // Rows renormalised over a few tokens (a judge's {Yes, No}, a constrained choice):
            // the logits of those tokens alone. Equal to the masked full row's, without the
            // vocabulary-wide product and its gradient (for Qwen 0.5B 545 MB a row).
            let few: Option<Vec<Vec<u32>>> = (0..m)
                .map(|r| {
                    allowed
                        .get(i + r)
                        .and_then(Option::as_ref)
                        .map(mrrec_llm_local::TokenSet::ids)
                        .filter(|ids| !ids.is_empty() && ids.len() <= FEW_TOKENS)
                })
                .collect();
            if let Some(sets) = few {
                for (r, set) in sets.into_iter().enumerate() {
                    let target = tokens[from + i + r];
                    let k = set.len();
                    let mut ids = set;
                    let at = match ids.iter().position(|&x| x == target) {
                        Some(p) => p,
                        None => {
                            ids.push(target);
                            k
                        }
                    };
                    let cols = self
                        .output_t
                        .index_select(&Tensor::new(ids.as_slice(), &self.device)?, 1)?;
                    let logits = h.narrow(0, from + i + r - 1, 1)?.matmul(&cols)?; // (1, ids)
                    let picked = logits.narrow(1, at, 1)?.squeeze(1)?;
                    if k == 2 && at < 2 {
                        // A pair (a judge's Yes / No): −softplus(other − target), exact where
                        // the target's probability rounds to 1 (1 + e^−d is 1 in f32 beyond a
                        // log-odds d of 16.6, where the usual log-sum-exp gives exactly 0 and a
                        // loss on it no gradient). Computed in f64, the log-odds clamped at 80
                        // so that the value (≈ −e^−80) and its gradients stay finite in f32.
                        let other = logits.narrow(1, 1 - at, 1)?.squeeze(1)?;
                        let z = (other - &picked)?
                            .to_dtype(DType::F64)?
                            .clamp(-80.0, 80.0)?;
                        let tail = log1p(&z.abs()?.neg()?.exp()?)?;
                        parts.push((z.relu()? + tail)?.neg()?.to_dtype(picked.dtype())?);
                        continue;
                    }
                    parts.push((picked - logsumexp(&logits.narrow(1, 0, k)?)?)?);
                }
                i += m;
                continue;
            }
            // Row r of the chunk predicts tokens[from + i + r] from the hidden state before it.
            let rows = h.narrow(0, from + i - 1, m)?;
            let logits = frozen_matmul(&rows, &self.output_t)?; // (m, vocab)
            let targets: Vec<u32> = tokens[from + i..from + i + m].to_vec();
            let tgt = Tensor::new(targets.as_slice(), &self.device)?.unsqueeze(1)?;
            let picked = logits.gather(&tgt, 1)?.squeeze(1)?;
            let constrained = (0..m).any(|r| allowed.get(i + r).is_some_and(Option::is_some));
            let z = if constrained {
                let mut mask = vec![0f32; m * self.shape.vocab];
                for r in 0..m {
                    if let Some(Some(set)) = allowed.get(i + r) {
                        let row = &mut mask[r * self.shape.vocab..(r + 1) * self.shape.vocab];
                        for (id, x) in row.iter_mut().enumerate() {
                            if !set.contains(id as u32) {
                                *x = -1e9;
                            }
                        }
                    }
                }
                let mask = Tensor::from_vec(mask, (m, self.shape.vocab), &self.device)?
                    .to_dtype(self.dtype)?;
                logsumexp(&(logits + mask)?)?
            } else {
                logsumexp(&logits)?
            };
            parts.push((picked - z)?);
            i += m;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Samples `max_new` tokens after `prompt` at `temperature` (naive: the whole sequence is
    /// recomputed per token; for small models in tests), returning the new tokens and their
    /// log-probabilities under the sampling distribution at temperature 1.
    pub fn sample(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f64,
        rng: &mut impl Rng,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let mut toks = prompt.to_vec();
        let mut lps = Vec::new();
        for _ in 0..max_new {
            let h = self.hidden(&toks, true)?;
            let last = h.narrow(0, toks.len() - 1, 1)?.matmul(&self.output_t)?;
            let logits: Vec<f64> = last.squeeze(0)?.to_dtype(DType::F64)?.to_vec1()?;
            let t = temperature.max(1e-6);
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| ((l - mx) / t).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut r = rng.gen::<f64>() * total;
            let mut pick = w.len() - 1;
            for (i, x) in w.iter().enumerate() {
                if r < *x {
                    pick = i;
                    break;
                }
                r -= x;
            }
            let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
            lps.push((logits[pick] - lse) as f32);
            toks.push(pick as u32);
        }
        Ok((toks[prompt.len()..].to_vec(), lps))
    }
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `x · w` for a constant `w` (a frozen projection, the output layer): when `x` carries a
/// gradient, through [`FrozenMatmul`], whose backward computes `x`'s alone.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        x.contiguous()?.apply_op1(FrozenMatmul(w.clone()))
    } else {
        x.matmul(w)
    }
}

/// `x · w` (x: (rows, in), w: (in, out)) with the gradient flowing to `x` alone. candle's matmul
/// also computes the other operand's, an (in, out) product per use — as costly as the forward
/// product (for the output layer of Qwen 0.5B 545 MB a use) — for a weight nothing learns.
struct FrozenMatmul(Tensor);

impl FrozenMatmul {
    fn forward<T: candle_core::WithDType>(
        &self,
        v: &[T],
        l: &candle_core::Layout,
    ) -> candle_core::Result<Tensor> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen matmul: the input must be contiguous")
        };
        Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu)?.matmul(&self.0)
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let y = match s {
            CpuStorage::F32(v) => self.forward(v, l)?,
            CpuStorage::F64(v) => self.forward(v, l)?,
            _ => candle_core::bail!("frozen matmul: f32 or f64 only"),
        };
        let out = match y.dtype() {
            DType::F64 => CpuStorage::F64(y.flatten_all()?.to_vec1()?),
            _ => CpuStorage::F32(y.flatten_all()?.to_vec1()?),
        };
        Ok((out, y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.0.t()?)?))
    }
}

/// Per sequence its log-probabilities (differentiable, with the adapter) and, when asked for,
/// the reference policy's values ([`Policy::token_logprobs_shared`]).
pub type ScoredMany = (Vec<Tensor>, Option<Vec<Vec<f32>>>);

/// A scored position renormalised over at most this many tokens computes only their logits.
const FEW_TOKENS: usize = 64;

/// Where [`Policy::token_logprobs_shared`] takes the frozen layers' residual stream from.
pub enum Lower<'a> {
    /// The policy's own dense layers (exact), reusing and filling a cache of recent sequences'
    /// states if given.
    Exact(Option<&'a mut LowerCache>),
    /// The inference model the policy was loaded from, as its prompt prefill computes them
    /// (quantised kernels: ~3× faster than the dense f32 layers on Qwen 0.5B, and the very
    /// states generation and scoring start the adapted layers from).
    Inference(&'a mrrec_llm_local::model::Transformer),
    /// As [`Lower::Inference`], remembering each group's states in a [`FrozenMemo`]: a group
    /// of sequences scored before is not prefilled again.
    Remembered(&'a mrrec_llm_local::model::Transformer, &'a mut FrozenMemo),
}

/// A group of sequences below a layer: the layer they enter and every sequence's tokens.
type GroupKey = (usize, Vec<Vec<u32>>);

/// The frozen layers' residual streams of groups of sequences scored before
/// ([`Lower::Remembered`]), up to a budget of bytes. Fine-tuning learns the same examples
/// every epoch (a judge's lists) and nothing below the adapter changes, so from the second
/// epoch on only the adapted layers run. Exact: a group is found by all of its sequences'
/// tokens and the layer, and its states are the ones the same prefill of the same group gave.
pub struct FrozenMemo {
    groups: std::collections::HashMap<GroupKey, Vec<Tensor>>,
    budget: usize,
    used: usize,
    /// Tokens whose frozen-layer state was remembered.
    pub hits_tokens: u64,
    /// Tokens asked for.
    pub total_tokens: u64,
}

impl FrozenMemo {
    /// An empty memo holding at most `budget` bytes of states (0: remembers nothing). Groups
    /// are kept first come; once it is full, later ones are computed every time.
    pub fn new(budget: usize) -> Self {
        FrozenMemo {
            groups: std::collections::HashMap::new(),
            budget,
            used: 0,
            hits_tokens: 0,
            total_tokens: 0,
        }
    }

    /// Bytes of states held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    fn key(seqs: &[Scored<'_>], upto: usize) -> GroupKey {
        (upto, seqs.iter().map(|s| s.tokens.to_vec()).collect())
    }

    fn get(&mut self, seqs: &[Scored<'_>], upto: usize) -> Option<Vec<Tensor>> {
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        self.total_tokens += n as u64;
        let found = self.groups.get(&Self::key(seqs, upto))?.clone();
        self.hits_tokens += n as u64;
        Some(found)
    }

    fn put(&mut self, seqs: &[Scored<'_>], upto: usize, xs: &[Tensor]) {
        let bytes: usize = xs
            .iter()
            .map(|x| x.elem_count() * x.dtype().size_in_bytes())
            .sum();
        if self.used + bytes > self.budget {
            return;
        }
        self.used += bytes;
        self.groups.insert(Self::key(seqs, upto), xs.to_vec());
    }
}

/// One sequence to score ([`Policy::token_logprobs_shared`]): its tokens, the first scored
/// position, and the scored positions' allowed token sets (as [`Policy::token_logprobs`]).
#[derive(Clone, Copy)]
pub struct Scored<'a> {
    /// The whole sequence.
    pub tokens: &'a [u32],
    /// First scored position (1..len).
    pub from: usize,
    /// Per scored position, the set it was renormalised over (constrained decoding), if any.
    pub allowed: &'a [Option<mrrec_llm_local::TokenSet>],
}

/// The frozen lower layers' state of one sequence: per layer the rotated keys and values
/// ((kv heads, t, head dim)) and the residual stream leaving the last frozen layer (t, hidden).
struct LowerState {
    tokens: Vec<u32>,
    kv: Vec<(Tensor, Tensor)>,
    x: Tensor,
}

/// The frozen lower layers' states of the last few sequences, so that a sequence sharing a
/// prefix with one of them computes only its new tokens below the adapted layers. Exact: those
/// layers carry no adapter and no graph, and a token's state depends only on the tokens before
/// it. Holds `capacity` sequences (a 1k-token state of SmolLM2 is ~45 MB, of Qwen 0.5B ~25 MB).
pub struct LowerCache {
    states: Vec<LowerState>,
    capacity: usize,
    /// Tokens whose lower-layer state came from the cache.
    pub hits_tokens: u64,
    /// Tokens asked for.
    pub total_tokens: u64,
}

impl LowerCache {
    /// An empty cache of `capacity` sequences.
    pub fn new(capacity: usize) -> Self {
        LowerCache {
            states: Vec::new(),
            capacity: capacity.max(1),
            hits_tokens: 0,
            total_tokens: 0,
        }
    }

    fn longest(&self, tokens: &[u32]) -> (usize, Option<&LowerState>) {
        self.states
            .iter()
            .map(|s| (common_prefix(&s.tokens, tokens), Some(s)))
            .max_by_key(|(n, _)| *n)
            .unwrap_or((0, None))
    }

    fn remember(&mut self, s: LowerState) {
        if self.states.len() >= self.capacity {
            self.states.remove(0);
        }
        self.states.push(s);
    }
}

/// Row-wise log-sum-exp of (m, n) → (m,), differentiable.
/// log(1 + t) for t ≥ 0, exact where t is tiny (1 + t rounds to 1 and `log` gives 0): t − t²/2
/// below 1e-6.
pub(crate) fn log1p(t: &Tensor) -> candle_core::Result<Tensor> {
    let series = (t - (t.sqr()? * 0.5)?)?;
    let direct = t.affine(1.0, 1.0)?.log()?;
    t.lt(1e-6)?.where_cond(&series, &direct)
}

/// log(1 − e^x) for log-probabilities x ≤ 0 — the other answer's log-probability of a pair —
/// in f64, exact where x is tiny (1 − e^x rounds to 0): log(−x) + x/2 above −1e-6. x is
/// clamped to ≤ −1e-300 (a probability of exactly 1 has no finite answer).
pub(crate) fn log1m_exp(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F64)?.clamp(f64::MIN, -1e-300)?;
    let series = (x.neg()?.log()? + (&x * 0.5)?)?;
    // Clamped so that the branch not taken stays finite (its gradient is masked, not NaN).
    let direct = x.exp()?.affine(-1.0, 1.0)?.clamp(1e-300, 1.0)?.log()?;
    x.ge(-1e-6)?.where_cond(&series, &direct)
}

pub fn logsumexp(x: &Tensor) -> candle_core::Result<Tensor> {
    let mx = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&mx)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    (s + mx)?.squeeze(D::Minus1)
}
