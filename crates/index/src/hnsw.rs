use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::{io_err, sort_hits, write_kind, Hit, IndexError, ItemIndex, Result, SearchQuery};

/// HNSW graph parameters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HnswParams {
    /// Edges per node (M).
    pub connectivity: usize,
    /// Candidate list size while building (efConstruction).
    pub expansion_add: usize,
    /// Candidate list size while searching (ef); raised to k when k is larger.
    pub expansion_search: usize,
    /// Store vectors as f16 (half the memory, tiny recall cost) instead of f32.
    pub half_precision: bool,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 128,
            half_precision: false,
        }
    }
}

/// Approximate inner-product search on an HNSW graph (usearch).
pub struct HnswIndex {
    index: Index,
    params: HnswParams,
    dim: usize,
}

#[derive(Serialize, Deserialize)]
struct HnswMeta {
    dim: usize,
    len: usize,
    params: HnswParams,
}

fn ue(e: impl std::fmt::Display) -> IndexError {
    IndexError::Usearch(e.to_string())
}

fn options(dim: usize, p: &HnswParams) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        quantization: if p.half_precision {
            ScalarKind::F16
        } else {
            ScalarKind::F32
        },
        connectivity: p.connectivity,
        expansion_add: p.expansion_add,
        expansion_search: p.expansion_search,
        multi: false,
    }
}

impl HnswIndex {
    /// Builds a graph over row-major `vectors` (`dim` wide) on all cores.
    pub fn build(dim: usize, vectors: &[f32], params: HnswParams) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::WrongVectorDimension {
                expected: dim,
                received: vectors.len() % dim.max(1),
            });
        }
        let index = Index::new(&options(dim, &params)).map_err(ue)?;
        let n = vectors.len() / dim;
        index
            .reserve_capacity_and_threads(n.max(1), rayon::current_num_threads())
            .map_err(ue)?;
        vectors
            .par_chunks(dim)
            .enumerate()
            .try_for_each(|(i, v)| index.add(i as u64, v).map_err(ue))?;
        Ok(HnswIndex { index, params, dim })
    }

    /// The parameters it was built with.
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Reopens an index saved by [`ItemIndex::save`].
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join("hnsw.json");
        let meta: HnswMeta = serde_json::from_slice(&std::fs::read(&mp).map_err(io_err(&mp))?)
            .map_err(|e| IndexError::Corrupt {
                path: mp.clone(),
                message: e.to_string(),
            })?;
        let gp = dir.join("graph.usearch");
        let gps = gp.to_str().ok_or_else(|| IndexError::Corrupt {
            path: gp.clone(),
            message: "path is not UTF-8".into(),
        })?;
        let index = Index::new(&options(meta.dim, &meta.params)).map_err(ue)?;
        index.load(gps).map_err(|e| IndexError::Corrupt {
            path: gp.clone(),
            message: e.to_string(),
        })?;
        if index.size() != meta.len || index.dimensions() != meta.dim {
            return Err(IndexError::Corrupt {
                path: gp,
                message: format!(
                    "holds {} × {}, expected {} × {}",
                    index.size(),
                    index.dimensions(),
                    meta.len,
                    meta.dim
                ),
            });
        }
        index.change_expansion_search(meta.params.expansion_search);
        Ok(HnswIndex {
            index,
            params: meta.params,
            dim: meta.dim,
        })
    }
}

impl ItemIndex for HnswIndex {
    fn kind(&self) -> &'static str {
        "hnsw"
    }

    fn len(&self) -> usize {
        self.index.size()
    }

    fn search(&self, query: &SearchQuery<'_>, k: usize) -> Result<Vec<Hit>> {
        let v = query.vector.ok_or(IndexError::MissingVector("hnsw"))?;
        if v.len() != self.dim {
            return Err(IndexError::WrongVectorDimension {
                expected: self.dim,
                received: v.len(),
            });
        }
        let k = k.min(self.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        // When k is a large share of the index a scan is as cheap and returns exactly k.
        let m = if k * 4 >= self.len() {
            self.index.exact_search(v, k).map_err(ue)?
        } else {
            if self.index.expansion_search() < k {
                self.index.change_expansion_search(k);
            }
            self.index.search(v, k).map_err(ue)?
        };
        let mut hits: Vec<Hit> = m
            .keys
            .iter()
            .zip(&m.distances)
            .map(|(&key, &d)| Hit {
                item: key as u32,
                score: 1.0 - d,
            })
            .collect();
        sort_hits(&mut hits);
        Ok(hits)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        write_kind(dir, "hnsw")?;
        let gp = dir.join("graph.usearch");
        let gps = gp.to_str().ok_or_else(|| IndexError::Corrupt {
            path: gp.clone(),
            message: "path is not UTF-8".into(),
        })?;
        self.index.save(gps).map_err(ue)?;
        let mp = dir.join("hnsw.json");
        let meta = HnswMeta {
            dim: self.dim,
            len: self.len(),
            params: self.params,
        };
        std::fs::write(&mp, serde_json::to_vec(&meta).unwrap_or_default()).map_err(io_err(&mp))
    }
}
