//! JWT bearer authentication of the admin API. One algorithm family is accepted, the one the
//! configured key belongs to: HS256 with `admin.jwt_secret`, or RS256/ES256 with the PEM public
//! key `admin.jwt_public_key_file`. That refuses `alg: none` and algorithm confusion (an HS256
//! token "signed" with the RSA public key's bytes) by construction. `exp` is required, `nbf`
//! honoured, both with [`LEEWAY_SECS`] of clock skew; `iss`/`aud` are checked when configured.
//! Tokens are never logged.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::config::AdminConfig;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

pub const SCOPE_READ: &str = "oppsync.read";
pub const SCOPE_WRITE: &str = "oppsync.write";

/// Why a bearer token was refused (401). Each has its own problem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No `Authorization` header.
    Missing,
    /// The header is not `Bearer <token>`, or the token is not a JWT.
    Malformed,
    /// `alg: none`, or an algorithm outside the configured family.
    AlgorithmRefused(String),
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// A required claim (`exp`, or `iss`/`aud` when configured) is missing or malformed.
    MissingClaim(String),
    /// `exp - iat` (or `exp - now` without `iat`) is beyond `admin.max_token_ttl_secs`.
    LifetimeTooLong {
        max_secs: u64,
    },
    /// A `crit` header (extensions the verifier must understand: it understands none), or a
    /// `typ` that is not a JWT.
    HeaderRefused(String),
}

impl TokenRefusal {
    /// Problem type slug and human detail.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            TokenRefusal::Missing => (
                "token-missing",
                "The request has no Authorization header; send `Authorization: Bearer <JWT>`.".into(),
            ),
            TokenRefusal::Malformed => (
                "token-malformed",
                "The Authorization header is not `Bearer <JWT>` or the token is not a well-formed JWT."
                    .into(),
            ),
            TokenRefusal::AlgorithmRefused(alg) => (
                "token-algorithm-refused",
                format!(
                    "The token's algorithm ({alg}) is not accepted: only the algorithm of the configured key is (HS256 with admin.jwt_secret, RS256/ES256 with admin.jwt_public_key_file); `none` never is."
                ),
            ),
            TokenRefusal::BadSignature => (
                "token-bad-signature",
                "The token's signature does not verify with the configured key.".into(),
            ),
            TokenRefusal::Expired => (
                "token-expired",
                format!("The token has expired (exp, with {LEEWAY_SECS} s of leeway)."),
            ),
            TokenRefusal::NotYetValid => (
                "token-not-yet-valid",
                format!("The token is not valid yet (nbf, with {LEEWAY_SECS} s of leeway)."),
            ),
            TokenRefusal::WrongIssuer => (
                "token-wrong-issuer",
                "The token's issuer (iss) is not the configured admin.issuer.".into(),
            ),
            TokenRefusal::WrongAudience => (
                "token-wrong-audience",
                "The token's audience (aud) does not match the configured admin.audience.".into(),
            ),
            TokenRefusal::MissingClaim(claim) => (
                "token-claim-missing",
                format!("The token lacks a valid `{claim}` claim, which is required."),
            ),
            TokenRefusal::LifetimeTooLong { max_secs } => (
                "token-lifetime-too-long",
                format!(
                    "The token is valid for longer than admin.max_token_ttl_secs ({max_secs} s) allows (exp - iat); ask for a shorter-lived one."
                ),
            ),
            TokenRefusal::HeaderRefused(why) => (
                "token-header-refused",
                format!("The token's header is refused: {why}."),
            ),
        }
    }
}

/// Why an admin call is refused before its handler runs (`problem.rs` answers each as
/// problem+json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRefusal {
    /// No JWT key is configured: the admin API is off (503).
    NotConfigured,
    /// The bearer token is missing or refused (401).
    Token(TokenRefusal),
    /// The token lacks this scope (403).
    InsufficientScope(&'static str),
}

/// Verifies admin bearer tokens with the configured key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    max_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("reading admin.jwt_public_key_file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("admin.jwt_public_key_file {0}: not a PEM RSA or EC (P-256) public key")]
    NotAKey(String),
    #[error(
        "no HS256 secret is configured (admin.jwt_secret / OPPSYNC__ADMIN__JWT_SECRET); tokens for a public key are minted by the key's owner"
    )]
    NoSecret,
    #[error("signing the token: {0}")]
    Signing(String),
    #[error(
        "a token may live at most admin.max_token_ttl_secs ({max_secs} s); the service would refuse a longer one"
    )]
    TooLong { max_secs: u64 },
}

impl JwtVerifier {
    /// The verifier for `config`, or None when no key is configured (the admin API answers 503).
    pub fn from_config(config: &AdminConfig) -> Result<Option<JwtVerifier>, AuthConfigError> {
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            (
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (key, Algorithm::ES256)
            } else {
                return Err(AuthConfigError::NotAKey(path.display().to_string()));
            }
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Identity providers put an audience in every token; without one configured there is
            // nothing to compare it with.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(JwtVerifier {
            key,
            validation,
            max_ttl_secs: config.max_token_ttl_secs,
        }))
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenRefusal> {
        // Name the algorithm in the refusal (and catch `none`, which jsonwebtoken cannot even
        // parse) before verifying.
        let header = token_header(token).ok_or(TokenRefusal::Malformed)?;
        let alg = header
            .get("alg")
            .and_then(serde_json::Value::as_str)
            .ok_or(TokenRefusal::Malformed)?
            .to_owned();
        if !accepts(&self.validation.algorithms, &alg) {
            return Err(TokenRefusal::AlgorithmRefused(alg));
        }
        // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; none is here.
        if header.get("crit").is_some() {
            return Err(TokenRefusal::HeaderRefused(
                "it lists critical extensions (crit), which oppsync does not implement".into(),
            ));
        }
        // `JWT`, or `at+jwt` (RFC 9068 access tokens); anything else is some other object.
        if let Some(typ) = header.get("typ") {
            let typ = typ.as_str().unwrap_or("");
            if !(typ.eq_ignore_ascii_case("JWT") || typ.eq_ignore_ascii_case("at+jwt")) {
                return Err(TokenRefusal::HeaderRefused(format!(
                    "typ {:?} is not JWT",
                    typ.chars().take(32).collect::<String>()
                )));
            }
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.into_kind() {
                ErrorKind::ExpiredSignature => TokenRefusal::Expired,
                ErrorKind::ImmatureSignature => TokenRefusal::NotYetValid,
                ErrorKind::InvalidIssuer => TokenRefusal::WrongIssuer,
                ErrorKind::InvalidAudience => TokenRefusal::WrongAudience,
                ErrorKind::InvalidSignature => TokenRefusal::BadSignature,
                ErrorKind::InvalidAlgorithm => TokenRefusal::AlgorithmRefused(alg.clone()),
                ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                    TokenRefusal::MissingClaim(c)
                }
                _ => TokenRefusal::Malformed,
            })?;
        // A stolen long-lived token stays useful for as long as it lives: bounded.
        let issued = claims.iat.unwrap_or_else(jsonwebtoken::get_current_timestamp);
        let lifetime = claims.exp.unwrap_or(u64::MAX).saturating_sub(issued);
        if lifetime > self.max_ttl_secs.saturating_add(LEEWAY_SECS) {
            return Err(TokenRefusal::LifetimeTooLong {
                max_secs: self.max_ttl_secs,
            });
        }
        Ok(claims)
    }
}

/// Whether the header's `alg` names one of `accepted`: parsed as jsonwebtoken parses it (`none`
/// and unknown names parse to nothing, so they are never accepted).
fn accepts(accepted: &[Algorithm], alg: &str) -> bool {
    alg.parse::<Algorithm>().is_ok_and(|a| accepted.contains(&a))
}

/// The token's header as JSON (read before verifying, to say why a token is refused).
fn token_header(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The claims oppsync reads. Scopes come in `scope` (space-separated, RFC 8693) or `scp`
/// (Entra ID: a space-separated string or an array).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<ScopeClaim>,
    /// Required; optional here so that its absence is reported as such by the validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScopeClaim {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    pub fn scopes(&self) -> Vec<&str> {
        let mut scopes: Vec<&str> = self
            .scope
            .as_deref()
            .map(|s| s.split_whitespace().collect())
            .unwrap_or_default();
        match &self.scp {
            Some(ScopeClaim::One(s)) => scopes.extend(s.split_whitespace()),
            Some(ScopeClaim::Many(v)) => scopes.extend(v.iter().map(String::as_str)),
            None => {}
        }
        scopes
    }

    /// `oppsync.write` implies `oppsync.read`.
    pub fn allows(&self, needed: &str) -> bool {
        let scopes = self.scopes();
        scopes.contains(&needed) || (needed == SCOPE_READ && scopes.contains(&SCOPE_WRITE))
    }
}

async fn authorize(parts: &Parts, state: &AppState, needed: &'static str) -> Result<Claims, AdminRefusal> {
    let verifier = state.admin_auth.as_ref().ok_or(AdminRefusal::NotConfigured)?;
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(AdminRefusal::Token(TokenRefusal::Missing))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(AdminRefusal::Token(TokenRefusal::Malformed))?;
    let claims = verifier.verify(token).map_err(AdminRefusal::Token)?;
    if !claims.allows(needed) {
        return Err(AdminRefusal::InsufficientScope(needed));
    }
    tracing::debug!(
        subject = claims.sub.as_deref().unwrap_or(""),
        needed,
        "admin call authorised"
    );
    Ok(claims)
}

/// An admin caller with `oppsync.read` (or `oppsync.write`).
pub struct AdminRead(pub Claims);

/// An admin caller with `oppsync.write`.
pub struct AdminWrite(pub Claims);

impl FromRequestParts<AppState> for AdminRead {
    type Rejection = AdminRefusal;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AdminRefusal> {
        authorize(parts, state, SCOPE_READ).await.map(AdminRead)
    }
}

impl FromRequestParts<AppState> for AdminWrite {
    type Rejection = AdminRefusal;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AdminRefusal> {
        authorize(parts, state, SCOPE_WRITE).await.map(AdminWrite)
    }
}

/// Mints an HS256 admin token with the configured secret (`oppsync token`). `iss`/`aud` are set
/// to the configured values so that the token passes this service's checks.
pub fn mint(
    config: &AdminConfig,
    subject: &str,
    scopes: &[String],
    ttl: Duration,
) -> Result<String, AuthConfigError> {
    let secret = config.jwt_secret.as_ref().ok_or(AuthConfigError::NoSecret)?;
    if ttl.as_secs() > config.max_token_ttl_secs {
        return Err(AuthConfigError::TooLong {
            max_secs: config.max_token_ttl_secs,
        });
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: Some(subject.to_owned()),
        scope: Some(scopes.join(" ")),
        scp: None,
        exp: Some(now + ttl.as_secs()),
        iat: Some(now),
        iss: config.issuer.clone(),
        aud: config.audience.clone().map(serde_json::Value::String),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| AuthConfigError::Signing(e.to_string()))
}

/// Parses a token lifetime: `3600s`, `30m`, `1h`, `7d`, or bare seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by s, m, h or d (e.g. 30m, 1h)"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("{s:?}: the lifetime must be positive"));
    }
    n.checked_mul(factor)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_header_algorithm_is_parsed_not_compared_as_debug_text() {
        let hs = [Algorithm::HS256];
        assert!(accepts(&hs, "HS256"));
        for refused in ["none", "None", "hs256", "HS384", "RS256", "", "HS256 "] {
            assert!(!accepts(&hs, refused), "{refused:?}");
        }
        assert!(accepts(&[Algorithm::RS256, Algorithm::ES256], "ES256"));
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn scopes_from_scope_and_scp() {
        let c: Claims =
            serde_json::from_value(serde_json::json!({"exp": 1, "scope": "a oppsync.write"})).unwrap();
        assert!(c.allows(SCOPE_WRITE) && c.allows(SCOPE_READ));
        let c: Claims =
            serde_json::from_value(serde_json::json!({"exp": 1, "scp": ["oppsync.read"]})).unwrap();
        assert!(c.allows(SCOPE_READ) && !c.allows(SCOPE_WRITE));
        let c: Claims =
            serde_json::from_value(serde_json::json!({"exp": 1, "scp": "x oppsync.read"})).unwrap();
        assert!(c.allows(SCOPE_READ) && !c.allows(SCOPE_WRITE));
        let c: Claims = serde_json::from_value(serde_json::json!({"exp": 1})).unwrap();
        assert!(!c.allows(SCOPE_READ));
    }
}
