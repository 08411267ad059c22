//! A Q8_0 matrix multiply that reads each weight block once for several activation rows.
//!
//! candle's CPU kernel for Q8_0 weights runs one dot product per (row, output) pair, so `m` rows
//! cost `m` passes over the weights (batched decoding gained ≤ 1.3× at 16 sequences), and its
//! tiled AVX512-VNNI path needs the inner dimension to be a multiple of 256 (Qwen 0.5B's 896 and
//! SmolLM2's 576 are not). This kernel packs the weights in tiles of 16 output rows × 32 inputs,
//! stored offset by +128 as unsigned bytes, so that one `vpdpbusd` multiplies 16 outputs by 4
//! inputs for each activation row; the integer sums are exact, and each output is
//! `Σ_blocks (isum − 128·Σx) · d_w · d_x` accumulated in block order — the same operations for
//! a row whatever other rows are in the batch, so a sequence decodes to the same logits alone or
//! batched.
//!
//! Activations are quantised exactly as ggml/candle quantise Q8_0 (blocks of 32, `d = amax/127`
//! rounded to f16, `q = round(x/d)`), so results agree with candle's kernel up to the order of
//! float additions. Runs where the CPU has AVX512-VNNI (checked at run time); elsewhere
//! [`PackedQ8::available`] is false and callers keep candle's kernel.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Outputs per tile.
const TILE_N: usize = 16;
/// Inputs per block.
const QK: usize = 32;
/// Activation rows held in registers by the GEMM kernel.
const GEMM_R: usize = 4;
/// Output tiles held in registers by the GEMM kernel.
const GEMM_T: usize = 3;
/// Rows per work item handed to a thread (a multiple of [`GEMM_R`]).
const ROW_CHUNK: usize = 64;

/// One tile: 16 output rows × 32 inputs. `qs` is laid out `[group of 4 inputs][row][4 bytes]`,
/// each byte the weight + 128.
#[repr(C, align(64))]
#[derive(Clone)]
struct Tile {
    qs: [u8; QK * TILE_N],
    d: [f32; TILE_N],
}

/// A Q8_0 weight matrix (`n` outputs × `k` inputs) packed for [`PackedQ8::matmul`].
pub struct PackedQ8 {
    n: usize,
    k: usize,
    /// `tiles[t * kb + b]`: output tile `t`, input block `b`.
    tiles: Vec<Tile>,
}

/// Activations quantised per 32-block: values, scales and the sum of each block's values.
pub struct Quantised {
    m: usize,
    kb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            crate::switches().q8_kernel
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedQ8 {
    /// Packs a Q8_0 tensor of shape (n, k); `None` for another type, a shape the tiles do not
    /// cover (`n` not a multiple of 16, `k` not of 32), or a CPU without the kernel.
    pub fn from_qtensor(qt: &QTensor) -> Option<Self> {
        if !available() || qt.dtype() != GgmlDType::Q8_0 {
            return None;
        }
        let dims = qt.shape().dims();
        let &[n, k] = dims else { return None };
        if !n.is_multiple_of(TILE_N) || !k.is_multiple_of(QK) || n == 0 || k == 0 {
            return None;
        }
        let bytes = qt.data().ok()?;
        let kb = k / QK;
        const BLOCK: usize = 2 + QK;
        if bytes.len() != n * kb * BLOCK {
            return None;
        }
        let mut tiles = Vec::with_capacity(n / TILE_N * kb);
        for t in 0..n / TILE_N {
            for b in 0..kb {
                let mut tile = Tile {
                    qs: [0; QK * TILE_N],
                    d: [0.0; TILE_N],
                };
                for r in 0..TILE_N {
                    let off = ((t * TILE_N + r) * kb + b) * BLOCK;
                    let blk = &bytes[off..off + BLOCK];
                    tile.d[r] = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for g in 0..QK / 4 {
                        for j in 0..4 {
                            let w = blk[2 + g * 4 + j] as i8;
                            tile.qs[(g * TILE_N + r) * 4 + j] = (w as i16 + 128) as u8;
                        }
                    }
                }
                tiles.push(tile);
            }
        }
        Some(PackedQ8 { n, k, tiles })
    }

    /// Outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Multiply-adds of an `m`-row product with this matrix (`m · n · k`, for throughput figures).
    pub fn macs(&self, m: usize) -> usize {
        m * self.n * self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<Tile>()
    }

    /// `x` (m rows of k, row-major) times the transposed weights: m rows of n.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let q = quantise(x, m, self.k);
        self.matmul_quantised(&q)
    }

    /// The same from activations already quantised (several matrices sharing one input).
    ///
    /// The work is split into items of (up to [`ROW_CHUNK`] rows) × (a group of [`GEMM_T`]
    /// output tiles), taken from a shared cursor by the pool's threads; inside an item the
    /// register-blocked kernel holds [`GEMM_R`] rows × [`GEMM_T`] tiles of accumulators across the
    /// whole inner dimension. Each output is computed by the same operations in the same order
    /// whatever the split, so a row's result does not depend on the rows batched with it.
    pub fn matmul_quantised(&self, q: &Quantised) -> Vec<f32> {
        assert_eq!(q.kb * QK, self.k, "activation width");
        let (m, n) = (q.m, self.n);
        // Not zeroed first: every element is written below (`n` is a whole number of tiles).
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let groups = (n / TILE_N).div_ceil(GEMM_T);
        let chunks = m.div_ceil(ROW_CHUNK);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = |items: std::ops::Range<usize>| {
            let p = &out_ptr;
            for item in items {
                let (chunk, group) = (item / groups, item % groups);
                let rows = chunk * ROW_CHUNK..((chunk + 1) * ROW_CHUNK).min(m);
                // SAFETY: each item writes its own rows × tiles of `out`.
                unsafe { self.block(q, rows, group * GEMM_T, p.0) };
            }
        };
        // Small products run inline: waking the pool costs more than the work.
        if m * self.k * n < 1 << 18 {
            work(0..groups * chunks);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(groups * chunks, work);
        }
        // SAFETY: the items covered rows 0..m × tiles 0..n/16, every float of the capacity.
        unsafe { out.set_len(m * n) };
        out
    }

    /// Rows `rows` of output tiles `t0..t0 + GEMM_T` (fewer at the right edge).
    ///
    /// # Safety
    /// `out` points to `m × n` floats; no other thread writes these rows of these tiles.
    unsafe fn block(&self, q: &Quantised, rows: std::ops::Range<usize>, t0: usize, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        {
            let kb = self.k / QK;
            let tc = (self.n / TILE_N - t0).min(GEMM_T);
            let tiles = self.tiles[t0 * kb..].as_ptr();
            let mut r0 = rows.start;
            while r0 < rows.end {
                let mc = (rows.end - r0).min(GEMM_R);
                // SAFETY: checked by `available()` when packing; `out` per the contract.
                unsafe { kernel::dispatch(mc, tc, tiles, q, r0, out, self.n, t0 * TILE_N) };
                r0 += mc;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (q, rows, t0, out);
            unreachable!("PackedQ8 is only built where the kernel runs");
        }
    }
}

/// Multiply-adds per second one thread of this CPU does with `vpdpbusd` alone: 16 independent
/// accumulators (enough to hide its latency) of 64 int8 products each, `iters` rounds, no memory
/// traffic. The int8 compute ceiling the packed kernel is measured against; `None` without
/// AVX512-VNNI.
pub fn vnni_peak_macs_per_s(iters: usize) -> Option<f64> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let t = std::time::Instant::now();
        // SAFETY: `available()` checked the CPU features.
        let sink = unsafe { kernel::peak(iters) };
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        Some((iters * 16 * 64) as f64 / secs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only written at disjoint positions (each task its own rows × tiles, or
// its own blocks).
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// Quantises `m` rows of `k` values (k a multiple of 32) as ggml's Q8_0 does: per block of 32,
/// `d = amax / 127` (stored rounded to f16), `q = round(x / d)` (half away from zero, with the
/// unrounded `1/d`). Long inputs are split across the pool's threads; with AVX512 each block is
/// two vectors. Every path gives the same bytes.
pub fn quantise(x: &[f32], m: usize, k: usize) -> Quantised {
    assert!(
        k.is_multiple_of(QK) && x.len() == m * k,
        "quantise: {m}×{k} from {}",
        x.len()
    );
    let kb = k / QK;
    let mut qs = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    let mut sums = vec![0i32; m * kb];
    let blocks = m * kb;
    let ptrs = (
        SendPtr(qs.as_mut_ptr()),
        SendPtr(d.as_mut_ptr()),
        SendPtr(sums.as_mut_ptr()),
    );
    let work = |range: std::ops::Range<usize>| {
        let ptrs = &ptrs;
        let (q, dp, sp) = (ptrs.0 .0, ptrs.1 .0, ptrs.2 .0);
        for i in range {
            let xs = &x[i * QK..(i + 1) * QK];
            // SAFETY: block `i` of each output is written by this task alone.
            unsafe {
                let qb = std::slice::from_raw_parts_mut(q.add(i * QK), QK);
                let (di, s) = quantise_block(xs, qb);
                *dp.add(i) = di;
                *sp.add(i) = s;
            }
        }
    };
    if blocks < 4096 {
        work(0..blocks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(blocks, work);
    }
    Quantised { m, kb, qs, d, sums }
}

/// One block: writes its 32 values, returns (scale as f16 → f32, sum of the values).
fn quantise_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` checked AVX512F/BW; both slices hold 32 elements.
        return unsafe { kernel::quantise_block(xs, q) };
    }
    quantise_block_scalar(xs, q)
}

/// [`quantise_block`] without vectors: ggml's reference code.
fn quantise_block_scalar(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let di = amax / 127.0;
    let id = if di != 0.0 { 1.0 / di } else { 0.0 };
    let mut s = 0i32;
    for (o, &v) in q.iter_mut().zip(xs) {
        *o = (v * id).round() as i8;
        s += *o as i32;
    }
    (f16::from_f32(di).to_f32(), s)
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Quantised, Tile, QK, TILE_N};
    use core::arch::x86_64::*;

    /// Rows `r0..r0+R` against output tiles `t0..t0+T` (`tiles` points to tile `t0`, block 0;
    /// tile `t0 + t` starts `t·kb` tiles later), every input block, with the `R × T` sums held in
    /// registers across the whole inner dimension.
    ///
    /// Per output and block: the exact int32 sum `Σ (w+128)·x − 128·Σx` (the correction seeds
    /// the accumulator, `vpdpbusd` adds 4 products per lane), then `acc = fma(isum, d_w·d_x, acc)`
    /// in block order — the arithmetic of the one-row kernel, so results are bit-identical to it.
    ///
    /// # Safety
    /// AVX512F/BW/VNNI present; `tiles` valid for `T` tiles of `kb` blocks; `out` points to
    /// `m × n` floats and no other thread writes these rows of columns `col..col + 16T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm<const R: usize, const T: usize>(
        tiles: *const Tile,
        q: &Quantised,
        r0: usize,
        out: *mut f32,
        n: usize,
        col: usize,
    ) {
        unsafe {
            let kb = q.kb;
            let k = kb * QK;
            let xq = q.qs.as_ptr().add(r0 * k);
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            for b in 0..kb {
                let mut s = [[_mm512_setzero_si512(); T]; R];
                for r in 0..R {
                    let c = _mm512_set1_epi32(-128 * *q.sums.get_unchecked((r0 + r) * kb + b));
                    for t in 0..T {
                        s[r][t] = c;
                    }
                }
                for g in 0..QK / 4 {
                    let mut w = [_mm512_setzero_si512(); T];
                    for t in 0..T {
                        let tile = &*tiles.add(t * kb + b);
                        w[t] = _mm512_load_si512(tile.qs.as_ptr().add(64 * g) as *const _);
                    }
                    for r in 0..R {
                        let x = _mm512_set1_epi32(std::ptr::read_unaligned(
                            xq.add(r * k + b * QK + 4 * g) as *const i32,
                        ));
                        for t in 0..T {
                            s[r][t] = _mm512_dpbusd_epi32(s[r][t], w[t], x);
                        }
                    }
                }
                let mut dw = [_mm512_setzero_ps(); T];
                for t in 0..T {
                    dw[t] = _mm512_load_ps((*tiles.add(t * kb + b)).d.as_ptr());
                }
                for r in 0..R {
                    let dx = _mm512_set1_ps(*q.d.get_unchecked((r0 + r) * kb + b));
                    for t in 0..T {
                        let scale = _mm512_mul_ps(dw[t], dx);
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][t]), scale, acc[r][t]);
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    _mm512_storeu_ps(out.add((r0 + r) * n + col + t * TILE_N), acc[r][t]);
                }
            }
        }
    }

    /// [`super::quantise_block`] in two vectors: the same amax, scale, products and rounding
    /// (half away from zero as `trunc(v + copysign(0.5 − ½ulp, v))`, which is exact), so the same
    /// bytes as the scalar code.
    ///
    /// # Safety
    /// AVX512F/BW present; `xs` and `q` hold 32 elements.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantise_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
        unsafe {
            let a = _mm512_loadu_ps(xs.as_ptr());
            let b = _mm512_loadu_ps(xs.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            let di = amax / 127.0;
            let id = if di != 0.0 { 1.0 / di } else { 0.0 };
            let idv = _mm512_set1_ps(id);
            let half = _mm512_set1_ps(0.499_999_97);
            let sign = _mm512_set1_epi32(i32::MIN);
            let round = |v: __m512| {
                // (An integer `or`: the float one needs AVX512DQ, and was a call per block.)
                let h = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(half),
                    _mm512_and_si512(_mm512_castps_si512(v), sign),
                ));
                _mm512_cvttps_epi32(_mm512_add_ps(v, h))
            };
            let qa = round(_mm512_mul_ps(a, idv));
            let qb = round(_mm512_mul_ps(b, idv));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(
                q.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(qb),
            );
            let s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            (half::f16::from_f32(di).to_f32(), s)
        }
    }

    /// `iters` rounds of 16 independent `vpdpbusd`s (see [`super::vnni_peak_macs_per_s`]).
    ///
    /// # Safety
    /// AVX512F/BW/VNNI present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn peak(iters: usize) -> i32 {
        let w = _mm512_set1_epi8(3);
        let x = _mm512_set1_epi8(-2);
        let mut acc = [_mm512_setzero_si512(); 16];
        for i in 0..iters {
            let x = _mm512_add_epi32(x, _mm512_set1_epi32(std::hint::black_box(i as i32) & 1));
            for a in acc.iter_mut() {
                *a = _mm512_dpbusd_epi32(*a, w, x);
            }
        }
        let mut s = _mm512_setzero_si512();
        for a in acc {
            s = _mm512_add_epi32(s, a);
        }
        _mm512_reduce_add_epi32(s)
    }

    /// [`gemm`] for `mc ≤ GEMM_R` rows and `tc ≤ GEMM_T` tiles.
    ///
    /// # Safety
    /// As [`gemm`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dispatch(
        mc: usize,
        tc: usize,
        tiles: *const Tile,
        q: &Quantised,
        r0: usize,
        out: *mut f32,
        n: usize,
        col: usize,
    ) {
        macro_rules! tiles {
            ($r:literal) => {
                match tc {
                    1 => gemm::<$r, 1>(tiles, q, r0, out, n, col),
                    2 => gemm::<$r, 2>(tiles, q, r0, out, n, col),
                    3 => gemm::<$r, 3>(tiles, q, r0, out, n, col),
                    _ => unreachable!("at most GEMM_T tiles"),
                }
            };
        }
        // SAFETY: per the contract.
        unsafe {
            match mc {
                1 => tiles!(1),
                2 => tiles!(2),
                3 => tiles!(3),
                4 => tiles!(4),
                _ => unreachable!("at most GEMM_R rows"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    fn reference(w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = w.shape().dims2().unwrap();
        // Exact reference: dequantised weights times dequantised Q8_0 activations, in f64.
        let wd: Vec<f32> = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let q = quantise(x, m, k);
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    s += wd[c * k + i] as f64
                        * q.qs[r * k + i] as f64
                        * q.d[r * (k / QK) + i / QK] as f64;
                }
                out[r * n + c] = s as f32;
            }
        }
        out
    }

    /// The kernel's arithmetic written out per output: the exact int32 sum of each Q8_0 block,
    /// then `acc = fma(isum, d_w·d_x, acc)` in block order.
    fn scalar(qt: &QTensor, q: &Quantised) -> Vec<f32> {
        let (n, k) = qt.shape().dims2().unwrap();
        let kb = k / QK;
        let bytes = qt.data().unwrap();
        let mut out = vec![0f32; q.m * n];
        for r in 0..q.m {
            for c in 0..n {
                let mut acc = 0f32;
                for b in 0..kb {
                    let blk = &bytes[(c * kb + b) * 34..][..34];
                    let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let isum: i32 = (0..QK)
                        .map(|i| blk[2 + i] as i8 as i32 * q.qs[r * k + b * QK + i] as i32)
                        .sum();
                    acc = (isum as f32).mul_add(dw * q.d[r * kb + b], acc);
                }
                out[r * n + c] = acc;
            }
        }
        out
    }

    #[test]
    fn vector_quantisation_gives_the_scalar_bytes() {
        // Values at and around the rounding ties, zeros, and a wide range of magnitudes.
        let mut x: Vec<f32> = (0..32 * 64)
            .map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 7 - 3))
            .collect();
        x[..32].fill(0.0);
        for (j, v) in x[32..64].iter_mut().enumerate() {
            *v = (j as f32 - 16.0) + 0.5; // exact .5 ties after scaling by 127/amax = 127/15.5
        }
        let mut qv = vec![0i8; 32];
        let mut qs = vec![0i8; 32];
        for xs in x.chunks_exact(32) {
            let v = quantise_block(xs, &mut qv);
            assert_eq!(v, quantise_block_scalar(xs, &mut qs));
            assert_eq!(qv, qs);
        }
    }

    #[test]
    fn bit_identical_to_the_scalar_reference_at_odd_and_model_shapes() {
        if !available() {
            eprintln!("no AVX512-VNNI here: the kernel is not used");
            return;
        }
        // Odd row counts (register blocks, work items and their tails) on widths whose tile
        // count is not a multiple of the kernel's tile group; then Qwen 0.5B's projections.
        let odd = [1usize, 7, 8, 9, 63, 512, 1300];
        let mut cases: Vec<(usize, usize, usize)> = Vec::new();
        for (n, k) in [(16usize, 32usize), (80, 96), (64, 576)] {
            cases.extend(odd.iter().map(|&m| (m, n, k)));
        }
        for (n, k) in [(128usize, 896usize), (896, 896), (4864, 896), (896, 4864)] {
            cases.extend([1usize, 9, 70].map(|m| (m, n, k)));
        }
        for (m, n, k) in cases {
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let p = PackedQ8::from_qtensor(&qt).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let q = quantise(&xs, m, k);
            let ours = p.matmul_quantised(&q);
            let want = scalar(&qt, &q);
            for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{m}x{k}→{n}: output {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn agrees_with_candle_and_with_exact_arithmetic_for_every_row_count() {
        if !available() {
            eprintln!("no AVX512-VNNI here: the kernel is not used");
            return;
        }
        let (n, k) = (48, 96);
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let p = PackedQ8::from_qtensor(&qt).unwrap();
        let qm = candle_core::quantized::QMatMul::from_qtensor(qt).unwrap();
        let qt2 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        for m in [1usize, 3, 8, 11] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ours = p.matmul(&xs, m);
            let exact = reference(&qt2, &xs, m);
            let candle: Vec<f32> = qm
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..m * n {
                assert!(
                    (ours[i] - exact[i]).abs() < 1e-4,
                    "m={m} i={i}: {} vs {}",
                    ours[i],
                    exact[i]
                );
                assert!(
                    (ours[i] - candle[i]).abs() < 1e-4,
                    "m={m} i={i}: {} vs candle {}",
                    ours[i],
                    candle[i]
                );
            }
            // A row's result does not depend on the rows batched with it.
            for r in 0..m {
                let one = p.matmul(&xs[r * k..(r + 1) * k], 1);
                assert_eq!(&one[..], &ours[r * n..(r + 1) * n], "row {r} of {m}");
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch_at_model_shapes() {
        if !available() {
            return;
        }
        // Qwen2.5-0.5B's projections: k/v, q/o, gate/up, down.
        for (n, k) in [(128usize, 896usize), (896, 896), (4864, 896), (896, 4864)] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let p = PackedQ8::from_qtensor(&qt).unwrap();
            for m in [2usize, 3, 5, 8, 16] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let all = p.matmul(&xs, m);
                for r in 0..m {
                    let one = p.matmul(&xs[r * k..(r + 1) * k], 1);
                    assert_eq!(
                        &one[..],
                        &all[r * n..(r + 1) * n],
                        "{n}x{k}: row {r} of {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_the_tiles_do_not_cover_are_left_to_candle() {
        let w = Tensor::randn(0f32, 0.05, (40, 64), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(PackedQ8::from_qtensor(&qt).is_none());
        let w = Tensor::randn(0f32, 0.05, (32, 64), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(PackedQ8::from_qtensor(&qt).is_none());
    }
}
