//! Initial-sync benchmark: an organisation of N opportunities (default 100,000) with 1.5
//! stakeholder connections each (150,000 pairs), half of them with a contact as potential
//! customer, already in the Dataverse simulator; `oppsync serve` (the release binary, as a child
//! process) starts on an empty store with `backfill.on_empty_store` and syncs it into the Marketo
//! simulator at Marketo's real rate (100 calls / 20 s = 5 calls/s, 10 concurrent, 300 records a
//! call) scaled in time ten-fold like the other benches: 10 calls per 2 s window.
//!
//! Prints the elapsed time against the time the rate alone needs for the calls the records
//! require at 300 a call (target: at most 1.1x), the Dataverse requests made and the 429s met
//! (some are injected), and the service's peak resident memory (target: at most 64 MiB; pages
//! are streamed, never the organisation held).
//!
//! `cargo bench --bench backfill` (`-- --opportunities N` for another size, `--page-size N` for
//! another `backfill.page_size`, `--dataverse-429 N` to inject another number of 429s,
//! `--call-sizes` to list every Marketo call's time and records by endpoint).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::process::{ServeProcess, free_port, serve_env, set_env};
use oppsync::sim::scenario::existing_org;
use oppsync::store::Store;
use oppsync::worker::backfill::{self, BackfillStatus};
use serde_json::Value;

#[path = "support/args.rs"]
mod args;
use args::value_after;

const CALLS_PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(2);
const BATCH: usize = 300;
const KEY: &str = "bench-webhook-key";

/// Time the rate limit needs for `calls` calls: the first window's worth at once, then
/// CALLS_PER_WINDOW per window.
fn rate_bound_seconds(calls: usize) -> f64 {
    let windows = calls.div_ceil(CALLS_PER_WINDOW as usize).saturating_sub(1);
    windows as f64 * WINDOW.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opportunities: usize = value_after("--opportunities").unwrap_or(100_000);
    let page_size: u32 = value_after("--page-size").unwrap_or(500);
    let injected_429: u32 = value_after("--dataverse-429").unwrap_or(5);
    let sims = Simulators::start(MarketoSimConfig {
        calls_per_window: CALLS_PER_WINDOW,
        window: WINDOW,
        max_concurrent: 10,
        ..MarketoSimConfig::default()
    })
    .await?;
    let seeding = Instant::now();
    {
        let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
        existing_org(opportunities, &mut org);
    }
    let connection_rows = sims.dataverse.rows("connections").len();
    println!(
        "organisation: {opportunities} opportunities, {} stakeholder connections ({connection_rows} rows), seeded in {:.1} s",
        connection_rows / 2,
        seeding.elapsed().as_secs_f64()
    );
    sims.dataverse.inject_429(injected_429, 1);

    let dir = tempfile::tempdir()?;
    let store_url = format!("sqlite://{}", dir.path().join("oppsync.db").display());
    let port = free_port()?;
    let mut env = serve_env(&sims, &store_url, port, KEY);
    set_env(&mut env, "OPPSYNC__BACKFILL__ON_EMPTY_STORE", "true");
    set_env(&mut env, "OPPSYNC__BACKFILL__PAGE_SIZE", &page_size.to_string());
    set_env(&mut env, "OPPSYNC__RECONCILE__INTERVAL_SECS", "0");
    let log = dir.path().join("serve.log");
    let started = Instant::now();
    let serve =
        ServeProcess::start_logging(Path::new(env!("CARGO_BIN_EXE_oppsync")), &env, port, Some(&log)).await?;
    let store = Store::connect(&store_url, 2).await?;
    let mut last_print = Instant::now();
    let job = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let job = backfill::load(&store).await?;
        if let Some(j) = &job {
            if last_print.elapsed() >= Duration::from_secs(15) {
                last_print = Instant::now();
                println!(
                    "  {:>6.1} s  {:?} {:?}: {} opportunities read, {} writes queued",
                    started.elapsed().as_secs_f64(),
                    j.status,
                    j.phase,
                    j.opportunities_read,
                    j.writes_queued
                );
            }
            if j.status != BackfillStatus::Running && store.is_idle().await? {
                break j.clone();
            }
        }
        if started.elapsed() > Duration::from_secs(3_600) {
            anyhow::bail!("the backfill did not end within an hour: {job:?}");
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let peak_rss_kib = serve.peak_rss_kib();
    drop(serve);

    // Records and calls by endpoint (a lookup apart from a write of the same path).
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    let mut calls_per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    let mut sizes_per_endpoint: BTreeMap<String, Vec<(f64, usize)>> = BTreeMap::new();
    let mut marketo_calls = 0;
    for c in sims.marketo.calls() {
        if c.path.starts_with("/identity") {
            continue;
        }
        marketo_calls += 1;
        let records = match c.body.get("input").and_then(Value::as_array) {
            Some(a) => a.len(),
            None => c
                .body
                .as_str()
                .map(|b| b.matches("%40").count())
                .unwrap_or(1)
                .max(1),
        };
        let key = if c.query.contains("_method=GET") {
            format!("{} (lookup)", c.path)
        } else {
            c.path.clone()
        };
        sizes_per_endpoint
            .entry(key.clone())
            .or_default()
            .push((c.at.saturating_duration_since(started).as_secs_f64(), records));
        *per_endpoint.entry(key.clone()).or_default() += records;
        *calls_per_endpoint.entry(key).or_default() += 1;
    }
    let records: usize = per_endpoint.values().sum();
    let minimum_calls: usize = per_endpoint.values().map(|n| n.div_ceil(BATCH)).sum();
    let rate_only = rate_bound_seconds(minimum_calls);
    let dataverse = sims.dataverse.calls();
    let dataverse_requests = dataverse.iter().filter(|c| c.path.contains("/api/")).count();
    let throttled = dataverse.iter().filter(|c| c.status == 429).count();

    println!("backfill of {opportunities} opportunities (page size {page_size})");
    println!(
        "  job                               {:?}, {} pages",
        job.status, job.pages_read
    );
    println!(
        "  rows read                         {} opportunities, {} connections, {} contacts",
        job.opportunities_read, job.connections_read, job.contacts_read
    );
    println!("  records written to Marketo        {records:>8}");
    println!(
        "  calls used / minimum possible     {marketo_calls:>8} / {minimum_calls} = {:.2}x",
        marketo_calls as f64 / minimum_calls.max(1) as f64
    );
    for (endpoint, records) in &per_endpoint {
        let calls = calls_per_endpoint.get(endpoint).copied().unwrap_or(0);
        println!(
            "    {endpoint:<40} {records:>7} records in {calls:>4} calls (minimum {})",
            records.div_ceil(BATCH)
        );
    }
    if std::env::args().any(|a| a == "--call-sizes") {
        for (endpoint, sizes) in &sizes_per_endpoint {
            let list: Vec<String> = sizes.iter().map(|(t, n)| format!("{t:.0}s:{n}")).collect();
            println!("    {endpoint}: {}", list.join(" "));
        }
    }
    println!(
        "  elapsed / rate limit alone        {elapsed:>8.1} s / {rate_only:.1} s = {:.3}x (target <= 1.1x)",
        elapsed / rate_only.max(0.001)
    );
    println!(
        "  Dataverse requests                {dataverse_requests:>8} ({throttled} answered 429, Retry-After honoured)"
    );
    match peak_rss_kib {
        Some(kib) => println!(
            "  peak RSS of the service           {:>8.1} MiB (target <= 64 MiB)",
            kib as f64 / 1024.0
        ),
        None => println!("  peak RSS of the service           unknown (no /proc)"),
    }
    Ok(())
}
