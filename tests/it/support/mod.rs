//! Test harness: fresh stores, the app on a random port, the simulators.

#![allow(dead_code)]

pub mod app;
pub mod jwt;
pub mod process;

pub use oppsync::sim::{pg, scenario};
