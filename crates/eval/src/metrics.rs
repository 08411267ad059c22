//! Ranking metrics with one or several relevant items, exactly as MR.Rec scores rankings.

/// Recall@k with one relevant item: 1 when its 1-based `rank` is within k.
pub fn recall_at(rank: Option<usize>, k: usize) -> f64 {
    match rank {
        Some(r) if r >= 1 && r <= k => 1.0,
        _ => 0.0,
    }
}

/// NDCG@k with one relevant item: 1 / log2(rank + 1) when rank ≤ k.
pub fn ndcg_at(rank: Option<usize>, k: usize) -> f64 {
    match rank {
        Some(r) if r >= 1 && r <= k => 1.0 / ((r + 1) as f64).log2(),
        _ => 0.0,
    }
}

/// Reciprocal rank (0 when not ranked).
pub fn reciprocal_rank(rank: Option<usize>) -> f64 {
    match rank {
        Some(r) if r >= 1 => 1.0 / r as f64,
        _ => 0.0,
    }
}

/// Recall@k with several relevant items: the share of them ranked within k.
/// `ranks` are the 1-based ranks of the relevant items that were ranked at all.
pub fn recall_at_multi(ranks: &[usize], relevant: usize, k: usize) -> f64 {
    if relevant == 0 {
        return 0.0;
    }
    ranks.iter().filter(|&&r| r >= 1 && r <= k).count() as f64 / relevant as f64
}

/// NDCG@k with several relevant items (binary gains): DCG over the ideal DCG.
pub fn ndcg_at_multi(ranks: &[usize], relevant: usize, k: usize) -> f64 {
    if relevant == 0 {
        return 0.0;
    }
    let dcg: f64 = ranks
        .iter()
        .filter(|&&r| r >= 1 && r <= k)
        .map(|&r| 1.0 / ((r + 1) as f64).log2())
        .sum();
    let idcg: f64 = (1..=relevant.min(k))
        .map(|r| 1.0 / ((r + 1) as f64).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

/// The 1-based rank of `target` in `ranking`.
pub fn rank_of<T: PartialEq>(ranking: &[T], target: &T) -> Option<usize> {
    ranking.iter().position(|x| x == target).map(|i| i + 1)
}

/// A metric by name: `R@k`, `N@k` or `MRR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Recall@k.
    Recall(usize),
    /// NDCG@k.
    Ndcg(usize),
    /// Mean reciprocal rank.
    Mrr,
}

impl Metric {
    /// The metric's value for one query whose target has this rank.
    pub fn of(self, rank: Option<usize>) -> f64 {
        match self {
            Metric::Recall(k) => recall_at(rank, k),
            Metric::Ndcg(k) => ndcg_at(rank, k),
            Metric::Mrr => reciprocal_rank(rank),
        }
    }

    /// The name used in reports and `metrics.json` ("R@100", "N@10", "MRR").
    pub fn name(self) -> String {
        match self {
            Metric::Recall(k) => format!("R@{k}"),
            Metric::Ndcg(k) => format!("N@{k}"),
            Metric::Mrr => "MRR".into(),
        }
    }

    /// Parses a name written by [`Metric::name`].
    pub fn parse(s: &str) -> Option<Metric> {
        if s.eq_ignore_ascii_case("mrr") {
            return Some(Metric::Mrr);
        }
        let (kind, k) = s.split_once('@')?;
        let k: usize = k.parse().ok()?;
        match kind {
            "R" | "r" | "Recall" => Some(Metric::Recall(k)),
            "N" | "n" | "NDCG" => Some(Metric::Ndcg(k)),
            _ => None,
        }
    }

    /// The metrics reported for cut-offs `ks`: R@k and N@k for each, then MRR.
    pub fn standard(ks: &[usize]) -> Vec<Metric> {
        let mut v: Vec<Metric> = ks.iter().map(|&k| Metric::Recall(k)).collect();
        v.extend(ks.iter().map(|&k| Metric::Ndcg(k)));
        v.push(Metric::Mrr);
        v
    }

    /// The paper's table columns: R@100, R@10, N@100, N@10.
    pub fn paper_columns() -> [Metric; 4] {
        [
            Metric::Recall(100),
            Metric::Recall(10),
            Metric::Ndcg(100),
            Metric::Ndcg(10),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_item_values() {
        assert_eq!(ndcg_at(Some(1), 10), 1.0);
        assert!((ndcg_at(Some(3), 10) - 0.5).abs() < 1e-12);
        assert_eq!(ndcg_at(Some(11), 10), 0.0);
        assert_eq!(ndcg_at(None, 10), 0.0);
        assert_eq!(recall_at(Some(10), 10), 1.0);
        assert_eq!(recall_at(Some(11), 10), 0.0);
        assert_eq!(reciprocal_rank(Some(4)), 0.25);
    }

    #[test]
    fn multi_reduces_to_single() {
        for r in 1..50 {
            assert!((ndcg_at_multi(&[r], 1, 20) - ndcg_at(Some(r), 20)).abs() < 1e-12);
            assert_eq!(recall_at_multi(&[r], 1, 20), recall_at(Some(r), 20));
        }
        assert!((ndcg_at_multi(&[1, 2], 2, 10) - 1.0).abs() < 1e-12);
        assert!(ndcg_at_multi(&[2, 3], 2, 10) < 1.0);
    }

    #[test]
    fn names_round_trip() {
        for m in Metric::standard(&[10, 100, 1000]) {
            assert_eq!(Metric::parse(&m.name()), Some(m));
        }
    }
}
