use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::lines::{JsonlLine, JsonlReader};
use crate::{IngestReport, LoadOptions, Result};

/// Item text longer than this is cut (the embedder reads 256 tokens at most; BM25 needs no more).
pub const MAX_ITEM_TEXT_CHARS: usize = 4096;

/// One Amazon Reviews 2023 item-metadata record (the fields retrieval uses; the rest are ignored).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ItemMeta {
    /// The item id reviews point to.
    pub parent_asin: String,
    /// Product title.
    #[serde(default, deserialize_with = "string_or_null")]
    pub title: String,
    /// Amazon's display category ("Movies & TV").
    #[serde(default)]
    pub main_category: Option<String>,
    /// Description paragraphs.
    #[serde(default, deserialize_with = "strings_or_null")]
    pub description: Vec<String>,
    /// Bullet-point features.
    #[serde(default, deserialize_with = "strings_or_null")]
    pub features: Vec<String>,
    /// Store / brand name.
    #[serde(default)]
    pub store: Option<String>,
    /// Price: a number, a string such as "$12.99", or null.
    #[serde(default)]
    pub price: Value,
}

fn string_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

fn strings_or_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// The text an item is retrieved by: title, description, features, store, category and price, in
/// that order, each only when present, cut at [`MAX_ITEM_TEXT_CHARS`]. This is the one place that
/// decides it (Amazon-C4 builds its `metadata` the same way from title and description).
pub fn item_text(meta: &ItemMeta) -> String {
    let mut parts: Vec<String> = Vec::new();
    let title = meta.title.trim();
    if !title.is_empty() {
        parts.push(title.to_string());
    }
    let description = join_nonempty(&meta.description, " ");
    if !description.is_empty() {
        parts.push(description);
    }
    let features = join_nonempty(&meta.features, "; ");
    if !features.is_empty() {
        parts.push(format!("Features: {features}"));
    }
    if let Some(store) = meta
        .store
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        parts.push(format!("Store: {store}"));
    }
    if let Some(cat) = meta
        .main_category
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        parts.push(format!("Category: {cat}"));
    }
    match &meta.price {
        Value::Number(n) => parts.push(format!("Price: ${n}")),
        Value::String(s) if s.trim().starts_with('$') || s.trim().parse::<f64>().is_ok() => {
            parts.push(format!("Price: {}", s.trim()))
        }
        _ => {}
    }
    truncate_chars(parts.join(". "), MAX_ITEM_TEXT_CHARS)
}

fn join_nonempty(items: &[String], sep: &str) -> String {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(sep)
}

pub(crate) fn truncate_chars(mut s: String, max: usize) -> String {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
    s
}

/// One catalogue item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The item id (`parent_asin` / C4 `item_id`).
    pub id: String,
    /// Product title ("" when unknown; C4 pool rows carry only their metadata text).
    pub title: String,
    /// Amazon's display category, or the C4 row's category.
    pub main_category: Option<String>,
    /// The text retrieval ranks by (see [`item_text`]).
    pub text: String,
}

/// The items a method ranks, with O(1) lookup by id. Item positions (`u32`) are stable for a
/// given input and are what indexes store.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    items: Vec<Item>,
    by_id: HashMap<String, u32>,
}

#[derive(Deserialize)]
struct C4PoolRow {
    item_id: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(default, deserialize_with = "string_or_null")]
    metadata: String,
}

impl Catalogue {
    /// Builds a catalogue from items; a duplicate id keeps the first and is returned as an error
    /// string for the caller to report.
    pub fn from_items(items: impl IntoIterator<Item = Item>) -> (Self, Vec<String>) {
        let mut cat = Catalogue::default();
        let mut dups = Vec::new();
        for item in items {
            if cat.by_id.contains_key(&item.id) {
                dups.push(item.id);
            } else {
                cat.push_unchecked(item);
            }
        }
        (cat, dups)
    }

    fn push_unchecked(&mut self, item: Item) {
        let idx = self.items.len() as u32;
        self.by_id.insert(item.id.clone(), idx);
        self.items.push(item);
    }

    /// Reads an item-metadata file: Amazon Reviews 2023 `meta*.jsonl` (rows with `parent_asin`) or
    /// Amazon-C4 `sampled_item_metadata_1M.jsonl` (rows with `item_id` and `metadata`), detected per
    /// row. Bad rows and duplicate ids are counted in the report and skipped.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<(Self, IngestReport)> {
        let mut report = IngestReport::new(path, opts);
        let mut cat = Catalogue::default();
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
            let item = match parse_item(&text) {
                Ok(item) => item,
                Err((kind, reason)) => {
                    report.skip(kind, n, reason)?;
                    continue;
                }
            };
            if item.id.trim().is_empty() {
                report.skip("missing field", n, "empty item id")?;
                continue;
            }
            if cat.by_id.contains_key(&item.id) {
                report.skip(
                    "duplicate id",
                    n,
                    format!("duplicate item id {:?}", item.id),
                )?;
                continue;
            }
            cat.push_unchecked(item);
            report.accepted += 1;
        }
        Ok((cat, report))
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// All items in position order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The item at a position.
    pub fn get(&self, idx: u32) -> Option<&Item> {
        self.items.get(idx as usize)
    }

    /// The position of an item id.
    pub fn position(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The item with this id.
    pub fn by_id(&self, id: &str) -> Option<&Item> {
        self.position(id).and_then(|i| self.get(i))
    }

    /// A sub-catalogue: every item whose id is in `keep`, plus the first `extra` others in file
    /// order. Used to run CI and quick experiments on a slice while keeping every query's target.
    pub fn slice(&self, keep: &std::collections::HashSet<String>, extra: usize) -> Catalogue {
        let mut out = Catalogue::default();
        let mut added = 0;
        for item in &self.items {
            if keep.contains(&item.id) {
                out.push_unchecked(item.clone());
            } else if added < extra {
                out.push_unchecked(item.clone());
                added += 1;
            }
        }
        out
    }
}

fn parse_item(text: &str) -> std::result::Result<Item, (&'static str, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| ("malformed JSON", e.to_string()))?;
    let Value::Object(map) = &value else {
        return Err(("malformed JSON", "expected a JSON object".into()));
    };
    if map.contains_key("parent_asin") {
        let meta: ItemMeta =
            serde_json::from_value(value).map_err(|e| ("invalid field", e.to_string()))?;
        let text = item_text(&meta);
        Ok(Item {
            id: meta.parent_asin,
            title: truncate_chars(meta.title.trim().to_string(), MAX_ITEM_TEXT_CHARS),
            main_category: meta.main_category,
            text,
        })
    } else if map.contains_key("item_id") {
        let row: C4PoolRow =
            serde_json::from_value(value).map_err(|e| ("invalid field", e.to_string()))?;
        let text = truncate_chars(row.metadata.trim().to_string(), MAX_ITEM_TEXT_CHARS);
        Ok(Item {
            id: row.item_id,
            title: String::new(),
            main_category: row.category,
            text,
        })
    } else {
        Err((
            "missing field",
            "missing field `parent_asin` (Amazon Reviews 2023) or `item_id` (Amazon-C4)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_text_uses_present_fields_in_order() {
        let meta = ItemMeta {
            parent_asin: "A1".into(),
            title: " Pillow ".into(),
            main_category: Some("Health".into()),
            description: vec!["Soft.".into(), " ".into()],
            features: vec!["CPAP friendly".into(), "washable".into()],
            store: Some("Acme".into()),
            price: serde_json::json!(12.5),
        };
        assert_eq!(
            item_text(&meta),
            "Pillow. Soft.. Features: CPAP friendly; washable. Store: Acme. Category: Health. Price: $12.5"
        );
        let bare = ItemMeta {
            parent_asin: "A2".into(),
            title: "Gandhi".into(),
            main_category: Some("Prime Video".into()),
            price: serde_json::json!("None"),
            ..Default::default()
        };
        assert_eq!(item_text(&bare), "Gandhi. Category: Prime Video");
    }

    #[test]
    fn item_text_is_capped() {
        let meta = ItemMeta {
            parent_asin: "A".into(),
            title: "é".repeat(10_000),
            ..Default::default()
        };
        assert_eq!(item_text(&meta).chars().count(), MAX_ITEM_TEXT_CHARS);
    }
}
