//! A hostile environment: the store taken away under a running service.

use std::time::Duration;

use oppsync::sim::org::{Customer, DynamicsOrg};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::support::app::TestEnv;

/// The data directory deleted while serving: no notification is acknowledged after that (a 2xx
/// would be a promise nothing keeps), intake answers 503, and readiness and liveness fail.
#[tokio::test]
async fn a_deleted_store_is_never_acknowledged_and_fails_the_probes() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let mut create = |name: &str| {
        org.create_opportunity(name, Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1)
            .1
    };
    env.deliver(&create("Before")).await;
    let url = env.config.store.url.expose().to_owned();
    let db = std::path::PathBuf::from(url.strip_prefix("sqlite://").unwrap());
    let dir = db.parent().unwrap().to_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(env.post(&create(&format!("After {i}"))).await.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 503),
        "after the store was deleted: {statuses:?}"
    );
    let probe = |path: &'static str| {
        let http = env.http.clone();
        let url = format!("{}{path}", env.app.url());
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(probe("/healthz").await, 503);
    let ready =
        oppsync::sim::env::eventually(Duration::from_secs(5), || async { probe("/readyz").await == 503 })
            .await;
    assert!(ready, "readiness still green with the store gone");
}

/// A store file replaced under the service (same path, another file) is detected as well.
#[tokio::test]
async fn a_replaced_store_file_is_never_acknowledged() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, first) =
        org.create_opportunity("Before", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    env.deliver(&first).await;
    let url = env.config.store.url.expose().to_owned();
    let db = std::path::PathBuf::from(url.strip_prefix("sqlite://").unwrap());
    let copy = db.with_extension("copy");
    std::fs::copy(&db, &copy).unwrap();
    std::fs::rename(&copy, &db).unwrap();
    let (_, after) =
        org.create_opportunity("After", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    let status = env.post(&after).await.status().as_u16();
    assert_eq!(status, 503, "a notification acknowledged into a replaced store");
    let health = env
        .http
        .get(format!("{}/healthz", env.app.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 503);
}
