//! Failures that used to pass unnoticed or lose data: another integration's rate-limit storm,
//! a transport error's cause, a value that does not fit its conversion, a Marketo setting
//! that blocks pushing.

use std::time::Duration;

use oppsync::dynamics::{AttributeValue, Attributes};
use oppsync::sim::marketo::{Fault, MarketoSimConfig};
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::Status;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};
use crate::support::jwt;
use crate::support::scenario::view;

/// With one attempt per write and one immediate retry per call, any 606 counted as a failed
/// attempt would dead-letter the write at once: a storm from someone else must not.
#[tokio::test]
async fn a_rate_limit_storm_from_another_integration_slows_pushing_and_dead_letters_nothing() {
    let env = TestEnv::start_with(EnvOptions {
        marketo: Some(MarketoSimConfig {
            window: Duration::from_secs(2),
            ..MarketoSimConfig::default()
        }),
        tweak: Some(Box::new(|c| {
            c.worker.max_attempts = 1;
            c.marketo.max_retries = 1;
            c.marketo.batch_size = 5;
        })),
        ..EnvOptions::default()
    })
    .await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let m = &env.sims.marketo;
    m.inject(Fault::ErrorCode { code: 606, times: 4 });
    m.inject(Fault::ErrorCode { code: 615, times: 2 });
    m.inject(Fault::ErrorCode { code: 604, times: 1 });
    m.inject(Fault::ErrorCode { code: 608, times: 1 });
    m.inject(Fault::Storm {
        code: 606,
        percent: 50,
        lasting: Duration::from_secs(3),
        at_least: 4,
    });
    let mut expected = Vec::new();
    for i in 0..30 {
        let (id, n) = org.create_opportunity(
            &format!("Storm {i}"),
            Customer::Account(Uuid::new_v4()),
            Decimal::new(100 + i, 0),
            40,
        );
        env.deliver(&n).await;
        expected.push((id, format!("Storm {i}")));
    }
    // Fails the test on any dead letter.
    env.settle_within(Duration::from_secs(60), false).await;
    assert!(m.count_606() >= 4, "the storm happened: {}", m.count_606());
    let held = m.opportunities();
    for (id, name) in &expected {
        let record = held
            .get(&id.to_string())
            .unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(record["name"], *name);
    }
    // Every write settled done; none spent an attempt on the storm.
    let dead = env
        .app
        .state
        .store
        .list_writes(Some(Status::Dead), None, 10)
        .await
        .unwrap();
    assert!(dead.is_empty(), "{dead:?}");
    env.stop().await;
}

/// A dead letter says why the call failed down to the socket, not just "error sending request".
#[tokio::test]
async fn a_dead_letter_from_a_refused_connection_names_the_cause() {
    // A port nothing listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let env = TestEnv::start_with(EnvOptions {
        tweak: Some(Box::new(move |c| {
            c.worker.max_attempts = 1;
            c.marketo.max_retries = 0;
            c.marketo.base_url = url::Url::parse(&format!("http://{closed}")).ok();
        })),
        ..EnvOptions::default()
    })
    .await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (id, n) = org.create_opportunity(
        "Unreachable",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    env.deliver(&n).await;
    env.settle_within(Duration::from_secs(30), true).await;
    let dead = env
        .app
        .state
        .store
        .list_writes(Some(Status::Dead), None, 10)
        .await
        .unwrap();
    let reason = dead
        .iter()
        .find(|w| w.key.to_string() == format!("opportunity:{id}"))
        .and_then(|w| w.last_error.clone())
        .unwrap_or_else(|| panic!("no dead letter for the opportunity: {dead:?}"));
    assert!(
        reason.to_lowercase().contains("connection refused"),
        "the reason names the cause: {reason}"
    );
    assert!(
        !reason.contains("client_secret") && !reason.contains(&env.sims.marketo.client_secret()),
        "no secret in the reason: {reason}"
    );
    env.stop().await;
}

async fn metric(env: &TestEnv, series: &str) -> Option<f64> {
    let text = env.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A value Dynamics holds that does not fit its conversion (closeprobability → probability is
/// `int`) leaves Marketo's field as it was, is counted and shown; a truly empty one clears it.
#[tokio::test]
async fn a_value_that_fails_its_conversion_leaves_the_marketo_field_unchanged() {
    let env = jwt::env_with_secret(false).await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (id, n) = org.create_opportunity(
        "Odd value",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(9, 0),
        60,
    );
    env.deliver(&n).await;
    env.settle().await;
    let probability =
        |env: &TestEnv| env.sims.marketo.opportunities()[&id.to_string()]["probability"].clone();
    assert_eq!(probability(&env), json!(60));
    let series = "oppsync_mapping_rejected_total{field=\"probability\"}";
    let before = metric(&env, series).await.unwrap_or(0.0);

    let mut changes = Attributes::new();
    changes.insert(
        "closeprobability".into(),
        AttributeValue::String("about half".into()),
    );
    changes.insert("name".into(), AttributeValue::String("Odd value, renamed".into()));
    env.deliver(&org.update_opportunity(id, changes)).await;
    env.settle().await;
    let held = env.sims.marketo.opportunities()[&id.to_string()].clone();
    assert_eq!(
        held["name"],
        json!("Odd value, renamed"),
        "the rest of the record is synced"
    );
    assert_eq!(
        held["probability"],
        json!(60),
        "the field is left unchanged, not nulled"
    );
    assert!(
        metric(&env, series).await.unwrap_or(0.0) > before,
        "the rejection is counted"
    );
    let view: Value = env
        .http
        .get(format!("{}/admin/opportunities/{id}", env.app.url()))
        .bearer_auth(jwt::read_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rejected = &view["rejected_values"]["probability"];
    assert_eq!(rejected["dynamics"], json!("closeprobability"), "{view:#}");
    assert!(
        rejected["reason"].as_str().unwrap_or("").contains("about half"),
        "{view:#}"
    );

    // Truly empty in Dynamics: the field is cleared, and nothing is reported any more.
    let mut changes = Attributes::new();
    changes.insert("closeprobability".into(), AttributeValue::Null);
    env.deliver(&org.update_opportunity(id, changes)).await;
    env.settle().await;
    assert_eq!(probability(&env), Value::Null);
    env.stop().await;
}

/// Every kind of write pending at once (pushing paused while they were planned): company,
/// lead, opportunity, role upsert, role delete, opportunity delete. Each kind goes in its own
/// calls and Marketo ends exactly as with calm, in-order delivery.
#[tokio::test]
async fn a_mixed_ready_set_reaches_marketo_intact() {
    let calm = TestEnv::start().await;
    let mixed = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(calm.sims.dataverse.clone()));
    org.mirror_to(mixed.sims.dataverse.clone());
    let deliver_both = |batch: Vec<oppsync::dynamics::compose::NotificationBuilder>| {
        let (calm, mixed) = (&calm, &mixed);
        async move {
            for n in &batch {
                calm.deliver(n).await;
                mixed.deliver(n).await;
            }
        }
    };
    // Already in Marketo: an opportunity with a stakeholder, and one to delete later.
    let acme = Uuid::new_v4();
    let (ann, n) = org.create_contact("Ann", "Ames", "ann@example.com", Some((acme, "Acme")));
    let (bob, n2) = org.create_contact("Bob", "Byrd", "bob@example.com", Some((acme, "Acme")));
    deliver_both(vec![n, n2]).await;
    let (kept, n) = org.create_opportunity("Kept", Customer::Account(acme), Decimal::new(10, 0), 20);
    let (doomed, n2) = org.create_opportunity("Doomed", Customer::Contact(bob), Decimal::new(20, 0), 30);
    deliver_both(vec![n, n2]).await;
    deliver_both(org.add_stakeholder(kept, ann, oppsync::sim::dataverse::ROLE_STAKEHOLDER)).await;
    calm.settle().await;
    mixed.settle().await;

    // Paused: the next changes pile up as one mixed ready set.
    let store = &mixed.app.state.store;
    store.set_paused(true).await.unwrap();
    let globex = Uuid::new_v4();
    let (cid, n) = org.create_contact("Cid", "Cole", "cid@example.com", Some((globex, "Globex")));
    let mut batch = vec![n];
    let (_fresh, n) = org.create_opportunity("Fresh", Customer::Contact(cid), Decimal::new(30, 0), 40);
    batch.push(n);
    batch.extend(org.remove_stakeholder(kept, ann));
    batch.extend(org.delete_opportunity(doomed));
    deliver_both(batch).await;
    calm.settle().await;
    let planned = oppsync::sim::env::eventually(Duration::from_secs(20), || async {
        store.stats(oppsync::store::now_ms()).await.unwrap().inbox_pending == 0
    })
    .await;
    assert!(planned);
    let pending = store.list_writes(Some(Status::Pending), None, 100).await.unwrap();
    let phases: std::collections::BTreeSet<_> = pending.iter().map(|w| w.phase).collect();
    assert_eq!(
        phases,
        std::collections::BTreeSet::from(oppsync::rules::Phase::ALL),
        "every kind of write is pending at once: {pending:#?}"
    );
    let calls_before = mixed.sims.marketo.calls().len();
    store.set_paused(false).await.unwrap();
    mixed.settle().await;
    assert_eq!(view(&mixed.sims.marketo), view(&calm.sims.marketo));
    // Each call carried records of its own endpoint only.
    for call in &mixed.sims.marketo.calls()[calls_before..] {
        let Some(input) = call.body.get("input").and_then(Value::as_array) else {
            continue;
        };
        for record in input {
            let expected_key = match call.path.as_str() {
                "/rest/v1/companies.json" => "externalCompanyId",
                "/rest/v1/opportunities.json" | "/rest/v1/opportunities/delete.json" => {
                    "externalOpportunityId"
                }
                "/rest/v1/opportunities/roles.json" | "/rest/v1/opportunities/roles/delete.json" => "leadId",
                _ => continue,
            };
            assert!(
                record.get(expected_key).is_some_and(|v| !v.is_null()),
                "{} carried a record without {expected_key}: {record}",
                call.path
            );
        }
    }
    calm.stop().await;
    mixed.stop().await;
}

/// 1018 (native CRM sync enabled on the instance) stops pushing; intake and readiness go on.
/// The block is in /admin/stats (message, since when) and in `oppsync_marketo_blocked`, and
/// clears by itself once the instance accepts writes again.
#[tokio::test]
async fn native_crm_sync_enabled_blocks_pushing_with_readiness_green_and_is_reported_until_fixed() {
    let env = jwt::env_with_secret(false).await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    env.sims.marketo.set_crm_enabled(true);
    let (opp, n) = org.create_opportunity(
        "Blocked",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    env.deliver(&n).await;
    let stats = || async {
        env.http
            .get(format!("{}/admin/stats", env.app.url()))
            .bearer_auth(jwt::read_token())
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let blocked = oppsync::sim::env::eventually(Duration::from_secs(10), || async {
        stats().await["blocked"].as_array().is_some_and(|b| !b.is_empty())
    })
    .await;
    assert!(blocked, "the block shows in /admin/stats");
    let s = stats().await;
    let block = &s["blocked"][0];
    assert_eq!(block["system"], json!("marketo"), "{s:#}");
    assert_eq!(block["reason"], json!("crm_sync_enabled"), "{s:#}");
    assert!(block["message"].as_str().unwrap().contains("CRM"), "{s:#}");
    assert!(block["since"].as_i64().unwrap() > 0, "{s:#}");
    assert_eq!(
        env.status_of("/readyz").await,
        200,
        "readiness stays green: intake goes on"
    );
    assert_eq!(
        metric(&env, "oppsync_marketo_blocked{reason=\"crm_sync_enabled\"}").await,
        Some(1.0)
    );
    // Intake still takes notifications.
    let (_, n2) = org.create_opportunity("Queued", Customer::Account(Uuid::new_v4()), Decimal::new(2, 0), 2);
    env.deliver(&n2).await;
    let store_stats = env.app.state.store.stats(oppsync::store::now_ms()).await.unwrap();
    assert_eq!(
        store_stats.writes_dead, 0,
        "a configuration error is not a dead letter"
    );

    env.sims.marketo.set_crm_enabled(false);
    // Probed again a minute later in production; the tests' quick settings make it sooner.
    let pushed = oppsync::sim::env::eventually(Duration::from_secs(20), || async {
        env.sims.marketo.opportunities().contains_key(&opp.to_string())
    })
    .await;
    assert!(
        pushed,
        "pushing resumes by itself once the instance accepts writes"
    );
    env.settle().await;
    assert_eq!(stats().await["blocked"], json!([]));
    assert_eq!(
        metric(&env, "oppsync_marketo_blocked{reason=\"crm_sync_enabled\"}").await,
        Some(0.0)
    );
    env.stop().await;
}

/// Every metric the service exposes carries `# HELP` text.
#[tokio::test]
async fn every_metric_has_help_text() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (_, n) = org.create_opportunity("Help", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    env.deliver(&n).await;
    env.settle().await;
    let text = env.metrics_text().await;
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() > 10, "{text}");
    let missing: Vec<&&str> = typed
        .iter()
        .filter(|name| !text.contains(&format!("# HELP {name} ")))
        .collect();
    assert!(missing.is_empty(), "metrics without # HELP: {missing:?}");
    env.stop().await;
}

/// The admin view names the rules that justify a role as the rules do: a connection whose
/// role is not in a stakeholder category justifies nothing, even under the same role name as
/// the potential customer's role.
#[tokio::test]
async fn the_admin_view_agrees_with_the_rules_on_a_non_stakeholder_connection_role() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: Some(Box::new(|c| {
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
            // The potential customer's role shares its name with a connection role of category
            // 1001 (Sales Team), which is no stakeholder category.
            c.sync.customer_role = "Account Manager".into();
        })),
        ..EnvOptions::default()
    })
    .await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (ann, n) = org.create_contact("Ann", "Ames", "ann@example.com", Some((Uuid::new_v4(), "Acme")));
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Roles", Customer::Contact(ann), Decimal::new(1, 0), 1);
    env.deliver(&n).await;
    for n in org.add_stakeholder(opp, ann, oppsync::sim::dataverse::ROLE_ACCOUNT_MANAGER) {
        env.deliver(&n).await;
    }
    env.settle().await;
    let view: Value = env
        .http
        .get(format!("{}/admin/opportunities/{opp}", env.app.url()))
        .bearer_auth(jwt::read_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles = view["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 1, "{view:#}");
    assert_eq!(roles[0]["role"], json!("Account Manager"));
    assert_eq!(
        roles[0]["sources"],
        json!([{ "kind": "customer", "connection_id": null }]),
        "only the customer rule justifies the role: {view:#}"
    );
    env.stop().await;
}

/// The day's Marketo call count is kept in the store: a restarted service goes on from it
/// instead of zero, so a crash loop cannot spend the instance's daily quota several times.
#[tokio::test]
async fn the_marketo_calls_used_today_survive_a_restart() {
    let env = TestEnv::start().await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    for i in 0..3 {
        let (_, n) = org.create_opportunity(
            &format!("Counted {i}"),
            Customer::Account(Uuid::new_v4()),
            Decimal::new(100, 0),
            1,
        );
        env.deliver(&n).await;
        env.settle().await;
    }
    let used = |env: &TestEnv| env.app.state.worker.marketo_usage().map_or(0, |u| u.calls_today);
    let before = used(&env);
    assert!(before >= 3, "Marketo was called: {before}");
    let env = env.restart(|_| {}).await;
    let kept = oppsync::sim::env::eventually(Duration::from_secs(10), || async {
        env.app.state.lifecycle.is_pushing() && used(&env) >= before
    })
    .await;
    assert!(
        kept,
        "after the restart {} calls are counted, {before} before",
        used(&env)
    );
    let left = env
        .app
        .state
        .worker
        .marketo_usage()
        .map(|u| u.quota_left)
        .unwrap();
    let quota = env
        .app
        .state
        .worker
        .marketo_usage()
        .map(|u| u.daily_quota)
        .unwrap();
    assert!(
        left <= quota - before,
        "{left} left of {quota} after {before} calls"
    );
    env.stop().await;
}
