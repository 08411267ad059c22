//! Query-only retrieval methods for `mrrec eval`: `bm25`, `dense`, `hybrid`. LLM and memory
//! methods register beside them as later layers land.

use std::sync::Arc;

use mrrec_data::{Query, QueryField};
use mrrec_embed::TextEmbedder;
use mrrec_eval::{Method, MethodAnswer, MethodError};
use mrrec_index::{ItemIndex, SearchQuery};
use rayon::prelude::*;

/// Names `mrrec eval --method` accepts.
pub fn method_names() -> &'static [&'static str] {
    &["bm25", "dense", "hybrid"]
}

fn texts<'a>(queries: &[&'a Query], field: QueryField) -> Result<Vec<&'a str>, MethodError> {
    queries
        .iter()
        .map(|q| {
            q.text(field)
                .ok_or_else(|| MethodError(format!("query {} has no {field}", q.qid)))
        })
        .collect()
}

/// BM25 over item text, reading the query text.
pub struct LexicalMethod {
    /// The BM25 index.
    pub index: Arc<dyn ItemIndex>,
}

impl Method for LexicalMethod {
    fn name(&self) -> &str {
        "bm25"
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> Result<Vec<MethodAnswer>, MethodError> {
        texts(queries, field)?
            .par_iter()
            .map(|t| {
                let hits = self.index.search(&SearchQuery::text(t), k)?;
                Ok(MethodAnswer {
                    ranking: hits.iter().map(|h| h.item).collect(),
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// Embeds the query text and searches an index with text and vector: a dense index (`dense`) or
/// the RRF fusion of BM25 and dense (`hybrid`).
pub struct DenseMethod {
    /// Registry name.
    pub name: String,
    /// Query embedder.
    pub embedder: Arc<dyn TextEmbedder>,
    /// The index searched with text and vector.
    pub index: Arc<dyn ItemIndex>,
}

impl Method for DenseMethod {
    fn name(&self) -> &str {
        &self.name
    }
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "embedder": self.embedder.model_id(), "index": self.index.kind() })
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> Result<Vec<MethodAnswer>, MethodError> {
        let texts = texts(queries, field)?;
        let vecs = self.embedder.embed(&texts)?;
        texts
            .iter()
            .zip(&vecs)
            .map(|(t, v)| {
                let hits = self.index.search(
                    &SearchQuery {
                        text: t,
                        vector: Some(v),
                    },
                    k,
                )?;
                Ok(MethodAnswer {
                    ranking: hits.iter().map(|h| h.item).collect(),
                    ..Default::default()
                })
            })
            .collect()
    }
}
