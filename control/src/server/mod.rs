//! controld, the coordination server (feature `server`).

pub mod store;
