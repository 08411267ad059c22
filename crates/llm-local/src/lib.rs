//! The local chat-model engine on candle ([`LocalModel`]): GGUF qwen2 / llama with the tokenizer
//! and chat template read from the file, the forward pass ([`model`]) with our packed Q8_0
//! kernels ([`q8`]) and k-quant / Q5_0 matrices converted to Q8_0 once ([`ensure_q8_0`]),
//! constrained decoding with llguidance ([`ConstraintCompiler`]), batched decoding and prefill
//! across requests ([`Batcher`]), and LoRA adapters at inference. It implements
//! [`mrrec_llm::ChatModel`]; everything above talks to that interface.

mod attention;
mod batcher;
mod constrain;
mod convert;
mod gguf;
mod local;
mod lora;
pub mod model;
pub mod q8;
mod switches;
mod template;
mod vector;

pub use attention::{attention, KvLayer, Shape as AttentionShape};
pub use batcher::{BatchStats, Batcher, SegmentModel, Worker, MAX_BATCH};
pub use constrain::{ConstraintCompiler, TokenSet};
pub use convert::{ensure_q8_0, ensure_q8_0_in, requantize_gguf, CONVERSION_TAG};
pub use gguf::{tokenizer_from_gguf, GgufInfo};
pub use local::{check_gguf, names_a_file, Generation, LocalModel, Segment, FILE_ID_PREFIX};
pub use switches::{configure, switches, Switches};
pub use template::ChatTemplate;

use mrrec_llm::LlmError;

/// Errors of the local engine: the interface's errors, and the tensor library's.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// An error of the chat-model interface (bad model file, tokenizer, template, context
    /// overflow, constraint, cancellation…).
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The tensor library failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<mrrec_models::ModelError> for LocalError {
    fn from(e: mrrec_models::ModelError) -> Self {
        LocalError::Llm(LlmError::Model(e))
    }
}

impl From<LocalError> for LlmError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::Llm(e) => e,
            LocalError::Candle(e) => LlmError::Engine(e.to_string()),
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, LocalError>;
