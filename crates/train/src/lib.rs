//! GRPO training of the MR.Rec assistant's policy, in Rust on the CPU (issue 6).
//!
//! - [`policy::Policy`]: a differentiable qwen2 / llama forward on dense weights with LoRA factors
//!   as the trainable parameters; log-probabilities in chunks, at chosen positions, renormalised
//!   over allowed tokens where decoding was constrained.
//! - [`grpo`]: group advantages, the clipped objective with the optional KL term, token masks,
//!   and AdamW with gradient clipping and saveable state.

pub mod grpo;
pub mod judge;
pub mod policy;
pub mod rollout;
pub mod softmax;
pub mod trainer;
pub mod trajectories;

pub use grpo::{
    group_advantages, grpo_loss, listwise_mixed_loss, listwise_soft_loss, soft_label_loss, AdamW,
    AdamWParams, GrpoParams, TokenBatch,
};
pub use policy::{FrozenMemo, LoraConfig, Lower, LowerCache, Policy, Scored, Shape};

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
    /// From the local engine (the inference model the rollouts sample).
    #[error(transparent)]
    Local(#[from] mrrec_llm_local::LocalError),
    /// From the agent (the assistant loop, the rewards, the memory store).
    #[error(transparent)]
    Agent(#[from] mrrec_agent::AgentError),
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] std::io::Error),
    /// A JSON document could not be read or written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Bad settings or a run folder holding another run, in words.
    #[error("{0}")]
    Invalid(String),
    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<TrainError>,
    },
}

/// `with_context` for the trainer's results (the wording of `anyhow`'s, typed).
pub(crate) trait Context<T> {
    /// Says what was being done, computed only on failure.
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<TrainError>> Context<T> for std::result::Result<T, E> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| TrainError::Context {
            context: f(),
            source: Box::new(e.into()),
        })
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
