//! Supervision of the worker loops: a panic in planning is logged, counted and recovered from,
//! and a loop that keeps failing turns liveness red. Runs the real service against the
//! simulators, with a fault hook only test builds have.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::*;
use crate::app::{RunningApp, StartOptions};
use crate::sim::env::{Simulators, eventually};
use crate::sim::org::{Customer, DynamicsOrg};

/// Faults a test injects into the worker.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Planning panics this many more times (at the start of a claimed batch).
    pub plan_panics: AtomicU32,
}

impl Hooks {
    pub(super) fn before_planning(&self) {
        let left = self
            .plan_panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left.is_ok() {
            panic!("injected planning failure");
        }
    }
}

struct Env {
    app: RunningApp,
    sims: Simulators,
    _dir: tempfile::TempDir,
}

const KEY: &str = "worker-test-webhook-key";

async fn start(tweak: impl FnOnce(&mut crate::config::Config)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sims = Simulators::start(Default::default()).await.unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.db").display());
    let mut config = sims.service_config(&url, KEY);
    Simulators::make_quick(&mut config);
    config.worker.restart_base_ms = 50;
    tweak(&mut config);
    let app = crate::app::start(
        config,
        StartOptions {
            migrate: true,
            intake_only: false,
        },
    )
    .await
    .unwrap();
    Env { app, sims, _dir: dir }
}

fn worker(env: &Env) -> &Arc<WorkerContext> {
    env.app.worker.as_ref().unwrap()
}

async fn deliver(env: &Env, n: &crate::dynamics::compose::NotificationBuilder) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/webhooks/dynamics?code={KEY}", env.app.url()))
        .body(n.to_json());
    for (k, v) in n.headers() {
        req = req.header(k, v);
    }
    let status = req.send().await.unwrap().status();
    assert!(status.is_success(), "{status}");
}

async fn healthz(env: &Env) -> u16 {
    reqwest::get(format!("{}/healthz", env.app.url()))
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn failures(loop_name: &str) -> u64 {
    let Some(handle) = crate::service::metrics::install() else {
        return 0;
    };
    let needle = format!("oppsync_worker_loop_failures_total{{loop=\"{loop_name}\"}} ");
    handle
        .render()
        .lines()
        .find_map(|l| {
            l.strip_prefix(needle.as_str())
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_planning_is_counted_and_the_notification_is_planned_after_the_restart() {
    // A long lease: without the supervisor giving the leases back, the notification would
    // wait five minutes for its lease to expire.
    let env = start(|c| c.worker.lease_secs = 300).await;
    let before = failures("planner");
    worker(&env).test_hooks.plan_panics.store(1, Ordering::SeqCst);
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (id, n) = org.create_opportunity(
        "After a panic",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(5, 0),
        10,
    );
    deliver(&env, &n).await;
    let landed = eventually(Duration::from_secs(20), || async {
        env.sims.marketo.opportunities().contains_key(&id.to_string())
    })
    .await;
    assert!(landed, "the notification is planned and pushed after the restart");
    assert_eq!(
        worker(&env).test_hooks.plan_panics.load(Ordering::SeqCst),
        0,
        "the panic happened"
    );
    assert!(failures("planner") > before, "the failure is counted");
    assert_eq!(healthz(&env).await, 200, "one restart keeps the worker alive");
    assert!(!env.app.state.lifecycle.is_worker_gone());
    env.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_that_keeps_panicking_is_given_up_and_liveness_fails() {
    let env = start(|c| c.worker.restart_limit = 2).await;
    worker(&env)
        .test_hooks
        .plan_panics
        .store(u32::MAX, Ordering::SeqCst);
    assert_eq!(healthz(&env).await, 200);
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, n) = org.create_opportunity(
        "Never planned",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(5, 0),
        10,
    );
    deliver(&env, &n).await;
    let gone = eventually(Duration::from_secs(20), || async { healthz(&env).await == 503 }).await;
    assert!(gone, "liveness fails once the planner is given up");
    assert!(env.app.state.lifecycle.is_worker_gone());
    // Intake still stores what arrives: nothing accepted is lost while the pod is replaced.
    let (_, n) = org.create_opportunity(
        "Still accepted",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(5, 0),
        10,
    );
    deliver(&env, &n).await;
    env.app.stop().await;
}

#[tokio::test]
async fn the_lease_renewer_ends_with_its_batch() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let guard = AbortOnDrop(tokio::spawn(async move {
        let _tx = tx;
        std::future::pending::<()>().await;
    }));
    drop(guard);
    // The task was aborted: its sender is gone, so the channel closes.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .is_none(),
        "the renewer outlived its batch"
    );
}
