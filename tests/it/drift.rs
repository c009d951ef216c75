//! The drift report and its repair over real HTTP: a Marketo opportunity changed and a role
//! removed behind oppsync's back are listed by `GET /admin/drift` (and `oppsync drift`), and put
//! back by `POST /admin/drift/repair`.

use oppsync::marketo::{MarketoClient, RoleRecord};
use oppsync::sim::dataverse::ROLE_STAKEHOLDER;
use oppsync::sim::org::{Customer, DynamicsOrg};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::TestEnv;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketo_opportunity_changed_behind_oppsyncs_back_is_listed_and_repaired() {
    let env = jwt::env_with_secret(false).await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let account = Uuid::new_v4();
    let (ann, n) = org.create_contact("Ann", "Lee", "ann@example.com", Some((account, "Acme")));
    env.deliver(&n).await;
    let (bob, n) = org.create_contact("Bob", "Ray", "bob@example.com", None);
    env.deliver(&n).await;
    let mut opportunities = Vec::new();
    for i in 0..3 {
        let (o, n) = org.create_opportunity(
            &format!("Deal {i}"),
            Customer::Contact(ann),
            Decimal::new(1000, 0),
            10,
        );
        env.deliver(&n).await;
        for n in org.add_stakeholder(o, bob, ROLE_STAKEHOLDER) {
            env.deliver(&n).await;
        }
        opportunities.push(o);
    }
    env.settle().await;

    let (s, report) = admin(&env, "GET", "/admin/drift").await;
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["differences"], json!([]), "{report}");
    assert_eq!(report["opportunities_checked"], json!(3));
    assert_eq!(report["incomplete"], json!(false));
    let (s, body) = admin(&env, "GET", "/admin/drift?budget=2").await;
    assert_eq!(s, 400, "{body}");

    // Behind oppsync's back: a field changed, a role removed.
    let marketo = MarketoClient::new(&env.config.marketo).unwrap();
    let target = opportunities[1];
    let mut changed = serde_json::Map::new();
    changed.insert("externalOpportunityId".into(), json!(target.to_string()));
    changed.insert("name".into(), json!("Changed in Marketo"));
    marketo.sync_opportunities(vec![changed]).await.unwrap();
    let bob_lead = env
        .sims
        .marketo
        .leads()
        .into_iter()
        .find(|(_, l)| l.get("email") == Some(&json!("bob@example.com")))
        .map(|(id, _)| id)
        .unwrap();
    marketo
        .delete_roles(&[RoleRecord {
            external_opportunity_id: opportunities[2].to_string(),
            lead_id: bob_lead,
            role: "Stakeholder".into(),
            is_primary: false,
        }])
        .await
        .unwrap();

    let (s, report) = admin(&env, "GET", "/admin/drift").await;
    assert_eq!(s, 200, "{report}");
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 2, "{report:#}");
    assert!(
        differences
            .iter()
            .any(|d| d["opportunity_id"] == json!(target.to_string())
                && d["kind"] == json!("field_differs")
                && d["field"] == json!("name")
                && d["expected"] == json!("Deal 1")
                && d["actual"] == json!("Changed in Marketo"))
    );
    assert!(
        differences
            .iter()
            .any(|d| d["opportunity_id"] == json!(opportunities[2].to_string())
                && d["kind"] == json!("missing")
                && d["record"] == json!("role")
                && d["lead_id"] == json!(bob_lead))
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oppsync"))
        .args(["drift", "--url", &env.app.url()])
        .env("OPPSYNC_ADMIN_TOKEN", jwt::read_token())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("{target} field_differs opportunity field name")),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 difference(s) in 3 opportunities checked"),
        "{stdout}"
    );

    let (s, repaired) = admin(&env, "POST", "/admin/drift/repair").await;
    assert_eq!(s, 200, "{repaired}");
    assert_eq!(repaired["opportunities_repaired"], json!(2));
    env.settle().await;
    assert_eq!(
        env.sims.marketo.opportunities()[&target.to_string()]["name"],
        json!("Deal 1")
    );
    let (_, report) = admin(&env, "GET", "/admin/drift").await;
    assert_eq!(report["differences"], json!([]), "{report:#}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oppsync"))
        .args(["drift", "--url", &env.app.url()])
        .env("OPPSYNC_ADMIN_TOKEN", jwt::read_token())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    env.stop().await;
}
