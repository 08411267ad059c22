//! Every prompt the agent sends, its schema and its version, in one place: the assistant's
//! (system and user turns, the memory tool, the guided slots' schemas), the memory builder's
//! (preference patterns, the user profile), the global memory's step A (aspects of a choice) and
//! the request a derived training query is written with.
//!
//! A version is part of every cached request through the text, so bumping it invalidates the
//! cached answers of that prompt and no other.

pub mod aspects;
pub mod assistant;
pub mod derive;
pub mod memory;

pub use aspects::GLOBAL_PROMPT_VERSION;
pub use assistant::{ASSISTANT_PROMPT_VERSION, CONTROLLER_VERSION, MEMORY_TOOL};
pub use derive::DERIVE_PROMPT_VERSION;
pub use memory::PROMPT_VERSION as MEMORY_PROMPT_VERSION;
