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

/// A guided answer written as the paper's free loop, for distilling the controller into the
/// model: the controller's openings become the model's own text. The turns are the free loop's
/// system and user prompts; per memory call an assistant turn (the reasoning line before the
/// first) ending in `<tool_call>…</tool_call>` with the arguments the model wrote, answered by the
/// tool's response as the next user turn (what [`Assistant::free`] sends back); then the final
/// `\boxed{…}` with the profile that was ranked and the ids it cited. `None` when the answer has
/// nothing to learn from: it fell back to the request, or a call's arguments did not parse.
pub fn free_conversation(trace: &Trace) -> Option<Vec<Message>> {
    let profile = trace.rewarded_profile()?;
    if trace.tool_calls.iter().any(|c| !c.ok || c.error.is_some()) {
        return None;
    }
    let with_tool = !trace.tool_calls.is_empty();
    let mut messages = vec![
        Message::system(system_prompt(Mode::Free, with_tool)),
        Message::user(user_prompt(
            &trace.request,
            trace.category.as_deref(),
            &trace.global_aspects,
        )),
    ];
    let think = if with_tool {
        super::guided::THINK_MEMORY
    } else {
        super::guided::THINK_PLAIN
    };
    let mut said = trace
        .reasoning
        .first()
        .filter(|r| !r.is_empty())
        .map(|r| format!("{think}{r}"))
        .unwrap_or_default();
    for call in &trace.tool_calls {
        said.push_str(&format!(
            "{}{{\"query\": {}, \"aspects\": {}}}}}\n</tool_call>",
            super::guided::TOOL_OPEN,
            json_text(&call.query),
            json_text(&call.aspects)
        ));
        messages.push(Message::assistant(said.trim_start().to_string()));
        messages.push(Message::user(Assistant::tool_response(call)));
        said = String::new();
    }
    // The final object; a memory-free repair's answer cites nothing.
    let cited: Vec<&String> = trace.cited.iter().collect();
    if !said.is_empty() {
        said.push('\n');
    }
    said.push_str(&format!(
        "\\boxed{{\"ideal_item_profile\": {}, \"useful_memory_ids\": {}}}",
        json_text(&profile),
        json_text(&cited)
    ));
    messages.push(Message::assistant(said));
    Some(messages)
}

/// JSON text of a value (a string's quotes and escapes, a list's brackets).
fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mrrec_llm::Role;

    fn guided_trace() -> Trace {
        Trace {
            mode: Some(Mode::Guided),
            request: "a \"quiet\" hair dryer".into(),
            category: Some("All_Beauty".into()),
            global_aspects: vec![("ga1".into(), "Low noise".into())],
            reasoning: vec!["the user likes light tools".into()],
            tool_calls: vec![ToolCallTrace {
                query: "hair dryer".into(),
                aspects: vec!["Low noise".into()],
                results: vec![(
                    "m7".into(),
                    Level::Record,
                    0.9,
                    "Bought a travel dryer, loved it".into(),
                )],
                ok: true,
                error: None,
            }],
            profile: Some("Quiet lightweight ionic hair dryer with \"cool shot\"".into()),
            cited: vec!["m7".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_guided_answer_reads_back_through_the_free_loops_own_parsers() {
        let m = free_conversation(&guided_trace()).unwrap();
        let roles: Vec<Role> = m.iter().map(|x| x.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant
            ]
        );
        assert_eq!(m[0].content, system_prompt(Mode::Free, true));
        assert!(m[1].content.contains("Low noise") && m[1].content.contains("Request: a"));
        // The first turn: the reasoning, then one call the free loop parses as the model's.
        assert!(m[2].content.starts_with(
            "Which of the user's preferences matter here: the user likes light tools\n<tool_call>"
        ));
        assert!(m[2].content.ends_with("</tool_call>"));
        let calls = mrrec_llm::parse::tool_calls(&m[2].content);
        assert!(calls.errors.is_empty(), "{:?}", calls.errors);
        assert_eq!(calls.calls.len(), 1);
        assert_eq!(calls.calls[0].name, MEMORY_TOOL);
        assert_eq!(calls.calls[0].arguments["query"], "hair dryer");
        assert_eq!(calls.calls[0].arguments["aspects"][0], "Low noise");
        // The tool's answer is what the free loop sends back.
        assert_eq!(
            m[3].content,
            Assistant::tool_response(&guided_trace().tool_calls[0])
        );
        // The final turn parses to the ranked profile and the cited ids, quotes and all.
        let v = mrrec_llm::parse::boxed_json(&m[4].content).unwrap();
        let (profile, ids) = read_final(&v).unwrap();
        assert_eq!(Some(profile), guided_trace().profile);
        assert_eq!(ids, ["m7"]);
    }

    #[test]
    fn nothing_to_learn_from_a_fallback_or_a_broken_call() {
        let mut t = guided_trace();
        t.fallback = true;
        assert!(free_conversation(&t).is_none());
        let mut t = guided_trace();
        t.tool_calls[0].error = Some("arguments did not parse".into());
        assert!(free_conversation(&t).is_none());
        // Without memory calls: one turn, the reasoning and the answer.
        let mut t = guided_trace();
        t.tool_calls.clear();
        t.cited.clear();
        let m = free_conversation(&t).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].content, system_prompt(Mode::Free, false));
        assert!(m[2].content.starts_with("What matters for this request: "));
        assert!(mrrec_llm::parse::boxed_json(&m[2].content).is_some());
    }
}
