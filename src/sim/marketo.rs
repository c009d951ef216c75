//! Marketo simulator: an in-process HTTP server with the semantics of the Marketo REST API as
//! researched in specs/marketo.md (checklist in §12). Tests and `oppsync demo` point the real
//! client at it; production never does.
//!
//! Faithful where the documentation is firm (HTTP-200 error envelope, token reuse until expiry,
//! 100 calls / 20 s sliding window, 10 concurrent, daily quota, 300 records, 1 MB, per-record
//! statuses with `seq`, leads without `seq`), and explicit about the choices where it is not
//! (record-level codes for opportunities and roles, §13): those follow the spec's [I] proposals.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Settings of one simulated Marketo instance.
#[derive(Debug, Clone)]
pub struct MarketoSimConfig {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    pub client_id: String,
    pub client_secret: String,
    /// Life of a freshly issued access token (Marketo: 3,600 s).
    pub token_ttl: Duration,
    /// Rate limit: calls per sliding window (Marketo: 100 per 20 s).
    pub calls_per_window: u32,
    pub window: Duration,
    /// Calls in flight at once (Marketo: 10); one more gets 615.
    pub max_concurrent: u32,
    pub daily_quota: u32,
    /// Records per call (Marketo: 300); more is a response-level 1003.
    pub batch_max: usize,
    /// Largest request body (Marketo: 1 MB); more is HTTP 413.
    pub body_max_bytes: usize,
    /// When set, calls answered with an error do not count towards the rate window or the
    /// daily quota (old docs say so; the current docs are ambiguous, §6).
    pub errors_dont_count: bool,
    /// Native CRM sync enabled: opportunity, role and company writes are refused with 1018.
    pub crm_enabled: bool,
    /// Refuse with a response-level 1018 instead of per-record skips (placement unknown, §3.6).
    pub crm_response_level: bool,
    /// Opportunity fields besides the standard ones that the instance knows (custom fields).
    pub extra_opportunity_fields: Vec<String>,
    /// Skip opportunity records that carry unknown fields with 1006.
    pub reject_unknown_opportunity_fields: bool,
}

impl Default for MarketoSimConfig {
    fn default() -> Self {
        MarketoSimConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            client_id: "oppsync-sim-client".into(),
            client_secret: "oppsync-sim-secret".into(),
            token_ttl: Duration::from_secs(3600),
            calls_per_window: 100,
            window: Duration::from_secs(20),
            max_concurrent: 10,
            daily_quota: 50_000,
            batch_max: 300,
            body_max_bytes: 1024 * 1024,
            errors_dont_count: false,
            crm_enabled: false,
            crm_response_level: false,
            extra_opportunity_fields: Vec::new(),
            reject_unknown_opportunity_fields: true,
        }
    }
}

/// Trouble to inject. Counted faults apply to the next REST calls (identity calls excluded), in
/// the order they were injected.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer the next `times` calls with this HTTP status (e.g. 500, 502, 503).
    HttpStatus { status: u16, times: u32 },
    /// Answer the next `times` calls with this response-level Marketo code at HTTP 200
    /// (604, 606, 607, 608, 611, 615, 713, …).
    ErrorCode { code: u16, times: u32 },
    /// The current token expires now: calls carrying it get 602, identity issues a new one.
    ExpireTokenNow,
    /// The current token becomes unknown: calls carrying it get 601.
    InvalidateToken,
    /// Hold the next `times` calls this long before answering (they stay in flight).
    Delay { delay: Duration, times: u32 },
    /// Close the connection of the next `times` calls without a complete answer.
    DropConnection { times: u32 },
    /// A sustained storm, as when another integration saturates the shared instance: for
    /// `lasting`, and until it has refused `at_least` calls, `percent` of the REST calls are
    /// answered with this response-level code (606, 615 …), the first of them included, on top
    /// of the other faults. (A client that slows down under it still meets it.)
    Storm {
        code: u16,
        percent: u8,
        lasting: Duration,
        at_least: u32,
    },
    /// Skip every write of these records (opportunity, company or role external ids) with this
    /// record-level reason, until `clear_faults`.
    RecordError {
        external_ids: Vec<String>,
        code: String,
        message: String,
    },
}

/// One call the simulator received.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The JSON body, or the raw text of a non-JSON body (`Value::Null` when empty).
    pub body: Value,
    pub at: Instant,
    /// The bearer token presented, if any (tests check the retry used the new one).
    pub bearer: Option<String>,
    /// HTTP status of the answer; `None` while pending or when the connection was dropped.
    pub http_status: Option<u16>,
    /// First response-level Marketo error code, when the answer was `success:false`.
    pub response_code: Option<String>,
    pub dropped: bool,
}

impl RecordedCall {
    fn is_rest(&self) -> bool {
        self.path.starts_with("/rest/")
    }
}

#[derive(Debug, Clone)]
enum QueuedFault {
    Http(u16),
    Code(u16),
    Delay(Duration),
    Drop,
}

#[derive(Debug)]
struct TokenState {
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct Tables {
    /// Keyed by `externalOpportunityId`.
    opportunities: BTreeMap<String, Map<String, Value>>,
    /// Keyed by `externalCompanyId`.
    companies: BTreeMap<String, Map<String, Value>>,
    /// Keyed by (externalOpportunityId, leadId, role).
    roles: BTreeMap<(String, i64, String), Map<String, Value>>,
    leads: BTreeMap<i64, Map<String, Value>>,
    next_company_id: i64,
    next_lead_id: i64,
}

struct SimState {
    cfg: MarketoSimConfig,
    tables: Tables,
    tokens: HashMap<String, TokenState>,
    current_token: Option<String>,
    token_issued: u64,
    calls: Vec<RecordedCall>,
    /// Arrival time of every counted call still inside the rate window, by call index.
    rate_log: VecDeque<(usize, Instant)>,
    inflight: u32,
    max_inflight_seen: u32,
    quota_day: time::Date,
    quota_used: u32,
    faults: VecDeque<(QueuedFault, u32)>,
    /// A storm in progress: (code, percent, until, at least this many refusals).
    storm: Option<(u16, u8, Instant, u32)>,
    /// Calls answered during the storm so far: the first and then every call that crosses the
    /// next `percent`-th is refused, so the share is exact, not left to chance.
    storm_calls: u64,
    /// Calls the storm refused.
    storm_refused: u32,
    record_errors: HashMap<String, (String, String)>,
    error_counts: BTreeMap<String, u64>,
}

struct Sim {
    state: Mutex<SimState>,
}

impl Sim {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulator's entry point.
pub struct MarketoSim;

impl MarketoSim {
    /// Binds `cfg.addr` and serves until `shutdown()` or until the last handle is dropped.
    pub async fn start(cfg: MarketoSimConfig) -> std::io::Result<MarketoSimHandle> {
        let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(Sim {
            state: Mutex::new(SimState::new(cfg)),
        });
        let (tx, rx) = oneshot::channel::<()>();
        let app = router(sim.clone());
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // Resolves on an explicit signal or when the sender is dropped with the last handle.
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "marketo simulator stopped with an error");
            }
        });
        Ok(MarketoSimHandle {
            sim,
            server: Arc::new(ServerGuard {
                addr,
                shutdown: Mutex::new(Some(tx)),
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// Runs the simulator on a fixed address until the process ends (`oppsync sim`).
pub async fn serve_forever(cfg: MarketoSimConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let sim = Arc::new(Sim {
        state: Mutex::new(SimState::new(cfg)),
    });
    axum::serve(listener, router(sim)).await
}

struct ServerGuard {
    addr: SocketAddr,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ServerGuard {
    fn stop(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop();
        // Keep-alive connections would hold a graceful shutdown open; the simulator owes
        // nobody a clean goodbye.
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// A running simulator: address, credentials, inspection and control. Cheap to clone.
#[derive(Clone)]
pub struct MarketoSimHandle {
    sim: Arc<Sim>,
    server: Arc<ServerGuard>,
}

impl MarketoSimHandle {
    /// `http://127.0.0.1:PORT`, the equivalent of `https://<munchkin>.mktorest.com`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn client_id(&self) -> String {
        self.sim.lock().cfg.client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        self.sim.lock().cfg.client_secret.clone()
    }

    /// Stops accepting connections.
    pub fn shutdown(&self) {
        self.server.stop();
    }

    pub fn opportunities(&self) -> BTreeMap<String, Map<String, Value>> {
        self.sim.lock().tables.opportunities.clone()
    }

    pub fn companies(&self) -> BTreeMap<String, Map<String, Value>> {
        self.sim.lock().tables.companies.clone()
    }

    /// Role keys: (externalOpportunityId, leadId, role).
    pub fn roles(&self) -> BTreeSet<(String, i64, String)> {
        self.sim.lock().tables.roles.keys().cloned().collect()
    }

    pub fn role_records(&self) -> BTreeMap<(String, i64, String), Map<String, Value>> {
        self.sim.lock().tables.roles.clone()
    }

    pub fn leads(&self) -> BTreeMap<i64, Map<String, Value>> {
        self.sim.lock().tables.leads.clone()
    }

    /// Seeds a lead directly (no API call); returns its id.
    pub fn add_lead(&self, fields: Map<String, Value>) -> i64 {
        let mut st = self.sim.lock();
        st.tables.insert_lead(fields)
    }

    /// Seeds an opportunity directly (no API call); it must carry `externalOpportunityId`.
    pub fn add_opportunity(&self, mut fields: Map<String, Value>) {
        let mut st = self.sim.lock();
        let Some(key) = fields.get("externalOpportunityId").and_then(text_of) else {
            return;
        };
        let now = now_text();
        fields.insert(
            "marketoGUID".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
        fields.insert("createdAt".into(), Value::String(now.clone()));
        fields.insert("updatedAt".into(), Value::String(now));
        st.tables.opportunities.insert(key, fields);
    }

    pub fn calls(&self) -> Vec<RecordedCall> {
        self.sim.lock().calls.clone()
    }

    /// Calls received on this path (identity included, under `/identity/oauth/token`).
    pub fn call_count(&self, path: &str) -> usize {
        self.sim.lock().calls.iter().filter(|c| c.path == path).count()
    }

    /// REST calls received (identity excluded).
    pub fn rest_call_count(&self) -> usize {
        self.sim.lock().calls.iter().filter(|c| c.is_rest()).count()
    }

    pub fn max_concurrent_seen(&self) -> u32 {
        self.sim.lock().max_inflight_seen
    }

    /// Most REST calls that arrived within any one rate window.
    pub fn max_calls_in_any_window(&self) -> usize {
        let st = self.sim.lock();
        let window = st.cfg.window;
        let mut times: Vec<Instant> = st.calls.iter().filter(|c| c.is_rest()).map(|c| c.at).collect();
        times.sort();
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]) >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    pub fn token_issued_count(&self) -> u64 {
        self.sim.lock().token_issued
    }

    /// Answers with this response-level code so far.
    pub fn error_count(&self, code: &str) -> u64 {
        self.sim.lock().error_counts.get(code).copied().unwrap_or(0)
    }

    /// Calls the current (or last) storm refused.
    pub fn storm_refused(&self) -> u32 {
        self.sim.lock().storm_refused
    }

    pub fn count_606(&self) -> u64 {
        self.error_count("606")
    }

    pub fn count_615(&self) -> u64 {
        self.error_count("615")
    }

    /// Calls counted against today's quota.
    pub fn quota_used(&self) -> u32 {
        self.sim.lock().quota_used
    }

    pub fn set_crm_enabled(&self, enabled: bool) {
        self.sim.lock().cfg.crm_enabled = enabled;
    }

    pub fn inject(&self, fault: Fault) {
        let mut st = self.sim.lock();
        let now = Instant::now();
        match fault {
            Fault::HttpStatus { status, times } => st.faults.push_back((QueuedFault::Http(status), times)),
            Fault::ErrorCode { code, times } => st.faults.push_back((QueuedFault::Code(code), times)),
            Fault::Delay { delay, times } => st.faults.push_back((QueuedFault::Delay(delay), times)),
            Fault::DropConnection { times } => st.faults.push_back((QueuedFault::Drop, times)),
            Fault::Storm {
                code,
                percent,
                lasting,
                at_least,
            } => {
                st.storm = Some((code, percent.min(100), now + lasting, at_least));
                st.storm_calls = 0;
                st.storm_refused = 0;
            }
            Fault::ExpireTokenNow => {
                if let Some(t) = st.current_token.take()
                    && let Some(s) = st.tokens.get_mut(&t)
                {
                    s.expires_at = now;
                }
            }
            Fault::InvalidateToken => {
                if let Some(t) = st.current_token.take() {
                    st.tokens.remove(&t);
                }
            }
            Fault::RecordError {
                external_ids,
                code,
                message,
            } => {
                for id in external_ids {
                    st.record_errors.insert(id, (code.clone(), message.clone()));
                }
            }
        }
    }

    /// Forgets queued faults and per-record errors.
    pub fn clear_faults(&self) {
        let mut st = self.sim.lock();
        st.faults.clear();
        st.storm = None;
        st.record_errors.clear();
    }

    /// Everything the simulator holds, as served on `GET /_sim/state`.
    pub fn state_json(&self) -> Value {
        self.sim.lock().dump()
    }
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(sim)
        // The 1 MB limit is Marketo's and answered as Marketo does (HTTP 413), not by axum.
        .layer(DefaultBodyLimit::disable())
}

const IDENTITY_PATH: &str = "/identity/oauth/token";

/// What happens to a REST call after the checks that run on arrival.
enum Verdict {
    Answer(Response),
    Proceed { delay: Option<Duration> },
    Drop,
}

async fn handle(
    State(sim): State<Arc<Sim>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or("").to_owned();
    if path == IDENTITY_PATH {
        return sim.lock().identity(&method, &query, &body);
    }
    if path == "/_sim/state" && method == Method::GET {
        return axum::Json(sim.lock().dump()).into_response();
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let (idx, verdict) = sim.lock().arrive(&method, &path, &query, &headers, &body, bearer);
    let _inflight = InflightGuard {
        sim: sim.clone(),
        active: !matches!(verdict, Verdict::Answer(_)),
    };
    let delay = match verdict {
        Verdict::Answer(resp) => return resp,
        Verdict::Drop => {
            sim.lock().calls[idx].dropped = true;
            return dropped_connection();
        }
        Verdict::Proceed { delay } => delay,
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let mut st = sim.lock();
    let answer = st.dispatch(&method, &path, &query, &headers, &body);
    st.finish(idx, answer)
}

/// Keeps the in-flight gauge honest even when the client hangs up mid-call.
struct InflightGuard {
    sim: Arc<Sim>,
    active: bool,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.active {
            let mut st = self.sim.lock();
            st.inflight = st.inflight.saturating_sub(1);
        }
    }
}

/// A body that fails at once: hyper closes the connection without finishing the answer.
fn dropped_connection() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))
    });
    Response::new(Body::from_stream(stream))
}

/// A computed answer before it is recorded.
enum Answer {
    Envelope(Value),
    Http(StatusCode, String),
}

fn request_id() -> String {
    let a: u16 = rand::random();
    let millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    format!("{a:x}#{millis:x}")
}

fn ok_envelope(result: Vec<Value>) -> Value {
    json!({ "requestId": request_id(), "result": result, "success": true })
}

fn error_envelope(code: &str, message: &str) -> Value {
    json!({ "requestId": request_id(), "success": false, "errors": [ { "code": code, "message": message } ] })
}

fn skipped(seq: Option<usize>, code: &str, message: &str) -> Value {
    let mut m = Map::new();
    if let Some(seq) = seq {
        m.insert("seq".into(), json!(seq));
    }
    m.insert("status".into(), json!("skipped"));
    m.insert("reasons".into(), json!([{ "code": code, "message": message }]));
    Value::Object(m)
}

/// Query parameters, plus the `input` of a compound-key query.
type QueryParams = (HashMap<String, String>, Option<Vec<Value>>);

/// A response-level failure.
struct ApiError {
    code: &'static str,
    message: String,
}

fn api_err(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        message: message.into(),
    }
}

fn code_message(code: u16, cfg: &MarketoSimConfig) -> String {
    match code {
        502 => "Bad Gateway".into(),
        601 => "Access token invalid".into(),
        602 => "Access token expired".into(),
        604 => "Request timed out".into(),
        606 => rate_message(cfg),
        607 => "Daily quota reached".into(),
        608 => "API Temporarily Unavailable".into(),
        611 => "System error".into(),
        615 => concurrency_message(cfg),
        713 => "Transient Error".into(),
        1018 => "CRM Enabled".into(),
        _ => "Simulated error".into(),
    }
}

fn rate_message(cfg: &MarketoSimConfig) -> String {
    // Marketo's own wording, typo included (spec §6, S19).
    format!(
        "Max rate limit '{}' exceeded with in '{}' secs",
        cfg.calls_per_window,
        trim_secs(cfg.window)
    )
}

fn concurrency_message(cfg: &MarketoSimConfig) -> String {
    format!("Concurrent access limit '{}' reached", cfg.max_concurrent)
}

fn trim_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s}")
    }
}

fn now_text() -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::now_utc().format(&fmt).unwrap_or_default()
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_form(text: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect()
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

const OPPORTUNITY_FIELDS: &[(&str, &str, &str)] = &[
    ("externalOpportunityId", "External Opportunity Id", "string"),
    ("name", "Name", "string"),
    ("description", "Description", "string"),
    ("type", "Type", "string"),
    ("stage", "Stage", "string"),
    ("amount", "Amount", "currency"),
    ("expectedRevenue", "Expected Revenue", "currency"),
    ("closeDate", "Close Date", "date"),
    ("fiscalQuarter", "Fiscal Quarter", "integer"),
    ("fiscalYear", "Fiscal Year", "integer"),
    ("forecastCategory", "Forecast Category", "string"),
    ("forecastCategoryName", "Forecast Category Name", "string"),
    ("isClosed", "Is Closed", "boolean"),
    ("isWon", "Is Won", "boolean"),
    ("quantity", "Quantity", "float"),
    ("probability", "Probability", "integer"),
    ("lastActivityDate", "Last Activity Date", "date"),
    ("leadSource", "Lead Source", "string"),
    ("source", "Source", "string"),
    ("nextStep", "Next Step", "string"),
    ("externalCompanyId", "External Company Id", "string"),
    ("externalSalesPersonId", "External Sales Person Id", "string"),
    ("externalCreatedDate", "External Created Date", "datetime"),
];

const ROLE_FIELDS: &[&str] = &[
    "externalOpportunityId",
    "leadId",
    "role",
    "isPrimary",
    "externalCreatedDate",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Opportunity,
    Role,
    Company,
}

impl Kind {
    fn id_field(self) -> &'static str {
        match self {
            Kind::Opportunity | Kind::Role => "marketoGUID",
            Kind::Company => "id",
        }
    }
}

/// A record key inside one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Text(String),
    Role(String, i64, String),
}

impl Key {
    /// The id a per-record fault is matched on.
    fn fault_id(&self) -> String {
        match self {
            Key::Text(s) => s.clone(),
            Key::Role(o, l, r) => format!("{o}/{l}/{r}"),
        }
    }
}

impl Tables {
    /// Stores a lead; honours an integer `id` given by a test seed, else assigns the next one.
    fn insert_lead(&mut self, mut fields: Map<String, Value>) -> i64 {
        if self.next_lead_id == 0 {
            self.next_lead_id = 318_500;
        }
        let id = match fields.get("id").and_then(Value::as_i64) {
            Some(id) if !self.leads.contains_key(&id) => id,
            _ => self.next_lead_id + 1,
        };
        self.next_lead_id = self.next_lead_id.max(id);
        let now = now_text();
        fields.insert("id".into(), json!(id));
        fields.insert("createdAt".into(), Value::String(now.clone()));
        fields.insert("updatedAt".into(), Value::String(now));
        self.leads.insert(id, fields);
        id
    }

    fn dedupe_key(kind: Kind, rec: &Map<String, Value>) -> Result<Key, (&'static str, String)> {
        let text = |f: &str| {
            rec.get(f)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or(("1003", format!("Missing value for required parameter '{f}'")))
        };
        match kind {
            Kind::Opportunity => Ok(Key::Text(text("externalOpportunityId")?)),
            Kind::Company => Ok(Key::Text(text("externalCompanyId")?)),
            Kind::Role => {
                let opp = text("externalOpportunityId")?;
                let role = text("role")?;
                let lead = rec
                    .get("leadId")
                    .and_then(Value::as_i64)
                    .ok_or(("1001", "Invalid value type for field 'leadId'".to_owned()))?;
                Ok(Key::Role(opp, lead, role))
            }
        }
    }

    fn key_by_id(&self, kind: Kind, rec: &Map<String, Value>) -> Result<Key, (&'static str, String)> {
        let field = kind.id_field();
        let Some(wanted) = rec.get(field).and_then(text_of) else {
            return Err(("1003", format!("Missing value for required parameter '{field}'")));
        };
        let matches = |row: &Map<String, Value>| row.get(field).and_then(text_of).as_deref() == Some(&wanted);
        let found = match kind {
            Kind::Opportunity => self
                .opportunities
                .iter()
                .find(|(_, r)| matches(r))
                .map(|(k, _)| Key::Text(k.clone())),
            Kind::Company => self
                .companies
                .iter()
                .find(|(_, r)| matches(r))
                .map(|(k, _)| Key::Text(k.clone())),
            Kind::Role => self
                .roles
                .iter()
                .find(|(_, r)| matches(r))
                .map(|((o, l, r), _)| Key::Role(o.clone(), *l, r.clone())),
        };
        found.ok_or(("1013", "Record not found".to_owned()))
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut Map<String, Value>> {
        match key {
            Key::Text(k) => {
                if let Some(r) = self.opportunities.get_mut(k) {
                    return Some(r);
                }
                self.companies.get_mut(k)
            }
            Key::Role(o, l, r) => self.roles.get_mut(&(o.clone(), *l, r.clone())),
        }
    }

    fn exists(&self, kind: Kind, key: &Key) -> bool {
        match (kind, key) {
            (Kind::Opportunity, Key::Text(k)) => self.opportunities.contains_key(k),
            (Kind::Company, Key::Text(k)) => self.companies.contains_key(k),
            (Kind::Role, Key::Role(o, l, r)) => self.roles.contains_key(&(o.clone(), *l, r.clone())),
            _ => false,
        }
    }

    fn row_mut(&mut self, kind: Kind, key: &Key) -> Option<&mut Map<String, Value>> {
        match (kind, key) {
            (Kind::Opportunity, Key::Text(k)) => self.opportunities.get_mut(k),
            (Kind::Company, Key::Text(k)) => self.companies.get_mut(k),
            (Kind::Role, _) => self.get_mut(key),
            _ => None,
        }
    }

    fn remove(&mut self, kind: Kind, key: &Key) -> Option<Map<String, Value>> {
        match (kind, key) {
            (Kind::Opportunity, Key::Text(k)) => self.opportunities.remove(k),
            (Kind::Company, Key::Text(k)) => self.companies.remove(k),
            (Kind::Role, Key::Role(o, l, r)) => self.roles.remove(&(o.clone(), *l, r.clone())),
            _ => None,
        }
    }

    fn rows(&self, kind: Kind) -> Vec<&Map<String, Value>> {
        match kind {
            Kind::Opportunity => self.opportunities.values().collect(),
            Kind::Company => self.companies.values().collect(),
            Kind::Role => self.roles.values().collect(),
        }
    }
}

impl SimState {
    fn new(cfg: MarketoSimConfig) -> Self {
        SimState {
            cfg,
            tables: Tables::default(),
            tokens: HashMap::new(),
            current_token: None,
            token_issued: 0,
            calls: Vec::new(),
            rate_log: VecDeque::new(),
            inflight: 0,
            max_inflight_seen: 0,
            quota_day: quota_day(time::OffsetDateTime::now_utc()),
            quota_used: 0,
            faults: VecDeque::new(),
            storm: None,
            storm_calls: 0,
            storm_refused: 0,
            record_errors: HashMap::new(),
            error_counts: BTreeMap::new(),
        }
    }

    fn record(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
        bearer: Option<String>,
    ) -> usize {
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        self.calls.push(RecordedCall {
            method: method.to_string(),
            path: path.to_owned(),
            query: query.to_owned(),
            body,
            at: Instant::now(),
            bearer,
            http_status: None,
            response_code: None,
            dropped: false,
        });
        self.calls.len() - 1
    }

    /// Identity: same token with its remaining life until it expires (spec §1.2); no quota.
    fn identity(&mut self, method: &Method, query: &str, body: &[u8]) -> Response {
        let idx = self.record(method, IDENTITY_PATH, query, b"", None);
        let mut params = parse_form(query);
        // Some clients send the parameters as a form body (spec §1.1, K7); accept both.
        if !body.is_empty() {
            params.extend(parse_form(&String::from_utf8_lossy(body)));
        }
        let good = params.get("grant_type").map(String::as_str) == Some("client_credentials")
            && params.get("client_id") == Some(&self.cfg.client_id)
            && params.get("client_secret") == Some(&self.cfg.client_secret);
        if !good {
            self.calls[idx].http_status = Some(401);
            let body = json!({ "error": "invalid_client", "error_description": "Bad client credentials" });
            return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
        }
        let now = Instant::now();
        let live = self
            .current_token
            .as_ref()
            .and_then(|t| self.tokens.get(t).map(|s| (t.clone(), s.expires_at)))
            .filter(|(_, exp)| *exp > now);
        let (token, expires_at) = match live {
            Some(found) => found,
            None => {
                let token = format!("{}:sj", uuid::Uuid::new_v4());
                let expires_at = now + self.cfg.token_ttl;
                self.tokens.insert(token.clone(), TokenState { expires_at });
                self.current_token = Some(token.clone());
                self.token_issued += 1;
                (token, expires_at)
            }
        };
        let remaining = expires_at.saturating_duration_since(now).as_secs_f64().floor() as u64;
        self.calls[idx].http_status = Some(200);
        axum::Json(json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": remaining,
            "scope": format!("{}@sim.example.com", self.cfg.client_id),
        }))
        .into_response()
    }

    fn roll_day(&mut self) {
        let today = quota_day(time::OffsetDateTime::now_utc());
        if today != self.quota_day {
            self.quota_day = today;
            self.quota_used = 0;
        }
    }

    /// Checks on arrival, in this order: body size, token, concurrency, rate, quota, faults.
    fn arrive(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
        bearer: Option<String>,
    ) -> (usize, Verdict) {
        let _ = headers;
        let idx = self.record(method, path, query, body, bearer.clone());
        let now = Instant::now();
        self.roll_day();
        // Every arrival counts towards the window and the quota unless `errors_dont_count`
        // later takes an error answer back out (see `finish`).
        self.rate_log
            .retain(|(_, at)| now.duration_since(*at) < self.cfg.window);
        let over_rate = self.rate_log.len() >= self.cfg.calls_per_window as usize;
        self.rate_log.push_back((idx, now));
        let over_quota = self.quota_used >= self.cfg.daily_quota;
        if !over_quota {
            self.quota_used += 1;
        }

        if body.len() > self.cfg.body_max_bytes {
            let a = Answer::Http(
                StatusCode::PAYLOAD_TOO_LARGE,
                "413 Request Entity Too Large".into(),
            );
            return (idx, Verdict::Answer(self.finish(idx, a)));
        }
        let token_check = match bearer.as_deref() {
            None => Some((600, "Access token not specified")),
            Some(t) => match self.tokens.get(t) {
                None => Some((601, "Access token invalid")),
                Some(s) if s.expires_at <= now => Some((602, "Access token expired")),
                Some(_) => None,
            },
        };
        if let Some((code, msg)) = token_check {
            let a = Answer::Envelope(error_envelope(&code.to_string(), msg));
            return (idx, Verdict::Answer(self.finish(idx, a)));
        }
        if self.inflight >= self.cfg.max_concurrent {
            let a = Answer::Envelope(error_envelope("615", &concurrency_message(&self.cfg)));
            return (idx, Verdict::Answer(self.finish(idx, a)));
        }
        self.inflight += 1;
        self.max_inflight_seen = self.max_inflight_seen.max(self.inflight);
        // From here on the caller's guard releases the in-flight slot, so early answers below
        // must be returned as `Proceed`-style verdicts or released here.
        let early = if over_rate {
            Some(Answer::Envelope(error_envelope("606", &rate_message(&self.cfg))))
        } else if over_quota {
            Some(Answer::Envelope(error_envelope("607", "Daily quota reached")))
        } else {
            None
        };
        if let Some(a) = early {
            self.inflight -= 1;
            return (idx, Verdict::Answer(self.finish(idx, a)));
        }
        let storming = match self.storm {
            Some((code, percent, until, at_least)) if now < until || self.storm_refused < at_least => {
                let n = self.storm_calls;
                self.storm_calls += 1;
                let refused = (n * u64::from(percent)) % 100 < u64::from(percent);
                if refused {
                    self.storm_refused += 1;
                }
                refused.then_some(QueuedFault::Code(code))
            }
            _ => None,
        };
        let fault = match self.faults.front_mut() {
            _ if storming.is_some() => storming,
            Some((f, times)) => {
                let f = f.clone();
                *times = times.saturating_sub(1);
                if *times == 0 {
                    self.faults.pop_front();
                }
                Some(f)
            }
            None => None,
        };
        match fault {
            None => (idx, Verdict::Proceed { delay: None }),
            Some(QueuedFault::Delay(d)) => (idx, Verdict::Proceed { delay: Some(d) }),
            Some(QueuedFault::Drop) => (idx, Verdict::Drop),
            Some(QueuedFault::Http(status)) => {
                self.inflight -= 1;
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let a = Answer::Http(status, format!("{status}"));
                (idx, Verdict::Answer(self.finish(idx, a)))
            }
            Some(QueuedFault::Code(code)) => {
                self.inflight -= 1;
                let msg = code_message(code, &self.cfg);
                let a = Answer::Envelope(error_envelope(&code.to_string(), &msg));
                (idx, Verdict::Answer(self.finish(idx, a)))
            }
        }
    }

    /// Records the answer of call `idx` and turns it into a response.
    fn finish(&mut self, idx: usize, answer: Answer) -> Response {
        let (status, code, response) = match answer {
            Answer::Envelope(v) => {
                let code = if v.get("success") == Some(&Value::Bool(false)) {
                    v.pointer("/errors/0/code").and_then(text_of)
                } else {
                    None
                };
                (200u16, code, axum::Json(v).into_response())
            }
            Answer::Http(s, text) => (
                s.as_u16(),
                Some(format!("http_{}", s.as_u16())),
                (s, text).into_response(),
            ),
        };
        if let Some(c) = &code {
            *self.error_counts.entry(c.clone()).or_default() += 1;
            if self.cfg.errors_dont_count {
                let before = self.rate_log.len();
                self.rate_log.retain(|(i, _)| *i != idx);
                if self.rate_log.len() < before && c != "607" {
                    self.quota_used = self.quota_used.saturating_sub(1);
                }
            }
        }
        if let Some(call) = self.calls.get_mut(idx) {
            call.http_status = Some(status);
            call.response_code = code.filter(|c| !c.starts_with("http_"));
        }
        response
    }

    fn dispatch(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Answer {
        let qs = parse_form(query);
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        // A query sent as POST says so with `_method=GET`, in the URL or in a form body (which
        // Marketo clients commonly use for long filter lists).
        let get_in_form = method == Method::POST
            && content_type.starts_with("application/x-www-form-urlencoded")
            && parse_form(&String::from_utf8_lossy(body))
                .get("_method")
                .map(String::as_str)
                == Some("GET");
        let is_query =
            method == Method::GET || qs.get("_method").map(String::as_str) == Some("GET") || get_in_form;
        let result = match (path, is_query) {
            ("/rest/v1/opportunities/describe.json", true) => Ok(vec![self.describe_opportunities()]),
            ("/rest/v1/opportunities/roles/describe.json", true) => Ok(vec![describe_roles()]),
            ("/rest/v1/stats/usage.json", true) => Ok(vec![self.usage()]),
            ("/rest/v1/opportunities.json", true) => self.query(Kind::Opportunity, &qs, &content_type, body),
            ("/rest/v1/opportunities/roles.json", true) => self.query(Kind::Role, &qs, &content_type, body),
            ("/rest/v1/companies.json", true) => self.query(Kind::Company, &qs, &content_type, body),
            ("/rest/v1/leads.json", true) => self.query_leads(&qs, &content_type, body),
            (p, false) if method == Method::POST => match json_body(&content_type, body) {
                Err(e) => Err(e),
                Ok(req) => match p {
                    "/rest/v1/opportunities.json" => self.sync(Kind::Opportunity, &req),
                    "/rest/v1/opportunities/delete.json" => self.delete(Kind::Opportunity, &req),
                    "/rest/v1/opportunities/roles.json" => self.sync(Kind::Role, &req),
                    "/rest/v1/opportunities/roles/delete.json" => self.delete(Kind::Role, &req),
                    "/rest/v1/companies.json" => self.sync(Kind::Company, &req),
                    "/rest/v1/companies/delete.json" => self.delete(Kind::Company, &req),
                    "/rest/v1/leads.json" => self.sync_leads(&req),
                    _ => Err(api_err("610", "Requested resource not found")),
                },
            },
            (
                "/rest/v1/opportunities/delete.json"
                | "/rest/v1/opportunities/roles/delete.json"
                | "/rest/v1/companies/delete.json",
                true,
            ) => Err(api_err("605", "HTTP Method not supported")),
            _ => Err(api_err("610", "Requested resource not found")),
        };
        match result {
            Ok(rows) => Answer::Envelope(ok_envelope(rows)),
            Err(e) => Answer::Envelope(error_envelope(e.code, &e.message)),
        }
    }

    fn input<'a>(&self, req: &'a Map<String, Value>) -> Result<&'a Vec<Value>, ApiError> {
        let input = req
            .get("input")
            .and_then(Value::as_array)
            .ok_or_else(|| api_err("701", "input cannot be blank"))?;
        if input.len() > self.cfg.batch_max {
            // Undocumented in Marketo (§12.4); a response-level 1003 as the spec proposes.
            return Err(api_err(
                "1003",
                format!(
                    "Invalid data: input has {} records, at most {} allowed",
                    input.len(),
                    self.cfg.batch_max
                ),
            ));
        }
        Ok(input)
    }

    fn sync(&mut self, kind: Kind, req: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
        let action = req
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("createOrUpdate");
        if !matches!(action, "createOrUpdate" | "createOnly" | "updateOnly") {
            return Err(api_err("1003", format!("Invalid action '{action}'")));
        }
        let by_id = match req
            .get("dedupeBy")
            .and_then(Value::as_str)
            .unwrap_or("dedupeFields")
        {
            "dedupeFields" => false,
            "idField" if action == "createOnly" => {
                return Err(api_err(
                    "1003",
                    "dedupeBy idField is not compatible with createOnly",
                ));
            }
            "idField" => true,
            other => return Err(api_err("1003", format!("Invalid dedupeBy '{other}'"))),
        };
        let input = self.input(req)?.clone();
        if self.cfg.crm_enabled && self.cfg.crm_response_level {
            return Err(api_err("1018", "CRM Enabled"));
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(input.len());
        for (seq, rec) in input.iter().enumerate() {
            out.push(match self.sync_one(kind, action, by_id, rec, &mut seen) {
                Ok((status, id)) => {
                    let mut m = Map::new();
                    m.insert("seq".into(), json!(seq));
                    m.insert("status".into(), json!(status));
                    m.insert(kind.id_field().into(), id);
                    Value::Object(m)
                }
                Err((code, msg)) => skipped(Some(seq), code, &msg),
            });
        }
        Ok(out)
    }

    fn sync_one(
        &mut self,
        kind: Kind,
        action: &str,
        by_id: bool,
        rec: &Value,
        seen: &mut BTreeSet<Key>,
    ) -> Result<(&'static str, Value), (&'static str, String)> {
        if self.cfg.crm_enabled {
            return Err(("1018", "CRM Enabled".into()));
        }
        let rec = rec
            .as_object()
            .ok_or(("1003", "Invalid data: record is not an object".to_owned()))?;
        let key = if by_id {
            self.tables.key_by_id(kind, rec)?
        } else {
            Tables::dedupe_key(kind, rec)?
        };
        if !seen.insert(key.clone()) {
            return Err(("1036", "Duplicate object found in input".into()));
        }
        if let Some((code, msg)) = self.record_errors.get(&key.fault_id()) {
            return Err((leak_code(code), msg.clone()));
        }
        self.check_fields(kind, rec)?;
        let exists = self.tables.exists(kind, &key);
        let now = now_text();
        match (action, exists) {
            ("createOnly", true) => Err(("1017", "Object already exists".into())),
            ("updateOnly", false) => Err(("1013", "Object not found".into())),
            (_, true) => {
                if kind == Kind::Opportunity && rec.get("name").is_some_and(Value::is_null) {
                    return Err(("1002", "Missing value for required parameter 'name'".into()));
                }
                let id_field = kind.id_field();
                let row = self
                    .tables
                    .row_mut(kind, &key)
                    .ok_or(("1013", "Object not found".to_owned()))?;
                for (k, v) in rec {
                    // Key fields and system fields are not updateable (§3.1, §4).
                    if k == id_field || k == "createdAt" || k == "updatedAt" {
                        continue;
                    }
                    row.insert(k.clone(), v.clone());
                }
                row.insert("updatedAt".into(), Value::String(now));
                Ok(("updated", row.get(id_field).cloned().unwrap_or(Value::Null)))
            }
            (_, false) => self.create(kind, key, rec, now),
        }
    }

    fn check_fields(&self, kind: Kind, rec: &Map<String, Value>) -> Result<(), (&'static str, String)> {
        let known = |name: &str| match kind {
            Kind::Opportunity => {
                !self.cfg.reject_unknown_opportunity_fields
                    || name == "marketoGUID"
                    || OPPORTUNITY_FIELDS.iter().any(|(n, _, _)| *n == name)
                    || self.cfg.extra_opportunity_fields.iter().any(|n| n == name)
            }
            Kind::Role => name == "marketoGUID" || ROLE_FIELDS.contains(&name),
            Kind::Company => true,
        };
        match rec.keys().find(|k| !known(k)) {
            Some(f) => Err(("1006", format!("Field '{f}' not found"))),
            None => Ok(()),
        }
    }

    fn create(
        &mut self,
        kind: Kind,
        key: Key,
        rec: &Map<String, Value>,
        now: String,
    ) -> Result<(&'static str, Value), (&'static str, String)> {
        let mut row = rec.clone();
        row.insert("createdAt".into(), Value::String(now.clone()));
        row.insert("updatedAt".into(), Value::String(now));
        match (kind, key) {
            (Kind::Opportunity, Key::Text(k)) => {
                // S6: "The 'name' field must not be null."
                if rec.get("name").is_none_or(Value::is_null) {
                    return Err(("1002", "Missing value for required parameter 'name'".into()));
                }
                let guid = Value::String(uuid::Uuid::new_v4().to_string());
                row.insert("marketoGUID".into(), guid.clone());
                self.tables.opportunities.insert(k, row);
                Ok(("created", guid))
            }
            (Kind::Company, Key::Text(k)) => {
                self.tables.next_company_id += 1;
                let id = json!(self.tables.next_company_id);
                row.insert("id".into(), id.clone());
                self.tables.companies.insert(k, row);
                Ok(("created", id))
            }
            (Kind::Role, Key::Role(o, l, r)) => {
                // S7: the opportunity and the lead must already exist.
                if !self.tables.opportunities.contains_key(&o) {
                    return Err(("1013", format!("Object not found: opportunity '{o}'")));
                }
                if !self.tables.leads.contains_key(&l) {
                    return Err(("1013", format!("Object not found: lead '{l}'")));
                }
                let guid = Value::String(uuid::Uuid::new_v4().to_string());
                row.insert("marketoGUID".into(), guid.clone());
                self.tables.roles.insert((o, l, r), row);
                Ok(("created", guid))
            }
            _ => Err(("1003", "Invalid data".into())),
        }
    }

    fn delete(&mut self, kind: Kind, req: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
        let by_id = match req
            .get("deleteBy")
            .and_then(Value::as_str)
            .unwrap_or("dedupeFields")
        {
            "dedupeFields" => false,
            "idField" => true,
            other => return Err(api_err("1003", format!("Invalid deleteBy '{other}'"))),
        };
        let input = self.input(req)?.clone();
        if self.cfg.crm_enabled && self.cfg.crm_response_level {
            return Err(api_err("1018", "CRM Enabled"));
        }
        let mut out = Vec::with_capacity(input.len());
        for (seq, rec) in input.iter().enumerate() {
            let outcome = (|| {
                if self.cfg.crm_enabled {
                    return Err(("1018", "CRM Enabled".to_owned()));
                }
                let rec = rec.as_object().ok_or(("1003", "Invalid data".to_owned()))?;
                let key = if by_id {
                    self.tables.key_by_id(kind, rec)?
                } else {
                    Tables::dedupe_key(kind, rec)?
                };
                if let Some((code, msg)) = self.record_errors.get(&key.fault_id()) {
                    return Err((leak_code(code), msg.clone()));
                }
                let row = self
                    .tables
                    .remove(kind, &key)
                    .ok_or(("1013", "Record not found".to_owned()))?;
                Ok(row.get(kind.id_field()).cloned().unwrap_or(Value::Null))
            })();
            out.push(match outcome {
                Ok(id) => {
                    let mut m = Map::new();
                    m.insert("seq".into(), json!(seq));
                    m.insert(kind.id_field().into(), id);
                    m.insert("status".into(), json!("deleted"));
                    Value::Object(m)
                }
                Err((code, msg)) => skipped(Some(seq), code, &msg),
            });
        }
        Ok(out)
    }

    /// Query parameters from the URL, a `_method=GET` form body, or (roles by compound key) a
    /// JSON body.
    fn query_params(
        qs: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Result<QueryParams, ApiError> {
        let mut params = qs.clone();
        let mut input = None;
        if !body.is_empty() {
            if content_type.starts_with("application/json") {
                let v: Map<String, Value> =
                    serde_json::from_slice(body).map_err(|_| api_err("609", "Invalid JSON"))?;
                for (k, val) in &v {
                    match (k.as_str(), val) {
                        ("input", Value::Array(a)) => input = Some(a.clone()),
                        ("fields", Value::Array(a)) => {
                            let list: Vec<String> = a.iter().filter_map(text_of).collect();
                            params.insert("fields".into(), list.join(","));
                        }
                        (_, other) => {
                            if let Some(t) = text_of(other) {
                                params.insert(k.clone(), t);
                            }
                        }
                    }
                }
            } else if content_type.starts_with("application/x-www-form-urlencoded") {
                params.extend(parse_form(&String::from_utf8_lossy(body)));
            } else {
                return Err(api_err("612", "Invalid Content Type"));
            }
        }
        Ok((params, input))
    }

    fn query(
        &self,
        kind: Kind,
        qs: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Result<Vec<Value>, ApiError> {
        let (params, input) = Self::query_params(qs, content_type, body)?;
        let filter_type = params
            .get("filterType")
            .ok_or_else(|| api_err("1003", "filterType cannot be blank"))?
            .clone();
        let rows = self.tables.rows(kind);
        let matched: Vec<&Map<String, Value>> = if filter_type == "dedupeFields" && kind == Kind::Role {
            let input = input.ok_or_else(|| api_err("1003", "input cannot be blank"))?;
            if input.len() > self.cfg.batch_max {
                return Err(api_err("1003", "Too many input records"));
            }
            let keys: BTreeSet<Key> = input
                .iter()
                .filter_map(|v| v.as_object().and_then(|m| Tables::dedupe_key(kind, m).ok()))
                .collect();
            rows.into_iter()
                .filter(|r| Tables::dedupe_key(kind, r).is_ok_and(|k| keys.contains(&k)))
                .collect()
        } else {
            let field = match (filter_type.as_str(), kind) {
                ("idField", k) => k.id_field(),
                ("dedupeFields", Kind::Opportunity) => "externalOpportunityId",
                ("dedupeFields", Kind::Company) => "externalCompanyId",
                (f, _) => f,
            };
            let values: BTreeSet<String> = params
                .get("filterValues")
                .map(|v| split_list(v))
                .unwrap_or_default()
                .into_iter()
                .collect();
            if values.is_empty() {
                return Err(api_err("1003", "filterValues cannot be blank"));
            }
            if values.len() > self.cfg.batch_max {
                return Err(api_err("1003", "Too many filterValues"));
            }
            rows.into_iter()
                .filter(|r| {
                    r.get(field)
                        .and_then(text_of)
                        .is_some_and(|v| values.contains(&v))
                })
                .collect()
        };
        let fields = params.get("fields").map(|f| split_list(f));
        let defaults: Vec<String> = match kind {
            Kind::Opportunity => vec!["marketoGUID", "externalOpportunityId", "updatedAt", "createdAt"],
            Kind::Company => vec!["id", "externalCompanyId", "updatedAt", "createdAt"],
            Kind::Role => vec![
                "marketoGUID",
                "externalOpportunityId",
                "leadId",
                "role",
                "updatedAt",
                "createdAt",
            ],
        }
        .into_iter()
        .map(str::to_owned)
        .collect();
        let fields = fields.unwrap_or(defaults);
        Ok(matched
            .into_iter()
            .take(self.cfg.batch_max)
            .enumerate()
            .map(|(seq, row)| {
                let mut m = Map::new();
                m.insert("seq".into(), json!(seq));
                m.insert(
                    kind.id_field().into(),
                    row.get(kind.id_field()).cloned().unwrap_or(Value::Null),
                );
                for f in &fields {
                    // An absent field means null; Marketo leaves it out (§3.3).
                    if let Some(v) = row.get(f).filter(|v| !v.is_null()) {
                        m.insert(f.clone(), v.clone());
                    }
                }
                Value::Object(m)
            })
            .collect())
    }

    fn query_leads(
        &self,
        qs: &HashMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Result<Vec<Value>, ApiError> {
        let (params, _) = Self::query_params(qs, content_type, body)?;
        let filter_type = params
            .get("filterType")
            .ok_or_else(|| api_err("1003", "filterType cannot be blank"))?;
        let values: BTreeSet<String> = params
            .get("filterValues")
            .map(|v| split_list(v))
            .unwrap_or_default()
            .into_iter()
            .collect();
        if values.is_empty() {
            return Err(api_err("1003", "filterValues cannot be blank"));
        }
        if values.len() > self.cfg.batch_max {
            return Err(api_err("1003", "Too many filterValues"));
        }
        let matched: Vec<&Map<String, Value>> = self
            .tables
            .leads
            .values()
            .filter(|r| {
                r.get(filter_type.as_str())
                    .and_then(text_of)
                    .is_some_and(|v| values.contains(&v))
            })
            .collect();
        if matched.len() > 1000 {
            return Err(api_err("1003", "Too many results match the filter"));
        }
        let fields = params.get("fields").map(|f| split_list(f)).unwrap_or_else(|| {
            ["email", "updatedAt", "createdAt", "firstName", "lastName"]
                .map(str::to_owned)
                .to_vec()
        });
        Ok(matched
            .into_iter()
            .take(self.cfg.batch_max)
            .map(|row| {
                let mut m = Map::new();
                m.insert("id".into(), row.get("id").cloned().unwrap_or(Value::Null));
                for f in &fields {
                    if let Some(v) = row.get(f).filter(|v| !v.is_null()) {
                        m.insert(f.clone(), v.clone());
                    }
                }
                Value::Object(m)
            })
            .collect())
    }

    /// Sync Leads: results carry no `seq` (§2.2); correlate by position.
    fn sync_leads(&mut self, req: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
        let action = req
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("createOrUpdate")
            .to_owned();
        if !matches!(
            action.as_str(),
            "createOrUpdate" | "createOnly" | "updateOnly" | "createDuplicate"
        ) {
            return Err(api_err("1003", format!("Invalid action '{action}'")));
        }
        let lookup = req
            .get("lookupField")
            .and_then(Value::as_str)
            .unwrap_or("email")
            .to_owned();
        let input = self.input(req)?.clone();
        // The leads by their lookup value, built once per call: a scan of every lead for each
        // record made a 300-record call over 50,000 leads the initial sync benchmark's
        // bottleneck. Leads this call creates join it.
        let mut by_lookup: HashMap<String, Vec<i64>> = HashMap::new();
        for (id, r) in &self.tables.leads {
            if let Some(v) = r.get(&lookup).and_then(text_of) {
                by_lookup.entry(v).or_default().push(*id);
            }
        }
        let mut out = Vec::with_capacity(input.len());
        for rec in &input {
            let outcome = (|| {
                let rec = rec.as_object().ok_or(("1003", "Invalid data".to_owned()))?;
                if action == "createDuplicate" {
                    let id = self.tables.insert_lead(without_id(rec));
                    if let Some(v) = rec.get(&lookup).and_then(text_of) {
                        by_lookup.entry(v).or_default().push(id);
                    }
                    return Ok(("created", id));
                }
                let value = rec
                    .get(&lookup)
                    .and_then(text_of)
                    .ok_or(("1003", format!("Value for lookup field '{lookup}' not specified")))?;
                let found: Vec<i64> = by_lookup.get(&value).cloned().unwrap_or_default();
                match (found.as_slice(), action.as_str()) {
                    ([_, _, ..], _) => Err(("1007", "Multiple lead match lookup criteria".to_owned())),
                    ([id], "createOnly") => {
                        let _ = id;
                        Err(("1005", "Lead already exists".to_owned()))
                    }
                    ([id], _) => {
                        let id = *id;
                        if let Some(row) = self.tables.leads.get_mut(&id) {
                            for (k, v) in rec {
                                if k != "id" {
                                    row.insert(k.clone(), v.clone());
                                }
                            }
                            row.insert("updatedAt".into(), Value::String(now_text()));
                        }
                        Ok(("updated", id))
                    }
                    ([], "updateOnly") => Err(("1004", "Lead not found".to_owned())),
                    ([], _) => {
                        let id = self.tables.insert_lead(without_id(rec));
                        by_lookup.entry(value).or_default().push(id);
                        Ok(("created", id))
                    }
                }
            })();
            out.push(match outcome {
                Ok((status, id)) => json!({ "id": id, "status": status }),
                Err((code, msg)) => skipped(None, code, &msg),
            });
        }
        Ok(out)
    }

    fn describe_opportunities(&self) -> Value {
        let mut fields: Vec<Value> = vec![
            json!({"name": "marketoGUID", "displayName": "Marketo GUID", "dataType": "string", "length": 36, "updateable": false}),
            json!({"name": "createdAt", "displayName": "Created At", "dataType": "datetime", "updateable": false}),
            json!({"name": "updatedAt", "displayName": "Updated At", "dataType": "datetime", "updateable": false}),
        ];
        for (name, display, data_type) in OPPORTUNITY_FIELDS {
            let mut f = json!({"name": name, "displayName": display, "dataType": data_type, "updateable": *name != "externalOpportunityId"});
            if *data_type == "string" {
                f["length"] = json!(if *name == "externalOpportunityId" { 50 } else { 255 });
            }
            fields.push(f);
        }
        for name in &self.cfg.extra_opportunity_fields {
            fields.push(json!({"name": name, "displayName": name, "dataType": "string", "length": 255, "updateable": true}));
        }
        json!({
            "name": "opportunity",
            "displayName": "Opportunity",
            "pluralName": "Opportunities",
            "idField": "marketoGUID",
            "dedupeFields": ["externalOpportunityId"],
            "searchableFields": [["externalOpportunityId"], ["marketoGUID"]],
            "fields": fields,
        })
    }

    fn usage(&self) -> Value {
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let date = time::OffsetDateTime::now_utc()
            .to_offset(time::UtcOffset::from_hms(-6, 0, 0).unwrap_or(time::UtcOffset::UTC))
            .format(&fmt)
            .unwrap_or_default();
        json!({
            "date": date,
            "total": self.quota_used,
            "users": [ { "userId": format!("{}@sim.example.com", self.cfg.client_id), "count": self.quota_used } ],
        })
    }

    fn dump(&self) -> Value {
        let roles: Vec<&Map<String, Value>> = self.tables.roles.values().collect();
        json!({
            "opportunities": self.tables.opportunities,
            "companies": self.tables.companies,
            "roles": roles,
            "leads": self.tables.leads.values().collect::<Vec<_>>(),
            "crmEnabled": self.cfg.crm_enabled,
            "quotaUsed": self.quota_used,
            "dailyQuota": self.cfg.daily_quota,
            "restCalls": self.calls.iter().filter(|c| c.is_rest()).count(),
            "tokensIssued": self.token_issued,
            "errorCounts": self.error_counts,
            "maxConcurrentSeen": self.max_inflight_seen,
        })
    }
}

fn describe_roles() -> Value {
    json!({
        "name": "opportunityRole",
        "displayName": "Opportunity Role",
        "idField": "marketoGUID",
        "dedupeFields": ["externalOpportunityId", "leadId", "role"],
        "searchableFields": [["externalOpportunityId", "leadId", "role"], ["marketoGUID"], ["leadId"], ["externalOpportunityId"]],
        "fields": [
            {"name": "marketoGUID", "displayName": "Marketo GUID", "dataType": "string", "length": 36, "updateable": false},
            {"name": "externalOpportunityId", "displayName": "External Opportunity Id", "dataType": "string", "length": 50, "updateable": false},
            {"name": "leadId", "displayName": "Lead Id", "dataType": "integer", "updateable": false},
            {"name": "role", "displayName": "Role", "dataType": "string", "length": 50, "updateable": false},
            {"name": "isPrimary", "displayName": "Is Primary", "dataType": "boolean", "updateable": true},
            {"name": "externalCreatedDate", "displayName": "External Created Date", "dataType": "datetime", "updateable": true},
        ],
    })
}

/// `id` is assigned by Marketo on create; a sent one is ignored.
fn without_id(rec: &Map<String, Value>) -> Map<String, Value> {
    let mut r = rec.clone();
    r.remove("id");
    r
}

/// Writes must be JSON (612 otherwise) and well formed (609).
fn json_body(content_type: &str, body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if !content_type.starts_with("application/json") {
        return Err(api_err("612", "Invalid Content Type"));
    }
    serde_json::from_slice(body).map_err(|_| api_err("609", "Invalid JSON"))
}

/// Injected record codes are free text; results need `&'static str`, so keep a small set and
/// fall back to 1003 for anything else.
fn leak_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1013", "1014", "1017", "1018", "1021",
        "1022", "1036",
    ];
    KNOWN.iter().find(|k| **k == code).copied().unwrap_or("1003")
}

/// The simulated instance's quota day: the calendar date at 12:00 AM CST, read as the fixed
/// UTC−6 offset (specs/marketo.md). Written apart from the client's own reckoning
/// (`marketo::limiter`), so that a mistake there shows up against the simulator.
fn quota_day(now: time::OffsetDateTime) -> time::Date {
    const CST: time::UtcOffset = time::macros::offset!(-6);
    now.to_offset(CST).date()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    struct Caller {
        http: reqwest::Client,
        sim: MarketoSimHandle,
        token: String,
    }

    async fn start(cfg: MarketoSimConfig) -> Caller {
        let sim = MarketoSim::start(cfg).await.unwrap();
        let http = reqwest::Client::new();
        let mut caller = Caller {
            http,
            sim,
            token: String::new(),
        };
        caller.token = caller.fetch_token().await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        caller
    }

    impl Caller {
        async fn fetch_token(&self) -> Value {
            let url = format!(
                "{}/identity/oauth/token?grant_type=client_credentials&client_id={}&client_secret={}",
                self.sim.base_url(),
                self.sim.client_id(),
                self.sim.client_secret()
            );
            self.http.get(url).send().await.unwrap().json().await.unwrap()
        }

        async fn post(&self, path: &str, body: Value) -> Value {
            self.http
                .post(format!("{}{path}", self.sim.base_url()))
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        }

        async fn get(&self, path_and_query: &str) -> Value {
            self.http
                .get(format!("{}{path_and_query}", self.sim.base_url()))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn assert_uuid_v4(v: &Value) {
        let u = uuid::Uuid::parse_str(v.as_str().unwrap()).unwrap();
        assert_eq!(u.get_version_num(), 4, "{v}");
    }

    #[tokio::test]
    async fn token_is_reused_until_it_expires_and_bad_credentials_get_401() {
        let c = start(MarketoSimConfig::default()).await;
        // §10.1: a second call returns the same token with its remaining life.
        let again = c.fetch_token().await;
        assert_eq!(again["access_token"], c.token.as_str());
        assert_eq!(again["token_type"], "bearer");
        assert!(again["expires_in"].as_u64().unwrap() <= 3600);
        assert!(c.token.contains(':'), "token looks like <uuid>:<suffix>");
        assert_eq!(c.sim.token_issued_count(), 1);

        let url = format!(
            "{}/identity/oauth/token?grant_type=client_credentials&client_id={}&client_secret=wrong",
            c.sim.base_url(),
            c.sim.client_id()
        );
        let resp = c.http.post(url).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");
        // Identity calls do not count against the quota.
        assert_eq!(c.sim.quota_used(), 0);
    }

    #[tokio::test]
    async fn sync_opportunities_mixed_outcomes_as_in_10_2() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim
            .add_opportunity(obj(json!({"externalOpportunityId": "OPP-0001", "name": "old"})));
        let answer = c
            .post(
                "/rest/v1/opportunities.json",
                json!({
                    "action": "createOrUpdate",
                    "dedupeBy": "dedupeFields",
                    "input": [
                        { "externalOpportunityId": "OPP-0001", "name": "Acme renewal FY27", "stage": "Negotiation",
                          "amount": 48000.0, "closeDate": "2026-12-15", "isClosed": false, "isWon": false,
                          "externalCompanyId": "ACCT-77", "externalSalesPersonId": "rep-12" },
                        { "externalOpportunityId": "OPP-0002", "name": "Globex expansion", "stage": "Closed Won",
                          "amount": 12500, "closeDate": "2026-09-30", "isClosed": true, "isWon": true,
                          "externalCompanyId": "ACCT-81" },
                        { "externalOpportunityId": "OPP-0003", "name": "Initech pilot", "pilotScore__c": 7 },
                        { "externalOpportunityId": "OPP-0004", "name": null }
                    ]
                }),
            )
            .await;
        assert_eq!(answer["success"], true);
        let rid = answer["requestId"].as_str().unwrap();
        assert!(rid.contains('#'), "{rid}");
        let r = answer["result"].as_array().unwrap();
        assert_eq!(r.len(), 4);
        for (i, item) in r.iter().enumerate() {
            assert_eq!(item["seq"], i);
        }
        assert_eq!(r[0]["status"], "updated");
        assert_uuid_v4(&r[0]["marketoGUID"]);
        assert_eq!(r[1]["status"], "created");
        assert_uuid_v4(&r[1]["marketoGUID"]);
        assert_eq!(r[2]["status"], "skipped");
        assert_eq!(r[2]["reasons"][0]["code"], "1006");
        assert!(r[2].get("marketoGUID").is_none());
        assert_eq!(r[3]["status"], "skipped");
        assert_eq!(r[3]["reasons"][0]["code"], "1002");
        let opps = c.sim.opportunities();
        assert_eq!(opps.len(), 2);
        assert_eq!(opps["OPP-0001"]["name"], "Acme renewal FY27");
        assert_eq!(opps["OPP-0002"]["isWon"], true);
    }

    #[tokio::test]
    async fn roles_need_their_opportunity_and_lead_as_in_10_3() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim
            .add_opportunity(obj(json!({"externalOpportunityId": "OPP-0001", "name": "Acme"})));
        assert_eq!(
            c.sim
                .add_lead(obj(json!({"id": 318581, "email": "a@example.com"}))),
            318581
        );
        assert_eq!(
            c.sim
                .add_lead(obj(json!({"id": 318592, "email": "b@example.com"}))),
            318592
        );
        let body = json!({
            "action": "createOrUpdate",
            "dedupeBy": "dedupeFields",
            "input": [
                { "externalOpportunityId": "OPP-0001", "leadId": 318581, "role": "Economic Buyer", "isPrimary": true },
                { "externalOpportunityId": "OPP-0001", "leadId": 318592, "role": "Technical Evaluator", "isPrimary": false },
                { "externalOpportunityId": "OPP-9999", "leadId": 318581, "role": "Champion", "isPrimary": false },
                { "externalOpportunityId": "OPP-0001", "leadId": 1, "role": "Champion", "isPrimary": false }
            ]
        });
        let first = c.post("/rest/v1/opportunities/roles.json", body.clone()).await;
        let r = first["result"].as_array().unwrap();
        assert_eq!(r[0]["status"], "created");
        assert_eq!(r[1]["status"], "created");
        assert_eq!(r[2]["status"], "skipped");
        assert_eq!(r[2]["reasons"][0]["code"], "1013");
        assert_eq!(r[3]["reasons"][0]["code"], "1013");
        let second = c.post("/rest/v1/opportunities/roles.json", body).await;
        assert_eq!(second["result"][0]["status"], "updated");
        assert_eq!(
            second["result"][0]["marketoGUID"],
            first["result"][0]["marketoGUID"]
        );
        assert_eq!(c.sim.roles().len(), 2);

        // Compound-key query: POST ?_method=GET with a JSON body (§4).
        let found = c
            .http
            .post(format!("{}/rest/v1/opportunities/roles.json?_method=GET", c.sim.base_url()))
            .bearer_auth(&c.token)
            .json(&json!({"filterType": "dedupeFields", "fields": ["isPrimary"],
                          "input": [{"externalOpportunityId": "OPP-0001", "leadId": 318581, "role": "Economic Buyer"}]}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(found["result"].as_array().unwrap().len(), 1);
        assert_eq!(found["result"][0]["isPrimary"], true);

        let deleted = c
            .post(
                "/rest/v1/opportunities/roles/delete.json",
                json!({"deleteBy": "dedupeFields", "input": [
                    {"externalOpportunityId": "OPP-0001", "leadId": 318592, "role": "Technical Evaluator"}]}),
            )
            .await;
        assert_eq!(deleted["result"][0]["status"], "deleted");
        assert_eq!(c.sim.roles().len(), 1);
    }

    #[tokio::test]
    async fn delete_reports_missing_records_as_skipped_1013_as_in_10_4() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim.add_opportunity(obj(
            json!({"externalOpportunityId": "OPP-0002", "name": "Globex"}),
        ));
        let answer = c
            .post(
                "/rest/v1/opportunities/delete.json",
                json!({"deleteBy": "dedupeFields", "input": [
                    {"externalOpportunityId": "OPP-0002"}, {"externalOpportunityId": "OPP-0404"}]}),
            )
            .await;
        let r = answer["result"].as_array().unwrap();
        assert_eq!(r[0]["seq"], 0);
        assert_eq!(r[0]["status"], "deleted");
        assert_uuid_v4(&r[0]["marketoGUID"]);
        assert_eq!(r[1]["status"], "skipped");
        assert_eq!(r[1]["reasons"][0]["code"], "1013");
        assert!(c.sim.opportunities().is_empty());
    }

    #[tokio::test]
    async fn rate_and_concurrency_limits_answer_606_and_615_as_in_10_5() {
        let c = start(MarketoSimConfig {
            calls_per_window: 2,
            max_concurrent: 1,
            ..Default::default()
        })
        .await;
        let query = "/rest/v1/opportunities.json?filterType=externalOpportunityId&filterValues=X";
        assert_eq!(c.get(query).await["success"], true);
        assert_eq!(c.get(query).await["success"], true);
        let third = c.get(query).await;
        assert_eq!(third["success"], false);
        assert_eq!(third["errors"][0]["code"], "606");
        assert_eq!(
            third["errors"][0]["message"],
            "Max rate limit '2' exceeded with in '20' secs"
        );
        assert_eq!(c.sim.count_606(), 1);

        let c = start(MarketoSimConfig {
            max_concurrent: 1,
            ..Default::default()
        })
        .await;
        c.sim.inject(Fault::Delay {
            delay: Duration::from_millis(300),
            times: 1,
        });
        let slow = c.get(query);
        let fast = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.get(query).await
        };
        let (slow, fast) = tokio::join!(slow, fast);
        assert_eq!(slow["success"], true);
        assert_eq!(fast["errors"][0]["code"], "615");
        assert_eq!(
            fast["errors"][0]["message"],
            "Concurrent access limit '1' reached"
        );
        assert_eq!(c.sim.count_615(), 1);
        assert_eq!(c.sim.max_concurrent_seen(), 1);
    }

    #[tokio::test]
    async fn daily_quota_answers_607() {
        let c = start(MarketoSimConfig {
            daily_quota: 1,
            ..Default::default()
        })
        .await;
        let query = "/rest/v1/opportunities.json?filterType=externalOpportunityId&filterValues=X";
        assert_eq!(c.get(query).await["success"], true);
        let over = c.get(query).await;
        assert_eq!(over["errors"][0]["code"], "607");
        assert_eq!(over["errors"][0]["message"], "Daily quota reached");
    }

    #[tokio::test]
    async fn invalid_and_expired_tokens_answer_601_and_602_as_in_10_6() {
        let mut c = start(MarketoSimConfig::default()).await;
        let query = "/rest/v1/opportunities.json?filterType=externalOpportunityId&filterValues=X";
        c.sim.inject(Fault::InvalidateToken);
        let answer = c.get(query).await;
        assert_eq!(answer["success"], false);
        assert_eq!(answer["errors"][0]["code"], "601");
        c.token = c.fetch_token().await["access_token"].as_str().unwrap().to_owned();
        assert_eq!(c.get(query).await["success"], true);
        c.sim.inject(Fault::ExpireTokenNow);
        assert_eq!(c.get(query).await["errors"][0]["code"], "602");
        assert_eq!(c.sim.token_issued_count(), 2);
        let fresh = c.fetch_token().await;
        assert_ne!(fresh["access_token"], c.token.as_str());
        assert_eq!(c.sim.token_issued_count(), 3);
    }

    #[tokio::test]
    async fn short_ttl_tokens_expire_by_themselves() {
        let c = start(MarketoSimConfig {
            token_ttl: Duration::from_millis(200),
            ..Default::default()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let answer = c.get("/rest/v1/opportunities/describe.json").await;
        assert_eq!(answer["errors"][0]["code"], "602");
    }

    #[tokio::test]
    async fn batch_and_body_limits() {
        let c = start(MarketoSimConfig {
            body_max_bytes: 2_000,
            ..Default::default()
        })
        .await;
        let too_many: Vec<Value> = (0..301)
            .map(|i| json!({"externalCompanyId": format!("A{i}")}))
            .collect();
        let small = c
            .post("/rest/v1/companies.json", json!({"input": too_many[..5]}))
            .await;
        assert_eq!(small["success"], true);
        let resp = c
            .http
            .post(format!("{}/rest/v1/companies.json", c.sim.base_url()))
            .bearer_auth(&c.token)
            .json(&json!({"input": too_many}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            413,
            "a body over the limit is refused at the HTTP level"
        );

        let c = start(MarketoSimConfig::default()).await;
        let too_many: Vec<Value> = (0..301)
            .map(|i| json!({"externalCompanyId": format!("A{i}")}))
            .collect();
        let answer = c
            .post("/rest/v1/companies.json", json!({"input": too_many}))
            .await;
        assert_eq!(answer["success"], false);
        assert_eq!(answer["errors"][0]["code"], "1003");
    }

    #[tokio::test]
    async fn companies_get_integer_ids_and_duplicates_get_1036() {
        let c = start(MarketoSimConfig::default()).await;
        let answer = c
            .post(
                "/rest/v1/companies.json",
                json!({"action": "createOrUpdate", "dedupeBy": "dedupeFields", "input": [
                    {"externalCompanyId": "ACCT-77", "company": "Acme"},
                    {"externalCompanyId": "ACCT-77", "company": "Acme again"}]}),
            )
            .await;
        assert_eq!(answer["result"][0]["status"], "created");
        assert!(answer["result"][0]["id"].is_i64());
        assert_eq!(answer["result"][1]["reasons"][0]["code"], "1036");
        let gone = c
            .post(
                "/rest/v1/companies/delete.json",
                json!({"deleteBy": "dedupeFields", "input": [{"externalCompanyId": "ACCT-00"}]}),
            )
            .await;
        assert_eq!(gone["result"][0]["reasons"][0]["code"], "1013");
        assert_eq!(gone["result"][0]["reasons"][0]["message"], "Record not found");
    }

    #[tokio::test]
    async fn lead_sync_results_have_no_seq_and_integer_ids() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim
            .add_lead(obj(json!({"email": "known@example.com", "firstName": "Kim"})));
        let answer = c
            .post(
                "/rest/v1/leads.json",
                json!({"action": "createOrUpdate", "lookupField": "email", "input": [
                    {"email": "known@example.com", "lastName": "Known"},
                    {"email": "new@example.com"},
                    {"firstName": "No email"}]}),
            )
            .await;
        let r = answer["result"].as_array().unwrap();
        assert_eq!(r[0]["status"], "updated");
        assert_eq!(r[1]["status"], "created");
        assert_eq!(r[2]["status"], "skipped");
        assert!(r.iter().all(|i| i.get("seq").is_none()));
        assert!(r[0]["id"].is_i64() && r[1]["id"].is_i64());

        let form = [
            ("filterType", "email"),
            ("filterValues", "known@example.com,new@example.com"),
            ("fields", "email,lastName"),
        ];
        let found: Value = c
            .http
            .post(format!("{}/rest/v1/leads.json?_method=GET", c.sim.base_url()))
            .bearer_auth(&c.token)
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rows = found["result"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["lastName"], "Known");
    }

    #[test]
    fn the_quota_day_turns_at_midnight_cst_and_agrees_with_the_client() {
        use time::macros::datetime;
        // 05:59:59 UTC is 23:59:59 CST the day before; 06:00 UTC is midnight CST.
        assert_eq!(
            quota_day(datetime!(2026-03-10 05:59:59 UTC)),
            time::macros::date!(2026 - 03 - 09)
        );
        assert_eq!(
            quota_day(datetime!(2026-03-10 06:00:00 UTC)),
            time::macros::date!(2026 - 03 - 10)
        );
        // In summer too (CST is written, not America/Chicago's CDT).
        assert_eq!(
            quota_day(datetime!(2026-07-01 05:30:00 UTC)),
            time::macros::date!(2026 - 06 - 30)
        );
        // The client's day number changes at the same instants as the simulator's date.
        let mut at = datetime!(2026-01-01 00:00:00 UTC);
        while at < datetime!(2026-01-04 00:00:00 UTC) {
            let next = at + time::Duration::minutes(30);
            assert_eq!(
                quota_day(at) == quota_day(next),
                crate::marketo::cst_day_of(at) == crate::marketo::cst_day_of(next),
                "at {at}"
            );
            at = next;
        }
    }

    #[tokio::test]
    async fn a_form_body_with_method_get_is_a_lead_query_like_the_get() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim
            .add_lead(obj(json!({"email": "known@example.com", "lastName": "Known"})));
        let get = c
            .get("/rest/v1/leads.json?filterType=email&filterValues=known@example.com,new@example.com&fields=email,lastName")
            .await;
        assert_eq!(get["success"], true, "{get}");
        // `_method=GET` in the form body, not in the URL.
        let form = [
            ("_method", "GET"),
            ("filterType", "email"),
            ("filterValues", "known@example.com,new@example.com"),
            ("fields", "email,lastName"),
        ];
        let post: Value = c
            .http
            .post(format!("{}/rest/v1/leads.json", c.sim.base_url()))
            .bearer_auth(&c.token)
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(post["success"], true, "{post}");
        assert_eq!(post["result"], get["result"]);
        assert_eq!(post["result"][0]["lastName"], "Known");
    }

    #[tokio::test]
    async fn crm_switch_skips_writes_with_1018() {
        let c = start(MarketoSimConfig::default()).await;
        c.sim.set_crm_enabled(true);
        let answer = c
            .post(
                "/rest/v1/opportunities.json",
                json!({"input": [{"externalOpportunityId": "A", "name": "x"}]}),
            )
            .await;
        assert_eq!(answer["result"][0]["reasons"][0]["code"], "1018");
        assert!(c.sim.opportunities().is_empty());
    }

    #[tokio::test]
    async fn wrong_content_type_bad_json_and_unknown_paths() {
        let c = start(MarketoSimConfig::default()).await;
        let text = |ct: &'static str, body: &'static str| {
            c.http
                .post(format!("{}/rest/v1/opportunities.json", c.sim.base_url()))
                .bearer_auth(&c.token)
                .header("content-type", ct)
                .body(body)
                .send()
        };
        let a: Value = text("text/plain", "{}").await.unwrap().json().await.unwrap();
        assert_eq!(a["errors"][0]["code"], "612");
        let b: Value = text("application/json", "{nope")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(b["errors"][0]["code"], "609");
        assert_eq!(c.get("/rest/v1/nothing.json").await["errors"][0]["code"], "610");
    }

    #[tokio::test]
    async fn describe_usage_and_state_dump() {
        let c = start(MarketoSimConfig::default()).await;
        let d = c.get("/rest/v1/opportunities/describe.json").await;
        assert_eq!(d["result"][0]["idField"], "marketoGUID");
        assert_eq!(d["result"][0]["dedupeFields"], json!(["externalOpportunityId"]));
        let u = c.get("/rest/v1/stats/usage.json").await;
        assert_eq!(u["result"][0]["total"], 2);
        let state: Value = c
            .http
            .get(format!("{}/_sim/state", c.sim.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(state["restCalls"], 2);
        assert_eq!(c.sim.call_count("/rest/v1/stats/usage.json"), 1);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_server() {
        let c = start(MarketoSimConfig::default()).await;
        let base = c.sim.base_url();
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fresh = reqwest::Client::new();
        assert!(fresh.get(format!("{base}/_sim/state")).send().await.is_err());
    }
}
