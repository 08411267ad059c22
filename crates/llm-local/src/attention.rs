//! Causal grouped-query attention, our own kernel, over a key/value cache laid out for it.
//!
//! Every output row is computed by the same operations in the same order whatever else is
//! computed with it — one position (decoding) or a whole prompt, the prompt in one prefill or in
//! pieces, alone or in a batch — so a sequence's logits do not depend on how its prompt was split
//! or what it was batched with. (candle's matrix product, which the engine used before, splits a
//! long inner dimension by its length on some CPUs — an AMD Zen 4 here — so `P·V` over 350 keys
//! and over 700 keys summed the same products in different orders.)
//!
//! Per row (query head `h` at position `i`, reading key/value head `h / rep`):
//! - `s_j = (Σ_c q_c·k_jc, in order of c, fused multiply-adds) · scale` for keys `0..=pos + i`;
//! - `p = softmax(s)`: maximum and sum in 16 lanes reduced by a fixed tree, `exp` by a fixed
//!   polynomial ([`exp`]);
//! - `out_c = Σ_j p_j·v_jc`, in key order, fused multiply-adds.
//!
//! Fused multiply-adds round once everywhere, so the copies compiled for AVX-512 and AVX2 and the
//! portable one give the same bits. The cache ([`KvLayer`]) keeps keys transposed in blocks of 16
//! positions, so that one vector of 16 scores is built by `d` multiply-adds with no horizontal
//! sums, and appends a position in place (no copy of the whole cache per decoding step).

use rayon::prelude::*;

use crate::vector::{exp, tree_sum};

/// Positions per key block of the cache (one vector of scores).
const KB: usize = 16;
/// Query rows per work item (they share every key and value read).
const TILE_ROWS: usize = 32;
/// Below this many row × key products, a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 14;

/// One layer's keys and values for one sequence.
///
/// Keys: `[block][kv head][c][16 positions]` (positions past the end are 0); values:
/// `[position][kv head][c]`.
#[derive(Clone, Debug, Default)]
pub struct KvLayer {
    n_kv: usize,
    d: usize,
    len: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvLayer {
    /// An empty cache for `n_kv` key/value heads of dimension `d`.
    pub fn new(n_kv: usize, d: usize) -> Self {
        KvLayer {
            n_kv,
            d,
            ..Default::default()
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `t` positions: `k` (t, n_kv, d) after RoPE, `v` (t, n_kv, d) — the rows of the
    /// key and value projections as they come.
    pub fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let (n_kv, d) = (self.n_kv, self.d);
        assert_eq!(k.len(), n_kv * t * d, "key shape");
        assert_eq!(v.len(), n_kv * t * d, "value shape");
        let end = self.len + t;
        let block = n_kv * d * KB;
        self.keys.resize(end.div_ceil(KB) * block, 0.0);
        for g in 0..n_kv {
            for i in 0..t {
                let p = self.len + i;
                let base = (p / KB * n_kv + g) * d * KB + p % KB;
                for (c, &x) in k[(i * n_kv + g) * d..][..d].iter().enumerate() {
                    self.keys[base + c * KB] = x;
                }
            }
        }
        self.values.extend_from_slice(v);
        self.len = end;
    }

    /// Keeps the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len {
            return;
        }
        let (n_kv, d) = (self.n_kv, self.d);
        self.keys.truncate(n.div_ceil(KB) * n_kv * d * KB);
        if !n.is_multiple_of(KB) {
            let b = n / KB;
            for g in 0..n_kv {
                for c in 0..d {
                    let at = ((b * n_kv + g) * d + c) * KB;
                    self.keys[at + n % KB..at + KB].fill(0.0);
                }
            }
        }
        self.values.truncate(n * n_kv * d);
        self.len = n;
    }

    /// The keys and values as (n_kv, positions, d) arrays.
    pub fn to_arrays(&self) -> (Vec<f32>, Vec<f32>) {
        let (n_kv, d, l) = (self.n_kv, self.d, self.len);
        let mut k = vec![0f32; n_kv * l * d];
        let mut v = vec![0f32; n_kv * l * d];
        for g in 0..n_kv {
            for p in 0..l {
                for c in 0..d {
                    k[(g * l + p) * d + c] = self.keys[((p / KB * n_kv + g) * d + c) * KB + p % KB];
                }
                v[(g * l + p) * d..][..d].copy_from_slice(&self.values[(p * n_kv + g) * d..][..d]);
            }
        }
        (k, v)
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * 4
    }
}

/// The shapes of one sequence's attention.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (query head `h` reads `h / (n_head / n_kv)`).
    pub n_kv: usize,
    /// New positions (the queries).
    pub t: usize,
    /// Positions in the cache before them.
    pub pos: usize,
    /// Head dimension.
    pub d: usize,
}

/// Causal attention of the last `t` positions of `cache` (which holds `pos + t`). `q`:
/// (t, n_head, d) after RoPE (the query projection's rows as they come). Returns (t, n_head · d): each position's heads side by side, as
/// the output projection reads them.
pub fn attention(q: &[f32], cache: &KvLayer, s: Shape) -> Vec<f32> {
    let Shape {
        n_head,
        n_kv,
        t,
        pos,
        d,
    } = s;
    assert!(
        n_kv > 0 && n_head % n_kv == 0,
        "heads {n_head} / kv heads {n_kv}"
    );
    assert_eq!(q.len(), n_head * t * d, "query shape");
    assert_eq!(
        (cache.n_kv, cache.d, cache.len),
        (n_kv, d, pos + t),
        "cache shape"
    );
    let rep = n_head / n_kv;
    // A group's rows are (position i, head r of the group) in position-major order, so the rows
    // of a tile reach nearly the same keys.
    let rows = rep * t;
    let per_group = rows.div_ceil(TILE_ROWS);
    let run = |tile: usize| -> Vec<f32> {
        let (g, r0) = (tile / per_group, tile % per_group * TILE_ROWS);
        Tile {
            q,
            cache,
            s,
            g,
            r0,
            n: TILE_ROWS.min(rows - r0),
        }
        .dispatch()
    };
    let n_tiles = n_kv * per_group;
    let outs: Vec<Vec<f32>> = if rows * (pos + t) * n_kv < PARALLEL_WORK {
        (0..n_tiles).map(run).collect()
    } else {
        (0..n_tiles).into_par_iter().map(run).collect()
    };
    let mut out = vec![0f32; t * n_head * d];
    for (tile, o) in outs.iter().enumerate() {
        let (g, r0) = (tile / per_group, tile % per_group * TILE_ROWS);
        for (j, row) in o.chunks_exact(d).enumerate() {
            let (i, r) = ((r0 + j) / rep, (r0 + j) % rep);
            out[(i * n_head + g * rep + r) * d..][..d].copy_from_slice(row);
        }
    }
    out
}

/// Rows `r0..r0 + n` of key/value head `g`.
struct Tile<'a> {
    q: &'a [f32],
    cache: &'a KvLayer,
    s: Shape,
    g: usize,
    r0: usize,
    n: usize,
}

impl Tile<'_> {
    /// Runs the copy of [`Tile::compute`] compiled for the widest vectors this CPU has (they
    /// compute the same bits).
    fn dispatch(&self) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (and with it FMA).
                return unsafe { self.avx512() };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { self.avx2() };
            }
        }
        self.compute(false)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn avx512(&self) -> Vec<f32> {
        self.compute(true)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self) -> Vec<f32> {
        self.compute(false)
    }

    /// The tile's rows: (n, d). `avx512`: called from the AVX-512 copy, whose scores run
    /// [`avx512::scores`] (the same chains of multiply-adds, more of them in flight).
    #[inline(always)]
    fn compute(&self, avx512: bool) -> Vec<f32> {
        let Shape { n_head, pos, d, .. } = self.s;
        let rep = n_head / self.s.n_kv;
        let n = self.n;
        // Row j of the tile: query head h at position i; it reaches keys 0..limit[j].
        let mut limit = [0usize; TILE_ROWS];
        let mut qrow = [0usize; TILE_ROWS];
        for j in 0..n {
            let (i, r) = ((self.r0 + j) / rep, (self.r0 + j) % rep);
            limit[j] = pos + i + 1;
            qrow[j] = (i * n_head + self.g * rep + r) * d;
        }
        let keys = limit[..n].iter().copied().max().unwrap_or(0);
        let stride = keys.div_ceil(KB) * KB;
        let mut p = vec![0f32; n * stride];
        // Rows in register blocks of 4, 2 or 1; every score is the same chain of multiply-adds
        // whatever its block.
        let mut j = 0;
        while j < n {
            let r = [1, 1, 2, 2, 4][(n - j).min(4)];
            let (qr, lr, pr) = (&qrow[j..], &limit[j..], &mut p[j * stride..]);
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: `avx512` is true only in the copy compiled for, and run on, AVX-512F.
                unsafe { avx512::scores(self, r, qr, lr, pr, stride) };
                j += r;
                continue;
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = avx512;
            match (r, d) {
                (4, 64) => self.scores::<4, 64>(qr, lr, pr, stride),
                (4, 128) => self.scores::<4, 128>(qr, lr, pr, stride),
                (4, _) => self.scores::<4, 0>(qr, lr, pr, stride),
                (2, 64) => self.scores::<2, 64>(qr, lr, pr, stride),
                (2, 128) => self.scores::<2, 128>(qr, lr, pr, stride),
                (2, _) => self.scores::<2, 0>(qr, lr, pr, stride),
                (_, 64) => self.scores::<1, 64>(qr, lr, pr, stride),
                (_, 128) => self.scores::<1, 128>(qr, lr, pr, stride),
                _ => self.scores::<1, 0>(qr, lr, pr, stride),
            }
            j += r;
        }
        let scale = 1.0 / (d as f32).sqrt();
        for j in 0..n {
            softmax(&mut p[j * stride..][..limit[j]], scale);
        }
        let mut out = vec![0f32; n * d];
        let mut j = 0;
        while j < n {
            let m = match d {
                64 if n - j >= 4 => {
                    self.weigh::<4, 64>(&p[j * stride..], stride, &limit[j..], &mut out[j * d..]);
                    4
                }
                64 if n - j >= 2 => {
                    self.weigh::<2, 64>(&p[j * stride..], stride, &limit[j..], &mut out[j * d..]);
                    2
                }
                128 if n - j >= 2 => {
                    self.weigh::<2, 128>(&p[j * stride..], stride, &limit[j..], &mut out[j * d..]);
                    2
                }
                64 => {
                    self.weigh::<1, 64>(&p[j * stride..], stride, &limit[j..], &mut out[j * d..]);
                    1
                }
                128 => {
                    self.weigh::<1, 128>(&p[j * stride..], stride, &limit[j..], &mut out[j * d..]);
                    1
                }
                _ => {
                    self.weigh_any(&p[j * stride..][..stride], limit[j], &mut out[j * d..][..d]);
                    1
                }
            };
            j += m;
        }
        out
    }

    /// Scores of `R` rows (query offsets `qrow`) against every key block up to their largest
    /// limit: `p[r·stride + key]`. `D`: the head dimension, or 0 for any (the same operations).
    #[inline(always)]
    fn scores<const R: usize, const D: usize>(
        &self,
        qrow: &[usize],
        limit: &[usize],
        p: &mut [f32],
        stride: usize,
    ) {
        let (n_kv, g) = (self.s.n_kv, self.g);
        let d = if D == 0 { self.s.d } else { D };
        let keys = limit[..R].iter().copied().max().unwrap_or(0);
        let qs: [&[f32]; R] = std::array::from_fn(|r| &self.q[qrow[r]..][..d]);
        for b in 0..keys.div_ceil(KB) {
            let kt = &self.cache.keys[(b * n_kv + g) * d * KB..][..d * KB];
            let mut acc = [[0f32; KB]; R];
            for c in 0..d {
                let kc = &kt[c * KB..][..KB];
                for r in 0..R {
                    let x = qs[r][c];
                    for l in 0..KB {
                        acc[r][l] = x.mul_add(kc[l], acc[r][l]);
                    }
                }
            }
            for r in 0..R {
                p[r * stride + b * KB..][..KB].copy_from_slice(&acc[r]);
            }
        }
    }

    /// `out[r] = Σ_key p[r][key] · v_key` for `R` rows, keys in order, each row to its limit.
    #[inline(always)]
    fn weigh<const R: usize, const D: usize>(
        &self,
        p: &[f32],
        stride: usize,
        limit: &[usize],
        out: &mut [f32],
    ) {
        let (n_kv, g) = (self.s.n_kv, self.g);
        let values = &self.cache.values;
        let common = limit[..R].iter().copied().min().unwrap_or(0);
        let mut acc = [[0f32; D]; R];
        for key in 0..common {
            let v = &values[(key * n_kv + g) * D..][..D];
            for r in 0..R {
                let w = p[r * stride + key];
                for c in 0..D {
                    acc[r][c] = w.mul_add(v[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for key in common..limit[r] {
                let v = &values[(key * n_kv + g) * D..][..D];
                let w = p[r * stride + key];
                for c in 0..D {
                    acc[r][c] = w.mul_add(v[c], acc[r][c]);
                }
            }
            out[r * D..][..D].copy_from_slice(&acc[r]);
        }
    }

    /// [`Tile::weigh`] for one row of any head dimension.
    #[inline(always)]
    fn weigh_any(&self, p: &[f32], limit: usize, out: &mut [f32]) {
        let (n_kv, g, d) = (self.s.n_kv, self.g, self.s.d);
        for (key, &w) in p[..limit].iter().enumerate() {
            let v = &self.cache.values[(key * n_kv + g) * d..][..d];
            for c in 0..d {
                out[c] = w.mul_add(v[c], out[c]);
            }
        }
    }
}

/// The scores with AVX-512 intrinsics: per (row, key block) the same chain of fused
/// multiply-adds over `c` as [`Tile::scores`], with 8 chains in flight (4 rows × 2 blocks, 2 × 4
/// or 1 × 8) so that the multiply-add latency is hidden.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, KB};
    use core::arch::x86_64::*;

    /// Scores of `r` rows (4, 2 or 1) of the tile, as [`Tile::scores`] writes them.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        tile: &Tile,
        r: usize,
        qrow: &[usize],
        limit: &[usize],
        p: &mut [f32],
        stride: usize,
    ) {
        match r {
            4 => rows::<4, 2>(tile, qrow, limit, p, stride),
            2 => rows::<2, 4>(tile, qrow, limit, p, stride),
            _ => rows::<1, 8>(tile, qrow, limit, p, stride),
        }
    }

    #[target_feature(enable = "avx512f")]
    fn rows<const R: usize, const NB: usize>(
        tile: &Tile,
        qrow: &[usize],
        limit: &[usize],
        p: &mut [f32],
        stride: usize,
    ) {
        let (n_kv, g, d) = (tile.s.n_kv, tile.g, tile.s.d);
        let blocks = limit[..R].iter().copied().max().unwrap_or(0).div_ceil(KB);
        let keys = &tile.cache.keys;
        // Every pointer below stays inside `tile.q`, `keys` (blocks < its block count) and `p`
        // (R rows of `stride` ≥ blocks · 16).
        assert!(keys.len() >= blocks * n_kv * d * KB && p.len() >= (R - 1) * stride + blocks * KB);
        let qs: [*const f32; R] = std::array::from_fn(|r| tile.q[qrow[r]..][..d].as_ptr());
        let block = n_kv * d * KB;
        let kt = keys.as_ptr();
        let out = p.as_mut_ptr();
        let full = blocks - blocks % NB;
        // SAFETY: the bounds asserted above; AVX-512F by this function's contract.
        unsafe {
            for b in (0..full).step_by(NB) {
                chains::<R, NB>(
                    qs,
                    kt.add((b * n_kv + g) * d * KB),
                    block,
                    d,
                    out.add(b * KB),
                    stride,
                );
            }
            for b in full..blocks {
                chains::<R, 1>(
                    qs,
                    kt.add((b * n_kv + g) * d * KB),
                    block,
                    d,
                    out.add(b * KB),
                    stride,
                );
            }
        }
    }

    /// `out[r·stride + i·16 + l] = Σ_c q_r[c] · k[i·block + c·16 + l]`, one fused multiply-add
    /// chain per output in order of `c`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn chains<const R: usize, const NB: usize>(
        qs: [*const f32; R],
        k: *const f32,
        block: usize,
        d: usize,
        out: *mut f32,
        stride: usize,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NB]; R];
            for c in 0..d {
                let ks: [__m512; NB] =
                    std::array::from_fn(|i| _mm512_loadu_ps(k.add(i * block + c * KB)));
                for r in 0..R {
                    let x = _mm512_set1_ps(*qs[r].add(c));
                    for i in 0..NB {
                        acc[r][i] = _mm512_fmadd_ps(x, ks[i], acc[r][i]);
                    }
                }
            }
            for r in 0..R {
                for i in 0..NB {
                    _mm512_storeu_ps(out.add(r * stride + i * KB), acc[r][i]);
                }
            }
        }
    }
}

/// Softmax of `s · scale` in place. Whole chunks of 16 are written as fixed loops over 16
/// lanes so that they vectorise; element `k` always goes to lane `k mod 16`.
#[inline(always)]
fn softmax(s: &mut [f32], scale: f32) {
    let mut lanes = [f32::NEG_INFINITY; KB];
    let mut chunks = s.chunks_exact_mut(KB);
    for chunk in &mut chunks {
        for l in 0..KB {
            chunk[l] *= scale;
            lanes[l] = lanes[l].max(chunk[l]);
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x *= scale;
        lanes[l] = lanes[l].max(*x);
    }
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; KB];
    let mut chunks = s.chunks_exact_mut(KB);
    for chunk in &mut chunks {
        for l in 0..KB {
            chunk[l] = exp(chunk[l] - max);
            sums[l] += chunk[l];
        }
    }
    for (l, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x = exp(*x - max);
        sums[l] += *x;
    }
    let inv = 1.0 / tree_sum(sums);
    for x in s.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::vector::test_values as values;

    /// Causal grouped-query attention written out in f64: (t, n_head, d). `q`: (t, n_head, d);
    /// `k`, `v`: (n_kv, pos + t, d).
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape) -> Vec<f64> {
        let Shape {
            n_head,
            n_kv,
            t,
            pos,
            d,
        } = s;
        let (rep, l) = (n_head / n_kv, pos + t);
        let mut out = vec![0f64; n_head * t * d];
        for h in 0..n_head {
            let g = h / rep;
            for i in 0..t {
                let qi = &q[(i * n_head + h) * d..][..d];
                let sc: Vec<f64> = (0..=pos + i)
                    .map(|j| {
                        let kj = &k[(g * l + j) * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vj = &v[(g * l + j) * d..][..d];
                    for c in 0..d {
                        out[(i * n_head + h) * d + c] += w / sum * vj[c] as f64;
                    }
                }
            }
        }
        out
    }

    /// Positions `from..to` of (heads, all, d) arrays, as (heads, to - from, d).
    fn span(x: &[f32], heads: usize, all: usize, d: usize, from: usize, to: usize) -> Vec<f32> {
        (0..heads)
            .flat_map(|h| x[(h * all + from) * d..][..(to - from) * d].iter().copied())
            .collect()
    }

    /// (heads, t, d) → (t, heads, d).
    fn position_major(x: &[f32], heads: usize, t: usize, d: usize) -> Vec<f32> {
        (0..t)
            .flat_map(|i| (0..heads).flat_map(move |h| x[(h * t + i) * d..][..d].iter().copied()))
            .collect()
    }

    /// A cache holding positions `0..to` of (n_kv, all, d) keys and values, appended in pieces.
    fn cache(k: &[f32], v: &[f32], n_kv: usize, all: usize, d: usize, cuts: &[usize]) -> KvLayer {
        let mut c = KvLayer::new(n_kv, d);
        for &t in cuts {
            let (from, to) = (c.len(), c.len() + t);
            c.append(
                &position_major(&span(k, n_kv, all, d, from, to), n_kv, t, d),
                &position_major(&span(v, n_kv, all, d, from, to), n_kv, t, d),
                t,
            );
        }
        c
    }

    #[test]
    fn attention_matches_the_written_out_reference() {
        // Tile edges inside and at a position, head dims with and without their own copy
        // (64, 128, 40, 8), with and without a cache, one position (decoding).
        for (n_head, n_kv, t, pos, d) in [
            (4usize, 2usize, 9usize, 0usize, 64usize),
            (6, 2, 37, 0, 64),
            (6, 3, 37, 11, 128),
            (2, 1, 5, 3, 40),
            (14, 2, 150, 20, 64),
            (9, 3, 1, 70, 64),
            (12, 2, 1, 33, 128),
            (3, 3, 4, 0, 8),
        ] {
            let s = Shape {
                n_head,
                n_kv,
                t,
                pos,
                d,
            };
            let all = pos + t;
            let q = values(n_head * t * d, 1);
            let k = values(n_kv * all * d, 2);
            let v = values(n_kv * all * d, 3);
            let kv = cache(&k, &v, n_kv, all, d, &[pos, t]);
            let got = attention(&q, &kv, s);
            let want = reference(&q, &k, &v, s);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{s:?}: output {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_prompt_attends_to_the_same_bits_whatever_its_pieces() {
        // SmolLM2's, Qwen 0.5B's and 1.5B's head layouts and an odd one; 300 positions as one
        // prefill, as pieces that cut the tiles and key blocks elsewhere, and one at a time.
        for (n_head, n_kv, d) in [
            (9usize, 3usize, 64usize),
            (14, 2, 64),
            (12, 2, 128),
            (4, 4, 40),
        ] {
            let all = 300;
            let q = values(n_head * all * d, 4);
            let k = values(n_kv * all * d, 5);
            let v = values(n_kv * all * d, 6);
            let kv = cache(&k, &v, n_kv, all, d, &[all]);
            let whole = attention(
                &q,
                &kv,
                Shape {
                    n_head,
                    n_kv,
                    t: all,
                    pos: 0,
                    d,
                },
            );
            for cuts in [vec![150, 150], vec![1, 63, 64, 65, 107], vec![1; all]] {
                let mut pos = 0;
                let mut pieces = Vec::new();
                let mut kv = KvLayer::new(n_kv, d);
                for t in cuts {
                    let next = cache(&k, &v, n_kv, all, d, &[pos + t]);
                    let (nk, nv) = next.to_arrays();
                    kv.append(
                        &position_major(&span(&nk, n_kv, pos + t, d, pos, pos + t), n_kv, t, d),
                        &position_major(&span(&nv, n_kv, pos + t, d, pos, pos + t), n_kv, t, d),
                        t,
                    );
                    let s = Shape {
                        n_head,
                        n_kv,
                        t,
                        pos,
                        d,
                    };
                    let rows = &q[pos * n_head * d..(pos + t) * n_head * d];
                    pieces.extend(attention(rows, &kv, s));
                    pos += t;
                }
                assert_eq!(pos, all);
                assert!(
                    whole
                        .iter()
                        .zip(&pieces)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "heads {n_head}/{n_kv}, dim {d}"
                );
            }
        }
    }

    #[test]
    fn the_vector_copies_compute_the_portable_bits() {
        for (n_head, n_kv, t, pos, d) in [
            (14usize, 2usize, 40usize, 90usize, 64usize),
            (6, 3, 17, 5, 128),
            (4, 2, 9, 3, 40),
        ] {
            let s = Shape {
                n_head,
                n_kv,
                t,
                pos,
                d,
            };
            let all = pos + t;
            let q = values(n_head * t * d, 7);
            let kv = cache(
                &values(n_kv * all * d, 8),
                &values(n_kv * all * d, 9),
                n_kv,
                all,
                d,
                &[all],
            );
            let rows = n_head / n_kv * t;
            for g in 0..n_kv {
                for r0 in (0..rows).step_by(TILE_ROWS) {
                    let tile = Tile {
                        q: &q,
                        cache: &kv,
                        s,
                        g,
                        r0,
                        n: TILE_ROWS.min(rows - r0),
                    };
                    let (fast, portable) = (tile.dispatch(), tile.compute(false));
                    assert!(fast
                        .iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn the_cache_appends_truncates_and_reads_back_its_positions() {
        let (n_kv, d, all) = (2, 24, 50);
        let k = values(n_kv * all * d, 10);
        let v = values(n_kv * all * d, 11);
        let kv = cache(&k, &v, n_kv, all, d, &[7, 1, 30, 12]);
        assert_eq!(kv.len(), all);
        assert_eq!(kv.to_arrays(), (k.clone(), v.clone()));
        // Truncated inside a key block, then grown again: as if built to that length directly.
        let mut cut = kv.clone();
        cut.truncate(21);
        let direct = cache(&k, &v, n_kv, all, d, &[21]);
        assert_eq!(
            (cut.len(), &cut.keys, &cut.values),
            (21, &direct.keys, &direct.values)
        );
        let (rk, rv) = kv.to_arrays();
        cut.append(
            &position_major(&span(&rk, n_kv, all, d, 21, all), n_kv, all - 21, d),
            &position_major(&span(&rv, n_kv, all, d, 21, all), n_kv, all - 21, d),
            all - 21,
        );
        assert_eq!((&cut.keys, &cut.values), (&kv.keys, &kv.values));
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut s: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let before = s.clone();
        softmax(&mut s, 0.5);
        let sum: f32 = s.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
        for i in 1..s.len() {
            assert_eq!(s[i] > s[i - 1], before[i] > before[i - 1]);
        }
    }
}
