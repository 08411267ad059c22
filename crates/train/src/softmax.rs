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

/// The rows of a contiguous (…, t, all) layout: (row length, rows per matrix, the data).
fn rows<'a, T>(src: &'a [T], layout: &Layout) -> candle_core::Result<(usize, usize, &'a [T])> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("causal softmax: the input must be contiguous")
    };
    let dims = layout.shape().dims();
    Ok((dims[dims.len() - 1], dims[dims.len() - 2], &src[a..b]))
}

/// How many rows a parallel task takes (a few thousand entries or more each).
fn rows_per_task(all: usize) -> usize {
    (16_384 / all.max(1)).max(1)
}

struct CausalSoftmax {
    scale: f64,
}

impl CausalSoftmax {
    fn forward<T: Real>(&self, src: &[T], layout: &Layout) -> candle_core::Result<CpuStorage> {
        use rayon::prelude::*;
        let (all, t, src) = rows(src, layout)?;
        let offset = all - t;
        let s = T::of(self.scale);
        let mut dst = vec![T::zero(); src.len()];
        let per = rows_per_task(all);
        dst.par_chunks_mut(all * per)
            .zip(src.par_chunks(all * per))
            .enumerate()
            .for_each(|(task, (dst, src))| {
                for (r, (d, x)) in dst.chunks_mut(all).zip(src.chunks(all)).enumerate() {
                    let seen = offset + (task * per + r) % t + 1;
                    let (d, x) = (&mut d[..seen], &x[..seen]);
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
                }
            });
        Ok(T::to_cpu_storage_owned(dst))
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
        use rayon::prelude::*;
        let (all, t, p) = rows(p, lp)?;
        let (_, _, g) = rows(g, lg)?;
        if p.len() != g.len() {
            candle_core::bail!(
                "causal softmax gradient: {} vs {} entries",
                p.len(),
                g.len()
            )
        }
        let offset = all - t;
        let s = T::of(self.scale);
        let mut dst = vec![T::zero(); p.len()];
        let per = rows_per_task(all);
        dst.par_chunks_mut(all * per)
            .zip(p.par_chunks(all * per).zip(g.par_chunks(all * per)))
            .enumerate()
            .for_each(|(task, (dst, (p, g)))| {
                let rows = dst.chunks_mut(all).zip(p.chunks(all).zip(g.chunks(all)));
                for (r, (d, (p, g))) in rows.enumerate() {
                    let seen = offset + (task * per + r) % t + 1;
                    let (d, p, g) = (&mut d[..seen], &p[..seen], &g[..seen]);
                    let mut dot = T::zero();
                    for (&p, &g) in p.iter().zip(g) {
                        dot += p * g;
                    }
                    for (d, (&p, &g)) in d.iter_mut().zip(p.iter().zip(g)) {
                        *d = s * p * (g - dot);
                    }
                }
            });
        Ok(T::to_cpu_storage_owned(dst))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Shapes: a prompt alone (t = all), new tokens after a cached prefix (all > t), one token,
    /// rows spanning several parallel tasks.
    const SHAPES: [[usize; 3]; 4] = [[3, 7, 7], [2, 5, 9], [4, 1, 6], [2, 300, 320]];

    #[test]
    fn equals_the_composed_softmax_and_masks_the_future() {
        for (k, dims) in SHAPES.iter().enumerate() {
            for dtype in [DType::F32, DType::F64] {
                let x = random(dims, k as u64, dtype);
                let a = causal_softmax(&x, 0.125).unwrap();
                let b = composed_causal_softmax(&x, 0.125).unwrap();
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                assert!(max_diff(&a, &b) < tol, "{dims:?} {dtype:?}");
                let (t, all) = (dims[1], dims[2]);
                let p: Vec<Vec<Vec<f64>>> = a.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
                for head in &p {
                    for (i, row) in head.iter().enumerate() {
                        let seen = all - t + i + 1;
                        assert!(
                            row[seen..].iter().all(|&v| v == 0.0),
                            "row {i} sees the future"
                        );
                        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn its_gradient_equals_the_composed_ones() {
        for (k, dims) in SHAPES.iter().enumerate() {
            let x = Var::from_tensor(&random(dims, 10 + k as u64, DType::F64)).unwrap();
            // A loss that weighs every output differently.
            let w = random(dims, 20 + k as u64, DType::F64);
            let grad = |f: fn(&Tensor, f64) -> candle_core::Result<Tensor>| {
                let loss = (f(x.as_tensor(), 0.3).unwrap() * &w)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
            };
            let (a, b) = (grad(causal_softmax), grad(composed_causal_softmax));
            assert!(max_diff(&a, &b) < 1e-12, "{dims:?}: {}", max_diff(&a, &b));
        }
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let wide = random(&[2, 5, 3], 1, DType::F32);
        assert!(causal_softmax(&wide, 1.0).is_err());
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(causal_softmax(&ints, 1.0).is_err());
    }
}
