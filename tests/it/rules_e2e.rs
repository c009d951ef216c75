//! Each association rule end to end: notifications over real HTTP into the real service, which
//! pushes to the Marketo simulator; assertions are on what Marketo ends up holding.

use std::collections::BTreeSet;

use oppsync::dynamics::{AttributeValue, Attributes};
use oppsync::sim::dataverse::{ROLE_BUSINESS_PARTNER, ROLE_DECISION_MAKER, ROLE_STAKEHOLDER};
use oppsync::sim::org::{Customer, DynamicsOrg};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::TestEnv;

const START: i64 = 1_750_000_000_000;

fn org(env: &TestEnv) -> DynamicsOrg {
    DynamicsOrg::new(START, Some(env.sims.dataverse.clone()))
}

/// Marketo's roles as (opportunity, lead email, role) — readable assertions.
fn roles(env: &TestEnv) -> BTreeSet<(String, String, String)> {
    oppsync::sim::scenario::view(&env.sims.marketo).roles
}

fn opportunity(env: &TestEnv, id: Uuid) -> serde_json::Map<String, Value> {
    env.sims
        .marketo
        .opportunities()
        .remove(&id.to_string())
        .unwrap_or_else(|| panic!("Marketo has no opportunity {id}"))
}

fn role(opp: Uuid, email: &str, role: &str) -> (String, String, String) {
    (opp.to_string(), email.to_owned(), role.to_owned())
}

#[tokio::test]
async fn customer_contact_without_account_creates_role_and_no_company() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (ann, n) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Solo deal", Customer::Contact(ann), Decimal::new(5000, 0), 20);
    env.deliver(&n).await;
    env.settle().await;

    let o = opportunity(&env, opp);
    assert_eq!(o["name"], json!("Solo deal"));
    assert_eq!(o["externalCompanyId"], Value::Null, "no company");
    assert_eq!(o["amount"].as_f64(), Some(5000.0));
    assert_eq!(o["probability"], json!(20));
    assert_eq!(o["stage"], json!("Open"));
    assert_eq!(o["isClosed"], json!(false));
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "ann@example.com", "Potential Customer")])
    );
    assert!(env.sims.marketo.companies().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn customer_contact_with_parent_account_sets_company_to_that_account() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    let (bob, n) = org.create_contact("Bob", "Ray", "bob@contoso.com", Some((account, "Contoso")));
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity(
        "Contoso renewal",
        Customer::Contact(bob),
        Decimal::new(125_000, 0),
        60,
    );
    env.deliver(&n).await;
    env.settle().await;

    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(account.to_string())
    );
    let companies = env.sims.marketo.companies();
    assert_eq!(companies[&account.to_string()]["company"], json!("Contoso"));
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "bob@contoso.com", "Potential Customer")])
    );
    env.stop().await;
}

#[tokio::test]
async fn customer_contact_unknown_to_oppsync_is_read_from_dataverse() {
    // The contact's own notification never came: oppsync reads it through the Web API.
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    let (cid, _not_delivered) =
        org.create_contact("Cy", "Dee", "cy@fabrikam.com", Some((account, "Fabrikam")));
    let (opp, n) = org.create_opportunity("Fabrikam pilot", Customer::Contact(cid), Decimal::new(900, 0), 10);
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(account.to_string())
    );
    assert!(
        env.sims.dataverse.call_count("contacts") >= 1,
        "read through the Web API"
    );
    env.stop().await;
}

#[tokio::test]
async fn customer_account_sets_company_without_role() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    let (opp, n) = org.create_opportunity(
        "Big account deal",
        Customer::Account(account),
        Decimal::new(1, 0),
        50,
    );
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(account.to_string())
    );
    assert!(
        env.sims.marketo.roles().is_empty(),
        "an account customer makes no role"
    );
    env.stop().await;
}

#[tokio::test]
async fn customer_change_removes_old_contact_role_unless_also_a_stakeholder() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (a, n) = org.create_contact("Al", "A", "a@example.com", None);
    env.deliver(&n).await;
    let (b, n) = org.create_contact("Bea", "B", "b@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Switch", Customer::Contact(a), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "a@example.com", "Potential Customer")])
    );

    // A → B: A's role goes, B's comes.
    env.deliver(&org.change_customer(opp, Customer::Contact(b))).await;
    env.settle().await;
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "b@example.com", "Potential Customer")])
    );

    // B is also a stakeholder; B → account: B keeps the stakeholder role only.
    for n in org.add_stakeholder(opp, b, ROLE_STAKEHOLDER) {
        env.deliver(&n).await;
    }
    let account = Uuid::new_v4();
    env.deliver(&org.change_customer(opp, Customer::Account(account)))
        .await;
    env.settle().await;
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "b@example.com", "Stakeholder")])
    );
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(account.to_string())
    );
    env.stop().await;
}

#[tokio::test]
async fn stakeholders_from_either_direction_make_one_role_each() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    let (opp, n) = org.create_opportunity("Team deal", Customer::Account(account), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    let (c1, n) = org.create_contact("Dan", "D", "dan@example.com", Some((account, "Acme")));
    env.deliver(&n).await;
    let (c2, n) = org.create_contact("Eve", "E", "eve@example.com", Some((account, "Acme")));
    env.deliver(&n).await;
    // From the opportunity's subgrid (master, reciprocal, back-fill update) ...
    let from_opportunity = org.add_stakeholder(opp, c1, ROLE_STAKEHOLDER);
    assert_eq!(from_opportunity.len(), 3);
    for n in &from_opportunity {
        env.deliver(n).await;
    }
    // ... and from the contact's side, with another stakeholder-category role.
    for n in org.add_stakeholder_from_contact(opp, c2, ROLE_DECISION_MAKER) {
        env.deliver(&n).await;
    }
    // Repeated deliveries (Dynamics retries, re-run jobs) change nothing.
    for n in &from_opportunity {
        let r = env.post(n).await;
        assert_eq!(r.status(), 200, "a repeated notification is recognised");
    }
    env.settle().await;
    assert_eq!(
        roles(&env),
        BTreeSet::from([
            role(opp, "dan@example.com", "Stakeholder"),
            role(opp, "eve@example.com", "Decision Maker")
        ])
    );
    let role_syncs = env.sims.marketo.call_count("/rest/v1/opportunities/roles.json");
    assert!(
        role_syncs <= 2,
        "the reciprocal rows made no extra role writes ({role_syncs} calls)"
    );
    env.stop().await;
}

#[tokio::test]
async fn connections_with_other_role_categories_change_nothing() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Partners",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(10, 0),
        10,
    );
    env.deliver(&n).await;
    let (c, n) = org.create_contact("Fay", "F", "fay@example.com", None);
    env.deliver(&n).await;
    for n in org.add_stakeholder(opp, c, ROLE_BUSINESS_PARTNER) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert!(env.sims.marketo.roles().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn stakeholder_removed_or_deactivated_loses_its_role() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Shrinking",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(10, 0),
        10,
    );
    env.deliver(&n).await;
    let (g, n) = org.create_contact("Gus", "G", "gus@example.com", None);
    env.deliver(&n).await;
    let (h, n) = org.create_contact("Hal", "H", "hal@example.com", None);
    env.deliver(&n).await;
    for n in org
        .add_stakeholder(opp, g, ROLE_STAKEHOLDER)
        .into_iter()
        .chain(org.add_stakeholder(opp, h, ROLE_STAKEHOLDER))
    {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert_eq!(roles(&env).len(), 2);
    for n in org.remove_stakeholder(opp, g) {
        env.deliver(&n).await;
    }
    for n in org.deactivate_stakeholder(opp, h) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert!(roles(&env).is_empty(), "{:?}", roles(&env));
    env.stop().await;
}

#[tokio::test]
async fn customer_who_is_also_a_removed_stakeholder_keeps_the_customer_role() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (k, n) = org.create_contact("Kim", "K", "kim@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Both ways", Customer::Contact(k), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    for n in org.add_stakeholder(opp, k, ROLE_STAKEHOLDER) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert_eq!(roles(&env).len(), 2);
    for n in org.remove_stakeholder(opp, k) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert_eq!(
        roles(&env),
        BTreeSet::from([role(opp, "kim@example.com", "Potential Customer")])
    );
    env.stop().await;
}

#[tokio::test]
async fn opportunity_delete_removes_it_and_its_roles_and_late_updates_do_not_resurrect_it() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (c, n) = org.create_contact("Ivy", "I", "ivy@example.com", None);
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Doomed", Customer::Contact(c), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    let mut late = Attributes::new();
    late.insert("name".into(), AttributeValue::String("Renamed too late".into()));
    let stale_update = org.update_opportunity(opp, late);
    for n in org.add_stakeholder(opp, c, ROLE_STAKEHOLDER) {
        env.deliver(&n).await;
    }
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));
    for n in org.delete_opportunity(opp) {
        env.deliver(&n).await;
    }
    env.settle().await;
    // An update made before the delete, delivered after it (async steps can reorder).
    env.deliver(&stale_update).await;
    env.settle().await;
    assert!(
        !env.sims.marketo.opportunities().contains_key(&opp.to_string()),
        "deleted and stays deleted"
    );
    assert!(env.sims.marketo.roles().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn contact_moving_to_another_account_moves_the_company_of_its_opportunities() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let (c, n) = org.create_contact("Jo", "J", "jo@example.com", Some((first, "First Ltd")));
    env.deliver(&n).await;
    let (opp, n) = org.create_opportunity("Follows", Customer::Contact(c), Decimal::new(10, 0), 10);
    env.deliver(&n).await;
    env.settle().await;
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(first.to_string())
    );
    env.deliver(&org.set_contact_parent(c, Some((second, "Second Ltd"))))
        .await;
    env.settle().await;
    assert_eq!(
        opportunity(&env, opp)["externalCompanyId"],
        json!(second.to_string())
    );
    env.deliver(&org.set_contact_parent(c, None)).await;
    env.settle().await;
    assert_eq!(opportunity(&env, opp)["externalCompanyId"], Value::Null);
    env.stop().await;
}

#[tokio::test]
async fn only_mapped_fields_are_synced_and_an_unmapped_change_makes_no_call() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let (opp, n) = org.create_opportunity(
        "Mapped",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(10, 0),
        10,
    );
    env.deliver(&n).await;
    env.settle().await;
    let o = opportunity(&env, opp);
    assert!(
        !o.contains_key("statuscode") && !o.contains_key("stepname"),
        "{o:?}"
    );
    let before = env.sims.marketo.call_count("/rest/v1/opportunities.json");
    let mut unmapped = Attributes::new();
    unmapped.insert("stepname".into(), AttributeValue::String("3-Propose".into()));
    env.deliver(&org.update_opportunity(opp, unmapped)).await;
    env.settle().await;
    assert_eq!(
        env.sims.marketo.call_count("/rest/v1/opportunities.json"),
        before,
        "no write for an unmapped change"
    );
    env.deliver(&org.win(opp)).await;
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!(
        (o["stage"].clone(), o["isClosed"].clone(), o["isWon"].clone()),
        (json!("Won"), json!(true), json!(true))
    );
    env.stop().await;
}

#[tokio::test]
async fn a_notification_over_256_kb_is_completed_from_the_web_api() {
    let env = TestEnv::start().await;
    let mut org = org(&env);
    let account = Uuid::new_v4();
    let (opp, n) = org.create_opportunity(
        "Huge description",
        Customer::Account(account),
        Decimal::new(77, 0),
        30,
    );
    let r = env.post(&n.size_exceeded()).await;
    assert_eq!(r.status(), 202);
    env.settle().await;
    let o = opportunity(&env, opp);
    assert_eq!(o["name"], json!("Huge description"));
    assert_eq!(o["externalCompanyId"], json!(account.to_string()));
    assert!(env.sims.dataverse.call_count("opportunities") >= 1);
    env.stop().await;
}
