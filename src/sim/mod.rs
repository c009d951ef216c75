//! Built-in simulators of Marketo and the Dataverse Web API, for tests and `oppsync demo`.
//! Production never talks to them.

pub mod dataverse;
pub mod env;
pub mod marketo;
pub mod org;
