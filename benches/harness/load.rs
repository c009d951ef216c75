//! Scenario 3: intake throughput and latency of the real service (a child process, pushing to
//! Marketo paused with OPPSYNC__WORKER__PAUSED=true, so only intake is measured) at 1, 16, 64
//! and 256 concurrent connections, next to a bare axum handler that only parses the JSON, in
//! the same run with the same load generator; peak resident memory of the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::{NotificationBuilder, reference};
use oppsync::sim::env::Simulators;
use oppsync::sim::pg::TestDatabase;
use oppsync::sim::process::{ServeProcess, free_port, serve_env, set_env};
use oppsync::store::Store;
use uuid::Uuid;

use crate::common::{KEY, Report, binary, inbox_count, mib, percentile};

const CRITERION: &str =
    "every request answered 2xx, every 202 stored (inbox count = acknowledged), p99 < 1 s at every level";
const LEVELS: [usize; 4] = [1, 16, 64, 256];

struct Run {
    accepted: usize,
    failed: usize,
    seconds: f64,
    latencies_us: Vec<u64>,
}

/// A ~4 KB opportunity Update with images whose record id is a marker replaced per request.
fn template() -> (String, Vec<(String, String)>, String) {
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
    let n = NotificationBuilder::opportunity_update(marker, 1_750_000_000_000)
        .attr("closeprobability", AttributeValue::Int(60))
        .post_image("PostImage", image)
        .with_parent_context();
    (n.to_json(), n.headers(), marker.to_string())
}

async fn load(url: String, connections: usize, duration: Duration) -> Run {
    let template = Arc::new(template());
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (url, template) = (url.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default();
            let (mut latencies, mut accepted, mut failed) = (Vec::new(), 0, 0);
            while Instant::now() < deadline {
                let (body, headers, marker) = template.as_ref();
                let body = body.replace(marker.as_str(), &Uuid::new_v4().to_string());
                let mut req = http.post(&url).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let t = Instant::now();
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(t.elapsed().as_micros() as u64);
                        accepted += 1;
                    }
                    _ => failed += 1,
                }
            }
            (accepted, failed, latencies)
        }));
    }
    let mut run = Run {
        accepted: 0,
        failed: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        if let Ok((a, f, l)) = t.await {
            run.accepted += a;
            run.failed += f;
            run.latencies_us.extend(l);
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.latencies_us.sort_unstable();
    run
}

async fn bare_server() -> anyhow::Result<SocketAddr> {
    async fn parse_only(body: Bytes) -> StatusCode {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => StatusCode::ACCEPTED,
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    let app = Router::new().route("/webhooks/dynamics", post(parse_only));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn line(r: &Run, baseline: Option<&Run>) -> String {
    let rate = r.accepted as f64 / r.seconds;
    let ratio = baseline
        .map(|b| {
            format!(
                "  ({:.0}% of bare)",
                100.0 * rate / (b.accepted as f64 / b.seconds)
            )
        })
        .unwrap_or_default();
    format!(
        "{:>7.0} req/s  p50 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2} ms  errors {}{ratio}",
        rate,
        percentile(&r.latencies_us, 0.50),
        percentile(&r.latencies_us, 0.99),
        percentile(&r.latencies_us, 0.999),
        r.failed
    )
}

pub async fn run(seconds: u64) -> Report {
    let mut report = Report::new("load (intake, worker paused)", CRITERION);
    if let Err(e) = run_inner(&mut report, Duration::from_secs(seconds)).await {
        report.fail(format!("{e:#}"));
    }
    report
}

async fn run_inner(report: &mut Report, duration: Duration) -> anyhow::Result<()> {
    let sims = Simulators::start(Default::default()).await?;
    let bare = bare_server().await?;
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}", dir.path().join("load.db").display());
    let pg = TestDatabase::create().await.ok();
    let mut backends = vec![("SQLite", sqlite)];
    if let Some(db) = &pg {
        backends.push(("PostgreSQL", db.url.clone()));
    } else {
        report.row("PostgreSQL", "not reachable: skipped");
    }
    report.row(
        "setup",
        format!(
            "{} s per level, ~{} byte bodies, service = child process, load generator + bare axum in the harness, {} cores shared",
            duration.as_secs(),
            template().0.len(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        ),
    );
    let mut servers = Vec::new();
    for (name, url) in &backends {
        let port = free_port()?;
        let mut env = serve_env(&sims, url, port, KEY);
        set_env(&mut env, "OPPSYNC__WORKER__PAUSED", "true");
        let serve = ServeProcess::start(binary(), &env, port).await?;
        servers.push((*name, url.clone(), serve));
    }
    let mut accepted = vec![0usize; servers.len()];
    for connections in LEVELS {
        let bare_url = format!("http://{bare}/webhooks/dynamics?code={KEY}");
        let _ = load(bare_url.clone(), connections, Duration::from_millis(300)).await;
        let baseline = load(bare_url, connections, duration).await;
        report.row(
            format!("{connections:>3} conn  bare axum (parse only)"),
            line(&baseline, None),
        );
        for (i, (name, _, serve)) in servers.iter().enumerate() {
            let url = format!("{}/webhooks/dynamics?code={KEY}", serve.url);
            let warm = load(url.clone(), connections, Duration::from_millis(300)).await;
            let r = load(url, connections, duration).await;
            accepted[i] += warm.accepted + r.accepted;
            report.row(
                format!("{connections:>3} conn  oppsync, {name}"),
                line(&r, Some(&baseline)),
            );
            report.check(
                r.failed == 0 && warm.failed == 0,
                format!("{name} at {connections}: {} errors", r.failed + warm.failed),
            );
            let p99 = percentile(&r.latencies_us, 0.99);
            report.check(p99 < 1000.0, format!("{name} at {connections}: p99 {p99:.0} ms"));
        }
    }
    for (i, (name, url, serve)) in servers.iter().enumerate() {
        report.row(format!("peak RSS, {name} (VmHWM)"), mib(serve.peak_rss_kib()));
        let store = Store::connect(url, 2).await?;
        let stored = inbox_count(&store).await?;
        report.row(
            format!("stored / acknowledged, {name}"),
            format!("{stored} / {}", accepted[i]),
        );
        report.check(
            stored as usize == accepted[i],
            format!("{name}: {stored} stored, {} acknowledged", accepted[i]),
        );
    }
    drop(servers);
    if let Some(db) = pg {
        db.drop_now().await;
    }
    Ok(())
}
