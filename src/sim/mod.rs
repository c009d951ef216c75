//! Built-in simulators of Marketo and the Dataverse Web API, for tests and `oppsync demo`, and
//! the pieces the end-to-end tests and the reliability harness share. Production never uses them.

pub mod dataverse;
pub mod env;
pub mod marketo;
pub mod org;
pub mod pg;
pub mod process;
pub mod scenario;
