//! The MR.Rec core: a workspace (data, embedder, item indexes) made ready to answer, the
//! assistant's reasoning loop (guided and free) with the memory tool and the ranker, the evaluation
//! methods, the rewards, and the memory builder.
//!
//! ```no_run
//! let ws = mrrec_agent::Workspace::open(&mrrec_agent::WorkspaceOptions::new("../shared/data/amazon23-mini"))?;
//! let hits = ws.search_dense("a pillow for sleeping with my CPAP", 10)?;
//! # Ok::<(), mrrec_agent::AgentError>(())
//! ```

pub mod assistant;
pub mod backend;
pub mod error;
pub mod memory;
pub mod methods;
pub mod progress;
pub mod prompts;
pub mod rerank;
pub mod rewards;
pub mod shop;
pub mod workspace;

pub use error::{AgentError, Result};
pub use methods::{method_names, DenseMethod, LexicalMethod};
pub use shop::Shop;
pub use workspace::{DenseKind, Workspace, WorkspaceOptions};
