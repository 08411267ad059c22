//! Chat models behind one interface ([`ChatModel`]): requests and responses, constraints and
//! their JSON-schema check, generic parsers of model output, the on-disk response cache
//! ([`CachedChatModel`]), cancellation, the instant [`EchoModel`] and any OpenAI-compatible
//! server ([`OpenAiModel`]). The local candle engine (GGUF qwen2 / llama, packed kernels,
//! constrained decoding, batching, LoRA) is `mrrec-llm-local`. Memory building, the assistant,
//! the baselines and GRPO all talk to a `ChatModel`.

mod cache;
mod cancel;
mod echo;
mod lazy;
mod openai;
pub mod parse;
mod schema;

use serde::{Deserialize, Serialize};

pub use cache::{CachePolicy, CachedChatModel, ResponseCache};
pub use cancel::{check as check_cancel, Cancel, CancelOnDrop, Cancellable};
pub use echo::EchoModel;
pub use lazy::{LazyChatModel, Loader};
pub use openai::{OpenAiConfig, OpenAiModel};
pub use schema::{validate, Constraint};

/// Errors of the chat-model layer.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The model's files could not be obtained.
    #[error(transparent)]
    Model(#[from] mrrec_models::ModelError),
    /// The inference engine failed (a local model's tensor library, in words).
    #[error("engine: {0}")]
    Engine(String),
    /// A GGUF file lacks what we need or is malformed.
    #[error("{path}: {message}")]
    BadModelFile {
        path: std::path::PathBuf,
        message: String,
    },
    /// Tokenisation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt does not fit the context window.
    #[error(
        "prompt of {prompt} tokens + {max_new} new tokens exceeds the context window of {window}"
    )]
    ContextOverflow {
        prompt: usize,
        max_new: usize,
        window: usize,
    },
    /// The server answered with a client error (not retried).
    #[error("{url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    /// The server could not be reached, timed out, or kept failing after retries.
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    /// The server's answer was not a valid chat completion.
    #[error("{url}: malformed response: {message}")]
    BadResponse { url: String, message: String },
    /// A generation constraint is malformed, admits nothing, or was violated.
    #[error("constraint: {0}")]
    Constraint(String),
    /// The call was cancelled (its [`Cancel`] token) before it finished.
    #[error("cancelled")]
    Cancelled,
    /// The backend cannot do what was asked (a server cannot score answers, say).
    #[error("{0}")]
    Unsupported(String),
    /// A filesystem error, with the path.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, LlmError>;

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// A tool call the assistant made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Tool name.
    pub name: String,
    /// Arguments (a JSON object).
    pub arguments: serde_json::Value,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
    /// Tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

impl Message {
    /// A message with text only.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }
    /// A system message.
    pub fn system(c: impl Into<String>) -> Self {
        Self::new(Role::System, c)
    }
    /// A user message.
    pub fn user(c: impl Into<String>) -> Self {
        Self::new(Role::User, c)
    }
    /// An assistant message.
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new(Role::Assistant, c)
    }
    /// A tool result.
    pub fn tool(c: impl Into<String>) -> Self {
        Self::new(Role::Tool, c)
    }
}

/// A tool the model may call (OpenAI function schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Function name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON schema of its arguments.
    pub parameters: serde_json::Value,
}

impl ToolSpec {
    /// The OpenAI / Qwen `{"type": "function", "function": {...}}` form.
    pub fn to_openai(&self) -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}})
    }
}

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Penalty on tokens already generated (1 = off).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            max_tokens: 256,
            stop: Vec::new(),
            seed: 42,
        }
    }
}

/// A chat request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    pub tools: Vec<ToolSpec>,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Text the controller writes at the start of the assistant's turn; the model continues it.
    /// (Local backend; the OpenAI backend sends it as a final assistant message where supported.)
    pub assistant_prefix: Option<String>,
    /// What the generated text (after the prefix) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// Gives up with [`LlmError::Cancelled`] once this token is cancelled (not serialised, not
    /// part of the request's identity).
    #[serde(skip)]
    pub cancel: Option<Cancel>,
}

/// Tokens and time of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl Usage {
    /// Adds another call's usage.
    pub fn add(&mut self, o: &Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.seconds += o.seconds;
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// A chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// Generated text (after the assistant prefix, without the end-of-turn token).
    pub text: String,
    /// Tool calls parsed from the text (or returned by the server).
    pub tool_calls: Vec<ToolCall>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Cost.
    pub usage: Usage,
}

/// How likely each of a few answers is as the first token of a request's answer: what a yes/no
/// judge reads instead of generating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScores {
    /// The log-probability (temperature 1, over the whole vocabulary) of each choice's first
    /// token, in the order the choices were given.
    pub logprobs: Vec<f32>,
    /// Cost: the prompt's tokens and the call's share of the time; nothing is generated.
    pub usage: Usage,
}

/// A chat model.
pub trait ChatModel: Send + Sync {
    /// Model id (part of cache keys and provenance).
    fn id(&self) -> &str;
    /// Answers one request; `on_text` receives text pieces as they are generated.
    fn chat_stream(&self, req: &ChatRequest, on_text: &mut dyn FnMut(&str))
        -> Result<ChatResponse>;
    /// Answers one request.
    fn chat(&self, req: &ChatRequest) -> Result<ChatResponse> {
        self.chat_stream(req, &mut |_| {})
    }
    /// Answers many independent requests (backends may run them together).
    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        reqs.iter().map(|r| self.chat(r)).collect()
    }
    /// Whether the model can answer now (a readiness probe): a server backend checks that its
    /// server is reachable and not failing; an in-process model is always ready.
    fn ready(&self) -> Result<()> {
        Ok(())
    }
    /// Scores `choices` (short answers such as `Yes` / `No`) as the first token of the answer
    /// to each request, without generating. A backend that cannot score answers
    /// [`LlmError::Unsupported`] for every request (the default).
    fn score_choices(&self, reqs: &[ChatRequest], choices: &[&str]) -> Vec<Result<ChoiceScores>> {
        let _ = choices;
        reqs.iter()
            .map(|_| {
                Err(LlmError::Unsupported(format!(
                    "the model {} cannot score answers (a local GGUF model and an OpenAI-compatible server with log-probabilities can)",
                    self.id()
                )))
            })
            .collect()
    }
}

/// A box, a shared pointer or a borrow of a chat model is that chat model (so a cache or an
/// assistant can hold any of them).
macro_rules! delegate_chat_model {
    ($($ptr:ty),*) => {$(
        impl<T: ChatModel + ?Sized> ChatModel for $ptr {
            fn id(&self) -> &str {
                (**self).id()
            }
            fn chat_stream(
                &self,
                req: &ChatRequest,
                on_text: &mut dyn FnMut(&str),
            ) -> Result<ChatResponse> {
                (**self).chat_stream(req, on_text)
            }
            fn chat(&self, req: &ChatRequest) -> Result<ChatResponse> {
                (**self).chat(req)
            }
            fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
                (**self).chat_batch(reqs)
            }
            fn ready(&self) -> Result<()> {
                (**self).ready()
            }
            fn score_choices(
                &self,
                reqs: &[ChatRequest],
                choices: &[&str],
            ) -> Vec<Result<ChoiceScores>> {
                (**self).score_choices(reqs, choices)
            }
        }
    )*};
}

delegate_chat_model!(Box<T>, std::sync::Arc<T>, &T);
