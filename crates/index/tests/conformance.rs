//! One conformance suite, run against every index implementation.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use mrrec_index::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 32;
const N: usize = 300;

/// A catalogue where item i has a distinctive word `wordi` and a distinctive unit vector.
fn corpus() -> (Vec<String>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut vecs = Vec::with_capacity(N * DIM);
    let mut texts = Vec::with_capacity(N);
    for i in 0..N {
        let mut v: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        vecs.extend(v);
        texts.push(format!("common shared words item{i} colour{}", i % 7));
    }
    (texts, vecs)
}

type Builder = fn(&[String], &[f32], Option<&std::path::Path>) -> Box<dyn ItemIndex>;

fn exact(_: &[String], v: &[f32], _: Option<&std::path::Path>) -> Box<dyn ItemIndex> {
    Box::new(ExactIndex::new(DIM, v.to_vec()).unwrap())
}
fn hnsw(_: &[String], v: &[f32], _: Option<&std::path::Path>) -> Box<dyn ItemIndex> {
    Box::new(HnswIndex::build(DIM, v, HnswParams::default()).unwrap())
}
fn bm25(t: &[String], _: &[f32], dir: Option<&std::path::Path>) -> Box<dyn ItemIndex> {
    Box::new(
        Bm25Index::build(
            t.iter().enumerate().map(|(i, s)| (i as u32, s.as_str())),
            dir,
        )
        .unwrap(),
    )
}
fn hybrid(t: &[String], v: &[f32], _: Option<&std::path::Path>) -> Box<dyn ItemIndex> {
    Box::new(HybridIndex::new(
        bm25(t, v, None).into(),
        exact(t, v, None).into(),
        HybridParams::default(),
    ))
}

const ALL: [(&str, Builder); 4] = [
    ("exact", exact),
    ("hnsw", hnsw),
    ("bm25", bm25),
    ("hybrid", hybrid),
];

fn query<'a>(texts: &'a [String], vecs: &'a [f32], i: usize) -> SearchQuery<'a> {
    SearchQuery {
        text: &texts[i],
        vector: Some(&vecs[i * DIM..(i + 1) * DIM]),
    }
}

#[test]
fn an_items_own_text_and_vector_find_it_first() {
    let (t, v) = corpus();
    for (name, build) in ALL {
        let ix = build(&t, &v, None);
        assert_eq!(ix.len(), N, "{name}");
        for i in [0, 1, 17, 150, N - 1] {
            let hits = ix.search(&query(&t, &v, i), 5).unwrap();
            assert_eq!(hits[0].item, i as u32, "{name}: item {i} → {hits:?}");
        }
    }
}

#[test]
fn results_are_sorted_unique_and_bounded_by_k() {
    let (t, v) = corpus();
    for (name, build) in ALL {
        let ix = build(&t, &v, None);
        for k in [0, 1, 10, N, N + 50] {
            let hits = ix.search(&query(&t, &v, 3), k).unwrap();
            assert!(hits.len() <= k.min(N), "{name} k={k}: {}", hits.len());
            if name != "bm25" && name != "hybrid" {
                assert_eq!(hits.len(), k.min(N), "{name} k={k}");
            }
            assert!(
                hits.windows(2).all(|w| w[0].score >= w[1].score),
                "{name} k={k}: not sorted"
            );
            let unique: HashSet<u32> = hits.iter().map(|h| h.item).collect();
            assert_eq!(unique.len(), hits.len(), "{name} k={k}: duplicates");
            assert!(hits.iter().all(|h| (h.item as usize) < N));
        }
    }
}

#[test]
fn saved_indexes_reopen_with_identical_results() {
    let (t, v) = corpus();
    for (name, build) in ALL {
        let dir = tempfile::tempdir().unwrap();
        let ix = build(&t, &v, None);
        ix.save(dir.path()).unwrap();
        let back = open_index(dir.path()).unwrap();
        assert_eq!(back.kind(), ix.kind());
        assert_eq!(back.len(), N);
        for i in [2, 99] {
            let a = ix.search(&query(&t, &v, i), 20).unwrap();
            let b = back.search(&query(&t, &v, i), 20).unwrap();
            assert_eq!(a, b, "{name}");
        }
    }
}

#[test]
fn bm25_built_in_a_folder_reopens() {
    let (t, v) = corpus();
    let dir = tempfile::tempdir().unwrap();
    let ix = bm25(&t, &v, Some(dir.path()));
    let back = open_index(dir.path()).unwrap();
    assert_eq!(
        ix.search(&SearchQuery::text("item42"), 3).unwrap(),
        back.search(&SearchQuery::text("item42"), 3).unwrap()
    );
}

#[test]
fn empty_indexes_answer_nothing() {
    let t: Vec<String> = Vec::new();
    let v: Vec<f32> = Vec::new();
    for (name, build) in ALL {
        let ix = build(&t, &v, None);
        assert_eq!(ix.len(), 0, "{name}");
        let q = vec![0.1f32; DIM];
        assert!(
            ix.search(
                &SearchQuery {
                    text: "anything",
                    vector: Some(&q)
                },
                10
            )
            .unwrap()
            .is_empty(),
            "{name}"
        );
    }
}

#[test]
fn dense_indexes_reject_wrong_dimensions_and_missing_vectors() {
    let (t, v) = corpus();
    for (name, build) in [("exact", exact as Builder), ("hnsw", hnsw)] {
        let ix = build(&t, &v, None);
        let err = ix
            .search(&SearchQuery::vector(&[1.0, 2.0]), 3)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err, "wrong vector dimension: expected 32, received 2",
            "{name}"
        );
        let err = ix
            .search(&SearchQuery::text("x"), 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a query vector"), "{name}: {err}");
    }
}

#[test]
fn hostile_query_text_is_only_words() {
    let (t, v) = corpus();
    let ix = bm25(&t, &v, None);
    for q in [
        "title:item5 AND (",
        "\"unclosed",
        "*:* OR item7^100",
        "-item1 +item2",
        "",
        "   ",
        "😀😀",
    ] {
        ix.search(&SearchQuery::text(q), 10).unwrap();
    }
    let huge = "item9 ".repeat(100_000);
    assert_eq!(ix.search(&SearchQuery::text(&huge), 1).unwrap()[0].item, 9);
}

#[test]
fn hnsw_recall_against_exact_is_high() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 5000;
    let dim = 64;
    let mut vecs = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        vecs.extend(v.iter().map(|x| x / norm));
    }
    let exact = ExactIndex::new(dim, vecs.clone()).unwrap();
    let hnsw = HnswIndex::build(dim, &vecs, HnswParams::default()).unwrap();
    let (mut found, mut total) = (0, 0);
    for qi in 0..50 {
        let q = &vecs[qi * 97 * dim % (n * dim)..][..dim];
        let truth: HashSet<u32> = exact
            .search(&SearchQuery::vector(q), 100)
            .unwrap()
            .iter()
            .map(|h| h.item)
            .collect();
        let got = hnsw.search(&SearchQuery::vector(q), 100).unwrap();
        found += got.iter().filter(|h| truth.contains(&h.item)).count();
        total += 100;
    }
    let recall = found as f64 / total as f64;
    assert!(recall > 0.9, "recall@100 {recall}");
}

#[test]
fn corrupt_files_are_clear_errors() {
    let (t, v) = corpus();
    let dir = tempfile::tempdir().unwrap();
    exact(&t, &v, None).save(dir.path()).unwrap();
    let f = dir.path().join("vectors.f32");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = open_index(dir.path()).err().unwrap().to_string();
    assert!(err.contains("vectors.f32: corrupt index"), "{err}");
    std::fs::write(dir.path().join("index.kind"), "nonsense").unwrap();
    let err = open_index(dir.path()).err().unwrap().to_string();
    assert!(err.contains("unknown index kind \"nonsense\""), "{err}");
}
