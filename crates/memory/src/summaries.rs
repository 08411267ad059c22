//! Preference patterns (per user and category) and the user profile (per user), as a chat model
//! wrote them from the user's records (the prompts are the agent's, `mrrec_agent::prompts`), cut
//! into 1–2 sentence segments, and checked for claims their sources do not support.

use crate::{Level, MemoryEntry};

/// Cuts a summary into self-contained segments of one or two sentences (at most `max`).
pub fn segments(text: &str, max: usize) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        cur.push(ch);
        if matches!(ch, '.' | '!' | '?' | '\n') {
            let s = cur
                .trim()
                .trim_start_matches(['-', '*', '•', ' '])
                .trim()
                .to_string();
            if s.chars().filter(|c| c.is_alphanumeric()).count() >= 12 {
                sentences.push(s);
            }
            cur.clear();
        }
    }
    let tail = cur.trim().to_string();
    if tail.chars().filter(|c| c.is_alphanumeric()).count() >= 12 {
        sentences.push(tail);
    }
    let mut out: Vec<String> = Vec::new();
    for s in sentences {
        // Pair a short sentence with the previous one when that one is short too.
        match out.last_mut() {
            Some(prev) if prev.len() < 80 && s.len() < 80 && !prev.contains(". ") => {
                prev.push(' ');
                prev.push_str(&s);
            }
            _ => out.push(s),
        }
    }
    out.truncate(max);
    out
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Pattern entries of one category written by model `writer` (embeddings left empty).
pub fn pattern_entries(
    category: &str,
    text: &str,
    sources: &[String],
    writer: &str,
) -> Vec<MemoryEntry> {
    segments(text, 6)
        .into_iter()
        .enumerate()
        .map(|(i, t)| MemoryEntry {
            id: format!("p-{}-{i}", slug(category)),
            level: Level::Pattern,
            category: Some(category.to_string()),
            text: t,
            provenance: sources.to_vec(),
            embedding: Vec::new(),
            writer: Some(writer.to_string()),
        })
        .collect()
}

/// Profile entries written by model `writer` (embeddings left empty).
pub fn profile_entries(text: &str, sources: &[String], writer: &str) -> Vec<MemoryEntry> {
    segments(text, 6)
        .into_iter()
        .enumerate()
        .map(|(i, t)| MemoryEntry {
            id: format!("u-{i}"),
            level: Level::Profile,
            category: None,
            text: t,
            provenance: sources.to_vec(),
            embedding: Vec::new(),
            writer: Some(writer.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_sentences_paired_when_short() {
        let s = segments("Prefers Sony headphones. Budget under $50.\n- Likes compact designs with long battery life, especially for travel.\nok.", 10);
        assert_eq!(
            s,
            vec![
                "Prefers Sony headphones. Budget under $50.".to_string(),
                "Likes compact designs with long battery life, especially for travel.".to_string(),
            ]
        );
        assert!(segments("", 5).is_empty());
        assert_eq!(
            segments(&"A long sentence about preferences here. ".repeat(20), 3).len(),
            3
        );
    }
}

/// The checkable claims of a summary: numbers (prices, sizes, ratings) and capitalised names
/// (brands, product lines) that are not the first word of a sentence.
pub fn claims(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut sentence_start = true;
    for raw in text.split_whitespace() {
        let w: String = raw
            .trim_matches(|c: char| !c.is_alphanumeric() && c != '$' && c != '.')
            .trim_end_matches('.')
            .to_string();
        let ends = raw.ends_with(['.', '!', '?']);
        if !w.is_empty() {
            let is_number = w.chars().any(|c| c.is_ascii_digit());
            let is_name =
                !sentence_start && w.chars().next().is_some_and(char::is_uppercase) && w.len() > 1;
            if is_number || is_name {
                out.push(w);
            }
        }
        sentence_start = ends;
    }
    out
}

/// How many of `text`'s claims appear in `source` (case-insensitive): (supported, total).
pub fn faithfulness(text: &str, source: &str) -> (usize, usize) {
    let src = source.to_lowercase();
    let c = claims(text);
    let ok = c.iter().filter(|w| src.contains(&w.to_lowercase())).count();
    (ok, c.len())
}

#[cfg(test)]
mod faithfulness_tests {
    use super::*;

    #[test]
    fn claims_are_numbers_and_names() {
        assert_eq!(
            claims("Prefers Sony and Bose headphones under $50. They like 3-pack sets."),
            vec!["Sony", "Bose", "$50", "3-pack"]
        );
        assert_eq!(
            faithfulness("Buys Sony gear for $49.", "Bought Sony WH-1000 for $30"),
            (1, 2)
        );
    }
}
