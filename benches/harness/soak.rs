//! Scenario 7 (not in the default runs: `--only soak`): a steady stream of changes to a fixed
//! organisation (2,000 opportunities) for a long time, with retention set to a few minutes,
//! against Marketo's real limits. The store file and the
//! process's memory must level off: once retention deletes as much as arrives, neither grows.
//! Prints both over time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::process::{ServeProcess, free_port, serve_env, set_env};
use oppsync::store::{Store, now_ms};

use crate::common::{KEY, Report, Wire, binary, post, webhook_url, wire};

/// Notifications per second posted.
const RATE: usize = 300;
/// Posted every tick, `RATE / 10` at a time.
const TICK: Duration = Duration::from_millis(100);
/// Opportunities of the organisation the stream changes (about 7.5 notifications each to create).
const ORGANISATION: usize = 2_000;
/// How long settled notifications are kept.
const RETENTION_MINUTES: f64 = 3.0;
const CRITERION: &str = "the store file and the RSS level off: the largest of the last third of the run at most 10% above the largest of the middle third; intake keeps up (no refusal) and the backlog stays small";

/// Resident memory now, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn file_bytes(path: &std::path::Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            std::fs::metadata(p).ok().map(|m| m.len())
        })
        .sum()
}

struct Sample {
    at: f64,
    file: u64,
    rss_kib: u64,
    pending: i64,
    retained_minutes: f64,
}

pub async fn run(minutes: f64) -> Report {
    let mut report = Report::new("soak (SQLite)", CRITERION);
    if let Err(e) = run_inner(&mut report, minutes).await {
        report.fail(format!("{e:#}"));
    }
    report
}

/// The largest value of samples in the time range `[from, to)` (fractions of the run).
fn largest(samples: &[Sample], run: f64, from: f64, to: f64, value: impl Fn(&Sample) -> u64) -> u64 {
    samples
        .iter()
        .filter(|s| s.at >= run * from && s.at < run * to)
        .map(value)
        .max()
        .unwrap_or(0)
}

async fn run_inner(report: &mut Report, minutes: f64) -> anyhow::Result<()> {
    let sims = Simulators::start(MarketoSimConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("soak.db");
    let store_url = format!("sqlite://{}", db.display());
    let port = free_port()?;
    let mut env = serve_env(&sims, &store_url, port, KEY);
    set_env(
        &mut env,
        "OPPSYNC__STORE__RETENTION_DAYS",
        &format!("{}", RETENTION_MINUTES / 1_440.0),
    );
    // Production settings, not the tests' quick ones.
    set_env(&mut env, "OPPSYNC__MARKETO__TIMEOUT_SCALE", "1");
    set_env(&mut env, "OPPSYNC__MARKETO__BATCH_LINGER_MS", "1000");
    set_env(&mut env, "OPPSYNC__WORKER__POLL_INTERVAL_MS", "200");
    let serve = ServeProcess::start(binary(), &env, port).await?;
    let pid = serve.pid();
    let store = Store::connect(&store_url, 2).await?;
    let url = webhook_url(&serve.url);
    let http = reqwest::Client::new();
    let refused = Arc::new(AtomicUsize::new(0));
    let posted = Arc::new(AtomicUsize::new(0));
    let run = Duration::from_secs_f64(minutes * 60.0);
    println!(
        "soak: {RATE} notifications/s for {minutes} min, retention {RETENTION_MINUTES} min; every 30 s: store file (database + log), RSS, backlog, oldest kept"
    );

    let mut org = DynamicsOrg::new(1_780_000_000_000, Some(sims.dataverse.clone()));
    // A fixed organisation (the records oppsync follows, which retention never deletes): its
    // creation first, then a steady stream of changes to those same opportunities.
    let mut queue: std::collections::VecDeque<Wire> = std::collections::VecDeque::new();
    for n in oppsync::sim::scenario::bulk_workload(ORGANISATION, &mut org) {
        queue.push_back(wire(&n)?);
    }
    let opportunities: Vec<uuid::Uuid> = sims
        .dataverse
        .rows("opportunities")
        .iter()
        .filter_map(|r| {
            r["opportunityid"]
                .as_str()
                .and_then(|id| uuid::Uuid::parse_str(id).ok())
        })
        .collect();
    anyhow::ensure!(!opportunities.is_empty(), "the organisation has no opportunities");
    let mut change = 0usize;
    let mut samples: Vec<Sample> = Vec::new();
    let started = Instant::now();
    let mut next_tick = started;
    let mut next_sample = started + Duration::from_secs(30);
    let mut in_flight = tokio::task::JoinSet::new();
    while started.elapsed() < run {
        while queue.len() < RATE / 10 {
            change += 1;
            let id = opportunities[(change * 7_919) % opportunities.len()];
            let mut changes = oppsync::dynamics::Attributes::new();
            changes.insert(
                "name".into(),
                oppsync::dynamics::AttributeValue::String(format!("Deal change {change}")),
            );
            queue.push_back(wire(&org.update_opportunity(id, changes))?);
        }
        for _ in 0..RATE / 10 {
            let Some(w) = queue.pop_front() else { break };
            let (http, url, refused, posted) = (http.clone(), url.clone(), refused.clone(), posted.clone());
            in_flight.spawn(async move {
                match post(&http, &url, &w).await {
                    Ok(s) if s.is_success() => {
                        posted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while in_flight.try_join_next().is_some() {}
        next_tick += TICK;
        tokio::time::sleep_until(tokio::time::Instant::from_std(next_tick)).await;
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(30);
            let stats = store.stats(now_ms()).await?;
            let s = Sample {
                at: started.elapsed().as_secs_f64(),
                file: file_bytes(&db),
                rss_kib: rss_kib(pid).unwrap_or(0),
                pending: stats.inbox_pending,
                retained_minutes: stats.inbox_oldest_retained_age_ms.unwrap_or(0) as f64 / 60_000.0,
            };
            println!(
                "  {:>5.0} s  file {:>6.1} MiB  RSS {:>6.1} MiB  backlog {:>6}  oldest kept {:>4.1} min  posted {}",
                s.at,
                s.file as f64 / 1_048_576.0,
                s.rss_kib as f64 / 1_024.0,
                s.pending,
                s.retained_minutes,
                posted.load(Ordering::Relaxed)
            );
            samples.push(s);
        }
    }
    while in_flight.join_next().await.is_some() {}
    let secs = run.as_secs_f64();
    let posted = posted.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);
    report.row(
        "notifications posted (rate)",
        format!("{posted} ({:.0}/s)", posted as f64 / secs),
    );
    report.row("refused", refused);
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1_048_576.0);
    let file_middle = largest(&samples, secs, 1.0 / 3.0, 2.0 / 3.0, |s| s.file);
    let file_last = largest(&samples, secs, 2.0 / 3.0, 1.01, |s| s.file);
    let rss_middle = largest(&samples, secs, 1.0 / 3.0, 2.0 / 3.0, |s| s.rss_kib * 1024);
    let rss_last = largest(&samples, secs, 2.0 / 3.0, 1.01, |s| s.rss_kib * 1024);
    report.row(
        "store file, largest in the middle / last third",
        format!("{} / {}", mib(file_middle), mib(file_last)),
    );
    report.row(
        "RSS, largest in the middle / last third",
        format!("{} / {}", mib(rss_middle), mib(rss_last)),
    );
    report.row(
        "peak RSS of the service (VmHWM)",
        crate::common::mib(serve.peak_rss_kib()),
    );
    let last_pending = samples.last().map_or(0, |s| s.pending);
    report.row("backlog at the end", last_pending);
    report.check(refused == 0, format!("{refused} notifications refused"));
    report.check(
        posted as f64 >= secs * RATE as f64 * 0.9,
        format!("posted {posted} in {secs:.0} s: below 90% of {RATE}/s"),
    );
    report.check(
        samples.len() >= 6 && file_last as f64 <= file_middle as f64 * 1.1,
        "the store file kept growing",
    );
    report.check(
        samples.len() >= 6 && rss_last as f64 <= rss_middle as f64 * 1.1,
        "the RSS kept growing",
    );
    report.check(
        last_pending < (RATE * 60) as i64,
        format!("a backlog of {last_pending} built up"),
    );
    Ok(())
}
