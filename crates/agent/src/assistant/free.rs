//! The free loop (the paper's protocol): the model reasons, calls the memory tool as it sees
//! fit, and ends with a boxed final object; malformed output gets one repair.

use crate::error::Result;
use mrrec_llm::{ChatRequest, Message, Sampling};

use super::*;
use crate::prompts::assistant::*;

impl Assistant<'_> {
    pub(super) fn free(
        &self,
        user: &str,
        request: &str,
        category: Option<&str>,
        trace: &mut Trace,
    ) -> Result<Option<(String, Vec<String>)>> {
        let with_tool = !self.cfg.levels.is_empty();
        let mut messages = vec![
            Message::system(system_prompt(Mode::Free, with_tool)),
            Message::user(user_prompt(request, category, &trace.global_aspects)),
        ];
        trace.memory_tokens += trace
            .global_aspects
            .iter()
            .map(|(_, t)| estimate_tokens(t))
            .sum::<u64>();
        let sampling = Sampling {
            max_tokens: self.cfg.reasoning_tokens + self.cfg.answer_tokens,
            stop: vec!["</tool_call>".into()],
            ..Default::default()
        };
        let mut calls = 0;
        loop {
            let req = ChatRequest {
                messages: messages.clone(),
                sampling: sampling.clone(),
                ..Default::default()
            };
            let text = self.chat(&req, trace)?;
            if let Some(v) = mrrec_llm::parse::boxed_json(&text) {
                if let Some(out) = read_final(&v) {
                    trace.reasoning.push(text);
                    return Ok(Some(out));
                }
            }
            let parsed = mrrec_llm::parse::tool_calls(&text);
            let wants_tool = !parsed.calls.is_empty() || !parsed.errors.is_empty();
            if wants_tool && with_tool && calls < self.cfg.max_calls {
                let before = text.split("<tool_call>").next().unwrap_or("").trim();
                if !before.is_empty() {
                    trace.reasoning.push(before.to_string());
                }
                let mut responses = Vec::new();
                for c in parsed.calls.iter().take(self.cfg.max_calls - calls) {
                    calls += 1;
                    let call = if c.name == MEMORY_TOOL {
                        self.retrieve(user, &c.arguments, trace)?
                    } else {
                        ToolCallTrace {
                            error: Some(format!("unknown tool {:?}", c.name)),
                            ..Default::default()
                        }
                    };
                    let resp = Self::tool_response(&call);
                    trace.memory_tokens += estimate_tokens(&resp);
                    responses.push(resp);
                    self.push_call(trace, call);
                }
                for e in &parsed.errors {
                    calls += 1;
                    let call = ToolCallTrace {
                        error: Some(e.clone()),
                        ..Default::default()
                    };
                    responses.push(Self::tool_response(&call));
                    self.push_call(trace, call);
                }
                let mut said = text.clone();
                if !said.contains("</tool_call>") {
                    said.push_str("</tool_call>");
                }
                messages.push(Message::assistant(said));
                messages.push(Message::user(responses.join("\n")));
                continue;
            }
            // No (more) tools and no final object: one repair attempt.
            trace.reasoning.push(text.clone());
            messages.push(Message::assistant(text));
            messages.push(Message::user(
                "Now give your final answer only, as \\boxed{\"ideal_item_profile\": \"...\", \"useful_memory_ids\": [...]}.",
            ));
            trace.repairs += 1;
            let req = ChatRequest {
                messages,
                sampling: Sampling {
                    max_tokens: self.cfg.answer_tokens,
                    ..Default::default()
                },
                ..Default::default()
            };
            let text = self.chat(&req, trace)?;
            return Ok(mrrec_llm::parse::boxed_json(&text)
                .or_else(|| mrrec_llm::parse::parse_json_lenient(&text))
                .as_ref()
                .and_then(read_final));
        }
    }
}
