use std::io::{BufWriter, Read, Write};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::simd::dot_rows;
use crate::{io_err, sort_hits, write_kind, Hit, IndexError, ItemIndex, Result, SearchQuery};

/// Exact inner-product search over every vector: the reference the others are measured against.
/// Rows are scored in parallel blocks with SIMD dot products; the top k are selected in O(n).
pub struct ExactIndex {
    dim: usize,
    vectors: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct ExactMeta {
    len: usize,
    dim: usize,
    format: String,
}

const BLOCK: usize = 4096;

impl ExactIndex {
    /// An index over row-major `vectors`, `dim` wide.
    pub fn new(dim: usize, vectors: Vec<f32>) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::WrongVectorDimension {
                expected: dim,
                received: if dim == 0 {
                    vectors.len()
                } else {
                    vectors.len() % dim
                },
            });
        }
        Ok(ExactIndex { dim, vectors })
    }

    /// An index over a list of equally long vectors.
    pub fn from_rows(dim: usize, rows: &[Vec<f32>]) -> Result<Self> {
        let mut flat = Vec::with_capacity(rows.len() * dim);
        for r in rows {
            if r.len() != dim {
                return Err(IndexError::WrongVectorDimension {
                    expected: dim,
                    received: r.len(),
                });
            }
            flat.extend_from_slice(r);
        }
        Self::new(dim, flat)
    }

    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The vector of item `i`.
    pub fn vector(&self, i: u32) -> Option<&[f32]> {
        let s = i as usize * self.dim;
        self.vectors.get(s..s + self.dim)
    }

    /// All vectors, row-major.
    pub fn vectors(&self) -> &[f32] {
        &self.vectors
    }

    /// Reopens an index saved by [`ItemIndex::save`].
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join("exact.json");
        let meta: ExactMeta = serde_json::from_slice(&std::fs::read(&mp).map_err(io_err(&mp))?)
            .map_err(|e| IndexError::Corrupt {
                path: mp.clone(),
                message: e.to_string(),
            })?;
        let vp = dir.join("vectors.f32");
        let mut f = std::fs::File::open(&vp).map_err(io_err(&vp))?;
        let expected = meta.len * meta.dim * 4;
        let actual = f.metadata().map_err(io_err(&vp))?.len() as usize;
        if actual != expected || meta.format != "f32le" {
            return Err(IndexError::Corrupt {
                path: vp,
                message: format!(
                    "{actual} bytes, expected {expected} ({} × {} f32le)",
                    meta.len, meta.dim
                ),
            });
        }
        let mut bytes = Vec::with_capacity(expected);
        f.read_to_end(&mut bytes).map_err(io_err(&vp))?;
        let vectors = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Self::new(meta.dim, vectors)
    }

    /// Scores of `query` against every item, in item order.
    pub fn scores(&self, query: &[f32]) -> Result<Vec<f32>> {
        if query.len() != self.dim {
            return Err(IndexError::WrongVectorDimension {
                expected: self.dim,
                received: query.len(),
            });
        }
        let mut scores = vec![0f32; self.len()];
        scores
            .par_chunks_mut(BLOCK)
            .zip(self.vectors.par_chunks(BLOCK * self.dim))
            .for_each(|(out, rows)| dot_rows(query, rows, self.dim, out));
        Ok(scores)
    }
}

/// The best `k` of `scores` (item = position), best first.
pub(crate) fn top_k(scores: &[f32], k: usize) -> Vec<Hit> {
    let mut hits: Vec<Hit> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| Hit {
            item: i as u32,
            score: if s.is_nan() { f32::NEG_INFINITY } else { s },
        })
        .collect();
    let k = k.min(hits.len());
    if k == 0 {
        return Vec::new();
    }
    if k < hits.len() {
        hits.select_nth_unstable_by(k - 1, |a, b| {
            b.score.total_cmp(&a.score).then(a.item.cmp(&b.item))
        });
        hits.truncate(k);
    }
    sort_hits(&mut hits);
    hits
}

impl ItemIndex for ExactIndex {
    fn kind(&self) -> &'static str {
        "exact"
    }

    fn len(&self) -> usize {
        self.vectors.len() / self.dim
    }

    fn search(&self, query: &SearchQuery<'_>, k: usize) -> Result<Vec<Hit>> {
        let v = query.vector.ok_or(IndexError::MissingVector("exact"))?;
        Ok(top_k(&self.scores(v)?, k))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        write_kind(dir, "exact")?;
        let vp = dir.join("vectors.f32");
        let tmp = dir.join("vectors.f32.tmp");
        {
            let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            for x in &self.vectors {
                w.write_all(&x.to_le_bytes()).map_err(io_err(&tmp))?;
            }
            w.flush().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &vp).map_err(io_err(&vp))?;
        let mp = dir.join("exact.json");
        let meta = ExactMeta {
            len: self.len(),
            dim: self.dim,
            format: "f32le".into(),
        };
        std::fs::write(&mp, serde_json::to_vec(&meta).unwrap_or_default()).map_err(io_err(&mp))
    }
}
