//! Item indexes: rank catalogue positions for a query, behind one trait ([`ItemIndex`]), each
//! persisted to a folder and reopened by [`open_index`].
//!
//! - [`ExactIndex`]: inner product over every vector (SIMD, all cores): the reference.
//! - [`HnswIndex`]: approximate nearest neighbours (usearch) for large catalogues.
//! - [`Bm25Index`]: BM25 over item text (tantivy).
//! - [`HybridIndex`]: reciprocal-rank fusion of a lexical and a dense index.
//!
//! Every implementation passes the same conformance suite (`tests/conformance.rs`).

mod bm25;
mod exact;
mod hnsw;
mod hybrid;
mod simd;

use std::path::{Path, PathBuf};

pub use bm25::Bm25Index;
pub use exact::ExactIndex;
pub use hnsw::{HnswIndex, HnswParams};
pub use hybrid::{rrf, weighted_rrf, HybridIndex, HybridParams};
pub use simd::{dot, read_bandwidth};

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A vector's length differs from the index's.
    #[error("wrong vector dimension: expected {expected}, received {received}")]
    WrongVectorDimension { expected: usize, received: usize },
    /// The index needs a query vector and none was given.
    #[error("{0} index needs a query vector")]
    MissingVector(&'static str),
    /// A filesystem error, with the path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The files on disk are not a valid index.
    #[error("{path}: corrupt index: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// The BM25 engine failed.
    #[error("tantivy: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    /// The HNSW engine failed.
    #[error("usearch: {0}")]
    Usearch(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, IndexError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What an index is asked: the text, and the text's embedding for dense indexes.
#[derive(Debug, Clone, Copy)]
pub struct SearchQuery<'a> {
    /// Query text (BM25 reads it).
    pub text: &'a str,
    /// Query vector, unit length (dense indexes read it).
    pub vector: Option<&'a [f32]>,
}

impl<'a> SearchQuery<'a> {
    /// A text-only query.
    pub fn text(text: &'a str) -> Self {
        SearchQuery { text, vector: None }
    }
    /// A vector-only query.
    pub fn vector(vector: &'a [f32]) -> Self {
        SearchQuery {
            text: "",
            vector: Some(vector),
        }
    }
}

/// One ranked item: its catalogue position and score (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Catalogue position.
    pub item: u32,
    /// Similarity score.
    pub score: f32,
}

/// Orders hits best first; ties by ascending item for determinism.
pub(crate) fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
}

/// A searchable, persistable index over catalogue positions `0..len`.
pub trait ItemIndex: Send + Sync {
    /// Short name of the implementation ("exact", "hnsw", "bm25", "hybrid").
    fn kind(&self) -> &'static str;
    /// Number of items indexed.
    fn len(&self) -> usize;
    /// True when nothing is indexed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The best `k` items for `query`, best first, no duplicates.
    fn search(&self, query: &SearchQuery<'_>, k: usize) -> Result<Vec<Hit>>;
    /// Writes the index to `dir` (created if needed) so that [`open_index`] reopens it.
    fn save(&self, dir: &Path) -> Result<()>;
}

const KIND_FILE: &str = "index.kind";

pub(crate) fn write_kind(dir: &Path, kind: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let p = dir.join(KIND_FILE);
    std::fs::write(&p, kind).map_err(io_err(&p))
}

/// Reopens an index saved by [`ItemIndex::save`] (a hybrid index's parts are reopened too).
pub fn open_index(dir: &Path) -> Result<Box<dyn ItemIndex>> {
    let p = dir.join(KIND_FILE);
    let kind = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    Ok(match kind.trim() {
        "exact" => Box::new(ExactIndex::open(dir)?),
        "hnsw" => Box::new(HnswIndex::open(dir)?),
        "bm25" => Box::new(Bm25Index::open(dir)?),
        "hybrid" => Box::new(HybridIndex::open(dir)?),
        other => {
            return Err(IndexError::Corrupt {
                path: p,
                message: format!("unknown index kind {other:?}"),
            })
        }
    })
}
