use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{io_err, open_index, sort_hits, write_kind, Hit, ItemIndex, Result, SearchQuery};

/// Reciprocal-rank fusion of a lexical and a dense index: score = Σ 1 / (c + rank).
pub struct HybridIndex {
    lexical: Arc<dyn ItemIndex>,
    dense: Arc<dyn ItemIndex>,
    params: HybridParams,
}

/// Fusion parameters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HybridParams {
    /// The RRF constant c (60 in the original paper).
    pub c: f32,
    /// How deep each part is read (at least k).
    pub depth: usize,
}

impl Default for HybridParams {
    fn default() -> Self {
        HybridParams {
            c: 60.0,
            depth: 1000,
        }
    }
}

impl HybridIndex {
    /// Fuses `lexical` (reads the text) and `dense` (reads the vector).
    pub fn new(
        lexical: Arc<dyn ItemIndex>,
        dense: Arc<dyn ItemIndex>,
        params: HybridParams,
    ) -> Self {
        HybridIndex {
            lexical,
            dense,
            params,
        }
    }

    /// Reopens a hybrid index saved by [`ItemIndex::save`] (its parts live in `lexical/` and `dense/`).
    pub fn open(dir: &Path) -> Result<Self> {
        let pp = dir.join("hybrid.json");
        let params: HybridParams =
            serde_json::from_slice(&std::fs::read(&pp).map_err(io_err(&pp))?).map_err(|e| {
                crate::IndexError::Corrupt {
                    path: pp.clone(),
                    message: e.to_string(),
                }
            })?;
        Ok(HybridIndex {
            lexical: Arc::from(open_index(&dir.join("lexical"))?),
            dense: Arc::from(open_index(&dir.join("dense"))?),
            params,
        })
    }
}

impl ItemIndex for HybridIndex {
    fn kind(&self) -> &'static str {
        "hybrid"
    }

    fn len(&self) -> usize {
        self.lexical.len().max(self.dense.len())
    }

    fn search(&self, query: &SearchQuery<'_>, k: usize) -> Result<Vec<Hit>> {
        let k = k.min(self.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let depth = self.params.depth.max(k);
        let mut fused: HashMap<u32, f32> = HashMap::new();
        for part in [&self.lexical, &self.dense] {
            for (rank, h) in part.search(query, depth)?.iter().enumerate() {
                *fused.entry(h.item).or_insert(0.0) += 1.0 / (self.params.c + rank as f32 + 1.0);
            }
        }
        let mut hits: Vec<Hit> = fused
            .into_iter()
            .map(|(item, score)| Hit { item, score })
            .collect();
        sort_hits(&mut hits);
        hits.truncate(k);
        Ok(hits)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        write_kind(dir, "hybrid")?;
        self.lexical.save(&dir.join("lexical"))?;
        self.dense.save(&dir.join("dense"))?;
        let pp = dir.join("hybrid.json");
        std::fs::write(&pp, serde_json::to_vec(&self.params).unwrap_or_default())
            .map_err(io_err(&pp))
    }
}
