//! One module per command group: each turns its arguments into library configuration and calls
//! the library crates.

pub(crate) mod bench;
pub(crate) mod data;
pub(crate) mod demo;
pub(crate) mod eval;
pub(crate) mod judge;
pub(crate) mod memory;
pub(crate) mod recommend;
pub(crate) mod serve;
pub(crate) mod train;
