//! Nothing acknowledged is lost: the real binary, killed with SIGKILL or stopped with SIGTERM in
//! the middle of a burst of webhooks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::{NotificationBuilder, reference};
use oppsync::sim::env::Simulators;
use oppsync::store::Store;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::support::app::KEY;
use crate::support::process::{free_port, serve_env, start_serve};

/// `clients` tasks post distinct notifications until stopped; returns the record ids answered 202.
fn burst(url: String, clients: usize, acked: Arc<Mutex<BTreeSet<Uuid>>>, tasks: &mut JoinSet<()>) {
    for _ in 0..clients {
        let url = url.clone();
        let acked = acked.clone();
        tasks.spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            loop {
                let id = Uuid::new_v4();
                let n = NotificationBuilder::opportunity_create(id, 1_750_000_000_000)
                    .attr("name", AttributeValue::String("Burst".into()))
                    .attr("customerid", reference("account", Uuid::new_v4()))
                    .attr("statecode", AttributeValue::OptionSet(0));
                let mut req = http
                    .post(format!("{url}/webhooks/dynamics?code={KEY}"))
                    .body(n.to_json());
                for (k, v) in n.headers() {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(r) if r.status() == 202 => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
    }
}

async fn stored_records(url: &str) -> BTreeSet<Uuid> {
    let store = Store::connect(url, 2).await.unwrap();
    let mut out = BTreeSet::new();
    let mut before = None;
    loop {
        let page = store.list_notifications(None, before, 1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|n| n.id);
        out.extend(page.iter().map(|n| Uuid::parse_str(&n.record_id).unwrap()));
    }
    out
}

async fn wait_for(acked: &Arc<Mutex<BTreeSet<Uuid>>>, n: usize) {
    for _ in 0..2000 {
        if acked.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("only {} notifications acknowledged", acked.lock().unwrap().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_notification_survives_sigkill_and_a_restart() {
    let sims = Simulators::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("kill.db").display());
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let mut serve = start_serve(&env, port).await;

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = JoinSet::new();
    burst(serve.url.clone(), 32, acked.clone(), &mut tasks);
    wait_for(&acked, 300).await;
    serve.kill9();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tasks.abort_all();
    let acked: BTreeSet<Uuid> = acked.lock().unwrap().clone();

    // Restart on the same store: it starts, and every acknowledged notification is there.
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let restarted = start_serve(&env, port).await;
    let stored = stored_records(&store_url).await;
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged notifications lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let sims = Simulators::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("term.db").display());
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let mut serve = start_serve(&env, port).await;

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = JoinSet::new();
    burst(serve.url.clone(), 16, acked.clone(), &mut tasks);
    wait_for(&acked, 100).await;
    serve.signal("-TERM").unwrap();
    let status = serve
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits within the grace period");
    tasks.abort_all();
    assert!(status.success(), "exit status {status}");
    let acked: BTreeSet<Uuid> = acked.lock().unwrap().clone();
    let stored = stored_records(&store_url).await;
    assert!(
        acked.is_subset(&stored),
        "every 202 answered before the stop is stored"
    );
}

#[tokio::test]
async fn serve_refuses_an_older_schema_with_a_clear_message_unless_asked_to_migrate() {
    let sims = Simulators::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("older.db").display());
    // A store of an earlier version (a new, empty one gets its schema: serve_cli.rs).
    Store::connect(&store_url, 2)
        .await
        .unwrap()
        .migrate_to(1)
        .await
        .unwrap();
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_oppsync"))
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("oppsync migrate"), "{stderr}");
    // `oppsync migrate`, then `serve` starts.
    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_oppsync"))
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let _serve = start_serve(&env, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_running_past_its_shutdown_grace_period_until_told_to_stop() {
    // Regression: the grace period once counted from start-up, so `serve` stopped by itself.
    let sims = Simulators::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("long.db").display());
    let port = free_port();
    let mut env = serve_env(&sims, &store_url, port);
    env.retain(|(k, _)| k != "OPPSYNC__SERVER__SHUTDOWN_GRACE_SECS");
    env.push(("OPPSYNC__SERVER__SHUTDOWN_GRACE_SECS".into(), "1".into()));
    let mut serve = start_serve(&env, port).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "still running after 2.5 s with a 1 s grace"
    );
    let health = reqwest::get(format!("{}/healthz", serve.url)).await.unwrap();
    assert_eq!(health.status(), 200);
    serve.signal("-TERM").unwrap();
    let status = serve
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success());
}
