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

/// One judge-training query's forward and backward on the training model: `items` judge
/// requests about one shopper's request (real prompts rendered by `model`'s template, product
/// texts of 40–90 tokens), each scored for its one answer token over {Yes, No}. Measured the
/// way the trainer did before (each request on its own: the frozen lower layers reuse the
/// shared beginning, the adapted layers and the backward run per request) and scored together
/// ([`mrrec_train::Policy::token_logprobs_shared`]: the request's shared beginning through the
/// adapted layers once, one backward of the summed loss) with the frozen layers from the dense
/// copy (exact) and from the inference model's prompt prefill (the trainer's default), with the
/// largest difference of their log-probabilities from the first and the ratios of their times.
/// LoRA r8 on q,k,v,o of the top 4 layers.
pub fn judge_step(model: &str, items: usize) -> Result<Value> {
    let local = mrrec_llm_local::LocalModel::from_registry(model)?;
    let lora = mrrec_train::LoraConfig {
        targets: vec![
            mrrec_llm_local::model::Proj::Q,
            mrrec_llm_local::model::Proj::K,
            mrrec_llm_local::model::Proj::V,
            mrrec_llm_local::model::Proj::O,
        ],
        ..mrrec_train::LoraConfig::default()
    };
    let policy = mrrec_train::Policy::from_gguf(&local.info().path, lora)?;
    let words = [
        "stainless",
        "steel",
        "water",
        "bottle",
        "insulated",
        "kids",
        "wooden",
        "puzzle",
        "organic",
        "cotton",
        "blanket",
        "wireless",
        "charger",
        "hiking",
        "boots",
        "waterproof",
        "ceramic",
        "mug",
        "set",
        "of",
        "four",
        "gift",
        "box",
        "durable",
        "lightweight",
    ];
    let enc = |s: &str| -> Result<Vec<u32>> { Ok(local.info().encode(s)?) };
    let mut seqs = Vec::with_capacity(items);
    for i in 0..items {
        let n = 25 + (i * 7) % 35;
        let item: Vec<&str> = (0..n)
            .map(|k| words[(i * 5 + k * 3) % words.len()])
            .collect();
        let req = mrrec_agent::rerank::judge_request(
            "a warm blanket for my toddler that survives the washing machine",
            Some("Baby_Products"),
            None,
            &format!(
                "Title: {}. Features: {}",
                item[..6].join(" "),
                item.join(" ")
            ),
        );
        let mut toks = enc(&local.prompt(&req)?)?;
        let from = toks.len();
        toks.extend(enc("Yes")?.first().copied());
        seqs.push((toks, from));
    }
    let two = {
        let (y, n) = (enc("Yes")?[0], enc("No")?[0]);
        mrrec_llm_local::TokenSet::from_fn(local.transformer().n_vocab, |t| t == y || t == n)
    };
    let allowed = vec![Some(two)];
    let tokens: usize = seqs.iter().map(|(t, _)| t.len()).sum();
    // Each on its own (a fresh cache, as a new query's first request finds).
    let mut cache = mrrec_train::LowerCache::new(4);
    let t0 = Instant::now();
    let (mut fwd_alone, mut alone) = (0.0, Vec::new());
    for (toks, from) in &seqs {
        let t = Instant::now();
        let lp = policy.token_logprobs_cached(toks, *from, &allowed, true, 64, Some(&mut cache))?;
        fwd_alone += t.elapsed().as_secs_f64();
        alone.push(lp.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?[0]);
        let _ = lp.sum_all()?.backward()?;
    }
    let secs_alone = t0.elapsed().as_secs_f64();
    let peak_alone = status_bytes("VmHWM:");
    let scored: Vec<mrrec_train::Scored<'_>> = seqs
        .iter()
        .map(|(tokens, from)| mrrec_train::Scored {
            tokens,
            from: *from,
            allowed: &allowed,
        })
        .collect();
    // Together: the frozen layers from the dense copy (exact), from prompt prefill, and
    // remembered from an earlier epoch (the trainer's default when fine-tuning: a
    // [`mrrec_train::FrozenMemo`] filled by an untimed pass over the same request first).
    let mut together = serde_json::Map::new();
    let mut memo = mrrec_train::FrozenMemo::new(usize::MAX);
    for name in ["exact", "prefill", "remembered"] {
        let mut cache = mrrec_train::LowerCache::new(4);
        if name == "remembered" {
            policy.token_logprobs_shared(
                &scored,
                false,
                64,
                mrrec_train::Lower::Remembered(local.transformer(), &mut memo),
            )?;
        }
        let lower = match name {
            "exact" => mrrec_train::Lower::Exact(Some(&mut cache)),
            "prefill" => mrrec_train::Lower::Inference(local.transformer()),
            _ => mrrec_train::Lower::Remembered(local.transformer(), &mut memo),
        };
        let t1 = Instant::now();
        let (lps, _) = policy.token_logprobs_shared(&scored, false, 64, lower)?;
        let fwd = t1.elapsed().as_secs_f64();
        let mut diff = 0f32;
        let mut sum: Option<candle_core::Tensor> = None;
        for (lp, a) in lps.iter().zip(&alone) {
            let v = lp.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?[0];
            diff = diff.max((v - a).abs());
            let s = lp.sum_all()?;
            sum = Some(match sum {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        if let Some(s) = sum {
            let _ = s.backward()?;
        }
        let secs = t1.elapsed().as_secs_f64();
        eprintln!(
            "judge step {model}: {items} requests, {tokens} tokens: alone {secs_alone:.2} s (forward {fwd_alone:.2}), together, {name} frozen layers {secs:.2} s (forward {fwd:.2}): ratio {:.2}, max |Δ log p| {diff:.2e}; peak resident {} MB after alone, {} MB now",
            secs / secs_alone.max(1e-9),
            peak_alone >> 20,
            status_bytes("VmHWM:") >> 20
        );
        together.insert(
            name.into(),
            json!({
                "seconds": secs, "forward_s": fwd,
                "ratio_time_vs_alone": secs / secs_alone.max(1e-9),
                "max_abs_logprob_difference_vs_alone": diff,
            }),
        );
    }
    let secs = |name: &str| together[name]["seconds"].as_f64().unwrap_or(f64::NAN);
    let remembered_vs_prefill = secs("remembered") / secs("prefill");
    eprintln!(
        "judge step {model}: remembered frozen layers vs prefilled: {remembered_vs_prefill:.2}x the time"
    );
    Ok(json!({
        "model": model, "requests": items, "tokens": tokens,
        "alone_s": secs_alone, "alone_forward_s": fwd_alone,
        "ratio_remembered_vs_prefill": remembered_vs_prefill,
        "together": together,
        "peak_rss": status_bytes("VmHWM:"),
    }))
}
