//! Access token: fetched with client credentials, cached, shared, refreshed single-flight
//! (spec §1.4).
//!
//! Identity hands back the *same* token until it expires, so refreshing early does not buy a
//! fresh one. The cache therefore treats a token as stale a margin before its expiry, and when
//! a refresh returns the token it already had, uses it to its real end and relies on the
//! reactive path (601/602 → `replace`) for the race at the very end.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Secret;

use super::error::MarketoError;
use super::wire::TokenReply;

/// A bearer token. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AccessToken(Arc<str>);

impl AccessToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

struct Cached {
    token: AccessToken,
    stale_at: Instant,
}

pub(crate) struct TokenCache {
    http: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: Secret,
    timeout: Duration,
    /// Held across the identity call: one refresh at a time, the others wait and reuse it.
    current: tokio::sync::Mutex<Option<Cached>>,
    refreshes: AtomicU64,
}

/// Refresh this long before the announced expiry, at most a quarter of the token's life.
const MARGIN: Duration = Duration::from_secs(30);

impl TokenCache {
    pub fn new(
        http: reqwest::Client,
        base: &str,
        client_id: String,
        client_secret: Secret,
        timeout: Duration,
    ) -> Self {
        TokenCache {
            http,
            url: format!("{base}/identity/oauth/token"),
            client_id,
            client_secret,
            timeout,
            current: tokio::sync::Mutex::new(None),
            refreshes: AtomicU64::new(0),
        }
    }

    /// Identity calls made so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// A token believed valid, fetching one if the cached token is missing or stale.
    pub async fn get(&self) -> Result<AccessToken, MarketoError> {
        let mut guard = self.current.lock().await;
        if let Some(c) = guard.as_ref()
            && Instant::now() < c.stale_at
        {
            return Ok(c.token.clone());
        }
        let previous = guard.as_ref().map(|c| c.token.clone());
        let fresh = self.fetch(previous.as_ref()).await?;
        let token = fresh.token.clone();
        *guard = Some(fresh);
        Ok(token)
    }

    /// Marketo refused `rejected` (601/602). Returns a different token: the one another task
    /// already fetched, or a new one. Never hands `rejected` back from the cache.
    pub async fn replace(&self, rejected: &AccessToken) -> Result<AccessToken, MarketoError> {
        let mut guard = self.current.lock().await;
        if let Some(c) = guard.as_ref()
            && c.token != *rejected
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(Some(rejected)).await?;
        let token = fresh.token.clone();
        *guard = Some(fresh);
        Ok(token)
    }

    async fn fetch(&self, previous: Option<&AccessToken>) -> Result<Cached, MarketoError> {
        let started = Instant::now();
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("oppsync_marketo_token_refreshes_total").increment(1);
        let response = self
            .http
            .get(&self.url)
            .query(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose()),
            ])
            .timeout(self.timeout)
            .send()
            .await
            // The URL carries the secret: strip it from the error before it can be logged.
            .map_err(|e| transport_error(e.without_url()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(e.without_url()))?;
        let reply: Option<TokenReply> = serde_json::from_slice(&body).ok();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::BAD_REQUEST {
            let (error, description) = reply
                .map(|r| {
                    (
                        r.error.unwrap_or_default(),
                        r.error_description.unwrap_or_default(),
                    )
                })
                .unwrap_or_default();
            return Err(MarketoError::Configuration {
                code: format!("http_{}", status.as_u16()),
                message: format!("identity refused the client credentials: {error} {description}")
                    .trim_end()
                    .to_owned(),
            });
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(MarketoError::retryable(
                format!("http_{}", status.as_u16()),
                "identity service unavailable",
            ));
        }
        if !status.is_success() {
            return Err(MarketoError::Configuration {
                code: format!("http_{}", status.as_u16()),
                message: format!("identity answered HTTP {status}; check marketo.base_url"),
            });
        }
        let reply = reply.ok_or_else(|| {
            MarketoError::retryable(
                "invalid_response",
                "identity answered with something that is not JSON",
            )
        })?;
        let Some(value) = reply.access_token.filter(|t| !t.is_empty()) else {
            return Err(MarketoError::Configuration {
                code: reply.error.unwrap_or_else(|| "no_token".into()),
                message: reply
                    .error_description
                    .unwrap_or_else(|| "identity answered without an access_token".into()),
            });
        };
        let life = Duration::from_secs_f64(reply.expires_in.unwrap_or(0.0).max(0.0));
        let token = AccessToken(Arc::from(value));
        let same_as_before = previous.is_some_and(|p| *p == token);
        let margin = if same_as_before {
            Duration::ZERO
        } else {
            MARGIN.min(life / 4)
        };
        tracing::debug!(
            expires_in_secs = life.as_secs(),
            reused = same_as_before,
            "marketo token fetched"
        );
        Ok(Cached {
            token,
            stale_at: started + life.saturating_sub(margin),
        })
    }
}

/// A transport failure, its cause kept (connection refused, DNS, TLS …). Callers strip the URL
/// first (`without_url`): the identity URL carries the client secret.
pub(crate) fn transport_error(e: reqwest::Error) -> MarketoError {
    let code = if e.is_timeout() { "timeout" } else { "network" };
    let message = e.to_string();
    let has_cause = std::error::Error::source(&e).is_some();
    MarketoError::Retryable {
        code: code.into(),
        message,
        cause: has_cause.then(|| crate::errors::Cause::new(e)),
    }
}
