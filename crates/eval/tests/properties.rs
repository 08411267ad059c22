//! Property tests of the metrics and an end-to-end resumable run with a scripted method.

#![allow(clippy::unwrap_used)]

use mrrec_data::{Catalogue, Item, Query, QueryField, QuerySet, Split};
use mrrec_eval::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn metrics_are_in_unit_interval_and_monotone_in_rank(r in 1usize..5000, k in 1usize..2000) {
        for m in [Metric::Recall(k), Metric::Ndcg(k), Metric::Mrr] {
            let v = m.of(Some(r));
            prop_assert!((0.0..=1.0).contains(&v));
            prop_assert!(m.of(Some(r + 1)) <= v);
            prop_assert!(m.of(None) == 0.0);
        }
        // A larger cut-off never lowers a metric.
        prop_assert!(ndcg_at(Some(r), k + 1) >= ndcg_at(Some(r), k));
        prop_assert!(recall_at(Some(r), k + 1) >= recall_at(Some(r), k));
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean(values in proptest::collection::vec(0.0f64..1.0, 1..60), seed in 0u64..100) {
        let users: Vec<String> = (0..values.len()).map(|i| format!("u{}", i % 9)).collect();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let e = bootstrap(&values, &users, 200, seed);
        prop_assert!(e.lo <= e.hi);
        prop_assert!(e.lo >= 0.0 && e.hi <= 1.0);
    }
}

/// Ranks items by a fixed script: query i gets its target at rank i+1 (for qids "0".."n").
struct Scripted {
    calls: std::sync::atomic::AtomicUsize,
    fail_after: Option<usize>,
}

impl Method for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn answer(
        &self,
        queries: &[&Query],
        _: QueryField,
        k: usize,
    ) -> std::result::Result<Vec<MethodAnswer>, MethodError> {
        let n = self
            .calls
            .fetch_add(queries.len(), std::sync::atomic::Ordering::SeqCst);
        if self.fail_after.is_some_and(|f| n >= f) {
            return Err(MethodError::failed("scripted failure"));
        }
        Ok(queries
            .iter()
            .map(|q| {
                let i: u32 = q.qid.parse().unwrap();
                // Target of query i is item 0; place it at rank i+1.
                let mut ranking: Vec<u32> = (1..=i).collect();
                ranking.push(0);
                ranking.extend(i + 1..50);
                ranking.truncate(k);
                MethodAnswer {
                    ranking,
                    usage: Usage {
                        memory_tokens: 10,
                        ..Default::default()
                    },
                    ..Default::default()
                }
            })
            .collect())
    }
}

fn fixture() -> (Catalogue, QuerySet) {
    let items = (0..50).map(|i| Item {
        id: format!("I{i}"),
        title: String::new(),
        main_category: None,
        text: format!("item {i}"),
    });
    let (cat, _) = Catalogue::from_items(items);
    let rows = (0..20)
        .map(|i| {
            (
                Query {
                    qid: i.to_string(),
                    user_id: format!("U{}", i % 5),
                    query: format!("q{i}"),
                    simple_query: Some(format!("s{i}")),
                    category: Some(if i % 2 == 0 { "Even" } else { "Odd" }.into()),
                    timestamp: None,
                    split: Some(Split::Val),
                },
                "I0".to_string(),
            )
        })
        .collect();
    (cat, QuerySet::from_rows(rows))
}

/// The fixture's rows an evaluation of `val` reads.
fn val_rows(qs: &QuerySet) -> Vec<&mrrec_data::LabeledQuery> {
    qs.for_purpose(&mrrec_data::Purpose::Evaluate(vec![Split::Val]))
        .unwrap()
}

fn spec() -> RunSpec {
    RunSpec {
        method: "scripted".into(),
        query_field: QueryField::SimpleQuery,
        splits: vec![Split::Val],
        limit: None,
        seed: 1,
        ks: vec![10, 100, 1000],
        bootstrap_rounds: 200,
        settings: serde_json::Value::Null,
        provenance: Default::default(),
    }
}

#[test]
fn a_run_scores_exactly_and_resumes_after_a_failure() {
    let (cat, qs) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let queries = || val_rows(&qs);
    // First attempt dies after 8 queries (batches of 4).
    let failing = Scripted {
        calls: 0.into(),
        fail_after: Some(8),
    };
    let err = run_eval(
        &failing,
        queries(),
        &cat,
        &spec(),
        dir.path(),
        4,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("scripted failure"), "{err}");
    let lines = std::fs::read_to_string(dir.path().join("per_query.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 8);
    // Simulate a write cut mid-line, then resume: only the remaining 12 (+ the cut one) are asked.
    std::fs::write(
        dir.path().join("per_query.jsonl"),
        format!("{lines}{{\"qid\": \"8\", \"us"),
    )
    .unwrap();
    let ok = Scripted {
        calls: 0.into(),
        fail_after: None,
    };
    let m = run_eval(&ok, queries(), &cat, &spec(), dir.path(), 4, &mut |_, _| {}).unwrap();
    assert_eq!(ok.calls.load(std::sync::atomic::Ordering::SeqCst), 12);
    assert_eq!(m.n, 20);
    // Ranks 1..=20: R@10 = 10/20, MRR = mean(1/r).
    assert!((m.metrics["R@10"].mean - 0.5).abs() < 1e-12);
    let mrr: f64 = (1..=20).map(|r| 1.0 / r as f64).sum::<f64>() / 20.0;
    assert!((m.metrics["MRR"].mean - mrr).abs() < 1e-12);
    assert_eq!(m.per_category["Even"].0, 10);
    assert_eq!(m.memory_tokens_per_query, 10.0);
    for f in ["metrics.json", "table.md", "recall.svg", "run.json"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let table = std::fs::read_to_string(dir.path().join("table.md")).unwrap();
    assert!(
        table.starts_with("| method | R@100 | R@10 | N@100 | N@10 | MRR | queries |"),
        "{table}"
    );
    // A finished run is not recomputed.
    let again = Scripted {
        calls: 0.into(),
        fail_after: None,
    };
    run_eval(
        &again,
        queries(),
        &cat,
        &spec(),
        dir.path(),
        4,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(again.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A different run into the same folder is refused.
    let mut other = spec();
    other.seed = 2;
    let err = run_eval(
        &again,
        queries(),
        &cat,
        &other,
        dir.path(),
        4,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("holds a different run"), "{err}");
    // Comparing a run with itself: zero difference, p = 1.
    let (rows, text) = compare_runs(dir.path(), dir.path(), 200, 1).unwrap();
    assert!(
        rows.iter()
            .all(|(_, c)| c.diff.mean == 0.0 && c.p_value == 1.0 && (c.up, c.down) == (0, 0)),
        "{text}"
    );
    assert!(
        text.contains("| 20 | 0 / 0 |") && !text.contains("moved one way"),
        "{text}"
    );
    // … per group too: every query in one group, none in the other.
    let by = compare_runs_by(
        &[dir.path()],
        &[dir.path()],
        200,
        1,
        "group",
        &["all", "none"],
        &|_| Some("all".to_string()),
    )
    .unwrap();
    assert!(by.contains("| none | 0 |"), "{by}");
    assert!(
        by.lines()
            .any(|l| l.starts_with("| all |") && l.contains("+0.000 [+0.000, +0.000] | 1.0000")),
        "{by}"
    );
    // Two runs of the same method are told apart by their folders, in comparisons and reports.
    let folder = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(text.contains(&format!("({folder})")), "{text}");
    let (md, _) = mrrec_eval::report::report_runs(&[&[dir.path()], &[dir.path()]], 50, 1).unwrap();
    assert!(md.contains(&format!("({folder}) |")), "{md}");
}

#[test]
fn limit_picks_a_seeded_subset_in_file_order() {
    let (_, qs) = fixture();
    let all = val_rows(&qs);
    let mut s = spec();
    s.limit = Some(5);
    let (a, _) = select_queries(all.clone(), &s);
    let (b, _) = select_queries(all.clone(), &s);
    assert_eq!(a.len(), 5);
    let ids = |v: &[&mrrec_data::LabeledQuery]| {
        v.iter()
            .map(|q| q.query().qid.parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    assert!(ids(&a).windows(2).all(|w| w[0] < w[1]));
    s.seed = 99;
    let (c, _) = select_queries(all, &s);
    assert_ne!(ids(&a), ids(&c));
}

#[test]
fn the_folds_of_a_cross_validation_are_compared_as_one_run_and_mismatched_folds_are_refused() {
    let (cat, qs) = fixture();
    let all = val_rows(&qs);
    let run = |dir: &std::path::Path, fold: Option<&str>, keep: &dyn Fn(&str) -> bool| {
        let mut s = spec();
        if let Some(f) = fold {
            s.provenance.insert("fold".into(), f.into());
        }
        let picked: Vec<_> = all
            .iter()
            .copied()
            .filter(|q| keep(&q.query().user_id))
            .collect();
        let m = Scripted {
            calls: 0.into(),
            fail_after: None,
        };
        run_eval(&m, picked, &cat, &s, dir, 4, &mut |_, _| {}).unwrap();
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    let fold = |i: u32| mrrec_data::Fold { index: i, of: 2 };
    run(&d("f1"), Some("1/2"), &|u| fold(1).holds(u));
    run(&d("f2"), Some("2/2"), &|u| fold(2).holds(u));
    run(&d("all"), None, &|_| true);
    let (f1, f2, whole) = (d("f1"), d("f2"), d("all"));
    let n = |p: &std::path::Path| load_run(p).unwrap().1.len();
    assert!(n(&f1) > 0 && n(&f2) > 0, "both folds hold queries");
    assert_eq!(n(&f1) + n(&f2), 20);
    // The two folds joined are the whole run's 20 queries, ranked alike: no difference.
    let (rows, text) =
        compare_run_sets(&[f1.as_path(), f2.as_path()], &[whole.as_path()], 200, 1).unwrap();
    assert!(
        rows.iter().all(|(_, c)| c.n == 20 && c.diff.mean == 0.0),
        "{text}"
    );
    assert!(text.contains("2 folds joined"), "{text}");
    let (joined, outcomes) = load_runs(&[f1.as_path(), f2.as_path()]).unwrap();
    assert_eq!(joined.spec.provenance["fold"], "1/2+2/2");
    assert_eq!(outcomes.len(), 20);
    // Its numbers are the joined queries' — the whole run's — not the first fold's.
    let (all_m, _) = load_run(&whole).unwrap();
    assert_eq!(joined.n, 20);
    for (k, e) in &all_m.metrics {
        assert!((joined.metrics[k].mean - e.mean).abs() < 1e-12, "{k}");
    }
    // `report` takes the joined folds as one row beside the whole run.
    let (md, _) = mrrec_eval::report::report_runs(
        &[&[f1.as_path(), f2.as_path()], &[whole.as_path()]],
        50,
        1,
    )
    .unwrap();
    assert!(md.contains("(f1), 2 folds joined |"), "{md}");
    // Its row counts the joined queries.
    assert!(
        md.lines()
            .any(|l| l.contains("2 folds joined |") && l.ends_with(" 20 |")),
        "{md}"
    );
    // One fold alone is compared on its own queries.
    let (rows, _) = compare_run_sets(&[f1.as_path()], &[whole.as_path()], 200, 1).unwrap();
    assert_eq!(rows[0].1.n, n(&f1));
    // The same fold twice, a run that is no fold, a fold of another K: refused, naming the folder.
    let err = |dirs: &[&std::path::Path]| load_runs(dirs).unwrap_err().to_string();
    let e = err(&[f1.as_path(), f1.as_path()]);
    assert!(e.contains("distinct folds") && e.contains("f1"), "{e}");
    let e = err(&[f1.as_path(), whole.as_path()]);
    assert!(e.contains("not a fold's run") && e.contains("all"), "{e}");
    run(&d("k3"), Some("2/3"), &|u| fold(2).holds(u));
    let e = err(&[f1.as_path(), d("k3").as_path()]);
    assert!(e.contains("fold 2/3 does not join fold 1/2"), "{e}");
    // Folds that share a query (a fold label written by hand on the wrong run) are refused.
    run(&d("f2-all"), Some("2/2"), &|_| true);
    let e = err(&[f1.as_path(), d("f2-all").as_path()]);
    assert!(e.contains("folds share no query"), "{e}");
}
