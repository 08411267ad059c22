//! What the assistant, the evaluation methods and the rewards may read of a workspace: the
//! catalogue, users' past interactions, the embedder and the item indexes — and nothing that holds
//! a query's target. [`crate::Workspace`] builds one ([`crate::Workspace::shop`]); tests build one
//! from fakes (a fixed embedder, a small exact index).
//!
//! The labelled queries of a data set live in `Dataset::queries`, which a `Shop` does not hold,
//! so no code reachable from an answer can name one:
//!
//! ```
//! fn catalogue_size(a: &mrrec_agent::assistant::Assistant) -> usize {
//!     a.shop.catalogue.len()
//! }
//! ```
//!
//! ```compile_fail
//! fn peek(a: &mrrec_agent::assistant::Assistant) -> usize {
//!     a.shop.dataset.queries.all().len() // no such field: the queries are not reachable
//! }
//! ```
//!
//! ```compile_fail
//! fn peek(a: &mrrec_agent::assistant::Assistant) -> usize {
//!     a.shop.queries.all().len() // no such field either
//! }
//! ```

use std::sync::Arc;

use crate::error::Result;
use mrrec_data::{Catalogue, Histories};
use mrrec_embed::TextEmbedder;
use mrrec_index::{Hit, HybridIndex, HybridParams, ItemIndex, SearchQuery};

/// The read-only view a request works on (cheap to copy).
#[derive(Clone, Copy)]
pub struct Shop<'a> {
    /// The items every method ranks.
    pub catalogue: &'a Catalogue,
    /// Users' past reviews (a method reads only those before a query's time).
    pub histories: &'a Histories,
    /// The text embedder the dense index was built with.
    pub embedder: &'a dyn TextEmbedder,
    /// The dense item index.
    pub dense: &'a Arc<dyn ItemIndex>,
    /// The BM25 item index.
    pub lexical: &'a Arc<dyn ItemIndex>,
}

impl Shop<'_> {
    /// A hybrid (RRF) index over the lexical and dense indexes.
    pub fn hybrid(&self) -> HybridIndex {
        HybridIndex::new(
            self.lexical.clone(),
            self.dense.clone(),
            HybridParams::default(),
        )
    }

    /// Embeds `text` and returns the `k` nearest items of the dense index.
    pub fn search_dense(&self, text: &str, k: usize) -> Result<Vec<Hit>> {
        let v = self.embedder.embed(&[text])?.remove(0);
        Ok(self.dense.search(
            &SearchQuery {
                text,
                vector: Some(&v),
            },
            k,
        )?)
    }
}
