//! Training data for the re-ranking stage's judge (`mrrec train --judge`): per `train` query, the
//! judge's question about its target (answer `Yes`) and about `negatives` other items of the
//! request's hybrid top `depth` (answer `No`, a seeded choice), asked exactly as the stage asks at
//! answer time ([`mrrec_agent::rerank::judge_request`], the same memory), each answer learnt as
//! one token renormalised over the two answers — the binary cross-entropy of the judge's score
//! log P(`Yes`) − log P(`No`).

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::trainer::{Sft, SftExample};
use crate::{Result, TrainError};
use mrrec_agent::rerank::{judge_request, RerankParams};
use mrrec_data::LabeledQuery;

/// What the judge learns from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JudgeData {
    /// The stage the judge serves: the depth its negatives come from and the memory it reads.
    pub stage: RerankParams,
    /// Negatives per query (items of the request's top `depth` that are not its target).
    pub negatives: usize,
    /// Seed of the negatives' choice.
    pub seed: u64,
}

/// The judge's examples for `queries` (`train` rows: their targets are the labels), one
/// [`SftExample`] per query — its target's question first, then the negatives'. A query whose
/// target is not in the catalogue is skipped and counted in the source's `skipped`.
pub fn judge_examples(
    ws: &mrrec_agent::Workspace,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    local: &mrrec_llm_local::LocalModel,
    queries: &[&LabeledQuery],
    data: &JudgeData,
) -> Result<Sft> {
    let shop = ws.shop();
    let answer = |s: &str| -> Result<u32> {
        local.info().encode(s)?.first().copied().ok_or_else(|| {
            TrainError::Invalid(format!("the answer {s:?} has no token in this model"))
        })
    };
    let (yes, no) = (answer("Yes")?, answer("No")?);
    let n_vocab = local.transformer().n_vocab;
    let two = mrrec_llm_local::TokenSet::from_fn(n_vocab, |t| t == yes || t == no);
    let mut examples = Vec::with_capacity(queries.len());
    let (mut skipped, mut in_top, mut calls) = (0usize, 0usize, 0usize);
    for q in queries {
        let query = q.query();
        let Some(target) = ws.catalogue().position(q.target()) else {
            skipped += 1;
            continue;
        };
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let top: Vec<u32> = shop
            .search_hybrid(request, data.stage.depth)?
            .into_iter()
            .map(|h| h.item)
            .collect();
        in_top += usize::from(top.contains(&target));
        let mut others: Vec<u32> = top.into_iter().filter(|&i| i != target).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::trajectories::query_seed(
            data.seed, &query.qid,
        ));
        others.shuffle(&mut rng);
        others.truncate(data.negatives);
        let memory = data.stage.memory.read(&shop, store, tenant, query)?;
        let mut segments = Vec::with_capacity(1 + others.len());
        for (item, label) in std::iter::once((target, yes)).chain(others.iter().map(|&i| (i, no))) {
            let text = ws.catalogue().get(item).map_or("", |it| it.text.as_str());
            let req = judge_request(request, query.category.as_deref(), memory.as_deref(), text);
            let prompt = local.info().encode(&local.prompt(&req)?)?;
            segments.push(mrrec_llm_local::Segment {
                prompt,
                ids: vec![label],
                logprobs: vec![0.0],
                masks: vec![Some(two.clone())],
                constraint: None,
            });
        }
        calls += segments.len();
        examples.push(SftExample {
            qid: query.qid.clone(),
            segments,
            rewards: Default::default(),
        });
    }
    let source = serde_json::json!({
        "judge": data,
        "prompt": mrrec_agent::rerank::RERANK_PROMPT_VERSION,
        "queries": examples.len(),
        "skipped": skipped,
        "target_in_top": in_top,
        "calls": calls,
        "kept": examples.len(),
    });
    Ok(Sft { examples, source })
}
