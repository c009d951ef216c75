//! Webhook intake over real HTTP: every answer Dynamics can get, and durability.

use oppsync::config::{Secret, WebhookAuth};
use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::store::Status;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use uuid::Uuid;

use crate::support::app::{EnvOptions, KEY, TestEnv};

fn intake_only() -> EnvOptions {
    EnvOptions {
        intake_only: true,
        ..EnvOptions::default()
    }
}

fn sample() -> NotificationBuilder {
    NotificationBuilder::opportunity_update(Uuid::new_v4(), 1_750_000_000_000)
        .attr("name", AttributeValue::String("Deal".into()))
}

/// Posts the sample notification as JSON to `url` (which carries, or lacks, the key).
async fn post_sample(env: &TestEnv, url: &str) -> reqwest::Response {
    env.http
        .post(url)
        .header("content-type", "application/json")
        .body(sample().to_json())
        .send()
        .await
        .unwrap()
}

async fn assert_problem(r: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], format!("urn:oppsync:problem:{kind}"), "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        body["detail"].as_str().is_some_and(|d| d.len() > 20),
        "a human sentence: {body}"
    );
    body
}

#[tokio::test]
async fn stored_notification_is_202_and_a_repeat_is_200_and_stored_once() {
    let env = TestEnv::start_with(intake_only()).await;
    let n = sample();
    let first = env.post(&n).await;
    assert_eq!(first.status(), 202);
    let ack: Value = first.json().await.unwrap();
    assert_eq!(ack["status"], "stored");
    let id = ack["id"].as_i64().unwrap();
    let again = env.post(&n).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "duplicate");
    let all = env
        .app
        .state
        .store
        .list_notifications(None, None, 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "stored once");
    let stored = env.app.state.store.notification(id).await.unwrap().unwrap();
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(
        stored.body.as_deref(),
        Some(n.to_json().as_str()),
        "the raw body is kept as sent"
    );
    env.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_status_and_a_problem_body() {
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        tweak: Some(Box::new(|c| c.server.body_limit_bytes = 16 * 1024)),
        ..EnvOptions::default()
    })
    .await;
    let url = env.webhook_url();
    let post =
        |body: Vec<u8>, ct: &'static str| env.http.post(&url).header("content-type", ct).body(body).send();

    assert_problem(
        post(b"{\"MessageName\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "malformed-json",
    )
    .await;
    assert_problem(
        post(b"{\"hello\": 1}".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "not-an-execution-context",
    )
    .await;
    assert_problem(
        post(sample().to_json().into_bytes(), "text/plain").await.unwrap(),
        415,
        "unsupported-media-type",
    )
    .await;
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(20 * 1024));
    assert_problem(
        post(big.into_bytes(), "application/json").await.unwrap(),
        413,
        "payload-too-large",
    )
    .await;

    let lead = NotificationBuilder::new(
        oppsync::dynamics::EntityKind::Opportunity,
        oppsync::dynamics::MessageKind::Update,
        Uuid::new_v4(),
        1,
    )
    .to_json()
    .replace(
        "\"PrimaryEntityName\":\"opportunity\"",
        "\"PrimaryEntityName\":\"lead\"",
    );
    let body = assert_problem(
        post(lead.into_bytes(), "application/json").await.unwrap(),
        422,
        "unhandled-message",
    )
    .await;
    assert!(
        body["handled"].as_array().is_some_and(|h| h.len() == 14),
        "says what is handled: {body}"
    );
    let pre_operation = sample().stage(20).to_json();
    assert_problem(
        post(pre_operation.into_bytes(), "application/json")
            .await
            .unwrap(),
        422,
        "unhandled-stage",
    )
    .await;

    let no_key = format!("{}/webhooks/dynamics", env.app.url());
    let r = post_sample(&env, &no_key).await;
    assert_problem(r, 401, "webhook-key-missing").await;
    let wrong = format!("{}/webhooks/dynamics?code=not-the-key", env.app.url());
    let r = post_sample(&env, &wrong).await;
    assert_problem(r, 401, "webhook-key-mismatch").await;

    // Nothing refused was stored.
    assert!(
        env.app
            .state
            .store
            .list_notifications(None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    env.stop().await;
}

#[tokio::test]
async fn a_store_that_cannot_commit_answers_503_so_dynamics_retries() {
    let env = TestEnv::start_with(intake_only()).await;
    let oppsync::store::Store::Sqlite(s) = &env.app.state.store else {
        panic!("sqlite expected")
    };
    sqlx::query("DROP TABLE inbox").execute(s.pool()).await.unwrap();
    assert_problem(env.post(&sample()).await, 503, "store-unavailable").await;
    assert_eq!(
        env.status_of("/readyz").await,
        503,
        "readiness reflects the broken store"
    );
    env.stop().await;
}

#[tokio::test]
async fn size_exceeded_notifications_are_accepted_and_marked_for_a_web_api_read() {
    let env = TestEnv::start_with(intake_only()).await;
    let r = env.post(&sample().size_exceeded()).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    assert!(
        env.app
            .state
            .store
            .notification(id)
            .await
            .unwrap()
            .unwrap()
            .data_missing
    );
    env.stop().await;
}

#[tokio::test]
async fn header_and_query_string_auth_accept_every_configured_key_for_rotation() {
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        tweak: Some(Box::new(|c| {
            c.webhook.auth = WebhookAuth::HttpHeader;
            c.webhook.header_name = Some("x-oppsync-key".into());
            c.webhook.keys = vec![Secret::new("old-key-12345"), Secret::new("new-key-67890")];
        })),
        ..EnvOptions::default()
    })
    .await;
    let url = format!("{}/webhooks/dynamics", env.app.url());
    for (key, status) in [
        ("old-key-12345", 202),
        ("new-key-67890", 202),
        ("new-key-6789", 401),
        (KEY, 401),
    ] {
        let r = env
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-oppsync-key", key)
            .body(sample().to_json())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "key {key}");
    }
    env.stop().await;

    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        tweak: Some(Box::new(|c| {
            c.webhook.auth = WebhookAuth::QueryString;
            c.webhook.param_name = Some("token".into());
        })),
        ..EnvOptions::default()
    })
    .await;
    let ok = format!("{}/webhooks/dynamics?token={KEY}", env.app.url());
    let r = post_sample(&env, &ok).await;
    assert_eq!(r.status(), 202);
    let code_is_not_enough = format!("{}/webhooks/dynamics?code={KEY}", env.app.url());
    let r = post_sample(&env, &code_is_not_enough).await;
    assert_eq!(r.status(), 401);
    env.stop().await;
}

#[tokio::test]
async fn random_and_truncated_bodies_are_always_400_and_the_service_stays_healthy() {
    let env = TestEnv::start_with(intake_only()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261125);
    let fixtures: Vec<String> = std::fs::read_dir("tests/fixtures/dynamics")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(fixtures.len() >= 10);
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for _ in 0..150 {
        let len = rng.random_range(0..512);
        bodies.push((0..len).map(|_| rng.random::<u8>()).collect());
    }
    for f in &fixtures {
        for _ in 0..10 {
            let cut = rng.random_range(0..f.len() - 1);
            bodies.push(f.as_bytes()[..cut].to_vec());
        }
    }
    bodies.push(b"[".repeat(100_000));
    bodies.push(b"1e999999".to_vec());
    bodies.push(vec![0xff, 0xfe, 0x00]);
    bodies.push(br#"{"MessageName":"Update","MessageName":"Create"}"#.to_vec());
    for body in bodies {
        let r = env
            .http
            .post(env.webhook_url())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            400,
            "body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
    }
    assert_eq!(env.status_of("/healthz").await, 200);
    assert!(
        env.app
            .state
            .store
            .list_notifications(None, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing stored"
    );
    env.stop().await;
}

#[tokio::test]
async fn probes_answer() {
    let env = TestEnv::start_with(intake_only()).await;
    assert_eq!(env.status_of("/healthz").await, 200);
    let (status, body) = env.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["store"], "ok");
    assert_eq!(env.status_of("/nowhere").await, 404);
    env.stop().await;
}

#[tokio::test]
async fn marketo_side_creation_is_refused_whatever_the_method() {
    let env = TestEnv::start_with(intake_only()).await;
    let url = format!("{}/marketo/opportunities", env.app.url());
    for method in [
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let r = env.http.request(method, &url).body("{}").send().await.unwrap();
        let body = assert_problem(r, 403, "marketo-side-creation-refused").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("created in Dynamics 365") && detail.contains("one way to Marketo"),
            "{detail}"
        );
    }
    env.stop().await;
}
