//! GRPO rollouts with the real tiny model, the real assistant loop (guided) and real record
//! memory: each trajectory keeps its model calls as token segments whose decoded ids are exactly
//! what the assistant read, constrained calls carry their masks, the differentiable policy
//! reproduces the rollout log-probabilities from the ids alone (no re-tokenisation), and the
//! rewards follow the paper.

#![allow(clippy::unwrap_used)]

mod common;

use mrrec_agent::memory::{BuildReport, MemoryBuilder};
use mrrec_agent::rewards::RewardWeights;
use mrrec_agent::{Workspace, WorkspaceOptions};
use mrrec_memory::SqliteStore;
use mrrec_train::rollout::{group_log, Rollouts};

#[test]
fn guided_rollouts_record_what_the_policy_sampled() {
    let mut o = WorkspaceOptions::new(common::mini());
    o.max_items = Some(300);
    let ws = Workspace::open(&o).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let st = SqliteStore::open(&dir.path().join("m.sqlite")).unwrap();
    let q = ws
        .dataset
        .queries
        .for_purpose(&mrrec_data::Purpose::Evaluate(vec![
            mrrec_data::Split::Train,
        ]))
        .unwrap()
        .into_iter()
        .find(|q| ws.dataset.histories.of(&q.query().user_id).len() >= 2)
        .unwrap();
    let b = MemoryBuilder::new(&ws, &st, "default");
    b.build_records(&[q.query().user_id.as_str()], &mut BuildReport::default())
        .unwrap();
    let local = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let r = Rollouts {
        ws: &ws,
        store: &st,
        tenant: "default",
        sampler: mrrec_train::rollout::Sampler::Local(&local),
        cfg: mrrec_agent::assistant::AssistantConfig::default(),
        temperature: 1.0,
        weights: RewardWeights::default(),
        greedy_calls: 0,
    };
    let target = ws.catalogue().position(q.target()).unwrap();
    let query = q.query();
    let request = query.simple_query.as_deref().unwrap_or(&query.query);
    let t0 = std::time::Instant::now();
    let group = r
        .group(
            &query.user_id,
            request,
            query.category.as_deref(),
            target,
            2,
            7,
            true,
        )
        .unwrap();
    eprintln!("2 batched rollouts in {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(group.len(), 2);
    // Decoding the group together samples the same first call as one trajectory after another
    // (same prompt, same seed: a sequence's tokens do not depend on what it is batched with).
    // Later calls extend prompts that the prefix cache assembled from other chunks in the two
    // orders, which moves Q8_0 activations by a rounding step: equally likely samples, not the
    // same ones.
    let t0 = std::time::Instant::now();
    let one_by_one = r
        .group(
            &query.user_id,
            request,
            query.category.as_deref(),
            target,
            2,
            7,
            false,
        )
        .unwrap();
    eprintln!(
        "2 sequential rollouts in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // That holds where every matrix runs the packed Q8_0 kernel (AVX512-VNNI), whose rows do not
    // depend on the rows multiplied with them. Without it candle multiplies, and its several-row
    // product (a prompt prefilled whole, or its last token after a reused prefix) differs from
    // its one-row product in the last bits: equally likely samples, not the same ones.
    let invariant = mrrec_llm_local::q8::available();
    if !invariant {
        eprintln!("no AVX512-VNNI: candle's kernels are not batch-invariant, samples are compared by prompt only");
    }
    for (a, b) in group.iter().zip(&one_by_one) {
        let (x, y) = (&a.segments[0], &b.segments[0]);
        assert_eq!(x.prompt, y.prompt);
        if invariant {
            assert_eq!(x.ids, y.ids, "batched and sequential sampling differ");
            assert_eq!(x.logprobs, y.logprobs);
        }
    }
    assert_ne!(
        group[0].segments[0].ids, group[1].segments[0].ids,
        "each trajectory has its own seed"
    );
    let log = group_log(&query.qid, &group);
    assert_eq!(log.totals.len(), 2);
    let t0 = std::time::Instant::now();
    let policy = mrrec_train::Policy::from_gguf(
        &local.info().path,
        mrrec_train::LoraConfig {
            layers: 0,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("policy loaded in {:.1} s", t0.elapsed().as_secs_f64());
    for t in &group {
        // Guided: reasoning, tool arguments, final object — three calls, the last two constrained
        // — and a fourth, constrained and without the memories, when the final object was off
        // topic (the on-topic check).
        let calls = if t.answer.trace.off_topic > 0 { 4 } else { 3 };
        assert_eq!(t.segments.len(), calls, "{:?}", t.answer.trace.outputs);
        assert_eq!(t.answer.trace.outputs.len(), calls);
        for (k, (seg, out)) in t.segments.iter().zip(&t.answer.trace.outputs).enumerate() {
            assert!(!seg.ids.is_empty());
            assert_eq!(seg.ids.len(), seg.logprobs.len());
            assert_eq!(seg.ids.len(), seg.masks.len());
            assert!(seg.masks.iter().all(|m| m.is_some() == (k > 0)), "call {k}");
            for (id, m) in seg.ids.iter().zip(&seg.masks) {
                if let Some(m) = m {
                    assert!(m.contains(*id), "a sampled token outside its mask");
                }
            }
            // The text the assistant read is the decoded sample (stop strings cut).
            let decoded = local.decode(&seg.ids).unwrap();
            assert!(decoded.starts_with(out.as_str()), "{decoded:?} vs {out:?}");
            // A later call's prompt carries the earlier calls' outputs: controller and tool
            // text between them is prompt, never trained on.
            if k == 1 || k == 2 {
                assert!(seg.prompt.len() > t.segments[k - 1].prompt.len());
            }
            if k == 3 {
                let prompt = local.decode(&seg.prompt).unwrap();
                assert!(!prompt.contains("<memory"), "the repair reads no memory");
            }
            // The training model recomputes the sampled log-probabilities from ids and masks.
            let mut toks = seg.prompt.clone();
            toks.extend(&seg.ids);
            let lp: Vec<f32> = policy
                .token_logprobs(&toks, seg.prompt.len(), &seg.masks, false, 64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mean_diff = lp
                .iter()
                .zip(&seg.logprobs)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / lp.len() as f32;
            // Decoding ran Q8_0 kernels (activations quantised), the policy runs f32: close,
            // not equal — which is why the update recomputes the old log-probabilities.
            eprintln!(
                "call {k}: {} tokens, mean |Δ log p| = {mean_diff:.4}",
                lp.len()
            );
            assert!(mean_diff < 0.15, "call {k}: mean |Δ log p| = {mean_diff}");
        }
        // Rewards: the paper's components, no fallback to the request.
        let rw = &t.rewards;
        assert_eq!(
            rw.format,
            if t.answer.trace.profile.is_some() && !t.answer.trace.fallback {
                1.0
            } else {
                0.0
            }
        );
        assert_eq!(rw.mem, 1.0, "the guided call always searches memory");
        assert!((rw.total - (0.1 * rw.format + 5.0 * rw.rec + 0.1 * rw.mem)).abs() < 1e-9);
    }
    // Different seeds: the two trajectories differ somewhere.
    assert_ne!(group[0].segments, group[1].segments);
}
