//! Several replicas on one PostgreSQL database: all accept webhooks, workers share the inbox,
//! exactly one pushes to Marketo, and when it is killed another takes over.

use std::time::Duration;

use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;
use oppsync::store::{Store, now_ms};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::support::app::{KEY, TestEnv};
use crate::support::pg::TestDatabase;
use crate::support::process::{ServeProcess, free_port, serve_env, start_serve};
use crate::support::scenario::{history, view};

const CALLS_PER_WINDOW: u32 = 8;
const WINDOW: Duration = Duration::from_secs(1);
const MAX_CONCURRENT: u32 = 3;

async fn leader(http: &reqwest::Client, replicas: &[ServeProcess]) -> Option<usize> {
    for (i, r) in replicas.iter().enumerate() {
        if let Ok(resp) = http.get(format!("{}/readyz", r.url)).send().await
            && let Ok(body) = resp.json::<Value>().await
            && body["checks"]["pusher"] == "leader"
        {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_postgres_survive_the_pushing_replica_being_killed() {
    // The reference: the same history, in order, on one calm SQLite instance.
    let calm = TestEnv::start().await;
    let sims = Simulators::start(MarketoSimConfig {
        calls_per_window: CALLS_PER_WINDOW,
        window: WINDOW,
        max_concurrent: MAX_CONCURRENT,
        ..MarketoSimConfig::default()
    })
    .await
    .unwrap();
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(calm.sims.dataverse.clone()));
    org.mirror_to(sims.dataverse.clone());
    let mut notifications = Vec::new();
    for seed in 300..306 {
        notifications.extend(history(seed, &mut org));
    }
    for n in &notifications {
        calm.deliver(n).await;
    }
    calm.settle_within(Duration::from_secs(60), false).await;

    let db = TestDatabase::create().await.unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let env = serve_env(&sims, &db.url, port);
        replicas.push(start_serve(&env, port).await);
    }
    let http = reqwest::Client::new();
    let mut rng = StdRng::seed_from_u64(7);
    let mut disorder: Vec<_> = notifications.iter().collect();
    disorder.shuffle(&mut rng);
    let half = disorder.len() / 2;
    let mut killed = None;
    for (i, n) in disorder.iter().enumerate() {
        if i == half {
            let pusher = eventually(Duration::from_secs(10), || async {
                leader(&http, &replicas).await.is_some()
            })
            .await;
            assert!(pusher, "one replica pushes");
            let k = leader(&http, &replicas).await.unwrap();
            replicas[k].kill9();
            killed = Some(k);
        }
        // Spread over the live replicas; Dynamics retries a failed delivery once elsewhere.
        let live: Vec<&ServeProcess> = replicas
            .iter()
            .enumerate()
            .filter(|(j, _)| Some(*j) != killed)
            .map(|(_, r)| r)
            .collect();
        let target = live[i % live.len()];
        let mut req = http
            .post(format!("{}/webhooks/dynamics?code={KEY}", target.url))
            .body(n.to_json());
        for (k, v) in n.headers() {
            req = req.header(k, v);
        }
        let status = req.send().await.unwrap().status();
        assert!(status.is_success(), "{status}");
    }
    let live: Vec<&ServeProcess> = replicas
        .iter()
        .enumerate()
        .filter(|(j, _)| Some(*j) != killed)
        .map(|(_, r)| r)
        .collect();
    let took_over = eventually(Duration::from_secs(10), || async {
        for r in &live {
            if let Ok(resp) = http.get(format!("{}/readyz", r.url)).send().await
                && let Ok(body) = resp.json::<Value>().await
                && body["checks"]["pusher"] == "leader"
            {
                return true;
            }
        }
        false
    })
    .await;
    assert!(took_over, "another replica took over pushing within seconds");

    let store = Store::connect(&db.url, 2).await.unwrap();
    let idle = eventually(Duration::from_secs(120), || async {
        store.is_idle().await.unwrap_or(false)
    })
    .await;
    let stats = store.stats(now_ms()).await.unwrap();
    assert!(idle, "{stats:?}");
    assert_eq!((stats.inbox_dead, stats.writes_dead), (0, 0), "{stats:?}");
    assert_eq!(
        stats.inbox_done as usize,
        notifications.len(),
        "every accepted notification applied"
    );
    assert_eq!(
        view(&sims.marketo),
        view(&calm.sims.marketo),
        "Marketo ends as with in-order delivery"
    );
    assert!(
        sims.marketo.max_concurrent_seen() <= MAX_CONCURRENT,
        "concurrency {}",
        sims.marketo.max_concurrent_seen()
    );
    assert!(
        sims.marketo.max_calls_in_any_window() <= CALLS_PER_WINDOW as usize,
        "calls in a window: {}",
        sims.marketo.max_calls_in_any_window()
    );
    assert_eq!(sims.marketo.count_606() + sims.marketo.count_615(), 0);
    drop(replicas);
    drop(store);
    calm.stop().await;
    db.drop_now().await;
}
