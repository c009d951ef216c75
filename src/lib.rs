//! oppsync keeps Adobe Marketo Engage in step with Microsoft Dynamics 365 opportunities, one way,
//! Dynamics → Marketo.

pub mod app;
pub mod config;
pub mod demo;
pub mod dynamics;
pub mod http;
pub mod marketo;
pub mod register;
pub mod rules;
pub mod service;
pub mod sim;
pub mod store;
pub mod worker;

/// mimalloc instead of the system allocator: intake allocates per request (the body, its
/// decode, its compressed copy), and glibc's malloc was a fifth of intake's CPU time under
/// concurrent load. Declared in the library so the benchmarks and tests, which link it, run
/// on the allocator the `oppsync` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
