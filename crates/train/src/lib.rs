//! GRPO training of the MR.Rec assistant's policy, in Rust on the CPU (issue 6).
//!
//! - [`policy::Policy`]: a differentiable qwen2 / llama forward on dense weights with LoRA factors
//!   as the trainable parameters; log-probabilities in chunks, at chosen positions, renormalised
//!   over allowed tokens where decoding was constrained.
//! - [`grpo`]: group advantages, the clipped objective with the optional KL term, token masks,
//!   and AdamW with gradient clipping and saveable state.

pub mod grpo;
pub mod policy;
pub mod rollout;
pub mod trainer;

pub use grpo::{group_advantages, grpo_loss, AdamW, AdamWParams, GrpoParams, TokenBatch};
pub use policy::{LoraConfig, LowerCache, Policy, Shape};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Tensor arithmetic failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The model file or shape is unusable.
    #[error("model: {0}")]
    Model(String),
    /// Inputs of mismatched sizes.
    #[error("shape: {0}")]
    Shape(String),
    /// A checkpoint could not be read or written.
    #[error("checkpoint: {0}")]
    Io(String),
    /// From the LLM crate (adapters).
    #[error(transparent)]
    Llm(#[from] mrrec_llm::LlmError),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
