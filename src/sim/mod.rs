//! Built-in simulators of Marketo and the Dataverse Web API, for `oppsync demo`, `oppsync sim`
//! and the tests. The pieces only the end-to-end tests and the reliability harness share
//! (`pg`, `process`, `scenario`) are compiled with the `testing` feature alone.

pub mod dataverse;
pub mod env;
pub mod marketo;
pub mod org;
#[cfg(feature = "testing")]
pub mod pg;
#[cfg(feature = "testing")]
pub mod process;
#[cfg(feature = "testing")]
pub mod scenario;
