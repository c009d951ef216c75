//! Admin tokens for the tests: the HS256 secret the harness configures, and signing helpers.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::app::{EnvOptions, TestEnv};
use oppsync::config::Secret;

pub const SECRET: &str = "admin-test-secret-0123456789abcdef";
pub const ISSUER: &str = "https://login.example.test/";
pub const AUDIENCE: &str = "oppsync-admin";

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Valid claims with `scope`; tests change what they test.
pub fn claims(scope: &str) -> Value {
    json!({"sub": "test", "scope": scope, "exp": now() + 300, "iss": ISSUER, "aud": AUDIENCE})
}

pub fn hs256(claims: &Value) -> String {
    hs256_with(SECRET.as_bytes(), claims)
}

pub fn hs256_with(key: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

pub fn write_token() -> String {
    hs256(&claims("oppsync.write"))
}

pub fn read_token() -> String {
    hs256(&claims("oppsync.read"))
}

/// The app with the HS256 secret, issuer and audience configured.
pub async fn env_with_secret(intake_only: bool) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        intake_only,
        tweak: Some(Box::new(|c| {
            c.admin.jwt_secret = Some(Secret::new(SECRET));
            c.admin.issuer = Some(ISSUER.into());
            c.admin.audience = Some(AUDIENCE.into());
        })),
        ..EnvOptions::default()
    })
    .await
}

pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

/// Signs with a committed test private key (RS256 or ES256).
pub fn sign_pem(alg: Algorithm, private_pem: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}
