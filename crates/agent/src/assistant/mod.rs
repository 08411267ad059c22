//! The MR.Rec assistant: reasoning-enhanced memory retrieval, an ideal item profile, and a
//! ranking of the whole catalogue by that profile, with a trace of everything it did.
//!
//! Two modes, recorded in every trace:
//! - **free** (the paper's): the model sees the `memory_retrieval_tool` description and the
//!   global aspects of the scenario, reasons, calls the tool (`<tool_call>{...}</tool_call>`, at
//!   most `max_calls`), reads the entries it gets back, and ends with
//!   `\boxed{"ideal_item_profile": ..., "useful_memory_ids": [...]}`;
//! - **guided** (for small local models): the controller owns the structure. The model writes a
//!   short reasoning segment, then the arguments of each tool call the controller opens
//!   (schema-constrained), then the final object the controller opens (constrained: a non-empty
//!   profile, memory ids limited to those retrieved).
//!
//! Malformed output gets one repair attempt; after that the request itself is ranked (counted
//! as a fallback in the trace).

mod free;
mod guided;

pub use free::free_conversation;

use crate::error::Result;
use mrrec_index::{Hit, HybridParams, ItemIndex, SearchQuery};
use mrrec_llm::{ChatModel, ChatRequest, Message, Sampling, Usage};
use mrrec_memory::{Level, MemoryRead, Owner};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::prompts::assistant::{one_shot_ask, strip_tags, system_prompt, user_prompt};

/// How the loop is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The model drives (the paper's protocol).
    Free,
    /// The controller drives; the model fills constrained slots.
    Guided,
}

/// How the request itself enters the ranking beside the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestInRanking {
    /// The profile alone is ranked (the paper's).
    #[default]
    None,
    /// Reciprocal-rank fusion of the profile's ranking and the request's own.
    Fuse,
    /// One ranking of the request and the profile joined as one text (query expansion).
    Join,
}

impl RequestInRanking {
    /// True for the paper's ranking (the profile alone).
    pub fn is_profile_alone(&self) -> bool {
        *self == RequestInRanking::None
    }
}

impl Mode {
    /// Its name, as runs, records and the command line spell it (`free`, `guided`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Free => "free",
            Mode::Guided => "guided",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "free" => Ok(Mode::Free),
            "guided" => Ok(Mode::Guided),
            o => Err(format!("unknown mode {o:?} (free, guided)")),
        }
    }
}

/// What the assistant may use and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssistantConfig {
    /// Loop mode.
    pub mode: Mode,
    /// Local memory levels the tool searches (empty: no local memory, no tool).
    pub levels: Vec<Level>,
    /// Show the scenario's global aspects.
    pub use_global: bool,
    /// How many global aspects.
    pub global_n: usize,
    /// Show only global aspects derived from at least this many distinct training queries.
    #[serde(default = "default_global_min_support")]
    pub global_min_support: usize,
    /// Entries per tool call.
    pub k: usize,
    /// Most tool calls (free mode).
    pub max_calls: usize,
    /// Tool calls the controller opens (guided mode).
    pub guided_calls: usize,
    /// Tokens of reasoning per step.
    pub reasoning_tokens: usize,
    /// Tokens of the final answer.
    pub answer_tokens: usize,
    /// Rank with the hybrid index (BM25 + dense) instead of dense alone.
    pub hybrid: bool,
    /// Whether and how the request is ranked beside the profile (each ranking dense, or hybrid
    /// with `hybrid`); by default the profile alone, as the paper does. Not written when it is
    /// the default, so runs recorded before it existed keep their identity.
    #[serde(default, skip_serializing_if = "RequestInRanking::is_profile_alone")]
    pub rank_request: RequestInRanking,
    /// With [`RequestInRanking::Fuse`], the profile's weight in the reciprocal-rank fusion (the
    /// request's is 1): 1 counts both rankings alike, below 1 lets the request lead and the
    /// profile reorder near-ties. Not written when 1, so earlier runs keep their identity.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub profile_weight: f32,
    /// The tool drops entries less similar than this to the call's text (0 keeps the paper's
    /// plain top-k).
    #[serde(default)]
    pub min_memory_score: f32,
    /// Guided mode: a profile less similar than this to the request (cosine of their
    /// embeddings), or one copying a retrieved memory's words, is off topic — the memories
    /// misled the model — and is asked again without them (0: no check).
    #[serde(default)]
    pub min_profile_similarity: f32,
}

/// A profile sharing a run of this many consecutive words with a retrieved memory (most of them
/// not in the request) copies it: a past item's title or a summary, not the ideal item.
pub const COPY_WORDS: usize = 6;

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The longest run of consecutive words `profile` shares with `memory`, counting only runs most
/// of whose words the request does not contain (restating the request is not copying).
pub fn copied_run(profile: &str, memory: &str, request: &str) -> usize {
    let (p, m) = (words(profile), words(memory));
    let asked: std::collections::HashSet<String> = words(request).into_iter().collect();
    let mut best = 0;
    // run[j]: length of the common run ending at p[i], m[j].
    let mut prev = vec![0usize; m.len() + 1];
    for i in 0..p.len() {
        let mut cur = vec![0usize; m.len() + 1];
        for j in 0..m.len() {
            if p[i] == m[j] {
                let n = prev[j] + 1;
                cur[j + 1] = n;
                let new = p[i + 1 - n..=i]
                    .iter()
                    .filter(|w| !asked.contains(*w))
                    .count();
                if 2 * new > n {
                    best = best.max(n);
                }
            }
        }
        prev = cur;
    }
    best
}

/// The memory tool's relevance floor by default: on 40 seeded val queries with Qwen 0.5B, the
/// paper's plain top-3 showed the model entries about other products (53 of 120 below 0.3) that
/// it folded into the profile; the floor lifted N@100 .470 → .506.
pub const DEFAULT_MIN_MEMORY_SCORE: f32 = 0.3;

/// The on-topic check by default (see [`AssistantConfig::min_profile_similarity`]): profiles
/// that copied a memory's item scored 0.37–0.47 against their requests, on-topic ones 0.57–0.97.
pub const DEFAULT_MIN_PROFILE_SIMILARITY: f32 = 0.5;

/// Global aspects read off a single training query are that query's product, not what the
/// section's shoppers share (Qwen 0.5B's v1 aspects, all of support 1 in most sections, lowered
/// N@100 by .068 on 62 val queries); an aspect needs two queries behind it to be shown.
pub const DEFAULT_GLOBAL_MIN_SUPPORT: usize = 2;

fn one() -> f32 {
    1.0
}

fn is_one(w: &f32) -> bool {
    *w == 1.0
}

fn default_global_min_support() -> usize {
    DEFAULT_GLOBAL_MIN_SUPPORT
}

impl AssistantConfig {
    /// Checks the ranking's settings: the profile weight is a number ≥ 0 and, when not 1, weighs
    /// a fusion ([`RequestInRanking::Fuse`]). The message names the setting as `profile weight`;
    /// callers say which flag or field carries it.
    pub fn check_ranking(&self) -> std::result::Result<(), String> {
        let w = self.profile_weight;
        if !(w.is_finite() && w >= 0.0) {
            return Err(format!(
                "the profile weight must be a number ≥ 0 (the request's is 1), not {w}"
            ));
        }
        if w != 1.0 && self.rank_request != RequestInRanking::Fuse {
            return Err(
                "the profile weight weighs the profile beside the request: rank the request fused (fuse)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Default for AssistantConfig {
    fn default() -> Self {
        AssistantConfig {
            mode: Mode::Guided,
            levels: Level::ALL.to_vec(),
            use_global: true,
            global_n: 5,
            global_min_support: DEFAULT_GLOBAL_MIN_SUPPORT,
            k: 3,
            max_calls: 4,
            guided_calls: 1,
            reasoning_tokens: 80,
            answer_tokens: 120,
            hybrid: false,
            rank_request: RequestInRanking::None,
            profile_weight: 1.0,
            min_memory_score: DEFAULT_MIN_MEMORY_SCORE,
            min_profile_similarity: DEFAULT_MIN_PROFILE_SIMILARITY,
        }
    }
}

/// One tool call and what it returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolCallTrace {
    /// The `query` argument.
    pub query: String,
    /// The `aspects` argument.
    pub aspects: Vec<String>,
    /// Entries returned: (id, level, score, text).
    pub results: Vec<(String, Level, f32, String)>,
    /// Whether the call parsed.
    pub ok: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything an answer did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trace {
    /// Loop mode.
    pub mode: Option<Mode>,
    /// The request as read.
    pub request: String,
    /// Scenario given as context.
    pub category: Option<String>,
    /// Global aspects shown: (id, text).
    pub global_aspects: Vec<(String, String)>,
    /// Their names (what guided tool calls may name as `aspects`).
    #[serde(skip)]
    pub aspect_names: Vec<String>,
    /// Reasoning segments.
    pub reasoning: Vec<String>,
    /// Tool calls in order.
    pub tool_calls: Vec<ToolCallTrace>,
    /// The ideal item profile, when one parsed.
    pub profile: Option<String>,
    /// Memory ids the model cited.
    pub cited: Vec<String>,
    /// How many of them were retrieved in this answer.
    pub cited_valid: usize,
    /// Repair attempts made.
    pub repairs: usize,
    /// Cosine similarity of the final profile to the request (guided mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_similarity: Option<f32>,
    /// Profiles rejected as being about another product than the request.
    #[serde(default)]
    pub off_topic: usize,
    /// The request itself was ranked because no profile parsed.
    pub fallback: bool,
    /// Raw model outputs, in order.
    pub outputs: Vec<String>,
    /// Tokens of user memory put into prompts (estimated as characters / 4).
    pub memory_tokens: u64,
    /// LLM usage.
    pub usage: Usage,
    /// Time outside the LLM: memory retrieval and ranking, milliseconds.
    pub memory_ms: f64,
    /// Ranking time, milliseconds.
    pub ranking_ms: f64,
    /// Texts embedded so far in this answer (the request, the profile), reused.
    #[serde(skip)]
    embedded: Vec<(String, Vec<f32>)>,
}

impl Trace {
    /// The profile the rewards score: none when the answer fell back to the request (no fallback
    /// inside rewards — a trajectory without a parsed profile gets R_rec = 0).
    pub fn rewarded_profile(&self) -> Option<String> {
        (!self.fallback).then(|| self.profile.clone()).flatten()
    }

    /// Memory-tool calls that returned without an error (R_mem's count).
    pub fn memory_calls_ok(&self) -> usize {
        self.tool_calls
            .iter()
            .filter(|c| c.ok && c.error.is_none())
            .count()
    }
}

/// An answer: the ranked items and how they were found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The text the catalogue was ranked with (the profile, or the request on fallback).
    pub ranked_with: String,
    /// (catalogue position, score), best first.
    pub items: Vec<(u32, f32)>,
    /// The trace.
    pub trace: Trace,
}

/// The assistant over one shop (catalogue, embedder, indexes), one memory store and one chat
/// model.
pub struct Assistant<'a> {
    /// Catalogue, past interactions, embedder and indexes (no labelled query).
    pub shop: crate::Shop<'a>,
    /// Memory (read only).
    pub store: &'a dyn MemoryRead,
    /// Tenant of the users asking.
    pub tenant: &'a str,
    /// The chat model.
    pub llm: &'a dyn ChatModel,
    /// Settings.
    pub cfg: AssistantConfig,
    /// Receives what happens as it happens (model text, tool calls, the profile), for
    /// streaming; `None` when only the final answer matters.
    pub observer: Option<&'a (dyn Fn(&Event) + Sync)>,
}

/// What the assistant is doing, as it happens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The scenario's global aspects shown to the model: (id, text).
    Aspects {
        /// (id, text).
        aspects: Vec<(String, String)>,
    },
    /// A new model call starts (its text follows as `Text` events).
    Call {
        /// 0-based index of the call in this answer.
        index: usize,
    },
    /// A piece of model output.
    Text {
        /// The new text.
        delta: String,
    },
    /// A memory tool call and what it returned.
    ToolCall {
        /// The call.
        call: ToolCallTrace,
    },
    /// The outcome of the loop, before ranking.
    Profile {
        /// The ideal item profile, when one parsed.
        profile: Option<String>,
        /// Memory ids cited.
        cited: Vec<String>,
        /// The request is ranked instead.
        fallback: bool,
    },
}

fn estimate_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(4)
}

/// The profile and cited ids of a final object, if it has a non-empty profile.
pub fn read_final(v: &Value) -> Option<(String, Vec<String>)> {
    let p = v.get("ideal_item_profile")?.as_str()?.trim().to_string();
    if p.chars().filter(|c| c.is_alphanumeric()).count() < 3 {
        return None;
    }
    let ids = v
        .get("useful_memory_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Some((p, ids))
}

impl<'a> Assistant<'a> {
    fn owner<'u>(&'u self, user: &'u str) -> Owner<'u> {
        Owner {
            tenant: self.tenant,
            user,
        }
    }

    fn emit(&self, e: Event) {
        if let Some(o) = self.observer {
            o(&e);
        }
    }

    fn push_call(&self, trace: &mut Trace, call: ToolCallTrace) {
        if self.observer.is_some() {
            self.emit(Event::ToolCall { call: call.clone() });
        }
        trace.tool_calls.push(call);
    }

    fn chat(&self, req: &ChatRequest, trace: &mut Trace) -> Result<String> {
        if self.observer.is_some() {
            self.emit(Event::Call {
                index: trace.outputs.len(),
            });
        }
        let r = match self.observer {
            Some(o) => self.llm.chat_stream(req, &mut |t| {
                o(&Event::Text {
                    delta: t.to_string(),
                })
            })?,
            None => self.llm.chat(req)?,
        };
        trace.usage.add(&r.usage);
        trace.outputs.push(r.text.clone());
        Ok(r.text)
    }

    /// Runs one memory-retrieval call for `user`.
    fn retrieve(&self, user: &str, args: &Value, trace: &mut Trace) -> Result<ToolCallTrace> {
        let t = std::time::Instant::now();
        let query = args
            .get("query")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_string();
        let aspects: Vec<String> = args
            .get("aspects")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut call = ToolCallTrace {
            query: query.clone(),
            aspects: aspects.clone(),
            ..Default::default()
        };
        let text = [query.as_str()]
            .into_iter()
            .chain(aspects.iter().map(String::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        if text.is_empty() {
            call.error = Some("the call has neither a query nor aspects".into());
            return Ok(call);
        }
        let v = self.shop.embedder.embed(&[text.as_str()])?.remove(0);
        let hits = self
            .store
            .retrieve(self.owner(user), &v, self.cfg.k, &self.cfg.levels)?;
        call.ok = true;
        call.results = hits
            .into_iter()
            .filter(|h| h.score >= self.cfg.min_memory_score)
            .map(|h| (h.entry.id, h.entry.level, h.score, h.entry.text))
            .collect();
        trace.memory_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(call)
    }

    /// The memory tool on its own (what `/tools/memory_retrieve` serves): `args` as a model
    /// writes them, `{"query": ..., "aspects": [...]}`; returns the call and the tool response
    /// text the model would read.
    pub fn memory_tool(&self, user: &str, args: &Value) -> Result<(ToolCallTrace, String)> {
        let mut trace = Trace::default();
        let call = self.retrieve(user, args, &mut trace)?;
        let text = Self::tool_response(&call);
        Ok((call, text))
    }

    /// The text a model reads back from a tool call.
    pub fn tool_response(call: &ToolCallTrace) -> String {
        let mut s = String::from("<tool_response>\n");
        if let Some(e) = &call.error {
            s.push_str(&format!("error: {e}\n"));
        } else if call.results.is_empty() {
            s.push_str("no memories for this user\n");
        }
        for (id, level, _, text) in &call.results {
            s.push_str(&format!(
                "<memory id=\"{id}\" level=\"{}\">{}</memory>\n",
                level.as_str(),
                strip_tags(text)
            ));
        }
        s.push_str("</tool_response>");
        s
    }

    /// The scenario's global aspects most related to the request.
    fn global_aspects(
        &self,
        request: &str,
        category: Option<&str>,
        trace: &mut Trace,
    ) -> Result<()> {
        let Some(c) = category.filter(|_| self.cfg.use_global && self.cfg.global_n > 0) else {
            return Ok(());
        };
        let t = std::time::Instant::now();
        let v = self.ranking().embed(request, trace)?;
        for (a, _) in self.store.global(
            self.tenant,
            c,
            &v,
            self.cfg.global_n,
            self.cfg.global_min_support,
        )? {
            trace.global_aspects.push((a.id.clone(), a.text()));
            if !trace.aspect_names.contains(&a.name) {
                trace.aspect_names.push(a.name.clone());
            }
        }
        trace.memory_ms += t.elapsed().as_secs_f64() * 1e3;
        if !trace.global_aspects.is_empty() {
            self.emit(Event::Aspects {
                aspects: trace.global_aspects.clone(),
            });
        }
        Ok(())
    }

    /// Answers `request` for `user` (in `category`, context only) with the top `k` items.
    pub fn answer(
        &self,
        user: &str,
        request: &str,
        category: Option<&str>,
        k: usize,
    ) -> Result<Answer> {
        let mut trace = Trace {
            mode: Some(self.cfg.mode),
            request: request.to_string(),
            category: category.map(str::to_string),
            ..Default::default()
        };
        self.global_aspects(request, category, &mut trace)?;
        let outcome = match self.cfg.mode {
            Mode::Free => self.free(user, request, category, &mut trace)?,
            Mode::Guided => self.guided(user, request, category, &mut trace)?,
        };
        let ranked_with = match outcome {
            Some((profile, cited)) => {
                let retrieved: std::collections::HashSet<&str> = trace
                    .tool_calls
                    .iter()
                    .flat_map(|c| c.results.iter().map(|r| r.0.as_str()))
                    .collect();
                let mut cited = cited;
                let mut seen = std::collections::HashSet::new();
                cited.retain(|c| seen.insert(c.clone()));
                if self.cfg.mode == Mode::Guided {
                    // The constraint only admits retrieved ids: anything else is an id cut off by
                    // the length limit (the tolerant parser closed the string), not a choice.
                    cited.retain(|c| retrieved.contains(c.as_str()));
                }
                trace.cited_valid = cited
                    .iter()
                    .filter(|c| retrieved.contains(c.as_str()))
                    .count();
                trace.cited = cited;
                trace.profile = Some(profile.clone());
                profile
            }
            None => {
                trace.fallback = true;
                request.to_string()
            }
        };
        self.emit(Event::Profile {
            profile: trace.profile.clone(),
            cited: trace.cited.clone(),
            fallback: trace.fallback,
        });
        let items = self.ranking().rank(&ranked_with, request, k, &mut trace)?;
        Ok(Answer {
            ranked_with,
            items,
            trace,
        })
    }

    /// One LLM call, no tool: writes the ideal item profile from the request and an optional
    /// block of context (recent interactions, the user profile), then ranks with it. The
    /// baselines `llm-rewrite`, `naive-memory` and `static-memory` are this with different
    /// contexts; the mode decides whether the answer is constrained (guided) or boxed (free).
    pub fn one_shot(
        &self,
        request: &str,
        category: Option<&str>,
        context: Option<&str>,
        k: usize,
    ) -> Result<Answer> {
        let mut trace = Trace {
            mode: Some(self.cfg.mode),
            request: request.to_string(),
            category: category.map(str::to_string),
            ..Default::default()
        };
        let mut user = user_prompt(request, category, &[]);
        if let Some(c) = context {
            trace.memory_tokens += estimate_tokens(c);
            user = format!(
                "<memory>\n{}\n</memory>\n{user}",
                c.replace("</memory>", "")
            );
        }
        let outcome = match self.cfg.mode {
            Mode::Guided => {
                let text = self.chat(&self.one_shot_request(&user), &mut trace)?;
                mrrec_llm::parse::parse_json_lenient(&text)
                    .as_ref()
                    .and_then(read_final)
            }
            Mode::Free => {
                let mut messages = vec![
                    Message::system(system_prompt(Mode::Free, false)),
                    Message::user(format!("{user}\n{}", one_shot_ask())),
                ];
                let sampling = Sampling {
                    max_tokens: self.cfg.reasoning_tokens + self.cfg.answer_tokens,
                    ..Default::default()
                };
                let req = ChatRequest {
                    messages: messages.clone(),
                    sampling: sampling.clone(),
                    ..Default::default()
                };
                let text = self.chat(&req, &mut trace)?;
                match mrrec_llm::parse::boxed_json(&text)
                    .as_ref()
                    .and_then(read_final)
                {
                    Some(o) => Some(o),
                    None => {
                        trace.repairs += 1;
                        messages.push(Message::assistant(text));
                        messages.push(Message::user(
                            "Now give your final answer only, as \\boxed{\"ideal_item_profile\": \"...\", \"useful_memory_ids\": []}.",
                        ));
                        let text = self.chat(
                            &ChatRequest {
                                messages,
                                sampling,
                                ..Default::default()
                            },
                            &mut trace,
                        )?;
                        mrrec_llm::parse::boxed_json(&text)
                            .or_else(|| mrrec_llm::parse::parse_json_lenient(&text))
                            .as_ref()
                            .and_then(read_final)
                    }
                }
            }
        };
        let ranked_with = match outcome {
            Some((p, _)) => {
                trace.profile = Some(p.clone());
                p
            }
            None => {
                trace.fallback = true;
                request.to_string()
            }
        };
        self.emit(Event::Profile {
            profile: trace.profile.clone(),
            cited: trace.cited.clone(),
            fallback: trace.fallback,
        });
        let items = self.ranking().rank(&ranked_with, request, k, &mut trace)?;
        Ok(Answer {
            ranked_with,
            items,
            trace,
        })
    }

    /// How this assistant ranks the catalogue.
    pub fn ranking(&self) -> Ranking<'a> {
        Ranking::of(self.shop, &self.cfg)
    }

    /// Cosine similarity of two texts' embeddings (they are unit length).
    fn similarity(&self, a: &str, b: &str, trace: &mut Trace) -> Result<f32> {
        let t = std::time::Instant::now();
        let r = self.ranking();
        let (va, vb) = (r.embed(a, trace)?, r.embed(b, trace)?);
        trace.ranking_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(va.iter().zip(&vb).map(|(x, y)| x * y).sum())
    }
}

/// The name of the paper's ranking (the profile alone, dense): [`Ranking::name`] by default.
pub const PAPER_RANKING: &str = "profile/dense";

/// How an answer's text becomes a ranking of the whole catalogue: the one place the assistant
/// ranks, and the place its rewards and validation rank the same way (so training scores the
/// ranking a user is served).
#[derive(Clone, Copy)]
pub struct Ranking<'a> {
    shop: crate::Shop<'a>,
    hybrid: bool,
    request: RequestInRanking,
    profile_weight: f32,
}

impl<'a> Ranking<'a> {
    /// The ranking an assistant with `cfg` serves ([`AssistantConfig::hybrid`],
    /// [`AssistantConfig::rank_request`]).
    pub fn of(shop: crate::Shop<'a>, cfg: &AssistantConfig) -> Self {
        Ranking {
            shop,
            hybrid: cfg.hybrid,
            request: cfg.rank_request,
            profile_weight: cfg.profile_weight,
        }
    }

    /// Its name, as trajectory records store it: `profile/dense` (the paper's), or which texts
    /// are ranked (`profile`, `profile+request` fused, `request+profile` joined) and by which
    /// index (`dense`, `hybrid`); a fusion whose profile weight is not 1 names it
    /// (`profile*0.5+request`).
    pub fn name(&self) -> String {
        let texts = match self.request {
            RequestInRanking::None => "profile".to_string(),
            RequestInRanking::Fuse if self.profile_weight != 1.0 => {
                format!("profile*{}+request", self.profile_weight)
            }
            RequestInRanking::Fuse => "profile+request".to_string(),
            RequestInRanking::Join => "request+profile".to_string(),
        };
        format!("{texts}/{}", if self.hybrid { "hybrid" } else { "dense" })
    }

    /// Ranks the whole catalogue by a text (dense by default, hybrid when configured), with the
    /// request beside it as [`AssistantConfig::rank_request`] says (unless the text is the
    /// request itself: a fallback ranks the request alone).
    pub fn rank(
        &self,
        text: &str,
        request: &str,
        k: usize,
        trace: &mut Trace,
    ) -> Result<Vec<(u32, f32)>> {
        let t = std::time::Instant::now();
        let hits = match self.request {
            RequestInRanking::Fuse if text != request => {
                let depth = HybridParams::default().depth.max(k);
                let parts = [
                    (self.search(text, depth, trace)?, self.profile_weight),
                    (self.search(request, depth, trace)?, 1.0),
                ];
                mrrec_index::weighted_rrf(&parts, HybridParams::default().c, k)
            }
            RequestInRanking::Join if text != request => {
                self.search(&format!("{request} {text}"), k, trace)?
            }
            _ => self.search(text, k, trace)?,
        };
        trace.ranking_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(hits.into_iter().map(|h| (h.item, h.score)).collect())
    }

    /// 1-based rank of catalogue item `target` among the first `depth` of [`Ranking::rank`]
    /// (None below it). `trace` is the answer's: its embeddings are reused and its timings left
    /// as they were.
    pub fn target_rank(
        &self,
        text: &str,
        request: &str,
        target: u32,
        depth: usize,
        trace: &Trace,
    ) -> Result<Option<usize>> {
        let mut scratch = Trace {
            embedded: trace.embedded.clone(),
            ..Trace::default()
        };
        let hits = self.rank(text, request, depth, &mut scratch)?;
        Ok(hits.iter().position(|&(i, _)| i == target).map(|p| p + 1))
    }

    /// The `k` best items for one text, from the dense index or the hybrid one.
    fn search(&self, text: &str, k: usize, trace: &mut Trace) -> Result<Vec<Hit>> {
        let v = self.embed(text, trace)?;
        let q = SearchQuery {
            text,
            vector: Some(&v),
        };
        Ok(if self.hybrid {
            self.shop.hybrid().search(&q, k)?
        } else {
            self.shop.dense.search(&q, k)?
        })
    }

    /// The embedding of `text`, computed once per answer (the request serves the global
    /// aspects and the on-topic check; the profile the check and the ranking).
    fn embed(&self, text: &str, trace: &mut Trace) -> Result<Vec<f32>> {
        if let Some((_, v)) = trace.embedded.iter().find(|(t, _)| t == text) {
            return Ok(v.clone());
        }
        let v = self.shop.embedder.embed(&[text])?.remove(0);
        trace.embedded.push((text.to_string(), v.clone()));
        Ok(v)
    }
}
