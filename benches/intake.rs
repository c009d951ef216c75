//! Intake benchmark: concurrent webhook posts against the real intake (decode, secret check,
//! group commit with fsync) next to a bare axum handler that only parses the JSON, in one run,
//! on the same machine, with the same load generator. Prints throughput, p50/p99/p99.9 and the
//! ratio, in rounds that measure the bare handler before and after each intake target, and the
//! median ratio over the rounds.
//! A third target is the whole service on SQLite with the planner running on the same store
//! (pushing paused), as in production: intake and planning share the two cores. For it the
//! benchmark also prints how many notifications the planner settled per second during the run.
//! `cargo bench --bench intake` (add `-- --quick` for a short run, `--only sqlite`, `--only
//! postgres` or `--only planner` to measure one target next to the bare handler,
//! `--connections N` for one level).
//!
//! Backends: SQLite always; PostgreSQL too when it answers at OPPSYNC_TEST_PG_URL (default
//! postgres://postgres@127.0.0.1:5432/test).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use oppsync::app::{StartOptions, start};
use oppsync::config::{Config, Secret};
use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::{NotificationBuilder, reference};
use uuid::Uuid;

#[path = "support/args.rs"]
mod args;
use args::value_after;

/// The allocator the `oppsync` binary ships with (src/main.rs), so that the service measured in
/// process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const KEY: &str = "bench-webhook-key";

struct Run {
    label: String,
    /// Notifications the planner settled per second during the run (the target with the
    /// planner active only).
    planned_per_second: Option<f64>,
    accepted: usize,
    seconds: f64,
    latencies_us: Vec<u64>,
    /// CPU time of this whole process (server and load generator) per accepted request.
    cpu_us_per_request: f64,
}

/// User + system CPU time of this process so far, in µs (Linux; 0 elsewhere). Throughput on a
/// shared 2-core machine moves with the neighbours; CPU per request much less so.
fn process_cpu_us() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks * 1_000_000.0 / 100.0 // USER_HZ is 100 on Linux
}

impl Run {
    fn rate(&self) -> f64 {
        self.accepted as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// A body, its headers, and the record id to substitute per request.
type Template = (String, Vec<(String, String)>, Uuid);

/// Version (modifiedon, OperationCreatedOn) of the template; requests put the current time there.
const VERSION_MARKER: i64 = 1_750_000_000_000;

/// A realistic body (~4 KB, like the spec's opportunity Update with images) whose record id and
/// version are markers: every request is a fresh change, as Dynamics sends them: a new record
/// id (so it is new to the store) changed now (modifiedon is the time of the change).
fn template() -> Template {
    let marker = Uuid::new_v4();
    let mut image = oppsync::dynamics::Attributes::new();
    image.insert(
        "name".into(),
        AttributeValue::String("Contoso - 500 seats renewal".into()),
    );
    image.insert("customerid".into(), reference("account", Uuid::new_v4()));
    image.insert("statecode".into(), AttributeValue::OptionSet(0));
    image.insert(
        "estimatedvalue".into(),
        AttributeValue::Money(rust_decimal::Decimal::new(12_500_000, 2)),
    );
    image.insert(
        "description".into(),
        AttributeValue::String("Renewal incl. 50 extra seats.\nDecision in Q1.".into()),
    );
    let n = NotificationBuilder::opportunity_update(marker, VERSION_MARKER)
        .attr(
            "estimatedvalue",
            AttributeValue::Money(rust_decimal::Decimal::new(12_500_000, 2)),
        )
        .attr("closeprobability", AttributeValue::Int(60))
        .post_image("PostImage", image)
        .with_parent_context();
    (n.to_json(), n.headers(), marker)
}

/// One HTTP client per connection, each keeping its single connection open between requests.
/// Built (and connected, by the warm-up) before a measurement starts: building a client loads
/// the system's root certificates, several milliseconds of CPU each, and a burst of 256 new
/// connections can overflow the listen backlog (a one-second SYN retry), neither of which is
/// intake.
fn clients(connections: usize) -> Vec<reqwest::Client> {
    (0..connections)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap_or_else(|e| panic!("http client: {e}"))
        })
        .collect()
}

/// Each client posts in a loop for `duration`, every body a fresh change (new record id, now).
async fn load(
    label: &str,
    url: &str,
    clients: &[reqwest::Client],
    duration: Duration,
    template: Arc<Template>,
) -> Run {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let cpu_before = process_cpu_us();
    let mut tasks = Vec::new();
    for http in clients {
        let http = http.clone();
        let url = url.to_owned();
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted = 0;
            while Instant::now() < deadline {
                let (body, headers, marker) = template.as_ref();
                let now = oppsync::store::now_ms().to_string();
                let body = body
                    .replace(&marker.to_string(), &Uuid::new_v4().to_string())
                    .replace(&VERSION_MARKER.to_string(), &now);
                let mut req = http.post(&url).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let t = Instant::now();
                match req.send().await {
                    Ok(r) if r.status() == StatusCode::ACCEPTED || r.status() == StatusCode::OK => {
                        let _ = r.bytes().await;
                        latencies.push(t.elapsed().as_micros() as u64);
                        accepted += 1;
                    }
                    Ok(r) => {
                        let _ = r.bytes().await;
                    }
                    Err(_) => {}
                }
            }
            (accepted, latencies)
        }));
    }
    let mut run = Run {
        label: label.to_owned(),
        planned_per_second: None,
        accepted: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
        cpu_us_per_request: 0.0,
    };
    for t in tasks {
        if let Ok((a, l)) = t.await {
            run.accepted += a;
            run.latencies_us.extend(l);
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.cpu_us_per_request = (process_cpu_us() - cpu_before) / run.accepted.max(1) as f64;
    run.latencies_us.sort_unstable();
    run
}

async fn bare_server() -> SocketAddr {
    async fn parse_only(body: Bytes) -> StatusCode {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => StatusCode::ACCEPTED,
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    let app = Router::new().route("/webhooks/dynamics", post(parse_only));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn intake_config(store_url: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.store.url = Secret::new(store_url);
    c.webhook.keys = vec![Secret::new(KEY)];
    c
}

async fn postgres_url() -> Option<String> {
    use sqlx::Connection;
    let admin = std::env::var("OPPSYNC_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut conn = sqlx::postgres::PgConnection::connect(&admin).await.ok()?;
    let name = format!("oppsync_bench_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .ok()?;
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned())?;
    Some(format!("{base}/{name}"))
}

/// One line per run; `reference` is the bare handler's rate the run is compared with.
fn print(runs: &[(Run, f64)]) {
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9} {:>8} {:>12}",
        "target", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "ratio", "CPU µs/req"
    );
    for (r, reference) in runs {
        println!(
            "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7.0}% {:>12.0}",
            r.label,
            r.rate(),
            r.percentile(0.50),
            r.percentile(0.99),
            r.percentile(0.999),
            100.0 * r.rate() / reference,
            r.cpu_us_per_request
        );
        if let Some(planned) = r.planned_per_second {
            println!("{:<34} {planned:>10.0} notifications/s planned meanwhile", "");
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = Duration::from_secs(if quick { 3 } else { 5 });
    // `--connections N` measures one level only.
    let levels: Vec<usize> = match value_after("--connections") {
        Some(n) => vec![n],
        None if quick => vec![64],
        None => vec![16, 64, 256],
    };
    let template = Arc::new(template());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));

    let bare = bare_server().await;
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = start(
        intake_config(&sqlite_url),
        StartOptions {
            migrate: true,
            intake_only: true,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let only = value_after::<String>("--only").map(|o| o.to_ascii_lowercase());
    let wanted = |backend: &str| only.as_deref().is_none_or(|o| o == backend);
    // The whole service (intake, planner; pushing paused) on a store of its own, against the
    // simulators for the lookups planning may make (started for this target only; they live
    // as long as `_sims`).
    let (_sims, planning) = if wanted("planner") {
        let sims = oppsync::sim::env::Simulators::start(oppsync::sim::marketo::MarketoSimConfig::default())
            .await
            .unwrap_or_else(|e| panic!("simulators: {e}"));
        let url = format!("sqlite://{}", dir.path().join("planning.db").display());
        let mut config = sims.service_config(&url, KEY);
        config.server.listen = "127.0.0.1:0".into();
        config.worker.paused = true;
        let app = start(
            config,
            StartOptions {
                migrate: true,
                intake_only: false,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("start with the planner: {e}"));
        (Some(sims), Some(app))
    } else {
        (None, None)
    };
    let pg_url = if wanted("postgres") {
        postgres_url().await
    } else {
        None
    };
    let pg = match &pg_url {
        Some(url) => Some(
            start(
                intake_config(url),
                StartOptions {
                    migrate: true,
                    intake_only: true,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("start on PostgreSQL: {e}")),
        ),
        None if wanted("postgres") => {
            println!("(PostgreSQL not reachable: its row is skipped)");
            None
        }
        None => None,
    };
    let body_size = template.0.len();
    println!(
        "intake benchmark: {} s per target, bodies ~{} bytes, {} cores",
        duration.as_secs(),
        body_size,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    // Every round measures every target; the verdict is the median round, so a disturbance
    // (another process on this small machine) that spoils one round does not decide it.
    let rounds = if quick { 1 } else { 3 };
    let url = |addr: SocketAddr| format!("http://{addr}/webhooks/dynamics?code={KEY}");
    const BARE: &str = "bare axum (parse JSON only)";
    let mut targets = Vec::new();
    if wanted("sqlite") {
        targets.push(("oppsync intake, SQLite (fsync)", sqlite.addr));
    }
    if let Some(pg) = &pg {
        targets.push(("oppsync intake, PostgreSQL", pg.addr));
    }
    const PLANNING: &str = "oppsync intake+planner, SQLite";
    if let Some(app) = &planning {
        targets.push((PLANNING, app.addr));
    }
    let planning_store = planning.as_ref().map(|app| app.state.store.clone());
    // Notifications waiting to be planned (the target with the planner active only).
    let waiting = |label: &str| {
        let store = planning_store.clone().filter(|_| label == PLANNING);
        async move {
            match store {
                Some(store) => Some(
                    store
                        .pending_counts()
                        .await
                        .unwrap_or_else(|e| panic!("pending counts: {e}"))
                        .0,
                ),
                None => None,
            }
        }
    };
    let measure = |label: &'static str, addr: SocketAddr, connections: usize| {
        let template = template.clone();
        let waiting = &waiting;
        async move {
            let clients = clients(connections);
            let warmup = Duration::from_millis(500);
            let _ = load("warmup", &url(addr), &clients, warmup, template.clone()).await;
            let before = waiting(label).await;
            let mut run = load(label, &url(addr), &clients, duration, template).await;
            // Settled = accepted during the run, less what the waiting backlog grew by.
            if let (Some(before), Some(after)) = (before, waiting(label).await) {
                let settled = run.accepted as f64 - (after - before) as f64;
                run.planned_per_second = Some(settled.max(0.0) / run.seconds);
            }
            run
        }
    };
    let mut summary: Vec<(usize, &str, Vec<f64>)> = Vec::new();
    for &connections in &levels {
        println!("\n{connections} concurrent connections");
        for round in 1..=rounds {
            // The bare handler runs before and after each intake target, and the target is
            // compared with the mean of the two: the machine's speed drifts by tens of percent
            // within minutes, and a drift then moves both sides of the ratio alike.
            let mut bare_before = measure(BARE, bare, connections).await;
            let mut lines = Vec::new();
            for &(label, addr) in &targets {
                let run = measure(label, addr, connections).await;
                let bare_after = measure(BARE, bare, connections).await;
                let reference = (bare_before.rate() + bare_after.rate()) / 2.0;
                let before_rate = bare_before.rate();
                lines.push((bare_before, before_rate));
                match summary
                    .iter_mut()
                    .find(|(c, l, _)| *c == connections && *l == label)
                {
                    Some((_, _, ratios)) => ratios.push(run.rate() / reference),
                    None => summary.push((connections, label, vec![run.rate() / reference])),
                }
                lines.push((run, reference));
                bare_before = bare_after;
            }
            let last_rate = bare_before.rate();
            lines.push((bare_before, last_rate));
            println!(
                "round {round} of {rounds} (each intake target against the mean of the bare runs around it)"
            );
            print(&lines);
        }
    }
    println!("\nmedian ratio to the bare handler over {rounds} round(s)");
    for (connections, label, mut ratios) in summary {
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let all: Vec<String> = ratios.iter().map(|r| format!("{:.0}%", 100.0 * r)).collect();
        println!(
            "{label:<34} {connections:>4} connections: {:>4.0}%   (rounds: {})",
            100.0 * median,
            all.join(", ")
        );
    }
    sqlite.stop().await;
    if let Some(pg) = pg {
        pg.stop().await;
    }
    if let Some(app) = planning {
        app.stop().await;
    }
}
