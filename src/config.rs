//! Configuration: a TOML file (`--config PATH`) overlaid by environment variables named
//! `OPPSYNC__SECTION__KEY` (how Kubernetes Secrets arrive). Validated once at start; every
//! problem is reported together.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

use crate::rules::SyncConfig;

/// A secret value: never printed by `Debug`, serialised as `[redacted]`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Environment values that look numeric arrive as numbers; a secret is always text.
        let value = serde_json::Value::deserialize(d)?;
        match value {
            serde_json::Value::String(s) => Ok(Secret::new(s)),
            serde_json::Value::Number(n) => Ok(Secret::new(n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a string, found {other}"
            ))),
        }
    }
}

/// A list given either as a TOML array or as one comma-separated string (environment).
fn comma_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    let value = serde_json::Value::deserialize(d)?;
    let items: Vec<String> = match value {
        serde_json::Value::String(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                serde_json::Value::String(s) => Ok(s),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                other => Err(serde::de::Error::custom(format!(
                    "expected a string, found {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        serde_json::Value::Number(n) => vec![n.to_string()],
        serde_json::Value::Null => vec![],
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a list, found {other}"
            )));
        }
    };
    Ok(items.into_iter().filter(|s| !s.is_empty()).map(T::from).collect())
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub webhook: WebhookConfig,
    pub marketo: MarketoConfig,
    pub dataverse: DataverseConfig,
    pub sync: SyncConfig,
    pub admin: AdminConfig,
    pub worker: WorkerConfig,
    pub backfill: BackfillConfig,
    pub reconcile: ReconcileConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub body_limit_bytes: usize,
    /// How long SIGTERM waits for in-flight requests and the worker before exiting.
    pub shutdown_grace_secs: u64,
    /// A connection that has not sent a request's complete headers within this long is closed:
    /// slow-header (slowloris) clients, and idle keep-alive connections waiting for their next
    /// request (hyper counts that wait as header time).
    pub header_read_timeout_secs: u64,
    /// A request whose body has not arrived in full within this long is answered 408.
    pub body_read_timeout_secs: u64,
    /// Most connections served at once; beyond it new ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            body_limit_bytes: 1024 * 1024,
            shutdown_grace_secs: 25,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (default, embedded) or `postgres://…`.
    pub url: Secret,
    /// The worker's and admin API's connection pool; 0 picks per backend (see
    /// `store::default_pool_size`).
    pub max_connections: u32,
    /// Most notifications one group commit takes at once.
    pub group_commit_max: usize,
    /// Settled notifications (done, discarded) are deleted this many days after they settled;
    /// 0 keeps them for ever. Dead letters stay until handled. It is also the window in which
    /// a re-delivery is recognised as a duplicate (a later one is planned again, and changes
    /// nothing that already reached Marketo). Fractions are allowed (tests, benchmarks).
    pub retention_days: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: Secret::new("sqlite://oppsync.db"),
            max_connections: 0,
            group_commit_max: 256,
            retention_days: 14.0,
        }
    }
}

/// How Dynamics proves it is the caller (the service endpoint's authentication type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WebhookAuth {
    /// WebhookKey: `?code=<key>`.
    #[default]
    WebhookKey,
    /// HttpHeader: a header named by `header_name`.
    HttpHeader,
    /// HttpQueryString: a query parameter named by `param_name`.
    QueryString,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    pub auth: WebhookAuth,
    pub header_name: Option<String>,
    pub param_name: Option<String>,
    /// Accepted secrets; several at once so a key can be rotated without downtime.
    #[serde(deserialize_with = "comma_list")]
    pub keys: Vec<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MarketoConfig {
    /// `https://<munchkin>.mktorest.com`
    pub base_url: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    /// Calls allowed per rate window of `window_secs` (Marketo: 100 per 20 s per instance,
    /// shared). Formerly `calls_per_20s` (`OPPSYNC__MARKETO__CALLS_PER_20S`), still read for
    /// this release.
    #[serde(alias = "calls_per_20s")]
    pub calls_per_window: u32,
    /// Length of the rate window in seconds (20 in production; scaled down in tests).
    pub window_secs: f64,
    pub max_concurrent: u32,
    pub daily_quota: u32,
    pub batch_size: usize,
    /// Largest request body oppsync sends (Marketo refuses over 1 MB with HTTP 413).
    pub max_body_bytes: usize,
    /// Immediate retries of one call on retryable errors before the write is rescheduled.
    pub max_retries: u32,
    pub retry_base_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Multiplies the client timeouts (which sit a little above each endpoint's server timeout).
    pub timeout_scale: f64,
    /// A batch smaller than `batch_size` waits until its oldest write is this old, so bursts of
    /// changes go out as few full calls (Marketo's advice: batch by age and size).
    pub batch_linger_ms: u64,
}

impl Default for MarketoConfig {
    fn default() -> Self {
        MarketoConfig {
            base_url: None,
            client_id: None,
            client_secret: None,
            calls_per_window: 100,
            window_secs: 20.0,
            max_concurrent: 10,
            daily_quota: 50_000,
            batch_size: 300,
            max_body_bytes: 1_000_000,
            max_retries: 4,
            retry_base_delay_ms: 500,
            retry_max_delay_ms: 30_000,
            timeout_scale: 1.0,
            batch_linger_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataverseConfig {
    /// Environment URL, e.g. `https://contoso.crm.dynamics.com`.
    pub url: Option<Url>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    /// Overrides `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    pub token_url: Option<Url>,
    /// Timeout of one Web API or token request.
    pub request_timeout_secs: u64,
    /// How many 429 answers one call waits out (honouring Retry-After) before giving up.
    pub max_rate_limit_retries: u32,
    /// Most total time one call spends waiting on 429s.
    pub max_rate_limit_wait_secs: u64,
    /// Most Web API calls in flight at once (Dataverse's service protection also limits
    /// concurrent requests per user, to 52).
    pub max_concurrent_requests: u32,
    /// The organisation whose notifications are accepted (`OrganizationId` of the body); others
    /// (a sandbox copied from production keeps the endpoint and its key) are refused with 403.
    /// When unset it is learnt at start from the Web API's `WhoAmI`.
    pub organization_id: Option<uuid::Uuid>,
    /// The host name Dynamics sends in `x-ms-dynamics-organization`; a notification naming
    /// another is refused with 403. Defaults to the host of `url`.
    pub organization_host: Option<String>,
}

impl Default for DataverseConfig {
    fn default() -> Self {
        DataverseConfig {
            url: None,
            tenant_id: None,
            client_id: None,
            client_secret: None,
            token_url: None,
            request_timeout_secs: 30,
            max_rate_limit_retries: 5,
            max_rate_limit_wait_secs: 120,
            max_concurrent_requests: 16,
            organization_id: None,
            organization_host: None,
        }
    }
}

impl DataverseConfig {
    /// The host `x-ms-dynamics-organization` must name: `organization_host`, else the host of
    /// `url`; lower case, without a trailing dot.
    pub fn expected_organization_host(&self) -> Option<String> {
        self.organization_host
            .clone()
            .or_else(|| self.url.as_ref().and_then(|u| u.host_str().map(str::to_owned)))
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
    }

    pub fn effective_token_url(&self) -> Option<Url> {
        if let Some(u) = &self.token_url {
            return Some(u.clone());
        }
        let tenant = self.tenant_id.as_deref()?;
        Url::parse(&format!(
            "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
        ))
        .ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// HS256 shared secret.
    pub jwt_secret: Option<Secret>,
    /// PEM public key (RS256 or ES256).
    pub jwt_public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Longest lifetime (`exp - iat`) of an admin token accepted, and minted by `oppsync token`.
    pub max_token_ttl_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            jwt_secret: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            max_token_ttl_secs: 86_400,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// `true` records a pause of pushing to Marketo at every start (intake and planning go on).
    /// The pause is one flag in the store, shared by every replica; `false` never lifts it:
    /// only `POST /admin/resume` does (docs/operations.md, "Pausing").
    pub paused: bool,
    /// How long a claimed notification stays leased; renewed while working.
    pub lease_secs: u64,
    /// Attempts at a notification or a Marketo write before it becomes a dead letter.
    pub max_attempts: u32,
    pub poll_interval_ms: u64,
    /// Notifications planned per claim.
    pub claim_batch: u32,
    /// First retry delay of a failed notification or Marketo write (doubling, with jitter).
    pub retry_base_ms: i64,
    /// Longest retry delay.
    pub retry_max_ms: i64,
    /// A worker loop (planner or pusher) that panics or stops is restarted after a backoff
    /// starting here (doubling per restart within ten minutes, at most a minute).
    pub restart_base_ms: u64,
    /// Restarts of one loop within ten minutes after which the worker is declared gone:
    /// `/healthz` then fails, so Kubernetes restarts the pod.
    pub restart_limit: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            paused: false,
            lease_secs: 300,
            max_attempts: 12,
            poll_interval_ms: 200,
            claim_batch: 512,
            retry_base_ms: 2_000,
            retry_max_ms: 600_000,
            restart_base_ms: 1_000,
            restart_limit: 5,
        }
    }
}

/// The initial sync (`POST /admin/backfill`, `oppsync backfill`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackfillConfig {
    /// Start one the first time `serve` runs on an empty store.
    pub on_empty_store: bool,
    /// Opportunities read per Web API page; each page is planned in one commit.
    pub page_size: u32,
    /// Marketo calls of the daily quota left to live traffic: the backfill pauses when no more
    /// than this many are left.
    pub quota_reserve: u32,
    /// Most Marketo writes the backfill keeps waiting to be pushed; it reads on as the pusher
    /// takes them.
    pub max_queued_writes: u32,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            on_empty_store: false,
            page_size: 200,
            quota_reserve: 5_000,
            max_queued_writes: 6_000,
        }
    }
}

/// Reconciliation: what changed in Dataverse since the last pass, planned like webhooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Seconds between passes; 0 turns reconciliation off.
    pub interval_secs: u64,
    /// Rows per Web API page of a pass.
    pub page_size: u32,
    /// Where a table has change tracking off, deletes are unseen: each pass checks this many
    /// batches of 50 known opportunities still exist, and reports the missing ones.
    pub delete_check_batches: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            interval_secs: 900,
            page_size: 1_000,
            delete_check_batches: 20,
        }
    }
}

/// Everything wrong with a configuration, listed together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// What the configuration is for: `serve` needs every collaborator, other commands less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serve,
    /// `oppsync register`: the Dataverse credentials and the key it registers.
    Register,
    Inspect,
}

impl Config {
    /// Loads the file (if any) and the `OPPSYNC__…` environment, then validates.
    pub fn load(path: Option<&Path>, purpose: Purpose) -> Result<Config, ConfigError> {
        Self::load_from(path, Env::prefixed("OPPSYNC__").split("__"), purpose)
    }

    /// Loads without the semantic checks: for commands that read one section (`token` needs
    /// only `admin`, not a store or Marketo credentials).
    pub fn load_unchecked(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::extract(path, Env::prefixed("OPPSYNC__").split("__"))
    }

    fn load_from(path: Option<&Path>, env: Env, purpose: Purpose) -> Result<Config, ConfigError> {
        let config = Self::extract(path, env)?;
        let problems = config.problems(purpose);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    fn extract(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        // No `Serialized::defaults(Config::default())` base: `Secret` serialises as
        // `[redacted]`, which would replace the default `store.url`. Every section is
        // `#[serde(default)]`, so missing keys take their defaults anyway.
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError {
                    problems: vec![format!("config file {} does not exist", path.display())],
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env);
        extract_listing_every_problem(&figment)
    }

    /// Parses a TOML document (tests, `check-config`).
    pub fn from_toml(text: &str, purpose: Purpose) -> Result<Config, ConfigError> {
        let figment = Figment::new().merge(Toml::string(text));
        let config = extract_listing_every_problem(&figment)?;
        let problems = config.problems(purpose);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Every semantic problem of this configuration.
    pub fn problems(&self, purpose: Purpose) -> Vec<String> {
        let mut p = Vec::new();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "server.listen (OPPSYNC__SERVER__LISTEN): {:?} is not an address such as 0.0.0.0:8080",
                self.server.listen
            ));
        }
        if self.server.header_read_timeout_secs == 0 || self.server.body_read_timeout_secs == 0 {
            p.push("server.header_read_timeout_secs / body_read_timeout_secs: must be at least 1".into());
        }
        if self.server.max_connections == 0 {
            p.push("server.max_connections (OPPSYNC__SERVER__MAX_CONNECTIONS): must be at least 1".into());
        }
        if self.server.body_limit_bytes < 1024 {
            p.push(
                "server.body_limit_bytes (OPPSYNC__SERVER__BODY_LIMIT_BYTES): must be at least 1024".into(),
            );
        }
        let url = self.store.url.expose();
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            p.push("store.url (OPPSYNC__STORE__URL): must start with sqlite:// or postgres://".into());
        }
        if crate::store::is_in_memory_sqlite(url) {
            p.push("store.url (OPPSYNC__STORE__URL): an in-memory SQLite store would lose the inbox; name a file".into());
        }
        if self.store.group_commit_max == 0 {
            p.push("store.group_commit_max: must be at least 1".into());
        }
        if !self.store.retention_days.is_finite() || self.store.retention_days < 0.0 {
            p.push(
                "store.retention_days (OPPSYNC__STORE__RETENTION_DAYS): must be 0 (keep for ever) or a positive number of days"
                    .into(),
            );
        }
        match self.webhook.auth {
            WebhookAuth::HttpHeader if self.webhook.header_name.as_deref().unwrap_or("").is_empty() => p.push(
                "webhook.header_name (OPPSYNC__WEBHOOK__HEADER_NAME): required when webhook.auth = http_header".into(),
            ),
            WebhookAuth::QueryString if self.webhook.param_name.as_deref().unwrap_or("").is_empty() => p.push(
                "webhook.param_name (OPPSYNC__WEBHOOK__PARAM_NAME): required when webhook.auth = query_string".into(),
            ),
            _ => {}
        }
        if let Some(h) = &self.webhook.header_name
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            p.push(format!(
                "webhook.header_name: {h:?} is not a valid HTTP header name"
            ));
        }
        if purpose == Purpose::Serve && self.webhook.keys.is_empty() {
            p.push("webhook.keys (OPPSYNC__WEBHOOK__KEYS): at least one key is required; Dynamics must prove it is the caller".into());
        }
        if self.webhook.keys.iter().any(|k| k.expose().len() < 8) {
            p.push("webhook.keys: every key must be at least 8 characters".into());
        }
        // Credentials and tokens travel to these: https, or plain http to this machine only
        // (the simulators, a local proxy).
        let token_url = self.dataverse.token_url.as_ref();
        for (name, env, url) in [
            (
                "marketo.base_url",
                "OPPSYNC__MARKETO__BASE_URL",
                self.marketo.base_url.as_ref(),
            ),
            (
                "dataverse.url",
                "OPPSYNC__DATAVERSE__URL",
                self.dataverse.url.as_ref(),
            ),
            ("dataverse.token_url", "OPPSYNC__DATAVERSE__TOKEN_URL", token_url),
        ] {
            if let Some(url) = url
                && let Err(why) = check_service_url(url)
            {
                p.push(format!("{name} ({env}): {why}"));
            }
        }
        let m = &self.marketo;
        if purpose == Purpose::Serve {
            if m.base_url.is_none() {
                p.push("marketo.base_url (OPPSYNC__MARKETO__BASE_URL): required, e.g. https://123-ABC-456.mktorest.com".into());
            }
            if m.client_id.as_deref().unwrap_or("").is_empty() {
                p.push("marketo.client_id (OPPSYNC__MARKETO__CLIENT_ID): required".into());
            }
            if m.client_secret.is_none() {
                p.push("marketo.client_secret (OPPSYNC__MARKETO__CLIENT_SECRET): required".into());
            }
        }
        if m.calls_per_window == 0 {
            p.push("marketo.calls_per_window: must be at least 1".into());
        }
        if m.window_secs.is_nan() || m.window_secs <= 0.0 {
            p.push("marketo.window_secs: must be positive".into());
        }
        if m.max_concurrent == 0 {
            p.push("marketo.max_concurrent: must be at least 1".into());
        }
        if m.batch_size == 0 || m.batch_size > 300 {
            p.push("marketo.batch_size: must be between 1 and 300 (Marketo's limit)".into());
        }
        if m.max_body_bytes < 10_000 || m.max_body_bytes > 1_000_000 {
            p.push("marketo.max_body_bytes: must be between 10000 and 1000000 (Marketo's 1 MB limit)".into());
        }
        if m.timeout_scale.is_nan() || m.timeout_scale <= 0.0 {
            p.push("marketo.timeout_scale: must be positive".into());
        }
        let d = &self.dataverse;
        if matches!(purpose, Purpose::Serve | Purpose::Register) {
            if d.url.is_none() {
                p.push("dataverse.url (OPPSYNC__DATAVERSE__URL): required, e.g. https://contoso.crm.dynamics.com".into());
            }
            if d.client_id.as_deref().unwrap_or("").is_empty() {
                p.push("dataverse.client_id (OPPSYNC__DATAVERSE__CLIENT_ID): required".into());
            }
            if d.client_secret.is_none() {
                p.push("dataverse.client_secret (OPPSYNC__DATAVERSE__CLIENT_SECRET): required".into());
            }
            if d.effective_token_url().is_none() {
                p.push("dataverse.tenant_id (OPPSYNC__DATAVERSE__TENANT_ID) or dataverse.token_url: one is required".into());
            }
        }
        if purpose == Purpose::Register {
            if self.webhook.auth != WebhookAuth::WebhookKey {
                p.push(
                    "webhook.auth (OPPSYNC__WEBHOOK__AUTH): register creates a WebhookKey endpoint, so webhook.auth must be webhook_key"
                        .into(),
                );
            }
            if self.webhook.keys.is_empty() {
                p.push(
                    "webhook.keys (OPPSYNC__WEBHOOK__KEYS): at least one key is required; the first one is registered"
                        .into(),
                );
            }
        }
        if self.admin.max_token_ttl_secs == 0 {
            p.push(
                "admin.max_token_ttl_secs (OPPSYNC__ADMIN__MAX_TOKEN_TTL_SECS): must be at least 1".into(),
            );
        }
        if self.admin.jwt_secret.is_some() && self.admin.jwt_public_key_file.is_some() {
            p.push(
                "admin: set either jwt_secret (HS256) or jwt_public_key_file (RS256/ES256), not both".into(),
            );
        }
        if let Some(s) = &self.admin.jwt_secret
            && s.expose().len() < 32
        {
            p.push("admin.jwt_secret (OPPSYNC__ADMIN__JWT_SECRET): must be at least 32 characters".into());
        }
        if let Some(f) = &self.admin.jwt_public_key_file
            && !f.exists()
        {
            p.push(format!(
                "admin.jwt_public_key_file: {} does not exist",
                f.display()
            ));
        }
        if self.worker.lease_secs < 10 {
            p.push("worker.lease_secs: must be at least 10".into());
        }
        if self.worker.max_attempts == 0 {
            p.push("worker.max_attempts: must be at least 1".into());
        }
        if self.worker.retry_base_ms < 1 || self.worker.retry_max_ms < self.worker.retry_base_ms {
            p.push("worker.retry_base_ms / retry_max_ms: need 1 <= retry_base_ms <= retry_max_ms".into());
        }
        if self.worker.claim_batch == 0 {
            p.push("worker.claim_batch: must be at least 1".into());
        }
        if self.backfill.page_size == 0 || self.backfill.page_size > 5_000 {
            p.push("backfill.page_size: must be between 1 and 5000 (Dataverse's largest page)".into());
        }
        if self.backfill.max_queued_writes == 0 {
            p.push("backfill.max_queued_writes: must be at least 1".into());
        }
        if self.reconcile.page_size == 0 || self.reconcile.page_size > 5_000 {
            p.push("reconcile.page_size: must be between 1 and 5000 (Dataverse's largest page)".into());
        }
        if self.dataverse.max_concurrent_requests == 0 {
            p.push("dataverse.max_concurrent_requests: must be at least 1".into());
        }
        p.extend(self.sync.problems());
        p
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        toml_string(self)
    }
}

fn toml_string(config: &Config) -> String {
    // Through serde_json first, so `None`s can be dropped (TOML has no null).
    let value = strip_nulls(serde_json::to_value(config).unwrap_or_default());
    toml::to_string_pretty(&value).unwrap_or_else(|e| format!("# could not render: {e}"))
}

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Extracts the configuration; when values do not fit their type, lists every one of them, not
/// only the first that serde stops at: each bad key is set aside and the rest extracted again.
fn extract_listing_every_problem(figment: &Figment) -> Result<Config, ConfigError> {
    let first = match figment.extract::<Config>() {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let mut problems: Vec<String> = Vec::new();
    let mut paths: Vec<Vec<String>> = Vec::new();
    for e in first {
        paths.push(e.path.clone());
        problems.push(describe_figment_error(e));
    }
    // The same data as one value, to take keys out of.
    let Ok(mut data) = figment.extract::<figment::value::Value>() else {
        return Err(ConfigError { problems });
    };
    // Bounded: each round removes at least one key, or stops.
    for _ in 0..64 {
        if paths.is_empty() || !paths.iter().all(|p| remove_key(&mut data, p)) {
            break;
        }
        paths.clear();
        let rest = Figment::from(figment::providers::Serialized::defaults(&data));
        match rest.extract::<Config>() {
            Ok(_) => break,
            Err(e) => {
                for e in e {
                    let problem = describe_figment_error(e.clone());
                    if !problems.contains(&problem) {
                        problems.push(problem);
                        paths.push(e.path);
                    }
                }
            }
        }
    }
    Err(ConfigError { problems })
}

/// Removes the key at `path` (dotted into sections); false when there is none.
fn remove_key(value: &mut figment::value::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for key in parents {
        match at {
            figment::value::Value::Dict(_, dict) => match dict.get_mut(key) {
                Some(next) => at = next,
                None => return false,
            },
            _ => return false,
        }
    }
    match at {
        figment::value::Value::Dict(_, dict) => dict.remove(last).is_some(),
        _ => false,
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    let path = e.path.join(".");
    let env_name = if path.is_empty() {
        String::new()
    } else {
        format!(
            " (OPPSYNC__{})",
            e.path
                .iter()
                .map(|p| p.to_uppercase())
                .collect::<Vec<_>>()
                .join("__")
        )
    };
    let kind = e.kind.to_string();
    if path.is_empty() {
        kind
    } else {
        format!("{path}{env_name}: {kind}")
    }
}

/// A service URL oppsync sends secrets to: `https://`, or `http://` to a loopback address.
fn check_service_url(url: &Url) -> Result<(), String> {
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{url} is plain http; use https (http is accepted only to a loopback address, e.g. a simulator)"
        )),
        scheme => Err(format!(
            "{url}: the scheme {scheme}:// is not accepted; use https://"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_ready() -> &'static str {
        r#"
        [webhook]
        keys = ["first-key-123", "second-key-456"]
        [marketo]
        base_url = "https://123-ABC-456.mktorest.com"
        client_id = "id"
        client_secret = "secret"
        [dataverse]
        url = "https://contoso.crm.dynamics.com"
        tenant_id = "tenant"
        client_id = "id"
        client_secret = "secret"
        "#
    }

    #[test]
    fn a_complete_file_is_valid_for_serve() {
        let c = Config::from_toml(serve_ready(), Purpose::Serve).unwrap();
        assert_eq!(c.webhook.keys.len(), 2);
        assert_eq!(c.server.listen, "0.0.0.0:8080");
        assert_eq!(c.server.body_limit_bytes, 1024 * 1024);
        assert_eq!(c.store.url.expose(), "sqlite://oppsync.db");
    }

    #[test]
    fn every_problem_is_listed_together() {
        let err = Config::from_toml(
            r#"
            [server]
            listen = "nowhere"
            [store]
            url = "sqlite::memory:"
            [webhook]
            auth = "http_header"
            [marketo]
            batch_size = 500
            "#,
            Purpose::Serve,
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "server.listen",
            "in-memory SQLite",
            "webhook.header_name",
            "webhook.keys",
            "marketo.batch_size",
            "marketo.base_url",
            "dataverse.url",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
    }

    #[test]
    fn service_urls_are_https_or_loopback_http() {
        let with = |marketo: &str, dataverse: &str| {
            let file = serve_ready()
                .replace("https://123-ABC-456.mktorest.com", marketo)
                .replace("https://contoso.crm.dynamics.com", dataverse);
            Config::from_toml(&file, Purpose::Serve).map_err(|e| e.problems.join("\n"))
        };
        let err = with(
            "ftp://123-ABC-456.mktorest.com",
            "http://contoso.crm.dynamics.com",
        )
        .unwrap_err();
        assert!(
            err.contains("marketo.base_url") && err.contains("ftp://"),
            "{err}"
        );
        assert!(
            err.contains("dataverse.url") && err.contains("plain http"),
            "{err}"
        );
        assert!(with("http://127.0.0.1:9000", "http://localhost:9001").is_ok());
        assert!(with("http://[::1]:9000", "https://contoso.crm.dynamics.com").is_ok());
        let err = with("https://123-ABC-456.mktorest.com", "file:///etc/passwd").unwrap_err();
        assert!(err.contains("dataverse.url"), "{err}");
    }

    #[test]
    fn every_badly_typed_value_is_listed_not_only_the_first() {
        let err = Config::from_toml(
            "[server]\nbody_limit_bytes = \"lots\"\n[marketo]\nbatch_size = \"many\"\n[worker]\nmax_attempts = -3\n",
            Purpose::Inspect,
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        for key in [
            "server.body_limit_bytes",
            "marketo.batch_size",
            "worker.max_attempts",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
        assert_eq!(err.problems.len(), 3, "{all}");
    }

    #[test]
    fn type_errors_name_the_key_and_its_environment_variable() {
        let err = Config::from_toml("[server]\nbody_limit_bytes = \"lots\"\n", Purpose::Inspect).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("server.body_limit_bytes"), "{all}");
        assert!(all.contains("OPPSYNC__SERVER__BODY_LIMIT_BYTES"), "{all}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn environment_overlays_the_file_and_splits_keys_on_commas() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("oppsync.toml", serve_ready())?;
            jail.set_env(
                "OPPSYNC__WEBHOOK__KEYS",
                "rotated-key-1, rotated-key-2,rotated-key-3",
            );
            jail.set_env("OPPSYNC__SERVER__LISTEN", "127.0.0.1:9999");
            jail.set_env("OPPSYNC__MARKETO__CALLS_PER_WINDOW", "50");
            let c =
                Config::load(Some(Path::new("oppsync.toml")), Purpose::Serve).map_err(|e| e.to_string())?;
            let keys: Vec<&str> = c.webhook.keys.iter().map(|k| k.expose()).collect();
            assert_eq!(keys, ["rotated-key-1", "rotated-key-2", "rotated-key-3"]);
            assert_eq!(c.server.listen, "127.0.0.1:9999");
            assert_eq!(c.marketo.calls_per_window, 50);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn the_former_calls_per_20s_name_still_sets_calls_per_window() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("oppsync.toml", serve_ready())?;
            jail.set_env("OPPSYNC__MARKETO__CALLS_PER_20S", "40");
            let c =
                Config::load(Some(Path::new("oppsync.toml")), Purpose::Serve).map_err(|e| e.to_string())?;
            assert_eq!(c.marketo.calls_per_window, 40);
            Ok(())
        });
        let file = "[marketo]\ncalls_per_20s = 30\n";
        let c: Config = toml::from_str(file).unwrap();
        assert_eq!(c.marketo.calls_per_window, 30);
    }

    #[test]
    fn redacted_output_never_contains_secrets() {
        let c = Config::from_toml(serve_ready(), Purpose::Serve).unwrap();
        let out = c.redacted_toml();
        assert!(!out.contains("first-key-123"), "{out}");
        assert!(!out.contains("\"secret\""), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
        assert!(out.contains("[marketo]"), "{out}");
        assert!(!format!("{c:?}").contains("first-key-123"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[server]\nlisten_adress = \"x\"\n", Purpose::Inspect).unwrap_err();
        assert!(
            err.problems.join("\n").contains("listen_adress"),
            "{:?}",
            err.problems
        );
    }
}
