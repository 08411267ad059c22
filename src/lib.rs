//! mrrec as a library: open a data directory, build or reopen its retrieval indexes, and run
//! methods over it. The `mrrec` binary is a thin shell over this.
//!
//! ```no_run
//! let ws = mrrec::Workspace::open(&mrrec::WorkspaceOptions::new("../shared/data/amazon23-mini"))?;
//! let hits = ws.search_dense("a pillow for sleeping with my CPAP", 10)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod assistant;
pub mod backend;
pub mod bench;
pub mod memory;
pub mod methods;
pub mod progress;
pub mod rewards;
pub mod rollout;
pub mod service;
pub mod train;
pub mod workspace;

pub use methods::{method_names, DenseMethod, LexicalMethod};
pub use workspace::{DenseKind, Workspace, WorkspaceOptions};
