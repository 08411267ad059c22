//! MR.Rec's hierarchical memory: per-user local memory (behaviour records, preference patterns,
//! user profile), stored as retrievable entries with embeddings, behind read and write traits with
//! a tenant id in every key. A retrieval names its tenant and user, and the store only ever reads
//! that user's rows: there is no code path that scores another user's entries.

pub mod global;
mod pg;
#[cfg(feature = "testing")]
pub mod pgtest;
mod records;
mod sqlite;
pub mod summaries;

use serde::{Deserialize, Serialize};

pub use pg::PgStore;
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

    /// Parses [`Level::as_str`] (also accepting plurals: `records`, `patterns`).
    pub fn parse(s: &str) -> Option<Level> {
        let s = s.trim().trim_end_matches('s');
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
    /// The model that wrote it (patterns and profiles: the memory model's id); `None` for
    /// records, which are the user's own words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// A retrieved entry with its cosine similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// The entry.
    pub entry: MemoryEntry,
    /// Cosine similarity.
    pub score: f32,
}

/// One canonical aspect of a category's global memory (step B of MR.Rec's global memory): what
/// shoppers in this scenario care about, merged across many training queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalAspect {
    /// Stable id within the category (cited in traces).
    pub id: String,
    /// The scenario (dataset category, e.g. `Kindle_Store`).
    pub category: String,
    /// The subcategory it applies to, or `None` for the whole category.
    pub subcategory: Option<String>,
    /// Short name ("battery life").
    pub name: String,
    /// What it means and why it matters.
    pub description: String,
    /// Query ids it was derived from.
    pub queries: Vec<String>,
    /// Users whose queries it was derived from (so that forgetting a user can remove it).
    pub users: Vec<String>,
    /// Unit-length embedding of `name: description`.
    pub embedding: Vec<f32>,
}

impl GlobalAspect {
    /// The text embedded and shown to the model.
    pub fn text(&self) -> String {
        match &self.subcategory {
            Some(s) => format!("{} ({s}): {}", self.name, self.description),
            None => format!("{}: {}", self.name, self.description),
        }
    }
}

/// The step-A output of one training query: the aspects an LLM read off (query, purchased item,
/// hard negatives), as validated JSON. Kept so that step B can be rerun without the LLM and so that
/// forgetting a user removes what their queries contributed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryAspects {
    /// Query id.
    pub qid: String,
    /// The user who asked.
    pub user: String,
    /// Scenario.
    pub category: String,
    /// Validated aspect JSON (see [`global::ASPECT_SCHEMA`]).
    pub json: String,
    /// The model that read the aspects off the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// What `forget` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// Local-memory entries.
    pub entries: usize,
    /// Step-A results of the user's queries.
    pub query_aspects: usize,
    /// Canonical global aspects derived (in part) from the user's queries; their categories are
    /// marked stale (`global:{category}`) for the next `memory build` to merge again without them.
    pub global_aspects: usize,
}

/// Counts for `mrrec memory stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Users with any entry.
    pub users: usize,
    /// Entries per level.
    pub entries: std::collections::BTreeMap<String, usize>,
    /// Store size, bytes.
    pub bytes: u64,
    /// Canonical global aspects per category.
    pub global: std::collections::BTreeMap<String, usize>,
    /// Build-state marks waiting for a rebuild.
    pub stale: usize,
    /// What writing the LLM entries cost, summed over every build (the paper's Table 4).
    pub cost: BuildCost,
    /// LLM-written entries and step-A query aspects per model that wrote them (entries stored
    /// before models were recorded count under `unrecorded`).
    pub writers: std::collections::BTreeMap<String, usize>,
}

/// Accumulated cost of LLM-written memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildCost {
    /// Entries written by an LLM (pattern and profile segments, canonical aspects).
    pub llm_entries: u64,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// LLM seconds (cached replays count zero).
    pub seconds: f64,
    /// Seconds per LLM-written entry.
    pub seconds_per_entry: f64,
}

impl BuildCost {
    /// Adds another build's numbers.
    pub fn add(&mut self, o: &BuildCost) {
        self.llm_entries += o.llm_entries;
        self.tokens_in += o.tokens_in;
        self.tokens_out += o.tokens_out;
        self.seconds += o.seconds;
        self.seconds_per_entry = self.seconds / self.llm_entries.max(1) as f64;
    }
}

/// Reading memory. Every call names its owner; implementations read only that owner's rows.
pub trait MemoryRead: Send + Sync {
    /// All entries of an owner, ordered by id.
    fn entries(&self, owner: Owner<'_>) -> Result<Vec<MemoryEntry>>;
    /// Whether the owner has any entry (what a request checks before it runs: stores answer it
    /// without reading the entries).
    fn has_entries(&self, owner: Owner<'_>) -> Result<bool> {
        Ok(!self.entries(owner)?.is_empty())
    }
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
    /// Canonical global aspects of a category (all categories when `None`), ordered by id.
    fn global_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<GlobalAspect>>;
    /// The `n` global aspects of `category` most similar to `query`, best first, among those
    /// derived from at least `min_support` distinct queries (an aspect read off one query is that
    /// query's product, not what the section's shoppers share).
    fn global(
        &self,
        tenant: &str,
        category: &str,
        query: &[f32],
        n: usize,
        min_support: usize,
    ) -> Result<Vec<(GlobalAspect, f32)>> {
        let mut v: Vec<(GlobalAspect, f32)> = self
            .global_aspects(tenant, Some(category))?
            .into_iter()
            .filter(|a| a.queries.len() >= min_support)
            .map(|a| {
                let s = dot(&a.embedding, query);
                (a, s)
            })
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.id.cmp(&b.0.id)));
        v.truncate(n);
        Ok(v)
    }
    /// Step-A results of a category (all when `None`), ordered by query id.
    fn query_aspects(&self, tenant: &str, category: Option<&str>) -> Result<Vec<QueryAspects>>;
    /// Build-state marks of one kind (every kind when `None`), sorted by their stored key.
    fn stale(&self, tenant: &str, kind: Option<StaleKind>) -> Result<Vec<Stale>>;
}

/// Writing memory.
pub trait MemoryWrite: MemoryRead {
    /// Inserts or replaces entries of an owner (by id), atomically.
    fn put(&self, owner: Owner<'_>, entries: &[MemoryEntry]) -> Result<()> {
        self.replace(owner, &[], entries, &[], &[])
    }
    /// In one transaction: removes the owner's entries whose ids are in `remove`, inserts or
    /// replaces `put`, clears the build-state marks `done`, then sets the marks `mark`. A crash
    /// leaves either the state before or the state after.
    fn replace(
        &self,
        owner: Owner<'_>,
        remove: &[String],
        put: &[MemoryEntry],
        done: &[Stale],
        mark: &[Stale],
    ) -> Result<()>;
    /// Sets build-state marks.
    fn mark_stale(&self, tenant: &str, marks: &[Stale]) -> Result<()>;
    /// Adds a build's LLM cost to the tenant's running total (shown by `stats`).
    fn add_cost(&self, tenant: &str, cost: &BuildCost) -> Result<()>;
    /// Stores step-A results (replacing by query id) and marks their categories
    /// (`global:{category}`) for merging, in one transaction.
    fn put_query_aspects(&self, tenant: &str, rows: &[QueryAspects]) -> Result<()>;
    /// Replaces the canonical aspects of one category and clears its `global:{category}` mark,
    /// atomically.
    fn put_global(&self, tenant: &str, category: &str, aspects: &[GlobalAspect]) -> Result<()>;
    /// Removes every trace of an owner: entries, step-A results of their queries, the global
    /// aspects derived from them, their build-state marks, and (where the backend can) the bytes
    /// of freed pages and logs.
    fn forget(&self, owner: Owner<'_>) -> Result<Forgotten>;
}

fn escape_key(s: &str) -> String {
    s.replace('%', "%25").replace(':', "%3A")
}

fn unescape_key(s: &str) -> String {
    s.replace("%3A", ":").replace("%25", "%")
}

/// What a build must (re)write: a build-state mark. Stored as a key (`pattern:{user}:{category}`,
/// `profile:{user}`, `global:{category}`, the user escaped so that a `:` in an id cannot forge
/// another mark); stores read back only keys that parse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stale {
    /// The preference pattern of (user, category).
    Pattern {
        /// The user.
        user: String,
        /// The category.
        category: String,
    },
    /// The user's profile.
    Profile {
        /// The user.
        user: String,
    },
    /// The category's canonical global aspects (merged again).
    Global {
        /// The category.
        category: String,
    },
}

/// The kinds of [`Stale`] marks (what `MemoryRead::stale` filters by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleKind {
    /// [`Stale::Pattern`].
    Pattern,
    /// [`Stale::Profile`].
    Profile,
    /// [`Stale::Global`].
    Global,
}

impl StaleKind {
    /// The stored keys' prefix of this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            StaleKind::Pattern => "pattern:",
            StaleKind::Profile => "profile:",
            StaleKind::Global => "global:",
        }
    }
}

impl Stale {
    /// The pattern of (user, category).
    pub fn pattern(user: &str, category: &str) -> Self {
        Stale::Pattern {
            user: user.to_string(),
            category: category.to_string(),
        }
    }
    /// The user's profile.
    pub fn profile(user: &str) -> Self {
        Stale::Profile {
            user: user.to_string(),
        }
    }
    /// The category's global aspects.
    pub fn global(category: &str) -> Self {
        Stale::Global {
            category: category.to_string(),
        }
    }
    /// Its kind.
    pub fn kind(&self) -> StaleKind {
        match self {
            Stale::Pattern { .. } => StaleKind::Pattern,
            Stale::Profile { .. } => StaleKind::Profile,
            Stale::Global { .. } => StaleKind::Global,
        }
    }
    /// The user it concerns (global marks concern none).
    pub fn user(&self) -> Option<&str> {
        match self {
            Stale::Pattern { user, .. } | Stale::Profile { user } => Some(user),
            Stale::Global { .. } => None,
        }
    }
    /// The stored key.
    pub fn key(&self) -> String {
        match self {
            Stale::Pattern { user, category } => {
                format!("pattern:{}:{category}", escape_key(user))
            }
            Stale::Profile { user } => format!("profile:{}", escape_key(user)),
            Stale::Global { category } => format!("global:{category}"),
        }
    }
    /// A stored key read back (`None` for a key that is no mark of these kinds).
    pub fn parse(key: &str) -> Option<Self> {
        if let Some(rest) = key.strip_prefix("pattern:") {
            let (u, c) = rest.split_once(':')?;
            return Some(Stale::Pattern {
                user: unescape_key(u),
                category: c.to_string(),
            });
        }
        if let Some(u) = key.strip_prefix("profile:") {
            return Some(Stale::Profile {
                user: unescape_key(u),
            });
        }
        key.strip_prefix("global:").map(|c| Stale::Global {
            category: c.to_string(),
        })
    }
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// The stored keys of every mark of `user` begin with one of these (what `forget` clears).
pub(crate) fn user_key_prefixes(user: &str) -> (String, String) {
    (Stale::profile(user).key(), Stale::pattern(user, "").key())
}

/// Opens a store: `postgres://…` / `postgresql://…` is PostgreSQL, anything else a SQLite file.
pub fn open_store(location: &str) -> Result<Box<dyn MemoryWrite + Send + Sync>> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        Ok(Box::new(PgStore::connect(location)?))
    } else {
        Ok(Box::new(SqliteStore::open(std::path::Path::new(location))?))
    }
}

/// The `k` entries of `levels` most similar to `query`, best first (ties by id).
pub fn top_k(
    entries: Vec<MemoryEntry>,
    query: &[f32],
    k: usize,
    levels: &[Level],
) -> Vec<Retrieved> {
    let mut scored: Vec<Retrieved> = entries
        .into_iter()
        .filter(|e| levels.contains(&e.level))
        .map(|entry| Retrieved {
            score: dot(&entry.embedding, query),
            entry,
        })
        .collect();
    scored.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.entry.id.cmp(&b.entry.id))
    });
    scored.truncate(k);
    scored
}

/// Checks that every embedding has the store's width (`expected`, or the first one's).
pub(crate) fn check_dims(
    expected: Option<usize>,
    entries: &[(&str, usize)],
) -> Result<Option<usize>> {
    let mut want = expected;
    for (id, n) in entries {
        match want {
            Some(d) if d != *n => {
                return Err(MemoryError::Dimension {
                    id: id.to_string(),
                    expected: d,
                    received: *n,
                })
            }
            None => want = Some(*n),
            _ => {}
        }
    }
    Ok(want)
}

/// Little-endian f32 bytes.
pub(crate) fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Inverse of [`to_blob`].
pub(crate) fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Cosine similarity of unit vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
