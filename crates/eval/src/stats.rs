//! Bootstrap confidence intervals and paired comparisons, resampling users (a user's queries
//! stay together, since they are not independent).

use std::collections::{BTreeMap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A mean with its 95% percentile-bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Mean over queries.
    pub mean: f64,
    /// 2.5th percentile of the bootstrap means.
    pub lo: f64,
    /// 97.5th percentile of the bootstrap means.
    pub hi: f64,
}

fn group_by_user<'a>(users: &[&'a str]) -> Vec<Vec<usize>> {
    let mut groups: BTreeMap<&'a str, Vec<usize>> = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        groups.entry(u).or_default().push(i);
    }
    groups.into_values().collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn resampled_means(values: &[f64], users: &[&str], rounds: usize, seed: u64) -> Vec<f64> {
    let groups = group_by_user(users);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means = Vec::with_capacity(rounds);
    if groups.is_empty() {
        return means;
    }
    for _ in 0..rounds {
        let (mut sum, mut n) = (0.0, 0usize);
        for _ in 0..groups.len() {
            let g = &groups[rng.gen_range(0..groups.len())];
            for &i in g {
                sum += values[i];
                n += 1;
            }
        }
        means.push(if n == 0 { 0.0 } else { sum / n as f64 });
    }
    means.sort_by(f64::total_cmp);
    means
}

/// Mean of `values` with a 95% interval from `rounds` user-level bootstrap resamples.
pub fn bootstrap(values: &[f64], users: &[&str], rounds: usize, seed: u64) -> Estimate {
    let mean = if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    };
    let means = resampled_means(values, users, rounds, seed);
    Estimate {
        mean,
        lo: percentile(&means, 0.025),
        hi: percentile(&means, 0.975),
    }
}

/// The paired comparison of two runs on the same queries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedComparison {
    /// Queries present in both runs.
    pub n: usize,
    /// Mean of A.
    pub mean_a: f64,
    /// Mean of B.
    pub mean_b: f64,
    /// Mean of A − B with its 95% interval.
    pub diff: Estimate,
    /// Two-sided bootstrap p-value for "A and B have the same mean".
    pub p_value: f64,
    /// Queries where A is above B.
    #[serde(default)]
    pub up: usize,
    /// Queries where A is below B.
    #[serde(default)]
    pub down: usize,
}

impl PairedComparison {
    /// Every query that moved moved the same way: the bootstrap p-value is then ~0 at any
    /// size, and says only that nothing moved the other way (`None` otherwise).
    pub fn one_sided(&self) -> Option<&'static str> {
        match (self.up, self.down) {
            (u, 0) if u > 0 => Some("≥"),
            (0, d) if d > 0 => Some("≤"),
            _ => None,
        }
    }
}

/// Compares per-query values of A and B, matched by query id, resampling users.
pub fn paired(
    a: &HashMap<String, (String, f64)>,
    b: &HashMap<String, (String, f64)>,
    rounds: usize,
    seed: u64,
) -> PairedComparison {
    let mut qids: Vec<&String> = a.keys().filter(|q| b.contains_key(*q)).collect();
    qids.sort();
    let users: Vec<&str> = qids.iter().map(|q| a[*q].0.as_str()).collect();
    let diffs: Vec<f64> = qids.iter().map(|q| a[*q].1 - b[*q].1).collect();
    let n = qids.len();
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (s, c) = v.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
        if c == 0 {
            0.0
        } else {
            s / c as f64
        }
    };
    let mean_a = mean(&mut qids.iter().map(|q| a[*q].1));
    let mean_b = mean(&mut qids.iter().map(|q| b[*q].1));
    let means = resampled_means(&diffs, &users, rounds, seed);
    let d = mean(&mut diffs.iter().copied());
    let p_value = if means.is_empty() || diffs.iter().all(|&x| x == 0.0) {
        1.0
    } else {
        let le = means.iter().filter(|&&m| m <= 0.0).count() as f64 / means.len() as f64;
        let ge = means.iter().filter(|&&m| m >= 0.0).count() as f64 / means.len() as f64;
        (2.0 * le.min(ge)).min(1.0)
    };
    PairedComparison {
        n,
        mean_a,
        mean_b,
        diff: Estimate {
            mean: d,
            lo: percentile(&means, 0.025),
            hi: percentile(&means, 0.975),
        },
        p_value,
        up: diffs.iter().filter(|&&x| x > 0.0).count(),
        down: diffs.iter().filter(|&&x| x < 0.0).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_contains_mean_and_is_deterministic() {
        let values: Vec<f64> = (0..200).map(|i| (i % 7) as f64 / 7.0).collect();
        let users: Vec<String> = (0..200).map(|i| format!("u{}", i / 3)).collect();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let e = bootstrap(&values, &users, 500, 7);
        assert!(e.lo <= e.mean && e.mean <= e.hi, "{e:?}");
        assert!(e.hi - e.lo > 0.0);
        assert_eq!(e, bootstrap(&values, &users, 500, 7));
    }

    #[test]
    fn paired_detects_a_clear_difference_and_not_a_null_one() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        let mut c = HashMap::new();
        for i in 0..100 {
            let u = format!("u{i}");
            a.insert(format!("q{i}"), (u.clone(), 0.5 + (i % 3) as f64 * 0.1));
            b.insert(format!("q{i}"), (u.clone(), 0.2 + (i % 3) as f64 * 0.1));
            c.insert(format!("q{i}"), (u, 0.5 + (i % 3) as f64 * 0.1));
        }
        let ab = paired(&a, &b, 1000, 1);
        assert_eq!(ab.n, 100);
        assert!((ab.diff.mean - 0.3).abs() < 1e-9);
        assert!(ab.p_value < 0.01);
        let ac = paired(&a, &c, 1000, 1);
        assert_eq!(ac.p_value, 1.0);
        // Every query moved up: counted, and said to be one-sided; a tie is neither.
        assert_eq!((ab.up, ab.down, ab.one_sided()), (100, 0, Some("≥")));
        assert_eq!((ac.up, ac.down, ac.one_sided()), (0, 0, None));
        let ba = paired(&b, &a, 1000, 1);
        assert_eq!((ba.up, ba.down, ba.one_sided()), (0, 100, Some("≤")));
        // Some up, some down: two-sided.
        c.insert("q0".into(), ("u0".into(), 0.0));
        c.insert("q1".into(), ("u1".into(), 1.0));
        let ac = paired(&a, &c, 1000, 1);
        assert_eq!((ac.up, ac.down, ac.one_sided()), (1, 1, None));
    }
}
