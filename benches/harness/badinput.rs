//! Scenario 5: malformed, truncated, oversized, wrongly typed and hostile bodies, wrong content
//! types, absurd header values and bad credentials against the real service: each answered 4xx
//! with a problem+json body, nothing stored, the service healthy afterwards.

use std::time::Duration;

use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::{NotificationBuilder, reference};
use oppsync::sim::env::Simulators;
use oppsync::sim::process::{ServeProcess, free_port, serve_env};
use oppsync::store::Store;
use serde_json::Value;
use uuid::Uuid;

use crate::common::{KEY, Report, binary, inbox_count};

const CRITERION: &str = "every case answered 4xx with an application/problem+json body whose status matches; inbox count unchanged; /healthz and /readyz 200 afterwards";

struct Case {
    name: String,
    body: Vec<u8>,
    content_type: Option<String>,
    /// The query string (the webhook key goes in `code`).
    query: String,
    headers: Vec<(String, String)>,
}

fn case(name: &str, body: impl Into<Vec<u8>>) -> Case {
    Case {
        name: name.into(),
        body: body.into(),
        content_type: Some("application/json".into()),
        query: format!("code={KEY}"),
        headers: Vec::new(),
    }
}

/// A valid notification body, new each call (a fresh record id).
fn valid() -> String {
    NotificationBuilder::opportunity_create(Uuid::new_v4(), 1_750_000_000_000)
        .attr("name", AttributeValue::String("Hostile".into()))
        .attr("customerid", reference("account", Uuid::new_v4()))
        .attr("statecode", AttributeValue::OptionSet(0))
        .to_json()
}

/// `valid()` with `from` replaced by `to`; an error if `from` does not occur (the corpus would
/// silently test nothing).
fn altered(from: &str, to: &[u8]) -> anyhow::Result<Vec<u8>> {
    let body = valid();
    let Some(at) = body.find(from) else {
        anyhow::bail!("corpus: `{from}` not found in a composed body");
    };
    let mut out = body.as_bytes()[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&body.as_bytes()[at + from.len()..]);
    Ok(out)
}

fn corpus() -> anyhow::Result<Vec<Case>> {
    let v = valid();
    let mut cases = vec![
        case("empty body", ""),
        case("lone brace", "{"),
        case("truncated in the middle", &v.as_bytes()[..v.len() / 2]),
        case("truncated by one byte", &v.as_bytes()[..v.len() - 1]),
        case("plain text", "hello"),
        case("JSON array", "[]"),
        case("JSON null", "null"),
        case("JSON number", "42"),
        case("JSON string", "\"opportunity\""),
        case("empty object", "{}"),
        case(
            "MessageName a number",
            altered("\"MessageName\":\"Create\"", b"\"MessageName\":42")?,
        ),
        case(
            "PrimaryEntityId not a GUID",
            altered(
                "\"PrimaryEntityName\":\"opportunity\"",
                b"\"PrimaryEntityName\":\"opportunity\",\"PrimaryEntityId\":\"not-a-guid\"",
            )?,
        ),
        case("Stage a string", altered("\"Stage\":40", b"\"Stage\":\"forty\"")?),
        case(
            "Stage a huge integer",
            altered("\"Stage\":40", b"\"Stage\":99999999999999999999999999999")?,
        ),
        case("Depth 1e999999", altered("\"Depth\":1", b"\"Depth\":1e999999")?),
        case(
            "InputParameters a string",
            altered(
                "\"InputParameters\":[",
                b"\"InputParameters\":\"x\",\"Ignored\":[",
            )?,
        ),
        case(
            "invalid UTF-8 in a string",
            altered("\"MessageName\":\"Create\"", b"\"MessageName\":\"Cr\xff\xfeate\"")?,
        ),
        case(
            "lone surrogate escape",
            altered("\"MessageName\":\"Create\"", b"\"MessageName\":\"\\ud800\"")?,
        ),
        case(
            "duplicated key",
            altered(
                "\"MessageName\":\"Create\"",
                b"\"MessageName\":\"Create\",\"MessageName\":\"Delete\"",
            )?,
        ),
        case(
            "nested 100,000 deep",
            format!(
                "{{\"InputParameters\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        ),
        case(
            "unknown entity",
            altered(
                "\"PrimaryEntityName\":\"opportunity\"",
                b"\"PrimaryEntityName\":\"invoice\"",
            )?,
        ),
        case(
            "unknown message",
            altered("\"MessageName\":\"Create\"", b"\"MessageName\":\"Assign\"")?,
        ),
        case(
            "pre-validation stage 10",
            altered("\"Stage\":40", b"\"Stage\":10")?,
        ),
        case(
            "2 MiB body (limit 1 MiB)",
            format!("{{\"x\":\"{}\"}}", "a".repeat(2 << 20)),
        ),
    ];
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=xyz",
        "application/x-www-form-urlencoded",
    ] {
        let mut c = case(&format!("content type {ct}"), valid());
        c.content_type = Some(ct.into());
        cases.push(c);
    }
    // Declared compressed, sent plain: refused, not decoded nor taken as plain text.
    for encoding in ["gzip", "br", "deflate", "x-unknown"] {
        let mut c = case(&format!("content encoding {encoding}"), valid());
        c.headers.push(("content-encoding".into(), encoding.into()));
        cases.push(c);
    }
    // Identifiers that go into keys, the store and the logs must be Guids.
    let body = valid();
    let correlation = body
        .split("\"CorrelationId\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or_else(|| anyhow::anyhow!("corpus: no CorrelationId in a composed body"))?
        .to_owned();
    for (name, id) in [
        ("CorrelationId not a Guid", "not-a-guid".to_owned()),
        ("CorrelationId of 900 KB", "z".repeat(900_000)),
        (
            "CorrelationId with a newline",
            "a\\nINFO forged log line".to_owned(),
        ),
    ] {
        cases.push(case(name, body.replace(&correlation, &id)));
    }
    let mut c = case("content type of 8 KiB garbage", valid());
    c.content_type = Some("x".repeat(8192));
    cases.push(c);
    let mut c = case("8 KiB correlation id, malformed body", "{\"Depth\":");
    c.headers
        .push(("x-ms-correlation-request-id".into(), "z".repeat(8192)));
    cases.push(c);
    let mut c = case("size-exceeded header, body not a context", "{\"a\":1}");
    c.headers
        .push(("x-ms-dynamics-msg-size-exceeded".into(), "x".repeat(2048)));
    cases.push(c);
    // Bad credentials, each with a valid body: accepting one would store it.
    for (name, query) in [
        ("no key", String::new()),
        ("empty key", "code=".to_owned()),
        ("wrong key", "code=not-the-key".to_owned()),
        ("key with a suffix", format!("code={KEY}x")),
        ("key prefix", format!("code={}", &KEY[..KEY.len() - 1])),
        ("10 KiB key", format!("code={}", "k".repeat(10_240))),
        ("key under another name", format!("key={KEY}")),
    ] {
        let mut c = case(&format!("credentials: {name}"), valid());
        c.query = query;
        cases.push(c);
    }
    let mut c = case("credentials: key in a header only", valid());
    c.query = String::new();
    c.headers.push(("x-webhook-key".into(), KEY.into()));
    cases.push(c);
    Ok(cases)
}

pub async fn run() -> Report {
    let mut report = Report::new("bad input", CRITERION);
    if let Err(e) = run_inner(&mut report).await {
        report.fail(format!("{e:#}"));
    }
    report
}

async fn run_inner(report: &mut Report) -> anyhow::Result<()> {
    let sims = Simulators::start(Default::default()).await?;
    let dir = tempfile::tempdir()?;
    let store_url = format!("sqlite://{}", dir.path().join("bad.db").display());
    let port = free_port()?;
    let env = serve_env(&sims, &store_url, port, KEY);
    let serve = ServeProcess::start(binary(), &env, port).await?;
    let store = Store::connect(&store_url, 2).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let before = inbox_count(&store).await?;
    let cases = corpus()?;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut bad = 0;
    for c in &cases {
        let mut req = http
            .post(format!("{}/webhooks/dynamics?{}", serve.url, c.query))
            .body(c.body.clone());
        if let Some(ct) = &c.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in &c.headers {
            req = req.header(k, v);
        }
        let verdict = match req.send().await {
            Err(e) => Err(format!("no answer: {e}")),
            Ok(r) => {
                let status = r.status().as_u16();
                *statuses.entry(status).or_default() += 1;
                let ct = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body: Option<Value> = r.json().await.ok();
                let body_status = body
                    .as_ref()
                    .and_then(|b| b.get("status"))
                    .and_then(Value::as_u64);
                if !(400..500).contains(&status) {
                    Err(format!("answered {status}"))
                } else if !ct.starts_with("application/problem+json") {
                    Err(format!("{status} with content type `{ct}`"))
                } else if body_status != Some(u64::from(status)) {
                    Err(format!("{status} with problem body {body:?}"))
                } else {
                    Ok(status)
                }
            }
        };
        match verdict {
            Ok(status) => report.row(format!("  {}", c.name), status),
            Err(why) => {
                bad += 1;
                report.row(format!("  {}", c.name), format!("BAD: {why}"));
                report.fail(format!("{}: {why}", c.name));
            }
        }
    }
    let after = inbox_count(&store).await?;
    let health = http.get(format!("{}/healthz", serve.url)).send().await?.status();
    let ready = http.get(format!("{}/readyz", serve.url)).send().await?.status();
    let alive = serve_alive(&serve);
    // Still accepting good work after all that.
    let good = http
        .post(format!("{}/webhooks/dynamics?code={KEY}", serve.url))
        .header("content-type", "application/json")
        .body(valid())
        .send()
        .await?
        .status();
    let stored_after_good = inbox_count(&store).await?;
    let peak = serve.peak_rss_kib();
    report.rows.insert(
        0,
        (
            "cases / answered 4xx problem+json".into(),
            format!("{} / {}", cases.len(), cases.len() - bad),
        ),
    );
    report
        .rows
        .insert(1, ("statuses".into(), format!("{statuses:?}")));
    report.rows.insert(
        2,
        ("inbox count before / after".into(), format!("{before} / {after}")),
    );
    report.rows.insert(
        3,
        (
            "/healthz, /readyz afterwards; a valid post then".into(),
            format!("{health}, {ready}; {good}"),
        ),
    );
    report.rows.insert(
        4,
        ("peak RSS of the service (VmHWM)".into(), crate::common::mib(peak)),
    );
    report.check(after == before, format!("inbox went from {before} to {after}"));
    report.check(
        alive && health.is_success() && ready.is_success(),
        "service not healthy afterwards",
    );
    report.check(
        good.as_u16() == 202 && stored_after_good == after + 1,
        "a valid notification was not stored afterwards",
    );
    Ok(())
}

fn serve_alive(serve: &ServeProcess) -> bool {
    std::fs::metadata(format!("/proc/{}", serve.pid())).is_ok()
}
