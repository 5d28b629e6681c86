//! controld, the coordination server (feature `server`).

pub mod mapper;
pub mod store;
