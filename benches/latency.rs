//! Propagation latency at quiet load: one opportunity change every 1.5 s, posted to the real
//! service (HTTP intake, SQLite store, planner, pusher, Marketo client) with its production
//! settings, against the Marketo simulator at Marketo's real limits (100 calls / 20 s, 10
//! concurrent). Each sample is the time from intake's 202 to the moment the simulator holds the
//! new value. Prints p50, p90 and the largest.
//!
//! `cargo bench --bench latency` (`-- --samples N` for another count than 40, `--every-ms N`
//! for another pace than 1500, `--linger-ms N` for another `marketo.batch_linger_ms`).

use std::time::{Duration, Instant};

use oppsync::app::{StartOptions, start};
use oppsync::dynamics::{AttributeValue, Attributes};
use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::{Customer, DynamicsOrg};
use rust_decimal::Decimal;
use serde_json::Value;

#[path = "support/args.rs"]
mod args;
use args::value_after;

/// The allocator the `oppsync` binary ships with (src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const KEY: &str = "bench-webhook-key";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let samples: usize = value_after("--samples").unwrap_or(40);
    let every = Duration::from_millis(value_after("--every-ms").unwrap_or(1_500));
    let sims = Simulators::start(MarketoSimConfig::default())
        .await
        .unwrap_or_else(|e| panic!("simulators: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut config = sims.service_config(&format!("sqlite://{}", dir.path().join("l.db").display()), KEY);
    // Production settings, not the simulators' quick test ones.
    config.worker.poll_interval_ms = oppsync::config::Config::default().worker.poll_interval_ms;
    if let Some(ms) = value_after("--linger-ms") {
        config.marketo.batch_linger_ms = ms;
    }
    println!(
        "latency at quiet load: one change every {} ms, {samples} samples; marketo.batch_linger_ms = {}, worker.poll_interval_ms = {}",
        every.as_millis(),
        config.marketo.batch_linger_ms,
        config.worker.poll_interval_ms
    );
    let app = start(
        config,
        StartOptions {
            migrate: true,
            intake_only: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let url = format!("{}/webhooks/dynamics?code={KEY}", app.url());
    let http = reqwest::Client::new();
    let post = |n: oppsync::dynamics::compose::NotificationBuilder| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let mut req = http.post(&url).body(n.to_json());
            for (k, v) in n.headers() {
                req = req.header(k, v);
            }
            let r = req.send().await.unwrap_or_else(|e| panic!("post: {e}"));
            assert!(r.status().is_success(), "intake answered {}", r.status());
            Instant::now()
        }
    };
    let holds = |id: &str, name: &str| {
        sims.marketo
            .opportunities()
            .get(id)
            .is_some_and(|o| o.get("name") == Some(&Value::String(name.to_owned())))
    };

    // The opportunity exists in Dynamics and in Marketo before the clock starts.
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let (ann, contact) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    post(contact).await;
    let (opp, created) = org.create_opportunity("Deal 0", Customer::Contact(ann), Decimal::new(1_000, 0), 50);
    post(created).await;
    let id = opp.to_string();
    let started = Instant::now();
    while !holds(&id, "Deal 0") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first sync never landed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(every).await;

    let mut latencies = Vec::with_capacity(samples);
    let mut next = Instant::now();
    for i in 1..=samples {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        next += every;
        let name = format!("Deal {i}");
        let mut changes = Attributes::new();
        changes.insert("name".into(), AttributeValue::String(name.clone()));
        let accepted = post(org.update_opportunity(opp, changes)).await;
        while !holds(&id, &name) {
            assert!(
                accepted.elapsed() < Duration::from_secs(30),
                "change {i} never landed"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(accepted.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "202 -> in Marketo: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; {} Marketo REST calls",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies[latencies.len() - 1],
        sims.marketo.rest_call_count()
    );
    app.stop().await;
}
