//! Test harness: fresh stores, the app on a random port, the simulators.

#![allow(dead_code)]

pub mod app;
pub mod jwt;
pub mod pg;
pub mod process;
pub mod scenario;
