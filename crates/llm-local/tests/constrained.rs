//! Constrained decoding with the real tiny model: outputs always parse and validate.

#![allow(clippy::unwrap_used)]

use mrrec_llm::*;
use mrrec_llm_local::*;
use serde_json::{json, Value};

fn model() -> LocalModel {
    LocalModel::from_registry("smollm2-135m-instruct").unwrap()
}

fn req(prompt: &str, c: Constraint, seed: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::system("Answer in JSON."), Message::user(prompt)],
        sampling: Sampling {
            temperature: 1.0,
            max_tokens: 160,
            seed,
            ..Default::default()
        },
        constraint: Some(c),
        ..Default::default()
    }
}

#[test]
fn the_final_answer_object_always_validates_and_cites_only_given_ids() {
    let m = model();
    let ids = ["u1-p-1", "u1-r-7", "u1-u-0"];
    let schema = json!({
        "type": "object",
        "properties": {
            "ideal_item_profile": {"type": "string", "minLength": 1, "maxLength": 120},
            "useful_memory_ids": {"type": "array", "items": {"type": "string", "enum": ids}, "maxItems": 3}
        },
        "required": ["ideal_item_profile", "useful_memory_ids"],
        "additionalProperties": false
    });
    for seed in 0..2 {
        let r = m
            .chat(&req(
                "Describe the ideal pillow for a CPAP user.",
                Constraint::JsonSchema(schema.clone()),
                seed,
            ))
            .unwrap();
        let v: Value = serde_json::from_str(&r.text)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", r.text));
        let profile = v["ideal_item_profile"].as_str().unwrap();
        assert!(!profile.is_empty() && profile.chars().count() <= 120);
        for id in v["useful_memory_ids"].as_array().unwrap() {
            assert!(ids.contains(&id.as_str().unwrap()), "seed {seed}: {v}");
        }
        assert_eq!(v.as_object().unwrap().len(), 2);
    }
}

#[test]
fn tool_arguments_and_regexes_are_respected() {
    let m = model();
    let schema = json!({"type": "object", "properties": {"query": {"type": "string", "minLength": 3, "maxLength": 60}},
        "required": ["query"], "additionalProperties": false});
    let r = m
        .chat(&req(
            "What should I search the user's memory for?",
            Constraint::JsonSchema(schema),
            1,
        ))
        .unwrap();
    let v: Value = serde_json::from_str(&r.text).unwrap();
    assert!(v["query"].as_str().unwrap().len() >= 3);
    for seed in 0..3 {
        let r = m
            .chat(&req(
                "Is the sky blue?",
                Constraint::Regex("(yes|no)".into()),
                seed,
            ))
            .unwrap();
        assert!(r.text == "yes" || r.text == "no", "{:?}", r.text);
    }
}

#[test]
fn a_constraint_that_admits_nothing_is_a_clear_error() {
    let m = model();
    let err = m
        .chat(&req(
            "x",
            Constraint::JsonSchema(json!({"type": "string", "enum": []})),
            0,
        ))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("constraint: "), "{err}");
    let err = m
        .chat(&req("x", Constraint::Regex("(unclosed".into()), 0))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("constraint: invalid constraint"), "{err}");
}

#[test]
fn constrained_logprobs_are_renormalised_over_allowed_tokens() {
    let m = model();
    let prompt = m
        .info()
        .encode("<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let s = Sampling {
        temperature: 1.0,
        max_tokens: 8,
        seed: 5,
        ..Default::default()
    };
    let free = m.generate(&prompt, &s, &mut |_| {}).unwrap();
    let c = Constraint::Regex("(yes|no)".into());
    let g = m
        .generate_constrained(&prompt, &s, Some(&c), &mut |_| {})
        .unwrap();
    assert!(g.text == "yes" || g.text == "no");
    // Renormalised over a handful of allowed tokens, each step is at least as likely as unconstrained.
    let unconstrained = m.score_continuation(&prompt, &g.ids).unwrap();
    for (c, u) in g.logprobs.iter().zip(&unconstrained) {
        assert!(*c >= *u - 1e-4, "{c} < {u}");
        assert!(*c <= 0.0);
    }
    assert!(!free.ids.is_empty());
}

/// What fine-tuning replays: the allowed sets of a constrained call's ids, computed again from
/// its constraint, are exactly those decoding recorded while it sampled them — the end-of-turn
/// token included — and ids the constraint never allowed are refused, naming the position.
#[test]
fn replayed_constraint_masks_equal_the_sampled_ones() {
    let m = model();
    let c = Constraint::JsonSchema(json!({
        "type": "object",
        "properties": {
            "ideal_item_profile": {"type": "string", "minLength": 5, "maxLength": 60},
            "useful_memory_ids": {"type": "array", "items": {"type": "string", "enum": ["u1-p-1"]}, "maxItems": 1}
        },
        "required": ["ideal_item_profile", "useful_memory_ids"],
        "additionalProperties": false
    }));
    let mut checked = 0;
    for seed in 0..3 {
        let (resp, seg) = m
            .chat_segment(&req("Describe a warm scarf.", c.clone(), seed), &mut |_| {})
            .unwrap();
        if resp.finish_reason != FinishReason::Stop {
            continue;
        }
        let replayed = m.constraint_masks(&c, &seg.ids).unwrap();
        assert_eq!(replayed.len(), seg.ids.len());
        for (i, (r, s)) in replayed.iter().zip(&seg.masks).enumerate() {
            assert_eq!(Some(r), s.as_ref(), "token {i} of {}", seg.ids.len());
            assert!(r.contains(seg.ids[i]));
        }
        // Forced structure: the first token's set is small, the profile's text nearly free.
        assert!(replayed[0].count() < 100, "{}", replayed[0].count());
        checked += 1;
    }
    assert!(checked > 0, "no sample ended by itself");
    let not_json = m.info().encode("hello").unwrap();
    let e = m.constraint_masks(&c, &not_json).err().unwrap().to_string();
    assert!(
        e.contains("token 0 of") && e.contains("not one the constraint allows"),
        "{e}"
    );
}
