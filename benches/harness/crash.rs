//! Scenario 1: SIGKILL the real service at random moments while a load of notifications is
//! delivered and while it drains, restart it each time, then compare Marketo with a calm
//! reference run of the same history.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::pg::TestDatabase;
use oppsync::sim::process::{ServeProcess, free_port, serve_env};
use oppsync::sim::scenario::view;
use oppsync::store::{Store, now_ms};
use parking_lot::{Mutex, RwLock};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::Mode;
use crate::common::{
    KEY, Report, Wire, binary, compare, histories, inbox_keys, mib, post, reference, roomy_marketo,
    webhook_url, wire,
};

pub async fn run(mode: Mode) -> Vec<Report> {
    match run_inner(mode).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = Report::new("crash", "the scenario runs");
            r.fail(format!("{e:#}"));
            vec![r]
        }
    }
}

async fn run_inner(mode: Mode) -> anyhow::Result<Vec<Report>> {
    let target = mode.pick(3_000, 20_000);
    let reference_sims = Simulators::start(roomy_marketo()).await?;
    let sqlite_sims = Simulators::start(roomy_marketo()).await?;
    let pg_sims = Simulators::start(roomy_marketo()).await?;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(reference_sims.dataverse.clone()));
    org.mirror_to(sqlite_sims.dataverse.clone());
    org.mirror_to(pg_sims.dataverse.clone());
    let groups = histories(target, 1, &mut org);
    let groups: Vec<Vec<Wire>> = groups
        .iter()
        .map(|g| g.iter().map(wire).collect::<anyhow::Result<Vec<_>>>())
        .collect::<anyhow::Result<_>>()?;
    let flat: Vec<Wire> = groups.iter().flatten().cloned().collect();
    println!(
        "crash: {} notifications in {} histories; calm reference run…",
        flat.len(),
        groups.len()
    );
    let expected = reference(&reference_sims, &groups, Duration::from_secs(300)).await?;
    println!(
        "crash: reference settled in {:.1} s ({} opportunities, {} roles)",
        expected.seconds,
        expected.view.opportunities.len(),
        expected.view.roles.len()
    );

    let mut reports = Vec::new();
    let dir = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}", dir.path().join("crash.db").display());
    reports.push(
        one_backend(
            "crash (SQLite)",
            mode,
            &sqlite_sims,
            &sqlite_url,
            &flat,
            &expected,
            11,
        )
        .await
        .unwrap_or_else(|e| failed("crash (SQLite)", e)),
    );
    match TestDatabase::create().await {
        Ok(db) => {
            let r = one_backend(
                "crash (PostgreSQL)",
                mode,
                &pg_sims,
                &db.url,
                &flat,
                &expected,
                12,
            )
            .await
            .unwrap_or_else(|e| failed("crash (PostgreSQL)", e));
            db.drop_now().await;
            reports.push(r);
        }
        Err(e) => reports.push(failed("crash (PostgreSQL)", e)),
    }
    for r in &mut reports {
        r.rows.insert(
            0,
            (
                "calm reference run (in-process)".into(),
                format!(
                    "{:.1} s, {} REST calls, {} opportunities, {} roles",
                    expected.seconds,
                    expected.rest_calls,
                    expected.view.opportunities.len(),
                    expected.view.roles.len()
                ),
            ),
        );
    }
    Ok(reports)
}

fn failed(name: &str, e: anyhow::Error) -> Report {
    let mut r = Report::new(name, "the scenario runs");
    r.fail(format!("{e:#}"));
    r
}

const CRITERION: &str =
    "lost acknowledged notifications = 0, wrong final records = 0, duplicated records = 0, dead letters = 0";

/// The service as a child process that the killer replaces.
struct Service {
    process: Option<ServeProcess>,
    restarts: usize,
    kills: usize,
    peak_rss_kib: u64,
}

async fn one_backend(
    name: &str,
    mode: Mode,
    sims: &Simulators,
    store_url: &str,
    wires: &[Wire],
    expected: &crate::common::Reference,
    seed: u64,
) -> anyhow::Result<Report> {
    let mut report = Report::new(name, CRITERION);
    let started = Instant::now();
    let port = free_port()?;
    let log = std::env::temp_dir().join(format!(
        "oppsync-harness-{}.log",
        name.replace([' ', '(', ')'], "")
    ));
    let first =
        ServeProcess::start_logging(binary(), &serve_env(sims, store_url, port, KEY), port, Some(&log))
            .await?;
    let url = Arc::new(RwLock::new(webhook_url(&first.url)));
    let service = Arc::new(Mutex::new(Service {
        process: Some(first),
        restarts: 0,
        kills: 0,
        peak_rss_kib: 0,
    }));

    // Load: 16 clients post the history in order (each takes the next notification) and retry
    // each until it is acknowledged; a refusal other than 503 is counted and not retried.
    let wires = Arc::new(wires.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(vec![false; wires.len()]));
    let refused = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(mode.pick(180, 600));
    // The history is spread over at least this long, so the SIGKILLs (one every 0.4–1.5 s)
    // land while notifications are still arriving: posted as fast as intake takes them, the
    // 3,000 of the short mode were in within a second, and the run saw too few kills.
    let load_floor = Duration::from_secs(mode.pick(3, 8));
    let load_start = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (wires, next, acked, refused, attempts, url) = (
            wires.clone(),
            next.clone(),
            acked.clone(),
            refused.clone(),
            attempts.clone(),
            url.clone(),
        );
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(w) = wires.get(i) else { return };
                tokio::time::sleep_until(load_start + load_floor.mul_f64(i as f64 / wires.len() as f64))
                    .await;
                while Instant::now() < deadline {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let target = url.read().clone();
                    match post(&http, &target, w).await {
                        Ok(s) if s.is_success() => {
                            acked.lock()[i] = true;
                            break;
                        }
                        Ok(s) if s == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Ok(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        }));
    }
    let loading = Arc::new(AtomicBool::new(true));

    // The killer: SIGKILL at random moments while the load runs, then a few times while the
    // backlog drains, restarting the service on a fresh port each time.
    let mut rng = StdRng::seed_from_u64(seed);
    let (gap_lo, gap_hi) = mode.pick((300, 1_500), (400, 1_500));
    let killer = {
        let (service, url, loading) = (service.clone(), url.clone(), loading.clone());
        let sims_store = store_url.to_owned();
        let drain_kills = mode.pick(2, 3);
        let env_for = {
            let sims_env = |port: u16| serve_env(sims, &sims_store, port, KEY);
            // Precompute environments for the restarts (the closure borrows `sims`).
            (0..200)
                .map(|_| -> anyhow::Result<(u16, Vec<(String, String)>)> {
                    let p = free_port()?;
                    Ok((p, sims_env(p)))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let gaps: Vec<u64> = (0..200).map(|_| rng.random_range(gap_lo..gap_hi)).collect();
        let drain_gaps: Vec<u64> = (0..drain_kills).map(|_| rng.random_range(100..800)).collect();
        let store_for_idle = Store::connect(store_url, 2).await?;
        tokio::spawn(async move {
            let mut envs = env_for.into_iter();
            let mut kill_once = |service: &Arc<Mutex<Service>>| {
                let mut s = service.lock();
                if let Some(mut p) = s.process.take() {
                    s.peak_rss_kib = s.peak_rss_kib.max(p.peak_rss_kib().unwrap_or(0));
                    p.kill9();
                    s.kills += 1;
                }
                envs.next()
            };
            let mut gaps = gaps.into_iter();
            let mut drain_gaps = drain_gaps.into_iter();
            loop {
                let during_load = loading.load(Ordering::SeqCst);
                let gap = if during_load {
                    gaps.next()
                } else {
                    drain_gaps.next()
                };
                let Some(gap) = gap else { break };
                tokio::time::sleep(Duration::from_millis(gap)).await;
                if !during_load && store_for_idle.is_idle().await.unwrap_or(false) {
                    break;
                }
                let Some((port, env)) = kill_once(&service) else {
                    break;
                };
                eprintln!(
                    "crash: SIGKILL ({})",
                    if during_load {
                        "during the load"
                    } else {
                        "while draining"
                    }
                );
                // Restart; a failed start is retried on the next port.
                let mut started = None;
                for _ in 0..3 {
                    match ServeProcess::start_logging(binary(), &env, port, Some(&log)).await {
                        Ok(p) => {
                            started = Some(p);
                            break;
                        }
                        Err(e) => eprintln!("restart failed: {e:#}"),
                    }
                }
                let Some(p) = started else {
                    return Err(anyhow::anyhow!("the service did not restart"));
                };
                *url.write() = webhook_url(&p.url);
                let mut s = service.lock();
                s.process = Some(p);
                s.restarts += 1;
            }
            Ok(())
        })
    };
    for c in clients {
        let _ = c.await;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    loading.store(false, Ordering::SeqCst);
    killer.await.context("killer task")??;

    // Settle with the last process.
    let store = Store::connect(store_url, 2).await?;
    let settle_timeout = Duration::from_secs(mode.pick(180, 420));
    let idle = eventually(settle_timeout, || async {
        store.is_idle().await.unwrap_or(false)
    })
    .await;
    let total_seconds = started.elapsed().as_secs_f64();
    let stats = store.stats(now_ms()).await?;
    drop(store);
    let (kills, restarts, peak) = {
        let mut s = service.lock();
        if let Some(p) = &s.process {
            let rss = p.peak_rss_kib().unwrap_or(0);
            s.peak_rss_kib = s.peak_rss_kib.max(rss);
        }
        (s.kills, s.restarts, s.peak_rss_kib)
    };
    let acked_flags = acked.lock().clone();
    let acked_keys: BTreeSet<&str> = wires
        .iter()
        .zip(&acked_flags)
        .filter(|(_, a)| **a)
        .map(|(w, _)| w.dedupe_key.as_str())
        .collect();
    let inbox = inbox_keys(store_url).await?;
    let lost = acked_keys.iter().filter(|k| !inbox.contains(**k)).count();
    let unacked = acked_flags.iter().filter(|a| !**a).count();
    let actual = view(&sims.marketo);
    let cmp = compare(&actual, &expected.view, &sims.marketo);
    if let Some(p) = service.lock().process.take() {
        drop(p);
    }

    report.row("notifications delivered", wires.len());
    report.row(
        "acknowledged 2xx / posts attempted",
        format!("{} / {}", acked_keys.len(), attempts.load(Ordering::SeqCst)),
    );
    report.row("SIGKILLs / restarts", format!("{kills} / {restarts}"));
    report.row("load phase", format!("{load_seconds:.1} s"));
    report.row(
        "settled after",
        format!("{total_seconds:.1} s{}", if idle { "" } else { " (NOT settled)" }),
    );
    report.row("lost (2xx but not in the inbox)", lost);
    report.row("wrong final records", cmp.wrong);
    report.row("duplicated records", cmp.duplicated);
    report.row(
        "dead letters (notifications, writes)",
        format!("{}, {}", stats.inbox_dead, stats.writes_dead),
    );
    report.row(
        "Marketo calls / max in any window (limit) / max concurrent (limit)",
        format!(
            "{} / {} ({}) / {} ({})",
            sims.marketo.rest_call_count(),
            sims.marketo.max_calls_in_any_window(),
            sims.marketo_config.calls_per_window,
            sims.marketo.max_concurrent_seen(),
            sims.marketo_config.max_concurrent
        ),
    );
    report.row(
        "606 / 615 answers",
        format!("{} / {}", sims.marketo.count_606(), sims.marketo.count_615()),
    );
    report.row("peak RSS of a service process (VmHWM)", mib(Some(peak)));
    for e in &cmp.examples {
        report.row("example", e);
    }
    report.check(
        kills >= mode.pick(3, 6),
        format!("only {kills} SIGKILLs happened"),
    );
    report.check(
        unacked == 0 && refused.load(Ordering::SeqCst) == 0,
        format!("{unacked} notifications never acknowledged"),
    );
    report.check(idle, format!("work left after {settle_timeout:?}: {stats:?}"));
    report.check(lost == 0, format!("{lost} acknowledged notifications lost"));
    report.check(cmp.wrong == 0, format!("{} wrong records", cmp.wrong));
    report.check(
        cmp.duplicated == 0,
        format!("{} duplicated records", cmp.duplicated),
    );
    report.check(
        stats.inbox_dead + stats.writes_dead == 0,
        format!("dead letters: {stats:?}"),
    );
    Ok(report)
}
