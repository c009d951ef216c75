//! oppsync keeps Adobe Marketo Engage in step with Microsoft Dynamics 365 opportunities, one way,
//! Dynamics → Marketo.

pub mod admin_cli;
pub mod app;
pub mod config;
pub mod demo;
pub mod dynamics;
pub mod errors;
pub mod http;
pub mod marketo;
pub mod register;
pub mod retry;
pub mod rules;
pub mod service;
pub mod sim;
pub mod store;
pub mod worker;
