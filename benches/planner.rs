//! Planning benchmark: how fast the planner turns stored notifications into Marketo writes.
//! A realistic mix (creates, updates, stakeholder connections, contact changes: the bulk
//! workload of `sim::scenario`) for 13,334 opportunities, about 100,000 notifications, is first
//! stored with no worker running; then the service starts with pushing paused and the planner
//! drains the inbox. Prints notifications planned per second and the process's CPU time per
//! notification (user + system, from /proc/self/stat).
//!
//! `cargo bench --bench planner` (`-- --opportunities N` for another size, `--claim-batch N` for
//! another `worker.claim_batch`).

use std::time::{Duration, Instant};

use oppsync::app::{StartOptions, start};
use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;

#[path = "support/args.rs"]
mod args;
use args::value_after;

/// The allocator the `oppsync` binary ships with (src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const KEY: &str = "bench-webhook-key";

/// CPU time of this process so far (user + system), from /proc/self/stat in clock ticks of
/// 1/100 s (Linux's USER_HZ on x86_64 and arm64).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main]
async fn main() {
    let opportunities: usize = value_after("--opportunities").unwrap_or(13_334);
    let sims = Simulators::start(MarketoSimConfig::default())
        .await
        .unwrap_or_else(|e| panic!("simulators: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut config = sims.service_config(&format!("sqlite://{}", dir.path().join("p.db").display()), KEY);
    config.worker.paused = true;
    if let Some(n) = value_after("--claim-batch") {
        config.worker.claim_batch = n;
    }
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let notifications = oppsync::sim::scenario::bulk_workload(opportunities, &mut org);
    let wires: Vec<(String, Vec<(String, String)>)> =
        notifications.iter().map(|n| (n.to_json(), n.headers())).collect();

    // Stored with no worker: the inbox holds the whole mix before planning starts.
    let intake = start(
        config.clone(),
        StartOptions {
            migrate: true,
            intake_only: true,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let url = format!("{}/webhooks/dynamics?code={KEY}", intake.url());
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for chunk in wires.chunks(wires.len().div_ceil(16)) {
        let (http, url, chunk) = (http.clone(), url.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for (body, headers) in chunk {
                let mut req = http.post(&url).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let r = req.send().await.unwrap_or_else(|e| panic!("post: {e}"));
                assert!(r.status().is_success(), "intake answered {}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("posting task: {e}"));
    }
    intake.stop().await;

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let app = start(
        config,
        StartOptions {
            migrate: false,
            intake_only: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let store = app.state.store.clone();
    while store.pending_counts().await.map(|(inbox, _)| inbox).unwrap_or(1) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let (_, writes) = store.pending_counts().await.unwrap_or((0, 0));
    let n = wires.len() as f64;
    println!(
        "planning {} notifications ({opportunities} opportunities) into {writes} pending Marketo writes: {:.1} s, {:.0} notifications/s, {:.0} µs CPU per notification ({:.2} cores busy)",
        wires.len(),
        seconds,
        n / seconds,
        cpu * 1e6 / n,
        cpu / seconds
    );
    app.stop().await;
}
