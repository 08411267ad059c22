use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::catalogue::truncate_chars;
use crate::{Catalogue, DataError, IngestReport, LoadOptions, Result};

/// Query text longer than this is cut when loaded.
pub const MAX_QUERY_CHARS: usize = 4096;

/// Which part of the data a query row belongs to (`split` column of our query files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Global memory, tuning and GRPO training.
    Train,
    /// Choosing prompts, settings and checkpoints; dev results are reported here.
    Val,
    /// Held-out evaluation (Amazon-C4 marks its rows `test`): evaluated only, like `val` never
    /// used for global memory or training.
    Test,
    /// Earlier held-out reviews of train/val users: their targets are in the user's history, so
    /// they may feed only memory-free steps (global-memory aspect extraction).
    Aspect,
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            "aspect" => Ok(Split::Aspect),
            other => Err(format!(
                "unknown split {other:?} (expected train, val, test or aspect)"
            )),
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Aspect => "aspect",
        })
    }
}

/// What a caller wants queries for; each purpose admits only the splits its rules allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Scoring a method on these splits (`train`, `val`, `test`; `aspect` is refused because its
    /// targets sit in the users' histories). Files without a split column (plain Amazon-C4) are
    /// evaluated whole.
    Evaluate(Vec<Split>),
    /// Building cross-user global memory: `train` and `aspect` rows, never `val` or `test`.
    GlobalMemory,
    /// GRPO training and tuning: `train` rows only.
    Training,
}

impl Purpose {
    fn admits(&self, split: Option<Split>) -> bool {
        match (self, split) {
            (Purpose::Evaluate(_), None) => true,
            (Purpose::Evaluate(s), Some(x)) => s.contains(&x),
            (Purpose::GlobalMemory, Some(s)) => matches!(s, Split::Train | Split::Aspect),
            (Purpose::Training, Some(s)) => s == Split::Train,
            (_, None) => false,
        }
    }
}

/// The byte offsets of every `\n` a reader has passed, so that a byte offset maps to its
/// physical line whatever the line endings.
#[derive(Clone, Default)]
struct NewlineOffsets(std::sync::Arc<std::sync::Mutex<Vec<u64>>>);

struct CountingReader<R> {
    inner: R,
    pos: u64,
    offsets: NewlineOffsets,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut v = self.offsets.0.lock().unwrap_or_else(|p| p.into_inner());
        v.extend(
            buf[..n]
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| self.pos + i as u64),
        );
        self.pos += n as u64;
        Ok(n)
    }
}

impl NewlineOffsets {
    fn wrap<R: std::io::Read>(&self, inner: R) -> CountingReader<R> {
        CountingReader {
            inner,
            pos: 0,
            offsets: self.clone(),
        }
    }

    /// The 1-based line of the record starting at byte `at` (a start on the `\n` that ends
    /// the previous line belongs to the next one).
    fn line_of(&self, at: u64) -> u64 {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        1 + v.partition_point(|&o| o <= at) as u64
    }
}

/// Which text of a query a method reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryField {
    /// The C4-style request (1–3 sentences).
    Query,
    /// MR.Rec's one-sentence version.
    SimpleQuery,
}

impl FromStr for QueryField {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "query" => Ok(QueryField::Query),
            "simple_query" | "simple" => Ok(QueryField::SimpleQuery),
            other => Err(format!(
                "unknown query field {other:?} (expected query or simple_query)"
            )),
        }
    }
}

impl fmt::Display for QueryField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueryField::Query => "query",
            QueryField::SimpleQuery => "simple_query",
        })
    }
}

/// A request as a method sees it: who asks, what, in which scenario and when. It carries neither
/// the target item nor the review the request was written from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// Query id (unique in its file).
    pub qid: String,
    /// The asking user.
    pub user_id: String,
    /// C4-style request text.
    pub query: String,
    /// One-sentence version, when the file has it.
    pub simple_query: Option<String>,
    /// Shopping scenario (a dataset category name); context only, never a catalogue filter.
    pub category: Option<String>,
    /// The request's moment (ms); the user's history before it is theirs to use.
    pub timestamp: Option<i64>,
    /// The row's split, when the file has one.
    pub split: Option<Split>,
}

impl Query {
    /// The text of `field`, if present.
    pub fn text(&self, field: QueryField) -> Option<&str> {
        match field {
            QueryField::Query => Some(self.query.as_str()),
            QueryField::SimpleQuery => self.simple_query.as_deref(),
        }
    }
}

/// The original review a query was written from: for data checks only. No method receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOutReview {
    /// `ori_rating`.
    pub rating: Option<f32>,
    /// `ori_review`.
    pub text: String,
}

/// A query with its answer, as the evaluator holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledQuery {
    query: Query,
    target: String,
    held_out: HeldOutReview,
}

impl LabeledQuery {
    /// What a method may see.
    pub fn query(&self) -> &Query {
        &self.query
    }
    /// The purchased item's id.
    pub fn target(&self) -> &str {
        &self.target
    }
    /// The review the query was written from (reference only).
    pub fn held_out(&self) -> &HeldOutReview {
        &self.held_out
    }
}

/// The queries of one file, in file order, with the split rules enforced.
#[derive(Debug, Clone, Default)]
pub struct QuerySet {
    rows: Vec<LabeledQuery>,
    has_split_column: bool,
}

const REQUIRED: [&str; 4] = ["qid", "query", "item_id", "user_id"];

impl QuerySet {
    /// Reads an Amazon-C4 style CSV (`qid, query, item_id, user_id, ori_rating, ori_review` plus
    /// optional `simple_query, category, timestamp, split`). With a catalogue, rows whose target is
    /// not in it are counted and skipped.
    pub fn load(
        path: &Path,
        catalogue: Option<&Catalogue>,
        opts: &LoadOptions,
    ) -> Result<(Self, IngestReport)> {
        let mut report = IngestReport::new(path, opts);
        let newlines = NewlineOffsets::default();
        let reader = newlines.wrap(crate::open_text(path)?);
        let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
        let headers = csv
            .headers()
            .map_err(|e| DataError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                reason: format!("cannot read the CSV header: {e}"),
            })?
            .clone();
        let col: HashMap<&str, usize> = headers
            .iter()
            .enumerate()
            .map(|(i, h)| (h.trim(), i))
            .collect();
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|c| !col.contains_key(c))
            .collect();
        if !missing.is_empty() {
            return Err(DataError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                reason: format!("missing column(s) {}", missing.join(", ")),
            });
        }
        let has_split_column = col.contains_key("split");
        let mut seen: HashSet<String> = HashSet::new();
        let mut rows = Vec::new();
        let mut record = csv::StringRecord::new();
        loop {
            // Where the next record starts (csv's own line count drifts on CRLF files).
            let start = csv.position().byte();
            match csv.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    report.records += 1;
                    let at = e.position().map(|p| p.byte()).unwrap_or(start);
                    report.skip("malformed CSV", newlines.line_of(at), e.to_string())?;
                    // A CSV error inside a record loses our place; stop only on I/O errors.
                    if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                        break;
                    }
                    continue;
                }
            }
            report.records += 1;
            let line = newlines.line_of(record.position().map(|p| p.byte()).unwrap_or(start));
            let get = |name: &str| -> Option<&str> {
                col.get(name)
                    .and_then(|&i| record.get(i))
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
            };
            let mut missing = Vec::new();
            for name in REQUIRED {
                if get(name).is_none() {
                    missing.push(name);
                }
            }
            if !missing.is_empty() {
                report.skip(
                    "missing field",
                    line,
                    format!("empty or missing `{}`", missing.join("`, `")),
                )?;
                continue;
            }
            let qid = get("qid").unwrap_or_default().to_string();
            let timestamp = match get("timestamp").map(|t| t.parse::<i64>()) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(_)) => {
                    report.skip(
                        "invalid field",
                        line,
                        format!(
                            "`timestamp` {:?} is not an integer",
                            get("timestamp").unwrap_or_default()
                        ),
                    )?;
                    continue;
                }
            };
            let split = match get("split").map(Split::from_str) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    report.skip("invalid field", line, format!("`split`: {e}"))?;
                    continue;
                }
            };
            if has_split_column && split.is_none() {
                report.skip("missing field", line, "empty `split`")?;
                continue;
            }
            let rating = match get("ori_rating").map(|r| r.parse::<f32>()) {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(_)) => {
                    report.skip(
                        "invalid field",
                        line,
                        format!(
                            "`ori_rating` {:?} is not a number",
                            get("ori_rating").unwrap_or_default()
                        ),
                    )?;
                    continue;
                }
            };
            let target = get("item_id").unwrap_or_default().to_string();
            if let Some(cat) = catalogue {
                if cat.position(&target).is_none() {
                    report.skip(
                        "unknown target",
                        line,
                        format!("query {qid}: target item {target:?} is not in the catalogue"),
                    )?;
                    continue;
                }
            }
            if !seen.insert(qid.clone()) {
                report.skip("duplicate id", line, format!("duplicate qid {qid:?}"))?;
                continue;
            }
            let text = |name| get(name).map(|s| truncate_chars(s.to_string(), MAX_QUERY_CHARS));
            rows.push(LabeledQuery {
                query: Query {
                    qid,
                    user_id: get("user_id").unwrap_or_default().to_string(),
                    query: text("query").unwrap_or_default(),
                    simple_query: text("simple_query"),
                    category: get("category").map(str::to_string),
                    timestamp,
                    split,
                },
                target,
                held_out: HeldOutReview {
                    rating,
                    text: get("ori_review").unwrap_or_default().to_string(),
                },
            });
            report.accepted += 1;
        }
        Ok((
            QuerySet {
                rows,
                has_split_column,
            },
            report,
        ))
    }

    /// Builds a set from labelled rows (tests and generated data).
    pub fn from_rows(rows: Vec<(Query, String)>) -> Self {
        let has_split_column = rows.iter().any(|(q, _)| q.split.is_some());
        QuerySet {
            rows: rows
                .into_iter()
                .map(|(query, target)| LabeledQuery {
                    query,
                    target,
                    held_out: HeldOutReview {
                        rating: None,
                        text: String::new(),
                    },
                })
                .collect(),
            has_split_column,
        }
    }

    /// The rows `purpose` may use, in file order. Errors when the purpose asks for a split its
    /// rules forbid.
    pub fn for_purpose(
        &self,
        purpose: &Purpose,
    ) -> std::result::Result<Vec<&LabeledQuery>, crate::DataError> {
        if let Purpose::Evaluate(splits) = purpose {
            if splits.contains(&Split::Aspect) {
                return Err(crate::DataError::QueriesNotAllowed("`aspect` queries cannot be evaluated: their targets are in the users' histories (use train or val)".into()));
            }
        }
        if !self.has_split_column && !matches!(purpose, Purpose::Evaluate(_)) {
            return Err(crate::DataError::QueriesNotAllowed(format!(
                "{purpose:?} needs a `split` column in the query file; this file has none"
            )));
        }
        Ok(self
            .rows
            .iter()
            .filter(|r| purpose.admits(r.query.split))
            .collect())
    }

    /// Every row, for data checks and statistics.
    pub fn all(&self) -> &[LabeledQuery] {
        &self.rows
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether the file had a `split` column.
    pub fn has_split_column(&self) -> bool {
        self.has_split_column
    }
}
