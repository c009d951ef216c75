//! Pipeline benchmark: N opportunity changes over many opportunities with stakeholders, through
//! the whole service (HTTP intake, store, planner, pusher, Marketo client) against the Marketo
//! simulator with Marketo's real rate (100 calls / 20 s = 5 calls/s, 10 concurrent) scaled in
//! time ten-fold: 10 calls per 2 s window. Prints records per call, calls against the minimum possible,
//! and records per second against the ceiling the rate limit allows.
//!
//! `cargo bench --bench pipeline` (add `-- --quick` for a smaller run, `--only live`, `--only
//! backlog` or `--only intake` for one part, `--timeline` to list every Marketo call,
//! `--linger-ms N` to try another `marketo.batch_linger_ms`, `--claim-batch N` another
//! `worker.claim_batch`, `--opportunities N` for another size than 10,000).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use oppsync::app::{RunningApp, StartOptions, start};
use oppsync::config::Config;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::sim::env::Simulators;
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::sim::org::DynamicsOrg;
use oppsync::store::now_ms;
use serde_json::Value;

#[path = "support/args.rs"]
mod args;
use args::value_after;

/// The allocator the `oppsync` binary ships with (src/main.rs), so that the service measured in
/// process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CALLS_PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(2);
const BATCH: usize = 300;
const KEY: &str = "bench-webhook-key";

struct Measured {
    label: &'static str,
    records: usize,
    calls: usize,
    minimum_calls: usize,
    seconds: f64,
    /// When the first Marketo call was made, from the start of the clock.
    first_call: f64,
    /// The earliest the last call could have gone, given when the earlier calls went: call k+10
    /// waits for call k's answer plus a window.
    paced_last_call: f64,
    /// When each notification was accepted, in seconds from the start of the clock, in order
    /// (live run only: the backlog's clock starts once everything has arrived).
    accepted: Vec<f64>,
}

/// Fewest calls that could carry the records Marketo received (each endpoint's records in full
/// batches), plus the lead lookups and lead creations.
fn measure(
    label: &'static str,
    sims: &Simulators,
    seconds: f64,
    since: usize,
    clock: Instant,
    accepted: Vec<f64>,
) -> Measured {
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    let calls = sims.marketo.calls();
    let mut rest_calls = 0;
    let timeline = std::env::args().any(|a| a == "--timeline");
    let mut first_call = None;
    let mut times = Vec::new();
    for c in calls.iter().skip(since) {
        if c.path.starts_with("/identity") {
            continue;
        }
        let at = c.at.saturating_duration_since(clock).as_secs_f64();
        first_call.get_or_insert(at);
        times.push(at);
        rest_calls += 1;
        let records = match c.body.get("input").and_then(Value::as_array) {
            Some(a) => a.len(),
            // Lead lookups are form posts (_method=GET): count the values looked up.
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
        if timeline {
            println!(
                "    {:>7.3} s  {:>3} records  {key}",
                c.at.saturating_duration_since(clock).as_secs_f64(),
                records
            );
        }
        *per_endpoint.entry(key).or_default() += records;
    }
    times.sort_by(f64::total_cmp);
    let per_window = CALLS_PER_WINDOW as usize;
    let paced_last_call = (1..)
        .map_while(|k| {
            let i = times.len().checked_sub(1 + k * per_window)?;
            Some(times[i] + k as f64 * WINDOW.as_secs_f64())
        })
        .fold(0.0, f64::max);
    let records: usize = per_endpoint.values().sum();
    let minimum_calls = per_endpoint.values().map(|n| n.div_ceil(BATCH)).sum();
    Measured {
        label,
        records,
        calls: rest_calls,
        minimum_calls,
        seconds,
        first_call: first_call.unwrap_or_default(),
        paced_last_call,
        accepted,
    }
}

/// The earliest the last call could go given when the notifications arrived (the rate limit
/// aside). The last `10 j` calls carry at most `10 j × BATCH` records, and by the sliding window
/// the calls before them went no later than `j` windows before the last one; so the other
/// records had to have arrived `j` windows before the end, for every `j` (j = 0: the last
/// notification). Records are taken as arriving in proportion to the notifications accepted
/// (the workload interleaves every kind over the posting), and planning as instantaneous.
fn arrival_bound_seconds(records: usize, accepted: &[f64]) -> Option<f64> {
    let last = accepted.len().checked_sub(1)?;
    let per_windows = CALLS_PER_WINDOW as usize * BATCH;
    let bound = (0..)
        .map_while(|j: usize| {
            let needed = records.checked_sub(j * per_windows).filter(|n| *n > 0)?;
            let share = needed as f64 / records as f64;
            let index = ((share * accepted.len() as f64).ceil() as usize).saturating_sub(1);
            Some(accepted[index.min(last)] + j as f64 * WINDOW.as_secs_f64())
        })
        .fold(0.0, f64::max);
    Some(bound)
}

/// Time the rate limit needs for `calls` calls: the first window's worth at once, then
/// CALLS_PER_WINDOW per window.
fn rate_bound_seconds(calls: usize) -> f64 {
    let windows = calls.div_ceil(CALLS_PER_WINDOW as usize).saturating_sub(1);
    windows as f64 * WINDOW.as_secs_f64()
}

fn report(m: &Measured) {
    let ideal = rate_bound_seconds(m.minimum_calls);
    let ceiling = if ideal > 0.0 {
        m.records as f64 / ideal
    } else {
        f64::INFINITY
    };
    let achieved = m.records as f64 / m.seconds;
    println!("{}", m.label);
    println!("  records written to Marketo        {:>8}", m.records);
    println!(
        "  calls used / minimum possible     {:>8} / {} = {:.2}x",
        m.calls,
        m.minimum_calls,
        m.calls as f64 / m.minimum_calls as f64
    );
    println!(
        "  records per call                  {:>8.1}",
        m.records as f64 / m.calls as f64
    );
    println!(
        "  time                              {:>8.2} s (rate limit alone needs {:.2} s)",
        m.seconds, ideal
    );
    // Call k+10 waits for call k's answer plus a window: once the first calls have gone (in
    // the live run, once the records for them had arrived), the last one can come no earlier.
    println!("  first Marketo call after          {:>8.2} s", m.first_call);
    println!(
        "  last call no earlier than         {:>8.2} s (given when the earlier calls went)",
        m.paced_last_call
    );
    println!(
        "  records/s achieved / ceiling      {:>8.0} / {:.0} = {:.0}%",
        achieved,
        ceiling,
        100.0 * achieved / ceiling
    );
    // Live: the records arrive over the posting, and the calls that keep the last ones within
    // the rate can only carry records that have arrived. An extra figure, beside the rate-only
    // ceiling above.
    if let Some(arrival) = arrival_bound_seconds(m.records, &m.accepted) {
        let bound = arrival.max(ideal);
        println!(
            "  last call given arrival, no earlier than {:.2} s (last notification accepted at {:.2} s)",
            bound,
            m.accepted.last().copied().unwrap_or_default()
        );
        println!(
            "  records/s achieved / ceiling given arrival {:>5.0} / {:.0} = {:.0}%",
            achieved,
            m.records as f64 / bound,
            100.0 * achieved * bound / m.records as f64
        );
    }
}

/// A body and its headers, ready to post.
type Wire = (String, Vec<(String, String)>);

/// The notifications as 16 streams of ready bodies (one per posting task), serialised before
/// the clock starts so the benchmark measures the service, not its own JSON encoding.
fn wire_chunks(notifications: &[NotificationBuilder]) -> Vec<Vec<Wire>> {
    notifications
        .chunks(notifications.len().div_ceil(16))
        .map(|c| c.iter().map(|n| (n.to_json(), n.headers())).collect())
        .collect()
}

/// Posts every chunk on its own connection; returns when each notification was accepted.
async fn post_all(url: &str, chunks: Vec<Vec<Wire>>) -> Vec<Instant> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let http = http.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::with_capacity(chunk.len());
            for (body, headers) in chunk {
                let mut req = http.post(&url).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => accepted.push(Instant::now()),
                    other => panic!("intake refused a notification: {other:?}"),
                }
            }
            accepted
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        accepted.extend(t.await.unwrap_or_else(|e| panic!("posting task: {e}")));
    }
    accepted.sort();
    accepted
}

/// The service under test: both simulators, the service on a fresh SQLite store in a temporary
/// directory, and the bulk workload already encoded, ready to post.
struct Service {
    sims: Simulators,
    app: RunningApp,
    /// Keeps the store's directory until the run ends.
    _dir: tempfile::TempDir,
    url: String,
    notifications: usize,
    chunks: Vec<Vec<Wire>>,
}

/// Starts the simulators (Marketo with `marketo`) and the service (`configure` adjusts its
/// configuration), and prepares the workload for `opportunities` opportunities.
async fn start_service(
    opportunities: usize,
    marketo: MarketoSimConfig,
    intake_only: bool,
    configure: impl FnOnce(&mut Config),
) -> Service {
    let sims = Simulators::start(marketo)
        .await
        .unwrap_or_else(|e| panic!("simulators: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut config = sims.service_config(&format!("sqlite://{}", dir.path().join("p.db").display()), KEY);
    configure(&mut config);
    let app = start(
        config,
        StartOptions {
            migrate: true,
            intake_only,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let notifications = oppsync::sim::scenario::bulk_workload(opportunities, &mut org);
    let url = format!("{}/webhooks/dynamics?code={KEY}", app.url());
    Service {
        sims,
        app,
        _dir: dir,
        url,
        notifications: notifications.len(),
        chunks: wire_chunks(&notifications),
    }
}

impl Service {
    /// Posts the whole workload; returns when each notification was accepted, in order.
    async fn post(&mut self) -> Vec<Instant> {
        post_all(&self.url, std::mem::take(&mut self.chunks)).await
    }
}

/// How long intake alone (no planning, no pushing) takes to accept the same notifications: the
/// floor under the live run's end-to-end time on this machine.
async fn intake_alone(opportunities: usize) {
    let mut service = start_service(opportunities, MarketoSimConfig::default(), true, |_| {}).await;
    let started = Instant::now();
    service.post().await;
    println!(
        "intake alone (no planning, no pushing): {} notifications accepted in {:.2} s",
        service.notifications,
        started.elapsed().as_secs_f64()
    );
    service.app.stop().await;
}

async fn run(label: &'static str, opportunities: usize, backlog: bool) -> Measured {
    let marketo = MarketoSimConfig {
        calls_per_window: CALLS_PER_WINDOW,
        window: WINDOW,
        max_concurrent: 10,
        ..MarketoSimConfig::default()
    };
    // `--linger-ms N` tries another marketo.batch_linger_ms (default 1000): in the live run the
    // last partial batches wait for it after the last notification is planned.
    let linger_ms = value_after("--linger-ms");
    // `--claim-batch N` tries another worker.claim_batch (default 512): smaller claims bring
    // the first records to the pusher sooner, at a higher cost per notification.
    let claim_batch = value_after("--claim-batch");
    let mut service = start_service(opportunities, marketo, false, |config| {
        config.worker.paused = backlog;
        if let Some(ms) = linger_ms {
            config.marketo.batch_linger_ms = ms;
        }
        if let Some(n) = claim_batch {
            config.worker.claim_batch = n;
        }
    })
    .await;
    let started = Instant::now();
    let accepted = service.post().await;
    let posted = started.elapsed().as_secs_f64();
    let Service {
        sims,
        app,
        notifications,
        _dir: _store_dir,
        ..
    } = service;
    let store = app.state.store.clone();
    let mut since = 0;
    let mut clock = started;
    if backlog {
        // Counts on the status indexes: `stats` reads every inbox row, and polling it would take
        // CPU from the service being measured.
        while store.pending_counts().await.map(|(inbox, _)| inbox).unwrap_or(1) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "  ({} notifications posted in {:.1} s and planned in {:.1} s; pushing resumes now)",
            notifications,
            posted,
            started.elapsed().as_secs_f64()
        );
        since = sims.marketo.calls().len();
        clock = Instant::now();
        let _ = store.set_paused(false).await;
    } else {
        println!(
            "  ({} notifications posted in {:.1} s while the pipeline runs)",
            notifications, posted
        );
    }
    let mut planned_after = None;
    loop {
        let (inbox, writes) = store.pending_counts().await.unwrap_or((1, 1));
        if inbox == 0 && planned_after.is_none() {
            planned_after = Some(clock.elapsed().as_secs_f64());
        }
        if inbox == 0 && writes == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = clock.elapsed().as_secs_f64();
    if !backlog {
        println!(
            "  (everything planned {:.2} s after the first post)",
            planned_after.unwrap_or(seconds)
        );
    }
    let stats = store.stats(now_ms()).await.unwrap_or_default();
    if stats.writes_dead + stats.inbox_dead > 0 {
        println!("  WARNING: dead letters {stats:?}");
    }
    println!(
        "  Marketo holds {} opportunities and {} roles; 606 answers: {}, 615 answers: {}",
        sims.marketo.opportunities().len(),
        sims.marketo.roles().len(),
        sims.marketo.count_606(),
        sims.marketo.count_615()
    );
    let reads = sims.dataverse.calls().len();
    if reads > 0 {
        println!("  Dataverse Web API calls (lookups of rows the notifications lacked): {reads}");
    }
    let accepted = if backlog {
        Vec::new()
    } else {
        accepted
            .iter()
            .map(|t| t.saturating_duration_since(started).as_secs_f64())
            .collect()
    };
    let m = measure(label, &sims, seconds, since, clock, accepted);
    app.stop().await;
    m
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // RUST_LOG=oppsync=info shows what the service does (batches planned, calls made).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let quick = std::env::args().any(|a| a == "--quick");
    // 10,000 opportunities (75,000 changes, about 33 s of Marketo's rate) by default: the live
    // run's first calls wait for their records to arrive and be planned, a fixed few tenths of
    // a second, which is 5% of a 2,000-opportunity run (6 s of rate) and 1% of this one.
    // `--opportunities N` for another size.
    let opportunities = value_after("--opportunities").unwrap_or(if quick { 400 } else { 10_000 });
    println!(
        "pipeline benchmark: {opportunities} opportunities, rate {CALLS_PER_WINDOW} calls per {} s window (Marketo's 5 calls/s), batch {BATCH}",
        WINDOW.as_secs_f64()
    );
    // `--only live` or `--only backlog` runs one mode (e.g. under a profiler).
    let only: Option<String> = value_after("--only");
    if only.as_deref().is_none_or(|o| o == "live") {
        let live = run(
            "live: posted while the pipeline runs (end to end)",
            opportunities,
            false,
        )
        .await;
        report(&live);
    }
    if only.as_deref().is_none_or(|o| o == "intake") {
        intake_alone(opportunities).await;
    }
    if only.as_deref().is_none_or(|o| o == "backlog") {
        let backlog = run(
            "backlog: everything planned first, then drained",
            opportunities,
            true,
        )
        .await;
        report(&backlog);
    }
}
