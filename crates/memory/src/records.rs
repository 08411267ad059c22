//! Behaviour records: one entry per interaction, no LLM.

use mrrec_data::{Catalogue, Review};

use crate::{Level, MemoryEntry};

/// Longest record text (characters).
pub const RECORD_TEXT_CHARS: usize = 600;

fn cut(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The text of one interaction as the model reads it: item, category, rating, review.
pub fn record_text(review: &Review, catalogue: &Catalogue) -> String {
    let item = catalogue.by_id(&review.parent_asin);
    let title = item
        .map(|i| i.title.as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or(review.parent_asin.as_str());
    let category = item
        .and_then(|i| i.main_category.as_deref())
        .unwrap_or("unknown category");
    let mut s = format!(
        "Bought \"{}\" ({category}), rated {}/5.",
        cut(title, 160),
        review.rating
    );
    let head = review.title.trim();
    let body = review.text.trim();
    if !head.is_empty() || !body.is_empty() {
        s.push_str(&format!(
            " Review: {}",
            cut(&format!("{head}. {body}"), 400)
        ));
    }
    cut(&s, RECORD_TEXT_CHARS)
}

/// One record entry per review (embedding left empty for the caller to fill). Ids are stable:
/// `r-{item}-{timestamp}`.
pub fn record_entries(reviews: &[Review], catalogue: &Catalogue) -> Vec<MemoryEntry> {
    reviews
        .iter()
        .map(|r| MemoryEntry {
            id: format!("r-{}-{}", r.parent_asin, r.timestamp),
            level: Level::Record,
            category: catalogue
                .by_id(&r.parent_asin)
                .and_then(|i| i.main_category.clone()),
            text: record_text(r, catalogue),
            provenance: vec![r.parent_asin.clone()],
            embedding: Vec::new(),
            writer: None,
        })
        .collect()
}
