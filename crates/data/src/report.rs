use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// How loaders treat bad records.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Turn the first bad record into an error instead of a counted skip.
    pub strict: bool,
    /// How many bad records of each kind are kept in full in the report.
    pub examples_per_kind: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: false,
            examples_per_kind: 3,
        }
    }
}

/// One bad record: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file it is in.
    pub path: PathBuf,
    /// Its 1-based line (for CSV, the record's line).
    pub line: u64,
    /// What is wrong, in words.
    pub reason: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// What happened while reading one file: records read, accepted, and skipped by kind.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// The file.
    pub path: PathBuf,
    /// Records seen (non-blank lines / CSV rows).
    pub records: u64,
    /// Records accepted.
    pub accepted: u64,
    /// Skipped records per kind of problem.
    pub skipped: BTreeMap<&'static str, u64>,
    /// The first few issues of each kind, in full.
    pub examples: Vec<Issue>,
    examples_per_kind: usize,
    strict: bool,
}

impl IngestReport {
    /// An empty report for `path`.
    pub fn new(path: &Path, opts: &LoadOptions) -> Self {
        IngestReport {
            path: path.to_path_buf(),
            records: 0,
            accepted: 0,
            skipped: BTreeMap::new(),
            examples: Vec::new(),
            examples_per_kind: opts.examples_per_kind,
            strict: opts.strict,
        }
    }

    /// Records a bad record of `kind` at `line`; an error when the load is strict.
    pub fn skip(&mut self, kind: &'static str, line: u64, reason: impl Into<String>) -> Result<()> {
        let reason = reason.into();
        if self.strict {
            return Err(DataError::Invalid {
                path: self.path.clone(),
                line,
                reason,
            });
        }
        let n = self.skipped.entry(kind).or_insert(0);
        *n += 1;
        if *n as usize <= self.examples_per_kind {
            self.examples.push(Issue {
                path: self.path.clone(),
                line,
                reason,
            });
        }
        Ok(())
    }

    /// Total records skipped.
    pub fn total_skipped(&self) -> u64 {
        self.skipped.values().sum()
    }
}

impl fmt::Display for IngestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} records, {} accepted, {} skipped",
            self.path.display(),
            self.records,
            self.accepted,
            self.total_skipped()
        )?;
        if !self.skipped.is_empty() {
            let kinds: Vec<String> = self
                .skipped
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            write!(f, " ({})", kinds.join(", "))?;
            for issue in &self.examples {
                write!(f, "\n  {issue}")?;
            }
        }
        Ok(())
    }
}
