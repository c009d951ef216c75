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

/// One step of the script: what happens in Dynamics (the records by name), what oppsync makes
/// of it in Marketo, and the notifications Dynamics sends for it.
struct Step {
    caption: &'static str,
    effect: &'static str,
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
        caption: "Contacts James Glynn and Tom Avery (Contoso Ltd), Maria Campbell (Fabrikam Inc) and Priya Shah (no account) created",
        effect: "nothing yet: a contact becomes a lead when an opportunity role needs it",
        notifications: vec![n1, n2, n3, n4],
    });

    let (renewal, n) = org.create_opportunity(
        "Contoso - 500 seats renewal",
        Customer::Contact(james),
        Decimal::new(125_000, 0),
        60,
    );
    steps.push(Step {
        caption: "Contoso - 500 seats renewal created, potential customer contact James Glynn",
        effect: "opportunity; role Potential Customer for James; company Contoso Ltd (his account)",
        notifications: vec![n],
    });
    let (pilot, n) = org.create_opportunity(
        "Fabrikam - pilot",
        Customer::Account(fabrikam.0),
        Decimal::new(18_000, 0),
        30,
    );
    steps.push(Step {
        caption: "Fabrikam - pilot created, potential customer account Fabrikam Inc",
        effect: "opportunity; company Fabrikam Inc; no role (an account is not a person)",
        notifications: vec![n],
    });
    steps.push(Step {
        caption: "Fabrikam - pilot: Maria Campbell added as Stakeholder (Dynamics sends the connection, its reciprocal and a back-fill update)",
        effect: "one role Stakeholder for Maria, whichever of the three comes first",
        notifications: org.add_stakeholder(pilot, maria, ROLE_STAKEHOLDER),
    });
    steps.push(Step {
        caption: "Contoso - 500 seats renewal: Tom Avery added as Decision Maker, from his contact form",
        effect: "role Decision Maker for Tom (the opportunity is on the other side of the connection)",
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
        caption: "Contoso - 500 seats renewal: amount 130,000, then 142,500 at 80%; the older update arrives last, and twice",
        effect: "amount 142,500 and probability 80 stay: the newest change wins each field",
        notifications: vec![newer, older.clone(), older],
    });
    steps.push(Step {
        caption: "Fabrikam - pilot: potential customer changes from account Fabrikam Inc to contact Priya Shah (no account)",
        effect: "role Potential Customer for Priya; company emptied (she has no account)",
        notifications: vec![org.change_customer(pilot, Customer::Contact(priya))],
    });
    steps.push(Step {
        caption: "Contoso - 500 seats renewal: Tom Avery's connection removed",
        effect: "his Decision Maker role is deleted",
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
        caption: "Northwind - lost cause created for Priya Shah, then deleted",
        effect: "created, then deleted with its role: nothing of it stays",
        notifications: deleted,
    });
    steps.push(Step {
        caption: "Contoso - 500 seats renewal won (the Win message, not an Update)",
        effect: "stage Won, closed and won",
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
    echo("Each step: what happens in Dynamics, what oppsync makes of it in Marketo, and the");
    echo("answers to the webhooks Dynamics sends for it (202 = stored; 200 = a repeated delivery,");
    echo("recognised and not stored again).");
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
        // Each step is synced before the next, so that the story (and what Marketo holds at
        // the end) is the same on every run.
        let step_started = Instant::now();
        while !app.state.store.is_idle().await? {
            if step_started.elapsed() > Duration::from_secs(60) {
                bail!("step {:?} did not sync within 60 s", step.caption);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        echo(&format!("  {}", step.caption));
        echo(&format!("      Marketo: {}", step.effect));
        echo(&format!("      webhooks answered: {}", answers.join(" ")));
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
    // Sorted by what a reader sees, so the report reads the same on every run.
    let mut opportunities: Vec<(String, Vec<String>)> = m
        .opportunities()
        .iter()
        .map(|(ext, o)| {
            let company = match o.get("externalCompanyId") {
                Some(Value::String(id)) => match companies.get(id).and_then(|c| c.get("company")) {
                    Some(Value::String(name)) => name.clone(),
                    _ => format!("(unnamed {})", &id[..8.min(id.len())]),
                },
                _ => "(none)".into(),
            };
            let row = vec![
                text(o.get("stage")),
                text(o.get("amount")),
                text(o.get("probability")),
                format!("{}/{}", text(o.get("isClosed")), text(o.get("isWon"))),
                company,
            ];
            (name_of(ext), row)
        })
        .collect();
    opportunities.sort();
    let _ = writeln!(out, "Marketo opportunities");
    let _ = writeln!(
        out,
        "  {:<30} {:<6} {:>10} {:>5}  {:<11} company",
        "name", "stage", "amount", "prob", "closed/won"
    );
    for (name, r) in &opportunities {
        let _ = writeln!(
            out,
            "  {:<30} {:<6} {:>10} {:>5}  {:<11} {}",
            name, r[0], r[1], r[2], r[3], r[4]
        );
    }
    let mut roles: Vec<(String, String, String)> = m
        .roles()
        .into_iter()
        .map(|(ext, lead, role)| {
            let email = text(leads.get(&lead).and_then(|l| l.get("email")));
            (name_of(&ext), email, role)
        })
        .collect();
    roles.sort();
    let _ = writeln!(out, "\nMarketo opportunity roles");
    let _ = writeln!(out, "  {:<30} {:<26} role", "opportunity", "lead");
    for (opportunity, email, role) in &roles {
        let _ = writeln!(out, "  {opportunity:<30} {email:<26} {role}");
    }
    let mut company_rows: Vec<String> = companies.values().map(|c| text(c.get("company"))).collect();
    company_rows.sort();
    let _ = writeln!(out, "\nMarketo companies");
    for name in &company_rows {
        let _ = writeln!(out, "  {name}");
    }
    let mut lead_rows: Vec<(String, String)> = leads
        .values()
        .map(|l| {
            let name = format!("{} {}", text(l.get("firstName")), text(l.get("lastName")));
            (text(l.get("email")), name)
        })
        .collect();
    lead_rows.sort();
    let _ = writeln!(out, "\nMarketo leads");
    let _ = writeln!(out, "  {:<26} name", "email");
    for (email, name) in &lead_rows {
        let _ = writeln!(out, "  {email:<26} {name}");
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
