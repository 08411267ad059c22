use std::path::PathBuf;

/// Errors of the data layer. Every variant names the file, and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record was malformed and `--strict` was set.
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    /// A needed file is not in the data directory.
    #[error("{dir}: no {what} found (looked for {candidates})")]
    MissingFile {
        dir: PathBuf,
        what: &'static str,
        candidates: String,
    },
    /// The queries asked for may not be used for that purpose, or the file cannot say which
    /// they are (no `split` column).
    #[error("{0}")]
    QueriesNotAllowed(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
