//! Sentence embeddings for items, queries and memories.
//!
//! [`TextEmbedder`] is the interface; [`BertEmbedder`] runs BERT-family sentence-transformers
//! (all-MiniLM-L6-v2 by default) in candle on the CPU with mean pooling and L2 normalisation;
//! [`EmbeddingCache`] keeps every vector ever computed in SQLite, keyed by model and text, so
//! nothing is embedded twice and interrupted runs resume.

mod bert;
mod cache;

pub use bert::{BertEmbedder, DEFAULT_EMBEDDER};
pub use cache::{CachedEmbedder, EmbeddingCache};

/// Errors of embedding.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model's files could not be obtained.
    #[error(transparent)]
    Model(#[from] mrrec_models::ModelError),
    /// The tensor library failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer {context}: {message}")]
    Tokenizer { context: String, message: String },
    /// A model file was not what was expected.
    #[error("{path}: {message}")]
    BadModelFile {
        path: std::path::PathBuf,
        message: String,
    },
    /// The embedding cache failed.
    #[error("embedding cache {path}: {source}")]
    Cache {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, EmbedError>;

/// Turns texts into unit-length vectors.
pub trait TextEmbedder: Send + Sync {
    /// The model's id (part of every cache key).
    fn model_id(&self) -> &str;
    /// Vector length.
    fn dim(&self) -> usize;
    /// One L2-normalised vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
    /// [`TextEmbedder::embed`], reporting (done, total) as it goes (long builds show progress);
    /// by default once, at the end.
    fn embed_reporting(
        &self,
        texts: &[&str],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        let v = self.embed(texts)?;
        progress(texts.len(), texts.len());
        Ok(v)
    }
}

/// Cosine similarity of two vectors (dot product when both are unit-length).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}
