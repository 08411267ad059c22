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
/// x / (1 + e^−x)` exactly as candle computes it, with the C library's `expf`, so that greedy
/// answers keep their bits. On x86-64 glibc with FMA, `e^−x` is computed 16 (AVX-512) or 8
/// (AVX2) lanes at a time by [`glibc_expf`]'s vector copies, the same operations as glibc's own
/// FMA `expf` and so the same bits (tested on all 2^32 inputs); elsewhere, and for lanes outside
/// glibc's fast path (|x| ≥ 88, NaN), the C library is called per element. (A fixed polynomial
/// was measured too: it moved 26 of 62 greedy `val` answers.) Long inputs are split across the
/// pool's threads in fixed chunks; every element is computed by the same operations whatever the
/// split.
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
    match glibc_expf::level() {
        // SAFETY: `level` checked the CPU features of each copy.
        #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
        2 => unsafe { glibc_expf::silu_mul_avx512(g, u, out) },
        #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
        1 => unsafe { glibc_expf::silu_mul_avx2(g, u, out) },
        _ => silu_mul_scalar(g, u, out),
    }
}

fn silu_mul_scalar(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
        *o = silu(*g) * u;
    }
}

/// `x / (1 + e^−x)`, candle's arithmetic.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// glibc's `expf` (since 2.27, from ARM's optimized-routines) in vectors: `e^x = 2^(k/32) ·
/// 2^(r/32)` with `k` rounded from `x · 32/ln 2` by adding 1.5 · 2^52, `2^(k/32)` from a
/// 32-entry table with `k/32` added to its exponent, `2^(r/32)` by a degree-3 polynomial, all in
/// f64, rounded once to f32. The constants and the order of operations are those of the copy
/// glibc's `ifunc` picks on CPUs with FMA and AVX2 (`__expf_fma`: `k` by one multiply-add, `r`
/// by one multiply-subtract, the polynomial by three multiply-adds), which is the copy
/// `f32::exp` calls wherever these vector copies run. Lanes outside its fast path (|x| ≥ 88,
/// NaN) are handed back to `f32::exp`.
mod glibc_expf {
    /// Which vector copy this CPU and C library take: 2 = AVX-512, 1 = AVX2, 0 = none (call
    /// `f32::exp` per element).
    pub(super) fn level() -> u8 {
        #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
        {
            use std::sync::OnceLock;
            static LEVEL: OnceLock<u8> = OnceLock::new();
            *LEVEL.get_or_init(|| {
                let fma = std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("avx2");
                if !fma || !crate::switches().vector_expf {
                    0
                } else if std::arch::is_x86_feature_detected!("avx512f") {
                    2
                } else {
                    1
                }
            })
        }
        #[cfg(not(all(target_arch = "x86_64", target_env = "gnu")))]
        {
            0
        }
    }

    /// `uint(2^(i/32)) − (i << 47)`: adding `k << 47` gives `2^(k/32)`'s bits.
    #[cfg_attr(not(all(target_arch = "x86_64", target_env = "gnu")), allow(dead_code))]
    pub(super) const TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// 32 / ln 2.
    const INV_LN2_N: u64 = 0x40471547652b82fe;
    /// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: u64 = 0x4338000000000000;
    /// The polynomial `C0·r³ + C1·r² + C2·r + 1` for `2^(r/32)`.
    const C0: u64 = 0x3ebc6af84b912394;
    const C1: u64 = 0x3f2ebfce50fac4f3;
    const C2: u64 = 0x3f962e42ff0c52d6;
    /// `|x| ≥ 88` (or NaN) when the top 12 bits of `|x|` reach this: glibc's slow path.
    const SLOW_TOP12: u32 = 0x42b;

    /// Whether glibc takes its fast path for `x`.
    #[cfg(test)]
    fn fast(x: f32) -> bool {
        (x.to_bits() >> 20) & 0x7ff < SLOW_TOP12
    }

    /// The fast path in scalar f64 with the FMA copy's fused operations: the reference the
    /// tests hold both vector copies and `f32::exp` to.
    #[cfg(test)]
    pub(super) fn scalar(x: f32) -> f32 {
        if !fast(x) {
            return x.exp();
        }
        let f = f64::from_bits;
        let xd = x as f64;
        let kd = f(INV_LN2_N).mul_add(xd, f(SHIFT));
        let ki = kd.to_bits();
        let kd = kd - f(SHIFT);
        let r = f(INV_LN2_N).mul_add(xd, -kd);
        let s = f(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
        let z = f(C0).mul_add(r, f(C1));
        let r2 = r * r;
        let y = r.mul_add(f(C2), 1.0);
        let y = z.mul_add(r2, y);
        (y * s) as f32
    }

    #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
    pub(super) use x86::*;

    #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
    mod x86 {
        use super::*;
        use std::arch::x86_64::*;

        /// `e^x` of 8 lanes: lanes outside the fast path hold garbage (see `fast`).
        #[target_feature(enable = "avx2,fma")]
        fn exp4x2_avx2(x: __m256) -> __m256 {
            let lo = exp4_avx2(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            let hi = exp4_avx2(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
            _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1)
        }

        #[target_feature(enable = "avx2,fma")]
        fn exp4_avx2(xd: __m256d) -> __m128 {
            let f = |b: u64| _mm256_set1_pd(f64::from_bits(b));
            let kd = _mm256_fmadd_pd(f(INV_LN2_N), xd, f(SHIFT));
            let ki = _mm256_castpd_si256(kd);
            let kd = _mm256_sub_pd(kd, f(SHIFT));
            let r = _mm256_fmsub_pd(f(INV_LN2_N), xd, kd);
            let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
            // SAFETY: every index is in 0..32, the table's length.
            let t = unsafe { _mm256_i64gather_epi64::<8>(TABLE.as_ptr().cast(), idx) };
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let z = _mm256_fmadd_pd(f(C0), r, f(C1));
            let r2 = _mm256_mul_pd(r, r);
            let y = _mm256_fmadd_pd(r, f(C2), _mm256_set1_pd(1.0));
            let y = _mm256_fmadd_pd(z, r2, y);
            _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
        }

        /// `e^x` of 16 lanes: lanes outside the fast path hold garbage (see `fast`).
        #[target_feature(enable = "avx512f,fma")]
        fn exp8x2_avx512(x: __m512) -> __m512 {
            let xd = _mm512_castps_pd(x);
            let lo = exp8_avx512(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
            let hi = exp8_avx512(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                xd, 1,
            ))));
            _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
                1,
            ))
        }

        #[target_feature(enable = "avx512f,fma")]
        fn exp8_avx512(xd: __m512d) -> __m256 {
            let f = |b: u64| _mm512_set1_pd(f64::from_bits(b));
            let kd = _mm512_fmadd_pd(f(INV_LN2_N), xd, f(SHIFT));
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, f(SHIFT));
            let r = _mm512_fmsub_pd(f(INV_LN2_N), xd, kd);
            // SAFETY: each load reads 8 entries starting at 0, 8, 16 or 24 of the 32.
            let table = |i: usize| unsafe { _mm512_loadu_si512(TABLE[i..i + 8].as_ptr().cast()) };
            // Entries 0–15 and 16–31 by bits 0–3 of k, then one of them by bit 4.
            let low = _mm512_permutex2var_epi64(table(0), ki, table(8));
            let high = _mm512_permutex2var_epi64(table(16), ki, table(24));
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_mask_blend_epi64(upper, low, high);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(f(C0), r, f(C1));
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, f(C2), _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
        }

        /// [`super::super::silu_mul_scalar`], 16 lanes at a time.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(in crate::vector) fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
            let n = g.len().min(u.len()).min(out.len());
            let whole = n / 16 * 16;
            let sign = _mm512_set1_epi32(i32::MIN);
            for i in (0..whole).step_by(16) {
                // SAFETY: i + 16 ≤ n, the length of all three slices.
                let (gv, uv) = unsafe {
                    (
                        _mm512_loadu_ps(g.as_ptr().add(i)),
                        _mm512_loadu_ps(u.as_ptr().add(i)),
                    )
                };
                let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv), sign));
                let mut e = exp8x2_avx512(x);
                let top = _mm512_and_si512(
                    _mm512_srli_epi32::<20>(_mm512_castps_si512(x)),
                    _mm512_set1_epi32(0x7ff),
                );
                let slow = _mm512_cmpge_epi32_mask(top, _mm512_set1_epi32(SLOW_TOP12 as i32));
                if slow != 0 {
                    let (mut ev, mut xv) = ([0f32; 16], [0f32; 16]);
                    // SAFETY: both arrays hold 16 floats.
                    unsafe {
                        _mm512_storeu_ps(ev.as_mut_ptr(), e);
                        _mm512_storeu_ps(xv.as_mut_ptr(), x);
                        patch(&mut ev, &xv, slow as u32);
                        e = _mm512_loadu_ps(ev.as_ptr());
                    }
                }
                let s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, uv)) };
            }
            super::super::silu_mul_scalar(&g[whole..n], &u[whole..n], &mut out[whole..n]);
        }

        /// [`super::super::silu_mul_scalar`], 8 lanes at a time.
        #[target_feature(enable = "avx2,fma")]
        pub(in crate::vector) fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) {
            let n = g.len().min(u.len()).min(out.len());
            let whole = n / 8 * 8;
            let sign = _mm256_set1_ps(-0.0);
            for i in (0..whole).step_by(8) {
                // SAFETY: i + 8 ≤ n, the length of all three slices.
                let (gv, uv) = unsafe {
                    (
                        _mm256_loadu_ps(g.as_ptr().add(i)),
                        _mm256_loadu_ps(u.as_ptr().add(i)),
                    )
                };
                let x = _mm256_xor_ps(gv, sign);
                let mut e = exp4x2_avx2(x);
                let top = _mm256_and_si256(
                    _mm256_srli_epi32::<20>(_mm256_castps_si256(x)),
                    _mm256_set1_epi32(0x7ff),
                );
                let slow = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
                    top,
                    _mm256_set1_epi32(SLOW_TOP12 as i32 - 1),
                )));
                if slow != 0 {
                    let (mut ev, mut xv) = ([0f32; 8], [0f32; 8]);
                    // SAFETY: both arrays hold 8 floats.
                    unsafe {
                        _mm256_storeu_ps(ev.as_mut_ptr(), e);
                        _mm256_storeu_ps(xv.as_mut_ptr(), x);
                        patch(&mut ev, &xv, slow as u32);
                        e = _mm256_loadu_ps(ev.as_ptr());
                    }
                }
                let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, uv)) };
            }
            super::super::silu_mul_scalar(&g[whole..n], &u[whole..n], &mut out[whole..n]);
        }

        /// The lanes of `e` whose bit is set in `slow`, recomputed from `x` by `f32::exp`.
        #[inline(always)]
        fn patch(e: &mut [f32], x: &[f32], slow: u32) {
            for (l, (e, x)) in e.iter_mut().zip(x).enumerate() {
                if slow & (1 << l) != 0 {
                    *e = x.exp();
                }
            }
        }

        /// `f32::exp` of every element by a vector copy (2 = AVX-512, 1 = AVX2; tests only).
        ///
        /// # Safety
        /// The CPU has the copy's features and FMA.
        #[cfg(test)]
        pub(in crate::vector) unsafe fn exp_slice(level: u8, x: &[f32], out: &mut [f32]) {
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512(x: &[f32], out: &mut [f32]) {
                for (x, o) in x.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                    // SAFETY: both chunks hold 16 floats.
                    unsafe {
                        let v = _mm512_loadu_ps(x.as_ptr());
                        _mm512_storeu_ps(o.as_mut_ptr(), exp8x2_avx512(v));
                    }
                }
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2(x: &[f32], out: &mut [f32]) {
                for (x, o) in x.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                    // SAFETY: both chunks hold 8 floats.
                    unsafe {
                        let v = _mm256_loadu_ps(x.as_ptr());
                        _mm256_storeu_ps(o.as_mut_ptr(), exp4x2_avx2(v));
                    }
                }
            }
            // SAFETY: the caller checked the features.
            unsafe {
                if level == 2 {
                    avx512(x, out)
                } else {
                    avx2(x, out)
                }
            }
            for (x, o) in x.iter().zip(out.iter_mut()) {
                if !fast(*x) {
                    *o = x.exp();
                }
            }
        }
    }
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

    /// Every f32 bit pattern, through the vector copies of glibc's `expf` (and the scalar
    /// reference of their arithmetic), against `f32::exp`: the same bits, NaNs aside (any NaN).
    #[test]
    #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
    fn glibc_expf_in_vectors_equals_the_c_library_on_all_2_pow_32_inputs() {
        if !(std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx2"))
        {
            eprintln!("skipped: glibc's FMA expf is not the one this CPU runs");
            return;
        }
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        const BLOCK: u64 = 1 << 20;
        let mismatches: u64 = (0..(1u64 << 32) / BLOCK)
            .into_par_iter()
            .map(|b| {
                let x: Vec<f32> = (b * BLOCK..(b + 1) * BLOCK)
                    .map(|i| f32::from_bits(i as u32))
                    .collect();
                let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
                let same =
                    |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                let mut bad = 0u64;
                let mut got = vec![0f32; x.len()];
                let mut copies = vec![1u8];
                if avx512 {
                    copies.push(2);
                }
                for level in copies {
                    // SAFETY: the CPU has the copy's features (checked above).
                    unsafe { glibc_expf::exp_slice(level, &x, &mut got) };
                    bad += x
                        .iter()
                        .zip(got.iter().zip(&want))
                        .filter(|(_, (g, w))| !same(**g, **w))
                        .count() as u64;
                }
                // The scalar reference on a sample (it is slow without vectors).
                bad += x
                    .iter()
                    .step_by(61)
                    .zip(want.iter().step_by(61))
                    .filter(|(x, w)| !same(glibc_expf::scalar(**x), **w))
                    .count() as u64;
                bad
            })
            .sum();
        assert_eq!(
            mismatches, 0,
            "inputs whose e^x differs from the C library's"
        );
    }

    #[test]
    fn silu_mul_takes_every_copy_and_the_slow_lanes_alike() {
        // Values around glibc's fast-path edge (|x| = 88), infinities, NaN, zeros, tiny values,
        // at every offset of a 16- and 8-lane block.
        let specials = [
            0.0f32,
            -0.0,
            87.99999,
            88.0,
            -88.0,
            -87.99999,
            103.9,
            -103.9,
            1e-30,
            -1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::from_bits(1),
        ];
        let mut g = values(301, 5);
        for (i, s) in specials.iter().enumerate() {
            g[i * 17 % 301] = *s;
            g[(i * 29 + 3) % 301] = *s;
        }
        let u = values(301, 6);
        let mut want = vec![0f32; g.len()];
        silu_mul_scalar(&g, &u, &mut want);
        let got = silu_mul(&g, &u);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "element {i}: g = {}, {a} vs {b}",
                g[i]
            );
        }
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
        silu_mul_scalar(&g, &u, &mut one);
        assert!(got
            .iter()
            .zip(&one)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
