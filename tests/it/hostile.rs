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
    assert_eq!(env.status_of("/healthz").await, 503);
    let ready = oppsync::sim::env::eventually(Duration::from_secs(5), || async {
        env.status_of("/readyz").await == 503
    })
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
    assert_eq!(env.status_of("/healthz").await, 503);
}

/// A raw HTTP/1.1 exchange: what a slow or hostile client can do that reqwest will not.
async fn raw(addr: &str, request: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// Reads until the peer closes, or `within` passes: the bytes read, and whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&text).into_owned(), true),
            Ok(Ok(n)) => text.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&text).into_owned(), false),
        }
    }
}

fn hostile_env_options() -> crate::support::app::EnvOptions {
    crate::support::app::EnvOptions {
        tweak: Some(Box::new(|c| {
            c.server.header_read_timeout_secs = 1;
            c.server.body_read_timeout_secs = 1;
        })),
        ..Default::default()
    }
}

/// Slow-header (slowloris), idle and slow-body connections are closed by the timeouts, and a
/// real webhook is stored while they are open.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_webhooks_still_get_through() {
    let env = TestEnv::start_with(hostile_env_options()).await;
    let addr = env.app.url().trim_start_matches("http://").to_owned();
    let mut slow_headers = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..100 {
        slow_headers.push(
            raw(
                &addr,
                b"POST /webhooks/dynamics HTTP/1.1\r\nHost: oppsync\r\nX-Slow: ",
            )
            .await,
        );
        idle.push(raw(&addr, b"").await);
    }
    let mut slow_body = raw(
        &addr,
        format!(
            "POST /webhooks/dynamics?code={} HTTP/1.1\r\nHost: oppsync\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"Depth\":",
            crate::support::app::KEY
        )
        .as_bytes(),
    )
    .await;
    // Meanwhile a real notification is stored.
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, n) = org.create_opportunity(
        "During the attack",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    assert_eq!(env.post(&n).await.status().as_u16(), 202);
    let (answer, _) = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "slow body: {answer:?}");
    for (kind, streams) in [("slow headers", &mut slow_headers), ("idle", &mut idle)] {
        for s in streams.iter_mut() {
            let (_, closed) = read_until_closed(s, Duration::from_secs(5)).await;
            assert!(
                closed,
                "a {kind} connection was still open after 5 s (timeout 1 s)"
            );
        }
    }
    env.stop().await;
}

/// A declared length over the limit is refused before any of the body is read (here none is
/// ever sent: a server that waited for it would not answer).
#[tokio::test]
async fn an_oversized_content_length_is_refused_without_reading_the_body() {
    let env = TestEnv::start_with(hostile_env_options()).await;
    let addr = env.app.url().trim_start_matches("http://").to_owned();
    let mut s = raw(
        &addr,
        format!(
            "POST /webhooks/dynamics?code={} HTTP/1.1\r\nHost: oppsync\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
            crate::support::app::KEY
        )
        .as_bytes(),
    )
    .await;
    let (answer, _) = read_until_closed(&mut s, Duration::from_millis(800)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.contains("payload-too-large"), "{answer}");
    env.stop().await;
}

/// A body declared compressed is refused (415), and ids that must be Guids are checked (400):
/// a megabyte "correlation id" is neither stored nor logged.
#[tokio::test]
async fn encoded_bodies_and_ids_that_are_not_guids_are_refused() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, n) = org.create_opportunity(
        "Encoded",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    for encoding in ["gzip", "br", "deflate, gzip"] {
        let r = env
            .http
            .post(env.webhook_url())
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(n.to_json())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 415, "{encoding}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["type"], "urn:oppsync:problem:unsupported-content-encoding",
            "{body}"
        );
    }
    let json = n.to_json();
    let correlation = json
        .split("\"CorrelationId\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    for bad in ["not-a-guid".to_owned(), "z".repeat(900_000)] {
        let body = json.replace(&correlation, &bad);
        let r = env
            .http
            .post(env.webhook_url())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{text}");
        assert!(
            text.len() < 2_000,
            "the answer repeats what it refused: {} bytes",
            text.len()
        );
    }
    // The same body with its Guid is stored.
    assert_eq!(env.post(&n).await.status().as_u16(), 202);
    let stored = env
        .app
        .state
        .store
        .list_notifications(None, None, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    env.stop().await;
}

/// While intake's commits fail (here a trigger refuses every inbox row, as a full disk would),
/// webhooks get 503 and readiness is 503 too; once commits go through again, readiness
/// recovers by itself (a probe commit, rolled back) and webhooks are stored.
#[tokio::test]
async fn readiness_is_503_while_intake_cannot_commit_and_recovers_with_it() {
    let env = TestEnv::start().await;
    let oppsync::store::Store::Sqlite(s) = &env.app.state.store else {
        unreachable!("the test environment runs on SQLite")
    };
    let pool = s.pool().clone();
    assert_eq!(env.status_of("/readyz").await, 200);
    sqlx::query(
        "CREATE TRIGGER refuse_all BEFORE INSERT ON inbox BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, n) = org.create_opportunity(
        "Refused",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    assert_eq!(env.post(&n).await.status().as_u16(), 503);
    for _ in 0..3 {
        assert_eq!(
            env.status_of("/readyz").await,
            503,
            "readiness while commits fail"
        );
    }
    assert_eq!(
        env.status_of("/healthz").await,
        200,
        "not a reason to restart the pod"
    );
    sqlx::query("DROP TRIGGER refuse_all")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        env.status_of("/readyz").await,
        200,
        "readiness after commits work again"
    );
    assert_eq!(env.post(&n).await.status().as_u16(), 202);
    // The probes stored nothing.
    let stored = env
        .app
        .state
        .store
        .list_notifications(None, None, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    env.stop().await;
}
