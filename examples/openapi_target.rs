//! The real service against both simulators, with an admin secret, for schema-driven fuzzing
//! (`scripts/check-openapi.sh`). Prints `URL <base>` and `TOKEN <admin write token>`, then runs
//! until SIGTERM or Ctrl-C.

use std::time::Duration;

use oppsync::config::Secret;
use oppsync::sim::env::Simulators;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sims = Simulators::start(Default::default()).await?;
    let store = format!("sqlite://{}", dir.path().join("oppsync.db").display());
    let mut config = sims.service_config(&store, "fuzz-webhook-key-0001");
    Simulators::make_quick(&mut config);
    let secret = "fuzz-admin-secret-0123456789abcdef0123";
    config.admin.jwt_secret = Some(Secret::new(secret));
    let token = oppsync::http::auth::mint(
        &config.admin,
        "schemathesis",
        &["oppsync.write".to_owned()],
        Duration::from_secs(3600),
    )?;
    let app = oppsync::app::start(
        config,
        oppsync::app::StartOptions {
            migrate: true,
            intake_only: false,
        },
    )
    .await?;
    println!("URL {}", app.url());
    println!("TOKEN {token}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    app.stop().await;
    Ok(())
}
