//! Scenario 4: a backlog of notifications queued with pushing paused, then drained by the real
//! service against Marketo's real limits scaled in time (5 calls per 1 s window = Marketo's
//! 100 calls / 20 s, 10 concurrent): records per call, calls versus the minimum, drain time
//! versus the time the rate limit alone needs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::process::{ServeProcess, free_port, serve_env, set_env};
use oppsync::store::{Store, now_ms};
use serde_json::Value;

use crate::common::{KEY, Report, Wire, binary, mib, post, webhook_url, wire};

const CALLS_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);
const BATCH: usize = 300;
const CRITERION: &str = "everything lands (all opportunities, no dead letter), never over 5 calls/window or 10 concurrent, calls <= 1.5x minimum, drain <= 1.5x the rate-bound time + 5 s";

pub async fn run(notifications: usize) -> Report {
    let mut report = Report::new("backlog (SQLite)", CRITERION);
    if let Err(e) = run_inner(&mut report, notifications).await {
        report.fail(format!("{e:#}"));
    }
    report
}

async fn run_inner(report: &mut Report, target: usize) -> anyhow::Result<()> {
    let sims = Simulators::start(MarketoSimConfig {
        calls_per_window: CALLS_PER_WINDOW,
        window: WINDOW,
        max_concurrent: 10,
        ..MarketoSimConfig::default()
    })
    .await?;
    let mut org = DynamicsOrg::new(1_770_000_000_000, Some(sims.dataverse.clone()));
    // 7.5 notifications per opportunity (see `bulk_workload`).
    let opportunities = (target * 2).div_ceil(15);
    let wires: Vec<Wire> = oppsync::sim::scenario::bulk_workload(opportunities, &mut org)
        .iter()
        .map(wire)
        .collect::<anyhow::Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let store_url = format!("sqlite://{}", dir.path().join("backlog.db").display());
    let port = free_port()?;
    let mut env = serve_env(&sims, &store_url, port, KEY);
    set_env(&mut env, "OPPSYNC__WORKER__PAUSED", "true");
    // Production pacing knobs, not the tests' quick ones: this measures the pusher.
    set_env(&mut env, "OPPSYNC__MARKETO__TIMEOUT_SCALE", "1");
    let serve = ServeProcess::start(binary(), &env, port).await?;
    let url = webhook_url(&serve.url);
    println!(
        "backlog: posting {} notifications ({opportunities} opportunities)…",
        wires.len()
    );
    let started = Instant::now();
    let wires = Arc::new(wires);
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (wires, next, refused, url) = (wires.clone(), next.clone(), refused.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(w) = wires.get(i) else { return };
                match post(&http, &url, w).await {
                    Ok(s) if s.is_success() => {}
                    _ => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let posted = started.elapsed().as_secs_f64();
    let store = Store::connect(&store_url, 2).await?;
    let planned = eventually(Duration::from_secs(600), || async {
        store
            .stats(now_ms())
            .await
            .map(|s| s.inbox_pending == 0)
            .unwrap_or(false)
    })
    .await;
    let planned_at = started.elapsed().as_secs_f64();
    let queued = store.stats(now_ms()).await?.writes_pending;
    let since = sims.marketo.calls().len();
    let clock = Instant::now();
    store.set_paused(false).await?;
    let drained = eventually(Duration::from_secs(900), || async {
        store.is_idle().await.unwrap_or(false)
    })
    .await;
    let seconds = clock.elapsed().as_secs_f64();
    let stats = store.stats(now_ms()).await?;

    // Calls per endpoint and the fewest calls that could have carried the records.
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    let mut calls = 0;
    for c in sims.marketo.calls().iter().skip(since) {
        if c.path.starts_with("/identity") {
            continue;
        }
        calls += 1;
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
        *per_endpoint.entry(key).or_default() += records;
    }
    let records: usize = per_endpoint.values().sum();
    let minimum: usize = per_endpoint.values().map(|n| n.div_ceil(BATCH)).sum();
    let bound = (minimum.div_ceil(CALLS_PER_WINDOW as usize).saturating_sub(1)) as f64 * WINDOW.as_secs_f64();
    let held = sims.marketo.opportunities().len();
    report.row(
        "notifications queued (refused)",
        format!("{} ({})", wires.len(), refused.load(Ordering::SeqCst)),
    );
    report.row(
        "posted / planned (pushing paused)",
        format!(
            "{posted:.1} s ({:.0}/s) / {planned_at:.1} s",
            wires.len() as f64 / posted
        ),
    );
    report.row("Marketo writes queued before the drain", queued);
    report.row("records written to Marketo", records);
    report.row(
        "calls used / minimum possible",
        format!(
            "{calls} / {minimum} = {:.2}x",
            calls as f64 / minimum.max(1) as f64
        ),
    );
    report.row(
        "records per call",
        format!("{:.1}", records as f64 / calls.max(1) as f64),
    );
    report.row(
        "drain time / rate-bound time",
        format!(
            "{seconds:.1} s / {bound:.1} s{}",
            if drained { "" } else { " (NOT drained)" }
        ),
    );
    report.row(
        "max calls in any 1 s window / max concurrent",
        format!(
            "{} / {}",
            sims.marketo.max_calls_in_any_window(),
            sims.marketo.max_concurrent_seen()
        ),
    );
    report.row(
        "606 / 615 answers",
        format!("{} / {}", sims.marketo.count_606(), sims.marketo.count_615()),
    );
    report.row(
        "Marketo opportunities held / expected",
        format!("{held} / {opportunities}"),
    );
    report.row("peak RSS of the service (VmHWM)", mib(serve.peak_rss_kib()));
    report.check(refused.load(Ordering::SeqCst) == 0, "notifications refused");
    report.check(planned, "the backlog was not planned");
    report.check(drained, format!("not drained: {stats:?}"));
    report.check(
        stats.inbox_dead + stats.writes_dead == 0,
        format!("dead letters: {stats:?}"),
    );
    report.check(held == opportunities, "not every opportunity landed");
    report.check(
        sims.marketo.max_calls_in_any_window() <= CALLS_PER_WINDOW as usize
            && sims.marketo.max_concurrent_seen() <= 10,
        "Marketo limits exceeded",
    );
    report.check(
        calls as f64 <= 1.5 * minimum as f64,
        "more than 1.5x the minimum calls",
    );
    report.check(
        seconds <= 1.5 * bound + 5.0,
        "drain slower than 1.5x the rate-bound time + 5 s",
    );
    Ok(())
}
