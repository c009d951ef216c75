//! The real `oppsync` binary as a child process: the library's `oppsync::sim::process` with this
//! test build's binary and webhook key.

use std::path::Path;

use oppsync::sim::env::Simulators;
pub use oppsync::sim::process::ServeProcess;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    oppsync::sim::process::free_port().unwrap()
}

/// Environment for `oppsync serve` pointed at the simulators and `store_url`.
pub fn serve_env(sims: &Simulators, store_url: &str, port: u16) -> Vec<(String, String)> {
    oppsync::sim::process::serve_env(sims, store_url, port, super::app::KEY)
}

/// Starts `oppsync serve --migrate` and waits until it answers /healthz.
pub async fn start_serve(env: &[(String, String)], port: u16) -> ServeProcess {
    ServeProcess::start(Path::new(env!("CARGO_BIN_EXE_oppsync")), env, port)
        .await
        .unwrap()
}
