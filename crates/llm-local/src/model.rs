//! Our own forward pass for GGUF qwen2 / llama models: shared immutable weights, one KV cache per
//! sequence (cloning a cache forks a prompt computed once), and batched decoding — many sequences
//! advance together, so the weight matrices are read once per step for all of them.
//!
//! Projections run our packed Q8_0 kernel ([`crate::q8`]) where the CPU has AVX512-VNNI (else
//! candle's); both are row-independent, and attention ([`crate::attention`]) computes every row
//! of a sequence by the same operations whatever else is computed with it, so a sequence's tokens
//! do not depend on what it is batched with, nor (with the packed kernel) on how its prompt was
//! split into prefills.

use std::path::Path;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use crate::attention::{attention, KvLayer, Shape};
pub use crate::lora::LoraAdapter;
use crate::q8::{self, PackedQ8};
use crate::vector::silu_mul;
use crate::Result;
use mrrec_llm::LlmError;

/// The arithmetic a projection runs with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Decoding (one row per sequence): the packed Q8_0 kernel where the CPU has it, else
    /// candle's quantised kernel.
    Decode,
    /// Prompt prefill (many rows): the packed kernel, else the dequantised f32 copy, else
    /// candle's kernel.
    Prompt,
    /// f32 weights (dequantised) and f32 activations: the reference for the training model.
    Exact,
}

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

/// The projections a LoRA adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Proj {
    /// Every projection.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Its name in adapter files (`blk.{layer}.{name}.lora_a`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }
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
    /// `cos(p · θ_i)` and `sin(p · θ_i)` for every position `p` of the window and `i < d/2`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    device: Device,
    /// Context window.
    pub context_length: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Rows of the output layer: the logits' length (at least the tokenizer's vocabulary).
    pub n_vocab: usize,
    lora: std::sync::RwLock<Option<std::sync::Arc<LoraAdapter>>>,
    lora_generation: std::sync::atomic::AtomicU64,
    /// Per layer, per projection (in [`Proj::ALL`] order): the transposed f32 weight that prompt
    /// prefill multiplies with where the packed kernel does not run (an f32 GEMM over many rows
    /// beats candle's row-by-row quantised kernel 2.3×). Off with `MRREC_DENSE_PREFILL=0`.
    dense: Vec<Vec<Option<Tensor>>>,
    /// Per layer, per projection: the weights packed for [`q8`]'s kernel (Q8_0 weights on a CPU
    /// with AVX512-VNNI; 7–15× candle's kernel on Qwen 0.5B's 896-wide projections, and faster
    /// than the f32 copy for prompts too). `MRREC_Q8_KERNEL=0` turns it off.
    packed: Vec<Vec<Option<PackedQ8>>>,
    /// The output layer, packed likewise.
    output_packed: Option<PackedQ8>,
}

/// One sequence's keys and values per layer, and how many positions they hold. Clone to fork.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<KvLayer>,
    /// Positions already in the cache.
    pub pos: usize,
}

impl KvCache {
    /// The keys and values of layer `i` as (n_kv, positions, head dim) arrays, once filled.
    pub fn layer(&self, i: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        self.layers
            .get(i)
            .filter(|l| !l.is_empty())
            .map(KvLayer::to_arrays)
    }

    /// Keeps the first `n` positions (a shared prompt prefix).
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n >= self.pos {
            return Ok(());
        }
        for l in self.layers.iter_mut() {
            l.truncate(n);
        }
        self.pos = n;
        Ok(())
    }

    /// Heap bytes its keys and values hold.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvLayer::bytes).sum()
    }
}

impl Transformer {
    /// Loads the weights of a GGUF file (qwen2 or llama architecture).
    pub fn load(path: &Path, ct: gguf_file::Content) -> Result<Self> {
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path).map_err(|e| {
            crate::LocalError::Llm(LlmError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        let bad = |m: String| {
            crate::LocalError::Llm(LlmError::BadModelFile {
                path: path.to_path_buf(),
                message: m,
            })
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
        let intermediate_size = u("feed_forward_length")?;
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
        let output_q = match t("output.weight") {
            Ok(w) => w,
            Err(_) => embed_q,
        };
        let output_packed = PackedQ8::from_qtensor(&output_q);
        let n_vocab = output_q.shape().dims()[0];
        let output = QMatMul::from_qtensor(output_q)?;
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let mut layers = Vec::with_capacity(n_layers);
        let dense_prefill = crate::switches().dense_prefill;
        let mut dense: Vec<Vec<Option<Tensor>>> = Vec::with_capacity(n_layers);
        let mut packed: Vec<Vec<Option<PackedQ8>>> = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}");
            let mut q = |n: &str| t(&format!("{p}.{n}"));
            let bias = |r: candle_core::Result<candle_core::quantized::QTensor>| -> Result<Option<Tensor>> {
                Ok(match r {
                    Ok(b) => Some(b.dequantize(&Device::Cpu)?),
                    Err(_) => None,
                })
            };
            let mut dense_row: Vec<Option<Tensor>> = Vec::with_capacity(7);
            let mut packed_row: Vec<Option<PackedQ8>> = Vec::with_capacity(7);
            let mut mk = |qt: candle_core::quantized::QTensor| -> Result<QMatMul> {
                let pk = PackedQ8::from_qtensor(&qt);
                // Without the packed kernel, a dequantised, transposed copy for prompt prefill:
                // with many rows, an f32 GEMM beats candle's row-by-row quantised kernel.
                dense_row.push(if dense_prefill && pk.is_none() {
                    Some(qt.dequantize(&Device::Cpu)?.t()?.contiguous()?)
                } else {
                    None
                });
                packed_row.push(pk);
                Ok(QMatMul::from_qtensor(qt)?)
            };
            let wq = mk(q("attn_q.weight")?)?;
            let wk = mk(q("attn_k.weight")?)?;
            let wv = mk(q("attn_v.weight")?)?;
            let wo = mk(q("attn_output.weight")?)?;
            let gate = mk(q("ffn_gate.weight")?)?;
            let up = mk(q("ffn_up.weight")?)?;
            let down = mk(q("ffn_down.weight")?)?;
            dense.push(dense_row);
            packed.push(packed_row);
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                bq: bias(q("attn_q.bias"))?,
                bk: bias(q("attn_k.bias"))?,
                bv: bias(q("attn_v.bias"))?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm.weight")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm.weight")?, eps)?,
                gate,
                up,
                down,
            });
        }
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        let freqs: Vec<f32> = (0..context_length)
            .flat_map(|p| theta.iter().map(move |t| p as f32 * t))
            .collect();
        Ok(Transformer {
            embed,
            layers,
            norm,
            output,
            n_head,
            n_kv,
            head_dim,
            neox: arch == "qwen2",
            rope_cos: freqs.iter().map(|f| f.cos()).collect(),
            rope_sin: freqs.iter().map(|f| f.sin()).collect(),
            device,
            context_length,
            hidden_size: hidden,
            intermediate_size,
            n_vocab,
            lora: std::sync::RwLock::new(None),
            lora_generation: std::sync::atomic::AtomicU64::new(0),
            dense,
            packed,
            output_packed,
        })
    }

    /// Applies (or, with `None`, removes) a LoRA adapter for every later forward pass.
    pub fn set_lora(&self, adapter: Option<std::sync::Arc<LoraAdapter>>) {
        *self.lora.write().unwrap_or_else(|p| p.into_inner()) = adapter;
        self.lora_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// `(out, in)` of a projection.
    pub fn proj_shape(&self, p: Proj) -> (usize, usize) {
        let (h, kv, i) = (
            self.hidden_size,
            self.n_kv * self.head_dim,
            self.intermediate_size,
        );
        match p {
            Proj::Q | Proj::O => (h, h),
            Proj::K | Proj::V => (kv, h),
            Proj::Gate | Proj::Up => (i, h),
            Proj::Down => (h, i),
        }
    }

    /// How many matrices (projections and the output layer) are not packed for [`q8`]'s kernel
    /// and run candle's instead (all of them on a CPU without AVX512-VNNI).
    pub fn unpacked_matrices(&self) -> usize {
        let proj = self
            .packed
            .iter()
            .map(|l| l.iter().filter(|p| p.is_none()).count())
            .sum::<usize>();
        proj + usize::from(self.output_packed.is_none())
    }

    /// Number of transformer layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// `W x`, plus the adapter's low-rank update when one targets this projection.
    /// One projection of `x` (…, in) → (…, out), plus the LoRA delta. `xq` is `x` already
    /// quantised for the packed kernel (projections sharing an input quantise it once). The path
    /// depends only on the mode, never on the number of rows, so a given step always takes the
    /// same numeric path whatever else is batched or cached.
    fn proj(
        &self,
        li: usize,
        p: Proj,
        w: &QMatMul,
        x: &Tensor,
        xq: Option<&q8::Quantised>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let packed = self
            .packed
            .get(li)
            .and_then(|d| d.get(p as usize))
            .and_then(Option::as_ref)
            .filter(|_| mode != Mode::Exact);
        let dense = self
            .dense
            .get(li)
            .and_then(|d| d.get(p as usize))
            .and_then(Option::as_ref)
            .filter(|_| mode != Mode::Decode);
        let y = match (packed, dense) {
            (Some(pk), _) => packed_matmul(pk, x, xq)?,
            (None, Some(wt)) => x.broadcast_matmul(wt)?,
            (None, None) if mode == Mode::Exact => x.broadcast_matmul(&dequantised(w)?.t()?)?,
            (None, None) => w.forward(x)?,
        };
        let guard = self.lora.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref().and_then(|ad| ad.get(li, p).map(|f| (ad, f))) {
            Some((ad, (a, b))) => {
                let scale = (ad.alpha / ad.rank.max(1) as f32) as f64;
                let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
                y + (delta * scale)?
            }
            None => Ok(y),
        }
    }

    /// The input of several packed projections, quantised once (`None` when they do not all run
    /// packed in this mode).
    fn quantised_for(
        &self,
        li: usize,
        ps: &[Proj],
        x: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Option<q8::Quantised>> {
        let all = mode != Mode::Exact
            && ps.iter().all(|&p| {
                self.packed
                    .get(li)
                    .and_then(|d| d.get(p as usize))
                    .is_some_and(Option::is_some)
            });
        if !all {
            return Ok(None);
        }
        with_rows(x, |rows, m, k| Ok(q8::quantise(rows, m, k))).map(Some)
    }

    /// Logits of the last positions `x` (…, hidden) after the final norm.
    fn head(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match (&self.output_packed, mode) {
            (Some(pk), Mode::Decode | Mode::Prompt) => packed_matmul(pk, x, None),
            (_, Mode::Exact) => x.broadcast_matmul(&dequantised(&self.output)?.t()?),
            _ => self.output.forward(x),
        }
    }

    /// Changes whenever the adapter changes (cached keys and values of another adapter are stale).
    pub fn lora_generation(&self) -> u64 {
        self.lora_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A cache with no positions.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![KvLayer::new(self.n_kv, self.head_dim); self.layers.len()],
            pos: 0,
        }
    }

    /// Rotates one row of heads (`heads · d` values) to position `p` in place: NeoX halves for
    /// qwen2, interleaved pairs for llama (candle's `rope` / `rope_i` arithmetic).
    fn rope_row(&self, x: &mut [f32], p: usize) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let cos = &self.rope_cos[p * half..][..half];
        let sin = &self.rope_sin[p * half..][..half];
        for head in x.chunks_exact_mut(d) {
            if self.neox {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x1 * sin[i] + x2 * cos[i];
                }
            } else {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * cos[i] - x2 * sin[i];
                    pair[1] = x1 * sin[i] + x2 * cos[i];
                }
            }
        }
    }

    /// Attention of layer `li` for every sequence of a pass at once. `q`, `k`, `v` hold the
    /// projections' rows of all the sequences, `counts[s]` rows of sequence `s` after those of
    /// the ones before it (any leading dimensions, rows last but one). Each row is rotated at its
    /// own position, the keys and values are appended to each sequence's cache (which holds
    /// `cache.pos` positions of this layer before), and each sequence attends over its own cache.
    /// Returns the rows in the same order and shape as `q`. No per-sequence tensor operation:
    /// a decoding step of many sequences costs the same few tensor calls as one.
    fn attend_all(
        &self,
        li: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        caches: &mut [&mut KvCache],
        counts: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (hq, hk) = (self.n_head * self.head_dim, self.n_kv * self.head_dim);
        let shape = q.dims().to_vec();
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let rows: usize = counts.iter().sum();
        if q.len() != rows * hq || k.len() != rows * hk {
            candle_core::bail!("attention: {rows} rows of {} queries", q.len());
        }
        let mut out = vec![0f32; rows * hq];
        with_rows(v, |v, _, _| {
            let mut off = 0;
            for (cache, &t) in caches.iter_mut().zip(counts) {
                let pos = cache.pos;
                let Some(layer) = cache.layers.get_mut(li) else {
                    candle_core::bail!("a cache without layer {li}");
                };
                if layer.len() != pos {
                    candle_core::bail!("cache of {} positions at position {pos}", layer.len());
                }
                for i in 0..t {
                    self.rope_row(&mut q[(off + i) * hq..][..hq], pos + i);
                    self.rope_row(&mut k[(off + i) * hk..][..hk], pos + i);
                }
                layer.append(&k[off * hk..][..t * hk], &v[off * hk..][..t * hk], t);
                let shape = Shape {
                    n_head: self.n_head,
                    n_kv: self.n_kv,
                    t,
                    pos,
                    d: self.head_dim,
                };
                let o = attention(&q[off * hq..][..t * hq], layer, shape);
                out[off * hq..][..t * hq].copy_from_slice(&o);
                off += t;
            }
            Ok(())
        })?;
        Tensor::from_vec(out, shape, &self.device)
    }

    fn qkv(
        &self,
        li: usize,
        l: &Layer,
        x: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let add = |y: Tensor, b: &Option<Tensor>| match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
        let xq = self.quantised_for(li, &[Proj::Q, Proj::K, Proj::V], x, mode)?;
        let xq = xq.as_ref();
        Ok((
            add(self.proj(li, Proj::Q, &l.wq, x, xq, mode)?, &l.bq)?,
            add(self.proj(li, Proj::K, &l.wk, x, xq, mode)?, &l.bk)?,
            add(self.proj(li, Proj::V, &l.wv, x, xq, mode)?, &l.bv)?,
        ))
    }

    fn mlp(&self, li: usize, l: &Layer, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let h = l.ffn_norm.forward(x)?;
        let hq = self.quantised_for(li, &[Proj::Gate, Proj::Up], &h, mode)?;
        let hq = hq.as_ref();
        let g = self.proj(li, Proj::Gate, &l.gate, &h, hq, mode)?;
        let u = self.proj(li, Proj::Up, &l.up, &h, hq, mode)?;
        let gu = with_rows(&g, |g, _, _| with_rows(&u, |u, _, _| Ok(silu_mul(g, u))))?;
        let gu = Tensor::from_vec(gu, g.dims(), &self.device)?;
        self.proj(li, Proj::Down, &l.down, &gu, None, mode)
    }

    fn check(&self, cache: &KvCache, new: usize) -> Result<()> {
        if cache.pos + new > self.context_length {
            return Err(crate::LocalError::Llm(LlmError::ContextOverflow {
                prompt: cache.pos,
                max_new: new,
                window: self.context_length,
            }));
        }
        Ok(())
    }

    /// Appends `tokens` to one sequence and returns the logits after its last token (vocab,).
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.prefill_batch(&[tokens], &mut [cache])?.get(0)?)
    }

    /// Appends `tokens[s]` to sequence `s` for every sequence at once and returns the logits after
    /// each one's last token (sequences, vocab). The rows of all the prompts go through every
    /// projection together (one weight read for all of them); attention runs per sequence over
    /// its own cache. With the packed kernel a sequence's logits are the same bits alone or in a
    /// batch (every other operation is per row or per sequence).
    pub fn prefill_batch(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let x = self.prompt_layers(tokens, caches, self.layers.len())?;
        let mut lasts = Vec::with_capacity(tokens.len());
        let mut off = 0;
        for (t, cache) in tokens.iter().zip(caches.iter_mut()) {
            cache.pos += t.len();
            off += t.len();
            lasts.push(x.narrow(1, off - 1, 1)?);
        }
        let last = Tensor::cat(&lasts, 1)?; // (1, sequences, hidden)
        let logits = self.head(&self.norm.forward(&last)?, Mode::Prompt)?;
        Ok(logits.squeeze(0)?)
    }

    /// The residual stream (1, Σt, hidden) entering layer `upto` of every sequence's `tokens`,
    /// all rows through each projection together, the keys and values of layers below `upto`
    /// appended to the caches (their positions not advanced). Checks the inputs.
    fn prompt_layers(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        upto: usize,
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(format!(
                "{} prompts for {} sequences",
                tokens.len(),
                caches.len()
            ))));
        }
        if tokens.iter().any(|t| t.is_empty()) {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(
                "empty input".into(),
            )));
        }
        for (t, c) in tokens.iter().zip(caches.iter()) {
            self.check(c, t.len())?;
        }
        let all: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let counts: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let ids = Tensor::new(all.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?; // (1, Σt, hidden)
        for (li, l) in self.layers.iter().enumerate().take(upto) {
            let h = l.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(li, l, &h, Mode::Prompt)?;
            let y = self.attend_all(li, &q, &k, &v, caches, &counts)?;
            x = (self.proj(li, Proj::O, &l.wo, &y, None, Mode::Prompt)? + x)?;
            x = (self.mlp(li, l, &x, Mode::Prompt)? + x)?;
        }
        Ok(x)
    }

    /// The residual stream entering layer `upto` (t, hidden) of each sequence's new `tokens`,
    /// computed as prompt prefill computes it (the packed kernels, all rows of all sequences
    /// through each projection together) — the input a training model's adapted upper layers
    /// take. Appends the keys and values of the layers below `upto` to each cache and advances
    /// it: fork a cache filled with a shared beginning (`clone`) to continue it several ways.
    /// A cache filled this way holds no layer from `upto` up, so it serves only this method
    /// (prefill or decoding from it is refused). Layers below `upto` must carry no adapter.
    pub fn residual_batch(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        upto: usize,
    ) -> Result<Vec<Tensor>> {
        let upto = upto.min(self.layers.len());
        let x = self.prompt_layers(tokens, caches, upto)?.squeeze(0)?;
        let mut out = Vec::with_capacity(tokens.len());
        let mut off = 0;
        for (t, cache) in tokens.iter().zip(caches.iter_mut()) {
            cache.pos += t.len();
            out.push(x.narrow(0, off, t.len())?);
            off += t.len();
        }
        Ok(out)
    }

    /// Logits at every position of `tokens` (t, vocab) through the dense f32 path only (also the
    /// output layer, dequantised): the reference a differentiable re-implementation is checked
    /// against. Slow (dequantises the output matrix); for tests.
    pub fn logits_dense(&self, tokens: &[u32]) -> Result<Tensor> {
        let mut cache = self.new_cache();
        self.check(&cache, tokens.len())?;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = l.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(li, l, &h, Mode::Exact)?;
            let y = self.attend_all(li, &q, &k, &v, &mut [&mut cache], &[tokens.len()])?;
            x = (self.proj(li, Proj::O, &l.wo, &y, None, Mode::Exact)? + x)?;
            x = (self.mlp(li, l, &x, Mode::Exact)? + x)?;
        }
        let h = self.norm.forward(&x)?.squeeze(0)?;
        Ok(self.head(&h, Mode::Exact)?)
    }

    /// Advances several sequences by one token each; returns their logits (batch, vocab).
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b != caches.len() || b == 0 {
            return Err(crate::LocalError::Llm(LlmError::Tokenizer(format!(
                "{b} tokens for {} sequences",
                caches.len()
            ))));
        }
        for c in caches.iter() {
            self.check(c, 1)?;
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(1)?; // (b, 1)
        let ones = vec![1usize; b];
        let mut x = self.embed.forward(&ids)?; // (b, 1, hidden)
        for (li, l) in self.layers.iter().enumerate() {
            let h = l.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(li, l, &h, Mode::Decode)?;
            let y = self.attend_all(li, &q, &k, &v, caches, &ones)?;
            x = (self.proj(li, Proj::O, &l.wo, &y, None, Mode::Decode)? + x)?;
            x = (self.mlp(li, l, &x, Mode::Decode)? + x)?;
        }
        for c in caches.iter_mut() {
            c.pos += 1;
        }
        let logits = self.head(&self.norm.forward(&x)?, Mode::Decode)?; // (b, 1, vocab)
        Ok(logits.squeeze(1)?)
    }
}

/// The f32 weight (out, in) of a quantised matrix.
fn dequantised(w: &QMatMul) -> candle_core::Result<Tensor> {
    match w {
        QMatMul::QTensor(q) => q.dequantize(&Device::Cpu),
        QMatMul::Tensor(t) => Ok(t.clone()),
        QMatMul::TensorF16(t) => t.to_dtype(DType::F32),
    }
}

/// Runs `f` on the rows of `x` (…, k) as one contiguous f32 slice: (rows, m, k).
fn with_rows<T>(
    x: &Tensor,
    f: impl FnOnce(&[f32], usize, usize) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let x = x.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(0);
    let m = x.elem_count().checked_div(k).unwrap_or(0);
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            f(&v[start..start + m * k], m, k)
        }
        _ => candle_core::bail!("the packed Q8_0 kernel takes f32 CPU tensors"),
    }
}

/// `x` (…, k) times a packed matrix: (…, n). `xq`: `x` already quantised.
fn packed_matmul(
    p: &PackedQ8,
    x: &Tensor,
    xq: Option<&q8::Quantised>,
) -> candle_core::Result<Tensor> {
    let mut shape = x.dims().to_vec();
    if shape.last() != Some(&p.k()) {
        candle_core::bail!("packed matmul: input {:?} for {} inputs", shape, p.k());
    }
    let out = match xq {
        Some(q) => p.matmul_quantised(q),
        None => with_rows(x, |rows, m, _| Ok(p.matmul(rows, m)))?,
    };
    if let Some(last) = shape.last_mut() {
        *last = p.n();
    }
    Tensor::from_vec(out, shape, x.device())
}
