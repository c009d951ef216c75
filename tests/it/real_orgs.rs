//! What real Dynamics organisations do (issue 17), end to end over real HTTP with both
//! simulators: deals closed through Win / Lose / SetState, one operation running a step twice,
//! sandbox copies, company names, deleted contacts, byte-order marks.

use std::collections::BTreeSet;

use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::{DEFAULT_ORGANIZATION_ID, NotificationBuilder};
use oppsync::rules::{Conversion, FieldMapping};
use oppsync::sim::dataverse::{ROLE_STAKEHOLDER, SIM_ORGANIZATION_ID};
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::Status;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};

const START: i64 = 1_750_000_000_000;
const OPPORTUNITY_CALLS: &str = "/rest/v1/opportunities.json";

fn org(env: &TestEnv) -> DynamicsOrg {
    DynamicsOrg::new(START, Some(env.sims.dataverse.clone()))
}

/// The default mapping plus the close: actual value, close date and status reason.
async fn env_with_close_mapping() -> TestEnv {
    TestEnv::start_with(EnvOptions {
        tweak: Some(Box::new(|c| {
            c.sync.fields.extend([
                FieldMapping::new("actualvalue", "expectedRevenue", Conversion::Money),
                FieldMapping::new("actualclosedate", "lastActivityDate", Conversion::Date),
                FieldMapping {
                    labels: [
                        ("3", "Won"),
                        ("4", "Canceled"),
                        ("5", "Out-Sold"),
                        ("1", "In Progress"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                    ..FieldMapping::new("statuscode", "forecastCategoryName", Conversion::OptionsetLabel)
                },
            ]);
        })),
        ..EnvOptions::default()
    })
    .await
}

fn opportunity(env: &TestEnv, id: Uuid) -> Map<String, Value> {
    env.sims
        .marketo
        .opportunities()
        .remove(&id.to_string())
        .unwrap_or_else(|| panic!("Marketo has no opportunity {id}"))
}

/// The fields a close decides.
fn close_fields(o: &Map<String, Value>) -> Value {
    json!([
        o["stage"],
        o["isClosed"],
        o["isWon"],
        o["expectedRevenue"],
        o["lastActivityDate"],
        o["forecastCategoryName"]
    ])
}

#[tokio::test]
async fn win_alone_makes_the_opportunity_won_with_its_actual_value_and_close_date() {
    let env = env_with_close_mapping().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Closing",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(50_000, 0),
        80,
    );
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(opportunity(&env, opp)["stage"], json!("Open"));
    let (win, _update) = org.close(opp, true, 3, Decimal::new(4_750_000, 2));
    let r = env.post(&win).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    env.settle().await;
    let o = opportunity(&env, opp);
    let day = time::OffsetDateTime::from_unix_timestamp((org.now() / 1000) as i64)
        .unwrap()
        .date();
    assert_eq!(
        close_fields(&o),
        json!(["Won", true, true, 47500, day.to_string(), "Won"])
    );
    assert_eq!(o["amount"].as_f64(), Some(50000.0), "the estimate stays");
    env.stop().await;
}

#[tokio::test]
async fn win_and_its_update_in_either_order_and_duplicated_end_the_same_with_one_write() {
    let mut finals = Vec::new();
    for scenario in ["win", "win+update", "update+win", "win+update+win+update"] {
        let env = env_with_close_mapping().await;
        let mut org = org(&env);
        let (opp, n) = org.create_opportunity(
            "Either way",
            Customer::Account(Uuid::new_v4()),
            Decimal::new(9_000, 0),
            70,
        );
        env.deliver(&n).await;
        env.settle().await;
        let before = env.sims.marketo.call_count(OPPORTUNITY_CALLS);
        let (win, update) = org.close(opp, true, 3, Decimal::new(8_800, 0));
        for step in scenario.split('+') {
            let r = env.post(if step == "win" { &win } else { &update }).await;
            assert!(r.status().is_success(), "{scenario}: {}", r.status());
            // Settling between deliveries makes every one a separate push opportunity.
            env.settle().await;
        }
        assert_eq!(
            env.sims.marketo.call_count(OPPORTUNITY_CALLS) - before,
            1,
            "{scenario}: one opportunity write for the close, nothing more"
        );
        let o = opportunity(&env, opp);
        finals.push((scenario, close_fields(&o), o["amount"].clone(), o["name"].clone()));
        env.stop().await;
    }
    for f in &finals[1..] {
        assert_eq!(
            (&f.1, &f.2, &f.3),
            (&finals[0].1, &finals[0].2, &finals[0].3),
            "{finals:#?}"
        );
    }
    assert_eq!(finals[0].1[0], json!("Won"));
}

#[tokio::test]
async fn lose_makes_it_lost_with_its_status_reason_and_a_late_win_does_not_undo_a_reopen() {
    let env = env_with_close_mapping().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Lost cause",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1_000, 0),
        10,
    );
    env.deliver(&n).await;
    let (lose, _) = org.close(opp, false, 5, Decimal::ZERO);
    env.deliver(&lose).await;
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!(
        (
            &o["stage"],
            &o["isClosed"],
            &o["isWon"],
            &o["forecastCategoryName"]
        ),
        (&json!("Lost"), &json!(true), &json!(false), &json!("Out-Sold"))
    );

    // Re-opened after a Win: Open again, and the Win delivered again late changes nothing.
    let (win, _) = org.close(opp, true, 3, Decimal::new(1_200, 0));
    env.deliver(&win).await;
    env.settle().await;
    assert_eq!(opportunity(&env, opp)["stage"], json!("Won"));
    env.deliver(&org.reopen(opp)).await;
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!(
        (
            &o["stage"],
            &o["isClosed"],
            &o["isWon"],
            &o["forecastCategoryName"]
        ),
        (
            &json!("Open"),
            &json!(false),
            &json!(false),
            &json!("In Progress")
        )
    );
    let late = env.post(&win).await;
    assert_eq!(late.status(), 200, "an exact re-delivery is a duplicate");
    env.settle().await;
    assert_eq!(opportunity(&env, opp)["stage"], json!("Open"));
    env.stop().await;
}

#[tokio::test]
async fn set_state_dynamic_entity_changes_the_state() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Old org",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(10, 0),
        10,
    );
    env.deliver(&n).await;
    env.deliver(&org.set_state(opp, true, 1, 3)).await;
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!((&o["stage"], &o["isWon"]), (&json!("Won"), &json!(true)));
    // SetState back to Open (a re-open through SetState).
    env.deliver(&org.set_state(opp, false, 0, 1)).await;
    env.settle().await;
    assert_eq!(opportunity(&env, opp)["stage"], json!("Open"));
    env.stop().await;
}

#[tokio::test]
async fn distinct_changes_sharing_an_operation_and_modifiedon_are_both_applied_and_a_redelivery_is_stored_once()
 {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Twice",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(100, 0),
        10,
    );
    env.deliver(&n).await;
    env.settle().await;
    // One synchronous operation runs the Update step twice: status first, then the other
    // columns. Same OperationId (= RequestId), same modifiedon, different Targets.
    let op = Uuid::new_v4();
    let at = org.now() + 5_000;
    let sync = |b: NotificationBuilder| {
        b.mode(0)
            .operation_id(Some(op))
            .request_id(Some(op))
            .correlation_id(op)
            .without_async_primary_name_image()
    };
    let status = sync(
        NotificationBuilder::opportunity_update(opp, at)
            .attr("statecode", AttributeValue::OptionSet(1))
            .attr("statuscode", AttributeValue::OptionSet(3)),
    );
    let columns = sync(
        NotificationBuilder::opportunity_update(opp, at)
            .attr("name", AttributeValue::String("Twice, renamed".into()))
            .attr("estimatedvalue", AttributeValue::Money(Decimal::new(250, 0))),
    );
    let first = env.post(&status).await;
    assert_eq!(first.status(), 202);
    let second = env.post(&columns).await;
    assert_eq!(
        second.status(),
        202,
        "a distinct change is stored, not taken for a duplicate"
    );
    let again = env.post(&columns).await;
    assert_eq!(again.status(), 200, "an exact re-delivery is recognised");
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "duplicate");
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!(
        (&o["stage"], &o["name"], o["amount"].as_f64()),
        (&json!("Won"), &json!("Twice, renamed"), Some(250.0))
    );
    let stored = env
        .app
        .state
        .store
        .list_notifications(Some(Status::Done), None, 100)
        .await
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .filter(|n| n.correlation_id.as_deref() == Some(&op.to_string()))
            .count(),
        2
    );
    env.stop().await;
}

#[tokio::test]
async fn the_organisation_is_learnt_from_who_am_i_and_another_ones_notifications_are_refused() {
    let ours = Uuid::new_v4();
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        prepare: Some(Box::new(move |sims| sims.dataverse.set_organization_id(ours))),
        ..EnvOptions::default()
    })
    .await;
    assert_eq!(env.app.state.organization.id(), Some(ours), "learnt at start");
    assert_eq!(env.sims.dataverse.call_count("WhoAmI"), 1);
    let calls = env.sims.dataverse.calls().len();

    // A sandbox copy: same endpoint and key, another OrganizationId.
    let sandbox = NotificationBuilder::opportunity_create(Uuid::new_v4(), START)
        .organization_id(DEFAULT_ORGANIZATION_ID);
    let r = env.post(&sandbox).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(&ours.to_string()) && detail.contains(&DEFAULT_ORGANIZATION_ID.to_string()),
        "{detail}"
    );
    assert_eq!(problem["type"], "urn:oppsync:problem:foreign-organization");

    // A mismatching x-ms-dynamics-organization header, with the right id.
    let other_host = NotificationBuilder::opportunity_create(Uuid::new_v4(), START)
        .organization_id(ours)
        .organization("unqsandbox", "contoso-sandbox.crm.dynamics.com");
    let r = env.post(&other_host).await;
    assert_eq!(r.status(), 403);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("contoso-sandbox.crm.dynamics.com"),
        "{problem}"
    );

    // Nothing was stored, and no Web API call was made for either.
    let stored = env
        .app
        .state
        .store
        .list_notifications(None, None, 10)
        .await
        .unwrap();
    assert!(stored.is_empty(), "{stored:?}");
    assert_eq!(env.sims.dataverse.calls().len(), calls);

    // Our own are accepted.
    let ok = NotificationBuilder::opportunity_create(Uuid::new_v4(), START).organization_id(ours);
    assert_eq!(env.post(&ok).await.status(), 202);

    let metrics = env.metrics_text().await;
    let counted = |check: &str| {
        metrics.lines().any(|l| {
            l.starts_with("oppsync_intake_foreign_organization_total")
                && l.contains(&format!("check=\"{check}\""))
        })
    };
    assert!(counted("organization_id") && counted("host"), "{metrics}");
    env.stop().await;
}

#[tokio::test]
async fn a_configured_organisation_needs_no_who_am_i() {
    let ours = Uuid::new_v4();
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        tweak: Some(Box::new(move |c| c.dataverse.organization_id = Some(ours))),
        ..EnvOptions::default()
    })
    .await;
    assert_eq!(env.sims.dataverse.call_count("WhoAmI"), 0);
    let theirs = NotificationBuilder::contact_create(Uuid::new_v4(), START);
    assert!(theirs.to_json().contains(&SIM_ORGANIZATION_ID.to_string()));
    assert_eq!(env.post(&theirs).await.status(), 403);
    assert_eq!(env.post(&theirs.organization_id(ours)).await.status(), 202);
    env.stop().await;
}

#[tokio::test]
async fn a_company_from_a_reference_without_a_name_gets_the_account_name_and_a_rename_follows() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    org.put_account(account, "Northwind Traders");
    // Real bodies carry customerid without a name.
    let (opp, n) = org.create_opportunity("Named", Customer::Account(account), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    env.settle().await;
    let companies = env.sims.marketo.companies();
    assert_eq!(
        companies[&account.to_string()]["company"],
        json!("Northwind Traders")
    );
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(account.to_string())
    );
    let reads = env.sims.dataverse.call_count("accounts(");
    assert_eq!(reads, 1);

    // A second opportunity of the same account: the name is cached.
    let (_, n) = org.create_opportunity("Named too", Customer::Account(account), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(
        env.sims.dataverse.call_count("accounts("),
        reads,
        "read once, then cached"
    );

    // Renamed in Dynamics: the account Update step brings the new name.
    env.deliver(&org.rename_account(account, "Northwind Traders Ltd"))
        .await;
    env.settle().await;
    assert_eq!(
        env.sims.marketo.companies()[&account.to_string()]["company"],
        json!("Northwind Traders Ltd")
    );
    // An account no opportunity uses is not written to Marketo.
    let unused = Uuid::new_v4();
    env.deliver(&org.rename_account(unused, "Nobody's")).await;
    env.settle().await;
    assert!(!env.sims.marketo.companies().contains_key(&unused.to_string()));
    env.stop().await;
}

#[tokio::test]
async fn a_deleted_contact_loses_its_roles() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (ann, n) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    env.deliver(&n).await;
    let (bob, n) = org.create_contact("Bob", "Ray", "bob@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("People", Customer::Contact(ann), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    for n in org.add_stakeholder(opp, bob, ROLE_STAKEHOLDER) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert_eq!(env.sims.marketo.roles().len(), 2);
    env.deliver(&org.delete_contact(bob)).await;
    env.settle().await;
    let roles: BTreeSet<String> = env.sims.marketo.roles().into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(roles, BTreeSet::from(["Potential Customer".to_owned()]));
    env.deliver(&org.delete_contact(ann)).await;
    env.settle().await;
    assert!(env.sims.marketo.roles().is_empty());
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));
    env.stop().await;
}

#[tokio::test]
async fn a_contact_missing_from_dataverse_is_dead_lettered_as_not_found() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (ghost, _never_delivered) = org.create_contact("Gus", "Ghost", "gus@example.com", None);
    env.sims.dataverse.remove_contact(ghost);
    let (_opp, n) = org.create_opportunity("Haunted", Customer::Contact(ghost), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    env.settle_within(std::time::Duration::from_secs(30), true).await;
    let dead = env
        .app
        .state
        .store
        .list_writes(Some(Status::Dead), None, 10)
        .await
        .unwrap();
    let reasons: Vec<&str> = dead.iter().filter_map(|w| w.last_error.as_deref()).collect();
    assert!(
        reasons.contains(&format!("contact {ghost} not found in Dataverse").as_str()),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| !r.contains("email")), "{reasons:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_body_with_a_byte_order_mark_is_accepted() {
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        ..EnvOptions::default()
    })
    .await;
    let n = NotificationBuilder::opportunity_create(Uuid::new_v4(), START)
        .attr("name", AttributeValue::String("BOM".into()));
    let mut body = "\u{feff}".as_bytes().to_vec();
    body.extend(n.to_json().into_bytes());
    let mut req = env.http.post(env.webhook_url()).body(body);
    for (k, v) in n.headers() {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    env.stop().await;
}
