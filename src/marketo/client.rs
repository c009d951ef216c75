//! The client proper: endpoints, batching, result correlation, retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::{Map, Value, json};

use crate::config::MarketoConfig;

use super::error::{CodeClass, MarketoError, classify};
use super::limiter::{Limiter, QuotaDay};
use super::token::{AccessToken, TokenCache, transport_error};
use super::wire::{Envelope, RecordOutcome};

/// What Marketo did with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    Created,
    Updated,
    Deleted,
    /// Nothing to do: a delete of a record Marketo does not have (skipped 1013). The goal
    /// state holds.
    Unchanged,
}

/// The outcome of one input record, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    /// `id` is the `marketoGUID` (opportunities, roles) or the integer `id` as text
    /// (companies, leads).
    Done {
        status: RecordStatus,
        id: Option<String>,
    },
    /// A permanent record-level refusal (1xxx reason): resending it unchanged won't help.
    Failed { code: String, message: String },
}

impl RecordResult {
    pub fn is_done(&self) -> bool {
        matches!(self, RecordResult::Done { .. })
    }
}

/// One opportunity role, keyed by (externalOpportunityId, leadId, role) (spec §4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleRecord {
    pub external_opportunity_id: String,
    pub lead_id: i64,
    pub role: String,
    pub is_primary: bool,
}

/// A lead found by `find_leads`: its id and the requested fields Marketo returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    pub id: i64,
    pub fields: Map<String, Value>,
}

/// Counters of this process's Marketo traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// REST calls made today (by this process; other integrations share the quota too).
    pub calls_today: u32,
    pub daily_quota: u32,
    pub quota_left: u32,
    pub limiter_waits: u64,
    pub limiter_wait_seconds: f64,
    pub token_refreshes: u64,
}

/// What `check-config --online` learned.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub token_ok: bool,
    /// The instance accepts opportunity writes (native CRM sync is off).
    pub opportunity_writes_accepted: bool,
    pub detail: String,
    pub usage: Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    SyncOpportunities,
    DeleteOpportunities,
    SyncRoles,
    DeleteRoles,
    SyncCompanies,
    QueryLeads,
    SyncLeads,
    QueryOpportunities,
    QueryRoles,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::SyncOpportunities => "/rest/v1/opportunities.json",
            Endpoint::DeleteOpportunities => "/rest/v1/opportunities/delete.json",
            Endpoint::SyncRoles => "/rest/v1/opportunities/roles.json",
            Endpoint::DeleteRoles => "/rest/v1/opportunities/roles/delete.json",
            Endpoint::SyncCompanies => "/rest/v1/companies.json",
            // Always the long form (§3.3): a list of GUIDs or emails easily passes 8 KB of URI.
            Endpoint::QueryLeads => "/rest/v1/leads.json?_method=GET",
            Endpoint::SyncLeads => "/rest/v1/leads.json",
            Endpoint::QueryOpportunities => "/rest/v1/opportunities.json?_method=GET",
            Endpoint::QueryRoles => "/rest/v1/opportunities/roles.json?_method=GET",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Endpoint::SyncOpportunities => "sync_opportunities",
            Endpoint::DeleteOpportunities => "delete_opportunities",
            Endpoint::SyncRoles => "sync_roles",
            Endpoint::DeleteRoles => "delete_roles",
            Endpoint::SyncCompanies => "sync_companies",
            Endpoint::QueryLeads => "find_leads",
            Endpoint::SyncLeads => "sync_leads",
            Endpoint::QueryOpportunities => "query_opportunities",
            Endpoint::QueryRoles => "query_roles",
        }
    }

    /// A little above the server's own timeout (§7: 60 s writes, 60 s lead query, 90 s lead
    /// sync), so a slow answer is not cut off while Marketo may still commit it.
    fn timeout_secs(self) -> f64 {
        match self {
            Endpoint::SyncLeads => 100.0,
            Endpoint::QueryLeads => 70.0,
            _ => 70.0,
        }
    }

    fn is_delete(self) -> bool {
        matches!(self, Endpoint::DeleteOpportunities | Endpoint::DeleteRoles)
    }
}

enum Payload {
    Json(Vec<u8>),
    Form(Vec<(String, String)>),
}

/// The Marketo REST client. Clones share the token, the limiter and the connection pool.
#[derive(Clone)]
pub struct MarketoClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: MarketoConfig,
    base: String,
    http: reqwest::Client,
    tokens: TokenCache,
    limiter: Arc<Limiter>,
}

/// What one HTTP exchange came to, before retry decisions.
enum Exchange {
    Envelope(Envelope),
    Failed(MarketoError),
}

impl MarketoClient {
    pub fn new(cfg: &MarketoConfig) -> Result<Self, MarketoError> {
        let missing = |what: &str| MarketoError::Configuration {
            code: "config".into(),
            message: format!("marketo.{what} is required"),
        };
        let base_url = cfg.base_url.as_ref().ok_or_else(|| missing("base_url"))?;
        let client_id = cfg
            .client_id
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("client_id"))?;
        let secret = cfg
            .client_secret
            .clone()
            .ok_or_else(|| missing("client_secret"))?;
        // Normalise the join: `…//rest/…` is being deprecated at Marketo's gateway (§6).
        let base = base_url.as_str().trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(scaled(10.0, cfg.timeout_scale))
            .build()
            .map_err(|e| MarketoError::Configuration {
                code: "client".into(),
                message: crate::errors::chain(&e),
            })?;
        let tokens = TokenCache::new(
            http.clone(),
            &base,
            client_id,
            secret,
            scaled(30.0, cfg.timeout_scale),
        );
        let limiter = Arc::new(
            Limiter::new(
                cfg.calls_per_window,
                Duration::from_secs_f64(cfg.window_secs.max(0.001)),
                cfg.max_concurrent,
                cfg.daily_quota,
            )
            .with_backoff(
                Duration::from_millis(cfg.retry_base_delay_ms),
                Duration::from_millis(cfg.retry_max_delay_ms),
            ),
        );
        Ok(MarketoClient {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                base,
                http,
                tokens,
                limiter,
            }),
        })
    }

    pub async fn sync_companies(
        &self,
        records: Vec<Map<String, Value>>,
    ) -> Result<Vec<RecordResult>, MarketoError> {
        let records = records.into_iter().map(Value::Object).collect();
        self.write(Endpoint::SyncCompanies, upsert_prefix(), records, |r| {
            key_text(r, "externalCompanyId")
        })
        .await
    }

    pub async fn sync_opportunities(
        &self,
        records: Vec<Map<String, Value>>,
    ) -> Result<Vec<RecordResult>, MarketoError> {
        let records = records.into_iter().map(Value::Object).collect();
        self.write(Endpoint::SyncOpportunities, upsert_prefix(), records, |r| {
            key_text(r, "externalOpportunityId")
        })
        .await
    }

    pub async fn delete_opportunities(
        &self,
        external_ids: &[String],
    ) -> Result<Vec<RecordResult>, MarketoError> {
        let records = external_ids
            .iter()
            .map(|id| json!({ "externalOpportunityId": id }))
            .collect();
        self.write(Endpoint::DeleteOpportunities, delete_prefix(), records, |r| {
            key_text(r, "externalOpportunityId")
        })
        .await
    }

    pub async fn sync_roles(&self, roles: &[RoleRecord]) -> Result<Vec<RecordResult>, MarketoError> {
        let records = roles
            .iter()
            .map(|r| {
                json!({
                    "externalOpportunityId": r.external_opportunity_id,
                    "leadId": r.lead_id,
                    "role": r.role,
                    "isPrimary": r.is_primary,
                })
            })
            .collect();
        self.write(Endpoint::SyncRoles, upsert_prefix(), records, role_key)
            .await
    }

    pub async fn delete_roles(&self, roles: &[RoleRecord]) -> Result<Vec<RecordResult>, MarketoError> {
        let records = roles
            .iter()
            .map(|r| json!({ "externalOpportunityId": r.external_opportunity_id, "leadId": r.lead_id, "role": r.role }))
            .collect();
        self.write(Endpoint::DeleteRoles, delete_prefix(), records, role_key)
            .await
    }

    /// Upserts leads keyed by `lookup_field`. Lead results carry no `seq` (§2.2): they are
    /// matched by position.
    pub async fn sync_leads(
        &self,
        records: Vec<Map<String, Value>>,
        lookup_field: &str,
    ) -> Result<Vec<RecordResult>, MarketoError> {
        let prefix = format!(
            r#"{{"action":"createOrUpdate","lookupField":{},"input":["#,
            Value::String(lookup_field.to_owned())
        );
        let records = records.into_iter().map(Value::Object).collect();
        // Two records with the same lookup value in one call can create duplicate leads (§5.3).
        self.write(Endpoint::SyncLeads, prefix, records, |r| {
            key_text(r, lookup_field)
        })
        .await
    }

    /// Leads whose `filter_type` field equals one of `values`, with the requested `fields`.
    pub async fn find_leads(
        &self,
        filter_type: &str,
        values: &[String],
        fields: &[&str],
    ) -> Result<Vec<Lead>, MarketoError> {
        let mut unique: Vec<&String> = Vec::new();
        for v in values {
            if !v.is_empty() && !unique.contains(&v) {
                unique.push(v);
            }
        }
        let mut leads = Vec::new();
        for chunk in unique.chunks(self.inner.cfg.batch_size.clamp(1, 300)) {
            let filter_values = chunk.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
            let mut page_token: Option<String> = None;
            loop {
                let mut form = vec![
                    ("filterType".to_owned(), filter_type.to_owned()),
                    ("filterValues".to_owned(), filter_values.clone()),
                    ("batchSize".to_owned(), "300".to_owned()),
                ];
                if !fields.is_empty() {
                    form.push(("fields".to_owned(), fields.join(",")));
                }
                if let Some(t) = &page_token {
                    form.push(("nextPageToken".to_owned(), t.clone()));
                }
                let mut envelope = self.call(Endpoint::QueryLeads, &Payload::Form(form)).await?;
                for row in envelope.result() {
                    let Value::Object(mut row) = row else { continue };
                    let id = row
                        .remove("id")
                        .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()));
                    if let Some(id) = id {
                        leads.push(Lead { id, fields: row });
                    }
                }
                match (envelope.more_result, envelope.next_page_token.take()) {
                    (Some(true), Some(t)) if !t.is_empty() => page_token = Some(t),
                    _ => break,
                }
            }
        }
        Ok(leads)
    }

    /// Opportunities whose `externalOpportunityId` is one of `ids` (at most 300 a call), with
    /// `fields`: one call per 300 ids.
    pub async fn find_opportunities(
        &self,
        ids: &[String],
        fields: &[String],
    ) -> Result<Vec<Map<String, Value>>, MarketoError> {
        self.find(Endpoint::QueryOpportunities, ids, fields).await
    }

    /// Opportunity roles of the opportunities `ids` (externalOpportunityId), with leadId and role.
    /// Marketo answers at most 300 rows a call: ask for few opportunities at once.
    pub async fn find_roles(&self, ids: &[String]) -> Result<Vec<Map<String, Value>>, MarketoError> {
        let fields = ["externalOpportunityId", "leadId", "role"].map(str::to_owned);
        self.find(Endpoint::QueryRoles, ids, &fields).await
    }

    async fn find(
        &self,
        endpoint: Endpoint,
        ids: &[String],
        fields: &[String],
    ) -> Result<Vec<Map<String, Value>>, MarketoError> {
        let mut rows = Vec::new();
        for chunk in ids.chunks(self.inner.cfg.batch_size.clamp(1, 300)) {
            let mut form = vec![
                ("filterType".to_owned(), "externalOpportunityId".to_owned()),
                ("filterValues".to_owned(), chunk.join(",")),
            ];
            if !fields.is_empty() {
                form.push(("fields".to_owned(), fields.join(",")));
            }
            let mut envelope = self.call(endpoint, &Payload::Form(form)).await?;
            rows.extend(envelope.result().into_iter().filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            }));
        }
        Ok(rows)
    }

    /// Gets a token, then proves the instance accepts opportunity writes without changing
    /// data: an `updateOnly` of an id that cannot exist must come back skipped with 1013, not
    /// 1018 (native CRM sync on).
    pub async fn probe(&self) -> Result<ProbeReport, MarketoError> {
        self.inner.tokens.get().await?;
        let probe_id = format!("oppsync-probe-{}", uuid::Uuid::new_v4());
        let body = json!({
            "action": "updateOnly",
            "dedupeBy": "dedupeFields",
            "input": [ { "externalOpportunityId": probe_id } ],
        });
        let bytes = serde_json::to_vec(&body).map_err(internal)?;
        let mut envelope = self
            .call(Endpoint::SyncOpportunities, &Payload::Json(bytes))
            .await?;
        let outcome = envelope
            .result()
            .into_iter()
            .next()
            .and_then(|v| serde_json::from_value::<RecordOutcome>(v).ok());
        let Some(outcome) = outcome else {
            return Err(MarketoError::Rejected {
                code: "invalid_response".into(),
                message: "the probe write returned no result".into(),
            });
        };
        let reason = outcome.reasons.as_deref().and_then(|r| r.first()).cloned();
        match (outcome.status.as_deref(), reason) {
            (Some("skipped"), Some(r)) if r.code == "1013" => Ok(ProbeReport {
                token_ok: true,
                opportunity_writes_accepted: true,
                detail: "token issued; opportunity writes accepted (native CRM sync is off)".into(),
                usage: self.usage(),
            }),
            (Some("skipped"), Some(r)) if r.code == "1018" => Err(crm_enabled(&r.message)),
            (status, reason) => Err(MarketoError::Rejected {
                code: reason
                    .as_ref()
                    .map(|r| r.code.clone())
                    .unwrap_or_else(|| "unexpected".into()),
                message: format!(
                    "the probe write came back {} ({}); expected skipped 1013",
                    status.unwrap_or("without a status"),
                    reason.map(|r| r.message).unwrap_or_default()
                ),
            }),
        }
    }

    /// Calls that could start without waiting for a concurrency permit, and for the rate window
    /// at most `ahead`.
    pub fn free_calls(&self, ahead: Duration) -> usize {
        self.inner.limiter.free_calls(ahead)
    }

    /// When the rate window frees its next place, if it is full of finished calls.
    pub fn next_free_call_at(&self) -> Option<std::time::Instant> {
        self.inner.limiter.next_free_at()
    }

    /// The day's use of the quota, to keep in the store.
    pub fn quota_day(&self) -> QuotaDay {
        self.inner.limiter.quota_day()
    }

    /// Takes back the day's use kept by an earlier process.
    pub fn restore_quota_day(&self, kept: QuotaDay) {
        self.inner.limiter.restore_quota_day(kept);
    }

    pub fn usage(&self) -> Usage {
        let l = &self.inner.limiter;
        Usage {
            calls_today: l.used_today(),
            daily_quota: l.quota(),
            quota_left: l.quota_left(),
            limiter_waits: l.waits(),
            limiter_wait_seconds: l.wait_seconds(),
            token_refreshes: self.inner.tokens.refreshes(),
        }
    }

    /// Splits `records` into calls of at most `batch_size` records and less than
    /// `max_body_bytes`, deduplicating keys (Marketo answers 1036 to a key seen twice in one
    /// call; the last record wins), and returns one result per input record, in input order.
    async fn write(
        &self,
        endpoint: Endpoint,
        prefix: String,
        records: Vec<Value>,
        key_of: impl Fn(&Value) -> Option<String>,
    ) -> Result<Vec<RecordResult>, MarketoError> {
        let mut unique: Vec<Value> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut slot_of_input = Vec::with_capacity(records.len());
        for record in records {
            match key_of(&record) {
                Some(k) => match by_key.get(&k) {
                    Some(&slot) => {
                        unique[slot] = record;
                        slot_of_input.push(slot);
                    }
                    None => {
                        by_key.insert(k, unique.len());
                        slot_of_input.push(unique.len());
                        unique.push(record);
                    }
                },
                None => {
                    slot_of_input.push(unique.len());
                    unique.push(record);
                }
            }
        }

        let mut results: Vec<Option<RecordResult>> = vec![None; unique.len()];
        let suffix = "]}";
        let fixed = prefix.len() + suffix.len();
        let max_records = self.inner.cfg.batch_size.clamp(1, 300);
        let max_bytes = self.inner.cfg.max_body_bytes;
        let mut batches: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
        let mut current: (Vec<usize>, Vec<u8>) = (Vec::new(), prefix.clone().into_bytes());
        for (slot, record) in unique.iter().enumerate() {
            let bytes = serde_json::to_vec(record).map_err(internal)?;
            if fixed + bytes.len() >= max_bytes {
                results[slot] = Some(RecordResult::Failed {
                    code: "413".into(),
                    message: format!(
                        "record is {} bytes; a call may carry at most {max_bytes}",
                        bytes.len()
                    ),
                });
                continue;
            }
            let separator = usize::from(!current.0.is_empty());
            if !current.0.is_empty()
                && (current.0.len() >= max_records
                    || current.1.len() + separator + bytes.len() + suffix.len() >= max_bytes)
            {
                let full = std::mem::replace(&mut current, (Vec::new(), prefix.clone().into_bytes()));
                batches.push(full);
            }
            if !current.0.is_empty() {
                current.1.push(b',');
            }
            current.1.extend_from_slice(&bytes);
            current.0.push(slot);
        }
        if !current.0.is_empty() {
            batches.push(current);
        }

        let concurrency = self.inner.cfg.max_concurrent.max(1) as usize;
        let done: Vec<(Vec<usize>, Vec<RecordResult>)> =
            futures::stream::iter(batches.into_iter().map(|(slots, mut body)| async move {
                body.extend_from_slice(suffix.as_bytes());
                let mut envelope = self.call(endpoint, &Payload::Json(body)).await?;
                let outcomes = correlate(endpoint, slots.len(), envelope.result())?;
                Ok::<_, MarketoError>((slots, outcomes))
            }))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        for (slots, outcomes) in done {
            for (slot, outcome) in slots.into_iter().zip(outcomes) {
                results[slot] = Some(outcome);
            }
        }
        Ok(slot_of_input
            .into_iter()
            .map(|slot| {
                results[slot].clone().unwrap_or_else(|| RecordResult::Failed {
                    code: "no_result".into(),
                    message: "Marketo returned no result for this record".into(),
                })
            })
            .collect())
    }

    /// One logical call: token, limiter, HTTP, envelope; immediate retries with backoff for
    /// transient trouble, one token refresh on 601/602.
    async fn call(&self, endpoint: Endpoint, payload: &Payload) -> Result<Envelope, MarketoError> {
        let mut attempt: u32 = 0;
        let mut refreshed = false;
        let mut replaced: Option<AccessToken> = None;
        loop {
            // Fresh from the cache each attempt: a backoff may outlast the token.
            let token = match replaced.take() {
                Some(t) => Ok(t),
                None => self.inner.tokens.get().await,
            };
            // Identity trouble (network, 5xx) is retried like the call itself.
            let (token, exchange) = match token {
                Ok(token) => {
                    let _permit = self.inner.limiter.acquire().await?;
                    let exchange = self.exchange(endpoint, payload, &token).await;
                    (Some(token), exchange)
                }
                Err(e) if e.is_retryable() => (None, Exchange::Failed(e)),
                Err(e) => return Err(e),
            };
            let failure = match exchange {
                Exchange::Envelope(envelope) if envelope.success => {
                    self.inner.limiter.calm();
                    metrics::counter!("oppsync_marketo_calls_total", "endpoint" => endpoint.label(), "outcome" => "ok")
                        .increment(1);
                    return Ok(envelope);
                }
                Exchange::Envelope(envelope) => {
                    let first = envelope.errors().first().cloned();
                    let (code, message) = first
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("unknown".into(), "success:false without errors".into()));
                    tracing::debug!(
                        endpoint = endpoint.label(),
                        code = %code,
                        request_id = envelope.request_id.as_deref().unwrap_or(""),
                        "marketo call refused"
                    );
                    match classify(&code) {
                        CodeClass::Token if !refreshed && token.is_some() => {
                            // Retry once with a *new* token (§1.4; I5, I6).
                            refreshed = true;
                            count_call(endpoint, &code);
                            if let Some(rejected) = &token {
                                replaced = Some(self.inner.tokens.replace(rejected).await?);
                            }
                            continue;
                        }
                        CodeClass::Token | CodeClass::Retry => MarketoError::retryable(code, message),
                        CodeClass::Throttle => MarketoError::Throttled { code, message },
                        CodeClass::Quota => {
                            self.inner.limiter.mark_exhausted();
                            MarketoError::QuotaExhausted { message }
                        }
                        CodeClass::Configuration => MarketoError::Configuration { code, message },
                        CodeClass::Reject => MarketoError::Rejected { code, message },
                    }
                }
                Exchange::Failed(e) => e,
            };
            count_call(endpoint, failure.code());
            // A throttle answer pauses every caller (the limiter waits it out before the next
            // call, this one's retry included) and slows the pace.
            let pause = failure
                .is_throttled()
                .then(|| self.inner.limiter.throttled(failure.code()));
            if !failure.is_retryable() || attempt >= self.inner.cfg.max_retries {
                if failure.is_retryable() {
                    tracing::warn!(
                        endpoint = endpoint.label(),
                        code = failure.code(),
                        attempts = attempt + 1,
                        "marketo call gave up after retries"
                    );
                }
                return Err(failure);
            }
            let delay = match pause {
                Some(_) => Duration::ZERO,
                None => self.backoff(attempt),
            };
            tracing::debug!(
                endpoint = endpoint.label(),
                code = failure.code(),
                attempt,
                delay_ms = pause.unwrap_or(delay).as_millis() as u64,
                "retrying marketo call"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn exchange(&self, endpoint: Endpoint, payload: &Payload, token: &AccessToken) -> Exchange {
        let url = format!("{}{}", self.inner.base, endpoint.path());
        let request = self
            .inner
            .http
            .post(url)
            .bearer_auth(token.expose())
            .timeout(scaled(endpoint.timeout_secs(), self.inner.cfg.timeout_scale));
        let request = match payload {
            Payload::Json(bytes) => request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes.clone()),
            Payload::Form(form) => request.form(form),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Exchange::Failed(transport_error(e.without_url())),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return Exchange::Failed(transport_error(e.without_url())),
        };
        if !status.is_success() {
            let code = format!("http_{}", status.as_u16());
            let message = format!("Marketo answered HTTP {status}");
            return Exchange::Failed(match status.as_u16() {
                429 => MarketoError::Throttled { code, message },
                408 | 500..=599 => MarketoError::retryable(code, message),
                401 | 403 | 404 => MarketoError::Configuration { code, message },
                _ => MarketoError::Rejected { code, message },
            });
        }
        match serde_json::from_slice::<Envelope>(&body) {
            Ok(envelope) => Exchange::Envelope(envelope),
            // An HTML error page from a gateway at HTTP 200: transient more often than not.
            Err(e) => Exchange::Failed(MarketoError::retryable(
                "invalid_response",
                format!("Marketo answered with something that is not its JSON envelope: {e}"),
            )),
        }
    }

    /// How long to wait before retrying a failed call (`retry::backoff`). Throttle answers
    /// wait in the limiter instead, see `Limiter::throttled`.
    fn backoff(&self, attempt: u32) -> Duration {
        let cfg = &self.inner.cfg;
        crate::retry::backoff(
            attempt,
            Duration::from_millis(cfg.retry_base_delay_ms),
            Duration::from_millis(cfg.retry_max_delay_ms),
        )
    }
}

fn count_call(endpoint: Endpoint, code: &str) {
    metrics::counter!("oppsync_marketo_calls_total", "endpoint" => endpoint.label(), "outcome" => code.to_owned())
        .increment(1);
}

fn scaled(secs: f64, scale: f64) -> Duration {
    Duration::from_secs_f64((secs * scale).max(0.001))
}

fn internal(e: serde_json::Error) -> MarketoError {
    MarketoError::Rejected {
        code: "client".into(),
        message: e.to_string(),
    }
}

fn crm_enabled(message: &str) -> MarketoError {
    MarketoError::Configuration {
        code: "1018".into(),
        message: format!(
            "{message}: native CRM sync is enabled on this Marketo instance, so it refuses opportunity, role and company writes"
        ),
    }
}

// Creates are retried, so they must be idempotent: createOrUpdate on the dedupe key, never
// createOnly (§7).
fn upsert_prefix() -> String {
    r#"{"action":"createOrUpdate","dedupeBy":"dedupeFields","input":["#.to_owned()
}

fn delete_prefix() -> String {
    r#"{"deleteBy":"dedupeFields","input":["#.to_owned()
}

fn key_text(record: &Value, field: &str) -> Option<String> {
    match record.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn role_key(record: &Value) -> Option<String> {
    Some(format!(
        "{}\u{1f}{}\u{1f}{}",
        key_text(record, "externalOpportunityId")?,
        key_text(record, "leadId")?,
        key_text(record, "role")?
    ))
}

/// Matches a write's results to the batch: by `seq` where Marketo sends it, by position for
/// leads (§2.2). A per-record 1018 turns the whole call into a configuration error.
fn correlate(endpoint: Endpoint, len: usize, items: Vec<Value>) -> Result<Vec<RecordResult>, MarketoError> {
    let mut out: Vec<Option<RecordResult>> = vec![None; len];
    for (position, item) in items.into_iter().enumerate() {
        let Ok(outcome) = serde_json::from_value::<RecordOutcome>(item) else {
            continue;
        };
        let slot = match (endpoint, outcome.seq) {
            (Endpoint::SyncLeads, _) | (_, None) => position,
            (_, Some(seq)) => seq as usize,
        };
        if slot >= len {
            continue;
        }
        let result = match outcome.status.as_deref() {
            Some("created") => done(RecordStatus::Created, &outcome),
            Some("updated") => done(RecordStatus::Updated, &outcome),
            Some("deleted") => done(RecordStatus::Deleted, &outcome),
            Some("skipped") => {
                let reasons = outcome.reasons.clone().unwrap_or_default();
                let code = reasons
                    .first()
                    .map(|r| r.code.clone())
                    .unwrap_or_else(|| "skipped".into());
                let message = reasons
                    .iter()
                    .map(|r| r.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                if code == "1018" {
                    return Err(crm_enabled(&message));
                }
                if code == "1013" && endpoint.is_delete() {
                    // Already gone: the goal state holds.
                    done(RecordStatus::Unchanged, &outcome)
                } else {
                    RecordResult::Failed { code, message }
                }
            }
            other => RecordResult::Failed {
                code: "unexpected_status".into(),
                message: format!("Marketo answered status {:?}", other.unwrap_or("")),
            },
        };
        let label = match &result {
            RecordResult::Done { status, .. } => match status {
                RecordStatus::Created => "created",
                RecordStatus::Updated => "updated",
                RecordStatus::Deleted => "deleted",
                RecordStatus::Unchanged => "unchanged",
            },
            RecordResult::Failed { .. } => "failed",
        };
        metrics::counter!("oppsync_marketo_records_total", "endpoint" => endpoint.label(), "status" => label)
            .increment(1);
        out[slot] = Some(result);
    }
    Ok(out
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| RecordResult::Failed {
                code: "no_result".into(),
                message: "Marketo returned no result for this record".into(),
            })
        })
        .collect())
}

fn done(status: RecordStatus, outcome: &RecordOutcome) -> RecordResult {
    RecordResult::Done {
        status,
        id: outcome.id_text(),
    }
}
