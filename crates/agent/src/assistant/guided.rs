//! The guided loop (for small local models): the controller opens each part — a short reasoning
//! segment, the tool calls' arguments, the final object — and the model fills them under a
//! schema; an off-topic profile is repaired once without memory.

use crate::error::Result;
use mrrec_llm::{ChatRequest, Constraint, Message, Sampling};
use serde_json::json;

use super::*;
use crate::prompts::assistant::*;

/// The controller's opening of the reasoning segment, with the memory tool and without.
pub(super) const THINK_MEMORY: &str = "Which of the user's preferences matter here: ";
pub(super) const THINK_PLAIN: &str = "What matters for this request: ";
/// The controller's opening of a memory-tool call (the model writes the arguments).
pub(super) const TOOL_OPEN: &str =
    "\n<tool_call>\n{\"name\": \"memory_retrieval_tool\", \"arguments\": ";

impl Assistant<'_> {
    pub(super) fn guided(
        &self,
        user: &str,
        request: &str,
        category: Option<&str>,
        trace: &mut Trace,
    ) -> Result<Option<(String, Vec<String>)>> {
        let with_tool = !self.cfg.levels.is_empty() && self.cfg.guided_calls > 0;
        let mut messages = vec![
            Message::system(system_prompt(Mode::Guided, with_tool)),
            Message::user(user_prompt(request, category, &trace.global_aspects)),
        ];
        trace.memory_tokens += trace
            .global_aspects
            .iter()
            .map(|(_, t)| estimate_tokens(t))
            .sum::<u64>();
        // 1. A bounded reasoning segment.
        let think = if with_tool { THINK_MEMORY } else { THINK_PLAIN };
        let req = ChatRequest {
            messages: messages.clone(),
            assistant_prefix: Some(think.into()),
            sampling: Sampling {
                max_tokens: self.cfg.reasoning_tokens,
                stop: vec!["\n\n".into(), "<tool_call>".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        // One line of reasoning (a leading blank line is not a stop).
        let reasoning = self
            .chat(&req, trace)?
            .trim()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        trace.reasoning.push(reasoning.clone());
        let mut said = format!("{think}{reasoning}");
        // 2. Tool calls the controller opens; the model writes the arguments.
        let aspect_names = trace.aspect_names.clone();
        let mut retrieved: Vec<String> = Vec::new();
        if with_tool {
            for _ in 0..self.cfg.guided_calls {
                let open = TOOL_OPEN;
                let req = ChatRequest {
                    messages: messages.clone(),
                    assistant_prefix: Some(format!("{said}{open}")),
                    sampling: Sampling {
                        max_tokens: 96,
                        ..Default::default()
                    },
                    constraint: Some(Constraint::JsonSchema(tool_schema(&aspect_names))),
                    ..Default::default()
                };
                let args_text = self.chat(&req, trace)?;
                let call = match mrrec_llm::parse::parse_json_lenient(&args_text) {
                    Some(v) => self.retrieve(user, &v, trace)?,
                    // The constraint makes this rare (a length cut): fall back to the request.
                    None => {
                        let mut c = self.retrieve(user, &json!({"query": request}), trace)?;
                        c.error = Some(format!(
                            "arguments did not parse: {args_text:?}; searched the request"
                        ));
                        c
                    }
                };
                said.push_str(&format!("{open}{}}}\n</tool_call>", args_text.trim()));
                let resp = Self::tool_response(&call);
                trace.memory_tokens += estimate_tokens(&resp);
                retrieved.extend(call.results.iter().map(|r| r.0.clone()));
                messages.push(Message::assistant(std::mem::take(&mut said)));
                messages.push(Message::user(format!(
                    "{resp}\nWrite the ideal item profile for the request \"{}\": {PROFILE_ASK}. Use a memory only if it is about the same kind of product.",
                    request.replace('"', "'")
                )));
                self.push_call(trace, call);
            }
        }
        retrieved.sort();
        retrieved.dedup();
        // 3. The final object, opened by the controller and constrained.
        let final_req = |messages: &[Message], prefix: String| ChatRequest {
            messages: messages.to_vec(),
            assistant_prefix: Some(prefix),
            sampling: Sampling {
                max_tokens: self.cfg.answer_tokens,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            constraint: Some(Constraint::JsonSchema(final_schema(&retrieved))),
            ..Default::default()
        };
        let prefix = if said.is_empty() {
            String::new()
        } else {
            format!("{said}\n")
        };
        let mut text = self.chat(&final_req(&messages, prefix.clone()), trace)?;
        let first = mrrec_llm::parse::parse_json_lenient(&text)
            .as_ref()
            .and_then(read_final);
        let out = match first {
            Some(out) => out,
            None => {
                trace.repairs += 1;
                let mut retry = final_req(&messages, prefix.clone());
                retry.sampling.max_tokens = self.cfg.answer_tokens * 2;
                retry.sampling.temperature = 0.7;
                retry.sampling.seed = 1;
                text = self.chat(&retry, trace)?;
                match mrrec_llm::parse::parse_json_lenient(&text)
                    .as_ref()
                    .and_then(read_final)
                {
                    Some(out) => out,
                    None => return Ok(None),
                }
            }
        };
        // On topic? A profile about another product than the request, or one that copies the
        // text of a retrieved memory or of a global aspect (a past item's title, another
        // shopper's product, instead of the ideal item), means the memories misled the model:
        // the repair asks again without them (the request and the scenario only, citing
        // nothing — what `llm-rewrite` asks); if that answer does not parse, the request is
        // ranked (`fallback`).
        let memories: Vec<String> = trace
            .tool_calls
            .iter()
            .flat_map(|c| c.results.iter().map(|r| r.3.clone()))
            .chain(trace.global_aspects.iter().map(|(_, t)| t.clone()))
            .collect();
        if !self.off_topic(request, &out.0, &memories, trace)? {
            return Ok(Some(out));
        }
        trace.off_topic += 1;
        trace.repairs += 1;
        let plain = self.one_shot_request(&user_prompt(request, category, &[]));
        let text = self.chat(&plain, trace)?;
        match mrrec_llm::parse::parse_json_lenient(&text)
            .as_ref()
            .and_then(read_final)
        {
            Some((profile, _)) => Ok(Some((profile, Vec::new()))),
            None => Ok(None),
        }
    }

    /// The guided one-shot call: the request block (and any context) with the profile ask, the
    /// final object constrained with nothing to cite. `llm-rewrite`'s call, and the memory-free
    /// repair's, so that both are the same request.
    pub(super) fn one_shot_request(&self, user: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![
                Message::system(system_prompt(Mode::Guided, false)),
                Message::user(format!("{user}\n{}", one_shot_ask())),
            ],
            sampling: Sampling {
                max_tokens: self.cfg.answer_tokens,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            constraint: Some(Constraint::JsonSchema(final_schema(&[]))),
            ..Default::default()
        }
    }

    /// Whether a profile is off topic: too far from the request (another product), or a copy of
    /// a retrieved memory (a run of [`COPY_WORDS`] words of an entry, most of them not in the
    /// request). Off when `min_profile_similarity` is 0.
    pub(super) fn off_topic(
        &self,
        request: &str,
        profile: &str,
        memories: &[String],
        trace: &mut Trace,
    ) -> Result<bool> {
        if self.cfg.min_profile_similarity <= 0.0 {
            return Ok(false);
        }
        let sim = self.similarity(request, profile, trace)?;
        trace.profile_similarity = Some(sim);
        Ok(sim < self.cfg.min_profile_similarity
            || memories
                .iter()
                .any(|m| copied_run(profile, m, request) >= COPY_WORDS))
    }
}
