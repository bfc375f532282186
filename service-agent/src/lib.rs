//! The service dataplane agent: sources → model → reconciler → pinned maps
//! (see docs/architecture.md).
pub mod source;
pub mod model;
pub mod reconciler;
