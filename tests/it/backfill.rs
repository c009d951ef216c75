//! The initial sync over real HTTP with the simulators: an organisation that existed before the
//! service ends in Marketo exactly as a calm webhook history of it would (with webhooks arriving
//! during the backfill too), a SIGKILL in the middle resumes without duplicates or many extra
//! calls, a cancel stops it, and the daily quota's reserve is left to live changes.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::dynamics::{AttributeValue, Attributes};
use oppsync::sim::dataverse::DataverseSim;
use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::{MarketoSim, MarketoSimConfig};
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::process::set_env;
use oppsync::sim::scenario::{existing_org, view};
use oppsync::store::{Commit, Phase, PlannedWrite, Store, WriteKey};
use oppsync::worker::backfill::{self, BackfillPhase, BackfillStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};
use crate::support::jwt;
use crate::support::process::{free_port, serve_env, start_serve};

const START: i64 = 1_750_000_000_000;

/// Marketo's concurrency and call budget per window, in a window ten times shorter (the other
/// end-to-end tests' scaling): the runs are about convergence, not waiting.
fn roomy() -> MarketoSimConfig {
    MarketoSimConfig {
        calls_per_window: 100,
        window: Duration::from_secs(2),
        max_concurrent: 10,
        ..MarketoSimConfig::default()
    }
}

async fn simulators(marketo: MarketoSimConfig) -> Simulators {
    Simulators {
        marketo: MarketoSim::start(marketo.clone()).await.unwrap(),
        marketo_config: marketo,
        dataverse: DataverseSim::start().await.unwrap(),
    }
}

/// The service on `sims` (already holding the organisation), with `backfill.on_empty_store`.
async fn backfill_env(sims: Simulators, page_size: u32) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        sims: Some(sims),
        tweak: Some(Box::new(move |c| {
            c.backfill.on_empty_store = true;
            c.backfill.page_size = page_size;
            // As `serve` has it: partial batches wait a moment to fill up (fewest calls).
            c.marketo.batch_linger_ms = 1_000;
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await
}

/// Delivers `notifications` over HTTP, several at a time, in order of start.
async fn deliver_all(env: &TestEnv, notifications: &[NotificationBuilder]) {
    futures::stream::iter(notifications)
        .map(|n| env.deliver(n))
        .buffered(16)
        .collect::<Vec<()>>()
        .await;
}

async fn admin(env: &TestEnv, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", env.app.url());
    let req = match method {
        "POST" => env.http.post(url),
        "DELETE" => env.http.delete(url),
        _ => env.http.get(url),
    };
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    let r = req.bearer_auth(jwt::write_token()).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the stored backfill ended and every write is settled.
async fn backfill_done(env: &TestEnv, timeout: Duration) -> backfill::BackfillJob {
    let store = &env.app.state.store;
    let ended = eventually(timeout, || async {
        backfill::load(store)
            .await
            .unwrap()
            .is_some_and(|j| j.status != BackfillStatus::Running)
    })
    .await;
    let job = backfill::load(store).await.unwrap().unwrap();
    assert!(ended, "the backfill did not end: {job:?}");
    env.settle_within(timeout, false).await;
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_that_existed_before_the_service_ends_as_a_calm_webhook_history() {
    let calm = TestEnv::start_with(EnvOptions {
        marketo: Some(roomy()),
        ..EnvOptions::default()
    })
    .await;
    let sims = simulators(roomy()).await;
    let mut org = DynamicsOrg::new(START, Some(calm.sims.dataverse.clone()));
    org.mirror_to(sims.dataverse.clone());
    let history = existing_org(5_000, &mut org);
    assert_eq!(sims.dataverse.rows("opportunities").len(), 5_000);
    assert_eq!(
        sims.dataverse.rows("connections").len(),
        2 * 7_500,
        "7,500 pairs of rows"
    );

    let env = backfill_env(sims, 200).await;
    deliver_all(&calm, &history).await;
    calm.settle_within(Duration::from_secs(240), false).await;
    let job = backfill_done(&env, Duration::from_secs(240)).await;

    assert_eq!(job.status, BackfillStatus::Completed);
    assert_eq!(job.opportunities_read, 5_000);
    assert_eq!(job.connections_read, 7_500);
    assert_eq!(job.estimated_total, Some(5_000));
    let expected = view(&calm.sims.marketo);
    assert_eq!(expected.opportunities.len(), 5_000);
    assert_eq!(view(&env.sims.marketo), expected);

    let (status, progress) = admin(&env, "GET", "/admin/backfill", None).await;
    assert_eq!(status, 200, "{progress}");
    assert_eq!(progress["status"], json!("completed"));
    assert_eq!(progress["phase"], json!("done"));
    assert_eq!(progress["marketo_writes_pending"], json!(0));
    assert!(progress["rows_read"].as_u64().unwrap() > 12_500, "{progress}");
    env.stop().await;
    calm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_older_and_newer_than_what_the_backfill_reads_converge_with_it() {
    let calm = TestEnv::start_with(EnvOptions {
        marketo: Some(roomy()),
        ..EnvOptions::default()
    })
    .await;
    let sims = simulators(roomy()).await;
    sims.dataverse.set_latency(Duration::from_millis(10));
    let mut org = DynamicsOrg::new(START, Some(calm.sims.dataverse.clone()));
    org.mirror_to(sims.dataverse.clone());
    let history = existing_org(600, &mut org);
    let opportunities: Vec<Uuid> = sims
        .dataverse
        .rows("opportunities")
        .iter()
        .map(|r| Uuid::parse_str(r["opportunityid"].as_str().unwrap()).unwrap())
        .collect();

    let env = backfill_env(sims, 25).await;
    // Older: the history's own notifications of some records arrive while the backfill reads.
    let older: Vec<NotificationBuilder> = history.iter().step_by(7).cloned().collect();
    // Newer: changes made in Dynamics now, each with its webhook.
    let mut newer = Vec::new();
    for (i, id) in opportunities.iter().enumerate().step_by(9) {
        let mut changes = Attributes::new();
        changes.insert("closeprobability".into(), AttributeValue::Int(90));
        changes.insert("name".into(), AttributeValue::String(format!("Renamed {i}")));
        newer.push(org.update_opportunity(*id, changes));
    }
    newer.extend(org.delete_opportunity(opportunities[5]));
    newer.push(org.win(opportunities[11]));
    for (i, (o, n)) in older.iter().zip(newer.iter()).enumerate() {
        env.deliver(o).await;
        env.deliver(n).await;
        if i == 0 {
            let job = backfill::load(&env.app.state.store).await.unwrap().unwrap();
            assert_eq!(
                job.status,
                BackfillStatus::Running,
                "webhooks arrive during the backfill"
            );
            assert!(job.opportunities_read < 600, "{job:?}");
        }
    }
    for n in older
        .iter()
        .skip(newer.len())
        .chain(newer.iter().skip(older.len()))
    {
        env.deliver(n).await;
    }

    deliver_all(&calm, &history).await;
    deliver_all(&calm, &newer).await;
    calm.settle_within(Duration::from_secs(120), false).await;
    let job = backfill_done(&env, Duration::from_secs(120)).await;
    assert_eq!(job.status, BackfillStatus::Completed);
    let expected = view(&calm.sims.marketo);
    assert_eq!(expected.opportunities.len(), 599);
    assert_eq!(view(&env.sims.marketo), expected);
    env.stop().await;
    calm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_midway_resumes_without_duplicates_or_many_more_calls() {
    // The reference: the same organisation back-filled without interruption.
    let reference_sims = simulators(roomy()).await;
    let sims = simulators(roomy()).await;
    let mut org = DynamicsOrg::new(START, Some(reference_sims.dataverse.clone()));
    org.mirror_to(sims.dataverse.clone());
    existing_org(3_000, &mut org);
    let reference = backfill_env(reference_sims, 50).await;
    backfill_done(&reference, Duration::from_secs(180)).await;
    let minimum = reference.sims.marketo.rest_call_count();

    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("oppsync.db").display());
    let port = free_port();
    let mut env = serve_env(&sims, &store_url, port);
    set_env(&mut env, "OPPSYNC__BACKFILL__ON_EMPTY_STORE", "true");
    set_env(&mut env, "OPPSYNC__BACKFILL__PAGE_SIZE", "50");
    let mut serve = start_serve(&env, port).await;
    let store = Store::connect(&store_url, 2).await.unwrap();
    let midway = eventually(Duration::from_secs(120), || async {
        backfill::load(&store)
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.pages_read >= 25)
    })
    .await;
    assert!(midway, "{:?}", backfill::load(&store).await);
    serve.kill9();
    let killed_at = backfill::load(&store).await.unwrap().unwrap();
    assert_eq!(killed_at.status, BackfillStatus::Running);
    assert!(killed_at.opportunities_read < 3_000);

    let port = free_port();
    let mut env = serve_env(&sims, &store_url, port);
    set_env(&mut env, "OPPSYNC__BACKFILL__ON_EMPTY_STORE", "true");
    set_env(&mut env, "OPPSYNC__BACKFILL__PAGE_SIZE", "50");
    let serve = start_serve(&env, port).await;
    let done = eventually(Duration::from_secs(180), || async {
        backfill::load(&store)
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.status == BackfillStatus::Completed)
            && store.is_idle().await.unwrap_or(false)
    })
    .await;
    let job = backfill::load(&store).await.unwrap().unwrap();
    assert!(done, "{job:?}");
    // It went on from where it stopped: no page was read twice but the one being planned.
    assert_eq!(job.id, killed_at.id);
    assert_eq!(job.opportunities_read, 3_000, "{job:?}");
    assert_eq!(job.pages_read, 60, "{job:?}");

    assert_eq!(view(&sims.marketo), view(&reference.sims.marketo));
    let emails: Vec<String> = sims
        .marketo
        .leads()
        .values()
        .filter_map(|l| l.get("email").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let distinct: BTreeSet<&String> = emails.iter().collect();
    assert_eq!(emails.len(), distinct.len(), "no lead was created twice");
    assert_eq!(sims.marketo.leads().len(), reference.sims.marketo.leads().len());
    let calls = sims.marketo.rest_call_count();
    println!("Marketo calls: {calls} with a SIGKILL, {minimum} without");
    assert!(
        calls as f64 <= minimum as f64 * 1.1,
        "{calls} calls with a SIGKILL, {minimum} without"
    );
    drop(serve);
    reference.stop().await;
}

#[tokio::test]
async fn a_backfill_is_started_followed_and_cancelled_through_the_admin_api() {
    let sims = simulators(roomy()).await;
    sims.dataverse.set_latency(Duration::from_millis(20));
    let mut org = DynamicsOrg::new(START, Some(sims.dataverse.clone()));
    existing_org(1_000, &mut org);
    let env = TestEnv::start_with(EnvOptions {
        sims: Some(sims),
        tweak: Some(Box::new(|c| {
            c.backfill.page_size = 10;
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await;

    let (s, body) = admin(&env, "GET", "/admin/backfill", None).await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = admin(
        &env,
        "POST",
        "/admin/backfill",
        Some(json!({"since": "yesterday"})),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("RFC 3339"), "{body}");
    let (s, body) = admin(&env, "POST", "/admin/backfill", Some(json!({"filtre": "x"}))).await;
    assert_eq!(s, 400, "{body}");
    // A read-only token may follow but not start one.
    let r = env
        .http
        .post(format!("{}/admin/backfill", env.app.url()))
        .bearer_auth(jwt::read_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let (s, started) = admin(
        &env,
        "POST",
        "/admin/backfill",
        Some(json!({"filter": "statecode eq 0", "since": "2020-01-01T00:00:00+02:00"})),
    )
    .await;
    assert_eq!(s, 202, "{started}");
    assert_eq!(started["status"], json!("running"));
    assert_eq!(started["since"], json!("2019-12-31T22:00:00Z"));
    let (s, body) = admin(&env, "POST", "/admin/backfill", None).await;
    assert_eq!(s, 409, "{body}");

    let store = &env.app.state.store;
    let reading = eventually(Duration::from_secs(30), || async {
        backfill::load(store)
            .await
            .unwrap()
            .is_some_and(|j| j.opportunities_read >= 20)
    })
    .await;
    assert!(reading);
    let (s, progress) = admin(&env, "GET", "/admin/backfill", None).await;
    assert_eq!(s, 200);
    assert_eq!(progress["estimated_total"], json!(1_000));
    assert!(progress["eta_secs"].as_u64().is_some(), "{progress}");
    assert!(progress["quota_left"].as_u64().is_some(), "{progress}");

    let (s, cancelled) = admin(&env, "DELETE", "/admin/backfill", None).await;
    assert_eq!(s, 200, "{cancelled}");
    assert_eq!(cancelled["status"], json!("cancelled"));
    let stopped = eventually(Duration::from_secs(10), || async {
        backfill::load(store)
            .await
            .unwrap()
            .is_some_and(|j| j.status == BackfillStatus::Cancelled && j.phase == BackfillPhase::Done)
    })
    .await;
    assert!(stopped, "{:?}", backfill::load(store).await);
    let read = backfill::load(store).await.unwrap().unwrap().opportunities_read;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        backfill::load(store).await.unwrap().unwrap().opportunities_read,
        read
    );
    assert!(read < 1_000);
    let (s, _) = admin(&env, "DELETE", "/admin/backfill", None).await;
    assert_eq!(s, 409, "nothing left to cancel");

    // A new one may start at once.
    let (s, again) = admin(&env, "POST", "/admin/backfill", Some(json!({}))).await;
    assert_eq!(s, 202, "{again}");
    assert_ne!(again["id"], started["id"]);
    let (s, _) = admin(&env, "DELETE", "/admin/backfill", None).await;
    assert_eq!(s, 200);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_pauses_at_the_quota_reserve_and_live_changes_still_go() {
    let sims = simulators(MarketoSimConfig {
        daily_quota: 70,
        ..roomy()
    })
    .await;
    let mut org = DynamicsOrg::new(START, Some(sims.dataverse.clone()));
    existing_org(2_000, &mut org);
    let opportunity = Uuid::parse_str(
        sims.dataverse.rows("opportunities")[0]["opportunityid"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let env = TestEnv::start_with(EnvOptions {
        sims: Some(sims),
        tweak: Some(Box::new(|c| {
            c.backfill.on_empty_store = true;
            c.backfill.page_size = 50;
            c.backfill.quota_reserve = 40;
            c.backfill.max_queued_writes = 300;
        })),
        ..EnvOptions::default()
    })
    .await;
    let store = &env.app.state.store;
    let paused = eventually(Duration::from_secs(60), || async {
        backfill::load(store)
            .await
            .unwrap()
            .is_some_and(|j| j.phase == BackfillPhase::WaitingForQuota)
            && store.pending_background_writes().await.unwrap() == 0
    })
    .await;
    let job = backfill::load(store).await.unwrap().unwrap();
    assert!(paused, "{job:?}");
    assert!(job.opportunities_read < 2_000);
    let used = env.sims.marketo.rest_call_count();
    // What was queued when it paused still went: a few calls past the line at most.
    assert!(used <= 70 - 40 + 6, "{used} calls: the reserve is kept");

    // A live change still reaches Marketo, from the reserve.
    let mut changes = Attributes::new();
    changes.insert("name".into(), AttributeValue::String("Live rename".into()));
    let n = org.update_opportunity(opportunity, changes);
    env.deliver(&n).await;
    let pushed = eventually(Duration::from_secs(30), || async {
        env.sims
            .marketo
            .opportunities()
            .get(&opportunity.to_string())
            .is_some_and(|o| o.get("name") == Some(&json!("Live rename")))
    })
    .await;
    assert!(pushed);
    assert_eq!(
        backfill::load(store).await.unwrap().unwrap().phase,
        BackfillPhase::WaitingForQuota
    );
    env.stop().await;
}

#[tokio::test]
async fn live_writes_go_before_background_writes_of_the_same_phase() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display()), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let write = |id: Uuid| PlannedWrite {
        key: WriteKey::Opportunity(id),
        opportunity_id: Some(id),
        phase: Phase::Opportunities,
        payload: json!({"k": id}).to_string(),
    };
    store
        .commit(&Commit {
            writes: vec![write(a), write(b)],
            background: true,
            ..Commit::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .commit(&Commit {
            writes: vec![write(c)],
            ..Commit::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A live plan of a record waiting in the background makes it live.
    store
        .commit(&Commit {
            writes: vec![PlannedWrite {
                payload: json!({"k": "b2"}).to_string(),
                ..write(b)
            }],
            ..Commit::default()
        })
        .await
        .unwrap();
    let order: Vec<WriteKey> = store
        .ready_writes(oppsync::store::now_ms() + 1_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.key)
        .collect();
    assert_eq!(
        order,
        [
            WriteKey::Opportunity(c),
            WriteKey::Opportunity(b),
            WriteKey::Opportunity(a)
        ]
    );
    assert_eq!(store.pending_background_writes().await.unwrap(), 1);
    // And a background plan of a live pending write leaves it live.
    store
        .commit(&Commit {
            writes: vec![PlannedWrite {
                payload: json!({"k": "c2"}).to_string(),
                ..write(c)
            }],
            background: true,
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(store.pending_background_writes().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_command_starts_it_shows_progress_and_exits_when_it_ends() {
    let sims = simulators(roomy()).await;
    let mut org = DynamicsOrg::new(START, Some(sims.dataverse.clone()));
    existing_org(300, &mut org);
    let env = TestEnv::start_with(EnvOptions {
        sims: Some(sims),
        tweak: Some(Box::new(|c| {
            c.backfill.page_size = 20;
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await;
    let binary = env!("CARGO_BIN_EXE_oppsync");
    let without_token = tokio::process::Command::new(binary)
        .args(["backfill", "--url", &env.app.url()])
        .env_remove("OPPSYNC_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(without_token.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&without_token.stderr).contains("OPPSYNC_ADMIN_TOKEN"));

    let out = tokio::process::Command::new(binary)
        .args(["backfill", "--url", &env.app.url(), "--filter", "statecode eq 0"])
        .env("OPPSYNC_ADMIN_TOKEN", jwt::write_token())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("started"), "{stderr}");
    assert!(
        stdout.contains("opportunities read"),
        "plain progress lines off a terminal: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("backfill completed: 300 opportunities"),
        "{stdout}"
    );
    env.settle().await;
    assert_eq!(env.sims.marketo.opportunities().len(), 300);
    env.stop().await;
}
