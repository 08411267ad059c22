//! The attention's scaled, causally masked softmax as one differentiable operation.
//!
//! Composed from tensor operations (scale, add the mask, subtract the row maximum, exponentiate,
//! divide by the sum), the softmax leaves six (heads × t × t) tensors in the autograd graph of
//! every adapted layer — ~126 MB each for Qwen 0.5B at t = 1,500, most of a training step's
//! memory. [`causal_softmax`] computes it in one pass and keeps only its input and output;
//! its backward is one pass too (`s · p ⊙ (g − Σ g ⊙ p)`). [`composed_causal_softmax`] is the
//! composed reference it is tested and benchmarked against.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

/// The value the composed reference adds above the diagonal.
const MASKED: f64 = -1e9;

/// `softmax(scale · x)` over the last dimension of `x` (`(…, t, all)`, `all ≥ t`), where row `i`
/// of the last `t` sees columns `0..=all − t + i` (the causal mask of `t` new tokens after
/// `all − t` earlier ones); masked entries are 0. Differentiable; f32 and f64 on the CPU.
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    check(x)?;
    x.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// The same as tensor operations (what [`causal_softmax`] replaces): `x · scale + mask`, then
/// `candle_nn::ops::softmax`. For tests and benchmarks.
pub fn composed_causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    check(x)?;
    let (t, all) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    let offset = all - t;
    let m: Vec<f64> = (0..t)
        .flat_map(|i| (0..all).map(move |j| if j > offset + i { MASKED } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(m, (t, all), x.device())?.to_dtype(x.dtype())?;
    candle_nn::ops::softmax(&(x * scale)?.broadcast_add(&mask)?, D::Minus1)
}

fn check(x: &Tensor) -> candle_core::Result<()> {
    let dims = x.dims();
    if dims.len() < 2 || dims[dims.len() - 1] < dims[dims.len() - 2] {
        candle_core::bail!(
            "causal softmax of shape {:?}: need (…, t, all) with all ≥ t",
            dims
        )
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!("causal softmax of {:?}: f32 or f64 only", x.dtype())
    }
    Ok(())
}

/// The arithmetic both passes need, for f32 and f64.
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::DivAssign
    + candle_core::WithDType
{
    fn exp(self) -> Self;
    fn of(x: f64) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn of(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn of(x: f64) -> Self {
        x
    }
}

/// The data and (row length, rows per matrix) of a contiguous (…, t, all) layout.
fn rows<'a, T>(src: &'a [T], layout: &Layout) -> candle_core::Result<(&'a [T], usize, usize)> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("causal softmax: the input must be contiguous")
    };
    let dims = layout.shape().dims();
    Ok((&src[a..b], dims[dims.len() - 1], dims[dims.len() - 2]))
}

/// A new (…, t, all) buffer of `len` entries, zero where masked, whose rows `f` fills in
/// parallel: `f(start, d)` gets the row's offset in the flat data and its `d`, cut to the
/// columns that row sees (`all − t + i + 1` for row `i` of a matrix).
fn each_row<T: Real>(
    len: usize,
    all: usize,
    t: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> CpuStorage {
    use rayon::prelude::*;
    let mut dst = vec![T::zero(); len];
    // A few thousand entries or more per parallel task.
    let per = (16_384 / all.max(1)).max(1);
    dst.par_chunks_mut(all * per)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, d) in chunk.chunks_mut(all).enumerate() {
                let row = task * per + r;
                f(row * all, &mut d[..all - t + row % t + 1]);
            }
        });
    T::to_cpu_storage_owned(dst)
}

struct CausalSoftmax {
    scale: f64,
}

impl CausalSoftmax {
    fn forward<T: Real>(&self, src: &[T], layout: &Layout) -> candle_core::Result<CpuStorage> {
        let (src, all, t) = rows(src, layout)?;
        let s = T::of(self.scale);
        Ok(each_row(src.len(), all, t, |start, d: &mut [T]| {
            let x = &src[start..start + d.len()];
            let mut max = x[0] * s;
            for &v in &x[1..] {
                if v * s > max {
                    max = v * s;
                }
            }
            let mut sum = T::zero();
            for (d, &v) in d.iter_mut().zip(x) {
                *d = (v * s - max).exp();
                sum += *d;
            }
            for d in d.iter_mut() {
                *d /= sum;
            }
        }))
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => self.forward(v, l)?,
            CpuStorage::F64(v) => self.forward(v, l)?,
            _ => candle_core::bail!("causal softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = p
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?;
        Ok(Some(grad))
    }
}

/// The input's gradient from the output `p` and its gradient `g`: `scale · p ⊙ (g − Σ g ⊙ p)`
/// per row (masked entries have p = 0, so 0).
struct CausalSoftmaxGrad {
    scale: f64,
}

impl CausalSoftmaxGrad {
    fn backward<T: Real>(
        &self,
        p: &[T],
        lp: &Layout,
        g: &[T],
        lg: &Layout,
    ) -> candle_core::Result<CpuStorage> {
        let (p, all, t) = rows(p, lp)?;
        let (g, _, _) = rows(g, lg)?;
        if p.len() != g.len() {
            candle_core::bail!(
                "causal softmax gradient: {} vs {} entries",
                p.len(),
                g.len()
            )
        }
        let s = T::of(self.scale);
        Ok(each_row(p.len(), all, t, |start, d: &mut [T]| {
            let (p, g) = (&p[start..start + d.len()], &g[start..start + d.len()]);
            let mut dot = T::zero();
            for (&p, &g) in p.iter().zip(g) {
                dot += p * g;
            }
            for (d, (&p, &g)) in d.iter_mut().zip(p.iter().zip(g)) {
                *d = s * p * (g - dot);
            }
        }))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (p, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => self.backward(p, lp, g, lg)?,
            (CpuStorage::F64(p), CpuStorage::F64(g)) => self.backward(p, lp, g, lg)?,
            _ => candle_core::bail!("causal softmax gradient: f32 or f64, the same for both"),
        };
        Ok((out, lp.shape().clone()))
    }
}
