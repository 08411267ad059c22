//! One conformance suite for every chat backend: the local model directly, and the same model
//! behind `serve-llm` reached through the OpenAI-compatible client on loopback.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use mrrec_llm::*;
use mrrec_llm_local::*;

fn backends() -> Vec<(&'static str, Arc<dyn ChatModel>)> {
    let local: Arc<dyn ChatModel> =
        Arc::new(LocalModel::from_registry("smollm2-135m-instruct").unwrap());
    let url = mrrec_server::llm::spawn_loopback(local.clone()).unwrap();
    let remote: Arc<dyn ChatModel> =
        Arc::new(OpenAiModel::new(OpenAiConfig::new(&url, "smollm2")).unwrap());
    vec![("local", local), ("openai→serve-llm", remote)]
}

fn ask(text: &str, max_tokens: usize) -> ChatRequest {
    ChatRequest {
        messages: vec![
            Message::system("You are a helpful shopping assistant."),
            Message::user(text),
        ],
        sampling: Sampling {
            max_tokens,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn every_backend_behaves_the_same() {
    let all = backends();
    let mut texts = Vec::new();
    for (name, m) in &all {
        // Greedy answers are deterministic, bounded by max_tokens, and report usage.
        let r = m
            .chat(&ask(
                "Suggest a gift for a toddler who loves bath time.",
                12,
            ))
            .unwrap();
        assert!(!r.text.is_empty(), "{name}");
        assert!(
            r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 12,
            "{name}: {:?}",
            r.usage
        );
        assert!(r.usage.prompt_tokens > 10, "{name}");
        assert_eq!(r.finish_reason, FinishReason::Length, "{name}");
        assert_eq!(
            m.chat(&ask(
                "Suggest a gift for a toddler who loves bath time.",
                12
            ))
            .unwrap()
            .text,
            r.text,
            "{name}"
        );
        texts.push(r.text.clone());
        // Streaming delivers the same text in pieces.
        let mut pieces = String::new();
        let s = m
            .chat_stream(
                &ask("Suggest a gift for a toddler who loves bath time.", 12),
                &mut |t| pieces.push_str(t),
            )
            .unwrap();
        assert_eq!(pieces, s.text, "{name}");
        // Stop strings end generation and are not returned.
        let mut req = ask("List three fruits, one per line.", 40);
        req.sampling.stop = vec!["\n".into()];
        let r = m.chat(&req).unwrap();
        assert!(!r.text.contains('\n'), "{name}: {:?}", r.text);
        // The controller-written prefix is continued, not repeated.
        let mut req = ask("What colour is the sky?", 6);
        req.assistant_prefix = Some("The sky is".into());
        let r = m.chat(&req).unwrap();
        assert!(!r.text.starts_with("The sky is"), "{name}: {:?}", r.text);
        // Sampling with a seed is reproducible.
        let mut req = ask("Name a colour.", 8);
        req.sampling.temperature = 1.0;
        req.sampling.seed = 7;
        assert_eq!(
            m.chat(&req).unwrap().text,
            m.chat(&req).unwrap().text,
            "{name}"
        );
    }
    // Both backends run the same model: the same greedy answer.
    assert_eq!(texts[0], texts[1]);
}

#[test]
fn serve_llm_rejects_bad_requests_clearly() {
    let local: Arc<dyn ChatModel> =
        Arc::new(LocalModel::from_registry("smollm2-135m-instruct").unwrap());
    let url = mrrec_server::llm::spawn_loopback(local).unwrap();
    let client = reqwest::blocking::Client::new();
    let post = |body: &str| {
        let r = client
            .post(format!("{url}/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (s, b) = post("{not json");
    assert_eq!(s, 400);
    assert!(b.contains("body is not JSON"), "{b}");
    let (s, b) = post(r#"{"messages": []}"#);
    assert_eq!(s, 400);
    assert!(b.contains("`messages` is empty"), "{b}");
    let (s, b) = post(r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#);
    assert_eq!(s, 400);
    assert!(b.contains("messages[0].role: unsupported"), "{b}");
    let (s, b) =
        post(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}"#);
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("exceeds the context window"), "{b}");
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(5 << 20)
    );
    let (s, _) = post(&big);
    assert_eq!(s, 413);
}

/// Records how each call ended.
struct Recording {
    inner: EchoModel,
    ends: std::sync::Mutex<Vec<String>>,
}

impl ChatModel for Recording {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> mrrec_llm::Result<ChatResponse> {
        let r = self.inner.chat_stream(req, on_text);
        self.ends.lock().unwrap().push(match &r {
            Ok(_) => "answered".into(),
            Err(e) => e.to_string(),
        });
        r
    }
}

#[test]
fn serve_llm_stops_generating_for_a_client_that_left() {
    let model = Arc::new(Recording {
        inner: EchoModel::from_id("echo@5000").unwrap(),
        ends: Default::default(),
    });
    let url = mrrec_server::llm::spawn_loopback(model.clone()).unwrap();
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    for (n, stream) in [(1, false), (2, true)] {
        let t = std::time::Instant::now();
        let r = client
            .post(format!("{url}/chat/completions"))
            .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}))
            .send()
            .and_then(|r| r.text());
        assert!(r.is_err(), "{r:?}");
        while model.ends.lock().unwrap().len() < n && t.elapsed().as_millis() < 2000 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let ends = model.ends.lock().unwrap().clone();
        assert_eq!(
            ends.len(),
            n,
            "stream {stream}: {ends:?} after {:?}",
            t.elapsed()
        );
        assert_eq!(ends[n - 1], "cancelled");
    }
}
