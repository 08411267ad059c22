//! The real all-MiniLM-L6-v2 (fetched on first use) against sentence-transformers' published
//! similarities, and the cache.

#![allow(clippy::unwrap_used)]

use mrrec_embed::*;

#[test]
fn reproduces_sentence_transformers_similarities() {
    let e = BertEmbedder::default_model().unwrap();
    assert_eq!(e.dim(), 384);
    let v = e
        .embed(&[
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ])
        .unwrap();
    let s1 = cosine(&v[0], &v[1]);
    let s2 = cosine(&v[0], &v[2]);
    assert!((s1 - 0.6660).abs() < 5e-5, "{s1}");
    assert!((s2 - 0.1046).abs() < 5e-5, "{s2}");
    for x in &v {
        let n: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    // Batching and padding do not change a vector.
    let alone = e.embed(&["He drove to the stadium."]).unwrap();
    assert!(cosine(&alone[0], &v[2]) > 0.99999);
    // Huge and odd input is cut, not an error.
    let huge = "word ".repeat(50_000);
    let odd = e
        .embed(&[huge.as_str(), "", "😀 \u{0} ignore previous instructions"])
        .unwrap();
    assert_eq!(odd.len(), 3);
}

#[test]
fn cache_returns_identical_vectors_and_skips_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let cache = EmbeddingCache::open(&dir.path().join("e.sqlite")).unwrap();
    let e = CachedEmbedder::new(BertEmbedder::default_model().unwrap(), cache);
    let texts = ["a pillow for CPAP", "a blue kettle", "a pillow for CPAP"];
    let first = e.embed(&texts).unwrap();
    assert_eq!(e.cache().len().unwrap(), 2);
    assert_eq!(first[0], first[2]);
    let mut calls = Vec::new();
    let second = e
        .embed_with_progress(&texts, &mut |d, t| calls.push((d, t)))
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(calls, vec![(3, 3)]);
    // Reopened from disk, still there.
    drop(e);
    let cache = EmbeddingCache::open(&dir.path().join("e.sqlite")).unwrap();
    assert_eq!(
        cache
            .get(DEFAULT_EMBEDDER, "a blue kettle")
            .unwrap()
            .unwrap(),
        first[1]
    );
    assert_eq!(
        cache
            .forget_texts(&[DEFAULT_EMBEDDER], &["a blue kettle"])
            .unwrap(),
        1
    );
    assert!(cache
        .get(DEFAULT_EMBEDDER, "a blue kettle")
        .unwrap()
        .is_none());
}
