//! Any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, OpenAI): timeouts,
//! retries with backoff on 429/5xx, clear errors for 4xx and malformed answers, streaming.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{
    ChatModel, ChatRequest, ChatResponse, FinishReason, LlmError, Result, Role, ToolCall, Usage,
};

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL up to `/v1` (e.g. `http://127.0.0.1:8000/v1`).
    pub base_url: String,
    /// Model name the server knows.
    pub model: String,
    /// Bearer token, if the server needs one.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries after a 429, a 5xx or a transport failure.
    pub max_retries: u32,
    /// First backoff; doubles each retry.
    pub backoff: Duration,
    /// Requests in flight at once in `chat_batch`.
    pub concurrency: usize,
}

impl OpenAiConfig {
    /// Defaults for a server and model.
    pub fn new(base_url: &str, model: &str) -> Self {
        OpenAiConfig {
            base_url: base_url.to_string(),
            model: model.to_string(),
            api_key: None,
            timeout: Duration::from_secs(120),
            max_retries: 3,
            backoff: Duration::from_millis(500),
            concurrency: 8,
        }
    }
}

/// Whether `e` or any error under it is a timeout (reqwest reports a body read that timed out
/// as a decoding error wrapping the timeout).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if x.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_timeout())
            || x.downcast_ref::<std::io::Error>()
                .is_some_and(|i| i.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        // An io::Error's `source` skips the error it wraps: look inside it first.
        cur = match x.downcast_ref::<std::io::Error>().and_then(|i| i.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => x.source(),
        };
    }
    false
}

/// A chat model behind an OpenAI-compatible HTTP API.
pub struct OpenAiModel {
    cfg: OpenAiConfig,
    client: Option<reqwest::blocking::Client>,
    id: String,
}

impl Drop for OpenAiModel {
    /// The blocking client owns a runtime, which may not be dropped inside an async context
    /// (a server shutting down): there, it is dropped on a thread of its own.
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(c));
            }
        }
    }
}

impl OpenAiModel {
    /// A client for `cfg`.
    pub fn new(cfg: OpenAiConfig) -> Result<Self> {
        let client = reqwest::blocking::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(10).min(cfg.timeout))
            .build()
            .map_err(|e| LlmError::Transport {
                url: cfg.base_url.clone(),
                message: e.to_string(),
            })?;
        let id = format!("openai:{}@{}", cfg.model, cfg.base_url);
        Ok(OpenAiModel {
            cfg,
            client: Some(client),
            id,
        })
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.cfg.base_url.trim_end_matches('/')
        )
    }

    /// The request body for `req`.
    pub fn body(&self, req: &ChatRequest, stream: bool) -> Value {
        let mut msgs = Vec::new();
        let mut call_no = 0usize;
        let mut pending: Vec<String> = Vec::new();
        for m in &req.messages {
            match m.role {
                Role::Assistant if !m.tool_calls.is_empty() => {
                    let calls: Vec<Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            call_no += 1;
                            let id = format!("call_{call_no}");
                            pending.push(id.clone());
                            json!({"id": id, "type": "function", "function": {"name": c.name,
                                "arguments": serde_json::to_string(&c.arguments).unwrap_or_default()}})
                        })
                        .collect();
                    msgs.push(
                        json!({"role": "assistant", "content": m.content, "tool_calls": calls}),
                    );
                }
                Role::Tool => {
                    let id = if pending.is_empty() {
                        format!("call_{call_no}")
                    } else {
                        pending.remove(0)
                    };
                    msgs.push(json!({"role": "tool", "content": m.content, "tool_call_id": id}));
                }
                r => msgs.push(json!({"role": r, "content": m.content})),
            }
        }
        let s = &req.sampling;
        let mut body = json!({
            "model": self.cfg.model, "messages": msgs, "temperature": s.temperature, "top_p": s.top_p,
            "max_tokens": s.max_tokens, "seed": s.seed, "stream": stream,
        });
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        if s.repetition_penalty != 1.0 {
            body["repetition_penalty"] = json!(s.repetition_penalty);
        }
        if !req.tools.is_empty() {
            body["tools"] = req.tools.iter().map(|t| t.to_openai()).collect();
        }
        match &req.constraint {
            Some(crate::Constraint::JsonSchema(schema)) => {
                body["response_format"] = json!({"type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": true}});
                body["guided_json"] = schema.clone();
            }
            Some(crate::Constraint::Regex(r)) => body["guided_regex"] = json!(r),
            Some(crate::Constraint::Lark(g)) => body["guided_grammar"] = json!(g),
            None => {}
        }
        if let Some(prefix) = &req.assistant_prefix {
            if let Some(arr) = body["messages"].as_array_mut() {
                arr.push(json!({"role": "assistant", "content": prefix}));
            }
            body["continue_final_message"] = json!(true);
            body["add_generation_prompt"] = json!(false);
        }
        body
    }

    fn send(
        &self,
        body: &Value,
        cancel: Option<&crate::Cancel>,
    ) -> Result<reqwest::blocking::Response> {
        let url = self.url();
        let Some(client) = &self.client else {
            return Err(LlmError::Transport {
                url,
                message: "the client was dropped".into(),
            });
        };
        let mut attempt = 0;
        loop {
            crate::cancel::check(cancel)?;
            let mut rb = client.post(&url).json(body);
            if let Some(k) = &self.cfg.api_key {
                rb = rb.bearer_auth(k);
            }
            let retryable = match rb.send() {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text: String = resp.text().unwrap_or_default().chars().take(2000).collect();
                    if status == 429 || status >= 500 {
                        LlmError::Http {
                            url: url.clone(),
                            status,
                            body: text,
                        }
                    } else {
                        return Err(LlmError::Http {
                            url,
                            status,
                            body: text,
                        });
                    }
                }
                Err(e) => LlmError::Transport {
                    url: url.clone(),
                    message: if e.is_timeout() {
                        format!("timed out after {:?}", self.cfg.timeout)
                    } else {
                        e.to_string()
                    },
                },
            };
            if attempt >= self.cfg.max_retries {
                return Err(match retryable {
                    LlmError::Http { url, status, body } => LlmError::Transport {
                        url,
                        message: format!(
                            "HTTP {status} after {} retries: {body}",
                            self.cfg.max_retries
                        ),
                    },
                    LlmError::Transport { url, message } => LlmError::Transport {
                        url,
                        message: format!("{message} (after {} retries)", self.cfg.max_retries),
                    },
                    other => other,
                });
            }
            std::thread::sleep(self.cfg.backoff * 2u32.pow(attempt));
            attempt += 1;
        }
    }

    /// Reading `what` failed: a timeout says how long it waited.
    fn read_failed(&self, e: &(dyn std::error::Error + 'static), what: &str) -> LlmError {
        LlmError::Transport {
            url: self.url(),
            message: if timed_out(e) {
                format!("timed out after {:?} reading {what}", self.cfg.timeout)
            } else {
                e.to_string()
            },
        }
    }

    /// A non-streamed answer's body as JSON (a timeout while reading it, or a body that is not
    /// JSON, is said with the URL).
    fn json_answer(&self, resp: reqwest::blocking::Response) -> Result<Value> {
        let body = resp
            .text()
            .map_err(|e| self.read_failed(&e, "the answer"))?;
        serde_json::from_str(&body).map_err(|e| {
            self.bad(format!(
                "not JSON ({e}): {}",
                body.chars().take(200).collect::<String>()
            ))
        })
    }

    fn bad(&self, message: impl Into<String>) -> LlmError {
        LlmError::BadResponse {
            url: self.url(),
            message: message.into(),
        }
    }
}

fn finish(v: &Value) -> FinishReason {
    match v.as_str() {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

fn calls_from(v: &Value) -> Vec<ToolCall> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    let f = c.get("function")?;
                    let name = f.get("name")?.as_str()?.to_string();
                    let arguments = match f.get("arguments") {
                        Some(Value::String(s)) => {
                            crate::parse::parse_json_lenient(s).unwrap_or(Value::String(s.clone()))
                        }
                        Some(o) => o.clone(),
                        None => json!({}),
                    };
                    Some(ToolCall { name, arguments })
                })
                .collect()
        })
        .unwrap_or_default()
}

impl ChatModel for OpenAiModel {
    fn id(&self) -> &str {
        &self.id
    }

    /// `GET {base}/models` within a few seconds: reachable and not failing (a 5xx or no
    /// answer is not ready; a 4xx — a server without that route, a key it does not list
    /// models for — still answers, so it is).
    fn ready(&self) -> Result<()> {
        let url = format!("{}/models", self.cfg.base_url.trim_end_matches('/'));
        let Some(client) = &self.client else {
            return Err(LlmError::Transport {
                url,
                message: "the client was dropped".into(),
            });
        };
        let mut rb = client
            .get(&url)
            .timeout(Duration::from_secs(3).min(self.cfg.timeout));
        if let Some(k) = &self.cfg.api_key {
            rb = rb.bearer_auth(k);
        }
        match rb.send() {
            Ok(r) if r.status().is_server_error() => Err(LlmError::Http {
                url,
                status: r.status().as_u16(),
                body: String::new(),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(LlmError::Transport {
                url,
                message: if e.is_timeout() {
                    "timed out".into()
                } else {
                    "unreachable".into()
                },
            }),
        }
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatResponse> {
        let Some(crate::Constraint::JsonSchema(schema)) = &req.constraint else {
            return self.chat_once(req, on_text);
        };
        // Servers may ignore the schema: validate, and retry with another seed.
        let mut last = String::new();
        for attempt in 0..=self.cfg.max_retries {
            let mut r = req.clone();
            r.sampling.seed = req.sampling.seed.wrapping_add(attempt as u64);
            let resp = self.chat_once(&r, &mut |_| {})?;
            let parsed = crate::parse::parse_json_lenient(&resp.text)
                .ok_or_else(|| {
                    format!(
                        "not JSON: {}",
                        resp.text.chars().take(200).collect::<String>()
                    )
                })
                .and_then(|v| crate::validate(schema, &v, "").map(|_| v));
            match parsed {
                Ok(v) => {
                    let text = v.to_string();
                    on_text(&text);
                    return Ok(ChatResponse { text, ..resp });
                }
                Err(e) => last = e,
            }
        }
        Err(LlmError::Constraint(format!(
            "the server's output violated the schema {} times; last: {last}",
            self.cfg.max_retries + 1
        )))
    }

    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        self.chat_batch_impl(reqs)
    }

    /// One completion of one token per request with `logprobs` and `top_logprobs: 20` (vLLM,
    /// SGLang, llama.cpp's server and OpenAI answer them): a choice's log-probability is that of
    /// the listed first token equal to it (surrounding spaces ignored); a choice not among the
    /// 20 gets the smallest listed one (an upper bound). A server that returns no log-probabilities
    /// is [`LlmError::Unsupported`].
    fn score_choices(
        &self,
        reqs: &[ChatRequest],
        choices: &[&str],
    ) -> Vec<Result<crate::ChoiceScores>> {
        reqs.iter().map(|r| self.score_one(r, choices)).collect()
    }
}

impl OpenAiModel {
    fn score_one(&self, req: &ChatRequest, choices: &[&str]) -> Result<crate::ChoiceScores> {
        let t0 = Instant::now();
        let mut body = self.body(req, false);
        body["max_tokens"] = json!(1);
        body["temperature"] = json!(0.0);
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(20);
        let v = self.json_answer(self.send(&body, req.cancel.as_ref())?)?;
        let top = v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                LlmError::Unsupported(format!(
                    "{}: the server returned no top_logprobs for the answer's first token, so it cannot score answers",
                    self.url()
                ))
            })?;
        let listed: Vec<(&str, f32)> = top
            .iter()
            .filter_map(|t| Some((t["token"].as_str()?, t["logprob"].as_f64()? as f32)))
            .collect();
        let floor = listed.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
        if listed.is_empty() {
            return Err(self.bad("top_logprobs without tokens and log-probabilities"));
        }
        let logprobs = choices
            .iter()
            .map(|c| {
                listed
                    .iter()
                    .find(|(t, _)| t.trim() == c.trim())
                    .map_or(floor, |x| x.1)
            })
            .collect();
        Ok(crate::ChoiceScores {
            logprobs,
            usage: Usage {
                prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens: 0,
                seconds: t0.elapsed().as_secs_f64(),
            },
        })
    }
}

impl OpenAiModel {
    fn chat_once(&self, req: &ChatRequest, on_text: &mut dyn FnMut(&str)) -> Result<ChatResponse> {
        let t0 = Instant::now();
        let resp = self.send(&self.body(req, true), req.cancel.as_ref())?;
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        let mut reason = FinishReason::Stop;
        let mut usage = Usage::default();
        if is_sse {
            // Tool-call deltas arrive in pieces: index → (name, argument text).
            let mut partial: Vec<(String, String)> = Vec::new();
            for line in BufReader::new(resp).lines() {
                // Dropping the response closes the connection: the server stops generating.
                crate::cancel::check(req.cancel.as_ref())?;
                let line = line.map_err(|e| self.read_failed(&e, "the stream"))?;
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    break;
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| self.bad(format!("stream chunk is not JSON ({e}): {data}")))?;
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    usage.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    usage.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                }
                let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
                    continue;
                };
                if let Some(piece) = choice["delta"]["content"].as_str() {
                    on_text(piece);
                    text.push_str(piece);
                }
                if let Some(tcs) = choice["delta"]["tool_calls"].as_array() {
                    for tc in tcs {
                        let i = tc["index"].as_u64().unwrap_or(0) as usize;
                        while partial.len() <= i {
                            partial.push((String::new(), String::new()));
                        }
                        if let Some(n) = tc["function"]["name"].as_str() {
                            partial[i].0.push_str(n);
                        }
                        if let Some(a) = tc["function"]["arguments"].as_str() {
                            partial[i].1.push_str(a);
                        }
                    }
                }
                if !choice["finish_reason"].is_null() {
                    reason = finish(&choice["finish_reason"]);
                }
            }
            for (name, args) in partial {
                tool_calls.push(ToolCall {
                    name,
                    arguments: crate::parse::parse_json_lenient(&args).unwrap_or(json!({})),
                });
            }
        } else {
            let v = self.json_answer(resp)?;
            let choice = v
                .get("choices")
                .and_then(|c| c.get(0))
                .ok_or_else(|| self.bad("no choices"))?;
            let msg = choice
                .get("message")
                .ok_or_else(|| self.bad("choice without a message"))?;
            text = msg["content"].as_str().unwrap_or("").to_string();
            on_text(&text);
            tool_calls = calls_from(&msg["tool_calls"]);
            reason = finish(&choice["finish_reason"]);
            usage.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            usage.completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        }
        if tool_calls.is_empty() {
            let full = format!("{}{}", req.assistant_prefix.as_deref().unwrap_or(""), text);
            tool_calls = crate::parse::tool_calls(&full).calls;
        }
        usage.seconds = t0.elapsed().as_secs_f64();
        Ok(ChatResponse {
            text,
            tool_calls,
            finish_reason: reason,
            usage,
        })
    }
}

impl OpenAiModel {
    fn chat_batch_impl(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(self.cfg.concurrency.max(1)) {
            let results: Vec<Result<ChatResponse>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|r| s.spawn(move || self.chat(r)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(LlmError::Transport {
                                url: self.url(),
                                message: "worker panicked".into(),
                            })
                        })
                    })
                    .collect()
            });
            out.extend(results);
        }
        out
    }
}
