//! Dataverse Web API simulator: an OAuth2 token endpoint and the `/api/data/v9.2/` tables
//! oppsync reads (contacts, opportunities, connections, connection roles) and `oppsync register`
//! writes (service endpoints, steps, images), answering in the real Web API shape with
//! annotations (spec §7.2). Every call is recorded; 429 and 5xx can be injected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use serde_json::Value;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use crate::config::{DataverseConfig, Secret};
use crate::dynamics::{AttributeValue, Attributes, EntityRef};

mod collection;

pub use collection::CHANGE_TRACKING_OFF_CODE;

pub const SIM_CLIENT_ID: &str = "oppsync-sim-client";
pub const SIM_CLIENT_SECRET: &str = "oppsync-sim-client-secret";
const TENANT: &str = "sim-tenant";
const API_PREFIX: &str = "/api/data/v9.2/";

// Built-in connection roles (spec §6.3). Real orgs have no fixed Guids; these are the sim's.
pub const ROLE_STAKEHOLDER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1000);
pub const ROLE_DECISION_MAKER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1001);
pub const ROLE_CHAMPION: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1002);
pub const ROLE_ECONOMIC_BUYER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1003);
pub const ROLE_INFLUENCER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1004);
pub const ROLE_TECHNICAL_BUYER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1005);
pub const ROLE_END_USER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_1006);
pub const ROLE_DELIVERY_PROFESSIONAL: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_2001);
pub const ROLE_ACCOUNT_MANAGER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_2002);
pub const ROLE_BUSINESS_PARTNER: Uuid = Uuid::from_u128(0x5a1e_0000_0000_4000_8000_0000_0000_0001);

pub const MESSAGE_CREATE: Uuid = Uuid::from_u128(0x5d3e_0000_0000_4000_8000_0000_0000_0001);
pub const MESSAGE_UPDATE: Uuid = Uuid::from_u128(0x5d3e_0000_0000_4000_8000_0000_0000_0002);
pub const MESSAGE_DELETE: Uuid = Uuid::from_u128(0x5d3e_0000_0000_4000_8000_0000_0000_0003);
pub const MESSAGE_WIN: Uuid = Uuid::from_u128(0x5d3e_0000_0000_4000_8000_0000_0000_0004);
pub const MESSAGE_LOSE: Uuid = Uuid::from_u128(0x5d3e_0000_0000_4000_8000_0000_0000_0005);

/// The organisation `WhoAmI` names unless changed: the one composed notifications carry.
pub const SIM_ORGANIZATION_ID: Uuid = crate::dynamics::compose::DEFAULT_ORGANIZATION_ID;
const SIM_USER_ID: Uuid = Uuid::from_u128(0x75c2dd85_e89e_e711_8122_000d3aa2331c);
const SIM_BUSINESS_UNIT_ID: Uuid = Uuid::from_u128(0xe2b9dd85_e89e_e711_8122_000d3aa2331c);

const SEED_ROLES: &[(Uuid, &str, i32)] = &[
    (ROLE_STAKEHOLDER, "Stakeholder", 1000),
    (ROLE_DECISION_MAKER, "Decision Maker", 1000),
    (ROLE_CHAMPION, "Champion", 1000),
    (ROLE_ECONOMIC_BUYER, "Economic Buyer", 1000),
    (ROLE_INFLUENCER, "Influencer", 1000),
    (ROLE_TECHNICAL_BUYER, "Technical Buyer", 1000),
    (ROLE_END_USER, "End User", 1000),
    (ROLE_DELIVERY_PROFESSIONAL, "Delivery Professional", 1001),
    (ROLE_ACCOUNT_MANAGER, "Account Manager", 1001),
    (ROLE_BUSINESS_PARTNER, "Business Partner", 1),
];

/// Entity set, primary key, logical name.
const SETS: &[(&str, &str, &str)] = &[
    ("accounts", "accountid", "account"),
    ("contacts", "contactid", "contact"),
    ("opportunities", "opportunityid", "opportunity"),
    ("connections", "connectionid", "connection"),
    ("connectionroles", "connectionroleid", "connectionrole"),
    ("serviceendpoints", "serviceendpointid", "serviceendpoint"),
    ("sdkmessages", "sdkmessageid", "sdkmessage"),
    ("sdkmessagefilters", "sdkmessagefilterid", "sdkmessagefilter"),
    (
        "sdkmessageprocessingsteps",
        "sdkmessageprocessingstepid",
        "sdkmessageprocessingstep",
    ),
    (
        "sdkmessageprocessingstepimages",
        "sdkmessageprocessingstepimageid",
        "sdkmessageprocessingstepimage",
    ),
];

/// Lookups a registration row cannot be created without.
const REQUIRED_LOOKUPS: &[(&str, &[&str])] = &[
    (
        "sdkmessageprocessingsteps",
        &[
            "_eventhandler_value",
            "_sdkmessageid_value",
            "_sdkmessagefilterid_value",
        ],
    ),
    (
        "sdkmessageprocessingstepimages",
        &["_sdkmessageprocessingstepid_value"],
    ),
];

/// Opportunity lookups whose nulls are written as `_x_value` (see `put_opportunity`).
const KNOWN_LOOKUPS: &[&str] = &[
    "customerid",
    "parentaccountid",
    "parentcontactid",
    "ownerid",
    "transactioncurrencyid",
];

const LOOKUP_ANNOTATION: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";
const NAVIGATION_ANNOTATION: &str = "@Microsoft.Dynamics.CRM.associatednavigationproperty";
const FORMATTED_ANNOTATION: &str = "@OData.Community.Display.V1.FormattedValue";

/// A contact row to seed.
#[derive(Debug, Clone)]
pub struct ContactFixture {
    pub id: Uuid,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub full_name: Option<String>,
    pub email: Option<String>,
    /// `parentcustomerid`: an account or a contact; its `name` becomes the FormattedValue.
    pub parent: Option<EntityRef>,
    pub modified_on: OffsetDateTime,
}

impl ContactFixture {
    /// A contact without a parent, modified now.
    pub fn new(id: Uuid, first: &str, last: &str, email: &str) -> Self {
        ContactFixture {
            id,
            first_name: Some(first.to_owned()),
            last_name: Some(last.to_owned()),
            full_name: Some(format!("{first} {last}")),
            email: Some(email.to_owned()),
            parent: None,
            modified_on: OffsetDateTime::now_utc(),
        }
    }
}

/// The account the sample webhooks in `tests/fixtures/dynamics/` name.
pub const SAMPLE_ACCOUNT: Uuid = Uuid::from_u128(0xb2c3d4e5_f6a7_8901_bcde_f12345678901);
/// The contact they name (potential customer and stakeholder).
pub const SAMPLE_CONTACT: Uuid = Uuid::from_u128(0x6d81597f_0f9f_e711_8122_000d3aa2331c);
/// The connection role of their stakeholder connections.
pub const SAMPLE_ROLE: Uuid = Uuid::from_u128(0x9a3e6c1b_2d4f_4a5e_8b7c_0d1e2f3a4b5c);

/// A connection row to seed (one direction; add the reciprocal row separately if wanted).
#[derive(Debug, Clone)]
pub struct ConnectionFixture {
    pub id: Uuid,
    pub record1: EntityRef,
    pub record2: EntityRef,
    pub record1_role: Option<Uuid>,
    pub record2_role: Option<Uuid>,
    /// 0 Active, 1 Inactive.
    pub state: i32,
    pub modified_on: OffsetDateTime,
}

/// One request the simulator answered.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    /// Decoded query parameters (`$select`, `$filter`).
    pub query: BTreeMap<String, String>,
    /// Request body of data calls (token requests are not kept: they carry the secret).
    pub body: Option<String>,
    pub prefer: Option<String>,
    pub status: u16,
}

/// Starts simulators; see [`DataverseSimHandle`].
pub struct DataverseSim;

impl DataverseSim {
    /// On `127.0.0.1`, a free port.
    pub async fn start() -> io::Result<DataverseSimHandle> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On a given address (`oppsync sim`).
    pub async fn start_on(addr: SocketAddr) -> io::Result<DataverseSimHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let org = format!("http://{addr}");
        let bad_url = |e: url::ParseError| io::Error::other(e.to_string());
        let url = Url::parse(&format!("{org}/")).map_err(bad_url)?;
        let token_url = Url::parse(&format!("{org}/{TENANT}/oauth2/v2.0/token")).map_err(bad_url)?;
        let state: Shared = Arc::new(Mutex::new(SimState::seeded(org)));
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/api/data/v9.2/{*rest}", any(data))
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "Dataverse simulator stopped");
            }
        });
        Ok(DataverseSimHandle {
            inner: Arc::new(HandleInner {
                url,
                token_url,
                state,
                shutdown,
            }),
        })
    }
}

/// Controls a running simulator. The server stops on [`shutdown`](Self::shutdown) or when the
/// last clone is dropped.
#[derive(Clone)]
pub struct DataverseSimHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    url: Url,
    token_url: Url,
    state: Shared,
    shutdown: CancellationToken,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl DataverseSimHandle {
    /// The org URL (`http://127.0.0.1:PORT/`).
    pub fn url(&self) -> Url {
        self.inner.url.clone()
    }

    pub fn token_url(&self) -> Url {
        self.inner.token_url.clone()
    }

    pub fn client_id(&self) -> &'static str {
        SIM_CLIENT_ID
    }

    pub fn client_secret(&self) -> Secret {
        Secret::new(SIM_CLIENT_SECRET)
    }

    /// A client configuration pointing at this simulator.
    pub fn config(&self) -> DataverseConfig {
        DataverseConfig {
            url: Some(self.url()),
            tenant_id: Some(TENANT.into()),
            client_id: Some(SIM_CLIENT_ID.into()),
            client_secret: Some(self.client_secret()),
            token_url: Some(self.token_url()),
            ..DataverseConfig::default()
        }
    }

    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        lock(&self.inner.state)
    }

    pub fn put_contact(&self, c: ContactFixture) {
        let mut f = Fields::new();
        f.insert("contactid".into(), json_str(&c.id.to_string()));
        f.insert("fullname".into(), opt_str(c.full_name.as_deref()));
        f.insert("firstname".into(), opt_str(c.first_name.as_deref()));
        f.insert("lastname".into(), opt_str(c.last_name.as_deref()));
        f.insert("emailaddress1".into(), opt_str(c.email.as_deref()));
        match &c.parent {
            Some(p) => put_lookup(&mut f, "parentcustomerid", p),
            None => {
                f.insert("_parentcustomerid_value".into(), Raw::null());
            }
        }
        f.insert("modifiedon".into(), json_date(c.modified_on));
        self.state().put("contacts", c.id, f);
    }

    pub fn remove_contact(&self, id: Uuid) {
        self.state().remove("contacts", id);
    }

    /// Seeds (or renames) an account.
    pub fn put_account(&self, id: Uuid, name: &str, modified_on: OffsetDateTime) {
        let mut f = Fields::new();
        f.insert("accountid".into(), json_str(&id.to_string()));
        f.insert("name".into(), json_str(name));
        f.insert("modifiedon".into(), json_date(modified_on));
        self.state().put("accounts", id, f);
    }

    /// The organisation `WhoAmI` answers (a sandbox copy has another).
    pub fn set_organization_id(&self, id: Uuid) {
        self.state().organization_id = id;
    }

    /// Seeds an opportunity from webhook-vocabulary attributes: lookups become `_x_value` with
    /// annotations, money and decimals exact numbers, option sets integers, dates ISO.
    /// `modifiedon` is taken from the attributes, else now.
    pub fn put_opportunity(&self, id: Uuid, attributes: Attributes) {
        let mut f = Fields::new();
        for (key, value) in &attributes {
            put_attribute(&mut f, key, value);
        }
        f.insert("opportunityid".into(), json_str(&id.to_string()));
        if !matches!(attributes.get("modifiedon"), Some(AttributeValue::DateTime(_))) {
            f.insert("modifiedon".into(), json_date(OffsetDateTime::now_utc()));
        }
        self.state().put("opportunities", id, f);
    }

    pub fn remove_opportunity(&self, id: Uuid) {
        self.state().remove("opportunities", id);
    }

    pub fn put_connection(&self, c: ConnectionFixture) {
        let mut state = self.state();
        let role = |id: Option<Uuid>| -> Option<EntityRef> {
            let id = id?;
            let name = state
                .tables
                .get("connectionroles")
                .and_then(|t| t.get(&id))
                .and_then(|r| r.fields.get("name"))
                .and_then(|n| serde_json::from_str::<String>(&n.0).ok());
            Some(EntityRef {
                logical_name: "connectionrole".into(),
                id,
                name,
            })
        };
        let (role1, role2) = (role(c.record1_role), role(c.record2_role));
        let mut f = Fields::new();
        f.insert("connectionid".into(), json_str(&c.id.to_string()));
        put_lookup(&mut f, "record1id", &c.record1);
        put_lookup(&mut f, "record2id", &c.record2);
        for (key, r) in [("record1roleid", role1), ("record2roleid", role2)] {
            match r {
                Some(r) => put_lookup(&mut f, key, &r),
                None => {
                    f.insert(format!("_{key}_value"), Raw::null());
                }
            }
        }
        f.insert("statecode".into(), Raw(c.state.to_string()));
        f.insert("statuscode".into(), Raw((c.state + 1).to_string()));
        f.insert("modifiedon".into(), json_date(c.modified_on));
        state.put("connections", c.id, f);
    }

    pub fn remove_connection(&self, id: Uuid) {
        self.state().remove("connections", id);
    }

    pub fn put_connection_role(&self, id: Uuid, name: &str, category: i32) {
        self.state().put_role(id, name, category);
    }

    /// Seeds the records the sample webhooks (`tests/fixtures/dynamics/`) name, so that posting
    /// them to a service pointed at this simulator syncs them: the account Contoso
    /// Pharmaceuticals, its contact James Glynn, and a stakeholder connection role.
    pub fn seed_sample_records(&self) {
        let now = OffsetDateTime::now_utc();
        self.put_account(SAMPLE_ACCOUNT, "Contoso Pharmaceuticals", now);
        let mut james = ContactFixture::new(SAMPLE_CONTACT, "James", "Glynn", "james.glynn@contoso.com");
        james.parent = Some(EntityRef {
            logical_name: "account".into(),
            id: SAMPLE_ACCOUNT,
            name: Some("Contoso Pharmaceuticals".into()),
        });
        self.put_contact(james);
        self.put_connection_role(SAMPLE_ROLE, "Technical Evaluator", 1000);
    }

    /// Turns change tracking on or off for an entity set (on for every table at start).
    pub fn set_change_tracking(&self, entity_set: &str, on: bool) {
        let mut s = self.state();
        if on {
            s.untracked.remove(entity_set);
        } else {
            s.untracked.insert(entity_set.to_owned());
        }
    }

    pub fn change_tracking(&self, entity_set: &str) -> bool {
        !self.state().untracked.contains(entity_set)
    }

    /// Every data call from now on takes `latency` before it is answered.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// The most data calls that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state().max_in_flight
    }

    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state().calls.clone()
    }

    /// Calls whose path starts with `prefix`, given either in full (`/api/data/v9.2/contacts(`)
    /// or after the API root (`contacts(`).
    pub fn call_count(&self, prefix: &str) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| {
                c.path.starts_with(prefix)
                    || c.path
                        .strip_prefix(API_PREFIX)
                        .is_some_and(|p| p.starts_with(prefix))
            })
            .count()
    }

    /// POST, PATCH and DELETE calls on the data API.
    pub fn write_count(&self) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| c.path.starts_with(API_PREFIX) && c.method != "GET")
            .count()
    }

    pub fn token_issued_count(&self) -> usize {
        self.state().tokens_issued
    }

    /// The next `n` data calls answer 429 with `Retry-After: retry_after_secs`.
    pub fn inject_429(&self, n: u32, retry_after_secs: u64) {
        let mut s = self.state();
        s.pending_429 = n;
        s.retry_after_secs = retry_after_secs;
    }

    /// The next `n` data calls answer 503.
    pub fn inject_5xx(&self, n: u32) {
        self.state().pending_5xx = n;
    }

    /// Data calls answer 403 `0x80072560` (the application user is not in the org, spec §7.3).
    pub fn set_not_member(&self, on: bool) {
        self.state().not_member = on;
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.state().token_lifetime_secs = secs;
    }

    /// Every issued token stops working (the next data call gets 401).
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    /// Every row of an entity set, as the Web API would return it without `$select`
    /// (write-only columns such as `authvalue` excluded).
    pub fn rows(&self, entity_set: &str) -> Vec<Value> {
        let s = self.state();
        let Some(table) = s.tables.get(entity_set) else {
            return Vec::new();
        };
        table
            .values()
            .filter_map(|r| serde_json::from_str(&render_fields(r, None, None)).ok())
            .collect()
    }

    pub fn row(&self, entity_set: &str, id: Uuid) -> Option<Value> {
        let s = self.state();
        let row = s.tables.get(entity_set)?.get(&id)?;
        serde_json::from_str(&render_fields(row, None, None)).ok()
    }

    /// The write-only `authvalue` last written to a service endpoint.
    pub fn authvalue(&self, endpoint_id: Uuid) -> Option<String> {
        self.state().secrets.get(&endpoint_id).cloned()
    }
}

type Shared = Arc<Mutex<SimState>>;

fn lock(s: &Shared) -> MutexGuard<'_, SimState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Valid JSON text, kept verbatim so numbers stay exact.
#[derive(Debug, Clone)]
struct Raw(String);

impl Raw {
    fn null() -> Raw {
        Raw("null".into())
    }

    fn value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

type Fields = BTreeMap<String, Raw>;

struct Row {
    fields: Fields,
    version: u64,
}

struct SimState {
    org: String,
    tables: BTreeMap<String, BTreeMap<Uuid, Row>>,
    /// Write-only `authvalue` per service endpoint.
    secrets: HashMap<Uuid, String>,
    tokens: HashMap<String, Instant>,
    tokens_issued: usize,
    token_lifetime_secs: u64,
    calls: Vec<RecordedCall>,
    pending_429: u32,
    retry_after_secs: u64,
    pending_5xx: u32,
    not_member: bool,
    next_version: u64,
    /// Deleted rows, for change tracking.
    deleted: Vec<collection::Deletion>,
    /// Entity sets with change tracking off.
    untracked: BTreeSet<String>,
    latency: Duration,
    in_flight: usize,
    max_in_flight: usize,
    /// Row ids by (entity set, column) and value, built on demand for `$filter`s that name
    /// many values of one column, with the change counter it was built at.
    index: HashMap<(String, String), ColumnIndex>,
    organization_id: Uuid,
}

/// Row ids by value of one column, and the change counter the index was built at.
type ColumnIndex = (u64, HashMap<String, Vec<Uuid>>);

impl SimState {
    fn seeded(org: String) -> SimState {
        let mut s = SimState {
            org,
            tables: BTreeMap::new(),
            secrets: HashMap::new(),
            tokens: HashMap::new(),
            tokens_issued: 0,
            token_lifetime_secs: 3599,
            calls: Vec::new(),
            pending_429: 0,
            retry_after_secs: 1,
            pending_5xx: 0,
            not_member: false,
            next_version: 1000,
            deleted: Vec::new(),
            untracked: BTreeSet::new(),
            latency: Duration::ZERO,
            in_flight: 0,
            max_in_flight: 0,
            index: HashMap::new(),
            organization_id: SIM_ORGANIZATION_ID,
        };
        for (id, name, category) in SEED_ROLES {
            s.put_role(*id, name, *category);
        }
        let messages = [
            (MESSAGE_CREATE, "Create"),
            (MESSAGE_UPDATE, "Update"),
            (MESSAGE_DELETE, "Delete"),
            (MESSAGE_WIN, "Win"),
            (MESSAGE_LOSE, "Lose"),
        ];
        for (mi, (message, name)) in messages.iter().enumerate() {
            let mut f = Fields::new();
            f.insert("sdkmessageid".into(), json_str(&message.to_string()));
            f.insert("name".into(), json_str(name));
            s.put("sdkmessages", *message, f);
            for (ei, entity) in ["opportunity", "connection", "contact", "account"]
                .iter()
                .enumerate()
            {
                let id = message_filter_id(mi, ei);
                let mut f = Fields::new();
                f.insert("sdkmessagefilterid".into(), json_str(&id.to_string()));
                put_lookup(
                    &mut f,
                    "sdkmessageid",
                    &EntityRef {
                        logical_name: "sdkmessage".into(),
                        id: *message,
                        name: Some((*name).into()),
                    },
                );
                f.insert("primaryobjecttypecode".into(), json_str(entity));
                f.insert("secondaryobjecttypecode".into(), json_str("none"));
                f.insert("iscustomprocessingstepallowed".into(), Raw("true".into()));
                s.put("sdkmessagefilters", id, f);
            }
        }
        s
    }

    fn table(&mut self, set: &str) -> &mut BTreeMap<Uuid, Row> {
        self.tables.entry(set.to_owned()).or_default()
    }

    fn put(&mut self, set: &str, id: Uuid, fields: Fields) {
        self.next_version += 1;
        let version = self.next_version;
        self.table(set).insert(id, Row { fields, version });
    }

    /// Removes a row, noting the deletion for change tracking; false when there was none.
    fn remove(&mut self, set: &str, id: Uuid) -> bool {
        if self.table(set).remove(&id).is_none() {
            return false;
        }
        self.next_version += 1;
        let version = self.next_version;
        self.deleted.push(collection::Deletion {
            set: set.to_owned(),
            id,
            version,
        });
        true
    }

    fn put_role(&mut self, id: Uuid, name: &str, category: i32) {
        let mut f = Fields::new();
        f.insert("connectionroleid".into(), json_str(&id.to_string()));
        f.insert("name".into(), json_str(name));
        f.insert("category".into(), Raw(category.to_string()));
        f.insert("statecode".into(), Raw("0".into()));
        self.put("connectionroles", id, f);
    }

    fn exists(&self, set: &str, id: Uuid) -> bool {
        self.tables.get(set).is_some_and(|t| t.contains_key(&id))
    }
}

/// Stable message filter ids: message index × entity index.
fn message_filter_id(message: usize, entity: usize) -> Uuid {
    Uuid::from_u128(0x5f17_0000_0000_4000_8000_0000_0000_0000 + (message as u128) * 16 + entity as u128)
}

fn json_str(s: &str) -> Raw {
    Raw(Value::String(s.to_owned()).to_string())
}

fn opt_str(s: Option<&str>) -> Raw {
    s.map(json_str).unwrap_or_else(Raw::null)
}

fn json_date(t: OffsetDateTime) -> Raw {
    let utc = t.to_offset(time::UtcOffset::UTC);
    json_str(&utc.format(&Rfc3339).unwrap_or_default())
}

fn put_lookup(f: &mut Fields, attr: &str, r: &EntityRef) {
    let key = format!("_{attr}_value");
    f.insert(key.clone(), json_str(&r.id.to_string()));
    f.insert(format!("{key}{LOOKUP_ANNOTATION}"), json_str(&r.logical_name));
    f.insert(
        format!("{key}{NAVIGATION_ANNOTATION}"),
        json_str(&format!("{attr}_{}", r.logical_name)),
    );
    if let Some(name) = &r.name {
        f.insert(format!("{key}{FORMATTED_ANNOTATION}"), json_str(name));
    }
}

/// One webhook-vocabulary attribute in Web API shape.
fn put_attribute(f: &mut Fields, key: &str, value: &AttributeValue) {
    let raw = match value {
        AttributeValue::EntityReference(r) => return put_lookup(f, key, r),
        AttributeValue::Null if KNOWN_LOOKUPS.contains(&key) => {
            f.insert(format!("_{key}_value"), Raw::null());
            return;
        }
        AttributeValue::Null => Raw::null(),
        AttributeValue::String(s) => json_str(s),
        AttributeValue::Bool(b) => Raw(b.to_string()),
        AttributeValue::Int(i) => Raw(i.to_string()),
        AttributeValue::Decimal(d) | AttributeValue::Money(d) => Raw(d.to_string()),
        AttributeValue::OptionSet(v) => Raw(v.to_string()),
        // Multi-select picklists come back as a comma-separated string.
        AttributeValue::OptionSetCollection(vs) => {
            json_str(&vs.iter().map(i32::to_string).collect::<Vec<_>>().join(","))
        }
        AttributeValue::DateTime(t) => json_date(*t),
        AttributeValue::EntityCollection(_) => return,
        AttributeValue::Other(v) => Raw(v.to_string()),
    };
    f.insert(key.to_owned(), raw);
}

/// A row as JSON text: the etag (and the context, for a single row), then the selected columns
/// with their annotations, then the primary key.
fn render_fields(row: &Row, select: Option<&[String]>, context: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |k: &str, v: &str| parts.push(format!("{}:{v}", Value::String(k.to_owned())));
    if let Some(ctx) = context {
        push("@odata.context", &Value::String(ctx.to_owned()).to_string());
    }
    push(
        "@odata.etag",
        &Value::String(format!("W/\"{}\"", row.version)).to_string(),
    );
    match select {
        None => {
            for (k, v) in &row.fields {
                push(k, &v.0);
            }
        }
        Some(cols) => {
            let mut done: Vec<&str> = Vec::new();
            for col in cols {
                if done.contains(&col.as_str()) {
                    continue;
                }
                done.push(col);
                push(col, row.fields.get(col).map_or("null", |r| r.0.as_str()));
                let annotation_prefix = format!("{col}@");
                for (k, v) in row.fields.range(annotation_prefix.clone()..) {
                    if !k.starts_with(&annotation_prefix) {
                        break;
                    }
                    push(k, &v.0);
                }
            }
        }
    }
    format!("{{{}}}", parts.join(","))
}

fn find_set(name: &str) -> Option<(&'static str, &'static str, &'static str)> {
    SETS.iter().copied().find(|(set, _, _)| *set == name)
}

async fn token(State(state): State<Shared>, uri: Uri, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let mut s = lock(&state);
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let (status, body) = if get("grant_type") != "client_credentials" {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "unsupported_grant_type", "error_description": "AADSTS70003: grant_type must be client_credentials"}),
        )
    } else if get("client_id") != SIM_CLIENT_ID || get("client_secret") != SIM_CLIENT_SECRET {
        (
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
        )
    } else if get("scope") != format!("{}/.default", s.org) {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "invalid_scope", "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid."}),
        )
    } else {
        let token = format!("sim-{}", Uuid::new_v4().simple());
        let lifetime = s.token_lifetime_secs;
        s.tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(lifetime));
        s.tokens_issued += 1;
        (
            StatusCode::OK,
            serde_json::json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}),
        )
    };
    s.calls.push(RecordedCall {
        method: "POST".into(),
        path: uri.path().to_owned(),
        query: BTreeMap::new(),
        body: None,
        prefer: None,
        status: status.as_u16(),
    });
    json_response(status, body.to_string(), &[])
}

fn json_response(status: StatusCode, body: String, headers: &[(&'static str, String)]) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; odata.metadata=minimal"),
    );
    h.insert("OData-Version", HeaderValue::from_static("4.0"));
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    resp
}

fn odata_error(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply {
        status,
        body: serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
        headers: Vec::new(),
    }
}

struct Reply {
    status: StatusCode,
    body: String,
    headers: Vec<(&'static str, String)>,
}

async fn data(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Latency, and how many calls are in flight at once (tests of the client's bound).
    let latency = {
        let mut s = lock(&state);
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        s.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = answer(&state, method, uri, headers, body);
    lock(&state).in_flight -= 1;
    response
}

fn answer(state: &Shared, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let body_text = (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned());
    let header =
        |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let prefer = headers
        .get("Prefer")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bearer = header(header::AUTHORIZATION).and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned));
    let if_match = header(header::IF_MATCH).is_some();
    let merge_labels = headers
        .get("MSCRM.MergeLabels")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));

    let mut s = lock(state);
    let authorized = bearer
        .as_ref()
        .and_then(|t| s.tokens.get(t))
        .is_some_and(|expiry| Instant::now() < *expiry);
    let reply = if !authorized {
        Reply {
            status: StatusCode::UNAUTHORIZED,
            body: String::new(),
            headers: vec![("WWW-Authenticate", format!("Bearer authorization_uri={}", s.org))],
        }
    } else if s.not_member {
        odata_error(
            StatusCode::FORBIDDEN,
            "0x80072560",
            "The user is not a member of the organization.",
        )
    } else if s.pending_429 > 0 {
        s.pending_429 -= 1;
        let mut r = odata_error(
            StatusCode::TOO_MANY_REQUESTS,
            "0x80072322",
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        );
        r.headers.push(("Retry-After", s.retry_after_secs.to_string()));
        r
    } else if s.pending_5xx > 0 {
        s.pending_5xx -= 1;
        odata_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "0x80040216",
            "An unexpected error occurred.",
        )
    } else if let Some(reply) = metadata(
        &mut s,
        &method,
        path.strip_prefix(API_PREFIX).unwrap_or(""),
        body_text.as_deref(),
        merge_labels,
    ) {
        reply
    } else {
        handle(
            &mut s,
            &method,
            path.strip_prefix(API_PREFIX).unwrap_or(""),
            &query,
            body_text.as_deref(),
            if_match,
            prefer.as_deref(),
        )
    };
    s.calls.push(RecordedCall {
        method: method.to_string(),
        path,
        query,
        body: body_text,
        prefer,
        status: reply.status.as_u16(),
    });
    drop(s);
    if reply.body.is_empty() {
        let mut resp = reply.status.into_response();
        for (k, v) in &reply.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                resp.headers_mut().insert(*k, v);
            }
        }
        return resp;
    }
    json_response(reply.status, reply.body, &reply.headers)
}

/// Table definitions (`EntityDefinitions(LogicalName='…')`), as far as change tracking goes, and
/// `PublishXml`. None for any other path. A definition is written back whole with PUT (there is
/// no PATCH for definitions) and `MSCRM.MergeLabels: true`, without which Dataverse would drop
/// the labels of other languages: the simulator refuses a PUT without it.
fn metadata(
    s: &mut SimState,
    method: &Method,
    rest: &str,
    body: Option<&str>,
    merge_labels: bool,
) -> Option<Reply> {
    let ok = |body: serde_json::Value| Reply {
        status: StatusCode::OK,
        body: body.to_string(),
        headers: Vec::new(),
    };
    let no_content = || Reply {
        status: StatusCode::NO_CONTENT,
        body: String::new(),
        headers: Vec::new(),
    };
    if rest == "PublishXml" {
        return Some(if *method == Method::POST {
            no_content()
        } else {
            odata_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "0x8006088a",
                "PublishXml is an action: POST it.",
            )
        });
    }
    let logical = rest
        .strip_prefix("EntityDefinitions(LogicalName='")?
        .strip_suffix("')")?;
    let Some((set, _, _)) = SETS.iter().copied().find(|(_, _, l)| *l == logical) else {
        return Some(odata_error(
            StatusCode::NOT_FOUND,
            "0x80040217",
            &format!("Could not find an entity with name {logical}"),
        ));
    };
    let definition = |tracked: bool| {
        serde_json::json!({
            "@odata.context": format!("{}{API_PREFIX}$metadata#EntityDefinitions/$entity", s.org),
            "MetadataId": metadata_id(logical),
            "LogicalName": logical,
            "EntitySetName": set,
            "ChangeTrackingEnabled": tracked,
            "DisplayName": {"LocalizedLabels": [{"Label": logical, "LanguageCode": 1033}]},
        })
    };
    Some(match *method {
        Method::GET => ok(definition(!s.untracked.contains(set))),
        Method::PUT if !merge_labels => odata_error(
            StatusCode::BAD_REQUEST,
            "0x80040203",
            "The simulator requires MSCRM.MergeLabels: true on a definition update (labels of other languages would be lost).",
        ),
        Method::PUT => {
            let sent: serde_json::Value = match body.map(serde_json::from_str) {
                Some(Ok(v)) => v,
                _ => {
                    return Some(odata_error(
                        StatusCode::BAD_REQUEST,
                        "0x80040203",
                        "The body is not a definition.",
                    ));
                }
            };
            if sent.get("LogicalName").and_then(serde_json::Value::as_str) != Some(logical)
                || sent.get("DisplayName").is_none()
            {
                return Some(odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80040203",
                    "A definition is written back whole: LogicalName and DisplayName are missing.",
                ));
            }
            match sent
                .get("ChangeTrackingEnabled")
                .and_then(serde_json::Value::as_bool)
            {
                Some(true) => {
                    s.untracked.remove(set);
                }
                Some(false) => {
                    s.untracked.insert(set.to_owned());
                }
                None => {}
            }
            no_content()
        }
        _ => odata_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x8006088a",
            "Use GET or PUT on a definition.",
        ),
    })
}

/// A table's stable metadata id in the simulator.
fn metadata_id(logical: &str) -> Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(logical.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// `set` or `set(guid)`.
fn parse_resource(rest: &str) -> Option<(&str, Option<Uuid>)> {
    match rest.find('(') {
        None => Some((rest, None)),
        Some(open) => {
            let inner = rest[open + 1..].strip_suffix(')')?;
            Some((&rest[..open], Some(Uuid::parse_str(inner).ok()?)))
        }
    }
}

fn handle(
    s: &mut SimState,
    method: &Method,
    rest: &str,
    query: &BTreeMap<String, String>,
    body: Option<&str>,
    if_match: bool,
    prefer: Option<&str>,
) -> Reply {
    let not_found_segment = || {
        odata_error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            &format!("Resource not found for the segment '{rest}'."),
        )
    };
    if method == Method::GET && matches!(rest, "WhoAmI" | "WhoAmI()") {
        // The unbound function (specs/dynamics.md, addendum): who the caller is, and where.
        return Reply {
            status: StatusCode::OK,
            body: serde_json::json!({
                "@odata.context": format!("{}{API_PREFIX}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", s.org),
                "BusinessUnitId": SIM_BUSINESS_UNIT_ID,
                "UserId": SIM_USER_ID,
                "OrganizationId": s.organization_id,
            })
            .to_string(),
            headers: Vec::new(),
        };
    }
    let Some((set_name, id)) = parse_resource(rest) else {
        return not_found_segment();
    };
    let Some((set, pk, logical)) = find_set(set_name) else {
        return not_found_segment();
    };
    let select: Option<Vec<String>> = query.get("$select").map(|s| {
        s.split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect()
    });
    let does_not_exist = |id: Uuid| {
        odata_error(
            StatusCode::NOT_FOUND,
            "0x80040217",
            &format!("{logical} With Id = {id} Does Not Exist"),
        )
    };
    let api = format!("{}{API_PREFIX}", s.org);
    match (method.clone(), id) {
        (Method::GET, Some(id)) => {
            let Some(row) = s.tables.get(set).and_then(|t| t.get(&id)) else {
                return does_not_exist(id);
            };
            let cols = select.map(|mut c| {
                if !c.iter().any(|x| x == pk) {
                    c.push(pk.to_owned());
                }
                c
            });
            let context = match &select_label(query) {
                Some(l) => format!("{api}$metadata#{set}({l})/$entity"),
                None => format!("{api}$metadata#{set}/$entity"),
            };
            Reply {
                status: StatusCode::OK,
                body: render_fields(row, cols.as_deref(), Some(&context)),
                headers: Vec::new(),
            }
        }
        (Method::GET, None) => collection::query(s, set, pk, query, prefer),
        (Method::POST, None) => {
            let fields = match parse_body(body) {
                Ok(f) => f,
                Err(r) => return r,
            };
            let id = match fields.get(pk).map(|r| r.value()) {
                Some(Value::String(v)) => match Uuid::parse_str(&v) {
                    Ok(id) => id,
                    Err(_) => {
                        return odata_error(StatusCode::BAD_REQUEST, "0x80040203", "bad key");
                    }
                },
                _ => Uuid::new_v4(),
            };
            if s.exists(set, id) {
                return odata_error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                );
            }
            let mut row = Fields::new();
            row.insert(pk.to_owned(), json_str(&id.to_string()));
            if let Err(r) = apply(s, set, id, &mut row, fields) {
                return r;
            }
            if let Some((_, required)) = REQUIRED_LOOKUPS.iter().find(|(t, _)| *t == set)
                && let Some(missing) = required.iter().find(|k| !row.contains_key(**k))
            {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80040200",
                    &format!("{missing} is required"),
                );
            }
            s.put(set, id, row);
            Reply {
                status: StatusCode::NO_CONTENT,
                body: String::new(),
                headers: vec![("OData-EntityId", format!("{api}{set}({id})"))],
            }
        }
        (Method::PATCH, Some(id)) => {
            let fields = match parse_body(body) {
                Ok(f) => f,
                Err(r) => return r,
            };
            let mut row = match s.tables.get(set).and_then(|t| t.get(&id)) {
                Some(r) => r.fields.clone(),
                // Without If-Match a PATCH is an upsert in Dataverse.
                None if !if_match => {
                    let mut f = Fields::new();
                    f.insert(pk.to_owned(), json_str(&id.to_string()));
                    f
                }
                None => return does_not_exist(id),
            };
            if let Err(r) = apply(s, set, id, &mut row, fields) {
                return r;
            }
            s.put(set, id, row);
            Reply {
                status: StatusCode::NO_CONTENT,
                body: String::new(),
                headers: vec![("OData-EntityId", format!("{api}{set}({id})"))],
            }
        }
        (Method::DELETE, Some(id)) => {
            if !s.remove(set, id) {
                return does_not_exist(id);
            }
            s.secrets.remove(&id);
            Reply {
                status: StatusCode::NO_CONTENT,
                body: String::new(),
                headers: Vec::new(),
            }
        }
        _ => odata_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x80060888",
            "method not supported here",
        ),
    }
}

fn select_label(query: &BTreeMap<String, String>) -> Option<String> {
    query.get("$select").cloned()
}

fn parse_body(body: Option<&str>) -> Result<Fields, Reply> {
    let text = body.unwrap_or("");
    let raw: BTreeMap<String, &RawValue> = serde_json::from_str(text).map_err(|e| {
        odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060891",
            &format!("the request body is not a JSON object: {e}"),
        )
    })?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k, Raw(v.get().to_owned())))
        .collect())
}

/// Writes request fields into a row: `nav@odata.bind` becomes `_attr_value` with annotations,
/// `authvalue` goes to the write-only store.
fn apply(s: &mut SimState, set: &str, id: Uuid, row: &mut Fields, fields: Fields) -> Result<(), Reply> {
    for (key, raw) in fields {
        if let Some(nav) = key.strip_suffix("@odata.bind") {
            let target = match raw.value() {
                Value::String(t) => t,
                _ => {
                    return Err(odata_error(
                        StatusCode::BAD_REQUEST,
                        "0x80060888",
                        &format!("{key} must be a string"),
                    ));
                }
            };
            let reference = target
                .rsplit('/')
                .next()
                .and_then(parse_resource)
                .and_then(|(set, id)| Some((find_set(set)?, id?)));
            let Some(((target_set, _, target_logical), target_id)) = reference else {
                return Err(odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!("{key}: cannot resolve {target:?}"),
                ));
            };
            if !s.exists(target_set, target_id) {
                return Err(odata_error(
                    StatusCode::NOT_FOUND,
                    "0x80040217",
                    &format!("{target_logical} With Id = {target_id} Does Not Exist"),
                ));
            }
            // `eventhandler_serviceendpoint` → `eventhandler`; `sdkmessageid` stays.
            let attr = nav.split('_').next().unwrap_or(nav);
            put_lookup(
                row,
                attr,
                &EntityRef {
                    logical_name: target_logical.into(),
                    id: target_id,
                    name: None,
                },
            );
            row.insert(format!("_{attr}_value{NAVIGATION_ANNOTATION}"), json_str(nav));
        } else if set == "serviceendpoints" && key == "authvalue" {
            if let Value::String(v) = raw.value() {
                s.secrets.insert(id, v);
            }
        } else if !key.contains('@') {
            row.insert(key, raw);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_calls_need_a_bearer_token() {
        let sim = DataverseSim::start().await.unwrap();
        let url = format!("{}api/data/v9.2/connectionroles", sim.url());
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(sim.calls().len(), 1);
        assert_eq!(sim.calls()[0].status, 401);
    }

    #[tokio::test]
    async fn token_endpoint_checks_scope() {
        let sim = DataverseSim::start().await.unwrap();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", SIM_CLIENT_ID),
            ("client_secret", SIM_CLIENT_SECRET),
            ("scope", "https://elsewhere.crm.dynamics.com/.default"),
        ];
        let resp = reqwest::Client::new()
            .post(sim.token_url())
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(sim.token_issued_count(), 0);
    }
}
