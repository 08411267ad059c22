//! The differentiable policy against the inference model (logits, with and without an
//! adapter), gradients against finite differences, chunked and constrained log-probabilities,
//! attention's fused causal softmax against the composed one, the GRPO objective (advantages,
//! masks), a real learning test on a toy verifiable task, and checkpoint → resume.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use mrrec_llm_local::model::Proj;
use mrrec_train::softmax::{causal_softmax, composed_causal_softmax};
use mrrec_train::{
    group_advantages, grpo_loss, soft_label_loss, AdamW, AdamWParams, FrozenMemo, GrpoParams,
    LoraConfig, Lower, LowerCache, Policy, Scored, Shape, TokenBatch,
};
use rand::SeedableRng;

fn tiny_shape() -> Shape {
    Shape {
        vocab: 12,
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        eps: 1e-6,
        rope_theta: 10_000.0,
        neox: true,
        context: 64,
        qkv_bias: true,
    }
}

fn all_lora(rank: usize, seed: u64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: rank as f32 * 2.0,
        targets: Proj::ALL.to_vec(),
        layers: 2,
        seed,
    }
}

/// Gives every B factor small random values (B starts at zero, which would hide A's gradient).
fn perturb_b(p: &Policy, seed: u64, scale: f64) {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (name, v) in p.params() {
        if name.ends_with("lora_b") {
            let dims = v.as_tensor().dims().to_vec();
            let n: usize = dims.iter().product();
            let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
            let t = Tensor::from_vec(vals, dims, &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(v.as_tensor().dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

/// The training copy of SmolLM2 with a rank-4 adapter on every projection of its top 3 layers.
fn smollm2_policy(m: &mrrec_llm_local::LocalModel) -> Policy {
    Policy::from_gguf(
        &m.info().path,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Proj::ALL.to_vec(),
            layers: 3,
            seed: 1,
        },
    )
    .unwrap()
}

fn set(ids: &[u32]) -> mrrec_llm_local::TokenSet {
    mrrec_llm_local::TokenSet::from_fn(12, |i| ids.contains(&i))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn logits_match_the_inference_model_with_and_without_an_adapter() {
    let m = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let tokens: Vec<u32> = m
        .info()
        .tokenizer
        .encode(
            "A user asks for a soft plush toy for a toddler; the ideal item is",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(tokens.len() > 8);
    let p = smollm2_policy(&m);
    let reference = m.transformer().logits_dense(&tokens).unwrap();
    let ours = p.logits(&tokens, true).unwrap();
    assert_eq!(ours.dims(), reference.dims());
    let d = max_abs_diff(&ours, &reference);
    assert!(d < 1e-3, "max |Δlogit| = {d}");
    // The same adapter in both: the inference model applies what the trainer learned.
    perturb_b(&p, 7, 0.05);
    m.transformer()
        .set_lora(Some(std::sync::Arc::new(p.adapter().unwrap())));
    let reference = m.transformer().logits_dense(&tokens).unwrap();
    let ours = p.logits(&tokens, true).unwrap();
    let d = max_abs_diff(&ours, &reference);
    assert!(d < 1e-3, "with the adapter: max |Δlogit| = {d}");
    let off = p.logits(&tokens, false).unwrap();
    assert!(
        max_abs_diff(&ours, &off) > 1e-2,
        "the adapter changes the logits"
    );
    m.transformer().set_lora(None);
}

/// The frozen layers computed by the inference model's prompt prefill (quantised kernels, the
/// shared beginning once, the rests in one batch) give the adapted layers the input the dense
/// copy gives, within quantisation: log-probabilities and gradients agree closely, and equal
/// the inference model's own scoring with the same adapter.
#[test]
fn the_inference_models_frozen_layers_feed_the_adapter_as_the_dense_ones_do() {
    let m = mrrec_llm_local::LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let enc = |s: &str| -> Vec<u32> {
        m.info()
            .tokenizer
            .encode(s, false)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    let p = smollm2_policy(&m);
    perturb_b(&p, 7, 0.05);
    let request = enc("The shopper asks for a warm blanket for a toddler. Product: ");
    let items = [
        "a fleece throw, machine washable, 50 by 60 inches. Is it what they want? ",
        "a stainless steel water bottle. Is it what they want? ",
        "a cotton baby blanket with bears. Is it what they want? ",
    ];
    let seqs: Vec<(Vec<u32>, usize)> = items
        .iter()
        .map(|t| {
            let mut s = [&request[..], &enc(t)[..]].concat();
            let from = s.len();
            s.extend(enc("Yes"));
            (s, from - 3)
        })
        .collect();
    let scored: Vec<Scored<'_>> = seqs
        .iter()
        .map(|(tokens, from)| Scored {
            tokens,
            from: *from,
            allowed: &[],
        })
        .collect();
    let grads = |lps: &[Tensor]| -> Vec<f32> {
        let mut sum = lps[0].sum_all().unwrap();
        for lp in &lps[1..] {
            sum = (sum + lp.sum_all().unwrap()).unwrap();
        }
        let g = sum.backward().unwrap();
        p.params()
            .iter()
            .flat_map(|(_, v)| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let (exact, _) = p
        .token_logprobs_shared(&scored, false, 64, Lower::Exact(None))
        .unwrap();
    let (fast, _) = p
        .token_logprobs_shared(&scored, false, 64, Lower::Inference(m.transformer()))
        .unwrap();
    m.transformer()
        .set_lora(Some(std::sync::Arc::new(p.adapter().unwrap())));
    for (i, ((e, f), (toks, from))) in exact.iter().zip(&fast).zip(&seqs).enumerate() {
        let (e, f) = (e.to_vec1::<f32>().unwrap(), f.to_vec1::<f32>().unwrap());
        assert_eq!(e.len(), toks.len() - from);
        // The inference model scoring the same tokens with the same adapter.
        let own = m
            .score_continuation(&toks[..*from], &toks[*from..])
            .unwrap();
        for ((a, b), c) in e.iter().zip(&f).zip(&own) {
            assert!(
                (a - b).abs() < 0.2,
                "sequence {i}: dense {a} vs prefill {b}"
            );
            assert!(
                (b - c).abs() < 0.2,
                "sequence {i}: {b} vs the model's own {c}"
            );
        }
    }
    m.transformer().set_lora(None);
    let (ge, gf) = (grads(&exact), grads(&fast));
    let norm = |g: &[f32]| g.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = ge.iter().zip(&gf).map(|(a, b)| a - b).collect();
    assert!(norm(&ge) > 1e-3, "the adapter gets a gradient");
    assert!(
        norm(&diff) < 0.05 * norm(&ge),
        "gradients differ by {} of {}",
        norm(&diff),
        norm(&ge)
    );
    // Deterministic: the same bits again; alone (another split of the shared beginning) the
    // same values within float rounding.
    let (again, _) = p
        .token_logprobs_shared(&scored, false, 64, Lower::Inference(m.transformer()))
        .unwrap();
    let (alone, _) = p
        .token_logprobs_shared(&scored[1..2], false, 64, Lower::Inference(m.transformer()))
        .unwrap();
    for (a, f) in again.iter().zip(&fast) {
        assert_eq!(a.to_vec1::<f32>().unwrap(), f.to_vec1::<f32>().unwrap());
    }
    for (a, b) in alone[0]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(&fast[1].to_vec1::<f32>().unwrap())
    {
        assert!((a - b).abs() < 1e-3, "alone {a} vs in a batch {b}");
    }
    // Remembered: the first time computed as the prefill does, the second time found (every
    // token) and the same bits; another group (a part of it) is not found; a budget too small
    // holds nothing and computes every time.
    let mut memo = FrozenMemo::new(1 << 30);
    for round in 1..=2u64 {
        let (got, _) = p
            .token_logprobs_shared(
                &scored,
                false,
                64,
                Lower::Remembered(m.transformer(), &mut memo),
            )
            .unwrap();
        for (a, f) in got.iter().zip(&fast) {
            assert_eq!(a.to_vec1::<f32>().unwrap(), f.to_vec1::<f32>().unwrap());
        }
        assert_eq!(
            memo.hits_tokens * 2,
            memo.total_tokens * (round - 1),
            "round {round}"
        );
    }
    assert!(memo.bytes() > 0);
    let (total, hits) = (memo.total_tokens, memo.hits_tokens);
    let (part, _) = p
        .token_logprobs_shared(
            &scored[1..2],
            false,
            64,
            Lower::Remembered(m.transformer(), &mut memo),
        )
        .unwrap();
    assert_eq!(
        part[0].to_vec1::<f32>().unwrap(),
        alone[0].to_vec1::<f32>().unwrap()
    );
    assert!(memo.total_tokens > total && memo.hits_tokens == hits);
    let mut none = FrozenMemo::new(1);
    for _ in 0..2 {
        p.token_logprobs_shared(
            &scored,
            false,
            64,
            Lower::Remembered(m.transformer(), &mut none),
        )
        .unwrap();
    }
    assert_eq!((none.bytes(), none.hits_tokens), (0, 0));
    // A cache filled below a layer only serves that: prefill from it is refused, not wrong.
    let t = m.transformer();
    let mut c = t.new_cache();
    let x = t.residual_batch(&[&request[..]], &mut [&mut c], 5).unwrap();
    assert_eq!(x[0].dims(), &[request.len(), t.hidden_size]);
    assert_eq!(c.pos, request.len());
    assert!(t.prefill(&enc("more"), &mut c).is_err());
}

#[test]
fn gradients_match_finite_differences() {
    for neox in [true, false] {
        let shape = Shape {
            neox,
            ..tiny_shape()
        };
        let p = Policy::random(shape, all_lora(2, 3), DType::F64, 11).unwrap();
        perturb_b(&p, 5, 0.3);
        let tokens = [1u32, 5, 2, 9, 3, 3, 7];
        let allowed = vec![None, Some(set(&[2, 9, 4])), None, None, None, None];
        let loss = |p: &Policy| -> Tensor {
            p.token_logprobs(&tokens, 1, &allowed, true, 2)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let l = loss(&p);
        let grads = l.backward().unwrap();
        let mut checked = 0;
        for (name, v) in p.params() {
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let g: Vec<f64> = g.to_vec1().unwrap();
            let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for idx in [0usize, base.len() / 2, base.len() - 1] {
                let eps = 1e-6;
                let mut plus = base.clone();
                plus[idx] += eps;
                v.set(
                    &Tensor::from_vec(plus, v.as_tensor().dims(), &candle_core::Device::Cpu)
                        .unwrap(),
                )
                .unwrap();
                let lp: f64 = loss(&p).to_scalar().unwrap();
                let mut minus = base.clone();
                minus[idx] -= eps;
                v.set(
                    &Tensor::from_vec(minus, v.as_tensor().dims(), &candle_core::Device::Cpu)
                        .unwrap(),
                )
                .unwrap();
                let lm: f64 = loss(&p).to_scalar().unwrap();
                v.set(
                    &Tensor::from_vec(
                        base.clone(),
                        v.as_tensor().dims(),
                        &candle_core::Device::Cpu,
                    )
                    .unwrap(),
                )
                .unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                let err = (fd - g[idx]).abs() / (1e-6 + fd.abs().max(g[idx].abs()));
                assert!(
                    err < 1e-4,
                    "{name}[{idx}] (neox {neox}): autograd {} vs finite difference {fd}",
                    g[idx]
                );
                checked += 1;
            }
        }
        assert!(checked >= 28 * 3);
    }
}

#[test]
fn chunked_and_constrained_logprobs_are_the_log_softmax() {
    let p = Policy::random(tiny_shape(), all_lora(2, 1), DType::F64, 2).unwrap();
    perturb_b(&p, 3, 0.2);
    let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let full = p.logits(&tokens, true).unwrap();
    let ls = candle_nn::ops::log_softmax(&full, 1).unwrap();
    let want: Vec<f64> = (2..tokens.len())
        .map(|i| {
            ls.get(i - 1)
                .unwrap()
                .get(tokens[i] as usize)
                .unwrap()
                .to_scalar()
                .unwrap()
        })
        .collect();
    for chunk in [1, 3, 100] {
        let got: Vec<f64> = p
            .token_logprobs(&tokens, 2, &[], true, chunk)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-10, "chunk {chunk}: {g} vs {w}");
        }
    }
    // Constrained at the second scored position (target token 1): renormalised over {1, 9}.
    let allowed = vec![None, Some(set(&[9, 1]))];
    let got: Vec<f64> = p
        .token_logprobs(&tokens, 2, &allowed, true, 4)
        .unwrap()
        .to_vec1()
        .unwrap();
    let row = full.get(2).unwrap();
    let (a, b): (f64, f64) = (
        row.get(1).unwrap().to_scalar().unwrap(),
        row.get(9).unwrap().to_scalar().unwrap(),
    );
    let mx = a.max(b);
    let want_c = a - (mx + ((a - mx).exp() + (b - mx).exp()).ln());
    assert!((got[1] - want_c).abs() < 1e-10, "{} vs {want_c}", got[1]);
    assert!((got[0] - want[0]).abs() < 1e-10);
    // Chunks of one row compute a few-token row from those tokens' logits alone (chunks of four
    // mix it with a free row and mask the full row): the same values and gradients, also for a
    // target outside its set (its logit against the set's log-sum-exp, as the mask gives).
    let outside = vec![None, Some(set(&[9, 1])), Some(set(&[0, 2, 7]))];
    let grads_of = |lp: &Tensor| -> Vec<f64> {
        let g = lp.sum_all().unwrap().backward().unwrap();
        p.params()
            .iter()
            .flat_map(|(_, v)| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    };
    let masked = p.token_logprobs(&tokens, 2, &outside, true, 4).unwrap();
    let few = p.token_logprobs(&tokens, 2, &outside, true, 1).unwrap();
    let (m, f): (Vec<f64>, Vec<f64>) = (masked.to_vec1().unwrap(), few.to_vec1().unwrap());
    assert!((f[1] - want_c).abs() < 1e-10, "{} vs {want_c}", f[1]);
    for (a, b) in m.iter().zip(&f) {
        assert!((a - b).abs() < 1e-10, "masked {a} vs few {b}");
    }
    for (a, b) in grads_of(&masked).iter().zip(&grads_of(&few)) {
        assert!((a - b).abs() < 1e-10, "gradient: masked {a} vs few {b}");
    }
    // The paired pass: the same values with and without the adapter.
    let (with, reference) = p
        .token_logprobs_with_reference(&tokens, 2, &allowed, 3, None)
        .unwrap();
    let with: Vec<f64> = with.to_vec1().unwrap();
    let off: Vec<f64> = p
        .token_logprobs(&tokens, 2, &allowed, false, 5)
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in 0..with.len() {
        assert!((with[i] - got[i]).abs() < 1e-10);
        assert!((reference[i] as f64 - off[i]).abs() < 1e-5);
    }
    assert!(
        with.iter().zip(&off).any(|(a, b)| (a - b).abs() > 1e-4),
        "the adapter matters"
    );
    // Bad input is an error, not a panic.
    assert!(p.token_logprobs(&tokens, 0, &[], true, 4).is_err());
    assert!(p.token_logprobs(&[1, 99], 1, &[], true, 4).is_err());
}

/// Reusing the frozen lower layers' state of a shared prefix (a group's prompt, a trajectory's
/// previous call) changes neither the log-probabilities nor the gradients.
#[test]
fn a_shared_prefix_gives_the_same_logprobs_and_gradients() {
    let shape = Shape {
        layers: 4,
        ..tiny_shape()
    };
    let lora = LoraConfig {
        layers: 2,
        ..all_lora(2, 5)
    };
    let p = Policy::random(shape.clone(), lora.clone(), DType::F64, 11).unwrap();
    perturb_b(&p, 3, 0.3);
    assert_eq!(p.first_adapted(), 2, "two frozen layers below the adapter");
    // The same policy with attention's softmax composed from tensor operations (the baseline).
    let mut composed = Policy::random(shape, lora, DType::F64, 11).unwrap();
    perturb_b(&composed, 3, 0.3);
    composed.set_fused_softmax(false);
    let prompt = [1u32, 5, 7, 2, 9, 3, 3, 8, 0, 4];
    let seqs: Vec<(Vec<u32>, usize)> = vec![
        ([&prompt[..], &[6, 1, 2]].concat(), 10), // first trajectory
        ([&prompt[..], &[2, 2, 11, 5]].concat(), 10), // same prompt, another response
        ([&prompt[..], &[6, 1, 2, 7, 7, 3]].concat(), 13), // the next call extends the first
        ([&prompt[..6], &[10, 10]].concat(), 6),  // diverges inside the prompt
        ([&prompt[..], &[6, 1, 2]].concat(), 10), // exactly a cached sequence
        (vec![4, 4, 4, 1, 2], 2),                 // nothing shared
    ];
    let allowed = vec![None, Some(set(&[1, 2, 6, 10]))];
    let run = |p: &Policy, cache: Option<&mut LowerCache>, toks: &[u32], from: usize| {
        let (lp, reference) = p
            .token_logprobs_with_reference(toks, from, &allowed, 3, cache)
            .unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f64>> = p
            .params()
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let reference: Vec<f64> = reference.iter().map(|&x| f64::from(x)).collect();
        (lp.to_vec1::<f64>().unwrap(), reference, g)
    };
    let close = |a: &[f64], b: &[f64], tol: f64, what: &str| {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{what}: {x} vs {y}");
        }
    };
    let (mut cache, mut composed_cache) = (LowerCache::new(3), LowerCache::new(3));
    for (toks, from) in &seqs {
        let (a, ra, ga) = run(&p, None, toks, *from);
        let (b, rb, gb) = run(&p, Some(&mut cache), toks, *from);
        close(&a, &b, 1e-10, "cached log-probability");
        assert_eq!(ra, rb);
        close(&ga.concat(), &gb.concat(), 1e-9, "cached gradient");
        let (c, rc, gc) = run(&composed, Some(&mut composed_cache), toks, *from);
        close(&a, &c, 1e-10, "composed softmax's log-probability");
        close(&ra, &rc, 1e-5, "composed softmax's reference");
        close(
            &ga.concat(),
            &gc.concat(),
            1e-9,
            "composed softmax's gradient",
        );
    }
    // Reused: the prompt, the first call, six tokens, then the repeated sequence found inside
    // the extended one (all but its last token, which is always computed) — of 69 tokens.
    assert_eq!(cache.total_tokens, 69);
    assert_eq!(cache.hits_tokens, 10 + 13 + 6 + 12);
}

/// Scoring sequences that begin alike together — the shared beginning through the adapted
/// layers once, every sequence's rest attending to it — gives each sequence's log-probabilities,
/// reference values and (summed) gradients as scoring it alone.
#[test]
fn sequences_scored_together_equal_each_scored_alone() {
    let shape = Shape {
        layers: 4,
        ..tiny_shape()
    };
    let lora = LoraConfig {
        layers: 2,
        ..all_lora(2, 5)
    };
    let p = Policy::random(shape, lora, DType::F64, 11).unwrap();
    perturb_b(&p, 3, 0.3);
    let prompt = [1u32, 5, 7, 2, 9, 3, 3, 8, 0, 4];
    let yes_no = [Some(set(&[1, 2]))];
    let free = [None, None, None];
    // (tokens, first scored position, allowed sets)
    type Seq<'a> = (Vec<u32>, usize, &'a [Option<mrrec_llm_local::TokenSet>]);
    let groups: Vec<Vec<Seq<'_>>> = vec![
        // A judge: one request, items of different lengths, one constrained answer token each.
        vec![
            ([&prompt[..], &[6, 11, 1]].concat(), 12, &yes_no[..]),
            ([&prompt[..], &[10, 2]].concat(), 11, &yes_no[..]),
            ([&prompt[..], &[6, 6, 6, 6, 2]].concat(), 14, &yes_no[..]),
        ],
        // Trajectories of one prompt; the second's scored tokens start inside the shared part
        // of the others (the shared beginning stops before every first scored position).
        vec![
            ([&prompt[..], &[6, 1, 2]].concat(), 10, &free[..]),
            ([&prompt[..], &[6, 1, 3]].concat(), 10, &free[..]),
            ([&prompt[..], &[6, 1, 2, 7]].concat(), 11, &free[..]),
        ],
        // Nothing shared, and a group of one.
        vec![
            (vec![4, 4, 4, 1, 2], 2, &free[..]),
            (vec![9, 1, 4, 4], 1, &free[..]),
        ],
        vec![(prompt.to_vec(), 7, &free[..])],
    ];
    let grads = |loss: Tensor| -> Vec<f64> {
        let g = loss.backward().unwrap();
        p.params()
            .iter()
            .flat_map(|(_, v)| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    };
    for group in &groups {
        let mut alone = (Vec::new(), Vec::new(), None::<Tensor>);
        for (toks, from, allowed) in group {
            let (lp, r) = p
                .token_logprobs_with_reference(toks, *from, allowed, 2, None)
                .unwrap();
            alone.0.push(lp.to_vec1::<f64>().unwrap());
            alone.1.push(r);
            let s = lp.sum_all().unwrap();
            alone.2 = Some(match alone.2 {
                Some(t) => (t + s).unwrap(),
                None => s,
            });
        }
        let scored: Vec<Scored<'_>> = group
            .iter()
            .map(|(tokens, from, allowed)| Scored {
                tokens,
                from: *from,
                allowed,
            })
            .collect();
        let mut cache = LowerCache::new(2);
        let (lps, refs) = p
            .token_logprobs_shared(&scored, true, 2, Lower::Exact(Some(&mut cache)))
            .unwrap();
        assert_eq!(lps.len(), group.len());
        let refs = refs.unwrap();
        let mut together = None::<Tensor>;
        for (i, lp) in lps.iter().enumerate() {
            let v = lp.to_vec1::<f64>().unwrap();
            assert_eq!(v.len(), group[i].0.len() - group[i].1);
            for (a, b) in v.iter().zip(&alone.0[i]) {
                assert!((a - b).abs() < 1e-10, "log-probability {a} vs {b}");
            }
            for (a, b) in refs[i].iter().zip(&alone.1[i]) {
                assert!((a - b).abs() < 1e-5, "reference {a} vs {b}");
            }
            let s = lp.sum_all().unwrap();
            together = Some(match together {
                Some(t) => (t + s).unwrap(),
                None => s,
            });
        }
        let (ga, gb) = (grads(alone.2.unwrap()), grads(together.unwrap()));
        assert!(
            ga.iter().any(|g| g.abs() > 1e-6),
            "the adapter gets a gradient"
        );
        for (a, b) in ga.iter().zip(&gb) {
            assert!((a - b).abs() < 1e-9, "gradient {a} vs {b}");
        }
    }
    // Nothing to score is nothing, and a bad sequence is refused as alone.
    let (none, refs) = p
        .token_logprobs_shared(&[], true, 2, Lower::Exact(None))
        .unwrap();
    assert!(none.is_empty() && refs.unwrap().is_empty());
    let bad = [Scored {
        tokens: &prompt,
        from: 10,
        allowed: &[],
    }];
    assert!(p
        .token_logprobs_shared(&bad, false, 2, Lower::Exact(None))
        .is_err());
}

fn random_tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rand::Rng::gen_range(&mut rng, -3.0..3.0))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Shapes: a prompt alone (t = all), new tokens after a cached prefix (all > t), one token,
/// rows spanning several parallel tasks.
const SHAPES: [[usize; 3]; 4] = [[3, 7, 7], [2, 5, 9], [4, 1, 6], [2, 300, 320]];

#[test]
fn equals_the_composed_softmax_and_masks_the_future() {
    for (k, dims) in SHAPES.iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            let x = random_tensor(dims, k as u64, dtype);
            let a = causal_softmax(&x, 0.125).unwrap();
            let b = composed_causal_softmax(&x, 0.125).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
            assert!(max_abs_diff(&a, &b) < tol, "{dims:?} {dtype:?}");
            let (t, all) = (dims[1], dims[2]);
            let p: Vec<Vec<Vec<f64>>> = a.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
            for head in &p {
                for (i, row) in head.iter().enumerate() {
                    let seen = all - t + i + 1;
                    assert!(
                        row[seen..].iter().all(|&v| v == 0.0),
                        "row {i} sees the future"
                    );
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }
}

#[test]
fn its_gradient_equals_the_composed_ones() {
    for (k, dims) in SHAPES.iter().enumerate() {
        let x = Var::from_tensor(&random_tensor(dims, 10 + k as u64, DType::F64)).unwrap();
        // A loss that weighs every output differently.
        let w = random_tensor(dims, 20 + k as u64, DType::F64);
        let grad = |f: fn(&Tensor, f64) -> candle_core::Result<Tensor>| {
            let loss = (f(x.as_tensor(), 0.3).unwrap() * &w)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let (a, b) = (grad(causal_softmax), grad(composed_causal_softmax));
        assert!(
            max_abs_diff(&a, &b) < 1e-12,
            "{dims:?}: {}",
            max_abs_diff(&a, &b)
        );
    }
}

#[test]
fn refuses_what_it_cannot_compute() {
    let wide = random_tensor(&[2, 5, 3], 1, DType::F32);
    assert!(causal_softmax(&wide, 1.0).is_err());
    let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
    assert!(causal_softmax(&ints, 1.0).is_err());
}

#[test]
fn advantages_are_group_normalised_and_flat_groups_carry_nothing() {
    let a = group_advantages(&[1.0, 2.0, 3.0]).unwrap();
    assert!((a[0] + 1.0).abs() < 1e-12 && a[1].abs() < 1e-12 && (a[2] - 1.0).abs() < 1e-12);
    assert!((a.iter().sum::<f64>()).abs() < 1e-12);
    assert!(group_advantages(&[0.5, 0.5, 0.5, 0.5]).is_none());
    assert!(group_advantages(&[1.0]).is_none());
    let a = group_advantages(&[0.0, 10.1, 0.0, 0.0, 0.0]).unwrap();
    assert!(a[1] > 1.5 && a[0] < 0.0);
}

#[test]
fn masked_tokens_get_exactly_no_gradient() {
    let lp = Var::from_tensor(
        &Tensor::new(
            &[-1.0f64, -2.0, -0.5, -3.0, -1.5],
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let old = vec![-1.1f32, -2.0, -0.4, -3.1, -1.5];
    let reference = Some(vec![-1.0f32, -1.9, -0.6, -3.0, -1.4]);
    let params = GrpoParams {
        clip: 0.2,
        kl: 0.01,
    };
    let grad = |mask: Vec<f32>| -> Vec<f64> {
        let b = TokenBatch {
            old: old.clone(),
            reference: reference.clone(),
            mask,
            advantage: 0.7,
        };
        let (loss, _) = grpo_loss(&[lp.as_tensor().clone()], &[b], &params).unwrap();
        loss.backward()
            .unwrap()
            .get(lp.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let masked = grad(vec![1.0, 0.0, 1.0, 0.0, 1.0]);
    let full = grad(vec![1.0; 5]);
    for i in [1, 3] {
        assert_eq!(masked[i], 0.0, "controller/tool token {i}");
        assert_ne!(full[i], 0.0);
    }
    for i in [0, 2, 4] {
        assert_ne!(masked[i], 0.0);
        // Token-mean: the same per-token term, divided by 3 policy tokens instead of 5.
        assert!((masked[i] * 3.0 - full[i] * 5.0).abs() < 1e-9, "{i}");
    }
    // The clipped surrogate: a ratio beyond 1 + ε with a positive advantage has no gradient
    // from the surrogate (token 2: exp(-0.5 + 0.4) ≈ 0.90 is inside; make one outside).
    let lp2 =
        Var::from_tensor(&Tensor::new(&[0.0f64], &candle_core::Device::Cpu).unwrap()).unwrap();
    let b = TokenBatch {
        old: vec![-1.0],
        reference: None,
        mask: vec![1.0],
        advantage: 1.0,
    };
    let (loss, n) = grpo_loss(
        &[lp2.as_tensor().clone()],
        &[b],
        &GrpoParams { clip: 0.2, kl: 0.0 },
    )
    .unwrap();
    assert_eq!(n, 1);
    let g: Vec<f64> = loss
        .backward()
        .unwrap()
        .get(lp2.as_tensor())
        .map(|t| t.to_vec1().unwrap())
        .unwrap_or(vec![0.0]);
    assert_eq!(g[0], 0.0, "clipped");
    assert!((loss.to_scalar::<f64>().unwrap() + 1.2).abs() < 1e-9);
}

/// A toy verifiable task: after the prompt, write the `target` token as often as possible.
/// Reward = its share among 6 sampled tokens. GRPO on LoRA factors of a random tiny model must
/// raise it.
fn toy_step(p: &Policy, opt: &mut AdamW, rng: &mut rand_chacha::ChaCha8Rng, prompt: &[u32]) -> f64 {
    toy_step_for(p, opt, rng, prompt, 5)
}

fn toy_step_for(
    p: &Policy,
    opt: &mut AdamW,
    rng: &mut rand_chacha::ChaCha8Rng,
    prompt: &[u32],
    target: u32,
) -> f64 {
    let g = 8;
    let mut seqs = Vec::new();
    let mut rewards = Vec::new();
    for _ in 0..g {
        let (new, lps) = p.sample(prompt, 6, 1.0, rng).unwrap();
        rewards.push(new.iter().filter(|&&t| t == target).count() as f64 / 6.0);
        seqs.push((new, lps));
    }
    let mean = rewards.iter().sum::<f64>() / g as f64;
    let Some(adv) = group_advantages(&rewards) else {
        return mean;
    };
    let mut news = Vec::new();
    let mut batch = Vec::new();
    for ((new, old), a) in seqs.iter().zip(&adv) {
        let mut toks = prompt.to_vec();
        toks.extend(new);
        news.push(p.token_logprobs(&toks, prompt.len(), &[], true, 8).unwrap());
        batch.push(TokenBatch {
            old: old.clone(),
            reference: None,
            mask: vec![1.0; new.len()],
            advantage: *a as f32,
        });
    }
    let (loss, _) = grpo_loss(&news, &batch, &GrpoParams { clip: 0.2, kl: 0.0 }).unwrap();
    let grads = opt.grads(&loss).unwrap();
    opt.step(&grads).unwrap();
    mean
}

#[test]
fn grpo_learns_a_toy_verifiable_task() {
    let p = Policy::random(tiny_shape(), all_lora(4, 9), DType::F32, 21).unwrap();
    let mut opt = AdamW::new(
        p.params(),
        AdamWParams {
            lr: 0.1,
            max_grad_norm: 1.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let prompt = [1u32, 2, 3];
    // The target: the token the untrained model finds least likely after the prompt.
    let first_logits: Vec<f32> = p
        .logits(&prompt, true)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1()
        .unwrap();
    let target = (0..first_logits.len())
        .min_by(|&a, &b| first_logits[a].total_cmp(&first_logits[b]))
        .unwrap() as u32;
    let rewards: Vec<f64> = (0..40)
        .map(|_| toy_step_for(&p, &mut opt, &mut rng, &prompt, target))
        .collect();
    let first: f64 = rewards[..8].iter().sum::<f64>() / 8.0;
    let last: f64 = rewards[32..].iter().sum::<f64>() / 8.0;
    eprintln!(
        "toy reward {first:.3} → {last:.3} (first steps {:?})",
        &rewards[..3]
    );
    assert!(
        rewards[0] < 0.3,
        "the untrained model rarely writes the target: {rewards:?}"
    );
    assert!(
        last > first + 0.25 && last > 0.8,
        "reward {first:.3} → {last:.3}: {rewards:?}"
    );
}

#[test]
fn a_resumed_run_takes_the_same_next_step() {
    let dir = tempfile_dir();
    let run = |steps: usize, resume_at: Option<usize>| -> Vec<f32> {
        let p = Policy::random(tiny_shape(), all_lora(2, 9), DType::F32, 21).unwrap();
        let mut opt = AdamW::new(
            p.params(),
            AdamWParams {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for s in 0..steps {
            if resume_at == Some(s) {
                // Save, then continue in a fresh policy and optimiser restored from disk.
                p.adapter()
                    .unwrap()
                    .save(&dir.join("adapter.safetensors"))
                    .unwrap();
                opt.save(&dir.join("optim.safetensors")).unwrap();
                let q = Policy::random(tiny_shape(), all_lora(2, 99), DType::F32, 21).unwrap();
                q.load_adapter(
                    &mrrec_llm_local::model::LoraAdapter::load(&dir.join("adapter.safetensors"))
                        .unwrap(),
                )
                .unwrap();
                let mut o2 = AdamW::new(q.params(), opt.params).unwrap();
                o2.load(&dir.join("optim.safetensors")).unwrap();
                assert_eq!(o2.step, s as u64);
                for _ in s..steps {
                    toy_step(&q, &mut o2, &mut rng, &[1, 2, 3]);
                }
                return flat(&q);
            }
            toy_step(&p, &mut opt, &mut rng, &[1, 2, 3]);
        }
        flat(&p)
    };
    let straight = run(6, None);
    let resumed = run(6, Some(3));
    assert_eq!(straight, resumed);
}

fn flat(p: &Policy) -> Vec<f32> {
    p.params()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mrrec-train-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_soft_label_is_learnt_as_the_two_way_cross_entropy_and_is_still_where_the_model_agrees() {
    // q: the model's probability of the learnt token within its pair; p: the label's.
    let case = |q: f64, p: f32, reference: Option<&[f32]>, kl: f64| -> (f64, f64) {
        let lp = Var::from_tensor(&Tensor::new(&[q.ln()], &Device::Cpu).unwrap()).unwrap();
        let loss = soft_label_loss(lp.as_tensor(), p, reference, kl).unwrap();
        let v = loss.to_scalar::<f64>().unwrap();
        let g = loss
            .backward()
            .unwrap()
            .get(lp.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        (v, g)
    };
    for (q, p) in [
        (0.3, 0.3f32),
        (0.3, 0.9),
        (0.8, 0.1),
        (0.5, 1.0),
        (0.5, 0.0),
    ] {
        let (v, g) = case(q, p, None, 0.0);
        let p = p as f64;
        let want = -p * q.ln()
            - if p < 1.0 {
                (1.0 - p) * (1.0 - q).ln()
            } else {
                0.0
            };
        assert!((v - want).abs() < 1e-9, "q {q} p {p}: {v} vs {want}");
        // d/d(log q) of the cross-entropy: q·(1 − p)/(1 − q) − p.
        let dg = q * (1.0 - p) / (1.0 - q) - p;
        assert!((g - dg).abs() < 1e-9, "q {q} p {p}: {g} vs {dg}");
    }
    // Where the model already says what the label says, nothing moves; a higher label pulls up.
    assert!(case(0.25, 0.25, None, 0.0).1.abs() < 1e-12);
    assert!(case(0.3, 0.9, None, 0.0).1 < 0.0 && case(0.8, 0.1, None, 0.0).1 > 0.0);
    // The KL term adds GRPO's estimator; it is zero at the reference.
    let r = [0.3f64.ln() as f32];
    assert!((case(0.3, 0.6, Some(&r), 0.5).0 - case(0.3, 0.6, None, 0.0).0).abs() < 1e-6);
    assert!(case(0.5, 0.6, Some(&r), 0.5).0 > case(0.5, 0.6, None, 0.0).0);
    // Not a probability, or more than one token: refused.
    let lp = Tensor::new(&[-0.1f64, -0.2], &Device::Cpu).unwrap();
    assert!(soft_label_loss(&lp, 0.5, None, 0.0).is_err());
    let lp = Tensor::new(&[-0.1f64], &Device::Cpu).unwrap();
    assert!(soft_label_loss(&lp, 1.5, None, 0.0).is_err());
}

/// The listwise judge loss: KL(softmax(label log-odds) ‖ softmax(judge log-odds)) over a
/// query's items — its value and gradient against the closed form, zero with zero gradient
/// wherever the judge's scores are the labels' shifted by a constant (only the order and
/// spacing within a query are learnt, not the level), a hard list pulls the target up and the
/// others down, and malformed lists are refused.
fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = v.iter().map(|x| (x - m).exp()).sum();
    v.iter().map(|x| (x - m).exp() / z).collect()
}

/// A listwise loss where the judge's log-odds are `s` (each item's log q with q = sigmoid(s)):
/// its value and its gradient with respect to each item's log q.
fn listwise_at(s: &[f64], loss: impl Fn(&[Tensor]) -> Tensor) -> (f64, Vec<f64>) {
    let vars: Vec<Var> = s
        .iter()
        .map(|&x| Var::new(&[sigmoid(x).ln()], &Device::Cpu).unwrap())
        .collect();
    let lps: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let l = loss(&lps);
    let g = l.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0])
        .collect();
    (l.to_scalar::<f64>().unwrap(), grads)
}

/// Where the judge all but surely answers Yes (log-odds 17 to 60: q rounds to 1 in f32, and
/// log(1 − q) computed as such is −∞), both judge losses still see each item's log-odds and
/// keep their gradient: a hard list whose every item is saturated (session 31's run died there,
/// every item scored alike with no gradient) is still ordered.
#[test]
fn judge_losses_keep_their_gradient_where_yes_is_all_but_certain() {
    // log q = −log(1 + e^−s), in f32 as the training graph holds it.
    let lp = |s: f64| -((-s).exp()).ln_1p();
    let s = [20.0f64, 35.0, 60.0];
    let vars: Vec<Var> = s
        .iter()
        .map(|&x| Var::new(&[lp(x) as f32], &Device::Cpu).unwrap())
        .collect();
    assert!(vars.iter().all(|v| v.to_vec1::<f32>().unwrap()[0] < 0.0));
    let lps: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let hard = [1.0f32, 0.0, 0.0];
    let l = mrrec_train::listwise_soft_loss(&lps, &hard, None, 0.0).unwrap();
    let g = l.backward().unwrap();
    let t: Vec<f64> = hard
        .iter()
        .map(|&p| {
            let p = (p as f64).clamp(1e-6, 1.0 - 1e-6);
            (p / (1.0 - p)).ln()
        })
        .collect();
    let (pt, ps) = (softmax(&t), softmax(&s));
    let want: f64 = pt.iter().zip(&ps).map(|(p, q)| p * (p / q).ln()).sum();
    let v = l.to_scalar::<f32>().unwrap() as f64;
    assert!((v - want).abs() < 1e-3 * want.max(1.0), "{v} vs {want}");
    for (i, var) in vars.iter().enumerate() {
        // d/ds_i = d/dlog q_i · (1 − q_i), and 1 − q_i = e^−s_i / (1 + e^−s_i).
        let d_lp = g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let d_s = d_lp * (-s[i]).exp() / (1.0 + (-s[i]).exp());
        let want = ps[i] - pt[i];
        assert!(
            (d_s - want).abs() < 1e-3 * want.abs().max(1e-6),
            "item {i}: {d_s} vs {want}"
        );
    }
    // Descent raises the target (the lowest score) and lowers the others.
    let d: Vec<f32> = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0])
        .collect();
    assert!(d[0] < 0.0 && d[1] > 0.0 && d[2] > 0.0, "{d:?}");
    // The pointwise soft label there: −p log q − (1 − p) log(1 − q), with 1 − q = e^−s / (1 + e^−s).
    let q = Var::new(&[lp(30.0) as f32], &Device::Cpu).unwrap();
    let l = mrrec_train::soft_label_loss(q.as_tensor(), 0.4, None, 0.0).unwrap();
    let want = -0.4 * lp(30.0) - 0.6 * (lp(30.0) - 30.0);
    let v = l.to_scalar::<f32>().unwrap() as f64;
    assert!((v - want).abs() < 1e-3 * want, "{v} vs {want}");
    let d_lp = l
        .backward()
        .unwrap()
        .get(q.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    // d/ds = q − p at the label p.
    let d_s = d_lp * (-30.0f64).exp() / (1.0 + (-30.0f64).exp());
    assert!((d_s - 0.6).abs() < 1e-3, "{d_s}");
}

/// The target mixed into a teacher's list: the loss is KL((1 − α)·softmax(t) + α·e_k ‖
/// softmax(s)) — zero with zero gradient at that mixture, the teacher's loss at α = 0 — and at the
/// teacher's own optimum it raises the target where the teacher ranks another item above it.
#[test]
fn a_listwise_loss_with_the_target_mixed_in_learns_the_mixture_of_teacher_and_target() {
    // The teacher ranks item 1 above the target (item 0).
    let labels = [0.4f32, 0.8, 0.3, 0.1];
    let t: Vec<f64> = labels.iter().map(|&p| logit(p as f64)).collect();
    let pt = softmax(&t);
    let run = |s: &[f64], target: Option<(usize, f64)>| {
        listwise_at(s, |lps| {
            mrrec_train::listwise_mixed_loss(lps, &labels, target, None, 0.0).unwrap()
        })
    };
    let s = vec![0.3, -1.0, 2.0, 0.1];
    // α = 0 (or no target) is the teacher's listwise loss.
    let (plain, plain_g) = run(&s, None);
    let (zero, zero_g) = run(&s, Some((0, 0.0)));
    assert!((plain - zero).abs() < 1e-12);
    assert!(plain_g
        .iter()
        .zip(&zero_g)
        .all(|(a, b)| (a - b).abs() < 1e-12));
    for a in [0.3, 0.5, 1.0] {
        let pi: Vec<f64> = pt
            .iter()
            .enumerate()
            .map(|(i, p)| (1.0 - a) * p + if i == 0 { a } else { 0.0 })
            .collect();
        let (v, g) = run(&s, Some((0, a)));
        let ps = softmax(&s);
        let want: f64 = pi
            .iter()
            .zip(&ps)
            .filter(|(p, _)| **p > 0.0)
            .map(|(p, q)| p * (p / q).ln())
            .sum();
        assert!((v - want).abs() < 1e-9, "α {a}: {v} vs {want}");
        for i in 0..s.len() {
            let want = (ps[i] - pi[i]) / (1.0 - sigmoid(s[i]));
            assert!(
                (g[i] - want).abs() < 1e-6,
                "α {a}, item {i}: {} vs {want}",
                g[i]
            );
        }
        // The mixture itself (any level) is the optimum.
        if a < 1.0 {
            let s_opt: Vec<f64> = pi.iter().map(|p| p.ln() - 1.5).collect();
            let (v, g) = run(&s_opt, Some((0, a)));
            assert!(v.abs() < 1e-9, "α {a}: {v}");
            assert!(g.iter().all(|x| x.abs() < 1e-6), "α {a}: {g:?}");
        }
        // Where the student orders as the teacher does, the target is pushed up, the item the
        // teacher put above it down.
        let (_, g) = run(&t, Some((0, a)));
        assert!(g[0] < 0.0 && g[1] > 0.0, "α {a}: {g:?}");
    }
    // Refused: a target outside the list, a weight outside [0, 1].
    let one = Tensor::new(&[-0.5f64], &Device::Cpu).unwrap();
    let two = [one.clone(), one.clone()];
    assert!(
        mrrec_train::listwise_mixed_loss(&two, &[0.5, 0.5], Some((2, 0.5)), None, 0.0).is_err()
    );
    assert!(
        mrrec_train::listwise_mixed_loss(&two, &[0.5, 0.5], Some((0, 1.5)), None, 0.0).is_err()
    );
    assert!(
        mrrec_train::listwise_mixed_loss(&two, &[0.5, 0.5], Some((0, -0.1)), None, 0.0).is_err()
    );
}

#[test]
fn a_listwise_judge_loss_is_the_kl_of_the_lists_softmaxes_and_ignores_the_level() {
    let labels = [0.7f32, 0.2, 0.45, 0.05];
    let t: Vec<f64> = labels.iter().map(|&p| logit(p as f64)).collect();
    let pt = softmax(&t);
    let run = |s: &[f64]| {
        listwise_at(s, |lps| {
            mrrec_train::listwise_soft_loss(lps, &labels, None, 0.0).unwrap()
        })
    };
    for s in [
        vec![0.3, -1.0, 2.0, 0.1],
        vec![-2.0, -2.5, -1.0, -4.0],
        vec![1.5, 1.5, 1.5, 1.5],
    ] {
        let (v, g) = run(&s);
        let ps = softmax(&s);
        let want: f64 = pt.iter().zip(&ps).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((v - want).abs() < 1e-9, "{v} vs {want}");
        for i in 0..s.len() {
            // d/d log q_i = (softmax(s)_i − P_i) · ds_i/dlog q_i, ds/dlog q = 1 / (1 − q).
            let want = (ps[i] - pt[i]) / (1.0 - sigmoid(s[i]));
            assert!((g[i] - want).abs() < 1e-6, "item {i}: {} vs {want}", g[i]);
        }
    }
    // The labels' own log-odds, shifted: nothing to learn.
    for shift in [0.0, -3.0, 2.5] {
        let s: Vec<f64> = t.iter().map(|x| x + shift).collect();
        let (v, g) = run(&s);
        assert!(v.abs() < 1e-9, "shift {shift}: {v}");
        assert!(g.iter().all(|x| x.abs() < 1e-6), "shift {shift}: {g:?}");
    }
    // A hard list (target first): gradient descent raises the target's score, lowers the rest.
    let hard = [1.0f32, 0.0, 0.0];
    let vars: Vec<Var> = [0.0f64, 0.5, -0.5]
        .iter()
        .map(|&x| Var::new(&[sigmoid(x).ln()], &Device::Cpu).unwrap())
        .collect();
    let lps: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let l = mrrec_train::listwise_soft_loss(&lps, &hard, None, 0.0).unwrap();
    let g = l.backward().unwrap();
    let d: Vec<f64> = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0])
        .collect();
    assert!(d[0] < 0.0 && d[1] > 0.0 && d[2] > 0.0, "{d:?}");
    // With β > 0 and a reference equal to the current values, the KL term adds nothing.
    let refs: Vec<Vec<f32>> = lps
        .iter()
        .map(|t| vec![t.to_vec1::<f64>().unwrap()[0] as f32])
        .collect();
    let with = mrrec_train::listwise_soft_loss(&lps, &hard, Some(&refs), 0.1).unwrap();
    assert!((with.to_scalar::<f64>().unwrap() - l.to_scalar::<f64>().unwrap()).abs() < 1e-6);
    // Refused: one item, a label per item missing, a label outside [0, 1], two tokens.
    let one = Tensor::new(&[-0.5f64], &Device::Cpu).unwrap();
    assert!(
        mrrec_train::listwise_soft_loss(std::slice::from_ref(&one), &[1.0], None, 0.0).is_err()
    );
    assert!(
        mrrec_train::listwise_soft_loss(&[one.clone(), one.clone()], &[1.0], None, 0.0).is_err()
    );
    assert!(
        mrrec_train::listwise_soft_loss(&[one.clone(), one.clone()], &[1.0, 1.5], None, 0.0)
            .is_err()
    );
    let two = Tensor::new(&[-0.5f64, -0.1], &Device::Cpu).unwrap();
    assert!(mrrec_train::listwise_soft_loss(&[one, two], &[1.0, 0.0], None, 0.0).is_err());
}
