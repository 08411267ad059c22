//! The agent's error: one variant per layer below it (with `#[from]`), bad input in words, and
//! cancellation as a kind of its own, so that callers (the service, `eval`) decide with a `match`
//! — a cancelled answer is never mistaken for a failed one.

use std::fmt::Display;

use mrrec_data::DataError;
use mrrec_embed::EmbedError;
use mrrec_index::IndexError;
use mrrec_llm::LlmError;
use mrrec_memory::MemoryError;
use mrrec_models::ModelError;

/// What can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The chat model (local or server) failed, or was cancelled.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The memory store failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// An item index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The embedder failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A model's files could not be obtained.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Bad input or configuration, in words that name what and where (`file:line`).
    #[error("{0}")]
    Invalid(String),
    /// The work was cancelled (its caller went away).
    #[error("cancelled")]
    Cancelled,
    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<AgentError>,
    },
}

/// Result type of the agent.
pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    /// The error under any [`AgentError::Context`] layers.
    pub fn root(&self) -> &AgentError {
        match self {
            AgentError::Context { source, .. } => source.root(),
            e => e,
        }
    }

    /// Whether the work was cancelled (by its own token or the model's).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self.root(),
            AgentError::Cancelled | AgentError::Llm(LlmError::Cancelled)
        )
    }
}

impl From<mrrec_llm_local::LocalError> for AgentError {
    fn from(e: mrrec_llm_local::LocalError) -> Self {
        AgentError::Llm(e.into())
    }
}

impl From<serde_json::Error> for AgentError {
    fn from(e: serde_json::Error) -> Self {
        AgentError::Invalid(e.to_string())
    }
}

/// `context` / `with_context` for the agent's results and options (the wording of `anyhow`'s,
/// keeping the typed error underneath).
pub trait Context<T> {
    /// Says what was being done.
    fn context(self, c: impl Display) -> Result<T>;
    /// Says what was being done, computed only on failure.
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<AgentError>> Context<T> for std::result::Result<T, E> {
    fn context(self, c: impl Display) -> Result<T> {
        self.map_err(|e| AgentError::Context {
            context: c.to_string(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| AgentError::Context {
            context: f().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, c: impl Display) -> Result<T> {
        self.ok_or_else(|| AgentError::Invalid(c.to_string()))
    }
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| AgentError::Invalid(f().to_string()))
    }
}

/// Returns an [`AgentError::Invalid`] built like `format!`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::AgentError::Invalid(format!($($t)*)))
    };
}
pub(crate) use bail;
