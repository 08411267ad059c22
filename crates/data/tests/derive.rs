//! Training queries derived from `train` users' histories: which reviews become targets, that a
//! snapshot's history ends strictly before its target, that no `val` user is touched, and that
//! the written directory loads as a data set whose every row is `train` — and, derived for `val`,
//! a data set whose every row is `val`, never admitted for training.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use mrrec_data::derive::{
    derive_targets, write_dataset, DeriveOptions, DerivedQuery, DerivedTarget,
};
use mrrec_data::{Dataset, LoadOptions, Purpose, Split};

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn review(user: &str, item: &str, rating: u8, t: i64) -> String {
    format!(
        r#"{{"user_id":"{user}","parent_asin":"{item}","rating":{rating},"title":"t{item}","text":"about {item}","timestamp":{t}}}"#
    )
}

/// Items I1–I9 (Toys & Games, I9 Books); `tom` (train) and `vera` (val) with histories.
fn toy(dir: &Path) -> Dataset {
    let mut meta = String::new();
    for i in 1..=9 {
        let cat = if i == 9 { "Books" } else { "Toys & Games" };
        meta.push_str(&format!(
            "{{\"parent_asin\":\"I{i}\",\"title\":\"Item number {i}\",\"main_category\":\"{cat}\"}}\n"
        ));
    }
    write(dir, "meta.jsonl", &meta);
    let reviews = [
        // tom: I1 (5★), I2 (2★), I3 (5★), I1 again (5★), I4 (4★), I5 (5★, his query's target)
        review("tom", "I1", 5, 10),
        review("tom", "I2", 2, 20),
        review("tom", "I3", 5, 30),
        review("tom", "I1", 5, 40),
        review("tom", "I4", 4, 50),
        review("tom", "I9", 5, 55),
        review("tom", "I5", 5, 60),
        // vera: plenty of history, but a val user.
        review("vera", "I6", 5, 10),
        review("vera", "I7", 5, 20),
        review("vera", "I8", 5, 30),
    ]
    .join("\n");
    write(dir, "reviews.jsonl", &reviews);
    write(
        dir,
        "queries.csv",
        "qid,query,item_id,user_id,ori_rating,ori_review,simple_query,category,timestamp,split\n\
         q1,I want toys,I5,tom,5,great,toys please,Toys_and_Games,70,train\n\
         q2,I want more,I6,vera,5,fine,more please,Toys_and_Games,70,val\n\
         q3,A toy,I3,vera,5,ok,a toy,Toys_and_Games,35,aspect\n",
    );
    Dataset::load(dir, None, &LoadOptions::default()).unwrap()
}

/// Writes `targets` with requests from `query` as a derived directory `dir/name` for `split`
/// (the item file linked from `dir`).
fn write_derived(
    dir: &Path,
    name: &str,
    ds: &Dataset,
    split: Split,
    targets: &[DerivedTarget],
    query: impl Fn(&DerivedTarget) -> String,
) -> mrrec_data::Result<PathBuf> {
    let written: Vec<_> = targets
        .iter()
        .map(|t| {
            (
                t,
                DerivedQuery {
                    query: query(t),
                    simple_query: "Something for play?".into(),
                },
            )
        })
        .collect();
    let out = dir.join(name);
    let opts = DeriveOptions {
        split,
        ..Default::default()
    };
    write_dataset(&out, &dir.join("meta.jsonl"), ds, &opts, &written)?;
    Ok(out)
}

#[test]
fn targets_are_train_users_earlier_good_purchases_with_history_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy(dir.path());
    let opts = DeriveOptions {
        per_user: 5,
        min_history: 2,
        min_rating: 4.0,
        max_users: None,
        split: Split::Train,
        hold_out: None,
    };
    let (targets, report) = derive_targets(&ds, &opts).unwrap();
    // Latest first: I9 (55), I4 (50); I5 is his query's target, I1@40 repeats an earlier item,
    // I3@30 has 2 reviews before it and qualifies; I2 is rated 2; I1@10 has no history.
    let got: Vec<(&str, &str, usize)> = targets
        .iter()
        .map(|t| {
            (
                t.snapshot.as_str(),
                t.review.parent_asin.as_str(),
                t.history.len(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("tom@55", "I9", 5),
            ("tom@50", "I4", 4),
            ("tom@30", "I3", 2)
        ]
    );
    assert!(
        targets.iter().all(|t| t.user_id == "tom"),
        "a val user was used"
    );
    for t in &targets {
        assert!(t.history.iter().all(|r| r.timestamp < t.review.timestamp));
    }
    // The scenario comes from the train and aspect queries whose targets share the category.
    assert_eq!(targets[1].category.as_deref(), Some("Toys_and_Games"));
    assert_eq!(targets[0].category, None, "no query names a Books scenario");
    assert_eq!(report.users, 1);
    assert_eq!(report.reviews, 7);
    assert_eq!(report.targets, 3);
    assert_eq!(report.skipped["rated below the minimum"], 1);
    assert_eq!(
        report.skipped["of an item reviewed earlier or asked for"],
        2
    );
    assert_eq!(report.skipped["with too little history before them"], 1);
    // Per user and minimum history are honoured; the same input gives the same targets.
    let (two, _) = derive_targets(
        &ds,
        &DeriveOptions {
            per_user: 2,
            min_history: 3,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[1].review.parent_asin, "I4");
    assert_eq!(derive_targets(&ds, &opts).unwrap().0, targets);
    // No train user left: nothing.
    let none = DeriveOptions {
        max_users: Some(0),
        ..opts
    };
    assert!(derive_targets(&ds, &none).unwrap().0.is_empty());
}

#[test]
fn the_written_directory_is_a_training_data_set_of_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy(dir.path());
    let (targets, _) = derive_targets(&ds, &DeriveOptions::default()).unwrap();
    let query =
        |t: &DerivedTarget| format!("I need something, with \"quotes\", like {}", t.snapshot);
    let out = write_derived(dir.path(), "derived", &ds, Split::Train, &targets, query).unwrap();
    let d = Dataset::load(&out, None, &LoadOptions::default()).unwrap();
    assert_eq!(d.catalogue.len(), ds.catalogue.len());
    assert!(
        d.reports.iter().all(|r| r.total_skipped() == 0),
        "{:?}",
        d.reports
    );
    // Every row is train: the source's train row, then the derived ones.
    let rows = d.queries.for_purpose(&Purpose::Training).unwrap();
    assert_eq!(rows.len(), d.queries.len());
    let ids: Vec<&str> = rows.iter().map(|q| q.query().qid.as_str()).collect();
    assert_eq!(ids, ["q1", "d-1", "d-2"]);
    assert!(rows.iter().all(|q| q.query().split == Some(Split::Train)));
    let d1 = rows[1];
    assert_eq!(d1.query().user_id, "tom@55");
    assert_eq!(d1.target(), "I9");
    assert_eq!(d1.query().timestamp, Some(55));
    assert_eq!(
        d1.query().simple_query.as_deref(),
        Some("Something for play?")
    );
    assert!(d1.query().query.contains("\"quotes\""));
    // The snapshot's history is the user's reviews strictly before the target; no val user.
    let h: Vec<i64> = d
        .histories
        .of("tom@55")
        .iter()
        .map(|r| r.timestamp)
        .collect();
    assert_eq!(h, [10, 20, 30, 40, 50]);
    assert_eq!(d.histories.of("tom").len(), 7);
    assert!(d.histories.of("vera").is_empty());
    // A second write into the same directory is refused.
    let err = write_derived(dir.path(), "derived", &ds, Split::Train, &targets, query).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

/// Derived for `val`: only the `val` users' purchases, the targets of `aspect` rows passed over
/// (global memory read their requests), and a directory of `val` rows that training refuses.
#[test]
fn derived_for_val_it_is_an_evaluation_set_that_never_trains() {
    let dir = tempfile::tempdir().unwrap();
    toy(dir.path());
    // vera: I6 (10), I7 (20), I8 (30), I3 (40), I2 (50); her query asks for I6 at 70, and an
    // aspect row was written from her I3 review.
    let mut reviews = std::fs::read_to_string(dir.path().join("reviews.jsonl")).unwrap();
    reviews.push('\n');
    reviews.push_str(&[review("vera", "I3", 5, 40), review("vera", "I2", 5, 50)].join("\n"));
    write(dir.path(), "reviews.jsonl", &reviews);
    write(
        dir.path(),
        "queries.csv",
        "qid,query,item_id,user_id,ori_rating,ori_review,simple_query,category,timestamp,split\n\
         q1,I want toys,I5,tom,5,great,toys please,Toys_and_Games,70,train\n\
         q2,I want more,I6,vera,5,fine,more please,Toys_and_Games,70,val\n\
         q3,A toy,I3,vera,5,ok,a toy,Toys_and_Games,40,aspect\n",
    );
    let ds = Dataset::load(dir.path(), None, &LoadOptions::default()).unwrap();
    let opts = DeriveOptions {
        per_user: 5,
        split: Split::Val,
        ..DeriveOptions::default()
    };
    let (targets, report) = derive_targets(&ds, &opts).unwrap();
    let got: Vec<(&str, &str)> = targets
        .iter()
        .map(|t| (t.snapshot.as_str(), t.review.parent_asin.as_str()))
        .collect();
    // I2@50 and I8@30 qualify; I3@40 is the aspect row's target; I7 has one review before it;
    // I6 is her query's target. Tom (train) is never looked at.
    assert_eq!(got, [("vera@50", "I2"), ("vera@30", "I8")]);
    assert_eq!(report.users, 1);
    assert_eq!(report.split, Some(Split::Val));
    assert_eq!(
        report.skipped["the target of an aspect query (read by global memory)"],
        1
    );
    assert!(report.to_string().starts_with("1 val users"), "{report}");
    // Training derives the same way as before: the aspect rule is for evaluation sets only.
    let (train, _) = derive_targets(
        &ds,
        &DeriveOptions {
            split: Split::Train,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(train.iter().all(|t| t.user_id == "tom") && !train.is_empty());
    // The written directory: vera's val row and the derived ones, all val; nothing trains.
    let out = write_derived(dir.path(), "derived-val", &ds, Split::Val, &targets, |_| {
        "I need a toy".into()
    })
    .unwrap();
    let d = Dataset::load(&out, None, &LoadOptions::default()).unwrap();
    let rows = d
        .queries
        .for_purpose(&Purpose::Evaluate(vec![Split::Val]))
        .unwrap();
    let ids: Vec<&str> = rows.iter().map(|q| q.query().qid.as_str()).collect();
    assert_eq!(ids, ["q2", "d-1", "d-2"]);
    assert_eq!(rows.len(), d.queries.len());
    assert!(d
        .queries
        .for_purpose(&Purpose::Training)
        .unwrap()
        .is_empty());
    assert!(
        d.histories.of("tom").is_empty(),
        "a train user's history was copied"
    );
    let h: Vec<i64> = d
        .histories
        .of("vera@50")
        .iter()
        .map(|r| r.timestamp)
        .collect();
    assert_eq!(h, [10, 20, 30, 40]);
    // `aspect` users cannot be derived for.
    let err = derive_targets(
        &ds,
        &DeriveOptions {
            split: Split::Aspect,
            ..opts
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("aspect"), "{err}");
}

#[test]
fn a_query_file_without_splits_derives_nothing() {
    let dir = tempfile::tempdir().unwrap();
    toy(dir.path());
    write(
        dir.path(),
        "queries.csv",
        "qid,query,item_id,user_id\nq1,I want toys,I5,tom\n",
    );
    let ds = Dataset::load(dir.path(), None, &LoadOptions::default()).unwrap();
    let err = derive_targets(&ds, &DeriveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("split"), "{err}");
}

/// On the real mini set: only train users (only val users for `val`), every snapshot's history
/// strictly earlier, and the snapshot ids never collide with real users.
#[test]
fn on_the_mini_set_only_the_chosen_splits_users_give_targets() {
    let mini = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/amazon23-mini");
    let mini = std::env::var_os("MRREC_SHARED")
        .map(|s| PathBuf::from(s).join("data/amazon23-mini"))
        .unwrap_or(mini);
    let ds = Dataset::load(&mini, None, &LoadOptions::default()).unwrap();
    let (targets, report) = derive_targets(&ds, &DeriveOptions::default()).unwrap();
    let train: std::collections::HashSet<&str> = ds
        .queries
        .for_purpose(&Purpose::Training)
        .unwrap()
        .iter()
        .map(|q| q.query().user_id.as_str())
        .collect();
    assert_eq!(report.users, train.len());
    assert!(report.targets > 50, "{report}");
    for t in &targets {
        assert!(train.contains(t.user_id.as_str()));
        assert!(!ds.histories.contains(&t.snapshot));
        assert!(t.history.len() >= 2);
        assert!(t.history.iter().all(|r| r.timestamp < t.review.timestamp));
        assert!(t.review.rating >= 4.0);
    }
    // For `val`: only val users, and no target an aspect row was written from.
    let opts = DeriveOptions {
        split: Split::Val,
        ..DeriveOptions::default()
    };
    let (targets, report) = derive_targets(&ds, &opts).unwrap();
    let val: std::collections::HashSet<&str> = ds
        .queries
        .for_purpose(&Purpose::Evaluate(vec![Split::Val]))
        .unwrap()
        .iter()
        .map(|q| q.query().user_id.as_str())
        .collect();
    let aspects: std::collections::HashSet<(&str, &str)> = ds
        .queries
        .all()
        .iter()
        .filter(|q| q.query().split == Some(Split::Aspect))
        .map(|q| (q.query().user_id.as_str(), q.target()))
        .collect();
    assert_eq!(report.users, val.len());
    assert!(report.targets > 50, "{report}");
    for t in &targets {
        assert!(val.contains(t.user_id.as_str()) && !train.contains(t.user_id.as_str()));
        assert!(!aspects.contains(&(t.user_id.as_str(), t.review.parent_asin.as_str())));
        assert!(t.history.iter().all(|r| r.timestamp < t.review.timestamp));
    }
}

/// Cross-validation inside `train`: a fold held out leaves its users' rows, histories and
/// purchases out of the derived data set, and the two halves' targets are the whole's.
#[test]
fn a_held_out_fold_leaves_its_users_out_of_the_derived_data_set() {
    let dir = tempfile::tempdir().unwrap();
    toy(dir.path());
    // Twelve more train users, each with four 5★ reviews and a query after them.
    let users: Vec<String> = (0..12).map(|i| format!("user{i:02}")).collect();
    let mut reviews = std::fs::read_to_string(dir.path().join("reviews.jsonl")).unwrap();
    let mut queries = std::fs::read_to_string(dir.path().join("queries.csv")).unwrap();
    for (n, u) in users.iter().enumerate() {
        for (k, item) in ["I1", "I2", "I3", "I4"].iter().enumerate() {
            reviews.push('\n');
            reviews.push_str(&review(u, item, 5, 10 * (k as i64 + 1)));
        }
        queries.push_str(&format!(
            "u{n},I want one,I5,{u},5,good,one please,Toys_and_Games,70,train\n"
        ));
    }
    write(dir.path(), "reviews.jsonl", &reviews);
    write(dir.path(), "queries.csv", &queries);
    let ds = Dataset::load(dir.path(), None, &LoadOptions::default()).unwrap();
    let fold = |i| mrrec_data::Fold { index: i, of: 2 };
    let opts = |hold_out| DeriveOptions {
        per_user: 1,
        hold_out,
        ..Default::default()
    };
    let (whole, _) = derive_targets(&ds, &opts(None)).unwrap();
    let (one, report) = derive_targets(&ds, &opts(Some(fold(1)))).unwrap();
    let (two, _) = derive_targets(&ds, &opts(Some(fold(2)))).unwrap();
    // Every target of a held-out run is of a user outside the fold; the halves make the whole.
    assert!(one.iter().all(|t| !fold(1).holds(&t.user_id)));
    assert!(two.iter().all(|t| !fold(2).holds(&t.user_id)));
    assert!(!one.is_empty() && !two.is_empty());
    let mut joined: Vec<String> = one.iter().chain(&two).map(|t| t.snapshot.clone()).collect();
    let mut all: Vec<String> = whole.iter().map(|t| t.snapshot.clone()).collect();
    joined.sort();
    all.sort();
    assert_eq!(joined, all);
    let held = users
        .iter()
        .chain([&"tom".to_string()])
        .filter(|u| fold(1).holds(u))
        .count();
    assert!(held > 0);
    assert_eq!(report.held_out, Some((fold(1), held)));
    assert!(
        report
            .to_string()
            .contains(&format!("({held} users of fold 1/2 held out)")),
        "{report}"
    );
    // The written data set holds no row, history or snapshot of a fold-1 user.
    let written: Vec<_> = one
        .iter()
        .map(|t| {
            (
                t,
                DerivedQuery {
                    query: "I need one".into(),
                    simple_query: "One?".into(),
                },
            )
        })
        .collect();
    let out = dir.path().join("held-out");
    write_dataset(
        &out,
        &dir.path().join("meta.jsonl"),
        &ds,
        &opts(Some(fold(1))),
        &written,
    )
    .unwrap();
    let d = Dataset::load(&out, None, &LoadOptions::default()).unwrap();
    let rows = d.queries.for_purpose(&Purpose::Training).unwrap();
    assert_eq!(rows.len(), (13 - held) + one.len());
    for q in rows {
        assert!(!fold(1).holds(&q.query().user_id), "{}", q.query().user_id);
    }
    for u in users.iter().filter(|u| fold(1).holds(u)) {
        assert!(d.histories.of(u).is_empty(), "{u}");
    }
    // No snapshot user of the held-out fold appears in the histories either.
    let text = std::fs::read_to_string(out.join("reviews.jsonl")).unwrap();
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(!fold(1).holds(r["user_id"].as_str().unwrap()), "{line}");
    }
}
