//! The routes, one module per resource.

pub(crate) mod items;
pub(crate) mod ops;
pub(crate) mod recommend;
pub(crate) mod trainer;
pub(crate) mod users;

pub use items::*;
pub(crate) use ops::*;
pub use recommend::*;
pub use trainer::*;
pub use users::*;
