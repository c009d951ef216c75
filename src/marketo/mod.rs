//! Marketo REST client: token, limits, batching, retries, and the mapping of Marketo's
//! HTTP-200 error envelope onto typed outcomes (specs/marketo.md §1, §2, §6–§8).
//!
//! One `MarketoClient` is shared by every task of the process: the rate window, the
//! concurrency gauge and the daily quota are per Marketo instance, so one limiter must see
//! every call.

mod client;
mod error;
mod limiter;
mod token;
mod wire;

pub use client::{Lead, MarketoClient, ProbeReport, RecordResult, RecordStatus, RoleRecord, Usage};
pub use error::MarketoError;
#[cfg(test)]
pub(crate) use limiter::cst_day_of;
pub use limiter::{QUOTA_DAY_MS, QuotaDay, quota_day_elapsed_ms};

#[cfg(test)]
mod tests;
