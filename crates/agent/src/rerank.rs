//! A re-ranking stage behind any method: the LLM judges each of the first `depth` items of the
//! method's ranking against the request — and, when asked, against what the user's memory says —
//! by the log-probabilities of `Yes` and `No` as its answer (one prefill per item, the shared
//! beginning computed once; nothing is generated), and the judge's order is fused with the
//! method's by weighted reciprocal-rank fusion. Items below `depth` keep their places.
//!
//! Not part of MR.Rec's protocol: an extension that reads memory where the ranking's top is
//! decided (the profiles of the loop raise recall at 100 but not the first places).

use mrrec_data::{Query, QueryField};
use mrrec_eval::{Method, MethodAnswer, MethodError};
use mrrec_llm::{ChatModel, ChatRequest, Message, Sampling};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The judge's prompt version (part of a run's settings).
pub const RERANK_PROMPT_VERSION: &str = "rerank-v1";

/// The judge's two answers; an item's score is log P(`Yes`) − log P(`No`).
const CHOICES: [&str; 2] = ["Yes", "No"];

/// What the judge reads of the user beside the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMemory {
    /// The request alone.
    #[default]
    None,
    /// The user's stored profile (the memory's profile level).
    Profile,
    /// The user's last 10 interactions before the request (what `naive-memory` reads).
    Recent,
}

impl JudgeMemory {
    /// What the judge reads of `q`'s user (`None` without memory, or without a stored profile).
    pub fn read(
        self,
        shop: &crate::Shop<'_>,
        store: &dyn mrrec_memory::MemoryRead,
        tenant: &str,
        q: &Query,
    ) -> Result<Option<String>> {
        Ok(match self {
            JudgeMemory::None => None,
            JudgeMemory::Recent => Some(recent_interactions(shop, q)),
            JudgeMemory::Profile => stored_profile(store, tenant, &q.user_id)?,
        })
    }

    /// The name `--rerank-memory` takes.
    pub fn name(self) -> &'static str {
        match self {
            JudgeMemory::None => "none",
            JudgeMemory::Profile => "profile",
            JudgeMemory::Recent => "recent",
        }
    }
}

/// How the re-ranking stage judges and fuses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RerankParams {
    /// How many of the method's first items the judge reads.
    pub depth: usize,
    /// The judge's order's weight in the fusion (the method's order has weight 1).
    pub weight: f32,
    /// What the judge reads of the user.
    pub memory: JudgeMemory,
}

impl Default for RerankParams {
    fn default() -> Self {
        RerankParams {
            depth: 20,
            weight: 1.0,
            memory: JudgeMemory::None,
        }
    }
}

impl RerankParams {
    /// The setting that is wrong and why: a depth of 0 or over 200, a negative or non-finite
    /// weight.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.depth == 0 || self.depth > 200 {
            return Err((
                "depth",
                format!("{} items: the judge reads 1 to 200", self.depth),
            ));
        }
        if !self.weight.is_finite() || self.weight < 0.0 {
            return Err((
                "weight",
                format!("{}: a weight is a finite number ≥ 0", self.weight),
            ));
        }
        Ok(())
    }
}

/// The judge's request about one item.
pub fn judge_request(
    request: &str,
    category: Option<&str>,
    memory: Option<&str>,
    item: &str,
) -> ChatRequest {
    let mut user = String::new();
    if let Some(m) = memory {
        user.push_str("What we know about this shopper:\n");
        user.push_str(m.trim());
        user.push_str("\n\n");
    }
    match category {
        Some(c) => user.push_str(&format!(
            "The shopper is in the {} section and asks: \"{}\"\n\n",
            c.replace('_', " "),
            request.trim()
        )),
        None => user.push_str(&format!("The shopper asks: \"{}\"\n\n", request.trim())),
    }
    user.push_str(&format!(
        "Product: {}\n\nIs this product what the shopper is looking for? Answer Yes or No.",
        item.trim()
    ));
    ChatRequest {
        messages: vec![
            Message::system(
                "You help a shopper find a product. You are shown what they ask for and one product from the store, and you say whether the product is what they are looking for.",
            ),
            Message::user(user),
        ],
        sampling: Sampling {
            max_tokens: 1,
            ..Sampling::default()
        },
        ..ChatRequest::default()
    }
}

/// The judge's score of each item (log P(`Yes`) − log P(`No`)), in the order given, and the
/// calls' cost.
pub fn judge(
    llm: &dyn ChatModel,
    request: &str,
    category: Option<&str>,
    memory: Option<&str>,
    items: &[&str],
) -> Result<(Vec<f32>, mrrec_llm::Usage)> {
    let reqs: Vec<ChatRequest> = items
        .iter()
        .map(|t| judge_request(request, category, memory, t))
        .collect();
    let mut usage = mrrec_llm::Usage::default();
    let mut scores = Vec::with_capacity(items.len());
    for r in llm.score_choices(&reqs, &CHOICES) {
        let s = r?;
        usage.add(&s.usage);
        scores.push(s.logprobs[0] - s.logprobs[1]);
    }
    Ok((scores, usage))
}

/// `ranking` with its first `scores.len()` items re-ordered by the reciprocal-rank fusion
/// (c = 60, as [`mrrec_index::weighted_rrf`]) of their order (weight 1) and the order of `scores`
/// (weight `weight`, a better score first); equal fused scores keep the ranking's order. The
/// items below stay where they were.
pub fn fuse_judged(ranking: &[u32], scores: &[f32], weight: f32) -> Vec<u32> {
    let n = scores.len().min(ranking.len());
    let c = mrrec_index::HybridParams::default().c;
    let mut by_score: Vec<usize> = (0..n).collect();
    by_score.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut judged_rank = vec![0usize; n];
    for (jr, &r) in by_score.iter().enumerate() {
        judged_rank[r] = jr;
    }
    let mut fused: Vec<(f32, usize)> = (0..n)
        .map(|r| {
            (
                1.0 / (c + r as f32 + 1.0) + weight / (c + judged_rank[r] as f32 + 1.0),
                r,
            )
        })
        .collect();
    fused.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<u32> = fused.into_iter().map(|(_, r)| ranking[r]).collect();
    out.extend_from_slice(&ranking[n..]);
    out
}

/// A finished run's query as if its judged items had been fused with `weight`: the judge's
/// scores kept in its trace (`trace.rerank`: the judged ids in the method's order and their
/// scores) are fused again ([`fuse_judged`]), the target's rank and the first ten recomputed, and
/// the weight recorded in the trace; a target below the judged items keeps its rank. No model
/// is asked. An error names the query when its trace has no judged items or does not fit its
/// ranking (the judge was not the run's last stage).
pub fn reweigh(
    o: &mrrec_eval::QueryOutcome,
    weight: f32,
) -> std::result::Result<mrrec_eval::QueryOutcome, String> {
    let bad = |why: &str| format!("query {}: {why}", o.qid);
    let stage = o
        .trace
        .as_ref()
        .and_then(|t| t.get("rerank"))
        .ok_or_else(|| bad("no judged items in its trace (a run without --rerank?)"))?;
    let items: Vec<String> = serde_json::from_value(stage["items"].clone())
        .map_err(|e| bad(&format!("trace.rerank.items: {e}")))?;
    let scores: Vec<f32> = serde_json::from_value(stage["scores"].clone())
        .map_err(|e| bad(&format!("trace.rerank.scores: {e}")))?;
    if items.len() != scores.len() {
        return Err(bad(&format!(
            "{} judged items, {} scores",
            items.len(),
            scores.len()
        )));
    }
    let n = items.len();
    let head = n.min(o.top10.len());
    // The judged items are the ranking's first n, in some order: its first ten start with them.
    if o.top10[..head].iter().any(|i| !items.contains(i))
        || o.rank.is_some_and(|r| r <= n) != items.contains(&o.target)
    {
        return Err(bad(
            "its ranking does not start with its judged items (another stage ran after the judge?)",
        ));
    }
    let order = fuse_judged(&(0..n as u32).collect::<Vec<u32>>(), &scores, weight);
    let fused: Vec<&String> = order.iter().map(|&k| &items[k as usize]).collect();
    let mut out = o.clone();
    if let Some(p) = fused.iter().position(|&i| *i == o.target) {
        out.rank = Some(p + 1);
    }
    out.top10 = fused
        .iter()
        .take(head)
        .map(|i| (*i).clone())
        .chain(o.top10[head..].iter().cloned())
        .collect();
    if let Some(t) = out.trace.as_mut().and_then(|t| t.get_mut("rerank")) {
        t["weight"] = serde_json::json!(weight);
    }
    Ok(out)
}

/// A ranking after the re-ranking stage ([`judge_ranking`]).
pub struct Judged {
    /// The whole ranking, its first `ids.len()` items re-ordered.
    pub ranking: Vec<u32>,
    /// The judged items' ids, in the method's order.
    pub ids: Vec<String>,
    /// The judge's score of each, same order.
    pub scores: Vec<f32>,
    /// The judge's calls' cost.
    pub usage: mrrec_llm::Usage,
}

/// The re-ranking stage over `ranking`: `llm` judges its first `p.depth` items of `catalogue`
/// against the request (and `memory`, when given) and they are re-ordered by
/// [`fuse_judged`] with weight `p.weight` (what `eval`, `recommend` and the service run).
pub fn judge_ranking(
    llm: &dyn ChatModel,
    catalogue: &mrrec_data::Catalogue,
    request: &str,
    category: Option<&str>,
    memory: Option<&str>,
    ranking: &[u32],
    p: RerankParams,
) -> Result<Judged> {
    let n = p.depth.min(ranking.len());
    let items: Vec<Option<&mrrec_data::Item>> =
        ranking[..n].iter().map(|&i| catalogue.get(i)).collect();
    let texts: Vec<&str> = items
        .iter()
        .map(|it| it.map_or("", |it| it.text.as_str()))
        .collect();
    let (scores, usage) = judge(llm, request, category, memory, &texts)?;
    Ok(Judged {
        ranking: fuse_judged(ranking, &scores, p.weight),
        ids: items
            .iter()
            .map(|it| it.map_or(String::new(), |it| it.id.clone()))
            .collect(),
        scores,
        usage,
    })
}

/// The user's last 10 interactions before `q`'s time, a line each (`naive-memory`'s context, and
/// the judge's with [`JudgeMemory::Recent`]).
pub fn recent_interactions(shop: &crate::Shop<'_>, q: &Query) -> String {
    let h = shop.histories.before(&q.user_id, q.timestamp);
    let recent = &h[h.len().saturating_sub(10)..];
    let lines: Vec<String> = recent
        .iter()
        .map(|r| format!("- {}", mrrec_memory::record_text(r, shop.catalogue)))
        .collect();
    if lines.is_empty() {
        "(no earlier interactions)".into()
    } else {
        lines.join("\n")
    }
}

/// The user's stored profile (the profile level's entries, joined), `None` when there is none
/// (`static-memory`'s context, and the judge's with [`JudgeMemory::Profile`]).
pub fn stored_profile(
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    user: &str,
) -> Result<Option<String>> {
    let es = store.entries(mrrec_memory::Owner { tenant, user })?;
    let p: Vec<&str> = es
        .iter()
        .filter(|e| e.level == mrrec_memory::Level::Profile)
        .map(|e| e.text.as_str())
        .collect();
    Ok((!p.is_empty()).then(|| p.join(" ")))
}

/// Any method with the re-ranking stage behind it (`mrrec eval --rerank N`): the method ranks,
/// the judge re-orders its first `depth` items.
pub struct RerankMethod<'a> {
    /// The method whose ranking is re-ranked.
    pub inner: Box<dyn Method + 'a>,
    /// The run's name (the method's and the stage's).
    pub name: String,
    /// The judge.
    pub llm: &'a dyn ChatModel,
    /// The catalogue (item texts) and histories.
    pub shop: crate::Shop<'a>,
    /// The memory the judge may read, and whose.
    pub store: &'a dyn mrrec_memory::MemoryRead,
    /// The tenant of the users asking.
    pub tenant: &'a str,
    /// Depth, weight and memory.
    pub params: RerankParams,
}

impl RerankMethod<'_> {
    fn rerank(
        &self,
        q: &Query,
        request: &str,
        mut ans: MethodAnswer,
        k: usize,
    ) -> Result<MethodAnswer> {
        let memory = self
            .params
            .memory
            .read(&self.shop, self.store, self.tenant, q)?;
        let j = judge_ranking(
            self.llm,
            self.shop.catalogue,
            request,
            q.category.as_deref(),
            memory.as_deref(),
            &ans.ranking,
            self.params,
        )?;
        ans.ranking = j.ranking;
        ans.ranking.truncate(k);
        ans.usage.prompt_tokens += j.usage.prompt_tokens;
        ans.usage.llm_seconds += j.usage.seconds;
        let stage = serde_json::json!({
            "depth": j.ids.len(),
            "items": j.ids,
            "scores": j.scores,
            "memory_chars": memory.as_ref().map_or(0, |m| m.len()),
        });
        ans.trace = Some(match ans.trace.take() {
            Some(serde_json::Value::Object(mut o)) => {
                o.insert("rerank".into(), stage);
                serde_json::Value::Object(o)
            }
            Some(other) => serde_json::json!({ "method": other, "rerank": stage }),
            None => serde_json::json!({ "rerank": stage }),
        });
        Ok(ans)
    }
}

impl Method for RerankMethod<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.inner.settings(),
            "rerank": self.params,
            "judge": self.llm.id(),
            "prompt": RERANK_PROMPT_VERSION,
        })
    }
    fn answer(
        &self,
        queries: &[&Query],
        field: QueryField,
        k: usize,
    ) -> std::result::Result<Vec<MethodAnswer>, MethodError> {
        let answers = self
            .inner
            .answer(queries, field, k.max(self.params.depth))?;
        queries
            .iter()
            .zip(answers)
            .map(|(q, a)| {
                let request = q
                    .text(field)
                    .ok_or_else(|| MethodError::Query(format!("query {} has no {field}", q.qid)))?;
                self.rerank(q, request, a, k)
                    .map_err(crate::methods::method_error)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A query of a run that judged `items` (in the method's order) with `scores` and fused them
    /// with `weight`; `below` follow them in the ranking.
    fn judged(
        target: &str,
        items: &[&str],
        scores: &[f32],
        weight: f32,
        below: &[&str],
    ) -> mrrec_eval::QueryOutcome {
        let all: Vec<String> = items.iter().chain(below).map(|s| s.to_string()).collect();
        let order = fuse_judged(&(0..all.len() as u32).collect::<Vec<u32>>(), scores, weight);
        let ranking: Vec<&String> = order.iter().map(|&k| &all[k as usize]).collect();
        mrrec_eval::QueryOutcome {
            qid: "q1".into(),
            user_id: "u".into(),
            category: None,
            target: target.into(),
            rank: ranking.iter().position(|i| *i == target).map(|p| p + 1),
            top10: ranking.iter().take(10).map(|i| (*i).clone()).collect(),
            usage: Default::default(),
            trace: Some(
                serde_json::json!({"rerank": {"depth": items.len(), "items": items, "scores": scores}}),
            ),
        }
    }

    #[test]
    fn a_run_reweighed_is_the_run_fused_at_that_weight() {
        let items = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
        let scores = [
            0.1, -2.0, 3.0, 0.5, 2.5, -1.0, 0.0, 1.0, 4.0, -3.0, 0.2, 2.0,
        ];
        let below = ["m", "n"];
        for target in ["a", "c", "i", "j", "m", "z"] {
            let at_1 = judged(target, &items, &scores, 1.0, &below);
            // At its own weight nothing moves; at another it equals a run made at that weight.
            let same = reweigh(&at_1, 1.0).unwrap();
            assert_eq!(
                (same.rank, &same.top10),
                (at_1.rank, &at_1.top10),
                "{target}"
            );
            for w in [0.0, 0.5, 2.0, 8.0] {
                let want = judged(target, &items, &scores, w, &below);
                let got = reweigh(&at_1, w).unwrap();
                assert_eq!(
                    (got.rank, &got.top10),
                    (want.rank, &want.top10),
                    "{target} at {w}"
                );
                assert_eq!(
                    got.trace.as_ref().unwrap()["rerank"]["weight"],
                    serde_json::json!(w)
                );
            }
        }
        // Weight 0 is the method's own order.
        let zero = reweigh(&judged("c", &items, &scores, 1.0, &below), 0.0).unwrap();
        assert_eq!(zero.rank, Some(3));
        assert_eq!(zero.top10, items[..10]);
    }

    #[test]
    fn a_query_without_judged_items_or_with_a_later_stage_is_refused_by_name() {
        let mut o = judged("a", &["a", "b", "c"], &[0.0, 1.0, 2.0], 1.0, &["d"]);
        o.trace = None;
        assert!(reweigh(&o, 1.0)
            .unwrap_err()
            .contains("query q1: no judged items"));
        // A stage after the judge dropped a judged item from the first places.
        let mut o = judged("a", &["a", "b", "c"], &[0.0, 1.0, 2.0], 1.0, &["d"]);
        o.top10.retain(|i| i != "b");
        assert!(reweigh(&o, 2.0)
            .unwrap_err()
            .contains("another stage ran after the judge"));
        let mut o = judged("a", &["a", "b", "c"], &[0.0, 1.0], 1.0, &[]);
        o.trace =
            Some(serde_json::json!({"rerank": {"items": ["a", "b", "c"], "scores": [0.0, 1.0]}}));
        assert!(reweigh(&o, 2.0)
            .unwrap_err()
            .contains("3 judged items, 2 scores"));
    }
}
