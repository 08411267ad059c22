//! More queries from the users' own histories, without a leak: training requests from the
//! `train` users' earlier purchases, or a larger evaluation set from the `val` (or `test`) users'.
//!
//! A data set has one query per user, so GRPO and fine-tuning see as many requests as there are
//! `train` users (106 in the mini set). Each of those users' earlier well-rated reviews is a
//! purchase that a request could have led to — the way Amazon-C4 itself was written from reviews.
//! [`derive_targets`] picks them: for a `train` user (the rows [`Purpose::Training`] admits, so
//! `val`, `test` and `aspect` users are never touched), a review rated at least
//! [`DeriveOptions::min_rating`] with at least [`DeriveOptions::min_history`] reviews strictly
//! before it, of an item not reviewed earlier and not the user's own query target. Its request is
//! written later (by an LLM, from the review, in the agent crate); the asking user is a
//! *snapshot* — the user as they were at that moment (`{user}@{timestamp}`), whose history holds
//! only the reviews strictly before it, so the memory built for the request never contains the
//! purchase it must predict.
//!
//! [`write_dataset`] writes the result as a data directory the rest of mrrec reads unchanged: the
//! source's item metadata (linked, so the catalogue, its fingerprint and its indexes are the
//! source's), `reviews.jsonl` with the `train` users' histories and the snapshots', and
//! `queries.csv` with the source's `train` rows and the derived ones, every row `train`.
//!
//! With [`DeriveOptions::split`] `val` (or `test`) the same is done for that split's users: the
//! directory's rows are all that split, so it can be evaluated (the source's own requests and
//! the derived ones, paired by query id with runs on the source) and never trained on —
//! [`Purpose::Training`] admits `train` rows only. Reviews that are an `aspect` query's target
//! are passed over there too: global memory read the request written from them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use crate::{DataError, Dataset, LabeledQuery, Purpose, Result, Review, Split};

/// Which reviews become targets.
#[derive(Debug, Clone, PartialEq)]
pub struct DeriveOptions {
    /// Targets per user, the latest first.
    pub per_user: usize,
    /// Reviews the user must have written strictly before the target (their snapshot's history).
    pub min_history: usize,
    /// Lowest rating of a target (a purchase the user was glad of, as C4's queries are).
    pub min_rating: f32,
    /// Only the first this many users (by id); all when `None`.
    pub max_users: Option<usize>,
    /// Whose purchases: the `train` users' (training requests, the default) or the `val` or
    /// `test` users' (a larger evaluation set, never trainable). `aspect` is refused.
    pub split: Split,
    /// Leave out the users of this fold (their rows, histories and purchases): a data set to
    /// train on whose model is then checked on that fold's `train` queries
    /// (cross-validation inside `train`, see [`crate::Fold`]).
    pub hold_out: Option<crate::Fold>,
}

impl Default for DeriveOptions {
    fn default() -> Self {
        DeriveOptions {
            per_user: 2,
            min_history: 2,
            min_rating: 4.0,
            max_users: None,
            split: Split::Train,
            hold_out: None,
        }
    }
}

/// One purchase that becomes a request.
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedTarget {
    /// The user it comes from.
    pub user_id: String,
    /// The asking user: the snapshot `{user}@{timestamp}`.
    pub snapshot: String,
    /// The review of the purchase (the request is written from it; its item is the target).
    pub review: Review,
    /// The snapshot's history: the user's reviews strictly before the target, oldest first.
    pub history: Vec<Review>,
    /// The shopping scenario: the data set category most of the `train` and `aspect` queries
    /// whose targets share the item's `main_category` carry (`None` when none does).
    pub category: Option<String>,
}

/// What [`derive_targets`] looked at and why it passed reviews over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeriveReport {
    /// Users looked at.
    pub users: usize,
    /// Their split.
    pub split: Option<Split>,
    /// Their reviews looked at.
    pub reviews: usize,
    /// Targets chosen.
    pub targets: usize,
    /// Reviews passed over, by reason.
    pub skipped: BTreeMap<&'static str, usize>,
    /// The fold left out and how many of the split's users it held.
    pub held_out: Option<(crate::Fold, usize)>,
}

impl std::fmt::Display for DeriveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let split = self.split.map_or("source".to_string(), |s| s.to_string());
        write!(
            f,
            "{} {split} users, {} reviews: {} targets",
            self.users, self.reviews, self.targets
        )?;
        if let Some((fold, n)) = &self.held_out {
            write!(f, " ({n} users of fold {fold} held out)")?;
        }
        for (why, n) in &self.skipped {
            write!(f, ", {n} {why}")?;
        }
        Ok(())
    }
}

/// The snapshot id of `user` at the moment `timestamp`.
pub fn snapshot_id(user: &str, timestamp: i64) -> String {
    format!("{user}@{timestamp}")
}

/// The user a snapshot id names (`{user}@{digits}`, [`snapshot_id`]), or `None` for any other
/// id — a request the data set holds as written rather than one derived from a purchase.
pub fn snapshot_of(id: &str) -> Option<&str> {
    match id.rsplit_once('@') {
        Some((u, ts))
            if !u.is_empty() && !ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some(u)
        }
        _ => None,
    }
}

/// The source rows whose users a derivation for `split` reads (and that the written directory
/// keeps): `train` rows through [`Purpose::Training`], `val`/`test` rows through
/// [`Purpose::Evaluate`]; `aspect` is refused, and so is a query file without a `split` column.
pub fn source_rows(ds: &Dataset, split: Split) -> Result<Vec<&LabeledQuery>> {
    let rows = match split {
        Split::Train => ds.queries.for_purpose(&Purpose::Training)?,
        Split::Val | Split::Test => ds.queries.for_purpose(&Purpose::Evaluate(vec![split]))?,
        Split::Aspect => {
            return Err(DataError::QueriesNotAllowed(
                "queries cannot be derived for `aspect` users: derive for train, val or test"
                    .into(),
            ))
        }
    };
    if rows.iter().any(|q| q.query().split != Some(split)) {
        return Err(DataError::QueriesNotAllowed(
            "queries can be derived only from a query file with a `split` column".into(),
        ));
    }
    Ok(rows)
}

/// [`source_rows`] of `opts.split` without the users of `opts.hold_out`.
pub fn kept_rows<'a>(ds: &'a Dataset, opts: &DeriveOptions) -> Result<Vec<&'a LabeledQuery>> {
    Ok(kept_and_held_out(ds, opts)?.0)
}

/// [`source_rows`] of `opts.split` parted into the rows kept and those of `opts.hold_out`'s users.
type Parted<'a> = (Vec<&'a LabeledQuery>, Vec<&'a LabeledQuery>);
fn kept_and_held_out<'a>(ds: &'a Dataset, opts: &DeriveOptions) -> Result<Parted<'a>> {
    Ok(source_rows(ds, opts.split)?
        .into_iter()
        .partition(|q| !opts.hold_out.is_some_and(|f| f.holds(&q.query().user_id))))
}

/// Picks the targets of `ds` (see the module docs), users of `opts.split` in id order (without
/// those of `opts.hold_out`), each user's latest targets first. Errors when the query file has
/// no `split` column.
pub fn derive_targets(
    ds: &Dataset,
    opts: &DeriveOptions,
) -> Result<(Vec<DerivedTarget>, DeriveReport)> {
    let (rows, held) = kept_and_held_out(ds, opts)?;
    let scenario = scenarios(ds)?;
    // Outside training, the targets of `aspect` rows are passed over: global memory was built
    // from the requests written from them.
    let aspect_targets: HashSet<(&str, &str)> = if opts.split == Split::Train {
        HashSet::new()
    } else {
        ds.queries
            .all()
            .iter()
            .filter(|q| q.query().split == Some(Split::Aspect))
            .map(|q| (q.query().user_id.as_str(), q.target()))
            .collect()
    };
    // Each user's query targets and the moment of their first query: nothing at or after it
    // is used.
    let mut users: BTreeMap<&str, (HashSet<&str>, Option<i64>)> = BTreeMap::new();
    for q in &rows {
        let e = users.entry(q.query().user_id.as_str()).or_default();
        e.0.insert(q.target());
        e.1 = match (e.1, q.query().timestamp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let users: Vec<_> = users
        .into_iter()
        .take(opts.max_users.unwrap_or(usize::MAX))
        .collect();
    let held_out = opts.hold_out.map(|f| {
        let users: HashSet<&str> = held.iter().map(|q| q.query().user_id.as_str()).collect();
        (f, users.len())
    });
    let mut report = DeriveReport {
        users: users.len(),
        split: Some(opts.split),
        held_out,
        ..Default::default()
    };
    let mut out = Vec::new();
    for (user, (targets, asked_at)) in users {
        let history = ds.histories.before(user, asked_at);
        report.reviews += history.len();
        let mut taken = 0;
        for r in history.iter().rev() {
            let skip = |why: &'static str, report: &mut DeriveReport| {
                *report.skipped.entry(why).or_default() += 1;
            };
            if taken == opts.per_user {
                skip("beyond --per-user", &mut report);
                continue;
            }
            if r.rating < opts.min_rating {
                skip("rated below the minimum", &mut report);
                continue;
            }
            let earlier = ds.histories.before(user, Some(r.timestamp));
            if earlier.len() < opts.min_history {
                skip("with too little history before them", &mut report);
                continue;
            }
            if targets.contains(r.parent_asin.as_str())
                || earlier.iter().any(|e| e.parent_asin == r.parent_asin)
            {
                skip("of an item reviewed earlier or asked for", &mut report);
                continue;
            }
            if aspect_targets.contains(&(user, r.parent_asin.as_str())) {
                skip(
                    "the target of an aspect query (read by global memory)",
                    &mut report,
                );
                continue;
            }
            let category = ds
                .catalogue
                .by_id(&r.parent_asin)
                .and_then(|i| i.main_category.as_deref())
                .and_then(|c| scenario.get(c).cloned());
            out.push(DerivedTarget {
                user_id: user.to_string(),
                snapshot: snapshot_id(user, r.timestamp),
                review: r.clone(),
                history: earlier.to_vec(),
                category,
            });
            taken += 1;
        }
    }
    report.targets = out.len();
    Ok((out, report))
}

/// Item `main_category` → the data set category most of the `train` and `aspect` queries whose
/// targets have it carry (ties to the name first in order).
fn scenarios(ds: &Dataset) -> Result<HashMap<String, String>> {
    let mut counts: HashMap<&str, BTreeMap<&str, usize>> = HashMap::new();
    for q in ds.queries.for_purpose(&Purpose::GlobalMemory)? {
        let (Some(item), Some(cat)) = (ds.catalogue.by_id(q.target()), &q.query().category) else {
            continue;
        };
        if let Some(main) = &item.main_category {
            *counts
                .entry(main.as_str())
                .or_default()
                .entry(cat.as_str())
                .or_default() += 1;
        }
    }
    Ok(counts
        .into_iter()
        .filter_map(|(main, cats)| {
            let best = cats.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))?;
            Some((main.to_string(), best.0.to_string()))
        })
        .collect())
}

/// A derived request as written for one target.
#[derive(Debug, Clone, PartialEq)]
pub struct DerivedQuery {
    /// The C4-style request (1–3 sentences).
    pub query: String,
    /// The one-sentence version.
    pub simple_query: String,
}

/// Writes `dir` as a data directory (see the module docs): `meta.jsonl` linked to the source's
/// item file `items`, `reviews.jsonl` and `queries.csv` — the source's rows of `opts.split`
/// (without the users of `opts.hold_out`) and the derived ones, every row `opts.split` (the
/// split the targets were derived for). `written` pairs
/// each target with its request; derived rows get the ids `d-1`, `d-2`, … in that order.
/// Refuses a directory that already holds a query or review file.
pub fn write_dataset(
    dir: &Path,
    items: &Path,
    ds: &Dataset,
    opts: &DeriveOptions,
    written: &[(&DerivedTarget, DerivedQuery)],
) -> Result<()> {
    let split = opts.split;
    let items = std::fs::canonicalize(items).map_err(|e| DataError::io(items, e))?;
    let meta = if items.extension().is_some_and(|e| e == "gz") {
        "meta.jsonl.gz"
    } else {
        "meta.jsonl"
    };
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    for name in ["queries.csv", "reviews.jsonl", meta] {
        let p = dir.join(name);
        if p.exists() || p.is_symlink() {
            return Err(DataError::Invalid {
                path: p,
                line: 0,
                reason: "already exists: write the derived data set to a new directory".into(),
            });
        }
    }
    let rows = kept_rows(ds, opts)?;
    link_or_copy(&items, &dir.join(meta))?;
    let label = split.to_string();
    // Reviews: every source user's history as the source has it, then each snapshot's.
    let path = dir.join("reviews.jsonl");
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?);
    let mut users: Vec<&str> = rows.iter().map(|q| q.query().user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let io = |e: std::io::Error| DataError::io(&path, e);
    let line = |w: &mut std::io::BufWriter<std::fs::File>, r: &Review| -> Result<()> {
        let text = serde_json::to_string(r).map_err(|e| DataError::Invalid {
            path: path.clone(),
            line: 0,
            reason: e.to_string(),
        })?;
        writeln!(w, "{text}").map_err(io)
    };
    for u in &users {
        for r in ds.histories.of(u) {
            line(&mut w, r)?;
        }
    }
    for (t, _) in written {
        for r in &t.history {
            line(
                &mut w,
                &Review {
                    user_id: t.snapshot.clone(),
                    ..r.clone()
                },
            )?;
        }
    }
    w.flush().map_err(io)?;
    // Queries: the source's rows, then the derived ones.
    let path = dir.join("queries.csv");
    let csv_err = |e: csv::Error| DataError::Invalid {
        path: path.clone(),
        line: 0,
        reason: e.to_string(),
    };
    let mut w = csv::Writer::from_path(&path).map_err(csv_err)?;
    w.write_record([
        "qid",
        "query",
        "item_id",
        "user_id",
        "ori_rating",
        "ori_review",
        "simple_query",
        "category",
        "timestamp",
        "split",
    ])
    .map_err(csv_err)?;
    for q in &rows {
        let x = q.query();
        w.write_record([
            x.qid.as_str(),
            &x.query,
            q.target(),
            &x.user_id,
            &q.held_out()
                .rating
                .map(|r| r.to_string())
                .unwrap_or_default(),
            &q.held_out().text,
            x.simple_query.as_deref().unwrap_or(""),
            x.category.as_deref().unwrap_or(""),
            &x.timestamp.map(|t| t.to_string()).unwrap_or_default(),
            &label,
        ])
        .map_err(csv_err)?;
    }
    for (n, (t, q)) in written.iter().enumerate() {
        let r = &t.review;
        w.write_record([
            format!("d-{}", n + 1).as_str(),
            &q.query,
            &r.parent_asin,
            &t.snapshot,
            &r.rating.to_string(),
            &format!("{} {}", r.title, r.text),
            &q.simple_query,
            t.category.as_deref().unwrap_or(""),
            &r.timestamp.to_string(),
            &label,
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(|e| DataError::io(&path, e))?;
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    #[cfg(unix)]
    if std::os::unix::fs::symlink(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| DataError::io(to, e))
}
