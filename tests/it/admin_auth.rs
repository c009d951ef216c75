//! Admin JWT authentication: every refusal with its status and problem type, scopes, the
//! unconfigured case, and RS256/ES256 public keys (with algorithm confusion refused).

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use crate::support::app::{EnvOptions, TestEnv};
use crate::support::jwt::{self, AUDIENCE, ISSUER, claims, hs256, now};

/// GET /admin/stats with an optional Authorization header value; (status, problem type or
/// "ok", WWW-Authenticate).
async fn call(env: &TestEnv, method: &str, path: &str, auth: Option<String>) -> (u16, String, String) {
    let url = format!("{}{path}", env.app.url());
    let mut req = match method {
        "POST" => env.http.post(url),
        _ => env.http.get(url),
    };
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let kind = if status < 300 {
        "ok".to_owned()
    } else {
        assert_eq!(ct, "application/problem+json", "{body}");
        body["type"].as_str().unwrap_or("?").to_owned()
    };
    (status, kind, challenge)
}

async fn stats_with(env: &TestEnv, token: &str) -> (u16, String, String) {
    call(env, "GET", "/admin/stats", Some(format!("Bearer {token}"))).await
}

fn problem(slug: &str) -> String {
    format!("urn:oppsync:problem:{slug}")
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn admin_jwt_refusals_each_have_status_and_problem_type() {
    let env = jwt::env_with_secret(true).await;

    let (s, t, c) = call(&env, "GET", "/admin/stats", None).await;
    assert_eq!((s, t.as_str()), (401, problem("token-missing").as_str()));
    assert!(c.starts_with("Bearer"), "{c}");

    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-jwt", "Bearer a.b.c"] {
        let (s, t, c) = call(&env, "GET", "/admin/stats", Some(header.into())).await;
        assert_eq!((s, t), (401, problem("token-malformed")), "{header}");
        assert!(c.contains("error=\"invalid_token\""), "{c}");
    }

    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("oppsync.write"))
    );
    assert_eq!(
        stats_with(&env, &none).await.1,
        problem("token-algorithm-refused")
    );
    // HS512 is not the configured algorithm either.
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS512),
        &claims("oppsync.read"),
        &jsonwebtoken::EncodingKey::from_secret(jwt::SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        stats_with(&env, &hs512).await.1,
        problem("token-algorithm-refused")
    );

    let mut c = claims("oppsync.read");
    c["exp"] = json!(now() - 120);
    let (s, t, challenge) = stats_with(&env, &hs256(&c)).await;
    assert_eq!((s, t), (401, problem("token-expired")));
    assert!(
        challenge.contains("error_description=\"token-expired\""),
        "{challenge}"
    );

    // Within the 30 s leeway an expired token still passes (clock skew).
    let mut c = claims("oppsync.read");
    c["exp"] = json!(now() - 5);
    assert_eq!(stats_with(&env, &hs256(&c)).await.0, 200);

    let mut c = claims("oppsync.read");
    c["nbf"] = json!(now() + 300);
    assert_eq!(
        stats_with(&env, &hs256(&c)).await,
        (
            401,
            problem("token-not-yet-valid"),
            "Bearer realm=\"oppsync\", error=\"invalid_token\", error_description=\"token-not-yet-valid\""
                .into()
        )
    );

    let mut c = claims("oppsync.read");
    c["iss"] = json!("https://evil.example/");
    assert_eq!(
        stats_with(&env, &hs256(&c)).await.1,
        problem("token-wrong-issuer")
    );

    let mut c = claims("oppsync.read");
    c["aud"] = json!("someone-else");
    assert_eq!(
        stats_with(&env, &hs256(&c)).await.1,
        problem("token-wrong-audience")
    );

    for claim in ["exp", "iss", "aud"] {
        let mut c = claims("oppsync.read");
        c.as_object_mut().unwrap().remove(claim);
        let (s, t, _) = stats_with(&env, &hs256(&c)).await;
        assert_eq!((s, t), (401, problem("token-claim-missing")), "without {claim}");
    }

    let forged = jwt::hs256_with(b"another-secret-of-enough-length-000", &claims("oppsync.write"));
    assert_eq!(stats_with(&env, &forged).await.1, problem("token-bad-signature"));

    // Tampered payload, original signature.
    let good = jwt::write_token();
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims("oppsync.write");
    c["sub"] = json!("mallory");
    let tampered = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
    assert_eq!(
        stats_with(&env, &tampered).await.1,
        problem("token-bad-signature")
    );

    assert_eq!(stats_with(&env, &good).await.0, 200);
    env.stop().await;
}

#[tokio::test]
async fn admin_scopes_read_for_gets_write_for_changes() {
    let env = jwt::env_with_secret(true).await;
    let read = Some(format!("Bearer {}", jwt::read_token()));
    let write = Some(format!("Bearer {}", jwt::write_token()));

    assert_eq!(call(&env, "GET", "/admin/stats", read.clone()).await.0, 200);
    assert_eq!(
        call(&env, "GET", "/admin/notifications", read.clone()).await.0,
        200
    );
    let (s, t, c) = call(&env, "POST", "/admin/pause", read.clone()).await;
    assert_eq!((s, t), (403, problem("insufficient-scope")));
    assert!(
        c.contains("error=\"insufficient_scope\"") && c.contains("oppsync.write"),
        "{c}"
    );

    // Write implies read.
    assert_eq!(call(&env, "GET", "/admin/stats", write.clone()).await.0, 200);
    assert_eq!(call(&env, "POST", "/admin/pause", write.clone()).await.0, 200);
    assert_eq!(call(&env, "POST", "/admin/resume", write).await.0, 200);

    // No scope at all; other scopes only.
    let none = hs256(&claims("openid profile"));
    assert_eq!(stats_with(&env, &none).await.1, problem("insufficient-scope"));

    // Entra ID style `scp`, as an array and as a string.
    let mut c = claims("");
    c.as_object_mut().unwrap().remove("scope");
    c["scp"] = json!(["oppsync.read"]);
    assert_eq!(stats_with(&env, &hs256(&c)).await.0, 200);
    c["scp"] = json!("profile oppsync.write");
    let t = hs256(&c);
    assert_eq!(
        call(&env, "POST", "/admin/pause", Some(format!("Bearer {t}")))
            .await
            .0,
        200
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_without_a_configured_key_answers_503_never_open() {
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        ..EnvOptions::default()
    })
    .await;
    let token = Some(format!("Bearer {}", jwt::write_token()));
    for (method, path) in [
        ("GET", "/admin/stats"),
        ("GET", "/admin/notifications"),
        ("POST", "/admin/pause"),
        ("POST", "/admin/writes/retry-dead"),
    ] {
        for auth in [None, token.clone()] {
            let (s, t, _) = call(&env, method, path, auth).await;
            assert_eq!((s, t), (503, problem("admin-not-configured")), "{method} {path}");
        }
    }
    env.stop().await;
}

async fn env_with_public_key(file: &'static str) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        intake_only: true,
        tweak: Some(Box::new(move |c| {
            c.admin.jwt_public_key_file = Some(jwt::fixture(file));
            c.admin.issuer = Some(ISSUER.into());
            c.admin.audience = Some(AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await
}

#[tokio::test]
async fn admin_rs256_accepted_and_algorithm_confusion_refused() {
    let env = env_with_public_key("rsa-public.pem").await;
    let good = jwt::sign_pem(Algorithm::RS256, "rsa-private.pem", &claims("oppsync.read"));
    assert_eq!(stats_with(&env, &good).await.0, 200);

    // The classic confusion: HS256 "signed" with the public key's PEM bytes as the secret.
    let public = std::fs::read(jwt::fixture("rsa-public.pem")).unwrap();
    let confused = jwt::hs256_with(&public, &claims("oppsync.write"));
    assert_eq!(stats_with(&env, &confused).await, (401, problem("token-algorithm-refused"), "Bearer realm=\"oppsync\", error=\"invalid_token\", error_description=\"token-algorithm-refused\"".into()));

    // Another key family is refused too; so is a token signed by another RSA key.
    let es = jwt::sign_pem(Algorithm::ES256, "ec-private.pem", &claims("oppsync.read"));
    assert_eq!(stats_with(&env, &es).await.1, problem("token-algorithm-refused"));
    let mut c = claims("oppsync.read");
    c["exp"] = json!(now() - 300);
    let expired = jwt::sign_pem(Algorithm::RS256, "rsa-private.pem", &c);
    assert_eq!(stats_with(&env, &expired).await.1, problem("token-expired"));
    env.stop().await;
}

#[tokio::test]
async fn admin_es256_accepted_and_hs256_refused() {
    let env = env_with_public_key("ec-public.pem").await;
    let good = jwt::sign_pem(Algorithm::ES256, "ec-private.pem", &claims("oppsync.write"));
    assert_eq!(
        call(&env, "POST", "/admin/pause", Some(format!("Bearer {good}")))
            .await
            .0,
        200
    );
    let public = std::fs::read(jwt::fixture("ec-public.pem")).unwrap();
    let confused = jwt::hs256_with(&public, &claims("oppsync.write"));
    assert_eq!(
        stats_with(&env, &confused).await.1,
        problem("token-algorithm-refused")
    );
    let rs = jwt::sign_pem(Algorithm::RS256, "rsa-private.pem", &claims("oppsync.read"));
    assert_eq!(stats_with(&env, &rs).await.1, problem("token-algorithm-refused"));
    env.stop().await;
}

/// A token that lives too long, lists critical extensions or is not a JWT is refused, however
/// well signed; `oppsync token` will not mint a long-lived one either.
#[tokio::test]
async fn admin_tokens_with_a_long_life_a_crit_header_or_another_typ_are_refused() {
    let env = jwt::env_with_secret(true).await;
    // A hundred years.
    let mut c = claims("oppsync.read");
    c["iat"] = json!(now());
    c["exp"] = json!(now() + 100 * 365 * 86_400);
    let (s, t, _) = stats_with(&env, &hs256(&c)).await;
    assert_eq!((s, t), (401, problem("token-lifetime-too-long")));
    // Without iat the lifetime counts from now.
    let mut c = claims("oppsync.read");
    c["exp"] = json!(now() + 2 * 86_400);
    assert_eq!(
        stats_with(&env, &hs256(&c)).await.1,
        problem("token-lifetime-too-long")
    );
    // A day is the default bound, and within it tokens pass.
    let mut c = claims("oppsync.read");
    c["iat"] = json!(now());
    c["exp"] = json!(now() + 86_000);
    assert_eq!(stats_with(&env, &hs256(&c)).await.0, 200);

    let signed_with = |header: jsonwebtoken::Header| {
        jsonwebtoken::encode(
            &header,
            &claims("oppsync.read"),
            &jsonwebtoken::EncodingKey::from_secret(jwt::SECRET.as_bytes()),
        )
        .unwrap()
    };
    // An unknown critical extension: jsonwebtoken's Header has no `crit`, so it is made by hand.
    let header = json!({"alg": "HS256", "typ": "JWT", "crit": ["exp-ext"], "exp-ext": 1});
    let unsigned = format!("{}.{}", b64(&header), b64(&claims("oppsync.read")));
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(hmac_sha256(jwt::SECRET.as_bytes(), unsigned.as_bytes()));
    let crit = format!("{unsigned}.{signature}");
    // The hand-made signature is right: the same header without `crit` passes.
    let plain = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "JWT"})),
        b64(&claims("oppsync.read"))
    );
    let plain_signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(hmac_sha256(jwt::SECRET.as_bytes(), plain.as_bytes()));
    assert_eq!(
        stats_with(&env, &format!("{plain}.{plain_signature}")).await.0,
        200
    );
    assert_eq!(stats_with(&env, &crit).await.1, problem("token-header-refused"));
    let mut other = jsonwebtoken::Header::new(Algorithm::HS256);
    other.typ = Some("JWE".into());
    assert_eq!(
        stats_with(&env, &signed_with(other)).await.1,
        problem("token-header-refused")
    );
    let mut access = jsonwebtoken::Header::new(Algorithm::HS256);
    access.typ = Some("at+jwt".into());
    assert_eq!(stats_with(&env, &signed_with(access)).await.0, 200);
    env.stop().await;
}

/// HMAC-SHA256 (RFC 2104), for a token whose header jsonwebtoken cannot write.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}
