//! MR.Rec's hierarchical memory: per-user local memory (behaviour records, preference patterns,
//! user profile), stored as retrievable entries with embeddings, behind read and write traits with
//! a tenant id in every key. A retrieval names its tenant and user, and the store only ever reads
//! that user's rows: there is no code path that scores another user's entries.

mod records;
mod sqlite;
pub mod summaries;

use serde::{Deserialize, Serialize};

pub use records::{record_entries, record_text, RECORD_TEXT_CHARS};
pub use sqlite::SqliteStore;

/// Errors of the memory layer.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The store failed.
    #[error("memory store {path}: {message}")]
    Store { path: String, message: String },
    /// An embedding of the wrong width.
    #[error("entry {id}: embedding has {received} dimensions, the store holds {expected}")]
    Dimension {
        id: String,
        expected: usize,
        received: usize,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// The level of a local-memory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// One raw interaction (no LLM).
    Record,
    /// A segment of a per-category preference summary.
    Pattern,
    /// A segment of the user profile.
    Profile,
}

impl Level {
    /// Every level.
    pub const ALL: [Level; 3] = [Level::Record, Level::Pattern, Level::Profile];

    /// Stable name used in ids and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Record => "record",
            Level::Pattern => "pattern",
            Level::Profile => "profile",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// Who a memory belongs to: a tenant and a user within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner<'a> {
    /// The tenant (a deployment's customer; "default" for the CLI).
    pub tenant: &'a str,
    /// The user within the tenant.
    pub user: &'a str,
}

/// One retrievable memory entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// Stable id, unique per owner (cited by the assistant).
    pub id: String,
    /// Level.
    pub level: Level,
    /// Category it concerns (Amazon `main_category`), if any.
    pub category: Option<String>,
    /// The text shown to the model.
    pub text: String,
    /// Where it came from (item ids, or the ids of the entries it summarises).
    pub provenance: Vec<String>,
    /// Unit-length embedding of `text`.
    pub embedding: Vec<f32>,
}

/// A retrieved entry with its cosine similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// The entry.
    pub entry: MemoryEntry,
    /// Cosine similarity.
    pub score: f32,
}

/// Counts for `mrrec memory stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Users with any entry.
    pub users: usize,
    /// Entries per level.
    pub entries: std::collections::BTreeMap<String, usize>,
    /// Store file size, bytes.
    pub bytes: u64,
}

/// Reading memory. Every call names its owner; implementations read only that owner's rows.
pub trait MemoryRead {
    /// All entries of an owner, ordered by id.
    fn entries(&self, owner: Owner<'_>) -> Result<Vec<MemoryEntry>>;
    /// The `k` entries of `levels` most similar to `query` (unit-length), best first.
    fn retrieve(
        &self,
        owner: Owner<'_>,
        query: &[f32],
        k: usize,
        levels: &[Level],
    ) -> Result<Vec<Retrieved>>;
    /// Users of a tenant that have entries, sorted.
    fn users(&self, tenant: &str) -> Result<Vec<String>>;
    /// Entry counts and size.
    fn stats(&self, tenant: &str) -> Result<MemoryStats>;
}

/// Writing memory.
pub trait MemoryWrite: MemoryRead {
    /// Inserts or replaces entries of an owner (by id), atomically.
    fn put(&self, owner: Owner<'_>, entries: &[MemoryEntry]) -> Result<()>;
    /// Removes every trace of an owner: rows, and the bytes of freed pages and the WAL.
    /// Returns how many entries were removed.
    fn forget(&self, owner: Owner<'_>) -> Result<usize>;
}

/// Cosine similarity of unit vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
