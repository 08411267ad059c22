//! Batched decoding and forked prompts with the real tiny model.

#![allow(clippy::unwrap_used)]

use mrrec_llm::*;
use mrrec_llm_local::model::KvCache;
use mrrec_llm_local::*;

fn prompts(m: &LocalModel) -> Vec<Vec<u32>> {
    [
        "a toddler who loves bath time",
        "a runner with flat feet",
        "a coffee lover who travels",
        "a cat that scratches sofas",
    ]
    .iter()
    .map(|who| {
        m.info()
            .encode(&format!(
                "<|im_start|>user\nSuggest a gift for {who}.<|im_end|>\n<|im_start|>assistant\n"
            ))
            .unwrap()
    })
    .collect()
}

#[test]
fn batched_and_single_stream_generation_agree() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let ps = prompts(&m);
    for temperature in [0.0, 1.0] {
        let s: Vec<Sampling> = (0..ps.len())
            .map(|i| Sampling {
                max_tokens: 32,
                temperature,
                seed: 10 + i as u64,
                ..Default::default()
            })
            .collect();
        let batched = m.generate_many(&ps, &s).unwrap();
        for (i, p) in ps.iter().enumerate() {
            let single = m.generate(p, &s[i], &mut |_| {}).unwrap();
            assert_eq!(
                batched[i].ids, single.ids,
                "prompt {i}, temperature {temperature}"
            );
            for (a, b) in batched[i].logprobs.iter().zip(&single.logprobs) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn a_forked_prompt_gives_each_sample_its_own_seed() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let p = &prompts(&m)[0];
    let s = Sampling {
        max_tokens: 16,
        temperature: 1.0,
        seed: 100,
        ..Default::default()
    };
    let group = m.generate_group(p, &s, 4, None).unwrap();
    assert_eq!(group.len(), 4);
    for (i, g) in group.iter().enumerate() {
        let single = m
            .generate(
                p,
                &Sampling {
                    seed: 100 + i as u64,
                    ..s.clone()
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(g.ids, single.ids, "sample {i}");
    }
    assert!(
        group.iter().any(|g| g.ids != group[0].ids),
        "samples should differ"
    );
}

#[test]
fn chat_batch_matches_chat() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let reqs: Vec<ChatRequest> = ["Name a fruit.", "Name a colour.", "Name a river."]
        .iter()
        .map(|q| ChatRequest {
            messages: vec![Message::user(*q)],
            sampling: Sampling {
                max_tokens: 12,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let batch = m.chat_batch(&reqs);
    for (r, b) in reqs.iter().zip(batch) {
        assert_eq!(b.unwrap().text, m.chat(r).unwrap().text);
    }
}

#[test]
fn a_logit_mask_hook_restricts_the_vocabulary() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let p = &prompts(&m)[1];
    let allowed: Vec<u32> = m.info().encode(" yes no maybe").unwrap();
    let s = Sampling {
        max_tokens: 6,
        temperature: 1.0,
        seed: 2,
        ..Default::default()
    };
    let mut calls = 0;
    let g = m
        .generate_masked(p, &s, &mut |_, logits| {
            calls += 1;
            for (i, l) in logits.iter_mut().enumerate() {
                if !allowed.contains(&(i as u32)) {
                    *l = f32::NEG_INFINITY;
                }
            }
        })
        .unwrap();
    assert_eq!(g.ids.len(), 6);
    assert_eq!(calls, 6);
    assert!(g.ids.iter().all(|t| allowed.contains(t)), "{:?}", g.ids);
}

/// The next turn of a conversation reuses the keys and values of the previous prompt (only the
/// new tokens are prefilled) and generates what a fresh model generates on the whole prompt.
#[test]
fn a_prompt_extending_a_previous_one_reuses_its_prefix_and_agrees() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let fresh = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let first = "<|im_start|>system\nYou are a helpful shopping assistant who recommends gifts for families, with short and concrete answers.<|im_end|>\n<|im_start|>user\nSuggest a gift for a toddler who loves bath time.<|im_end|>\n<|im_start|>assistant\n";
    let s = Sampling {
        max_tokens: 24,
        ..Default::default()
    };
    let p1 = m.info().encode(first).unwrap();
    assert!(p1.len() > 40);
    let g1 = m.generate(&p1, &s, &mut |_| {}).unwrap();
    let second = format!(
        "{first}{}<|im_end|>\n<|im_start|>user\nAnd one for a runner with flat feet?<|im_end|>\n<|im_start|>assistant\n",
        g1.text
    );
    let p2 = m.info().encode(&second).unwrap();
    let t = std::time::Instant::now();
    let reused = m.generate(&p2, &s, &mut |_| {}).unwrap();
    let reused_s = t.elapsed().as_secs_f64();
    let whole = fresh.generate(&p2, &s, &mut |_| {}).unwrap();
    assert_eq!(
        reused.ids, whole.ids,
        "{:?} vs {:?}",
        reused.text, whole.text
    );
    // The first token comes from the prefill logits: exact. Later ones are decoded with Q8_0,
    // which quantises activations, so a differently assembled cache moves them a little.
    assert_eq!(reused.logprobs[0], whole.logprobs[0]);
    for (i, (a, b)) in reused.logprobs.iter().zip(&whole.logprobs).enumerate() {
        assert!((a - b).abs() < 0.3, "token {i}: {a} vs {b}");
    }
    // The same prompt again starts from the remembered logits: identical output.
    let again = m.generate(&p2, &s, &mut |_| {}).unwrap();
    assert_eq!(again.ids, whole.ids);
    eprintln!("second turn with reuse: {reused_s:.2}s");
}

/// Every projection of the model runs our packed Q8_0 kernel, whose rows do not depend on the
/// rows batched with them, so a sequence decodes bit-identically alone or in a batch. (Not so for
/// models with k-quant matrices, which candle multiplies: Qwen2.5-0.5B's `ffn_down` are Q6_K and
/// Q4_K, and candle's batched product for them differs from its one-row product in the last bits.)
#[test]
fn a_sequence_decodes_to_the_same_logits_alone_or_batched() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let t = m.transformer();
    let ps = prompts(&m);
    let prefill = |p: &[u32]| {
        let mut c = t.new_cache();
        t.prefill(p, &mut c).unwrap();
        c
    };
    let mut alone = prefill(&ps[0]);
    let (mut c0, mut c1, mut c2) = (prefill(&ps[0]), prefill(&ps[1]), prefill(&ps[2]));
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0 as u32
    };
    let differ = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(a, b)| a != b).count();
    let row = |t: &candle_core::Tensor, i: usize| -> Vec<f32> {
        t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    // Many greedy steps: the first sequence's logits do not depend on the others'.
    let (mut ta, mut tb, mut others) = (vec![42u32], vec![42u32], [7u32, 99]);
    for step in 0..41 {
        let a = row(
            &t.decode_batch(&[*ta.last().unwrap()], &mut [&mut alone])
                .unwrap(),
            0,
        );
        let b = t
            .decode_batch(
                &[*tb.last().unwrap(), others[0], others[1]],
                &mut [&mut c0, &mut c1, &mut c2],
            )
            .unwrap();
        let b0 = row(&b, 0);
        assert_eq!(differ(&a, &b0), 0, "step {step}: tokens {ta:?} vs {tb:?}");
        if step == 0 {
            // The keys and values each layer cached are the same too.
            for li in 0..t.n_layers() {
                let (ka, va) = alone.layer(li).unwrap();
                let (kb, vb) = c0.layer(li).unwrap();
                for (what, x, y) in [("keys", ka, kb), ("values", va, vb)] {
                    let bad = differ(&x, &y);
                    assert_eq!(bad, 0, "layer {li} {what}: {bad} of {} differ", x.len());
                }
            }
        }
        others = [argmax(&row(&b, 1)), argmax(&row(&b, 2))];
        ta.push(argmax(&a));
        tb.push(argmax(&b0));
    }
}

/// What `mrrec eval --batch 1` and `--batch 8` ask of the model: the same answers.
#[test]
fn a_constrained_request_answers_the_same_alone_or_batched() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "ideal_item_profile": {"type": "string", "minLength": 20, "maxLength": 200},
            "useful_memory_ids": {"type": "array", "items": {"type": "string"}, "maxItems": 0}
        },
        "required": ["ideal_item_profile", "useful_memory_ids"],
        "additionalProperties": false
    });
    let req = |q: &str| {
        ChatRequest {
        messages: vec![
            Message::system("You write the profile of the ideal product for a shopper's request."),
            Message::user(format!("Request: {q}\nWrite the ideal item profile for this request: one sentence, the product type and its 2 or 3 key features.")),
        ],
        sampling: Sampling {
            max_tokens: 64,
            repetition_penalty: 1.1,
            ..Default::default()
        },
        constraint: Some(Constraint::JsonSchema(schema.clone())),
        ..Default::default()
    }
    };
    let qs = [
        "a waterfall bath toy for a toddler",
        "reliable lever wire connectors for splicing five conductors",
        "a cute french bulldog stuffed toy for a gift",
    ];
    let reqs: Vec<ChatRequest> = qs.iter().map(|q| req(q)).collect();
    m.set_prefix_reuse(false);
    let batch = m.chat_batch(&reqs);
    for (r, b) in reqs.iter().zip(batch) {
        let one = m.chat(r).unwrap();
        let b = b.unwrap();
        assert_eq!(b.text, one.text, "batched vs alone");
    }
}

#[test]
fn a_cancelled_call_stops_at_the_next_token_and_leaves_its_batch_alone() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let ask = |text: &str, cancel: Option<Cancel>| ChatRequest {
        messages: vec![Message::user(text)],
        sampling: Sampling {
            max_tokens: 48,
            ..Default::default()
        },
        cancel,
        ..Default::default()
    };
    // Cancelled while it streams: no further token after the one that was being shown.
    let cancel = Cancel::new();
    let mut pieces = 0;
    let r = m.chat_stream(
        &ask(
            "Write a long story about a lighthouse.",
            Some(cancel.clone()),
        ),
        &mut |_| {
            pieces += 1;
            cancel.cancel();
        },
    );
    assert!(matches!(r, Err(LlmError::Cancelled)), "{r:?}");
    assert_eq!(pieces, 1);
    // Already cancelled: refused before any work.
    let r = m.chat(&ask("Hello", Some(cancel.clone())));
    assert!(matches!(r, Err(LlmError::Cancelled)), "{r:?}");
    // In a batch, a cancelled request fails alone; the other answers as it would alone.
    let other = ask("Name three fruits.", Some(Cancel::new()));
    let alone = m.chat(&other).unwrap();
    let both = m.chat_batch(&[ask("Hello", Some(cancel)), other]);
    assert!(matches!(both[0], Err(LlmError::Cancelled)), "{:?}", both[0]);
    assert_eq!(both[1].as_ref().unwrap().text, alone.text);
    // Not cancelled: the token changes nothing.
    let plain = m.chat(&ask("Name three fruits.", None)).unwrap();
    assert_eq!(plain.text, alone.text);
}

/// A long prompt: several sentences, `n` tokens.
fn long_prompt(m: &LocalModel, n: usize) -> Vec<u32> {
    let text = "The customer reviewed a soft cotton pillow, a steel water bottle and a pair of \
                trail running shoes, and asked for something similar for a weekend hike. "
        .repeat(n / 20 + 2);
    let mut ids = m.info().encode(&text).unwrap();
    ids.truncate(n);
    assert_eq!(ids.len(), n);
    ids
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn prompts_prefilled_together_give_each_the_logits_and_cache_it_gets_alone() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let tf = m.transformer();
    // Different lengths (one past the attention block), one with a cached prefix already.
    let a = long_prompt(&m, 300);
    let b = prompts(&m)[1].clone();
    let c = long_prompt(&m, 200)[..150].to_vec();
    let mut pre = tf.new_cache();
    tf.prefill(&c[..40], &mut pre).unwrap();
    let mut caches = [tf.new_cache(), tf.new_cache(), pre.clone()];
    let logits = {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        tf.prefill_batch(&[&a, &b, &c[40..]], &mut refs).unwrap()
    };
    assert_eq!(logits.dims()[0], 3);
    let alone = |p: &[u32], mut cache: KvCache| {
        let l = tf.prefill(p, &mut cache).unwrap();
        (l.to_vec1::<f32>().unwrap(), cache)
    };
    let singles = [
        alone(&a, tf.new_cache()),
        alone(&b, tf.new_cache()),
        alone(&c[40..], pre),
    ];
    for (i, (single, cache)) in singles.iter().enumerate() {
        let batched: Vec<f32> = logits.get(i).unwrap().to_vec1().unwrap();
        assert_eq!(caches[i].pos, cache.pos, "sequence {i}");
        if q8::available() {
            // Every matrix runs the row-invariant packed kernel: the same bits.
            assert_eq!(&batched, single, "sequence {i}");
        } else {
            assert!(max_abs_diff(&batched, single) < 1e-3, "sequence {i}");
        }
        // The caches continue alike: one more token decodes to the same logits.
        let next = |c: &KvCache| {
            let mut c = c.clone();
            tf.decode_batch(&[42], &mut [&mut c])
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert!(
            max_abs_diff(&next(&caches[i]), &next(cache)) < 1e-4,
            "sequence {i}"
        );
    }
}

#[test]
fn a_long_prompt_gives_the_same_logits_whatever_its_chunking_and_decodes_on_alike() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let tf = m.transformer();
    // 700 positions whole, in two halves (the attention tiles and key blocks fall elsewhere),
    // and one at a time: with the packed kernel every operation is per row, so the same bits
    // (an AMD Zen 4 failed the halves when attention ran on candle's matrix product).
    let p = long_prompt(&m, 700);
    let mut whole = tf.new_cache();
    let whole_logits: Vec<f32> = tf.prefill(&p, &mut whole).unwrap().to_vec1().unwrap();
    let mut halves = tf.new_cache();
    tf.prefill(&p[..350], &mut halves).unwrap();
    let second: Vec<f32> = tf
        .prefill(&p[350..], &mut halves)
        .unwrap()
        .to_vec1()
        .unwrap();
    if q8::available() {
        assert_eq!(whole_logits, second);
    } else {
        assert!(max_abs_diff(&whole_logits, &second) < 1e-3);
    }
    // Against the one-position path (the prompt fed one token at a time, as decoding does).
    let mut chunked = tf.new_cache();
    let mut last = None;
    for chunk in p.chunks(1) {
        last = Some(tf.prefill(chunk, &mut chunked).unwrap());
    }
    let chunked_logits: Vec<f32> = last.unwrap().to_vec1().unwrap();
    if q8::available() {
        assert_eq!(whole_logits, chunked_logits);
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap()
    };
    let follow = |cache: &KvCache, first: &[f32]| {
        let mut c = cache.clone();
        let mut tok = argmax(first);
        let mut out = vec![tok];
        for _ in 1..12 {
            let l: Vec<f32> = tf
                .decode_batch(&[tok], &mut [&mut c])
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            tok = argmax(&l);
            out.push(tok);
        }
        out
    };
    assert_eq!(
        follow(&whole, &whole_logits),
        follow(&chunked, &chunked_logits)
    );
}

#[test]
fn qwen_decodes_to_the_same_tokens_alone_and_in_a_batch() {
    // Its k-quant ffn_down (Q6_K/Q4_K in the shipped file) are converted to Q8_0 once, so every
    // matrix runs the packed kernel where the CPU has it, and the converted file is a model of
    // its own for the response cache.
    let m = LocalModel::from_registry("qwen2.5-coder-0.5b-instruct").unwrap();
    assert_eq!(
        ChatModel::id(&m),
        format!("qwen2.5-coder-0.5b-instruct+{CONVERSION_TAG}")
    );
    if q8::available() {
        assert_eq!(m.transformer().unpacked_matrices(), 0);
    }
    let ps = prompts(&m);
    let s: Vec<Sampling> = (0..ps.len())
        .map(|i| Sampling {
            max_tokens: 16,
            temperature: if i % 2 == 0 { 0.0 } else { 1.0 },
            seed: 7 + i as u64,
            ..Default::default()
        })
        .collect();
    let batched = m.generate_many(&ps, &s).unwrap();
    for (i, p) in ps.iter().enumerate() {
        let single = m.generate(p, &s[i], &mut |_| {}).unwrap();
        if q8::available() {
            assert_eq!(batched[i].ids, single.ids, "prompt {i}");
            assert_eq!(batched[i].logprobs, single.logprobs, "prompt {i}");
        } else {
            assert!(!single.ids.is_empty());
        }
    }
}

/// A call that ends with the model's end-of-turn token records that token last in its training
/// segment (the decision to stop is the model's, and training learns it), with its sampling
/// log-probability, alone and batched alike; a call cut by `max_tokens` records no end.
#[test]
fn a_segment_ends_with_the_sampled_end_of_turn_token() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let req = |max_tokens| ChatRequest {
        messages: vec![Message::user("Name a fruit. Answer with one word.")],
        sampling: Sampling {
            max_tokens,
            ..Default::default()
        },
        ..Default::default()
    };
    let (resp, seg) = m.chat_segment(&req(64), &mut |_| {}).unwrap();
    assert_eq!(resp.finish_reason, FinishReason::Stop, "{:?}", resp.text);
    let (&last, written) = seg.ids.split_last().unwrap();
    assert!(m.info().stop_ids.contains(&last), "{:?}", seg.ids);
    assert_eq!(m.decode(written).unwrap(), resp.text);
    assert_eq!(seg.ids.len(), seg.logprobs.len());
    assert_eq!(seg.ids.len(), seg.masks.len());
    let lp = *seg.logprobs.last().unwrap();
    assert!(
        lp.is_finite() && lp <= 0.0 && lp > -2.0,
        "greedy end's log p {lp}"
    );
    let batched = m.chat_segments(&[req(64), req(64)]);
    for b in batched {
        assert_eq!(b.unwrap().1, seg);
    }
    // Cut by the length limit: every id decodes to the text, no end token.
    let (resp, seg) = m.chat_segment(&req(1), &mut |_| {}).unwrap();
    assert_eq!(resp.finish_reason, FinishReason::Length);
    assert_eq!(seg.ids.len(), 1);
    assert!(!m.info().stop_ids.contains(&seg.ids[0]));
}

#[test]
fn scored_choices_are_the_log_probabilities_of_the_answers_first_token() {
    let m = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let ask = |item: &str| ChatRequest {
        messages: vec![
            Message::system("You say whether a product suits the shopper."),
            Message::user(format!(
                "The shopper wants running shoes for flat feet.\nProduct: {item}\nAnswer Yes or No."
            )),
        ],
        ..Default::default()
    };
    let reqs: Vec<ChatRequest> = [
        "Stability running shoe with arch support",
        "Cast iron skillet, 12 inch",
        "Trail running shoe, neutral",
    ]
    .iter()
    .map(|i| ask(i))
    .collect();
    let scored = ChatModel::score_choices(&m, &reqs, &["Yes", "No"]);
    assert_eq!(scored.len(), 3);
    let yes = m.info().encode("Yes").unwrap()[0];
    let no = m.info().encode("No").unwrap()[0];
    for (r, s) in reqs.iter().zip(&scored) {
        let s = s.as_ref().unwrap();
        assert_eq!(s.logprobs.len(), 2);
        assert!(
            s.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0),
            "{s:?}"
        );
        // The same numbers as a fresh prefill of the whole prompt, alone (the three prompts
        // share their beginning, which the batch computes once).
        let ids = m.info().encode(&m.prompt(r).unwrap()).unwrap();
        assert_eq!(s.usage.prompt_tokens, ids.len() as u64);
        assert_eq!(s.usage.completion_tokens, 0);
        for (tok, got) in [yes, no].iter().zip(&s.logprobs) {
            let alone = m.logprob_of_next(&ids, *tok).unwrap();
            assert!((alone - got).abs() < 1e-3, "{alone} vs {got}");
        }
    }
    // The three items are scored differently: the judge reads the item.
    let yes_lp: Vec<f32> = scored
        .iter()
        .map(|s| s.as_ref().unwrap().logprobs[0])
        .collect();
    assert!(
        yes_lp.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-3),
        "{yes_lp:?}"
    );
    // A request too long for the window is refused alone; the others are still scored.
    let mut long = ask("x");
    long.messages[1].content = "word ".repeat(20_000);
    let mixed = ChatModel::score_choices(&m, &[reqs[0].clone(), long], &["Yes", "No"]);
    assert!(mixed[0].is_ok());
    assert!(
        matches!(mixed[1], Err(LlmError::ContextOverflow { .. })),
        "{:?}",
        mixed[1]
    );
    // A backend that cannot score says so, naming the model.
    let echo = EchoModel::from_id("echo").unwrap();
    let e = echo
        .score_choices(&reqs[..1], &["Yes", "No"])
        .remove(0)
        .unwrap_err();
    assert!(matches!(e, LlmError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("echo"), "{e}");
}
