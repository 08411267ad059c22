use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::catalogue::truncate_chars;
use crate::lines::{JsonlLine, JsonlReader};
use crate::{Catalogue, IngestReport, LoadOptions, Result};

/// Review text longer than this is cut when loaded.
pub const MAX_REVIEW_CHARS: usize = 8192;

/// One Amazon Reviews 2023 review: a user's interaction with an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// The reviewer.
    pub user_id: String,
    /// The item (catalogue id).
    pub parent_asin: String,
    /// Star rating, 1–5.
    pub rating: f32,
    /// Review headline.
    #[serde(default, deserialize_with = "string_or_null")]
    pub title: String,
    /// Review body.
    #[serde(default, deserialize_with = "string_or_null")]
    pub text: String,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    /// Whether Amazon verified the purchase.
    #[serde(default)]
    pub verified_purchase: Option<bool>,
}

fn string_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Every user's reviews, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    by_user: HashMap<String, Vec<Review>>,
}

impl Histories {
    /// Reads a reviews file. With a catalogue, reviews of items not in it are counted and skipped.
    pub fn load(
        path: &Path,
        catalogue: Option<&Catalogue>,
        opts: &LoadOptions,
    ) -> Result<(Self, IngestReport)> {
        let mut report = IngestReport::new(path, opts);
        let mut by_user: HashMap<String, Vec<Review>> = HashMap::new();
        let mut reader = JsonlReader::open(path)?;
        while let Some(line) = reader.next_line()? {
            report.records += 1;
            let (n, text) = match line {
                JsonlLine::Text(n, t) => (n, t),
                JsonlLine::Bad(n, reason) => {
                    report.skip("unreadable line", n, reason)?;
                    continue;
                }
            };
            let mut review: Review = match serde_json::from_str(&text) {
                Ok(r) => r,
                Err(e) => {
                    let kind = if e.is_syntax() || e.is_eof() {
                        "malformed JSON"
                    } else {
                        "invalid field"
                    };
                    report.skip(kind, n, e.to_string())?;
                    continue;
                }
            };
            if review.user_id.trim().is_empty() || review.parent_asin.trim().is_empty() {
                report.skip("missing field", n, "empty `user_id` or `parent_asin`")?;
                continue;
            }
            if !(0.0..=5.0).contains(&review.rating) || !review.rating.is_finite() {
                report.skip(
                    "invalid field",
                    n,
                    format!("`rating` {} outside 0..=5", review.rating),
                )?;
                continue;
            }
            if let Some(cat) = catalogue {
                if cat.position(&review.parent_asin).is_none() {
                    report.skip(
                        "unknown item",
                        n,
                        format!("item {:?} is not in the catalogue", review.parent_asin),
                    )?;
                    continue;
                }
            }
            review.text = truncate_chars(review.text, MAX_REVIEW_CHARS);
            review.title = truncate_chars(review.title, MAX_REVIEW_CHARS);
            by_user
                .entry(review.user_id.clone())
                .or_default()
                .push(review);
            report.accepted += 1;
        }
        for reviews in by_user.values_mut() {
            reviews.sort_by_key(|r| r.timestamp);
        }
        Ok((Histories { by_user }, report))
    }

    /// Builds histories from reviews (sorted per user by time).
    pub fn from_reviews(reviews: impl IntoIterator<Item = Review>) -> Self {
        let mut by_user: HashMap<String, Vec<Review>> = HashMap::new();
        for r in reviews {
            by_user.entry(r.user_id.clone()).or_default().push(r);
        }
        for v in by_user.values_mut() {
            v.sort_by_key(|r| r.timestamp);
        }
        Histories { by_user }
    }

    /// A user's reviews, oldest first (empty for an unknown user).
    pub fn of(&self, user: &str) -> &[Review] {
        self.by_user.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A user's reviews strictly before `timestamp` (all of them when `None`).
    pub fn before(&self, user: &str, timestamp: Option<i64>) -> &[Review] {
        let all = self.of(user);
        match timestamp {
            Some(t) => &all[..all.partition_point(|r| r.timestamp < t)],
            None => all,
        }
    }

    /// Whether the user has any history.
    pub fn contains(&self, user: &str) -> bool {
        self.by_user.contains_key(user)
    }

    /// Number of users.
    pub fn users(&self) -> usize {
        self.by_user.len()
    }

    /// Users in sorted order (deterministic iteration).
    pub fn user_ids(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_user.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Total number of reviews.
    pub fn total(&self) -> usize {
        self.by_user.values().map(Vec::len).sum()
    }
}
