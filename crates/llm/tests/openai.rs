//! The OpenAI-compatible backend against a scripted server on loopback: success, tool calls,
//! streaming, retries on 5xx, no retry on 4xx, timeouts, garbage.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mrrec_llm::*;

#[derive(Clone)]
enum Reply {
    Http(u16, &'static str, String),
    Hang,
}

/// Serves `replies` in order (the last one repeats); returns the base URL and a request counter.
fn serve(replies: Vec<Reply>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut s) = stream else { continue };
            let n = c.fetch_add(1, Ordering::SeqCst);
            let reply = replies[n.min(replies.len() - 1)].clone();
            // Read the request head and body.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            while let Ok(k) = s.read(&mut chunk) {
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(h) = text.find("\r\n\r\n") {
                    let len = text[..h]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= h + 4 + len {
                        break;
                    }
                }
            }
            match reply {
                Reply::Hang => {
                    std::thread::sleep(Duration::from_secs(3));
                }
                Reply::Http(status, ctype, body) => {
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.write_all(body.as_bytes());
                }
            }
        }
    });
    (format!("http://{addr}/v1"), count)
}

fn model(url: &str, timeout_ms: u64) -> OpenAiModel {
    let mut cfg = OpenAiConfig::new(url, "test-model");
    cfg.timeout = Duration::from_millis(timeout_ms);
    cfg.backoff = Duration::from_millis(10);
    cfg.max_retries = 2;
    OpenAiModel::new(cfg).unwrap()
}

fn req() -> ChatRequest {
    ChatRequest {
        messages: vec![Message::user("hi")],
        ..Default::default()
    }
}

const OK: &str = r#"{"choices": [{"message": {"role": "assistant", "content": "Hello!", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "memory_retrieval_tool", "arguments": "{\"query\": \"fit\"}"}}]}, "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}"#;

#[test]
fn a_json_answer_with_tool_calls() {
    let (url, n) = serve(vec![Reply::Http(200, "application/json", OK.into())]);
    let r = model(&url, 2000).chat(&req()).unwrap();
    assert_eq!(r.text, "Hello!");
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            name: "memory_retrieval_tool".into(),
            arguments: serde_json::json!({"query": "fit"})
        }]
    );
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (12, 3));
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn a_streamed_answer_arrives_in_pieces() {
    let sse = [
        r#"data: {"choices": [{"delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]}"#,
        r#"data: {"choices": [{"delta": {"content": "lo"}, "finish_reason": null}]}"#,
        r#"data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "memory_retrieval_tool", "arguments": "{\"qu"}}]}, "finish_reason": null}]}"#,
        r#"data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ery\": \"size\"}"}}]}, "finish_reason": "tool_calls"}]}"#,
        r#"data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}"#,
        "data: [DONE]",
    ]
    .join("\n\n");
    let (url, _) = serve(vec![Reply::Http(200, "text/event-stream", sse)]);
    let mut pieces = Vec::new();
    let r = model(&url, 2000)
        .chat_stream(&req(), &mut |t| pieces.push(t.to_string()))
        .unwrap();
    assert_eq!(pieces, vec!["Hel", "lo"]);
    assert_eq!(r.text, "Hello");
    assert_eq!(
        r.tool_calls[0].arguments,
        serde_json::json!({"query": "size"})
    );
    assert_eq!(r.usage.completion_tokens, 5);
}

#[test]
fn server_errors_are_retried_then_succeed() {
    let (url, n) = serve(vec![
        Reply::Http(500, "text/plain", "boom".into()),
        Reply::Http(429, "text/plain", "slow down".into()),
        Reply::Http(200, "application/json", OK.into()),
    ]);
    assert_eq!(model(&url, 2000).chat(&req()).unwrap().text, "Hello!");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[test]
fn persistent_server_errors_give_up_with_a_clear_message() {
    let (url, n) = serve(vec![Reply::Http(503, "text/plain", "down".into())]);
    let err = model(&url, 2000).chat(&req()).unwrap_err().to_string();
    assert!(err.contains("HTTP 503 after 2 retries: down"), "{err}");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[test]
fn client_errors_are_not_retried() {
    let (url, n) = serve(vec![Reply::Http(
        401,
        "application/json",
        r#"{"error": "bad key"}"#.into(),
    )]);
    let err = model(&url, 2000).chat(&req()).unwrap_err().to_string();
    assert!(err.ends_with(r#"HTTP 401: {"error": "bad key"}"#), "{err}");
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn a_hanging_server_times_out() {
    let (url, _) = serve(vec![Reply::Hang]);
    let mut cfg = OpenAiConfig::new(&url, "m");
    cfg.timeout = Duration::from_millis(300);
    cfg.max_retries = 0;
    let t = std::time::Instant::now();
    let err = OpenAiModel::new(cfg)
        .unwrap()
        .chat(&req())
        .unwrap_err()
        .to_string();
    assert!(err.contains("timed out"), "{err}");
    // The server never answers: only the client's own timeout ends the call.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[test]
fn garbage_is_a_clear_error() {
    let (url, _) = serve(vec![Reply::Http(
        200,
        "application/json",
        "<html>not json</html>".into(),
    )]);
    let err = model(&url, 2000).chat(&req()).unwrap_err().to_string();
    assert!(err.contains("malformed response: not JSON"), "{err}");
    let (url, _) = serve(vec![Reply::Http(
        200,
        "application/json",
        r#"{"choices": []}"#.into(),
    )]);
    let err = model(&url, 2000).chat(&req()).unwrap_err().to_string();
    assert!(err.contains("malformed response: no choices"), "{err}");
}

#[test]
fn the_request_body_carries_tools_and_the_tool_conversation() {
    let m = model("http://127.0.0.1:9/v1", 100);
    let mut call = Message::assistant("");
    call.tool_calls.push(ToolCall {
        name: "t".into(),
        arguments: serde_json::json!({"q": 1}),
    });
    let r = ChatRequest {
        messages: vec![Message::user("hi"), call, Message::tool("result")],
        tools: vec![ToolSpec {
            name: "t".into(),
            description: "d".into(),
            parameters: serde_json::json!({"type": "object"}),
        }],
        sampling: Sampling {
            stop: vec!["</x>".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let b = m.body(&r, false);
    assert_eq!(b["messages"][1]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        b["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{\"q\":1}"
    );
    assert_eq!(b["messages"][2]["tool_call_id"], "call_1");
    assert_eq!(b["tools"][0]["function"]["name"], "t");
    assert_eq!(b["stop"][0], "</x>");
}

#[test]
fn schema_violations_are_retried_then_reported() {
    let answer = |content: &str| {
        serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string()
    };
    let schema = serde_json::json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]});
    let mut r = req();
    r.constraint = Some(Constraint::JsonSchema(schema));
    let (url, n) = serve(vec![
        Reply::Http(200, "application/json", answer("Sure! Here you go")),
        Reply::Http(200, "application/json", answer("{\"query\": \"fit\"}")),
    ]);
    let out = model(&url, 2000).chat(&r).unwrap();
    assert_eq!(out.text, "{\"query\":\"fit\"}");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    let (url, _) = serve(vec![Reply::Http(
        200,
        "application/json",
        answer("{\"q\": 1}"),
    )]);
    let err = model(&url, 2000).chat(&r).unwrap_err().to_string();
    assert!(
        err.contains("violated the schema 3 times; last: $: missing required `query`"),
        "{err}"
    );
}

/// A server that streams one token every 20 ms for 10 s and reports when its client has gone
/// (a write fails).
fn slow_stream() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let g = gone.clone();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut chunk = [0u8; 8192];
        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        let _ = s.read(&mut chunk);
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        let _ = s.write_all(head.as_bytes());
        for _ in 0..500 {
            let piece = "data: {\"choices\": [{\"delta\": {\"content\": \"word \"}, \"finish_reason\": null}]}\n\n";
            if s.write_all(piece.as_bytes())
                .and_then(|_| s.flush())
                .is_err()
            {
                g.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (format!("http://{addr}/v1"), gone)
}

#[test]
fn a_cancelled_stream_stops_reading_and_closes_the_connection() {
    let (url, gone) = slow_stream();
    let cancel = Cancel::new();
    let r = ChatRequest {
        cancel: Some(cancel.clone()),
        ..req()
    };
    let t = std::time::Instant::now();
    let mut pieces = 0;
    let out = model(&url, 5000).chat_stream(&r, &mut |_| {
        pieces += 1;
        if pieces == 3 {
            cancel.cancel();
        }
    });
    // The event: the stream ended as cancelled after the third piece (uncancelled, it would run
    // 10 s and end Ok); the bound is generous, for a loaded machine.
    assert!(matches!(out, Err(LlmError::Cancelled)), "{out:?}");
    assert_eq!(pieces, 3);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // The server notices: it stops streaming to nobody.
    let t = std::time::Instant::now();
    while !gone.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(9) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone.load(Ordering::SeqCst), "the connection stayed open");
    // Cancelled before it starts: no request at all.
    let (url, n) = serve(vec![Reply::Http(200, "application/json", OK.into())]);
    let out = model(&url, 2000).chat(&r);
    assert!(matches!(out, Err(LlmError::Cancelled)), "{out:?}");
    assert_eq!(n.load(Ordering::SeqCst), 0);
}

#[test]
fn a_server_scores_answers_by_their_first_tokens_log_probabilities() {
    let scored = r#"{"choices": [{"message": {"role": "assistant", "content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": -0.2, "top_logprobs": [{"token": "Yes", "logprob": -0.2}, {"token": " No", "logprob": -1.9}, {"token": "Maybe", "logprob": -3.5}]}]}, "finish_reason": "length"}], "usage": {"prompt_tokens": 40, "completion_tokens": 1}}"#;
    let (url, count) = serve(vec![Reply::Http(200, "application/json", scored.into())]);
    let m = model(&url, 2000);
    let out = m.score_choices(&[req(), req()], &["Yes", "No", "Never"]);
    assert_eq!(count.load(Ordering::SeqCst), 2);
    for s in out {
        let s = s.unwrap();
        // " No" is "No" with a space; "Never" is not listed: the smallest listed value bounds it.
        assert_eq!(s.logprobs, vec![-0.2, -1.9, -3.5]);
        assert_eq!((s.usage.prompt_tokens, s.usage.completion_tokens), (40, 0));
    }
    // A server without log-probabilities cannot score: said, not guessed.
    let (url, _) = serve(vec![Reply::Http(200, "application/json", OK.into())]);
    let e = model(&url, 2000)
        .score_choices(&[req()], &["Yes", "No"])
        .remove(0)
        .unwrap_err();
    assert!(matches!(e, LlmError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("no top_logprobs"), "{e}");
}
