//! `echo`: an instant, deterministic chat model that writes the user's request back in whatever
//! shape is asked for. It measures everything around the LLM (service overhead, memory,
//! ranking, load) without the LLM's cost, and it drives every branch of the assistant's loop:
//! - a constrained request gets the smallest JSON value its schema admits, its strings filled
//!   with the request (so a guided tool call searches the request, and the profile is the
//!   request);
//! - a free-mode turn first calls `memory_retrieval_tool` with the request, and after a tool
//!   response ends with `\boxed{...}`;
//! - anything else gets one short line.
//!
//! `echo@250` waits 250 ms per call (a slow backend for queueing tests).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{ChatModel, ChatRequest, ChatResponse, Constraint, FinishReason, Result, Role, Usage};

/// The instant model (see the module docs).
#[derive(Debug, Clone)]
pub struct EchoModel {
    id: String,
    delay: Duration,
}

impl EchoModel {
    /// Parses `echo` or `echo@MILLISECONDS`; `None` for any other id.
    pub fn from_id(id: &str) -> Option<Self> {
        let rest = id.strip_prefix("echo")?;
        let delay = match rest {
            "" => Duration::ZERO,
            r => Duration::from_millis(r.strip_prefix('@')?.parse().ok()?),
        };
        Some(EchoModel {
            id: id.to_string(),
            delay,
        })
    }
}

/// The request a prompt carries: the text after the last `Request:` of the first user message,
/// or that whole message.
fn request_of(req: &ChatRequest) -> String {
    let first = req
        .messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .unwrap_or("");
    let r = first.rsplit("Request:").next().unwrap_or(first).trim();
    let r: String = r.chars().filter(|c| !c.is_control()).take(400).collect();
    if r.is_empty() {
        "an item".into()
    } else {
        r
    }
}

fn fill(schema: &Value, text: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut o = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    o.insert(k.clone(), fill(s, text));
                }
            }
            Value::Object(o)
        }
        Some("array") => {
            let n = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let item = schema.get("items").cloned().unwrap_or(json!({}));
            Value::Array((0..n).map(|_| fill(&item, text)).collect())
        }
        Some("integer") | Some("number") => {
            json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.0) as i64)
        }
        Some("boolean") => json!(false),
        _ => {
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            let max = schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX) as usize;
            let mut s: String = text.chars().take(max).collect();
            while s.chars().count() < min {
                s.push('.');
            }
            json!(s)
        }
    }
}

impl ChatModel for EchoModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatResponse> {
        let t = Instant::now();
        // Waits in short slices, giving up as soon as the request is cancelled.
        while t.elapsed() < self.delay {
            crate::cancel::check(req.cancel.as_ref())?;
            std::thread::sleep((self.delay - t.elapsed()).min(Duration::from_millis(10)));
        }
        crate::cancel::check(req.cancel.as_ref())?;
        let request = request_of(req);
        let after_tool = req
            .messages
            .last()
            .is_some_and(|m| m.content.trim_start().starts_with("<tool_response>"));
        let text = match &req.constraint {
            Some(Constraint::JsonSchema(s)) => fill(s, &request).to_string(),
            Some(_) => request.clone(),
            None if req.assistant_prefix.is_some() => format!("the request: {request}"),
            None if after_tool
                || !req
                    .messages
                    .iter()
                    .any(|m| m.role == Role::System && m.content.contains("<tool_call>")) =>
            {
                format!(
                    "\\boxed{{{}}}",
                    json!({"ideal_item_profile": request, "useful_memory_ids": []})
                        .to_string()
                        .trim_start_matches('{')
                        .trim_end_matches('}')
                )
            }
            None => format!(
                "I look up what the user likes. <tool_call>{}",
                json!({"name": "memory_retrieval_tool", "arguments": {"query": request}})
            ),
        };
        for piece in text.split_inclusive(' ') {
            on_text(piece);
        }
        let prompt: usize = req.messages.iter().map(|m| m.content.len()).sum::<usize>()
            + req.assistant_prefix.as_deref().map_or(0, str::len);
        Ok(ChatResponse {
            usage: Usage {
                prompt_tokens: prompt.div_ceil(4) as u64,
                completion_tokens: text.len().div_ceil(4) as u64,
                seconds: t.elapsed().as_secs_f64(),
            },
            text,
            tool_calls: vec![],
            finish_reason: FinishReason::Stop,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Message;

    #[test]
    fn ids_parse() {
        assert!(EchoModel::from_id("echo").is_some());
        assert_eq!(
            EchoModel::from_id("echo@25").unwrap().delay,
            Duration::from_millis(25)
        );
        assert!(EchoModel::from_id("echo@x").is_none());
        assert!(EchoModel::from_id("qwen").is_none());
        assert!(EchoModel::from_id("echoes").is_none());
    }

    #[test]
    fn constrained_answers_validate() {
        let m = EchoModel::from_id("echo").unwrap();
        let schema = json!({"type": "object", "properties": {
            "ideal_item_profile": {"type": "string", "minLength": 20, "maxLength": 200},
            "useful_memory_ids": {"type": "array", "items": {"type": "string", "enum": ["r-1"]}, "maxItems": 5}},
            "required": ["ideal_item_profile", "useful_memory_ids"], "additionalProperties": false});
        let req = ChatRequest {
            messages: vec![Message::user("Store section: Toys\nRequest: a red kite")],
            constraint: Some(Constraint::JsonSchema(schema.clone())),
            ..Default::default()
        };
        let r = m.chat(&req).unwrap();
        let v: Value = serde_json::from_str(&r.text).unwrap();
        crate::validate(&schema, &v, "").unwrap();
        assert!(v["ideal_item_profile"]
            .as_str()
            .unwrap()
            .starts_with("a red kite"));
    }
}
