//! The association rules and field mapping: pure functions from Dynamics events and what oppsync
//! already knows to the state to store and the Marketo writes to make. No I/O, no async.

pub mod config;

pub use config::SyncConfig;
