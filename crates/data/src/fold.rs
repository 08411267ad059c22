//! Folds of users for cross-validation inside `train`: choose prompts, thresholds and recipes
//! on `train` users the candidate never learnt from, so `val` is read once.
//!
//! A user's fold is a fixed function of their id (FNV-1a, 64 bits, modulo the number of folds),
//! so it does not depend on the data's order, the seed or which other users are present, and a
//! snapshot user (`{user}@{timestamp}`, see [`crate::derive::snapshot_id`]) is in its user's
//! fold: the requests derived from a user's purchases never train a model that is then checked
//! on that user.

use std::fmt;
use std::str::FromStr;

/// Fold `index` of `of` (1-based: `1/2` and `2/2` are the two halves), written `I/K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fold {
    /// Which fold, 1 to `of`.
    pub index: u32,
    /// How many folds (at least 2).
    pub of: u32,
}

impl Fold {
    /// Whether `user` (or the user a snapshot id names) is in this fold.
    pub fn holds(&self, user: &str) -> bool {
        fold_of(user, self.of) == self.index
    }
}

/// The fold (1 to `of`) of `user`: the user a snapshot id names, hashed.
pub fn fold_of(user: &str, of: u32) -> u32 {
    let base = crate::derive::snapshot_of(user).unwrap_or(user);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in base.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(of.max(1))) as u32 + 1
}

impl fmt::Display for Fold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.of)
    }
}

impl FromStr for Fold {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad =
            || format!("{s:?} is not a fold: write I/K, e.g. 1/2 (fold I of K, 1 ≤ I ≤ K, K ≥ 2)");
        let (i, k) = s.trim().split_once('/').ok_or_else(bad)?;
        let (index, of) = (
            i.trim().parse::<u32>().map_err(|_| bad())?,
            k.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if of < 2 || index == 0 || index > of {
            return Err(bad());
        }
        Ok(Fold { index, of })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_id_names_its_user_and_other_ids_name_none() {
        use crate::derive::{snapshot_id, snapshot_of};
        assert_eq!(
            snapshot_of(&snapshot_id("AB12", 1674000046253)),
            Some("AB12")
        );
        assert_eq!(snapshot_of("me@example@12"), Some("me@example"));
        for id in ["AB12", "a@", "@12", "a@12x", "me@example.com", ""] {
            assert_eq!(snapshot_of(id), None, "{id}");
        }
    }

    #[test]
    fn folds_parse_and_refuse_what_is_not_one() {
        assert_eq!("1/2".parse::<Fold>(), Ok(Fold { index: 1, of: 2 }));
        assert_eq!(" 3 / 5 ".parse::<Fold>(), Ok(Fold { index: 3, of: 5 }));
        assert_eq!(Fold { index: 2, of: 3 }.to_string(), "2/3");
        for bad in ["", "1", "0/2", "3/2", "1/1", "a/2", "1/b", "-1/2", "1/2/3"] {
            let e = bad.parse::<Fold>().unwrap_err();
            assert!(e.contains("I/K"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_user_is_in_exactly_one_fold_and_a_snapshot_in_its_users() {
        let users: Vec<String> = (0..2000).map(|i| format!("AE{i:05}XYZ")).collect();
        for of in [2u32, 3, 5] {
            let mut sizes = vec![0usize; of as usize];
            for u in &users {
                let holding: Vec<u32> = (1..=of)
                    .filter(|&i| Fold { index: i, of }.holds(u))
                    .collect();
                assert_eq!(holding.len(), 1, "{u}");
                sizes[holding[0] as usize - 1] += 1;
                assert_eq!(fold_of(&format!("{u}@1674000046253"), of), holding[0]);
            }
            // Roughly balanced: each fold within 20% of its share.
            let share = users.len() as f64 / f64::from(of);
            for s in &sizes {
                assert!((*s as f64 - share).abs() < 0.2 * share, "{of}: {sizes:?}");
            }
        }
        // Only a numeric suffix makes a snapshot: other ids are hashed whole.
        assert_eq!(fold_of("a@b", 1000), fold_of("a@b", 1000));
        assert_ne!(
            (0..50)
                .map(|i| fold_of(&format!("u{i}@x"), 1000))
                .collect::<Vec<_>>(),
            (0..50)
                .map(|i| fold_of(&format!("u{i}"), 1000))
                .collect::<Vec<_>>()
        );
        // Fixed across releases: the folds of published cross-validations stay the same.
        let ids = [
            "AE2DWV6OPSOUHDZEZQBC2MRYAOXA",
            "AE2U2E5TSZMH4DT4N2VUAATGX3QQ",
            "AFKZENTNBQ7A7V7UXW5JJI6UGRYQ",
        ];
        assert_eq!(ids.map(|u| fold_of(u, 2)), [1, 2, 2]);
        assert_eq!(ids.map(|u| fold_of(u, 5)), [1, 1, 1]);
    }
}
