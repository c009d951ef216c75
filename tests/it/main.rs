//! Integration tests: one binary (faster to build than one per file), modules by area.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure is a test failure

mod support;

mod admin_auth;
mod admin_flows;
mod backfill;
mod demo;
mod drift;
mod durability;
mod hostile;
mod intake;
mod no_silent_failure;
mod openapi;
mod operations_doc;
mod pipeline;
mod real_orgs;
mod reconcile;
mod register_cli;
mod replicas;
mod retention;
mod rules_e2e;
mod serve_cli;
mod store_pg;
