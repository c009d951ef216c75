//! Pieces every scenario uses: the report, wire-ready notifications, posting, the calm
//! in-process reference run, and comparing what Marketo holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use oppsync::app::StartOptions;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::dynamics::decode_notification;
use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::{MarketoSimConfig, MarketoSimHandle};
use oppsync::sim::org::DynamicsOrg;
use oppsync::sim::scenario::{MarketoView, history, view};
use oppsync::store::{Store, now_ms};
use serde_json::Value;

pub const KEY: &str = "harness-webhook-key-0001";

/// The `oppsync` binary cargo built for this bench.
/// The `oppsync` binary under test: this build's, or `OPPSYNC_HARNESS_BINARY` (to measure
/// another build, e.g. before and after a change, with the same harness).
pub fn binary() -> &'static Path {
    static BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        std::env::var_os("OPPSYNC_HARNESS_BINARY")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_oppsync").into())
    })
}

/// One scenario's figures and verdict.
pub struct Report {
    pub name: String,
    pub criterion: String,
    pub rows: Vec<(String, String)>,
    pub failures: Vec<String>,
    pub skipped: Option<String>,
}

impl Report {
    pub fn new(name: impl Into<String>, criterion: impl Into<String>) -> Report {
        Report {
            name: name.into(),
            criterion: criterion.into(),
            rows: Vec::new(),
            failures: Vec::new(),
            skipped: None,
        }
    }

    pub fn row(&mut self, figure: impl Into<String>, value: impl Display) {
        self.rows.push((figure.into(), value.to_string()));
    }

    /// Records a failed criterion unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    pub fn verdict(&self) -> &'static str {
        match (&self.skipped, self.failures.is_empty()) {
            (Some(_), _) => "SKIP",
            (None, true) => "PASS",
            (None, false) => "FAIL",
        }
    }

    pub fn print(&self) {
        println!("\n== {} — {}", self.name, self.verdict());
        println!("   criterion: {}", self.criterion);
        if let Some(why) = &self.skipped {
            println!("   skipped: {why}");
        }
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.rows {
            println!("   {k:<width$}  {v}");
        }
        for f in &self.failures {
            println!("   FAILED: {f}");
        }
    }
}

/// A notification as it goes on the wire: body, headers, and the dedupe key intake derives.
#[derive(Clone)]
pub struct Wire {
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub dedupe_key: String,
}

pub fn wire(n: &NotificationBuilder) -> anyhow::Result<Wire> {
    let body = n.to_json();
    let headers = n.headers();
    let size_exceeded = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("x-ms-dynamics-msg-size-exceeded"));
    let dedupe_key = decode_notification(body.as_bytes(), size_exceeded)
        .map_err(|e| anyhow::anyhow!("composed notification does not decode: {e:?}"))?
        .dedupe_key;
    Ok(Wire {
        body,
        headers,
        dedupe_key,
    })
}

pub fn webhook_url(base: &str) -> String {
    format!("{base}/webhooks/dynamics?code={KEY}")
}

pub async fn post(http: &reqwest::Client, url: &str, w: &Wire) -> reqwest::Result<reqwest::StatusCode> {
    let mut req = http.post(url).body(w.body.clone());
    for (k, v) in &w.headers {
        req = req.header(k, v);
    }
    let r = req.send().await?;
    let status = r.status();
    let _ = r.bytes().await;
    Ok(status)
}

/// Random histories (`oppsync::sim::scenario::history`) from `first_seed` on, one group per
/// seed (groups touch disjoint records), until there are at least `min` notifications.
pub fn histories(min: usize, first_seed: u64, org: &mut DynamicsOrg) -> Vec<Vec<NotificationBuilder>> {
    let mut groups = Vec::new();
    let mut total = 0;
    let mut seed = first_seed;
    while total < min {
        let g = history(seed, org);
        total += g.len();
        groups.push(g);
        seed += 1;
    }
    groups
}

/// Marketo limits for the correctness scenarios: Marketo's concurrency, a rate high enough that
/// the runs are about crashes and faults rather than waiting (100 calls per 2 s window).
pub fn roomy_marketo() -> MarketoSimConfig {
    MarketoSimConfig {
        calls_per_window: 100,
        window: Duration::from_secs(2),
        max_concurrent: 10,
        ..MarketoSimConfig::default()
    }
}

/// Result of the calm in-process reference run.
pub struct Reference {
    pub view: MarketoView,
    pub seconds: f64,
    pub rest_calls: usize,
}

/// Delivers `groups` to a calm in-process `oppsync::app::start` against `sims`: each group in
/// order, eight groups at a time (groups are independent), every post answered 2xx; waits until
/// everything is applied and pushed, with no dead letter; returns what Marketo holds.
pub async fn reference(
    sims: &Simulators,
    groups: &[Vec<Wire>],
    timeout: Duration,
) -> anyhow::Result<Reference> {
    let dir = tempfile::tempdir()?;
    let store_url = format!("sqlite://{}", dir.path().join("reference.db").display());
    let mut config = sims.service_config(&store_url, KEY);
    Simulators::make_quick(&mut config);
    let app = oppsync::app::start(
        config,
        StartOptions {
            migrate: true,
            intake_only: false,
        },
    )
    .await?;
    let started = Instant::now();
    let url = webhook_url(&app.url());
    let groups = Arc::new(groups.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (groups, next, url) = (groups.clone(), next.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let g = next.fetch_add(1, Ordering::SeqCst);
                let Some(group) = groups.get(g) else {
                    return Ok::<(), anyhow::Error>(());
                };
                for w in group {
                    let status = post(&http, &url, w).await?;
                    if !status.is_success() {
                        bail!("reference intake answered {status}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let store = app.state.store.clone();
    let idle = eventually(timeout, || async { store.is_idle().await.unwrap_or(false) }).await;
    let stats = store.stats(now_ms()).await?;
    if !idle || stats.inbox_dead + stats.writes_dead > 0 {
        bail!("the calm reference run did not settle cleanly: {stats:?}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let result = Reference {
        view: view(&sims.marketo),
        seconds,
        rest_calls: sims.marketo.rest_call_count(),
    };
    app.stop().await;
    Ok(result)
}

/// How far what Marketo holds is from the reference.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Expected opportunities missing or with other fields, expected roles missing, companies
    /// missing.
    pub wrong: usize,
    /// Records Marketo holds that the reference does not (opportunities, roles), and leads
    /// sharing an email with another lead.
    pub duplicated: usize,
    pub examples: Vec<String>,
}

pub fn compare(actual: &MarketoView, expected: &MarketoView, marketo: &MarketoSimHandle) -> Comparison {
    let mut c = Comparison::default();
    let example = |c: &mut Comparison, s: String| {
        if c.examples.len() < 5 {
            c.examples.push(s);
        }
    };
    for (id, fields) in &expected.opportunities {
        match actual.opportunities.get(id) {
            None => {
                c.wrong += 1;
                example(&mut c, format!("opportunity {id} missing"));
            }
            Some(f) if f != fields => {
                c.wrong += 1;
                example(&mut c, format!("opportunity {id}: {f:?} instead of {fields:?}"));
            }
            Some(_) => {}
        }
    }
    for id in actual.opportunities.keys() {
        if !expected.opportunities.contains_key(id) {
            c.duplicated += 1;
            example(&mut c, format!("opportunity {id} not in the reference"));
        }
    }
    for role in expected.roles.difference(&actual.roles) {
        c.wrong += 1;
        example(&mut c, format!("role {role:?} missing"));
    }
    for role in actual.roles.difference(&expected.roles) {
        c.duplicated += 1;
        example(&mut c, format!("role {role:?} not in the reference"));
    }
    for (company, exists) in &expected.companies {
        if actual.companies.get(company) != Some(exists) {
            c.wrong += 1;
            example(&mut c, format!("company {company}: exists {exists} expected"));
        }
    }
    let mut by_email: BTreeMap<String, usize> = BTreeMap::new();
    for lead in marketo.leads().values() {
        if let Some(email) = lead.get("email").and_then(Value::as_str) {
            *by_email.entry(email.to_ascii_lowercase()).or_default() += 1;
        }
    }
    for (email, n) in by_email {
        if n > 1 {
            c.duplicated += n - 1;
            example(&mut c, format!("{n} leads for {email}"));
        }
    }
    c
}

/// `v` without these opportunities, their roles and the companies only they point at.
pub fn without(v: &MarketoView, opportunities: &BTreeSet<String>) -> MarketoView {
    let kept: BTreeMap<String, BTreeMap<String, Value>> = v
        .opportunities
        .iter()
        .filter(|(id, _)| !opportunities.contains(*id))
        .map(|(k, f)| (k.clone(), f.clone()))
        .collect();
    let referenced: BTreeSet<&str> = kept
        .values()
        .filter_map(|f| f.get("externalCompanyId").and_then(Value::as_str))
        .collect();
    MarketoView {
        roles: v
            .roles
            .iter()
            .filter(|(o, _, _)| !opportunities.contains(o))
            .cloned()
            .collect(),
        companies: v
            .companies
            .iter()
            .filter(|(c, _)| referenced.contains(c.as_str()))
            .map(|(c, e)| (c.clone(), *e))
            .collect(),
        opportunities: kept,
    }
}

/// Every dedupe key in the inbox of the store at `url`.
pub async fn inbox_keys(url: &str) -> anyhow::Result<BTreeSet<String>> {
    let store = Store::connect(url, 2).await.context("connecting to the store")?;
    let mut out = BTreeSet::new();
    let mut before = None;
    loop {
        let page = store.list_notifications(None, before, 1000).await?;
        if page.is_empty() {
            break;
        }
        before = page.last().map(|n| n.id);
        out.extend(page.into_iter().map(|n| n.dedupe_key));
    }
    Ok(out)
}

/// Notifications in the inbox, whatever their status.
pub async fn inbox_count(store: &Store) -> anyhow::Result<i64> {
    let s = store.stats(now_ms()).await?;
    Ok(s.inbox_pending + s.inbox_done + s.inbox_dead)
}

pub fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

pub fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}
