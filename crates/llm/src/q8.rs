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
/// Activation rows per kernel pass (accumulators held in registers).
const MAX_M: usize = 8;
/// Activation rows per pass of the two-tile kernel.
const MAX_M2: usize = 4;

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
            std::env::var("MRREC_Q8_KERNEL").map_or(true, |v| v != "0")
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
    pub fn matmul_quantised(&self, q: &Quantised) -> Vec<f32> {
        assert_eq!(q.kb * QK, self.k, "activation width");
        let (m, n) = (q.m, self.n);
        let mut out = vec![0f32; m * n];
        let n_tiles = n / TILE_N;
        let pairs = n_tiles.div_ceil(2);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = |ps: std::ops::Range<usize>| {
            let p = &out_ptr;
            for pair in ps {
                let (t0, t1) = (2 * pair, (2 * pair + 2).min(n_tiles));
                // SAFETY: each task writes its own tiles' 16 columns of every row.
                unsafe {
                    if q.m == 1 {
                        // One row (decoding) streams the weights once either way; the
                        // one-tile kernel measured faster there. Same arithmetic per output.
                        for t in t0..t1 {
                            self.tile(q, t, p.0);
                        }
                    } else {
                        self.tile_pair(q, t0, t1, p.0);
                    }
                }
            }
        };
        // Small products run inline: waking the pool costs more than the work.
        if m * self.k * n < 1 << 18 {
            work(0..pairs);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(pairs, work);
        }
        out
    }

    /// All rows of output tiles `t0..t1` (one or two): two tiles share each activation load.
    ///
    /// # Safety
    /// As [`Self::tile`], for every tile of the range.
    unsafe fn tile_pair(&self, q: &Quantised, t0: usize, t1: usize, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if t1 == t0 + 2 {
            let kb = self.k / QK;
            let a = &self.tiles[t0 * kb..(t0 + 1) * kb];
            let b = &self.tiles[(t0 + 1) * kb..(t0 + 2) * kb];
            let mut r0 = 0;
            while r0 < q.m {
                let mc = (q.m - r0).min(MAX_M2);
                // SAFETY: checked by `available()` when packing; `out` per the contract.
                unsafe { kernel::rows2(a, b, q, r0, mc, out, self.n, t0 * TILE_N) };
                r0 += mc;
            }
            return;
        }
        for t in t0..t1 {
            // SAFETY: per the contract.
            unsafe { self.tile(q, t, out) };
        }
    }

    /// All rows of output tile `t`.
    ///
    /// # Safety
    /// `out` points to `m × n` floats; no other thread writes columns `16t..16t+16`.
    unsafe fn tile(&self, q: &Quantised, t: usize, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        {
            let kb = self.k / QK;
            let tiles = &self.tiles[t * kb..(t + 1) * kb];
            let mut r0 = 0;
            while r0 < q.m {
                let mc = (q.m - r0).min(MAX_M);
                // SAFETY: checked by `available()` when packing; `out` per the contract.
                unsafe { kernel::rows(tiles, q, r0, mc, out, self.n, t * TILE_N) };
                r0 += mc;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (q, t, out);
            unreachable!("PackedQ8 is only built where the kernel runs");
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written at disjoint positions (one output tile per task).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Quantises `m` rows of `k` values (k a multiple of 32) as ggml's Q8_0 does.
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
    for (i, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let di = amax / 127.0;
        let id = if di != 0.0 { 1.0 / di } else { 0.0 };
        let mut s = 0i32;
        for (j, &v) in xs.iter().enumerate() {
            let q = (v * id).round() as i8;
            qs[i * QK + j] = q;
            s += q as i32;
        }
        d[i] = f16::from_f32(di).to_f32();
        sums[i] = s;
    }
    Quantised { m, kb, qs, d, sums }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Quantised, Tile, MAX_M, QK, TILE_N};
    use core::arch::x86_64::*;

    /// Rows `r0..r0+mc` against one output tile, every input block.
    ///
    /// # Safety
    /// AVX512F/BW/VNNI present; `out` as in [`super::PackedQ8::tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows(
        tiles: &[Tile],
        q: &Quantised,
        r0: usize,
        mc: usize,
        out: *mut f32,
        n: usize,
        col: usize,
    ) {
        unsafe {
            let kb = q.kb;
            let k = kb * QK;
            let mut acc = [_mm512_setzero_ps(); MAX_M];
            for (b, tile) in tiles.iter().enumerate() {
                let p = tile.qs.as_ptr();
                let w0 = _mm512_load_si512(p as *const _);
                let w1 = _mm512_load_si512(p.add(64) as *const _);
                let w2 = _mm512_load_si512(p.add(128) as *const _);
                let w3 = _mm512_load_si512(p.add(192) as *const _);
                let w4 = _mm512_load_si512(p.add(256) as *const _);
                let w5 = _mm512_load_si512(p.add(320) as *const _);
                let w6 = _mm512_load_si512(p.add(384) as *const _);
                let w7 = _mm512_load_si512(p.add(448) as *const _);
                let dw = _mm512_load_ps(tile.d.as_ptr());
                for (r, a) in acc.iter_mut().enumerate().take(mc) {
                    let row = r0 + r;
                    let xq = q.qs.as_ptr().add(row * k + b * QK) as *const i32;
                    let x = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(g)));
                    // Two independent chains halve the dpbusd latency per block.
                    let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, x(0));
                    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, x(1));
                    s0 = _mm512_dpbusd_epi32(s0, w2, x(2));
                    s1 = _mm512_dpbusd_epi32(s1, w3, x(3));
                    s0 = _mm512_dpbusd_epi32(s0, w4, x(4));
                    s1 = _mm512_dpbusd_epi32(s1, w5, x(5));
                    s0 = _mm512_dpbusd_epi32(s0, w6, x(6));
                    s1 = _mm512_dpbusd_epi32(s1, w7, x(7));
                    let isum = _mm512_sub_epi32(
                        _mm512_add_epi32(s0, s1),
                        _mm512_set1_epi32(128 * q.sums[row * kb + b]),
                    );
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(q.d[row * kb + b]));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *a);
                }
            }
            for (r, a) in acc.iter().enumerate().take(mc) {
                _mm512_storeu_ps(out.add((r0 + r) * n + col), *a);
            }
        }
    }

    /// Rows `r0..r0+mc` against two adjacent output tiles (`col`, `col + 16`): each activation
    /// broadcast serves both. Per output, the same operations in the same order as [`rows`].
    ///
    /// # Safety
    /// As [`rows`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows2(
        ta: &[Tile],
        tb: &[Tile],
        q: &Quantised,
        r0: usize,
        mc: usize,
        out: *mut f32,
        n: usize,
        col: usize,
    ) {
        unsafe {
            let kb = q.kb;
            let k = kb * QK;
            let mut acc_a = [_mm512_setzero_ps(); super::MAX_M2];
            let mut acc_b = [_mm512_setzero_ps(); super::MAX_M2];
            for b in 0..kb {
                let (x, y) = (&ta[b], &tb[b]);
                let pa = x.qs.as_ptr();
                let pb = y.qs.as_ptr();
                let wa: [__m512i; 8] =
                    std::array::from_fn(|g| _mm512_load_si512(pa.add(64 * g) as *const _));
                let wb: [__m512i; 8] =
                    std::array::from_fn(|g| _mm512_load_si512(pb.add(64 * g) as *const _));
                let dwa = _mm512_load_ps(x.d.as_ptr());
                let dwb = _mm512_load_ps(y.d.as_ptr());
                for r in 0..mc {
                    let row = r0 + r;
                    let xq = q.qs.as_ptr().add(row * k + b * QK) as *const i32;
                    let xs: [__m512i; 8] = std::array::from_fn(|g| {
                        _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(g)))
                    });
                    let corr = _mm512_set1_epi32(128 * *q.sums.get_unchecked(row * kb + b));
                    let dx = _mm512_set1_ps(*q.d.get_unchecked(row * kb + b));
                    for (w, dw, acc) in [(&wa, dwa, &mut acc_a[r]), (&wb, dwb, &mut acc_b[r])] {
                        let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], xs[0]);
                        let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], xs[1]);
                        s0 = _mm512_dpbusd_epi32(s0, w[2], xs[2]);
                        s1 = _mm512_dpbusd_epi32(s1, w[3], xs[3]);
                        s0 = _mm512_dpbusd_epi32(s0, w[4], xs[4]);
                        s1 = _mm512_dpbusd_epi32(s1, w[5], xs[5]);
                        s0 = _mm512_dpbusd_epi32(s0, w[6], xs[6]);
                        s1 = _mm512_dpbusd_epi32(s1, w[7], xs[7]);
                        let isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), corr);
                        let scale = _mm512_mul_ps(dw, dx);
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                    }
                }
            }
            for r in 0..mc {
                _mm512_storeu_ps(out.add((r0 + r) * n + col), acc_a[r]);
                _mm512_storeu_ps(out.add((r0 + r) * n + col + TILE_N), acc_b[r]);
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
