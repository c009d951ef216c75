//! `oppsync backfill --url URL`: starts the initial sync on a running service through its admin
//! API (or follows the one already running) and shows its progress until it ends: a progress bar
//! on a terminal, plain lines otherwise (logs, CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use url::Url;

use crate::worker::BackfillRequest;

/// The environment variable holding the admin bearer token (`oppsync.write`).
pub const TOKEN_ENV: &str = "OPPSYNC_ADMIN_TOKEN";

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Completed,
    /// Cancelled or failed, with the status and the last error.
    NotCompleted(String),
}

async fn answer(resp: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

fn problem(body: &Value) -> String {
    body.get("detail")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string())
}

/// Starts a backfill on the service at `base` (or follows the running one) and reports its
/// progress every `poll` until it ends.
pub async fn backfill(
    base: &Url,
    token: &str,
    request: &BackfillRequest,
    poll: Duration,
) -> anyhow::Result<Ended> {
    let url = base
        .join("admin/backfill")
        .context("the service URL cannot take the path /admin/backfill")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let (status, body) = answer(
        http.post(url.clone())
            .bearer_auth(token)
            .json(request)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?,
    )
    .await?;
    match status {
        202 => eprintln!("backfill {} started", body["id"].as_str().unwrap_or("?")),
        409 => eprintln!("a backfill is already running; following it"),
        _ => bail!("POST {url}: HTTP {status}: {}", problem(&body)),
    }
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} opportunities  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last_line = Instant::now() - Duration::from_secs(3_600);
    loop {
        let (status, p) = answer(
            http.get(url.clone())
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?,
        )
        .await?;
        if status != 200 {
            bail!("GET {url}: HTTP {status}: {}", problem(&p));
        }
        let read = p["opportunities_read"].as_u64().unwrap_or(0);
        let total = p["estimated_total"].as_u64();
        let phase = p["phase"].as_str().unwrap_or("?");
        let writes = format!(
            "Marketo writes {}/{} done",
            p["marketo_writes_done"].as_u64().unwrap_or(0),
            p["marketo_writes_queued"].as_u64().unwrap_or(0)
        );
        let eta = p["eta_secs"]
            .as_u64()
            .map(|s| format!(", ETA {s} s"))
            .unwrap_or_default();
        match &bar {
            Some(bar) => {
                bar.set_length(total.unwrap_or(read).max(read));
                bar.set_position(read);
                bar.set_message(format!("{phase}, {writes}{eta}"));
            }
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                last_line = Instant::now();
                let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                println!("{phase}: {read}{of} opportunities read, {writes}{eta}");
            }
            None => {}
        }
        let job_status = p["status"].as_str().unwrap_or("");
        if job_status != "running" {
            if let Some(bar) = &bar {
                bar.finish();
            }
            let summary = format!(
                "backfill {job_status}: {read} opportunities, {} connections, {} contacts read; {writes}",
                p["connections_read"].as_u64().unwrap_or(0),
                p["contacts_read"].as_u64().unwrap_or(0)
            );
            println!("{summary}");
            return Ok(if job_status == "completed" {
                Ended::Completed
            } else {
                let why = p["last_error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                Ended::NotCompleted(format!("{job_status}{why}"))
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// `oppsync drift --url URL`: prints the differences between Marketo and oppsync's projections
/// (within `budget` Marketo calls), or with `repair` queues their fixes. Returns how many
/// differences were found.
pub async fn drift(base: &Url, token: &str, budget: usize, repair: bool) -> anyhow::Result<usize> {
    let path = if repair {
        "admin/drift/repair"
    } else {
        "admin/drift"
    };
    let mut url = base
        .join(path)
        .with_context(|| format!("the service URL cannot take the path /{path}"))?;
    url.query_pairs_mut().append_pair("budget", &budget.to_string());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .context("building the HTTP client")?;
    let req = if repair {
        http.post(url.clone())
    } else {
        http.get(url.clone())
    };
    let (status, body) = answer(
        req.bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("{url}"))?,
    )
    .await?;
    if status != 200 {
        bail!("{url}: HTTP {status}: {}", problem(&body));
    }
    let report = if repair { &body["report"] } else { &body };
    let differences = report["differences"].as_array().cloned().unwrap_or_default();
    for d in &differences {
        let what = match (d["record"].as_str(), d["field"].as_str()) {
            (Some("role"), Some(role)) => format!("role {role:?} of lead {}", d["lead_id"]),
            (Some(record), Some(field)) => format!("{record} field {field}"),
            (Some(record), None) => record.to_owned(),
            _ => "?".to_owned(),
        };
        let values = match d["kind"].as_str() {
            Some("field_differs") => format!(": oppsync {} / Marketo {}", d["expected"], d["actual"]),
            _ => String::new(),
        };
        println!(
            "{} {} {what}{values}",
            d["opportunity_id"].as_str().unwrap_or("?"),
            d["kind"].as_str().unwrap_or("?")
        );
    }
    println!(
        "{} difference(s) in {} opportunities checked, {} of {} Marketo calls{}",
        differences.len(),
        report["opportunities_checked"],
        report["calls"],
        report["budget"],
        if report["incomplete"] == Value::Bool(true) {
            " (budget spent before the end: raise --budget)"
        } else {
            ""
        }
    );
    if repair {
        println!(
            "repair: {} writes queued for {} opportunities",
            body["writes_queued"], body["opportunities_repaired"]
        );
    }
    Ok(differences.len())
}
