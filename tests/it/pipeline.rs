//! The whole pipeline under disorder and trouble: random histories delivered shuffled and
//! duplicated, Marketo and Dataverse faults, and a SIGKILL in the middle of a run. In every case
//! Marketo must end up exactly as in-order, trouble-free delivery leaves it.

use std::time::Duration;

use oppsync::dynamics::compose::NotificationBuilder;

use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::Fault;
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::{Status, Store, now_ms};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

use crate::support::app::{KEY, TestEnv};
use crate::support::process::{free_port, serve_env, start_serve};
use crate::support::scenario::{history, view};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_duplicated_and_replayed_histories_end_as_in_order_delivery() {
    for seed in 1..=6u64 {
        let in_order = TestEnv::start().await;
        let shuffled = TestEnv::start().await;
        let mut org = DynamicsOrg::new(1_750_000_000_000, Some(in_order.sims.dataverse.clone()));
        org.mirror_to(shuffled.sims.dataverse.clone());
        let notifications = history(seed, &mut org);

        for n in &notifications {
            in_order.deliver(n).await;
        }
        in_order.settle_within(Duration::from_secs(60), false).await;

        let mut rng = StdRng::seed_from_u64(seed * 7919);
        let mut disorder: Vec<&NotificationBuilder> = notifications.iter().collect();
        let repeats: Vec<&NotificationBuilder> =
            notifications.iter().filter(|_| rng.random_bool(0.3)).collect();
        disorder.extend(repeats);
        disorder.shuffle(&mut rng);
        for n in disorder {
            let r = shuffled.post(n).await;
            assert!(r.status() == 202 || r.status() == 200, "{}", r.status());
        }
        shuffled.settle_within(Duration::from_secs(60), false).await;
        // And a replay of everything, once settled, changes nothing.
        let before = shuffled.sims.marketo.rest_call_count();
        for n in &notifications {
            assert_eq!(shuffled.post(n).await.status(), 200);
        }
        shuffled.settle().await;
        assert_eq!(
            shuffled.sims.marketo.rest_call_count(),
            before,
            "a replay makes no Marketo call"
        );

        let expected = view(&in_order.sims.marketo);
        assert!(!expected.opportunities.is_empty());
        assert_eq!(view(&shuffled.sims.marketo), expected, "seed {seed}");
        in_order.stop().await;
        shuffled.stop().await;
    }
}

#[tokio::test]
async fn marketo_outage_rate_limits_and_token_expiry_delay_but_do_not_change_the_result() {
    let calm = TestEnv::start().await;
    let rough = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(calm.sims.dataverse.clone()));
    org.mirror_to(rough.sims.dataverse.clone());
    let notifications = history(42, &mut org);
    for n in &notifications {
        calm.deliver(n).await;
    }
    calm.settle().await;

    // The first changes go through calmly, so a token is in use when trouble starts.
    let (first, rest) = notifications.split_at(8);
    for n in first {
        rough.deliver(n).await;
    }
    rough.settle().await;
    let m = &rough.sims.marketo;
    m.inject(Fault::ExpireTokenNow);
    m.inject(Fault::HttpStatus {
        status: 503,
        times: 6,
    });
    m.inject(Fault::ErrorCode { code: 606, times: 3 });
    m.inject(Fault::ErrorCode { code: 615, times: 2 });
    m.inject(Fault::ErrorCode { code: 604, times: 2 });
    m.inject(Fault::DropConnection { times: 2 });
    m.inject(Fault::ErrorCode { code: 713, times: 2 });
    rough.sims.dataverse.inject_429(3, 1);
    for n in rest {
        rough.deliver(n).await;
    }
    rough.settle_within(Duration::from_secs(90), false).await;
    assert_eq!(view(&rough.sims.marketo), view(&calm.sims.marketo));
    assert!(m.token_issued_count() >= 2, "the expired token was replaced");
    calm.stop().await;
    rough.stop().await;
}

#[tokio::test]
async fn permanent_record_errors_become_dead_letters_with_marketos_code() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let account = Uuid::new_v4();
    let (good, n1) = org.create_opportunity("Fine", Customer::Account(account), Decimal::new(1, 0), 1);
    let (bad, n2) = org.create_opportunity("Refused", Customer::Account(account), Decimal::new(1, 0), 1);
    env.sims.marketo.inject(Fault::RecordError {
        external_ids: vec![bad.to_string()],
        code: "1006".into(),
        message: "Field 'amount' not found".into(),
    });
    env.deliver(&n1).await;
    env.deliver(&n2).await;
    env.settle_within(Duration::from_secs(30), true).await;
    let store = &env.app.state.store;
    let dead = store.list_writes(Some(Status::Dead), None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key.to_string(), format!("opportunity:{bad}"));
    let error = dead[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("1006") && error.contains("not found"), "{error}");
    assert!(env.sims.marketo.opportunities().contains_key(&good.to_string()));
    // Fixed on the Marketo side, the dead letter is re-driven and lands.
    env.sims.marketo.clear_faults();
    assert_eq!(store.retry_writes(None).await.unwrap(), 1);
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&bad.to_string()));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_run_then_restart_ends_complete_and_correct() {
    let calm = TestEnv::start().await;
    let sims = Simulators::start(Default::default()).await.unwrap();
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(calm.sims.dataverse.clone()));
    org.mirror_to(sims.dataverse.clone());
    let mut notifications = Vec::new();
    for seed in 100..104 {
        notifications.extend(history(seed, &mut org));
    }
    for n in &notifications {
        calm.deliver(n).await;
    }
    calm.settle_within(Duration::from_secs(60), false).await;

    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let mut serve = start_serve(&env, port).await;
    let http = reqwest::Client::new();
    let half = notifications.len() / 2;
    let post = |url: String, n: &NotificationBuilder| {
        let mut req = http
            .post(format!("{url}/webhooks/dynamics?code={KEY}"))
            .body(n.to_json());
        for (k, v) in n.headers() {
            req = req.header(k, v);
        }
        req.send()
    };
    for n in &notifications[..half] {
        assert!(post(serve.url.clone(), n).await.unwrap().status().is_success());
    }
    // Let the worker get going, then kill it mid-flight.
    tokio::time::sleep(Duration::from_millis(150)).await;
    serve.kill9();
    let port = free_port();
    let env = serve_env(&sims, &store_url, port);
    let serve = start_serve(&env, port).await;
    for n in &notifications[half..] {
        assert!(post(serve.url.clone(), n).await.unwrap().status().is_success());
    }
    let store = Store::connect(&store_url, 2).await.unwrap();
    let idle = eventually(Duration::from_secs(60), || async {
        store.is_idle().await.unwrap_or(false)
    })
    .await;
    assert!(idle, "{:?}", store.stats(now_ms()).await.unwrap());
    let stats = store.stats(now_ms()).await.unwrap();
    assert_eq!((stats.inbox_dead, stats.writes_dead), (0, 0));
    assert_eq!(view(&sims.marketo), view(&calm.sims.marketo));
    drop(serve);
    calm.stop().await;
}

#[tokio::test]
async fn a_dataverse_429_storm_delays_lookups_and_then_the_plan_completes() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let account = Uuid::new_v4();
    // The contact's own notification is not delivered: oppsync must read it.
    let (contact, _) = org.create_contact("Lu", "L", "lu@example.com", Some((account, "Lu Corp")));
    let (opp, n) = org.create_opportunity("Throttled", Customer::Contact(contact), Decimal::new(1, 0), 1);
    env.sims.dataverse.inject_429(12, 1);
    env.deliver(&n).await;
    env.settle_within(Duration::from_secs(60), false).await;
    let throttled = env
        .sims
        .dataverse
        .calls()
        .iter()
        .filter(|c| c.status == 429)
        .count();
    assert!(throttled >= 3, "the storm happened ({throttled} answers 429)");
    let o = env.sims.marketo.opportunities().remove(&opp.to_string()).unwrap();
    assert_eq!(o["externalCompanyId"], Value::String(account.to_string()));
    env.stop().await;
}
