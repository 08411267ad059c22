//! The methods of `mrrec eval`: the query-only retrieval baselines `bm25`, `dense`, `hybrid`;
//! `hybrid-history`, the request's hybrid ranking fused with the user's past items (memory without
//! an LLM); and the LLM methods — the baselines and MR.Rec with its ablations.

use std::sync::Arc;

use mrrec_data::{Query, QueryField};
use mrrec_embed::TextEmbedder;
use mrrec_eval::{Method, MethodAnswer, MethodError};
use mrrec_index::{Hit, ItemIndex, SearchQuery};
use rayon::prelude::*;

/// Names `mrrec eval --method` accepts.
pub fn method_names() -> &'static [&'static str] {
    &["bm25", "dense", "hybrid", "hybrid-history"]
}

/// An agent error as a method error: a cancellation stays a cancellation.
pub(crate) fn method_error(e: crate::AgentError) -> MethodError {
    if e.is_cancelled() {
        MethodError::Cancelled
    } else {
        MethodError::failed(e)
    }
}

/// A retrieval method's answer: the hits' items in order, no LLM usage or trace.
fn ranked(hits: &[Hit]) -> MethodAnswer {
    MethodAnswer {
        ranking: hits.iter().map(|h| h.item).collect(),
        ..Default::default()
    }
}

fn texts<'a>(queries: &[&'a Query], field: QueryField) -> Result<Vec<&'a str>, MethodError> {
    queries
        .iter()
        .map(|q| {
            q.text(field)
                .ok_or_else(|| MethodError::Query(format!("query {} has no {field}", q.qid)))
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
                let hits = self
                    .index
                    .search(&SearchQuery::text(t), k)
                    .map_err(MethodError::failed)?;
                Ok(ranked(&hits))
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
        let vecs = self.embedder.embed(&texts).map_err(MethodError::failed)?;
        texts
            .iter()
            .zip(&vecs)
            .map(|(t, v)| {
                let hits = self
                    .index
                    .search(
                        &SearchQuery {
                            text: t,
                            vector: Some(v),
                        },
                        k,
                    )
                    .map_err(MethodError::failed)?;
                Ok(ranked(&hits))
            })
            .collect()
    }
}

/// `hybrid-history`: the request's hybrid ranking fused with the dense ranking of the user's past
/// items ([`crate::Shop::rank_with_history`]). No LLM, no memory store: it tells whether a user's
/// history says anything about what they ask for that the request does not.
pub struct HistoryMethod<'a> {
    /// The catalogue, histories, embedder and indexes.
    pub shop: crate::Shop<'a>,
    /// How the history is weighed.
    pub params: crate::shop::HistoryParams,
}

impl Method for HistoryMethod<'_> {
    fn name(&self) -> &str {
        "hybrid-history"
    }
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "embedder": self.shop.embedder.model_id(),
            "index": "hybrid",
            "history": self.params,
        })
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> Result<Vec<MethodAnswer>, MethodError> {
        let texts = texts(queries, field)?;
        queries
            .iter()
            .zip(&texts)
            .map(|(q, t)| {
                let hits = self
                    .shop
                    .rank_with_history(q, t, self.params, k)
                    .map_err(method_error)?;
                Ok(ranked(&hits))
            })
            .collect()
    }
}

/// Any method's ranking without the items its user interacted with before the request
/// (`mrrec eval --exclude-seen`): what a shop does not offer again. The method is asked for as
/// many more items as the user has past ones, so `k` remain.
pub struct ExcludeSeen<'a> {
    /// The method whose ranking is filtered.
    pub inner: Box<dyn Method + 'a>,
    /// The run's name.
    pub name: String,
    /// The histories and the catalogue.
    pub shop: crate::Shop<'a>,
}

impl ExcludeSeen<'_> {
    /// The catalogue positions of the items `q`'s user reviewed before `q`'s time.
    pub fn seen(&self, q: &Query) -> std::collections::HashSet<u32> {
        self.shop
            .histories
            .before(&q.user_id, q.timestamp)
            .iter()
            .filter_map(|r| self.shop.catalogue.position(&r.parent_asin))
            .collect()
    }
}

impl Method for ExcludeSeen<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "method": self.inner.settings(), "exclude_seen": true })
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> Result<Vec<MethodAnswer>, MethodError> {
        let seen: Vec<_> = queries.iter().map(|q| self.seen(q)).collect();
        let more = seen.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut answers = self.inner.answer(queries, field, k + more)?;
        for (a, s) in answers.iter_mut().zip(&seen) {
            a.ranking.retain(|i| !s.contains(i));
            a.ranking.truncate(k);
        }
        Ok(answers)
    }
}

/// What an LLM method puts in front of the model.
#[derive(Debug, Clone)]
pub enum LlmKind {
    /// `llm-rewrite`: the request alone, rewritten into an ideal item profile.
    Rewrite,
    /// `naive-memory`: the 10 most recent interactions before the request's time.
    NaiveMemory,
    /// `static-memory`: the user's stored profile.
    StaticMemory,
    /// `mrrec` and its ablations: the full loop with these settings.
    Assistant,
}

/// The LLM methods of `mrrec eval`: the baselines and MR.Rec with its ablations. All receive
/// the scenario as context; none filters the catalogue by it.
pub struct LlmMethod<'a> {
    /// Registry name (`mrrec`, `naive-memory`, …).
    pub name: String,
    /// Which method.
    pub kind: LlmKind,
    /// The assistant (its config carries mode, levels, global memory).
    pub assistant: crate::assistant::Assistant<'a>,
}

/// Names of the LLM methods.
pub fn llm_method_names() -> &'static [&'static str] {
    &[
        "llm-rewrite",
        "naive-memory",
        "static-memory",
        "mrrec",
        "mrrec-no-global",
        "mrrec-no-local",
        "mrrec-records-only",
        "mrrec-patterns-only",
        "mrrec-profile-only",
    ]
}

/// The kind and assistant settings of an LLM method name, from `base` settings.
pub fn llm_method(
    name: &str,
    base: &crate::assistant::AssistantConfig,
) -> Option<(LlmKind, crate::assistant::AssistantConfig)> {
    use mrrec_memory::Level;
    let mut c = base.clone();
    let kind = match name {
        "llm-rewrite" => LlmKind::Rewrite,
        "naive-memory" => LlmKind::NaiveMemory,
        "static-memory" => LlmKind::StaticMemory,
        "mrrec" => LlmKind::Assistant,
        "mrrec-no-global" => {
            c.use_global = false;
            LlmKind::Assistant
        }
        "mrrec-no-local" => {
            c.levels.clear();
            LlmKind::Assistant
        }
        "mrrec-records-only" => {
            c.levels = vec![Level::Record];
            LlmKind::Assistant
        }
        "mrrec-patterns-only" => {
            c.levels = vec![Level::Pattern];
            LlmKind::Assistant
        }
        "mrrec-profile-only" => {
            c.levels = vec![Level::Profile];
            LlmKind::Assistant
        }
        _ => return None,
    };
    Some((kind, c))
}

/// The levels of the user's stored memory an LLM method reads (none for `llm-rewrite` and
/// `naive-memory`, which reads the dataset's history itself; `None` for an unknown name).
pub fn memory_levels(
    name: &str,
    base: &crate::assistant::AssistantConfig,
) -> Option<Vec<mrrec_memory::Level>> {
    let (kind, c) = llm_method(name, base)?;
    Some(match kind {
        LlmKind::Rewrite | LlmKind::NaiveMemory => vec![],
        LlmKind::StaticMemory => vec![mrrec_memory::Level::Profile],
        LlmKind::Assistant => c.levels,
    })
}

impl LlmMethod<'_> {
    fn answer_one(
        &self,
        a: &crate::assistant::Assistant<'_>,
        q: &Query,
        t: &str,
        k: usize,
    ) -> Result<crate::assistant::Answer, MethodError> {
        let cat = q.category.as_deref();
        Ok(match self.kind {
            LlmKind::Assistant => a.answer(&q.user_id, t, cat, k).map_err(method_error)?,
            _ => {
                let ctx = self.context(q)?;
                a.one_shot(t, cat, ctx.as_deref(), k)
                    .map_err(method_error)?
            }
        })
    }

    fn context(&self, q: &Query) -> Result<Option<String>, MethodError> {
        let a = &self.assistant;
        Ok(match self.kind {
            LlmKind::NaiveMemory => Some(crate::rerank::recent_interactions(&a.shop, q)),
            LlmKind::StaticMemory => Some(
                crate::rerank::stored_profile(a.store, a.tenant, &q.user_id)
                    .map_err(MethodError::failed)?
                    .unwrap_or_else(|| "(no profile stored for this user)".into()),
            ),
            _ => None,
        })
    }
}

impl Method for LlmMethod<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "llm": self.assistant.llm.id(),
            "assistant": self.assistant.cfg,
            "prompts": crate::prompts::ASSISTANT_PROMPT_VERSION,
            "controller": crate::prompts::CONTROLLER_VERSION,
        })
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> Result<Vec<MethodAnswer>, MethodError> {
        let texts = texts(queries, field)?;
        let answers: Vec<Result<crate::assistant::Answer, MethodError>> = if queries.len() > 1 {
            // The queries of a batch run on their own threads and every model call is decoded
            // together with the others' (a Batcher: one batch per model step).
            mrrec_llm_local::Batcher::over(self.assistant.llm)
                .map(queries.len(), |w, i| {
                    let a = crate::assistant::Assistant {
                        llm: w,
                        cfg: self.assistant.cfg.clone(),
                        ..self.assistant
                    };
                    self.answer_one(&a, queries[i], texts[i], k)
                })
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| Err(MethodError::failed("an answering thread panicked")))
                })
                .collect()
        } else {
            queries
                .iter()
                .zip(&texts)
                .map(|(q, t)| self.answer_one(&self.assistant, q, t, k))
                .collect()
        };
        let mut out = Vec::with_capacity(queries.len());
        for ans in answers {
            let ans = ans?;
            let u = &ans.trace.usage;
            out.push(MethodAnswer {
                ranking: ans.items.iter().map(|x| x.0).collect(),
                usage: mrrec_eval::Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    memory_tokens: ans.trace.memory_tokens,
                    llm_seconds: u.seconds,
                },
                trace: Some(serde_json::to_value(&ans.trace).map_err(MethodError::failed)?),
            });
        }
        Ok(out)
    }
}
