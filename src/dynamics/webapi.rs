//! Dataverse Web API client (OAuth2 client credentials, contact/opportunity/connection-role reads,
//! and the few writes `oppsync register` needs).
//!
//! Reads return rows converted into the same [`AttributeValue`] vocabulary a webhook uses, so the
//! rules never see the Web API's shape (`_x_value` lookups, annotations, ISO dates).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, HeaderMap, IF_MATCH, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use url::Url;
use uuid::Uuid;

use crate::config::{DataverseConfig, Secret};
use crate::dynamics::{AttributeValue, Attributes, EntityRef, Version};
use crate::rules::{ACCOUNT_ATTRIBUTES, CONNECTION_ATTRIBUTES, CONTACT_ATTRIBUTES, LOOKUP_ATTRIBUTES};

mod paging;

pub use paging::{CHANGE_TRACKING_OFF_CODE, Change, CollectionQuery, MAX_PAGE_SIZE, Page, any_of};

const API_PATH: &str = "api/data/v9.2/";
const LOOKUP_ANNOTATION: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";
const NAVIGATION_ANNOTATION: &str = "@Microsoft.Dynamics.CRM.associatednavigationproperty";
const FORMATTED_ANNOTATION: &str = "@OData.Community.Display.V1.FormattedValue";

/// `$select` of the attributes the rules read of a table (lookups named `_x_value`), then
/// `extra`: what a read of the table returns follows the rules' own lists.
fn rule_columns(attributes: &[&str], extra: &[&str]) -> String {
    attributes
        .iter()
        .map(|a| {
            if LOOKUP_ATTRIBUTES.contains(a) {
                format!("_{a}_value")
            } else {
                (*a).to_owned()
            }
        })
        .chain(extra.iter().map(|e| (*e).to_owned()))
        .collect::<Vec<_>>()
        .join(",")
}

static CONTACT_COLUMNS: LazyLock<String> =
    LazyLock::new(|| rule_columns(CONTACT_ATTRIBUTES, &["fullname", "modifiedon"]));
static CONNECTION_COLUMNS: LazyLock<String> =
    LazyLock::new(|| rule_columns(CONNECTION_ATTRIBUTES, &["modifiedon"]));
static ACCOUNT_COLUMNS: LazyLock<String> =
    LazyLock::new(|| rule_columns(ACCOUNT_ATTRIBUTES, &["modifiedon"]));
const ROLE_COLUMNS: &str = "connectionroleid,name,category";

/// Opportunity columns that are lookups, so the Web API names them `_x_value` (spec §5, §7.1).
const OPPORTUNITY_LOOKUPS: &[&str] = &[
    "customerid",
    "parentaccountid",
    "parentcontactid",
    "ownerid",
    "transactioncurrencyid",
];

/// Why a Web API call failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum WebApiError {
    /// Network trouble, 5xx, or 429 that outlasted the Retry-After budget: try again later.
    #[error("Dataverse is unavailable for now: {0}")]
    Transient(String),
    /// The token was refused, or the application user may not read (401/403).
    #[error("Dataverse refused oppsync's credentials: {0}")]
    Auth(String),
    /// Any other 4xx, or an answer oppsync cannot understand.
    #[error("Dataverse rejected the request: {0}")]
    Rejected(String),
    #[error("Dataverse client configuration: {0}")]
    Config(String),
    /// A change-tracking read of a table that has change tracking off.
    #[error("change tracking is off for the Dataverse table {0}")]
    ChangeTrackingOff(String),
}

impl WebApiError {
    pub fn is_transient(&self) -> bool {
        matches!(self, WebApiError::Transient(_))
    }
}

/// A contact as the rules need it (spec §7.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactRecord {
    pub id: Uuid,
    pub full_name: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    /// `parentcustomerid`: an account or a contact, with its display name when Dataverse gave one.
    pub parent: Option<EntityRef>,
    pub modified_on: Version,
}

/// Any row, converted into webhook vocabulary (`_customerid_value` → `customerid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    pub id: Uuid,
    pub attributes: Attributes,
    pub modified_on: Version,
}

/// An account: its name is the Marketo company's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub id: Uuid,
    pub name: Option<String>,
    pub modified_on: Version,
}

/// The `WhoAmI` function's answer: who oppsync's application user is, and in which
/// organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WhoAmI {
    pub organization_id: Uuid,
    pub user_id: Uuid,
    pub business_unit_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRoleRecord {
    pub id: Uuid,
    pub name: String,
    pub category: i32,
}

/// Cheap to clone; every clone shares the token cache.
#[derive(Clone)]
pub struct DataverseClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// Org URL without a trailing slash (also the OAuth scope's stem, spec §7.3).
    org: String,
    api_base: Url,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    max_rate_limit_retries: u32,
    max_rate_limit_wait: Duration,
    /// Bounds the Web API calls in flight (Dataverse's service protection counts concurrent
    /// requests per user).
    permits: tokio::sync::Semaphore,
}

struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

/// A raw answer: 2xx or 404 (the caller decides what 404 means).
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl DataverseClient {
    pub fn new(cfg: &DataverseConfig) -> Result<Self, WebApiError> {
        let url = cfg
            .url
            .as_ref()
            .ok_or_else(|| WebApiError::Config("dataverse.url is required".into()))?;
        let client_id = cfg
            .client_id
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| WebApiError::Config("dataverse.client_id is required".into()))?;
        let client_secret = cfg
            .client_secret
            .clone()
            .ok_or_else(|| WebApiError::Config("dataverse.client_secret is required".into()))?;
        let token_url = cfg.effective_token_url().ok_or_else(|| {
            WebApiError::Config("dataverse.tenant_id or dataverse.token_url is required".into())
        })?;
        if cfg.request_timeout_secs == 0 {
            return Err(WebApiError::Config(
                "dataverse.request_timeout_secs must be at least 1".into(),
            ));
        }
        let org = url.as_str().trim_end_matches('/').to_owned();
        let api_base = Url::parse(&format!("{org}/{API_PATH}"))
            .map_err(|e| WebApiError::Config(format!("dataverse.url: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.request_timeout_secs.min(10)))
            .build()
            .map_err(|e| WebApiError::Config(format!("HTTP client: {e}")))?;
        Ok(DataverseClient {
            inner: Arc::new(Inner {
                http,
                org,
                api_base,
                token_url,
                client_id,
                client_secret,
                token: tokio::sync::Mutex::new(None),
                max_rate_limit_retries: cfg.max_rate_limit_retries,
                max_rate_limit_wait: Duration::from_secs(cfg.max_rate_limit_wait_secs),
                permits: tokio::sync::Semaphore::new(cfg.max_concurrent_requests.max(1) as usize),
            }),
        })
    }

    /// The org URL without a trailing slash.
    pub fn org_url(&self) -> &str {
        &self.inner.org
    }

    /// `GET contacts(id)`; `None` when the contact does not exist (spec §7.2).
    pub async fn contact(&self, id: Uuid) -> Result<Option<ContactRecord>, WebApiError> {
        let Some(body) = self
            .get_row(
                &format!("contacts({id})"),
                &[("$select", CONTACT_COLUMNS.as_str())],
            )
            .await?
        else {
            return Ok(None);
        };
        let fields = parse_object(&body)?;
        let text = |k: &str| -> Result<Option<String>, WebApiError> {
            match fields.get(k).map(|r| convert_value(r)).transpose()? {
                Some(AttributeValue::String(s)) => Ok(Some(s)),
                _ => Ok(None),
            }
        };
        let parent = match lookup(&fields, "_parentcustomerid_value")? {
            Some(AttributeValue::EntityReference(r)) => Some(r),
            _ => None,
        };
        Ok(Some(ContactRecord {
            id: row_id(&fields, "contactid", id)?,
            full_name: text("fullname")?,
            first_name: text("firstname")?,
            last_name: text("lastname")?,
            email: text("emailaddress1")?,
            parent,
            modified_on: modified_on(&fields)?,
        }))
    }

    /// `GET accounts(id)?$select=name,modifiedon`; `None` when the account does not exist.
    pub async fn account(&self, id: Uuid) -> Result<Option<AccountRecord>, WebApiError> {
        let Some(body) = self
            .get_row(
                &format!("accounts({id})"),
                &[("$select", ACCOUNT_COLUMNS.as_str())],
            )
            .await?
        else {
            return Ok(None);
        };
        let fields = parse_object(&body)?;
        let name = match fields.get("name").map(|r| convert_value(r)).transpose()? {
            Some(AttributeValue::String(s)) => Some(s),
            _ => None,
        };
        Ok(Some(AccountRecord {
            id: row_id(&fields, "accountid", id)?,
            name,
            modified_on: modified_on(&fields)?,
        }))
    }

    /// Whether the table `logical_name` has change tracking on (`ChangeTrackingEnabled` of its
    /// definition).
    pub async fn change_tracking_enabled(&self, logical_name: &str) -> Result<bool, WebApiError> {
        let path = format!("EntityDefinitions(LogicalName='{logical_name}')");
        let body = self
            .get_row(&path, &[("$select", "ChangeTrackingEnabled")])
            .await?
            .ok_or_else(|| WebApiError::Rejected(format!("no table {logical_name}")))?;
        let definition: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| WebApiError::Rejected(format!("{path}: unreadable: {e}")))?;
        definition
            .get("ChangeTrackingEnabled")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| WebApiError::Rejected(format!("{path}: no ChangeTrackingEnabled")))
    }

    /// Turns change tracking on for the table `logical_name`: its definition is read whole,
    /// changed and written back (the Web API updates definitions with PUT, not PATCH), with
    /// `MSCRM.MergeLabels: true` so that labels in other languages are kept, then published
    /// [I: as other definition changes are].
    pub async fn enable_change_tracking(&self, logical_name: &str) -> Result<(), WebApiError> {
        let path = format!("EntityDefinitions(LogicalName='{logical_name}')");
        let body = self
            .get_row(&path, &[])
            .await?
            .ok_or_else(|| WebApiError::Rejected(format!("no table {logical_name}")))?;
        let mut definition: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| WebApiError::Rejected(format!("{path}: unreadable: {e}")))?;
        let Some(fields) = definition.as_object_mut() else {
            return Err(WebApiError::Rejected(format!("{path}: not an object")));
        };
        fields.retain(|k, _| !k.starts_with("@odata."));
        fields.insert("ChangeTrackingEnabled".into(), serde_json::Value::Bool(true));
        let url = self.api_url(&path, &[])?;
        self.execute_with(
            Method::PUT,
            url,
            Some(&definition),
            false,
            None,
            &[("MSCRM.MergeLabels", "true")],
        )
        .await?;
        let publish = serde_json::json!({
            "ParameterXml": format!(
                "<importexportxml><entities><entity>{logical_name}</entity></entities></importexportxml>"
            )
        });
        let url = self.api_url("PublishXml", &[])?;
        self.execute(Method::POST, url, Some(&publish), false).await?;
        Ok(())
    }

    /// `GET WhoAmI()`: the organisation (and user) oppsync's credentials belong to.
    pub async fn who_am_i(&self) -> Result<WhoAmI, WebApiError> {
        let url = self.api_url("WhoAmI", &[])?;
        let reply = self.execute(Method::GET, url, None, false).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(WebApiError::Rejected(format!(
                "WhoAmI: not found: {}",
                odata_error(&reply.body)
            )));
        }
        serde_json::from_str(&reply.body)
            .map_err(|e| WebApiError::Rejected(format!("WhoAmI: unreadable answer: {e}")))
    }

    /// `GET opportunities(id)` with the given logical columns (lookups are translated to their
    /// `_x_value` form), plus `customerid` and `modifiedon`.
    pub async fn opportunity(&self, id: Uuid, columns: &[String]) -> Result<Option<RowRecord>, WebApiError> {
        let select = opportunity_select(columns);
        self.row(&format!("opportunities({id})"), &select, "opportunityid", id)
            .await
    }

    /// `GET connections(id)`: both sides, both roles, statecode (spec §6.1).
    pub async fn connection(&self, id: Uuid) -> Result<Option<RowRecord>, WebApiError> {
        self.row(
            &format!("connections({id})"),
            &CONNECTION_COLUMNS,
            "connectionid",
            id,
        )
        .await
    }

    pub async fn connection_role(&self, id: Uuid) -> Result<Option<ConnectionRoleRecord>, WebApiError> {
        let Some(body) = self
            .get_row(&format!("connectionroles({id})"), &[("$select", ROLE_COLUMNS)])
            .await?
        else {
            return Ok(None);
        };
        role_record(&parse_object(&body)?).map(Some)
    }

    /// Every role of one category (1000 Stakeholder, spec §6.3). Follows `@odata.nextLink`.
    pub async fn connection_roles_by_category(
        &self,
        category: i32,
    ) -> Result<Vec<ConnectionRoleRecord>, WebApiError> {
        let filter = format!("category eq {category}");
        let rows = self
            .query_raw(
                "connectionroles",
                &[("$select", ROLE_COLUMNS), ("$filter", &filter)],
            )
            .await?;
        let mut roles = Vec::with_capacity(rows.len());
        for row in rows {
            let fields = parse_object(row.get())?;
            roles.push(role_record(&fields)?);
        }
        Ok(roles)
    }

    /// `GET {entity_set}?$select=…&$filter=…` as plain JSON objects (registration tables, where
    /// exact decimals do not matter).
    pub async fn query_rows(
        &self,
        entity_set: &str,
        select: &str,
        filter: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, WebApiError> {
        let rows = self
            .query_raw(entity_set, &[("$select", select), ("$filter", filter)])
            .await?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(r.get())
                    .map_err(|e| WebApiError::Rejected(format!("{entity_set}: row is not an object: {e}")))
            })
            .collect()
    }

    /// `POST {entity_set}`; returns the new row's id from the `OData-EntityId` header.
    pub async fn create_row(&self, entity_set: &str, body: &serde_json::Value) -> Result<Uuid, WebApiError> {
        let url = self.api_url(entity_set, &[])?;
        let reply = self.execute(Method::POST, url, Some(body), false).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(WebApiError::Rejected(format!(
                "POST {entity_set}: not found: {}",
                odata_error(&reply.body)
            )));
        }
        let entity_id = reply
            .headers
            .get("OData-EntityId")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| WebApiError::Rejected(format!("POST {entity_set}: no OData-EntityId header")))?;
        id_from_entity_url(entity_id).ok_or_else(|| {
            WebApiError::Rejected(format!(
                "POST {entity_set}: unreadable OData-EntityId {entity_id:?}"
            ))
        })
    }

    /// `PATCH {entity_set}(id)` with `If-Match: *`, so a missing row is an error rather than an
    /// upsert.
    pub async fn update_row(
        &self,
        entity_set: &str,
        id: Uuid,
        body: &serde_json::Value,
    ) -> Result<(), WebApiError> {
        let url = self.api_url(&format!("{entity_set}({id})"), &[])?;
        let reply = self.execute(Method::PATCH, url, Some(body), true).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(WebApiError::Rejected(format!(
                "PATCH {entity_set}({id}): not found: {}",
                odata_error(&reply.body)
            )));
        }
        Ok(())
    }

    async fn row(
        &self,
        path: &str,
        select: &str,
        primary_key: &str,
        id: Uuid,
    ) -> Result<Option<RowRecord>, WebApiError> {
        let Some(body) = self.get_row(path, &[("$select", select)]).await? else {
            return Ok(None);
        };
        let fields = parse_object(&body)?;
        Ok(Some(RowRecord {
            id: row_id(&fields, primary_key, id)?,
            attributes: convert_row(&fields)?,
            modified_on: modified_on(&fields)?,
        }))
    }

    async fn get_row(&self, path: &str, query: &[(&str, &str)]) -> Result<Option<String>, WebApiError> {
        let url = self.api_url(path, query)?;
        let reply = self.execute(Method::GET, url, None, false).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(reply.body))
    }

    /// A collection query, following server-driven paging.
    async fn query_raw(
        &self,
        entity_set: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<Box<RawValue>>, WebApiError> {
        #[derive(Deserialize)]
        struct Page {
            value: Vec<Box<RawValue>>,
            #[serde(rename = "@odata.nextLink")]
            next_link: Option<String>,
        }
        let mut url = self.api_url(entity_set, query)?;
        let mut rows = Vec::new();
        // A bound on pages guards against a server that keeps handing out the same link.
        for _ in 0..1000 {
            let reply = self.execute(Method::GET, url.clone(), None, false).await?;
            if reply.status == StatusCode::NOT_FOUND {
                return Err(WebApiError::Rejected(format!(
                    "{entity_set}: not found: {}",
                    odata_error(&reply.body)
                )));
            }
            let page: Page = serde_json::from_str(&reply.body)
                .map_err(|e| WebApiError::Rejected(format!("{entity_set}: unreadable collection: {e}")))?;
            rows.extend(page.value);
            match page.next_link {
                Some(next) => {
                    url = Url::parse(&next).map_err(|e| {
                        WebApiError::Rejected(format!("{entity_set}: bad @odata.nextLink: {e}"))
                    })?;
                }
                None => return Ok(rows),
            }
        }
        Err(WebApiError::Rejected(format!("{entity_set}: too many pages")))
    }

    fn api_url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, WebApiError> {
        let mut url = self
            .inner
            .api_base
            .join(path)
            .map_err(|e| WebApiError::Config(format!("bad Web API path {path:?}: {e}")))?;
        if !query.is_empty() {
            let q = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode_component(v)))
                .collect::<Vec<_>>()
                .join("&");
            url.set_query(Some(&q));
        }
        Ok(url)
    }

    /// One Web API call: bearer token, OData headers, 429 honoured within the budget, one token
    /// refresh on 401. Returns 2xx and 404; every other status is an error.
    async fn execute(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        if_match: bool,
    ) -> Result<Reply, WebApiError> {
        self.execute_with(method, url, body, if_match, None, &[]).await
    }

    /// [`Self::execute`] with a `Prefer` header of the caller's (paging, change tracking) in
    /// place of the default one. At most `dataverse.max_concurrent_requests` calls are in
    /// flight; a 429's wait is spent without holding a place.
    async fn execute_with(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        if_match: bool,
        prefer: Option<&str>,
        extra_headers: &[(&str, &str)],
    ) -> Result<Reply, WebApiError> {
        let what = format!("{method} {}", url.path());
        let mut rate_limited = 0u32;
        let mut waited = Duration::ZERO;
        let mut refreshed = false;
        loop {
            let token = self.bearer().await?;
            let permit = self
                .inner
                .permits
                .acquire()
                .await
                .map_err(|e| WebApiError::Transient(format!("{what}: {e}")))?;
            let mut req = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.expose())
                .header(ACCEPT, "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .header("Prefer", prefer.unwrap_or("odata.include-annotations=\"*\""));
            if let Some(b) = body {
                req = req.json(b);
            }
            if if_match {
                req = req.header(IF_MATCH, "*");
            }
            for (name, value) in extra_headers {
                req = req.header(*name, *value);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| WebApiError::Transient(format!("{what}: {e}")))?;
            let status = resp.status();
            metrics::counter!("oppsync_dataverse_requests_total", "status" => status.as_u16().to_string())
                .increment(1);
            if status == StatusCode::TOO_MANY_REQUESTS {
                drop(permit);
                // Service protection limits (spec §7.3): wait as told, within a budget, then
                // hand the work back to the worker as transient.
                let wait = retry_after(resp.headers())
                    .unwrap_or_else(|| Duration::from_secs(1u64 << rate_limited.min(5)));
                if rate_limited >= self.inner.max_rate_limit_retries
                    || waited + wait > self.inner.max_rate_limit_wait
                {
                    return Err(WebApiError::Transient(format!(
                        "{what}: rate limited (429) after {rate_limited} retries"
                    )));
                }
                rate_limited += 1;
                waited += wait;
                tracing::warn!(call = %what, wait_secs = wait.as_secs_f64(), "Dataverse answered 429; waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                drop(permit);
                // The token may have been revoked or expired early: fetch a new one once.
                refreshed = true;
                self.forget_token(&token).await;
                continue;
            }
            let headers = resp.headers().clone();
            let text = resp
                .text()
                .await
                .map_err(|e| WebApiError::Transient(format!("{what}: reading the answer: {e}")))?;
            drop(permit);
            tracing::debug!(call = %what, status = status.as_u16(), "Dataverse call");
            return match status {
                s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(Reply {
                    status,
                    headers,
                    body: text,
                }),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(WebApiError::Auth(format!(
                    "{what}: HTTP {}: {}",
                    status.as_u16(),
                    odata_error(&text)
                ))),
                s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => Err(WebApiError::Transient(
                    format!("{what}: HTTP {}: {}", status.as_u16(), odata_error(&text)),
                )),
                _ => Err(WebApiError::Rejected(format!(
                    "{what}: HTTP {}: {}",
                    status.as_u16(),
                    odata_error(&text)
                ))),
            };
        }
    }

    /// The cached token, or a new one. The lock is held while fetching, so concurrent callers
    /// share one refresh.
    async fn bearer(&self) -> Result<Secret, WebApiError> {
        let mut cached = self.inner.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    async fn forget_token(&self, used: &Secret) {
        let mut cached = self.inner.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.value.expose() == used.expose()) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<CachedToken, WebApiError> {
        let scope = format!("{}/.default", self.inner.org);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.inner.client_id.as_str()),
            ("client_secret", self.inner.client_secret.expose()),
            ("scope", scope.as_str()),
        ];
        let resp = self
            .inner
            .http
            .post(self.inner.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| WebApiError::Transient(format!("token request: {}", e.without_url())))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| WebApiError::Transient(format!("token answer: {}", e.without_url())))?;
        if !status.is_success() {
            // AADSTS answers carry `error` and `error_description`, never the secret.
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .map(|v| {
                    let code = v.get("error").and_then(|e| e.as_str()).unwrap_or("");
                    let desc = v.get("error_description").and_then(|e| e.as_str()).unwrap_or("");
                    format!("{code} {desc}").trim().to_owned()
                })
                .unwrap_or_default();
            let msg = format!("token endpoint answered HTTP {}: {detail}", status.as_u16());
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    WebApiError::Transient(msg)
                } else {
                    WebApiError::Auth(msg)
                },
            );
        }
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| WebApiError::Auth(format!("token answer is not JSON: {e}")))?;
        let token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| WebApiError::Auth("token answer has no access_token".into()))?;
        // v2.0 sends a number, the legacy v1 endpoint a string.
        let expires_in = match v.get("expires_in") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(300);
        // Refresh two minutes early, or half-way through a short lifetime.
        let lifetime = expires_in.saturating_sub(120).max(expires_in / 2);
        tracing::debug!(expires_in, "obtained a Dataverse token");
        Ok(CachedToken {
            value: Secret::new(token),
            refresh_at: Instant::now() + Duration::from_secs(lifetime),
        })
    }
}

/// Maps logical column names to Web API names (lookups become `_x_value`) and adds the columns
/// every read needs.
fn opportunity_select(columns: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut push = |c: String| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for c in columns {
        let c = c.trim();
        if c.is_empty() {
            continue;
        }
        if OPPORTUNITY_LOOKUPS.contains(&c) {
            push(format!("_{c}_value"));
        } else {
            push(c.to_owned());
        }
    }
    push("_customerid_value".into());
    push("modifiedon".into());
    push("opportunityid".into());
    out.join(",")
}

/// Percent-encodes a query value, keeping the characters OData queries are written with.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~$,()'*:@/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `Retry-After` in seconds (Dataverse sends seconds; an HTTP date is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// The message of an OData error body, or a short excerpt of whatever came.
fn odata_error(body: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
        let code = err.get("code").and_then(|c| c.as_str()).unwrap_or("");
        let message = err.get("message").and_then(|c| c.as_str()).unwrap_or("");
        return format!("{code} {message}").trim().to_owned();
    }
    body.chars().take(200).collect()
}

/// `https://org/api/data/v9.2/serviceendpoints(guid)` → guid.
fn id_from_entity_url(url: &str) -> Option<Uuid> {
    let open = url.rfind('(')?;
    let close = url[open..].find(')')? + open;
    Uuid::parse_str(&url[open + 1..close]).ok()
}

type RawFields<'a> = BTreeMap<String, &'a RawValue>;

fn parse_object(body: &str) -> Result<RawFields<'_>, WebApiError> {
    serde_json::from_str(body)
        .map_err(|e| WebApiError::Rejected(format!("Web API answer is not a JSON object: {e}")))
}

fn row_id(fields: &RawFields<'_>, key: &str, requested: Uuid) -> Result<Uuid, WebApiError> {
    match fields.get(key).map(|r| convert_value(r)).transpose()? {
        Some(AttributeValue::String(s)) => {
            Uuid::parse_str(&s).map_err(|e| WebApiError::Rejected(format!("{key} {s:?} is not a Guid: {e}")))
        }
        _ => Ok(requested),
    }
}

fn modified_on(fields: &RawFields<'_>) -> Result<Version, WebApiError> {
    match fields.get("modifiedon").map(|r| convert_value(r)).transpose()? {
        Some(AttributeValue::DateTime(t)) => Ok(epoch_ms(t)),
        _ => Ok(0),
    }
}

fn epoch_ms(t: OffsetDateTime) -> Version {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn role_record(fields: &RawFields<'_>) -> Result<ConnectionRoleRecord, WebApiError> {
    let id = match fields
        .get("connectionroleid")
        .map(|r| convert_value(r))
        .transpose()?
    {
        Some(AttributeValue::String(s)) => Uuid::parse_str(&s).ok(),
        _ => None,
    }
    .ok_or_else(|| WebApiError::Rejected("connection role without connectionroleid".into()))?;
    let name = match fields.get("name").map(|r| convert_value(r)).transpose()? {
        Some(AttributeValue::String(s)) => s,
        _ => String::new(),
    };
    let category = match fields.get("category").map(|r| convert_value(r)).transpose()? {
        Some(v) => v.as_option_value(),
        None => None,
    }
    .ok_or_else(|| WebApiError::Rejected(format!("connection role {id} without a category")))?;
    Ok(ConnectionRoleRecord { id, name, category })
}

/// A whole row: annotations folded into their lookups, `@odata.*` dropped.
fn convert_row(fields: &RawFields<'_>) -> Result<Attributes, WebApiError> {
    let mut out = Attributes::new();
    for (key, raw) in fields {
        if key.contains('@') {
            continue;
        }
        if let Some(logical) = key
            .strip_prefix('_')
            .and_then(|k| k.strip_suffix("_value"))
            .filter(|k| !k.is_empty())
        {
            if let Some(v) = lookup(fields, key)? {
                out.insert(logical.to_owned(), v);
            }
            continue;
        }
        out.insert(key.clone(), convert_value(raw)?);
    }
    Ok(out)
}

/// `_x_value` with its annotations → `EntityReference` (or `Null`). Without a
/// lookuplogicalname annotation the table is taken from the navigation property
/// (`parentcustomerid_account`); failing that the Guid is kept as a plain string.
fn lookup(fields: &RawFields<'_>, key: &str) -> Result<Option<AttributeValue>, WebApiError> {
    let Some(raw) = fields.get(key) else {
        return Ok(None);
    };
    let id = match convert_value(raw)? {
        AttributeValue::String(s) => s,
        AttributeValue::Null => return Ok(Some(AttributeValue::Null)),
        other => return Ok(Some(other)),
    };
    let annotation = |suffix: &str| -> Option<String> {
        let raw = fields.get(&format!("{key}{suffix}"))?;
        serde_json::from_str::<String>(raw.get()).ok()
    };
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return Ok(Some(AttributeValue::String(id)));
    };
    let logical_name = annotation(LOOKUP_ANNOTATION).or_else(|| {
        annotation(NAVIGATION_ANNOTATION)
            .and_then(|nav| nav.rsplit_once('_').map(|(_, table)| table.to_owned()))
    });
    Ok(Some(match logical_name {
        Some(logical_name) => AttributeValue::EntityReference(EntityRef {
            logical_name,
            id: uuid,
            name: annotation(FORMATTED_ANNOTATION),
        }),
        None => AttributeValue::String(id),
    }))
}

/// One Web API value, parsed from its raw text so numbers stay exact.
fn convert_value(raw: &RawValue) -> Result<AttributeValue, WebApiError> {
    let text = raw.get().trim();
    let bad = |e: String| WebApiError::Rejected(format!("unreadable Web API value {text:?}: {e}"));
    match text.as_bytes().first() {
        Some(b'n') => Ok(AttributeValue::Null),
        Some(b't') => Ok(AttributeValue::Bool(true)),
        Some(b'f') => Ok(AttributeValue::Bool(false)),
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
            Ok(match parse_iso_date(&s) {
                Some(t) => AttributeValue::DateTime(t),
                None => AttributeValue::String(s),
            })
        }
        Some(b'-' | b'0'..=b'9') => {
            if !text.contains(['.', 'e', 'E'])
                && let Ok(i) = text.parse::<i64>()
            {
                return Ok(AttributeValue::Int(i));
            }
            Decimal::from_str_exact(text)
                .or_else(|_| Decimal::from_scientific(text))
                .or_else(|_| Decimal::from_str(text))
                .map(AttributeValue::Decimal)
                .map_err(|e| bad(e.to_string()))
        }
        _ => serde_json::from_str(text)
            .map(AttributeValue::Other)
            .map_err(|e| bad(e.to_string())),
    }
}

/// ISO 8601 as the Web API writes it: a full timestamp, or a date only (DateOnly columns),
/// taken as midnight UTC.
fn parse_iso_date(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    let looks_like_date =
        b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-';
    if !looks_like_date {
        return None;
    }
    if b.len() == 10 {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        return time::Date::parse(s, format)
            .ok()
            .map(|d| d.midnight().assume_utc());
    }
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sim::dataverse::{self, ConnectionFixture, ContactFixture, DataverseSim};
    use time::macros::datetime;

    fn client(sim: &dataverse::DataverseSimHandle) -> DataverseClient {
        DataverseClient::new(&sim.config()).unwrap()
    }

    fn account(name: &str) -> EntityRef {
        EntityRef {
            logical_name: "account".into(),
            id: Uuid::new_v4(),
            name: Some(name.into()),
        }
    }

    #[test]
    fn opportunity_columns_become_web_api_names() {
        let cols = [
            "name",
            "customerid",
            "estimatedvalue",
            "_ownerid_value",
            "ownerid",
        ]
        .map(String::from);
        assert_eq!(
            opportunity_select(&cols),
            "name,_customerid_value,estimatedvalue,_ownerid_value,modifiedon,opportunityid"
        );
    }

    #[test]
    fn numbers_are_parsed_exactly() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(
            convert_value(&raw("12345678901234.123456789")).unwrap(),
            AttributeValue::Decimal(Decimal::from_str("12345678901234.123456789").unwrap())
        );
        assert_eq!(
            convert_value(&raw("1.5e3")).unwrap(),
            AttributeValue::Decimal(Decimal::from(1500))
        );
        assert_eq!(convert_value(&raw("-7")).unwrap(), AttributeValue::Int(-7));
        assert_eq!(
            convert_value(&raw("\"2025-03-31\"")).unwrap(),
            AttributeValue::DateTime(datetime!(2025-03-31 0:00 UTC))
        );
        assert_eq!(
            convert_value(&raw("\"2025 plans\"")).unwrap(),
            AttributeValue::String("2025 plans".into())
        );
    }

    #[tokio::test]
    async fn two_reads_share_one_token() {
        let sim = DataverseSim::start().await.unwrap();
        let c = client(&sim);
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        assert_eq!(sim.token_issued_count(), 1);
        assert_eq!(sim.call_count("contacts("), 2);
    }

    #[tokio::test]
    async fn a_token_near_its_expiry_is_replaced() {
        let sim = DataverseSim::start().await.unwrap();
        sim.set_token_lifetime(1);
        let c = client(&sim);
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        assert_eq!(sim.token_issued_count(), 2);
    }

    #[tokio::test]
    async fn concurrent_first_reads_fetch_one_token() {
        let sim = DataverseSim::start().await.unwrap();
        let c = client(&sim);
        let reads = (0..8).map(|_| {
            let c = c.clone();
            async move { c.contact(Uuid::new_v4()).await }
        });
        for r in futures::future::join_all(reads).await {
            assert!(r.unwrap().is_none());
        }
        assert_eq!(sim.token_issued_count(), 1);
    }

    #[tokio::test]
    async fn contact_with_parent_account_carries_its_name() {
        let sim = DataverseSim::start().await.unwrap();
        let id = Uuid::new_v4();
        let parent = account("Contoso Ltd");
        sim.put_contact(ContactFixture {
            id,
            first_name: Some("James".into()),
            last_name: Some("Glynn".into()),
            full_name: Some("James Glynn".into()),
            email: Some("james@contoso.com".into()),
            parent: Some(parent.clone()),
            modified_on: datetime!(2025-01-15 12:00 UTC),
        });
        let got = client(&sim).contact(id).await.unwrap().unwrap();
        assert_eq!(
            got,
            ContactRecord {
                id,
                full_name: Some("James Glynn".into()),
                first_name: Some("James".into()),
                last_name: Some("Glynn".into()),
                email: Some("james@contoso.com".into()),
                parent: Some(parent),
                modified_on: 1_736_942_400_000,
            }
        );
        let call = sim
            .calls()
            .into_iter()
            .find(|c| c.path.contains("contacts("))
            .unwrap();
        assert_eq!(
            call.query.get("$select").map(String::as_str),
            Some(CONTACT_COLUMNS.as_str())
        );
        assert_eq!(call.prefer.as_deref(), Some("odata.include-annotations=\"*\""));
    }

    #[tokio::test]
    async fn contact_whose_parent_is_a_contact() {
        let sim = DataverseSim::start().await.unwrap();
        let id = Uuid::new_v4();
        let parent = EntityRef {
            logical_name: "contact".into(),
            id: Uuid::new_v4(),
            name: Some("Parent Person".into()),
        };
        sim.put_contact(ContactFixture {
            parent: Some(parent.clone()),
            ..ContactFixture::new(id, "Kid", "Person", "kid@example.com")
        });
        let got = client(&sim).contact(id).await.unwrap().unwrap();
        assert_eq!(got.parent, Some(parent));
        assert_eq!(got.email.as_deref(), Some("kid@example.com"));
    }

    #[tokio::test]
    async fn contact_without_parent_and_removed_contact() {
        let sim = DataverseSim::start().await.unwrap();
        let id = Uuid::new_v4();
        sim.put_contact(ContactFixture::new(id, "Solo", "Person", "solo@example.com"));
        let c = client(&sim);
        let got = c.contact(id).await.unwrap().unwrap();
        assert_eq!(got.parent, None);
        assert_eq!(got.full_name.as_deref(), Some("Solo Person"));
        sim.remove_contact(id);
        assert_eq!(c.contact(id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn opportunity_read_converts_to_webhook_vocabulary() {
        let sim = DataverseSim::start().await.unwrap();
        let id = Uuid::new_v4();
        let customer = EntityRef {
            logical_name: "contact".into(),
            id: Uuid::new_v4(),
            name: Some("James Glynn".into()),
        };
        let mut attrs = Attributes::new();
        attrs.insert("name".into(), AttributeValue::String("Big deal".into()));
        attrs.insert(
            "estimatedvalue".into(),
            AttributeValue::Money(Decimal::from_str("98765432109.1234").unwrap()),
        );
        attrs.insert("statecode".into(), AttributeValue::OptionSet(1));
        attrs.insert(
            "estimatedclosedate".into(),
            AttributeValue::DateTime(datetime!(2025-06-30 7:00 UTC)),
        );
        attrs.insert(
            "customerid".into(),
            AttributeValue::EntityReference(customer.clone()),
        );
        attrs.insert("description".into(), AttributeValue::Null);
        attrs.insert(
            "modifiedon".into(),
            AttributeValue::DateTime(datetime!(2025-02-01 10:00 UTC)),
        );
        sim.put_opportunity(id, attrs);
        let cols = [
            "name",
            "estimatedvalue",
            "statecode",
            "estimatedclosedate",
            "description",
        ]
        .map(String::from);
        let row = client(&sim).opportunity(id, &cols).await.unwrap().unwrap();
        let a = &row.attributes;
        assert_eq!(row.id, id);
        assert_eq!(a["customerid"], AttributeValue::EntityReference(customer));
        assert_eq!(
            a["estimatedvalue"],
            AttributeValue::Decimal(Decimal::from_str("98765432109.1234").unwrap())
        );
        assert_eq!(a["statecode"], AttributeValue::Int(1));
        assert_eq!(a["statecode"].as_option_value(), Some(1));
        assert_eq!(
            a["estimatedclosedate"],
            AttributeValue::DateTime(datetime!(2025-06-30 7:00 UTC))
        );
        assert_eq!(a["name"], AttributeValue::String("Big deal".into()));
        assert_eq!(a["description"], AttributeValue::Null);
        assert_eq!(a["opportunityid"], AttributeValue::String(id.to_string()));
        assert!(!a.keys().any(|k| k.contains('@') || k.starts_with('_')));
        assert_eq!(row.modified_on, 1_738_404_000_000);
        assert!(
            client(&sim)
                .opportunity(Uuid::new_v4(), &cols)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn connection_read_and_roles() {
        let sim = DataverseSim::start().await.unwrap();
        let id = Uuid::new_v4();
        let opp = EntityRef {
            logical_name: "opportunity".into(),
            id: Uuid::new_v4(),
            name: Some("Big deal".into()),
        };
        let contact = EntityRef {
            logical_name: "contact".into(),
            id: Uuid::new_v4(),
            name: Some("James Glynn".into()),
        };
        sim.put_connection(ConnectionFixture {
            id,
            record1: opp.clone(),
            record2: contact.clone(),
            record1_role: None,
            record2_role: Some(dataverse::ROLE_DECISION_MAKER),
            state: 0,
            modified_on: datetime!(2025-03-01 8:00 UTC),
        });
        let c = client(&sim);
        let row = c.connection(id).await.unwrap().unwrap();
        assert_eq!(row.attributes["record1id"], AttributeValue::EntityReference(opp));
        assert_eq!(
            row.attributes["record2id"],
            AttributeValue::EntityReference(contact)
        );
        assert_eq!(row.attributes["record1roleid"], AttributeValue::Null);
        let role = row.attributes["record2roleid"].as_entity_ref().unwrap();
        assert_eq!(role.id, dataverse::ROLE_DECISION_MAKER);
        assert_eq!(role.logical_name, "connectionrole");
        assert_eq!(role.name.as_deref(), Some("Decision Maker"));
        assert_eq!(row.attributes["statecode"], AttributeValue::Int(0));

        let one = c
            .connection_role(dataverse::ROLE_STAKEHOLDER)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.name, "Stakeholder");
        assert_eq!(one.category, 1000);
        assert!(c.connection_role(Uuid::new_v4()).await.unwrap().is_none());

        let mut stakeholders: Vec<String> = c
            .connection_roles_by_category(1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        stakeholders.sort();
        assert_eq!(
            stakeholders,
            [
                "Champion",
                "Decision Maker",
                "Economic Buyer",
                "End User",
                "Influencer",
                "Stakeholder",
                "Technical Buyer"
            ]
        );
        sim.put_connection_role(Uuid::new_v4(), "Sponsor", 1000);
        assert_eq!(c.connection_roles_by_category(1000).await.unwrap().len(), 8);
        assert_eq!(c.connection_roles_by_category(1001).await.unwrap().len(), 2);
        assert_eq!(c.connection_roles_by_category(4).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn rate_limit_is_honoured_then_succeeds() {
        let sim = DataverseSim::start().await.unwrap();
        sim.inject_429(2, 1);
        let started = Instant::now();
        assert!(client(&sim).contact(Uuid::new_v4()).await.unwrap().is_none());
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(sim.call_count("contacts("), 3);
    }

    #[tokio::test]
    async fn rate_limit_beyond_the_budget_is_transient() {
        let sim = DataverseSim::start().await.unwrap();
        sim.inject_429(100, 0);
        let err = client(&sim).contact(Uuid::new_v4()).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        // The first try plus the default five retries.
        assert_eq!(sim.call_count("contacts("), 6);

        let sim = DataverseSim::start().await.unwrap();
        sim.inject_429(1, 600);
        let started = Instant::now();
        let err = client(&sim).contact(Uuid::new_v4()).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a wait over budget is not slept"
        );
    }

    #[tokio::test]
    async fn server_errors_and_outages_are_transient() {
        let sim = DataverseSim::start().await.unwrap();
        sim.inject_5xx(1);
        let c = client(&sim);
        let err = c.contact(Uuid::new_v4()).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());

        let mut cfg = sim.config();
        sim.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        cfg.request_timeout_secs = 2;
        let err = DataverseClient::new(&cfg)
            .unwrap()
            .contact(Uuid::new_v4())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[tokio::test]
    async fn bad_credentials_are_an_auth_error() {
        let sim = DataverseSim::start().await.unwrap();
        let mut cfg = sim.config();
        cfg.client_secret = Some(Secret::new("wrong-secret"));
        let err = DataverseClient::new(&cfg)
            .unwrap()
            .contact(Uuid::new_v4())
            .await
            .unwrap_err();
        assert!(matches!(err, WebApiError::Auth(_)), "{err}");
        assert!(!err.to_string().contains("wrong-secret"));
        assert_eq!(sim.call_count("/api/"), 0);
    }

    #[tokio::test]
    async fn application_user_not_in_the_org_is_an_auth_error() {
        let sim = DataverseSim::start().await.unwrap();
        sim.set_not_member(true);
        let err = client(&sim).contact(Uuid::new_v4()).await.unwrap_err();
        assert!(
            matches!(err, WebApiError::Auth(ref m) if m.contains("0x80072560")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn revoked_token_is_replaced_once() {
        let sim = DataverseSim::start().await.unwrap();
        let c = client(&sim);
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        sim.revoke_tokens();
        assert!(c.contact(Uuid::new_v4()).await.unwrap().is_none());
        assert_eq!(sim.token_issued_count(), 2);
    }

    #[test]
    fn missing_configuration_is_reported() {
        let err = DataverseClient::new(&DataverseConfig::default()).err().unwrap();
        assert!(matches!(err, WebApiError::Config(_)));
    }
}
