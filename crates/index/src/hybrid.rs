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

/// Reciprocal-rank fusion of ranked lists: each item scores Σ 1 / (c + its 1-based rank) over the
/// lists it appears in; the best `k`, ties by item id. Used by [`HybridIndex`] and by anything
/// that fuses rankings of different texts (the assistant's profile with its request).
pub fn rrf(parts: &[Vec<Hit>], c: f32, k: usize) -> Vec<Hit> {
    fuse(parts.iter().map(|p| (p.as_slice(), 1.0)), c, k)
}

/// [`rrf`] with a weight per list: an item scores Σ w / (c + its 1-based rank).
pub fn weighted_rrf(parts: &[(Vec<Hit>, f32)], c: f32, k: usize) -> Vec<Hit> {
    fuse(parts.iter().map(|(p, w)| (p.as_slice(), *w)), c, k)
}

fn fuse<'a>(parts: impl Iterator<Item = (&'a [Hit], f32)>, c: f32, k: usize) -> Vec<Hit> {
    let mut fused: HashMap<u32, f32> = HashMap::new();
    for (part, w) in parts {
        for (rank, h) in part.iter().enumerate() {
            *fused.entry(h.item).or_insert(0.0) += w / (c + rank as f32 + 1.0);
        }
    }
    let mut hits: Vec<Hit> = fused
        .into_iter()
        .map(|(item, score)| Hit { item, score })
        .collect();
    sort_hits(&mut hits);
    hits.truncate(k);
    hits
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
        let parts = [
            self.lexical.search(query, depth)?,
            self.dense.search(query, depth)?,
        ];
        Ok(rrf(&parts, self.params.c, k))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[u32]) -> Vec<Hit> {
        items.iter().map(|&item| Hit { item, score: 0.0 }).collect()
    }

    #[test]
    fn rrf_rewards_agreement_and_breaks_ties_by_item() {
        // 7 is second in both lists: 2 / 62 beats 1 / 61 for the lists' leaders alone.
        let fused = rrf(&[list(&[5, 7, 9]), list(&[3, 7])], 60.0, 10);
        let items: Vec<u32> = fused.iter().map(|h| h.item).collect();
        assert_eq!(items, [7, 3, 5, 9]);
        assert!((fused[0].score - 2.0 / 62.0).abs() < 1e-7);
        // 3 and 5 tie (both first once): the smaller id first.
        assert_eq!(fused[1].score, fused[2].score);
        assert_eq!(rrf(&[list(&[5, 7, 9]), list(&[3, 7])], 60.0, 2).len(), 2);
        assert!(rrf(&[], 60.0, 5).is_empty());
    }

    #[test]
    fn weighted_rrf_lets_the_heavier_list_lead_and_weight_one_is_rrf() {
        let (a, b) = (list(&[5, 7, 9]), list(&[3, 7, 9]));
        let ids = |h: Vec<Hit>| h.into_iter().map(|h| h.item).collect::<Vec<_>>();
        assert_eq!(
            weighted_rrf(&[(a.clone(), 1.0), (b.clone(), 1.0)], 60.0, 10),
            rrf(&[a.clone(), b.clone()], 60.0, 10)
        );
        // b weighs four times a: b's first item leads a's, shared items keep the top.
        assert_eq!(
            ids(weighted_rrf(
                &[(a.clone(), 0.25), (b.clone(), 1.0)],
                60.0,
                10
            )),
            vec![7, 9, 3, 5]
        );
        // Weight 0 is b alone (a's items that b lacks score 0 and follow, by id).
        assert_eq!(
            ids(weighted_rrf(&[(a, 0.0), (b, 1.0)], 60.0, 3)),
            vec![3, 7, 9]
        );
    }
}
