//! `oppsync demo`: the real service (HTTP intake, SQLite store in a temp dir, worker, Marketo and
//! Dataverse clients over HTTP) against the built-in simulators on loopback ports. A scripted
//! history is posted as Dynamics would post it; then the demo prints what Marketo holds.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

use crate::app::{StartOptions, start};
use crate::dynamics::compose::NotificationBuilder;
use crate::dynamics::{AttributeValue, Attributes};
use crate::sim::dataverse::{ROLE_DECISION_MAKER, ROLE_STAKEHOLDER};
use crate::sim::env::Simulators;
use crate::sim::marketo::MarketoSimConfig;
use crate::sim::org::{Customer, DynamicsOrg};
use crate::store::now_ms;

const DEMO_KEY: &str = "demo-webhook-key";

/// What the demo ended with (also printed).
#[derive(Debug)]
pub struct DemoReport {
    pub text: String,
    pub opportunities: usize,
    pub roles: usize,
    pub notifications: usize,
    pub marketo_calls: usize,
}

/// One step of the script: a caption and the notifications Dynamics sends for it.
struct Step {
    caption: &'static str,
    notifications: Vec<NotificationBuilder>,
}

fn script(org: &mut DynamicsOrg) -> (Vec<Step>, Vec<(Uuid, &'static str)>) {
    let contoso = (Uuid::new_v4(), "Contoso Ltd");
    let fabrikam = (Uuid::new_v4(), "Fabrikam Inc");
    // Dataverse holds the accounts: real bodies name them by id only, so oppsync reads the
    // company names through the Web API.
    org.put_account(contoso.0, contoso.1);
    org.put_account(fabrikam.0, fabrikam.1);
    let mut steps = Vec::new();
    let (james, n1) = org.create_contact("James", "Glynn", "james@contoso.com", Some(contoso));
    let (tom, n2) = org.create_contact("Tom", "Avery", "tom@contoso.com", Some(contoso));
    let (maria, n3) = org.create_contact("Maria", "Campbell", "maria@fabrikam.com", Some(fabrikam));
    let (priya, n4) = org.create_contact("Priya", "Shah", "priya@freelance.example", None);
    steps.push(Step {
        caption: "four contacts created",
        notifications: vec![n1, n2, n3, n4],
    });

    let (renewal, n) = org.create_opportunity(
        "Contoso - 500 seats renewal",
        Customer::Contact(james),
        Decimal::new(125_000, 0),
        60,
    );
    steps.push(Step {
        caption: "opportunity with a contact as potential customer",
        notifications: vec![n],
    });
    let (pilot, n) = org.create_opportunity(
        "Fabrikam - pilot",
        Customer::Account(fabrikam.0),
        Decimal::new(18_000, 0),
        30,
    );
    steps.push(Step {
        caption: "opportunity with an account as potential customer",
        notifications: vec![n],
    });
    steps.push(Step {
        caption: "stakeholder added from the opportunity (master, reciprocal, back-fill)",
        notifications: org.add_stakeholder(pilot, maria, ROLE_STAKEHOLDER),
    });
    steps.push(Step {
        caption: "stakeholder added from the contact's side",
        notifications: org.add_stakeholder_from_contact(renewal, tom, ROLE_DECISION_MAKER),
    });
    let mut older = Attributes::new();
    older.insert(
        "estimatedvalue".into(),
        AttributeValue::Money(Decimal::new(130_000, 0)),
    );
    let older = org.update_opportunity(renewal, older);
    let mut newer = Attributes::new();
    newer.insert(
        "estimatedvalue".into(),
        AttributeValue::Money(Decimal::new(142_500, 0)),
    );
    newer.insert("closeprobability".into(), AttributeValue::Int(80));
    let newer = org.update_opportunity(renewal, newer);
    steps.push(Step {
        caption: "two updates arriving out of order (the older one last)",
        notifications: vec![newer, older.clone(), older],
    });
    steps.push(Step {
        caption: "potential customer changed from an account to a contact without account",
        notifications: vec![org.change_customer(pilot, Customer::Contact(priya))],
    });
    steps.push(Step {
        caption: "stakeholder removed",
        notifications: org.remove_stakeholder(renewal, tom),
    });
    let (doomed, n) = org.create_opportunity(
        "Northwind - lost cause",
        Customer::Contact(priya),
        Decimal::new(5_000, 0),
        5,
    );
    let mut deleted = vec![n];
    deleted.extend(org.delete_opportunity(doomed));
    steps.push(Step {
        caption: "opportunity created, then deleted",
        notifications: deleted,
    });
    steps.push(Step {
        caption: "the renewal is won (the Win message)",
        notifications: vec![org.close(renewal, true, 3, Decimal::new(142_500, 0)).0],
    });
    let names = vec![
        (renewal, "Contoso - 500 seats renewal"),
        (pilot, "Fabrikam - pilot"),
        (doomed, "Northwind - lost cause"),
    ];
    (steps, names)
}

/// Runs the demo; `echo` receives progress lines as they happen.
pub async fn run(mut echo: impl FnMut(&str)) -> anyhow::Result<DemoReport> {
    let dir = tempfile::tempdir().context("creating a temporary directory for the demo store")?;
    let sims = Simulators::start(MarketoSimConfig::default())
        .await
        .context("starting the simulators")?;
    let store_url = format!("sqlite://{}", dir.path().join("oppsync-demo.db").display());
    let mut config = sims.service_config(&store_url, DEMO_KEY);
    Simulators::make_quick(&mut config);
    let app = start(
        config,
        StartOptions {
            migrate: true,
            intake_only: false,
        },
    )
    .await?;
    echo(&format!(
        "oppsync is listening on {} (SQLite store {})",
        app.url(),
        store_url
    ));
    echo(&format!(
        "Marketo simulator at {}, Dataverse simulator at {}",
        sims.marketo.base_url(),
        sims.dataverse.url()
    ));
    echo("");

    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let (steps, names) = script(&mut org);
    let http = reqwest::Client::new();
    let mut posted = 0;
    for step in &steps {
        let mut answers = Vec::new();
        for n in &step.notifications {
            let mut req = http
                .post(format!("{}/webhooks/dynamics?code={DEMO_KEY}", app.url()))
                .body(n.to_json());
            for (k, v) in n.headers() {
                req = req.header(k, v);
            }
            let status = req.send().await.context("posting a notification")?.status();
            if !status.is_success() {
                bail!("oppsync answered {status} to a demo notification");
            }
            answers.push(status.as_u16().to_string());
            posted += 1;
        }
        echo(&format!("  {:<72} -> {}", step.caption, answers.join(" ")));
    }

    let started = Instant::now();
    loop {
        if app.state.store.is_idle().await? {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the queue did not drain within 60 s: {:?}",
                app.state.store.stats(now_ms()).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = app.state.store.stats(now_ms()).await?;
    let text = render(
        &sims,
        &names,
        posted,
        started.elapsed(),
        stats.inbox_dead + stats.writes_dead,
    );
    let report = DemoReport {
        opportunities: sims.marketo.opportunities().len(),
        roles: sims.marketo.roles().len(),
        notifications: posted,
        marketo_calls: sims.marketo.rest_call_count(),
        text,
    };
    app.stop().await;
    Ok(report)
}

fn render(
    sims: &Simulators,
    names: &[(Uuid, &str)],
    posted: usize,
    drained_in: Duration,
    dead: i64,
) -> String {
    let m = &sims.marketo;
    let companies = m.companies();
    let leads = m.leads();
    let name_of = |ext: &str| {
        names
            .iter()
            .find(|(id, _)| id.to_string() == ext)
            .map(|(_, n)| (*n).to_owned())
            .unwrap_or_else(|| ext.to_owned())
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{posted} notifications posted; queue drained in {:.1} s; dead letters: {dead}\n",
        drained_in.as_secs_f64()
    );
    let _ = writeln!(out, "Marketo opportunities");
    let _ = writeln!(
        out,
        "  {:<30} {:<6} {:>10} {:>5} {:<8} {:<14}",
        "name", "stage", "amount", "prob", "closed/won", "company"
    );
    for (ext, o) in m.opportunities() {
        let company = match o.get("externalCompanyId") {
            Some(Value::String(id)) => match companies.get(id).and_then(|c| c.get("company")) {
                Some(Value::String(name)) => name.clone(),
                _ => format!("(unnamed {})", &id[..8.min(id.len())]),
            },
            _ => "(none)".into(),
        };
        let closed_won = format!("{}/{}", text(o.get("isClosed")), text(o.get("isWon")));
        let _ = writeln!(
            out,
            "  {:<30} {:<6} {:>10} {:>5} {:<10} {:<14}",
            name_of(&ext),
            text(o.get("stage")),
            text(o.get("amount")),
            text(o.get("probability")),
            closed_won,
            company
        );
    }
    let _ = writeln!(out, "\nMarketo opportunity roles");
    let _ = writeln!(out, "  {:<30} {:<26} {:<20}", "opportunity", "lead", "role");
    for (ext, lead, role) in m.roles() {
        let email = text(leads.get(&lead).and_then(|l| l.get("email")));
        let _ = writeln!(out, "  {:<30} {:<26} {:<20}", name_of(&ext), email, role);
    }
    let _ = writeln!(out, "\nMarketo calls (calls / records)");
    let mut by_path: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for call in m.calls() {
        let records = call
            .body
            .get("input")
            .and_then(Value::as_array)
            .map(Vec::len)
            .unwrap_or(0);
        let e = by_path
            .entry(format!("{} {}", call.method, call.path))
            .or_default();
        e.0 += 1;
        e.1 += records;
    }
    for (path, (calls, records)) in by_path {
        let _ = writeln!(out, "  {path:<48} {calls:>3} / {records:>3}");
    }
    let _ = writeln!(out, "  REST calls in all: {}", m.rest_call_count());
    out
}
