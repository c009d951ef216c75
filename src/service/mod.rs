//! What the HTTP surface and the worker share about the running service: its lifecycle
//! (draining, push leadership, a Marketo problem) and the process-wide metrics registry. Both
//! layers use this module; neither imports the other for it.

pub mod lifecycle;
pub mod metrics;

pub use lifecycle::Lifecycle;
