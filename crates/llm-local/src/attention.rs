//! Causal grouped-query attention of a prompt in blocks of query positions, with the mask and
//! softmax applied in place (no prompt × prompt matrix), and its written-out f64 reference test.

use candle_core::Tensor;

/// Query positions per block of [`blocked_attention`], which every prompt of two or more new
/// positions takes (one position — decoding — takes the one-matrix path), so that a prompt's
/// keys and values do not depend on how it was split into prefills.
pub(crate) const ATTENTION_BLOCK: usize = 128;

/// Causal attention of a prompt in blocks of `block` query positions: each block's scores (the
/// `rep` query heads of a key/value head stacked as rows, as the one-matrix path does) reach only
/// the keys up to its last position, and the causal mask and softmax are applied in place, so no
/// prompt × prompt mask or score matrix is built and the keys after a block are never
/// multiplied. `q` is (1, heads, t, dim) after RoPE; `k`, `v` (1, kv heads, pos + t, dim) with
/// the cache (head h reads key/value head h / rep). Returns (1, heads, t, dim).
pub(crate) fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    n_kv: usize,
    block: usize,
) -> candle_core::Result<Tensor> {
    let (_, n_head, t, d) = q.dims4()?;
    let rep = n_head / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let q = q.contiguous()?.reshape((1, n_kv, rep, t, d))?;
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    for i0 in (0..t).step_by(block) {
        let b = block.min(t - i0);
        let kv_end = pos + i0 + b;
        let qb = q
            .narrow(3, i0, b)?
            .contiguous()?
            .reshape((1, n_kv, rep * b, d))?;
        let kb = k.narrow(2, 0, kv_end)?.contiguous()?;
        let vb = v.narrow(2, 0, kv_end)?.contiguous()?;
        let scores = qb.matmul(&kb.t()?)?; // (1, kv, rep·b, kv_end)
        let mut p: Vec<f32> = scores.flatten_all()?.to_vec1()?;
        {
            use rayon::prelude::*;
            p.par_chunks_mut(kv_end).enumerate().for_each(|(row, s)| {
                // Row (kv head, r, i) is query position i0 + i: keys 0..=pos + i0 + i.
                causal_softmax(s, pos + i0 + row % b + 1, scale);
            });
        }
        let p = Tensor::from_vec(p, (1, n_kv, rep * b, kv_end), q.device())?;
        outs.push(p.matmul(&vb)?.reshape((1, n_kv, rep, b, d))?);
    }
    Tensor::cat(&outs, 3)?.reshape((1, n_head, t, d))
}

/// Softmax of `s[..valid] · scale` in place; the positions after `valid` (later keys) become 0.
fn causal_softmax(s: &mut [f32], valid: usize, scale: f32) {
    let (live, masked) = s.split_at_mut(valid.min(s.len()));
    let mut max = f32::NEG_INFINITY;
    for x in live.iter_mut() {
        *x *= scale;
        max = max.max(*x);
    }
    let mut sum = 0f32;
    for x in live.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in live.iter_mut() {
        *x *= inv;
    }
    masked.fill(0.0);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    /// Causal grouped-query attention written out in f64.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: (usize, usize, usize, usize, usize),
    ) -> Vec<f64> {
        let (n_head, n_kv, t, pos, d) = dims;
        let (rep, l) = (n_head / n_kv, pos + t);
        let mut out = vec![0f64; n_head * t * d];
        for h in 0..n_head {
            let g = h / rep;
            for i in 0..t {
                let qi = &q[(h * t + i) * d..][..d];
                let s: Vec<f64> = (0..=pos + i)
                    .map(|j| {
                        let kj = &k[(g * l + j) * d..][..d];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vj = &v[(g * l + j) * d..][..d];
                    for c in 0..d {
                        out[(h * t + i) * d + c] += w / sum * vj[c] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocked_attention_matches_the_written_out_reference() {
        let dev = Device::Cpu;
        // Block sizes that divide t, that do not, and one larger than t; with and without a cache.
        for (n_head, n_kv, t, pos, block) in [
            (4usize, 2usize, 9usize, 0usize, 4usize),
            (6, 2, 37, 0, 8),
            (6, 3, 37, 11, 16),
            (2, 1, 5, 3, 64),
            (14, 2, 150, 20, 128),
        ] {
            let d = 16;
            let q = Tensor::randn(0f32, 1.0, (1, n_head, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let got: Vec<f32> = blocked_attention(&q, &k, &v, pos, n_kv, block)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat = |x: &Tensor| -> Vec<f32> { x.flatten_all().unwrap().to_vec1().unwrap() };
            let want = reference(&flat(&q), &flat(&k), &flat(&v), (n_head, n_kv, t, pos, d));
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "heads {n_head}/{n_kv}, t {t}, pos {pos}, block {block}: output {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn causal_softmax_zeroes_later_keys_and_sums_to_one() {
        let mut s = vec![1.0f32, 2.0, 3.0, 100.0, -5.0];
        causal_softmax(&mut s, 3, 0.5);
        assert_eq!(&s[3..], &[0.0, 0.0]);
        let sum: f32 = s.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }
}
