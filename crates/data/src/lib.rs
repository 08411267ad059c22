//! Real data in: Amazon Reviews 2023 (reviews, item metadata) and Amazon-C4 (`test.csv`,
//! `sampled_item_metadata_1M.jsonl`), streamed from `.jsonl`, `.jsonl.gz` or `.csv`.
//!
//! Out: a [`Catalogue`] of items with their retrieval text, per-user [`Histories`], and a
//! [`QuerySet`] whose split rules are enforced here. Methods receive [`Query`] values, which have
//! no target and no original review by construction; only the evaluator holds [`LabeledQuery`].
//!
//! Bad input is counted and reported with file, line and reason ([`IngestReport`]), or turned into
//! an error with [`LoadOptions::strict`].

mod catalogue;
mod dataset;
pub mod derive;
mod error;
mod fold;
mod lines;
mod queries;
mod report;
mod reviews;

pub use catalogue::{item_text, Catalogue, Item, ItemMeta, MAX_ITEM_TEXT_CHARS};
pub use dataset::{Dataset, DatasetFiles};
pub use error::DataError;
pub use fold::{fold_of, Fold};
pub use lines::{open_text, JsonlReader};
pub use queries::{HeldOutReview, LabeledQuery, Purpose, Query, QueryField, QuerySet, Split};
pub use report::{IngestReport, Issue, LoadOptions};
pub use reviews::{Histories, Review};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
