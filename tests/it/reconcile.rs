//! Reconciliation over real HTTP with the simulators: changes made in Dynamics whose webhooks
//! never came are fixed in Marketo by one pass (change tracking on), or the update fixed and the
//! delete reported (change tracking off); changes webhooks brought already cost no Marketo call.

use std::time::Duration;

use futures::StreamExt;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::dynamics::{AttributeValue, Attributes};
use oppsync::sim::dataverse::ROLE_STAKEHOLDER;
use oppsync::sim::env::eventually;
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::sim::scenario::view;
use oppsync::store::now_ms;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};
use crate::support::jwt;

async fn env(interval_secs: u64) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        tweak: Some(Box::new(move |c| {
            c.reconcile.interval_secs = interval_secs;
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await
}

async fn admin(env: &TestEnv, method: &str, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", env.app.url());
    let req = match method {
        "POST" => env.http.post(url),
        _ => env.http.get(url),
    };
    let r = req.bearer_auth(jwt::write_token()).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn table<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == json!(name))
        .unwrap()
}

/// Three opportunities with a stakeholder each, delivered by webhook (the org's clock is now, so
/// `modifiedon` queries see its later changes).
async fn seeded(envs: &[&TestEnv]) -> (DynamicsOrg, Vec<Uuid>, Uuid) {
    let mut org = DynamicsOrg::new(now_ms(), Some(envs[0].sims.dataverse.clone()));
    for e in &envs[1..] {
        org.mirror_to(e.sims.dataverse.clone());
    }
    let mut history: Vec<NotificationBuilder> = Vec::new();
    let account = Uuid::new_v4();
    let (ann, n) = org.create_contact("Ann", "Lee", "ann@example.com", Some((account, "Acme")));
    history.push(n);
    let (bob, n) = org.create_contact("Bob", "Ray", "bob@example.com", None);
    history.push(n);
    let mut opportunities = Vec::new();
    for i in 0..3 {
        let (o, n) = org.create_opportunity(
            &format!("Deal {i}"),
            Customer::Contact(ann),
            Decimal::new(100 * (i + 1), 0),
            10,
        );
        history.push(n);
        history.extend(org.add_stakeholder(o, bob, ROLE_STAKEHOLDER));
        opportunities.push(o);
    }
    for e in envs {
        futures::stream::iter(&history)
            .map(|n| e.deliver(n))
            .buffered(1)
            .collect::<Vec<()>>()
            .await;
        e.settle().await;
    }
    (org, opportunities, bob)
}

/// Changes made in Dynamics: an update, a delete, a stakeholder removed. Returns their webhooks.
fn missed_changes(org: &mut DynamicsOrg, opportunities: &[Uuid], bob: Uuid) -> Vec<NotificationBuilder> {
    let mut changes = Attributes::new();
    changes.insert(
        "name".into(),
        AttributeValue::String("Renamed in Dynamics".into()),
    );
    changes.insert("closeprobability".into(), AttributeValue::Int(75));
    let mut out = vec![org.update_opportunity(opportunities[0], changes)];
    out.extend(org.delete_opportunity(opportunities[1]));
    out.extend(org.remove_stakeholder(opportunities[2], bob));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_and_a_delete_without_webhooks_are_fixed_by_one_reconcile_pass() {
    let env = env(1).await;
    let calm = TestEnv::start().await;
    let (mut org, opportunities, bob) = seeded(&[&env, &calm]).await;
    // A pass that began after the webhooks were planned finds nothing to write: what webhooks
    // brought costs no Marketo call.
    let seeded_at = now_ms();
    let pass_after = |t: i64| {
        let env = &env;
        async move {
            let (_, s) = admin(env, "GET", "/admin/reconcile").await;
            s["tables"].as_array().is_some_and(|tables| {
                tables
                    .iter()
                    .all(|x| x["last_pass_at"].as_i64().is_some_and(|at| at > t))
            })
        }
    };
    assert!(eventually(Duration::from_secs(20), || pass_after(seeded_at)).await);
    let (_, status) = admin(&env, "GET", "/admin/reconcile").await;
    assert_eq!(
        table(&status, "opportunity")["change_tracking"],
        json!(true),
        "{status}"
    );
    for name in ["opportunity", "connection", "contact"] {
        assert_eq!(table(&status, name)["writes_planned"], json!(0), "{status}");
    }
    let baseline = now_ms();
    env.settle().await;

    // Changed in Dynamics; the webhooks are lost for `env`, delivered to `calm`. Among them the
    // rename of the account that is the opportunities' Marketo company.
    let companies = env.sims.marketo.companies();
    assert_eq!(companies.len(), 1, "{companies:?}");
    let (acme, company) = companies.into_iter().next().unwrap();
    assert_eq!(company["company"], json!("Acme"), "{company:?}");
    let acme = Uuid::parse_str(&acme).unwrap();
    let mut lost = missed_changes(&mut org, &opportunities, bob);
    lost.push(org.rename_account(acme, "Acme Renamed"));
    for n in lost {
        calm.deliver(&n).await;
    }
    calm.settle().await;
    assert!(eventually(Duration::from_secs(20), || pass_after(baseline)).await);
    env.settle().await;
    let (_, status) = admin(&env, "GET", "/admin/reconcile").await;
    let m = &env.sims.marketo;
    assert_eq!(
        m.opportunities()[&opportunities[0].to_string()]["name"],
        json!("Renamed in Dynamics")
    );
    assert!(
        !m.opportunities().contains_key(&opportunities[1].to_string()),
        "the delete was seen"
    );
    assert_eq!(
        m.companies()[&acme.to_string()]["company"],
        json!("Acme Renamed"),
        "the lost rename of a Marketo company was seen"
    );
    assert_eq!(view(m), view(&calm.sims.marketo));
    let found: u64 = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["changes_found"].as_u64().unwrap())
        .sum();
    assert!(found >= 3, "{status}");
    let metrics = env.metrics_text().await;
    assert!(
        metrics.contains("oppsync_reconcile_missed_changes_total"),
        "{metrics}"
    );
    assert!(metrics.contains("oppsync_reconcile_delta_token_age_seconds"));
    assert!(metrics.contains("oppsync_reconcile_last_pass_timestamp_seconds"));
    env.stop().await;
    calm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_change_tracking_off_the_update_is_fixed_and_the_delete_reported() {
    let env = env(0).await;
    env.sims.dataverse.set_change_tracking("opportunities", false);
    let (mut org, opportunities, bob) = seeded(&[&env]).await;
    let (s, status) = admin(&env, "POST", "/admin/reconcile").await;
    assert_eq!(s, 200, "{status}");
    assert_eq!(
        table(&status, "opportunity")["change_tracking"],
        json!(false),
        "{status}"
    );
    assert_eq!(
        table(&status, "connection")["change_tracking"],
        json!(true),
        "{status}"
    );
    assert_eq!(
        table(&status, "opportunity")["deletes_needing_webhook"],
        json!([])
    );
    // Readiness tells it too, without failing for it.
    let (status, ready) = env.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let detail = ready["checks"]["change_tracking"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("off for opportunity:") && detail.contains("--enable-change-tracking"),
        "{ready}"
    );

    let webhooks = missed_changes(&mut org, &opportunities, bob);
    let (s, status) = admin(&env, "POST", "/admin/reconcile").await;
    assert_eq!(s, 200, "{status}");
    env.settle().await;
    let m = &env.sims.marketo;
    assert_eq!(
        m.opportunities()[&opportunities[0].to_string()]["name"],
        json!("Renamed in Dynamics"),
        "the update is fixed through modifiedon"
    );
    let deleted = opportunities[1].to_string();
    assert!(
        m.opportunities().contains_key(&deleted),
        "a delete is not seen without change tracking"
    );
    assert_eq!(
        table(&status, "opportunity")["deletes_needing_webhook"],
        json!([deleted]),
        "{status}"
    );

    // Its webhook, re-delivered, deletes it; the next pass no longer reports it.
    for n in &webhooks[1..] {
        env.deliver(n).await;
    }
    env.settle().await;
    assert!(!env.sims.marketo.opportunities().contains_key(&deleted));
    let (_, status) = admin(&env, "POST", "/admin/reconcile").await;
    assert_eq!(
        table(&status, "opportunity")["deletes_needing_webhook"],
        json!([]),
        "{status}"
    );
    let (s, _) = admin(&env, "GET", "/admin/reconcile").await;
    assert_eq!(s, 200);
    env.stop().await;
}
