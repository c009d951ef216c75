//! Durable storage: the inbox of notifications, what oppsync knows of Dynamics rows, and the
//! pending Marketo writes. Two backends with one SQL text (`sql.rs`): SQLite (default, embedded,
//! WAL, intake fsync'd before it answers) and PostgreSQL (several replicas).

mod body;
mod group_commit;
mod sql;
mod sqlite_checkpoint;
mod sqlite_inbox;
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod suite;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

pub use body::{BodyCodec, PackedBody};
pub use group_commit::{GroupCommitter, IntakeError};
pub use sql::{PgStore, SqliteStore};
pub use sqlite_inbox::SqliteInbox;

pub use crate::rules::{Phase, WriteKey};

/// Group committers on PostgreSQL, each with a connection of intake's own pool. (SQLite has one
/// writer.)
pub const INTAKE_COMMITTERS_PG: usize = 4;

/// Largest SQLite log file (bytes) kept after a checkpoint.
pub(crate) const JOURNAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// Control key of the pause flag (`"true"` while pushing is paused).
const PAUSED: &str = "paused";

/// Whether an SQLite URL names an in-memory database (`sqlite::memory:`, `mode=memory`), which
/// intake's own connection could not share and which would lose the inbox at exit.
pub fn is_in_memory_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:") && (url.contains(":memory:") || url.contains("mode=memory"))
}

/// Milliseconds since the Unix epoch, the store's clock unit.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From intake's own SQLite connection (`SqliteInbox`).
    #[error("database error: {0}")]
    Sqlite(String),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported store url (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("the database schema is {0}; run `oppsync migrate` (or start with `serve --migrate`)")]
    Schema(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("could not make the inbox durable (fsync): {0}")]
    Sync(String),
    /// The store's files were deleted or replaced under the running process: what SQLite
    /// writes no longer reaches them.
    #[error("the store is gone: {0}")]
    Gone(String),
    /// The inbox's log could not be opened to sync it (e.g. no file descriptor free): the
    /// group is not known durable, but nothing failed to reach the disk.
    #[error("could not open the inbox log to sync it: {0}")]
    SyncOpen(String),
}

/// A notification to store, as intake decoded it.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub dedupe_key: String,
    pub entity: String,
    pub message: String,
    pub record_id: Uuid,
    pub version: i64,
    pub correlation_id: Option<String>,
    pub data_missing: bool,
    pub body: PackedBody,
    pub received_at: i64,
}

impl NewNotification {
    /// A row for a probe commit that is rolled back: never stored.
    pub fn probe() -> NewNotification {
        NewNotification {
            dedupe_key: format!("readiness-probe:{}", Uuid::new_v4()),
            entity: "opportunity".into(),
            message: "Update".into(),
            record_id: Uuid::nil(),
            version: 0,
            correlation_id: None,
            data_missing: false,
            body: PackedBody::pack(b"{}"),
            received_at: now_ms(),
        }
    }
}

/// What storing one notification did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Newly committed under this inbox id.
    Stored(i64),
    /// The same notification was already stored (a Dynamics retry or a re-run job).
    Duplicate,
}

/// Where a stored notification or Marketo write stands; stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Status {
    Pending,
    Done,
    Dead,
    Discarded,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Pending, Status::Done, Status::Dead, Status::Discarded];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Done => "done",
            Status::Dead => "dead",
            Status::Discarded => "discarded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

/// One stored notification.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InboxEntry {
    pub id: i64,
    pub dedupe_key: String,
    pub received_at: i64,
    pub entity: String,
    pub message: String,
    pub record_id: String,
    pub version: i64,
    pub correlation_id: Option<String>,
    pub data_missing: bool,
    pub status: Status,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub settled_at: Option<i64>,
    /// The raw body as Dynamics sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// A stored row of state (JSON owned by `rules`) with its revision for compare-and-swap.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    pub id: Uuid,
    pub revision: i64,
    pub state: String,
    /// Opportunities only: the last projection planned for Marketo.
    pub projection: Option<String>,
}

// The one codec of state rows: the rules' types (`OpportunityState`, `ContactState`, a
// `Projection`, …) as JSON text. Every reader and writer of `state` and `projection` goes
// through it, so a row this version cannot read is always the same `Corrupt` error.
impl StateRow {
    /// The row's state as the rules' type `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_str(&self.state)
            .map_err(|e| StoreError::Corrupt(format!("the state of {} cannot be read: {e}", self.id)))
    }

    /// The opportunity's last projection, if one was planned.
    pub fn decode_projection<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        self.projection
            .as_deref()
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    StoreError::Corrupt(format!("the projection of {} cannot be read: {e}", self.id))
                })
            })
            .transpose()
    }
}

/// A state or projection as a row stores it (see [`StateRow::decode`]).
pub fn encode_state<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("a state cannot be written: {e}")))
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoleRow {
    pub id: Uuid,
    pub name: String,
    pub category: i32,
}

/// Which rows to load for one notification or a batch of them.
#[derive(Debug, Clone, Default)]
pub struct RowKeys {
    pub opportunity_ids: Vec<Uuid>,
    pub connection_ids: Vec<Uuid>,
    pub contact_ids: Vec<Uuid>,
    /// Load every connection of these opportunities.
    pub connections_of_opportunities: Vec<Uuid>,
    /// Load every opportunity whose potential customer is one of these contacts.
    pub opportunities_with_customer: Vec<Uuid>,
    /// Load every connection that links one of these contacts.
    pub connections_of_contacts: Vec<Uuid>,
    pub role_ids: Vec<Uuid>,
    pub account_ids: Vec<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct LoadedRows {
    pub opportunities: Vec<StateRow>,
    pub connections: Vec<StateRow>,
    pub contacts: Vec<StateRow>,
    pub roles: Vec<RoleRow>,
    pub accounts: Vec<StateRow>,
}

/// A row to write in a commit. `expected_revision` None means "must not exist yet".
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub id: Uuid,
    pub expected_revision: Option<i64>,
    pub state: String,
    pub projection: Option<String>,
    /// Secondary index column: an opportunity's customer contact, a connection's opportunity.
    pub index: Option<Uuid>,
}

/// A Marketo write the plan asks for (coalesced by key).
#[derive(Debug, Clone)]
pub struct PlannedWrite {
    pub key: WriteKey,
    pub opportunity_id: Option<Uuid>,
    pub phase: Phase,
    pub payload: String,
}

/// Notifications a commit settles as done, all leased to `owner`.
#[derive(Debug, Clone)]
pub struct Settle {
    pub ids: Vec<i64>,
    pub owner: String,
}

impl Settle {
    pub fn one(id: i64, owner: &str) -> Settle {
        Settle {
            ids: vec![id],
            owner: owner.to_owned(),
        }
    }
}

/// Everything one planned notification (or a batch of them) changes, committed in one
/// transaction.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// The notifications to settle as done; the commit fails with `LeaseLost` unless every one
    /// of them is still leased to the owner.
    pub settle: Option<Settle>,
    pub opportunities: Vec<RowWrite>,
    pub connections: Vec<RowWrite>,
    pub contacts: Vec<RowWrite>,
    pub roles: Vec<RoleRow>,
    pub accounts: Vec<RowWrite>,
    pub writes: Vec<PlannedWrite>,
    /// The writes come from a background job (the initial sync, reconciliation): they are
    /// pushed after live ones of the same phase.
    pub background: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another worker changed one of the rows since they were loaded: reload and retry.
    #[error("a row changed concurrently")]
    Conflict,
    /// The notification's lease was lost (expired and claimed elsewhere).
    #[error("the notification's lease was lost")]
    LeaseLost,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CommitError {
    fn from(e: sqlx::Error) -> Self {
        CommitError::Store(StoreError::Database(e))
    }
}

/// How a notification left processing without a commit.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Try again at this time (a lookup or the store failed; never counted as lost).
    Retry { at: i64, error: String },
    /// Give up: a dead letter, visible and re-drivable through the admin API.
    Dead { error: String },
}

/// A stored Marketo write.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoredWrite {
    /// The Marketo record: `company:ID`, `lead:ID` (a contact's lead), `opportunity:ID` or
    /// `role:OPPORTUNITY:CONTACT:ROLE`.
    #[schema(value_type = String, example = "opportunity:7d5a1f9e-4a8b-4f7e-9c1d-2b3a4c5d6e7f")]
    pub key: WriteKey,
    pub opportunity_id: Option<String>,
    /// When it goes, relative to the other kinds of writes.
    pub phase: Phase,
    /// The write as JSON (a `rules::MarketoWrite`).
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub revision: i64,
    pub status: Status,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub updated_at: i64,
    /// Planned by a background job (the initial sync, reconciliation, a drift repair): pushed
    /// after live writes of its phase.
    pub background: bool,
}

/// How one pushed write settles.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Done,
    /// Retry later; `count_attempt` is false for waits that are not failures (rate limits).
    Retry {
        at: i64,
        error: String,
        count_attempt: bool,
    },
    Dead {
        error: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct StoreStats {
    pub inbox_pending: i64,
    /// Age in milliseconds of the oldest pending notification.
    pub inbox_oldest_pending_age_ms: Option<i64>,
    pub inbox_dead: i64,
    pub inbox_done: i64,
    pub writes_pending: i64,
    pub writes_oldest_pending_age_ms: Option<i64>,
    pub writes_dead: i64,
    pub writes_done: i64,
    /// The store's size on disk: SQLite's database file (its log not included), or the
    /// PostgreSQL tables with their indexes.
    pub store_bytes: Option<i64>,
    /// Age in milliseconds of the oldest notification retained (settled ones are deleted
    /// after `store.retention_days`).
    pub inbox_oldest_retained_age_ms: Option<i64>,
}

/// Whether the database schema matches this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    UpToDate,
    /// Migrations this binary has that the database lacks.
    Behind(usize),
    /// The database has migrations this binary does not know (a newer version ran).
    Ahead,
}

/// The right to push to Marketo. One replica at a time holds it, so the per-instance Marketo
/// limits hold for the whole deployment without a distributed rate limiter.
pub enum PushLease {
    /// SQLite: one process owns the file.
    Local,
    /// PostgreSQL: a session advisory lock on a dedicated connection. When the process dies its
    /// connection closes and PostgreSQL releases the lock, so another replica takes over.
    Postgres(sqlx::PgConnection),
}

/// Advisory lock key for the pusher ("oppsync" in ASCII).
const PUSH_LOCK_KEY: i64 = 0x006f_7070_7379_6e63;

impl PushLease {
    /// Whether the lease still holds (the lock's connection is alive).
    pub async fn is_held(&mut self) -> bool {
        match self {
            PushLease::Local => true,
            PushLease::Postgres(conn) => sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok(),
        }
    }
}

/// The store, on one of its backends.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

/// Whether a pooled connection may be handed out: not if sqlx still counts it inside a
/// transaction once its queued rollback has run (the pool flushes that on release). That happens
/// when the database rolled the transaction back by itself (SQLite does on "database or disk is
/// full" and I/O errors) and sqlx's own ROLLBACK then failed: every later BEGIN on that
/// connection would fail ("non-zero transaction depth") until a restart. Such a connection is
/// closed and replaced instead, so the worker recovers once space is back.
fn fit_for_use<C: sqlx::Connection>(conn: &mut C) -> bool {
    if conn.is_in_transaction() {
        tracing::warn!("a store connection left in an unknown transaction state is closed and replaced");
        false
    } else {
        true
    }
}

/// Creates the SQLite file, if it does not exist yet, readable and writable by its owner only
/// (0600): it holds contacts' names and emails. SQLite gives its log and shared-memory files the
/// database file's permissions. An existing file open to others is reported, not changed.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "the store file is readable by other users; it holds contact names and emails: chmod 600 it"
                );
            }
            Ok(())
        }
        Err(e) => Err(StoreError::Sqlite(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

/// The pool size `store.max_connections = 0` stands for. SQLite: 4. It has one writer at a
/// time, and its readers are the pusher, the admin API and the periodic jobs; every further
/// connection keeps a page cache, prepared statements and a thread (with its own malloc arena)
/// of its own. PostgreSQL: 8, shared by the same users over the network.
pub fn default_pool_size(url: &str) -> u32 {
    if url.starts_with("sqlite:") { 4 } else { 8 }
}

impl Store {
    /// Connects (creating an SQLite file if needed, mode 0600). Does not migrate.
    /// `max_connections`: the pool's size, 0 for [`default_pool_size`], at least 2.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let max_connections = match max_connections {
            0 => default_pool_size(url),
            n => n.max(2),
        };
        if url.starts_with("sqlite:") {
            // Intake's connection must open the same database: a file, not memory.
            if is_in_memory_sqlite(url) {
                return Err(StoreError::Sqlite(
                    "an in-memory SQLite store cannot be shared with intake's connection; use a file (sqlite://PATH)".into(),
                ));
            }
            let options = SqliteConnectOptions::from_str(url)?;
            create_private(options.get_filename())?;
            let options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // A new file gives the pages that retention frees back to the file system, a
                // few at a time (`Store::reclaim_space`); an older file reuses them instead.
                .auto_vacuum(SqliteAutoVacuum::Incremental)
                // The log is cut back to this size after a checkpoint, so a burst does not
                // leave a large file behind.
                .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string())
                // The log is checkpointed by a thread of the store's own, not by the commit
                // that fills it (`sqlite_checkpoint`).
                .pragma(
                    "wal_autocheckpoint",
                    sqlite_checkpoint::AUTOCHECKPOINT_FALLBACK_PAGES.to_string(),
                )
                // Multi-row statements keep a statement journal (to undo a half-done statement);
                // in memory it costs a copy, on disk a write per page touched.
                .pragma("temp_store", "memory");
            // NORMAL in WAL mode: durable against a crash of the process, not of the machine,
            // which only ever repeats re-derivable work (see `SqliteStore`'s `pool`). Intake
            // writes through its own connection, made durable by an explicit fsync before the
            // 2xx (DESIGN §3; see `SqliteInbox`).
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .before_acquire(|conn, _| Box::pin(async move { Ok(fit_for_use(conn)) }))
                .connect_with(options.clone().synchronous(SqliteSynchronous::Normal))
                .await?;
            // The pool has created the file and put it in WAL mode.
            let db = std::path::absolute(options.get_filename())
                .map_err(|e| StoreError::Sqlite(format!("cannot resolve the database path: {e}")))?;
            let inbox = SqliteInbox::open(&db)?;
            Ok(Store::Sqlite(SqliteStore::new(pool, std::sync::Arc::new(inbox))))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .before_acquire(|conn, _| Box::pin(async move { Ok(fit_for_use(conn)) }))
                .connect_with(options.clone())
                .await?;
            // Intake's own connections, one per committer: a webhook never waits for a
            // connection the worker holds, so its answer stays fast while planning is busy.
            let intake = PgPoolOptions::new()
                .max_connections(INTAKE_COMMITTERS_PG as u32)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?;
            Ok(Store::Postgres(PgStore::new(pool, intake)))
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Applies the migrations up to `version` only (upgrade tests).
    #[cfg(any(test, feature = "testing"))]
    pub async fn migrate_to(&self, version: i64) -> Result<(), StoreError> {
        dispatch!(self, s => s.migrate_to(version).await)
    }

    /// Tries to become the pushing replica; None when another replica is.
    pub async fn try_push_lease(&self) -> Result<Option<PushLease>, StoreError> {
        use sqlx::Connection;
        match self {
            Store::Sqlite(_) => Ok(Some(PushLease::Local)),
            Store::Postgres(s) => {
                let options = s.pool().connect_options();
                let mut conn = sqlx::PgConnection::connect_with(&options).await?;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(PUSH_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await?;
                Ok(got.then_some(PushLease::Postgres(conn)))
            }
        }
    }

    /// Nothing of oppsync's is in this database yet (no migration applied, no inbox table).
    pub async fn is_new(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.is_new().await)
    }

    pub async fn schema_state(&self) -> Result<SchemaState, StoreError> {
        dispatch!(self, s => s.schema_state().await)
    }

    /// Fails unless the schema is exactly what this binary expects.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        match self.schema_state().await? {
            SchemaState::UpToDate => Ok(()),
            SchemaState::Behind(n) => Err(StoreError::Schema(format!("missing {n} migration(s)"))),
            SchemaState::Ahead => Err(StoreError::Schema(
                "newer than this binary (a later oppsync version migrated it); upgrade oppsync".into(),
            )),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    /// Stores a batch in one transaction: the group commit. Committed when this returns, but
    /// on SQLite durable against a power cut only after [`SqliteInbox::sync`].
    /// Tries intake's commit path and undoes it: whether notifications can be stored now.
    pub async fn probe_intake(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.probe_intake().await)
    }

    pub async fn insert_notifications(&self, batch: &[NewNotification]) -> Result<Vec<Received>, StoreError> {
        dispatch!(self, s => s.insert_notifications(batch).await)
    }

    /// Leases up to `limit` ready notifications to `owner` until `now + lease_ms`.
    pub async fn claim_notifications(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        dispatch!(self, s => s.claim_notifications(owner, now, lease_ms, limit).await)
    }

    pub async fn renew_leases(&self, owner: &str, ids: &[i64], until: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.renew_leases(owner, ids, until).await)
    }

    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        dispatch!(self, s => s.release_leases(owner).await)
    }

    pub async fn load_rows(&self, keys: &RowKeys) -> Result<LoadedRows, StoreError> {
        dispatch!(self, s => s.load_rows(keys).await)
    }

    pub async fn commit(&self, commit: &Commit) -> Result<(), CommitError> {
        dispatch!(self, s => s.commit(commit).await)
    }

    pub async fn settle_notification(
        &self,
        id: i64,
        owner: &str,
        settlement: &Settlement,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.settle_notification(id, owner, settlement).await)
    }

    pub async fn ready_writes(&self, now: i64, limit: i64) -> Result<Vec<StoredWrite>, StoreError> {
        dispatch!(self, s => s.ready_writes(now, limit).await)
    }

    pub async fn write_statuses(&self, keys: &[WriteKey]) -> Result<HashMap<WriteKey, Status>, StoreError> {
        dispatch!(self, s => s.write_statuses(keys).await)
    }

    pub async fn settle_writes(&self, settled: &[(WriteKey, i64, WriteOutcome)]) -> Result<(), StoreError> {
        dispatch!(self, s => s.settle_writes(settled).await)
    }

    pub async fn lead_ids(&self, contact_ids: &[Uuid]) -> Result<HashMap<Uuid, i64>, StoreError> {
        dispatch!(self, s => s.lead_ids(contact_ids).await)
    }

    pub async fn save_lead_ids(&self, leads: &[(Uuid, i64)]) -> Result<(), StoreError> {
        dispatch!(self, s => s.save_lead_ids(leads).await)
    }

    pub async fn control(&self, key: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self, s => s.control(key).await)
    }

    pub async fn set_control(&self, key: &str, value: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_control(key, value).await)
    }

    /// Whether pushing to Marketo is paused (shared by every replica through the store).
    pub async fn paused(&self) -> Result<bool, StoreError> {
        Ok(self.control(PAUSED).await?.as_deref() == Some("true"))
    }

    pub async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.set_control(PAUSED, if paused { "true" } else { "false" })
            .await
    }

    pub async fn notification(&self, id: i64) -> Result<Option<InboxEntry>, StoreError> {
        dispatch!(self, s => s.notification(id).await)
    }

    /// Notifications with `status`, newest first, ids below `before` (paging).
    pub async fn list_notifications(
        &self,
        status: Option<Status>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        dispatch!(self, s => s.list_notifications(status, before, limit).await)
    }

    /// Puts dead (or discarded) notifications back to pending. `id` None: all dead ones,
    /// optionally only of `entity`. Returns how many.
    pub async fn retry_notifications(
        &self,
        id: Option<i64>,
        entity: Option<&str>,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.retry_notifications(id, entity, now_ms()).await)
    }

    pub async fn discard_notification(&self, id: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.discard_notification(id, now_ms()).await)
    }

    pub async fn list_writes(
        &self,
        status: Option<Status>,
        opportunity_id: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<StoredWrite>, StoreError> {
        dispatch!(self, s => s.list_writes(status, opportunity_id, limit).await)
    }

    /// Puts dead writes back to pending (`key` None: all dead ones). Returns how many.
    pub async fn retry_writes(&self, key: Option<&WriteKey>) -> Result<u64, StoreError> {
        dispatch!(self, s => s.retry_writes(key, now_ms()).await)
    }

    pub async fn discard_write(&self, key: &WriteKey) -> Result<u64, StoreError> {
        dispatch!(self, s => s.discard_write(key, now_ms()).await)
    }

    pub async fn opportunity_row(&self, id: Uuid) -> Result<Option<StateRow>, StoreError> {
        dispatch!(self, s => s.opportunity_row(id).await)
    }

    /// Puts writes back to pending, done ones included (drift repair). Returns how many.
    pub async fn requeue_writes(&self, keys: &[WriteKey]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.requeue_writes(keys, now_ms()).await)
    }

    /// Up to `limit` opportunity rows in id order after `after` (None: from the first).
    pub async fn opportunities_after(
        &self,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<StateRow>, StoreError> {
        dispatch!(self, s => s.opportunities_after(after, limit).await)
    }

    /// Counts by status and the oldest pending ages, read from counts kept by triggers and from
    /// the indexes of pending rows: its cost does not grow with the rows the tables keep.
    pub async fn stats(&self, now: i64) -> Result<StoreStats, StoreError> {
        dispatch!(self, s => s.stats(now).await)
    }

    /// Deletes up to `limit` settled notifications (done or discarded) settled before
    /// `before`, oldest first. Dead letters and pending ones are never deleted. Returns how many.
    pub async fn delete_settled(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.delete_settled(before, limit).await)
    }

    /// Gives free pages back to the file system, a few at a time (SQLite stores created with
    /// incremental auto-vacuum; PostgreSQL's autovacuum does this on its own).
    pub async fn reclaim_space(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.reclaim_space().await)
    }

    /// Whether a notification is ready to be planned now (those being planned included).
    pub async fn has_ready_notifications(&self, now: i64) -> Result<bool, StoreError> {
        dispatch!(self, s => s.has_ready_notifications(now).await)
    }

    /// Pending notifications and pending Marketo writes (the counts the triggers keep).
    pub async fn pending_counts(&self) -> Result<(i64, i64), StoreError> {
        dispatch!(self, s => s.pending_counts().await)
    }

    /// Pending Marketo writes planned by a background job (the initial sync).
    pub async fn pending_background_writes(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.pending_background_writes().await)
    }

    /// Opportunities oppsync knows, tombstones included (0 on a new store).
    pub async fn opportunity_count(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.opportunity_count().await)
    }

    /// True when nothing is left to do: no pending notification and no pending write.
    pub async fn is_idle(&self) -> Result<bool, StoreError> {
        Ok(self.pending_counts().await? == (0, 0))
    }
}

#[cfg(test)]
mod tests;
