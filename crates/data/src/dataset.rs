use std::path::{Path, PathBuf};

use crate::{Catalogue, DataError, Histories, IngestReport, LoadOptions, QuerySet, Result};

/// The files of a data directory, found by their usual names.
#[derive(Debug, Clone)]
pub struct DatasetFiles {
    /// Item metadata (Amazon Reviews 2023 `meta.jsonl` or C4 `sampled_item_metadata_1M.jsonl`).
    pub items: PathBuf,
    /// Reviews (`reviews.jsonl`), when present.
    pub reviews: Option<PathBuf>,
    /// Queries (`queries.csv` or C4 `test.csv`), when present.
    pub queries: Option<PathBuf>,
}

const ITEM_NAMES: [&str; 4] = [
    "meta.jsonl",
    "meta.jsonl.gz",
    "sampled_item_metadata_1M.jsonl",
    "sampled_item_metadata_1M.jsonl.gz",
];
const REVIEW_NAMES: [&str; 2] = ["reviews.jsonl", "reviews.jsonl.gz"];
const QUERY_NAMES: [&str; 3] = ["queries.csv", "queries.csv.gz", "test.csv"];

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

impl DatasetFiles {
    /// Finds the files in `dir`.
    pub fn discover(dir: &Path) -> Result<Self> {
        let items = first_existing(dir, &ITEM_NAMES).ok_or_else(|| DataError::MissingFile {
            dir: dir.to_path_buf(),
            what: "item metadata",
            candidates: ITEM_NAMES.join(", "),
        })?;
        Ok(DatasetFiles {
            items,
            reviews: first_existing(dir, &REVIEW_NAMES),
            queries: first_existing(dir, &QUERY_NAMES),
        })
    }
}

/// A loaded data directory: catalogue, histories and queries, with what was skipped.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The items every method ranks.
    pub catalogue: Catalogue,
    /// Users' reviews (empty when the directory has none).
    pub histories: Histories,
    /// Queries with targets (empty when the directory has none).
    pub queries: QuerySet,
    /// One report per file read.
    pub reports: Vec<IngestReport>,
}

impl Dataset {
    /// Loads `dir`, validating reviews and queries against the catalogue. `queries` overrides the
    /// query file found in `dir`.
    pub fn load(dir: &Path, queries: Option<&Path>, opts: &LoadOptions) -> Result<Self> {
        let files = DatasetFiles::discover(dir)?;
        let (catalogue, item_report) = Catalogue::load(&files.items, opts)?;
        let mut reports = vec![item_report];
        let histories = match &files.reviews {
            Some(p) => {
                let (h, r) = Histories::load(p, Some(&catalogue), opts)?;
                reports.push(r);
                h
            }
            None => Histories::default(),
        };
        let query_path = queries.map(Path::to_path_buf).or(files.queries);
        let queries = match &query_path {
            Some(p) => {
                let (q, r) = QuerySet::load(p, Some(&catalogue), opts)?;
                reports.push(r);
                q
            }
            None => QuerySet::default(),
        };
        Ok(Dataset {
            catalogue,
            histories,
            queries,
            reports,
        })
    }
}
