//! One GRPO step and one rollout phase.

use crate::*;

/// The training model's cost per trajectory segment as the prompt and the response grow: one
/// forward with the adapter and the reference pass (sharing the frozen lower layers), then the
/// backward of the summed log-probabilities — what a GRPO step does per segment (a step costs
/// G × segments × this). Real weights of `model`, LoRA r8 on q,v of the top 4 layers. Each
/// segment is measured with attention's softmax composed from tensor operations (the baseline)
/// and as one operation (`causal_softmax`, the default), with the resident memory the live graph
/// holds after the forward, and their ratios.
pub fn grpo(model: &str) -> Result<Value> {
    let local = mrrec_llm_local::LocalModel::from_registry(model)?;
    let mut policy =
        mrrec_train::Policy::from_gguf(&local.info().path, mrrec_train::LoraConfig::default())?;
    let text = "A user asks for a soft plush toy for a toddler. Memories: bought a wooden train set, rated 5/5; prefers washable fabrics. ";
    let ids = local.info().encode(text)?;
    let mut out = Vec::new();
    for (prompt, response) in [
        (256usize, 32usize),
        (256, 128),
        (512, 128),
        (1024, 128),
        (1536, 128),
    ] {
        let n = prompt + response;
        let toks: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
        let mut by = serde_json::Map::new();
        // Fused first: memory the allocator keeps after one run can only flatter the second.
        for (name, fused) in [("fused", true), ("composed", false)] {
            policy.set_fused_softmax(fused);
            let mut cache = mrrec_train::LowerCache::new(2);
            let before = resident_bytes();
            let t0 = Instant::now();
            let (lp, _) =
                policy.token_logprobs_with_reference(&toks, prompt, &[], 64, Some(&mut cache))?;
            let fwd = t0.elapsed().as_secs_f64();
            let graph = resident_bytes().saturating_sub(before);
            let t1 = Instant::now();
            let _ = lp.sum_all()?.backward()?;
            let bwd = t1.elapsed().as_secs_f64();
            drop(lp);
            // Another response to the same prompt (the next trajectory of a group): the frozen
            // lower layers run on the response only.
            let mut other = toks[..prompt].to_vec();
            other.extend(toks[prompt..].iter().rev());
            let t2 = Instant::now();
            let (lp2, _) =
                policy.token_logprobs_with_reference(&other, prompt, &[], 64, Some(&mut cache))?;
            let fwd_shared = t2.elapsed().as_secs_f64();
            drop(lp2);
            eprintln!("grpo {model} ({name} softmax): prompt {prompt} + response {response}: forward {fwd:.2} s, backward {bwd:.2} s, graph {} MB", graph >> 20);
            by.insert(
                name.into(),
                json!({
                    "forward_s": fwd, "backward_s": bwd, "graph_bytes": graph,
                    "forward_shared_prompt_s": fwd_shared,
                    "forward_ratio_shared_vs_full": fwd_shared / fwd,
                    "tokens_per_s": n as f64 / (fwd + bwd),
                }),
            );
        }
        let (c, f) = (&by["composed"], &by["fused"]);
        let secs = |v: &Value| {
            v["forward_s"].as_f64().unwrap_or(0.0) + v["backward_s"].as_f64().unwrap_or(0.0)
        };
        let bytes = |v: &Value| v["graph_bytes"].as_f64().unwrap_or(0.0);
        out.push(json!({
            "prompt": prompt, "response": response,
            "composed": c, "fused": f,
            "ratio_time_fused_vs_composed": secs(f) / secs(c).max(1e-9),
            "ratio_graph_bytes_fused_vs_composed": bytes(f) / bytes(c).max(1.0),
            "peak_rss": status_bytes("VmHWM:"),
        }));
    }
    Ok(json!({"model": model, "segments": out}))
}

/// GRPO rollouts of real training queries with the real memory: a group's `g` trajectories one
/// after another, then decoded together (a thread each, one batch per model step), same seeds.
/// Reports sampled tokens per second of both and their ratio. Needs the users' record memory
/// (`mrrec memory build`).
pub fn rollouts(
    ws: &Workspace,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    model: &str,
    queries: usize,
    g: usize,
) -> Result<Value> {
    let local = mrrec_llm_local::LocalModel::from_registry(model)?;
    let all = ws
        .dataset
        .queries
        .for_purpose(&mrrec_data::Purpose::Evaluate(vec![
            mrrec_data::Split::Train,
        ]))?;
    let r = mrrec_train::rollout::Rollouts {
        ws,
        store,
        tenant,
        sampler: mrrec_train::rollout::Sampler::Local(&local),
        cfg: mrrec_agent::assistant::AssistantConfig::default(),
        temperature: 1.0,
        weights: mrrec_agent::rewards::RewardWeights::default(),
        greedy_calls: 0,
    };
    let mut rows = Vec::new();
    let (mut tot_seq, mut tot_bat) = ((0usize, 0f64), (0usize, 0f64));
    for (i, q) in all.iter().take(queries).enumerate() {
        let Some(target) = ws.catalogue().position(q.target()) else {
            continue;
        };
        let query = q.query();
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let run = |batched: bool| -> Result<(usize, f64)> {
            let t = Instant::now();
            let group = r.group(
                &query.user_id,
                request,
                query.category.as_deref(),
                target,
                g,
                100 + i as u64,
                batched,
            )?;
            let tokens: usize = group
                .iter()
                .flat_map(|t| &t.segments)
                .map(|s| s.ids.len())
                .sum();
            Ok((tokens, t.elapsed().as_secs_f64()))
        };
        if i == 0 {
            run(false)?; // warm-up: constraint compiler, caches
        }
        let s = run(false)?;
        let b = run(true)?;
        tot_seq = (tot_seq.0 + s.0, tot_seq.1 + s.1);
        tot_bat = (tot_bat.0 + b.0, tot_bat.1 + b.1);
        eprintln!(
            "rollouts {model} G={g} query {}: sequential {} tokens in {:.1} s, batched {} tokens in {:.1} s",
            query.qid, s.0, s.1, b.0, b.1
        );
        rows.push(
            json!({"qid": query.qid, "sequential": {"tokens": s.0, "seconds": s.1},
                          "batched": {"tokens": b.0, "seconds": b.1}}),
        );
    }
    let rate = |(t, s): (usize, f64)| t as f64 / s.max(1e-9);
    Ok(json!({"model": model, "group": g, "queries": rows,
              "sequential_tokens_per_s": rate(tot_seq), "batched_tokens_per_s": rate(tot_bat),
              "ratio_batched_vs_sequential": rate(tot_bat) / rate(tot_seq)}))
}
