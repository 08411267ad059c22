//! Element-wise arithmetic of the forward pass and of decoding: a fixed-polynomial `exp`
//! (softmax, log-sum-exp) written as fixed loops over 16 lanes so that it vectorises, in copies
//! compiled for AVX-512, AVX2 + FMA and no extension that give the same bits; the log-sum-exp a
//! decoding step takes its log-probability from; the MLP's `SiLU(gate) · up` in one pass.

use rayon::prelude::*;

/// Lanes of the fixed loops (element `k` of a row always goes to lane `k mod 16`).
const LANES: usize = 16;

/// Elements per parallel work item of [`silu_mul`] (below it, one thread).
const PARALLEL_CHUNK: usize = 1 << 16;

/// Runs `$body` in the copy of `$any` compiled for the widest vectors this CPU has.
macro_rules! dispatch {
    ($any:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $any($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) -> $ret {
            $any($($arg),*)
        }
    };
}

/// Which copy runs: 2 = AVX-512, 1 = AVX2 + FMA, 0 = portable.
fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 2;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return 1;
        }
    }
    0
}

/// `ln Σ e^x` of a row of logits (−∞ for an empty or all −∞ row), by the fixed [`exp`] and
/// 16-lane sums reduced by a fixed tree. A decoding step needs only the chosen token's
/// log-probability, `x[token] − log_sum_exp(x)`: one pass over the vocabulary instead of a whole
/// log-softmax.
pub(crate) fn log_sum_exp(x: &[f32]) -> f32 {
    dispatch!(log_sum_exp_any, lse_avx512, lse_avx2, (x: &[f32]) -> f32);
    match level() {
        // SAFETY: the CPU has the features of the copy `level` chose.
        #[cfg(target_arch = "x86_64")]
        2 => unsafe { lse_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        1 => unsafe { lse_avx2(x) },
        _ => log_sum_exp_any(x),
    }
}

#[inline(always)]
fn log_sum_exp_any(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(chunk[l]);
        }
    }
    for (l, v) in chunks.remainder().iter().enumerate() {
        lanes[l] = lanes[l].max(*v);
    }
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let mut sums = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            // `exp` clamps below −87 (−∞ included) to about 1e-38: nothing next to e^0 = 1.
            sums[l] += exp(chunk[l] - max);
        }
    }
    for (l, v) in chunks.remainder().iter().enumerate() {
        sums[l] += exp(*v - max);
    }
    max + tree_sum(sums).ln()
}

/// The 16 lanes summed by a fixed tree.
#[inline(always)]
pub(crate) fn tree_sum(mut sums: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            sums[l] += sums[l + w];
        }
        w /= 2;
    }
    sums[0]
}

/// `SiLU(g) · u` element by element (the MLP's gate times its up projection): one pass and one
/// allocation where the tensor library took three passes and two allocations. `SiLU(x) =
/// x / (1 + e^−x)` with the C library's `expf`, exactly as candle computes it, so that greedy
/// answers stay the same bits as before this fusion (the fixed-polynomial [`exp`] here was
/// measured too: no faster end to end, and it moved 26 of 62 greedy `val` answers). Long inputs
/// are split across the pool's threads in fixed chunks; every element is computed by the same
/// operations whatever the split.
pub(crate) fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "silu_mul: gate and up differ in length");
    let mut out = vec![0f32; g.len()];
    if g.len() <= PARALLEL_CHUNK {
        silu_mul_into(g, u, &mut out);
    } else {
        out.par_chunks_mut(PARALLEL_CHUNK)
            .zip(
                g.par_chunks(PARALLEL_CHUNK)
                    .zip(u.par_chunks(PARALLEL_CHUNK)),
            )
            .for_each(|(o, (g, u))| silu_mul_into(g, u, o));
    }
    out
}

fn silu_mul_into(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
        *o = silu(*g) * u;
    }
}

/// `x / (1 + e^−x)`, candle's arithmetic.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `e^x` for `x ≤ 0` (softmax arguments): `2^n · e^r` with `r = x − n·ln 2` in
/// `[−ln 2/2, ln 2/2]` and Cephes' degree-5 polynomial (relative error ≈ 2e-7); about 1e-38
/// below −87 (−∞ included). Plain arithmetic and bit operations only, so it vectorises and gives
/// the same bits in every copy.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut y = 1.987_569_1e-4f32;
    y = y.mul_add(r, 1.398_199_9e-3);
    y = y.mul_add(r, 8.333_452e-3);
    y = y.mul_add(r, 4.166_579_6e-2);
    y = y.mul_add(r, 1.666_666_5e-1);
    y = y.mul_add(r, 0.5);
    let y = y.mul_add(r * r, r) + 1.0;
    y * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// Deterministic pseudo-random values in [-1, 1), for this crate's kernel tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::test_values as values;
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn log_sum_exp_matches_f64_and_takes_masked_rows() {
        for n in [1usize, 15, 16, 17, 151_936] {
            let x: Vec<f32> = values(n, 12).iter().map(|v| v * 30.0).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&x) as f64;
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{n}: {got} vs {want}"
            );
            assert_eq!(log_sum_exp(&x).to_bits(), log_sum_exp_any(&x).to_bits());
        }
        // A constrained step: all but a few tokens masked to −∞.
        let mut x = vec![f32::NEG_INFINITY; 1000];
        x[3] = 2.0;
        x[700] = 2.0;
        assert!((log_sum_exp(&x) - (2.0 + 2f32.ln())).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 5]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn silu_mul_is_candles_silu_times_up_whatever_the_split() {
        use candle_core::{Device, Tensor};
        // Gate values as large as the models' (|x| up to ~100).
        let n = 3 * PARALLEL_CHUNK + 77;
        let g: Vec<f32> = values(n, 13).iter().map(|v| v * 100.0).collect();
        let u = values(n, 14);
        let got = silu_mul(&g, &u);
        let (gt, ut) = (
            Tensor::from_slice(&g, n, &Device::Cpu).unwrap(),
            Tensor::from_slice(&u, n, &Device::Cpu).unwrap(),
        );
        let want = (candle_nn::ops::silu(&gt).unwrap() * ut)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut one = vec![0f32; n];
        silu_mul_into(&g, &u, &mut one);
        assert!(got
            .iter()
            .zip(&one)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
