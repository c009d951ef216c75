//! Admin flows over HTTP against the real service and the simulators: dead letters re-driven
//! and discarded, pause and resume, re-sync, stats, an opportunity's sync state, the one-way
//! refusal, and the metrics after that traffic.

use std::time::Duration;

use oppsync::sim::dataverse::ROLE_STAKEHOLDER;
use oppsync::sim::env::eventually;
use oppsync::sim::marketo::Fault;
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::now_ms;
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};
use crate::support::jwt;

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

fn org(env: &TestEnv) -> DynamicsOrg {
    DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()))
}

#[tokio::test]
async fn admin_dead_write_listed_retried_then_applied() {
    let env = jwt::env_with_secret(false).await;
    let mut org = org(&env);
    let acme = Uuid::new_v4();
    let (opp, n) = org.create_opportunity("Deal", Customer::Account(acme), Decimal::new(100, 0), 10);
    env.sims.marketo.inject(Fault::RecordError {
        external_ids: vec![opp.to_string()],
        code: "1003".into(),
        message: "Invalid value for field".into(),
    });
    env.deliver(&n).await;
    env.settle_within(Duration::from_secs(30), true).await;

    let (s, dead) = admin(&env, "GET", "/admin/writes?status=dead").await;
    assert_eq!(s, 200);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["opportunity_id"], Value::String(opp.to_string()));
    let key = dead[0]["key"].as_str().unwrap().to_owned();

    // The opportunity's state shows the dead write and its error.
    let (s, state) = admin(&env, "GET", &format!("/admin/opportunities/{opp}")).await;
    assert_eq!(s, 200);
    assert!(
        state["last_error"].as_str().unwrap().contains("1003"),
        "{state:#}"
    );
    assert_eq!(state["company"]["account_id"], Value::String(acme.to_string()));
    assert!(
        state["roles"].as_array().unwrap().is_empty(),
        "an account customer makes no role"
    );

    let (s, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(s, 200);
    assert_eq!(stats["store"]["writes_dead"], 1);

    env.sims.marketo.clear_faults();
    let encoded = url::form_urlencoded::byte_serialize(key.as_bytes()).collect::<String>();
    let (s, body) = admin(&env, "POST", &format!("/admin/writes/{encoded}/retry")).await;
    assert_eq!((s, &body["changed"]), (200, &Value::from(1)), "{body}");
    // A second retry conflicts (it is pending or done now); an unknown key is 404, and text
    // that is no write key at all is 400.
    assert_eq!(
        admin(&env, "POST", &format!("/admin/writes/{encoded}/retry"))
            .await
            .0,
        409
    );
    let unknown = format!("/admin/writes/opportunity:{}/retry", Uuid::new_v4());
    assert_eq!(admin(&env, "POST", &unknown).await.0, 404);
    let (s, body) = admin(&env, "POST", "/admin/writes/nope/retry").await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("write key"),
        "{body}"
    );
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));
    env.stop().await;
}

#[tokio::test]
async fn admin_dead_notification_retried_and_another_discarded() {
    let env = TestEnv::start_with(EnvOptions {
        tweak: Some(Box::new(|c| {
            c.admin.jwt_secret = Some(oppsync::config::Secret::new(jwt::SECRET));
            c.admin.issuer = Some(jwt::ISSUER.into());
            c.admin.audience = Some(jwt::AUDIENCE.into());
            c.worker.max_attempts = 1;
        })),
        ..EnvOptions::default()
    })
    .await;
    let mut org = org(&env);
    // The contacts are known to Dataverse only: planning must read them, and Dataverse fails.
    let (ann, _) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    let (bob, _) = org.create_contact("Bob", "Ray", "bob@example.com", None);
    env.sims.dataverse.inject_5xx(100_000);
    let (opp, n) = org.create_opportunity("A", Customer::Contact(ann), Decimal::new(1, 0), 10);
    env.deliver(&n).await;
    let (_, n2) = org.create_opportunity("B", Customer::Contact(bob), Decimal::new(2, 0), 10);
    env.deliver(&n2).await;
    let store = &env.app.state.store;
    assert!(
        eventually(Duration::from_secs(30), || async {
            store.stats(now_ms()).await.unwrap().inbox_dead == 2
        })
        .await,
        "two dead notifications"
    );

    let (s, page) = admin(&env, "GET", "/admin/notifications?status=dead&limit=1").await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let newest = page["items"][0]["id"].as_i64().unwrap();
    let next = page["next"].as_i64().unwrap();
    let (_, page2) = admin(
        &env,
        "GET",
        &format!("/admin/notifications?status=dead&limit=1&before={next}"),
    )
    .await;
    let older = page2["items"][0]["id"].as_i64().unwrap();
    assert!(older < newest, "newest first");
    let (_, one) = admin(&env, "GET", &format!("/admin/notifications/{older}")).await;
    assert!(one["body"].as_str().unwrap().contains("InputParameters"));
    assert!(one["last_error"].as_str().is_some());
    assert_eq!(admin(&env, "GET", "/admin/notifications/999999").await.0, 404);
    assert_eq!(
        admin(&env, "GET", "/admin/notifications?status=bogus").await.0,
        400
    );

    // Discard the newer (opportunity B), retry the older (A) once Dataverse is back.
    let (s, _) = admin(&env, "POST", &format!("/admin/notifications/{newest}/discard")).await;
    assert_eq!(s, 200);
    assert_eq!(
        admin(&env, "POST", &format!("/admin/notifications/{newest}/discard"))
            .await
            .0,
        409
    );
    env.sims.dataverse.inject_5xx(0);
    let (s, body) = admin(&env, "POST", "/admin/notifications/retry-dead?entity=opportunity").await;
    assert_eq!((s, &body["changed"]), (200, &Value::from(1)), "{body}");
    env.settle().await;
    let held = env.sims.marketo.opportunities();
    assert!(held.contains_key(&opp.to_string()));
    assert_eq!(held.len(), 1, "the discarded one was not applied");
    let (_, one) = admin(&env, "GET", &format!("/admin/notifications/{newest}")).await;
    assert_eq!(one["status"], "discarded");
    env.stop().await;
}

#[tokio::test]
async fn admin_pause_keeps_writes_pending_while_intake_answers_then_resume_pushes() {
    let env = jwt::env_with_secret(false).await;
    let (s, body) = admin(&env, "POST", "/admin/pause").await;
    assert_eq!((s, &body["paused"]), (200, &Value::Bool(true)));
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity("Paused", Customer::Account(Uuid::new_v4()), Decimal::new(5, 0), 5);
    let r = env.post(&n).await;
    assert_eq!(r.status().as_u16(), 202, "intake goes on while paused");
    let store = &env.app.state.store;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = store.stats(now_ms()).await.unwrap();
            s.inbox_pending == 0 && s.writes_pending > 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        env.sims.marketo.opportunities().is_empty(),
        "nothing pushed while paused"
    );
    let (_, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(stats["paused"], true);
    assert!(stats["store"]["writes_pending"].as_i64().unwrap() > 0);

    let (s, body) = admin(&env, "POST", "/admin/resume").await;
    assert_eq!((s, &body["paused"]), (200, &Value::Bool(false)));
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));
    env.stop().await;
}

/// The pause rule (docs/operations.md, "Pausing"): one flag in the store, lifted only by the
/// admin API's resume; `worker.paused = true` sets it at start, `false` leaves it alone.
#[tokio::test]
async fn pause_rule_a_stored_pause_outlives_a_restart_with_worker_paused_false_until_resumed() {
    let env = jwt::env_with_secret(false).await;
    assert!(!env.config.worker.paused);
    let (s, _) = admin(&env, "POST", "/admin/pause").await;
    assert_eq!(s, 200);
    let env = env.restart(|c| c.worker.paused = false).await;
    let (_, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(
        stats["paused"], true,
        "worker.paused = false lifted the stored pause"
    );
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity("Held", Customer::Account(Uuid::new_v4()), Decimal::new(5, 0), 5);
    env.deliver(&n).await;
    let store = &env.app.state.store;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = store.stats(now_ms()).await.unwrap();
            s.inbox_pending == 0 && s.writes_pending > 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(env.sims.marketo.opportunities().is_empty(), "pushed while paused");

    let (s, body) = admin(&env, "POST", "/admin/resume").await;
    assert_eq!((s, &body["paused"]), (200, &Value::Bool(false)));
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));
    env.stop().await;
}

#[tokio::test]
async fn pause_rule_worker_paused_true_pauses_at_every_start_and_resume_lifts_it() {
    let env = jwt::env_with_secret(false).await;
    let env = env.restart(|c| c.worker.paused = true).await;
    let (_, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(stats["paused"], true);
    let (s, _) = admin(&env, "POST", "/admin/resume").await;
    assert_eq!(s, 200);
    let (_, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(stats["paused"], false);
    // Still configured paused: the next start pauses again.
    let env = env.restart(|_| {}).await;
    let (_, stats) = admin(&env, "GET", "/admin/stats").await;
    assert_eq!(stats["paused"], true);
    env.stop().await;
}

#[tokio::test]
async fn admin_resync_reads_dataverse_404_for_unknown_502_on_failure() {
    let env = jwt::env_with_secret(false).await;
    let mut org = org(&env);
    // Dynamics has the opportunity, oppsync never heard of it (the notification was lost).
    let (opp, _) = org.create_opportunity(
        "Missed",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(7, 0),
        30,
    );
    assert_eq!(
        admin(&env, "GET", &format!("/admin/opportunities/{opp}")).await.0,
        404
    );
    let (s, body) = admin(&env, "POST", &format!("/admin/opportunities/{opp}/resync")).await;
    assert_eq!(s, 200, "{body}");
    assert!(body["writes_planned"].as_u64().unwrap() >= 1);
    env.settle().await;
    assert_eq!(
        env.sims.marketo.opportunities()[&opp.to_string()]["name"],
        "Missed"
    );

    let (s, body) = admin(
        &env,
        "POST",
        &format!("/admin/opportunities/{}/resync", Uuid::new_v4()),
    )
    .await;
    assert_eq!(
        (s, body["type"].as_str()),
        (404, Some("urn:oppsync:problem:not-found"))
    );
    env.sims.dataverse.inject_5xx(100_000);
    let (s, body) = admin(&env, "POST", &format!("/admin/opportunities/{opp}/resync")).await;
    assert_eq!(
        (s, body["type"].as_str()),
        (502, Some("urn:oppsync:problem:upstream-unavailable"))
    );
    env.sims.dataverse.inject_5xx(0);
    assert_eq!(
        admin(&env, "POST", "/admin/opportunities/not-a-uuid/resync")
            .await
            .0,
        400
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_resync_needs_a_worker() {
    let env = jwt::env_with_secret(true).await;
    let (s, body) = admin(
        &env,
        "POST",
        &format!("/admin/opportunities/{}/resync", Uuid::new_v4()),
    )
    .await;
    assert_eq!(
        (s, body["type"].as_str()),
        (503, Some("urn:oppsync:problem:worker-not-running"))
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_opportunity_state_lists_roles_with_their_sources() {
    let env = jwt::env_with_secret(false).await;
    let mut org = org(&env);
    let (ann, n) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    env.deliver(&n).await;
    let (bob, n) = org.create_contact("Bob", "Ray", "bob@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Roles", Customer::Contact(ann), Decimal::new(9, 0), 50);
    env.deliver(&n).await;
    for n in org.add_stakeholder(opp, bob, ROLE_STAKEHOLDER) {
        env.deliver(&n).await;
    }
    env.settle().await;

    let (s, state) = admin(&env, "GET", &format!("/admin/opportunities/{opp}")).await;
    assert_eq!(s, 200, "{state}");
    assert_eq!(state["marketo_fields"]["name"], "Roles");
    assert_eq!(state["company"], Value::Null, "Ann has no account");
    assert!(state["last_version"].as_i64().unwrap() > 0);
    assert_eq!(state["writes"].as_array().unwrap().len(), 0, "all done");
    let roles = state["roles"].as_array().unwrap();
    let find = |contact: Uuid| {
        roles
            .iter()
            .find(|r| r["contact_id"] == contact.to_string())
            .unwrap_or_else(|| panic!("no role for {contact}: {roles:#?}"))
    };
    let ann_role = find(ann);
    assert_eq!(ann_role["role"], "Potential Customer");
    assert_eq!(ann_role["sources"][0]["kind"], "customer");
    let bob_role = find(bob);
    assert_eq!(bob_role["role"], "Stakeholder");
    let kinds: Vec<&str> = bob_role["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == "connection"),
        "{bob_role}"
    );
    assert_eq!(admin(&env, "GET", "/admin/opportunities/not-a-uuid").await.0, 400);
    env.stop().await;
}

#[tokio::test]
async fn admin_cannot_create_an_opportunity() {
    let env = jwt::env_with_secret(true).await;
    let (s, body) = admin(&env, "POST", "/admin/opportunities").await;
    assert_eq!(s, 403);
    assert_eq!(body["type"], "urn:oppsync:problem:marketo-side-creation-refused");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("created in Dynamics 365")
    );
    env.stop().await;
}

/// The recorder is process-global (tests share it): presence and growth, not exact values.
#[tokio::test]
async fn admin_metrics_after_traffic() {
    let env = jwt::env_with_secret(false).await;
    let mut org = org(&env);
    let (_, n) = org.create_opportunity(
        "Metered",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(3, 0),
        3,
    );
    env.deliver(&n).await;
    let bad = env
        .http
        .post(format!("{}/webhooks/dynamics", env.app.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 401);
    env.settle().await;
    let text = env.metrics_text().await;
    for needle in [
        "oppsync_intake_total{outcome=\"stored\"}",
        "oppsync_intake_total{outcome=\"unauthorized\"}",
        "oppsync_inbox_depth",
        "oppsync_inbox_oldest_age_seconds",
        "oppsync_marketo_calls_total{endpoint=",
        "outcome=\"ok\"",
        "oppsync_marketo_limiter_waits_total",
        "oppsync_marketo_token_refreshes_total",
        "oppsync_marketo_quota_used",
        "oppsync_marketo_quota_left",
        "oppsync_dead_letters{kind=\"notification\"}",
        "oppsync_dead_letters{kind=\"marketo_write\"}",
        "oppsync_worker_lag_seconds",
        "oppsync_paused",
    ] {
        assert!(text.contains(needle), "{needle} missing from /metrics:\n{text}");
    }
    let quota_used: f64 = text
        .lines()
        .find(|l| l.starts_with("oppsync_marketo_quota_used "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(quota_used >= 1.0, "Marketo was called");
    env.stop().await;
}
