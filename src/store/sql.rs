//! One SQL text, two backends. The statements are portable between SQLite and PostgreSQL
//! (`$N` placeholders, `ON CONFLICT`, `RETURNING`, times as epoch-ms integers bound from Rust),
//! so one generic implementation serves both and they cannot drift apart; what differs (how a
//! write transaction begins, `FOR UPDATE SKIP LOCKED`, the migrations, how intake writes) is
//! the small [`Backend`] trait.

use std::collections::HashMap;
use std::sync::Arc;

use futures::TryStreamExt;
use sqlx::Row;
use sqlx::migrate::Migrator;
use uuid::Uuid;

use super::body::PackedBody;
use super::{
    Commit, CommitError, InboxEntry, LoadedRows, NewNotification, Received, RoleRow, RowKeys, RowWrite,
    SchemaState, Settlement, SqliteInbox, StateRow, Status, StoreError, StoreStats, StoredWrite, WriteKey,
    WriteOutcome,
};
use crate::rules::Phase;

/// Rows per multi-row insert (PostgreSQL): 11 parameters each, well below its parameter limit
/// (65,535), and above the default group commit size, so a group commit is usually one
/// statement.
const INSERT_CHUNK: usize = 512;

/// Parameters bound per row by `PgStore::insert_notifications`, in this order.
const INSERT_COLUMNS: &str = "dedupe_key, received_at, entity, message, record_id, version, correlation_id, \
                              data_missing, body, body_codec, next_attempt_at";

/// `INSERT … VALUES ($1, …), (…) ON CONFLICT DO NOTHING RETURNING …` for `rows` notifications.
/// Built only from fixed fragments and placeholder numbers, never from data.
fn insert_sql(rows: usize) -> String {
    const PER_ROW: usize = 11;
    let mut sql = format!("INSERT INTO inbox (status, attempts, {INSERT_COLUMNS}) VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 {
            "('pending', 0"
        } else {
            ", ('pending', 0"
        });
        for p in r * PER_ROW + 1..=(r + 1) * PER_ROW {
            sql.push_str(&format!(", ${p}"));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, dedupe_key");
    sql
}

/// Values per `IN (…)` list: far below both backends' parameter limits. Longer lists go in
/// several statements.
const IN_CHUNK: usize = 128;

/// The lengths an `IN (…)` list is padded up to (by repeating its last value, which matches
/// nothing more), so that its statement recurs and stays prepared in sqlx's per-connection
/// cache. A list of any length used to be new SQL to compile each time: a tenth of the
/// planner's store work was SQLite parsing them. Few and short, because each stays in the
/// cache of each pooled connection: prepared on SQLite, a list of 8 placeholders holds about
/// 5 KB, of 32 about 9 KB, of 128 about 29 KB (of 500, 110 KB; measured with
/// `sqlite3_memory_used`), so about 43 KB for each statement of this kind on each connection.
const IN_LIST_SIZES: [usize; 3] = [8, 32, IN_CHUNK];

/// The padded length of an `IN` list of `n` values (`n` ≤ [`IN_CHUNK`]).
fn in_list_len(n: usize) -> usize {
    IN_LIST_SIZES.iter().copied().find(|&size| size >= n).unwrap_or(n)
}

/// `values` padded to [`in_list_len`] by repeating the last one.
fn padded<T>(values: &[T]) -> impl Iterator<Item = &T> {
    let pad = in_list_len(values.len()) - values.len();
    values.iter().chain(values.last().into_iter().cycle().take(pad))
}

/// `$first, $first+1, …` for `n` values: the inside of an `IN (…)` list, built only from
/// placeholder numbers, never from data.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `query` with `{}` replaced by an `IN` list for `n` values, placeholders from `$first`: the
/// list is [`in_list_len`] long, for values bound through [`padded`].
fn with_in_list(query: &str, first: usize, n: usize) -> String {
    query.replacen("{}", &placeholders(first, in_list_len(n)), 1)
}

/// Distinct ids as the text the tables key them by.
fn id_texts(ids: &[Uuid]) -> Vec<String> {
    let mut texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    texts.sort();
    texts.dedup();
    texts
}

/// Rows per multi-row statement of a commit or a settlement (at most 5 parameters each).
const ROW_CHUNK: usize = 200;

/// `($first, …), (…), …`: `rows` tuples of `cols` placeholders, numbered from `$first`. Built
/// only from placeholder numbers, never from data.
fn value_tuples(first: usize, rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(first + r * cols, cols)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `query` with `{}` replaced by `rows` tuples of `cols` placeholders from `$2` (`$1` is the
/// statement's one scalar, the time).
fn with_tuples(query: &str, rows: usize, cols: usize) -> String {
    query.replacen("{}", &value_tuples(2, rows, cols), 1)
}

// Multi-row statements of a commit: the rows arrive as a `VALUES` list named by a CTE (portable
// between SQLite ≥ 3.33 and PostgreSQL, unlike column aliases on a subquery). A compare-and-swap
// update matches `revision`; an insert of a row that must not exist yet does nothing on a
// conflict. Either way the count of rows changed tells whether every row was as expected.
// `WHERE true` keeps SQLite from reading `ON CONFLICT` as a join constraint.
const OPPORTUNITY_UPDATE: &str = "WITH v(id, rev, state, projection, idx) AS (VALUES {}) \
     UPDATE opportunities SET revision = opportunities.revision + 1, state = v.state, projection = v.projection, \
     customer_contact_id = v.idx, updated_at = $1 FROM v WHERE opportunities.id = v.id AND opportunities.revision = v.rev";
const OPPORTUNITY_INSERT: &str = "WITH v(id, state, projection, idx) AS (VALUES {}) \
     INSERT INTO opportunities (id, revision, state, projection, customer_contact_id, updated_at) \
     SELECT id, 1, state, projection, idx, $1 FROM v WHERE true ON CONFLICT (id) DO NOTHING";
const CONNECTION_UPDATE: &str = "WITH v(id, rev, state, idx) AS (VALUES {}) \
     UPDATE connections SET revision = connections.revision + 1, state = v.state, opportunity_id = v.idx, \
     updated_at = $1 FROM v WHERE connections.id = v.id AND connections.revision = v.rev";
const CONNECTION_INSERT: &str = "WITH v(id, state, idx) AS (VALUES {}) \
     INSERT INTO connections (id, revision, state, opportunity_id, updated_at) \
     SELECT id, 1, state, idx, $1 FROM v WHERE true ON CONFLICT (id) DO NOTHING";
const CONTACT_UPDATE: &str = "WITH v(id, rev, state) AS (VALUES {}) \
     UPDATE contacts SET revision = contacts.revision + 1, state = v.state, updated_at = $1 \
     FROM v WHERE contacts.id = v.id AND contacts.revision = v.rev";
const CONTACT_INSERT: &str = "WITH v(id, state) AS (VALUES {}) \
     INSERT INTO contacts (id, revision, state, updated_at) \
     SELECT id, 1, state, $1 FROM v WHERE true ON CONFLICT (id) DO NOTHING";
const ACCOUNT_UPDATE: &str = "WITH v(id, rev, state) AS (VALUES {}) \
     UPDATE accounts SET revision = accounts.revision + 1, state = v.state, updated_at = $1 \
     FROM v WHERE accounts.id = v.id AND accounts.revision = v.rev";
const ACCOUNT_INSERT: &str = "WITH v(id, state) AS (VALUES {}) \
     INSERT INTO accounts (id, revision, state, updated_at) \
     SELECT id, 1, state, $1 FROM v WHERE true ON CONFLICT (id) DO NOTHING";
// Coalescing: one row per Marketo record; a newer plan replaces the payload and bumps the
// revision (keys must be distinct within one statement). A write pending for live traffic stays
// live when a background job (the initial sync) plans the same record. A plan equal to the payload Marketo
// already took, or to the one still waiting, changes nothing: many opportunities plan the same
// company (or lead), and pushing it again would only spend calls.
const WRITE_UPSERT: &str = "WITH v(key, opp, phase, payload, bg) AS (VALUES {}) \
     INSERT INTO marketo_writes (key, opportunity_id, phase, payload, revision, status, attempts, \
     next_attempt_at, last_error, updated_at, background) SELECT key, opp, phase, payload, 1, 'pending', 0, $1, NULL, $1, bg \
     FROM v WHERE true ON CONFLICT (key) DO UPDATE SET opportunity_id = excluded.opportunity_id, \
     phase = excluded.phase, payload = excluded.payload, revision = marketo_writes.revision + 1, \
     status = 'pending', attempts = 0, next_attempt_at = excluded.next_attempt_at, last_error = NULL, \
     updated_at = excluded.updated_at, \
     background = CASE WHEN marketo_writes.status = 'pending' AND marketo_writes.background < excluded.background \
     THEN marketo_writes.background ELSE excluded.background END \
     WHERE marketo_writes.payload <> excluded.payload OR marketo_writes.status NOT IN ('pending', 'done')";
// Settling pushed writes: `revision = v.rev` leaves alone a write a newer plan replaced
// meanwhile; it is still pending and will be pushed on its own.
const WRITES_DONE: &str = "WITH v(key, rev) AS (VALUES {}) \
     UPDATE marketo_writes SET status = 'done', last_error = NULL, updated_at = $1 \
     FROM v WHERE marketo_writes.key = v.key AND marketo_writes.revision = v.rev";
const WRITES_RETRY: &str = "WITH v(key, rev, counted, at, error) AS (VALUES {}) \
     UPDATE marketo_writes SET attempts = marketo_writes.attempts + v.counted, next_attempt_at = v.at, \
     last_error = v.error, updated_at = $1 FROM v WHERE marketo_writes.key = v.key AND marketo_writes.revision = v.rev";
const WRITES_DEAD: &str = "WITH v(key, rev, error) AS (VALUES {}) \
     UPDATE marketo_writes SET status = 'dead', attempts = marketo_writes.attempts + 1, last_error = v.error, \
     updated_at = $1 FROM v WHERE marketo_writes.key = v.key AND marketo_writes.revision = v.rev";
const LEADS_UPSERT: &str = "WITH v(contact, lead) AS (VALUES {}) \
     INSERT INTO marketo_leads (contact_id, lead_id, updated_at) SELECT contact, lead, $1 FROM v WHERE true \
     ON CONFLICT (contact_id) DO UPDATE SET lead_id = excluded.lead_id, updated_at = excluded.updated_at";

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("bad uuid {s:?}: {e}")))
}

fn inbox_entry<R: Row>(row: &R, with_body: bool) -> Result<InboxEntry, StoreError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Status: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(InboxEntry {
        id: row.try_get("id")?,
        dedupe_key: row.try_get("dedupe_key")?,
        received_at: row.try_get("received_at")?,
        entity: row.try_get("entity")?,
        message: row.try_get("message")?,
        record_id: row.try_get("record_id")?,
        version: row.try_get("version")?,
        correlation_id: row.try_get("correlation_id")?,
        data_missing: row.try_get::<i64, _>("data_missing")? != 0,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        settled_at: row.try_get("settled_at")?,
        body: if with_body {
            let codec: String = row.try_get("body_codec")?;
            Some(PackedBody::unpack(&codec, row.try_get("body")?)?)
        } else {
            None
        },
    })
}

fn stored_write<R: Row>(row: &R) -> Result<StoredWrite, StoreError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Status: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let payload: String = row.try_get("payload")?;
    let key: String = row.try_get("key")?;
    let phase: i64 = row.try_get("phase")?;
    Ok(StoredWrite {
        key: key
            .parse()
            .map_err(|e: crate::rules::BadWriteKey| StoreError::Corrupt(e.to_string()))?,
        opportunity_id: row.try_get("opportunity_id")?,
        phase: Phase::from_number(phase)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown write phase {phase}")))?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("write payload is not JSON: {e}")))?,
        revision: row.try_get("revision")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        updated_at: row.try_get("updated_at")?,
        background: row.try_get::<i64, _>("background")? != 0,
    })
}

fn state_row<R: Row>(row: &R, with_projection: bool) -> Result<StateRow, StoreError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    Ok(StateRow {
        id: parse_uuid(&id)?,
        revision: row.try_get("revision")?,
        state: row.try_get("state")?,
        projection: if with_projection {
            row.try_get("projection")?
        } else {
            None
        },
    })
}

/// The claim of up to `$4` ready notifications, oldest first, with `$skip` appended to the
/// selection of its rows: one text for both backends, built at compile time.
macro_rules! claim_sql {
    ($skip:literal) => {
        concat!(
            "UPDATE inbox SET lease_owner = $1, lease_expires_at = $2, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM inbox WHERE status = 'pending' AND next_attempt_at <= $3 \
             AND (lease_expires_at IS NULL OR lease_expires_at < $3) ORDER BY next_attempt_at, id LIMIT $4",
            $skip,
            ") RETURNING id, dedupe_key, received_at, entity, message, record_id, version, correlation_id, \
             data_missing, status, attempts, next_attempt_at, last_error, settled_at, body, body_codec"
        )
    };
}

/// Pending writes ready to go, in push order (phase, live before background, oldest first),
/// read from `$table`: one text for both backends, built at compile time.
macro_rules! ready_writes_sql {
    ($table:literal) => {
        concat!(
            "SELECT key, opportunity_id, phase, payload, revision, status, attempts, next_attempt_at, \
             last_error, updated_at, background FROM ",
            $table,
            " WHERE status = 'pending' AND next_attempt_at <= $1 \
             ORDER BY phase, background, updated_at, key LIMIT $2"
        )
    };
}

/// What differs between the two backends. Everything else is [`SqlStore`]'s one SQL text.
pub trait Backend: sqlx::Database {
    /// What intake writes through (see `insert_notifications` of each backend).
    type Intake: Clone + Send + Sync + 'static;
    /// How a write transaction begins.
    const BEGIN_WRITE: &'static str;
    /// The claim of ready notifications (`claim_sql!` with what the backend appends to its row
    /// selection).
    const CLAIM: &'static str;
    /// One row, one column `bytes`: the store's size on disk.
    const SIZE: &'static str;
    /// Gives some free pages back to the file system, if the backend needs telling.
    const RECLAIM: Option<&'static str>;
    /// The inbox, as named by a statement that picks its rows by `id IN (…)` and also tests
    /// their status.
    const INBOX_BY_ID: &'static str;
    /// The pusher's read of ready writes (`ready_writes_sql!` with the table as the backend
    /// names it).
    const READY_WRITES: &'static str;
    fn migrator() -> Migrator;
}

impl Backend for sqlx::Sqlite {
    type Intake = Arc<SqliteInbox>;
    // IMMEDIATE takes the write lock up front: a deferred transaction that reads first and
    // writes later can fail with SQLITE_BUSY when another writer got in between.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const CLAIM: &'static str = claim_sql!("");
    const SIZE: &'static str =
        "SELECT page_count * page_size AS bytes FROM pragma_page_count(), pragma_page_size()";
    // At most 4,096 pages (16 MiB) per pass: each holds the write lock only briefly. A no-op
    // on a file made before incremental auto-vacuum (its free pages are reused instead).
    const RECLAIM: Option<&'static str> = Some("PRAGMA incremental_vacuum(4096)");
    // Without statistics SQLite prefers the `(status, next_attempt_at)` index for `status =
    // 'pending'` over the primary key once the id list is longer than a few values, and then
    // walks every pending notification: with a backlog of 100,000, each batch's settlement
    // read the whole backlog's index. NOT INDEXED still looks rows up by their rowid.
    const INBOX_BY_ID: &'static str = "inbox NOT INDEXED";
    // SQLite would rather take the `(status, next_attempt_at)` index and sort every pending
    // write than walk the partial index that is in push order already.
    const READY_WRITES: &'static str =
        ready_writes_sql!("marketo_writes INDEXED BY marketo_writes_push_order");
    fn migrator() -> Migrator {
        sqlx::migrate!("./migrations/sqlite")
    }
}

impl Backend for sqlx::Postgres {
    type Intake = sqlx::PgPool;
    const BEGIN_WRITE: &'static str = "BEGIN";
    // Several replicas claim at once: each skips rows another has locked instead of waiting.
    const CLAIM: &'static str = claim_sql!(" FOR UPDATE SKIP LOCKED");
    const SIZE: &'static str = "SELECT CAST(COALESCE(SUM(pg_total_relation_size(c.oid)), 0) AS BIGINT) AS bytes \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname IN ('inbox', 'opportunities', \
         'connections', 'contacts', 'accounts', 'connection_roles', 'marketo_writes', 'marketo_leads', \
         'control', 'status_counts')";
    const INBOX_BY_ID: &'static str = "inbox";
    const READY_WRITES: &'static str = ready_writes_sql!("marketo_writes");
    // Autovacuum makes deleted rows' space reusable.
    const RECLAIM: Option<&'static str> = None;
    fn migrator() -> Migrator {
        sqlx::migrate!("./migrations/postgres")
    }
}

/// Rows changed by a statement: sqlx has no trait for it, each backend's result has its own
/// method.
pub trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::sqlite::SqliteQueryResult::rows_affected(self)
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::postgres::PgQueryResult::rows_affected(self)
    }
}

/// The store on one backend.
pub struct SqlStore<DB: Backend> {
    /// Everything but intake's inserts. On SQLite its commits skip the fsync (`synchronous =
    /// NORMAL`): each is re-derivable from the durable inbox, so a power cut can only make work
    /// happen again, never lose it; intake's next fsync persists them anyway.
    pool: sqlx::Pool<DB>,
    /// What intake writes through.
    intake: DB::Intake,
}

pub type SqliteStore = SqlStore<sqlx::Sqlite>;
pub type PgStore = SqlStore<sqlx::Postgres>;

impl<DB: Backend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            intake: self.intake.clone(),
        }
    }
}

impl<DB: Backend> SqlStore<DB> {
    pub fn new(pool: sqlx::Pool<DB>, intake: DB::Intake) -> Self {
        SqlStore { pool, intake }
    }

    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
}

/// A table of Dynamics rows' state, as a commit writes it: a compare-and-swap update of the
/// rows it loaded (id, revision, state, then the optional columns), an insert of the rows new
/// to it (id, state, then the optional columns).
struct StateTable {
    update: &'static str,
    insert: &'static str,
    /// Rows carry the last projection planned (opportunities).
    projection: bool,
    /// Rows carry the secondary index column (`RowWrite::index`).
    index: bool,
}

const OPPORTUNITIES: StateTable = StateTable {
    update: OPPORTUNITY_UPDATE,
    insert: OPPORTUNITY_INSERT,
    projection: true,
    index: true,
};
const CONNECTIONS: StateTable = StateTable {
    update: CONNECTION_UPDATE,
    insert: CONNECTION_INSERT,
    projection: false,
    index: true,
};
const CONTACTS: StateTable = StateTable {
    update: CONTACT_UPDATE,
    insert: CONTACT_INSERT,
    projection: false,
    index: false,
};
const ACCOUNTS: StateTable = StateTable {
    update: ACCOUNT_UPDATE,
    insert: ACCOUNT_INSERT,
    projection: false,
    index: false,
};

/// Which table a lookup of `load_rows` reads, and so where its rows go.
#[derive(Clone, Copy)]
enum Loaded {
    Opportunity,
    Connection,
    Contact,
    Role,
    Account,
}

// The bounds say what the one SQL text needs of a backend: its connections execute queries,
// and the column types it binds and reads are the ones both backends have.
impl<DB> SqlStore<DB>
where
    DB: Backend,
    DB::Connection: sqlx::migrate::Migrate,
    DB: sqlx::database::HasStatementCache,
    DB::QueryResult: RowsAffected,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c str: sqlx::ColumnIndex<DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q, 'r> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'q, 'r> String: sqlx::Encode<'q, DB> + sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'q, 'r> Status: sqlx::Encode<'q, DB> + sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    // sqlx implements `Encode` of an `Option` per backend, not for every one.
    for<'q> Option<i64>: sqlx::Encode<'q, DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB>,
    for<'q> Option<Status>: sqlx::Encode<'q, DB>,
{
    /// Writes a commit's rows of one table: updates that must find the revision they loaded,
    /// inserts that must find no row. Any row not as expected fails the commit with
    /// `Conflict`.
    async fn write_state_rows(
        tx: &mut sqlx::Transaction<'static, DB>,
        table: &StateTable,
        rows: &[RowWrite],
        now: i64,
    ) -> Result<(), CommitError> {
        let (updates, inserts): (Vec<&RowWrite>, Vec<&RowWrite>) =
            rows.iter().partition(|w| w.expected_revision.is_some());
        let optional = usize::from(table.projection) + usize::from(table.index);
        for (rows, sql, columns) in [
            (&updates, table.update, 3 + optional),
            (&inserts, table.insert, 2 + optional),
        ] {
            for chunk in rows.chunks(ROW_CHUNK) {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(sql, chunk.len(), columns)))
                    .persistent(chunk.len() == ROW_CHUNK)
                    .bind(now);
                for w in chunk {
                    q = q.bind(w.id.to_string());
                    if let Some(revision) = w.expected_revision {
                        q = q.bind(revision);
                    }
                    q = q.bind(&w.state);
                    if table.projection {
                        q = q.bind(&w.projection);
                    }
                    if table.index {
                        q = q.bind(w.index.map(|u| u.to_string()));
                    }
                }
                if q.execute(&mut **tx).await?.rows_affected() != chunk.len() as u64 {
                    return Err(CommitError::Conflict);
                }
            }
        }
        Ok(())
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        DB::migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Applies the migrations up to `version` only (upgrade tests).
    #[cfg(any(test, feature = "testing"))]
    pub async fn migrate_to(&self, version: i64) -> Result<(), StoreError> {
        DB::migrator().run_to(version, &self.pool).await?;
        Ok(())
    }

    pub async fn schema_state(&self) -> Result<SchemaState, StoreError> {
        let migrator = DB::migrator();
        let known: Vec<i64> = migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| m.version)
            .collect();
        let applied: Vec<i64> = match sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = true")
            .fetch_all(&self.pool)
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(|r| r.try_get::<i64, _>("version"))
                .collect::<Result<_, _>>()?,
            // No migrations table yet: nothing applied.
            Err(sqlx::Error::Database(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if applied.iter().any(|v| !known.contains(v)) {
            return Ok(SchemaState::Ahead);
        }
        let missing = known.iter().filter(|v| !applied.contains(v)).count();
        Ok(if missing == 0 {
            SchemaState::UpToDate
        } else {
            SchemaState::Behind(missing)
        })
    }

    /// Nothing of oppsync's is in this database yet: no migration applied and no
    /// inbox table (a new SQLite file, an empty PostgreSQL database).
    pub async fn is_new(&self) -> Result<bool, StoreError> {
        let applied: i64 = match sqlx::query("SELECT COUNT(*) AS n FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
        {
            Ok(row) => row.try_get("n")?,
            // No migrations table yet.
            Err(sqlx::Error::Database(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        if applied > 0 {
            return Ok(false);
        }
        match sqlx::query("SELECT 1 FROM inbox LIMIT 1")
            .fetch_optional(&self.pool)
            .await
        {
            Ok(_) => Ok(false),
            Err(sqlx::Error::Database(_)) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Reachable and the inbox readable (what intake needs).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT id FROM inbox LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    /// Oldest ready first, in the order of the `(status, next_attempt_at)` index, so the
    /// scan stops after `limit` claimable rows instead of reading (for the lease check)
    /// and sorting every pending one.
    pub async fn claim_notifications(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        let rows = sqlx::query(DB::CLAIM)
            .bind(owner)
            .bind(now + lease_ms)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut entries = rows
            .iter()
            .map(|r| inbox_entry(r, true))
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }

    pub async fn renew_leases(&self, owner: &str, ids: &[i64], until: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        let mut n = 0;
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = with_in_list(
                &format!(
                    "UPDATE {} SET lease_expires_at = $1 WHERE lease_owner = $2 AND status = 'pending' AND id IN ({{}})",
                    DB::INBOX_BY_ID
                ),
                3,
                chunk.len(),
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .persistent(true)
                .bind(until)
                .bind(owner);
            for id in padded(chunk) {
                q = q.bind(id);
            }
            n += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Gives back every lease `owner` holds (graceful shutdown), so another worker can
    /// take the notifications at once instead of after the lease expires.
    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE inbox SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1 AND status = 'pending'",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Loads the rows `keys` name with one `IN (…)` query per kind of key (per
    /// `IN_CHUNK` values): a batch of notifications costs a handful of round trips, not
    /// one per row.
    pub async fn load_rows(&self, keys: &RowKeys) -> Result<LoadedRows, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut out = LoadedRows::default();
        let mut seen_opportunities = std::collections::BTreeSet::new();
        let mut seen_connections = std::collections::BTreeSet::new();
        let mut seen_contacts = std::collections::BTreeSet::new();
        let lookups: [(&[Uuid], &str, Loaded); 8] = [
            (
                &keys.opportunity_ids,
                "SELECT id, revision, state, projection FROM opportunities WHERE id IN ({})",
                Loaded::Opportunity,
            ),
            (
                &keys.opportunities_with_customer,
                "SELECT id, revision, state, projection FROM opportunities WHERE customer_contact_id IN ({})",
                Loaded::Opportunity,
            ),
            (
                &keys.connection_ids,
                "SELECT id, revision, state FROM connections WHERE id IN ({})",
                Loaded::Connection,
            ),
            (
                &keys.connections_of_opportunities,
                "SELECT id, revision, state FROM connections WHERE opportunity_id IN ({})",
                Loaded::Connection,
            ),
            (
                &keys.connections_of_contacts,
                "SELECT id, revision, state FROM connections WHERE contact_id IN ({})",
                Loaded::Connection,
            ),
            (
                &keys.contact_ids,
                "SELECT id, revision, state FROM contacts WHERE id IN ({})",
                Loaded::Contact,
            ),
            (
                &keys.role_ids,
                "SELECT id, name, category FROM connection_roles WHERE id IN ({})",
                Loaded::Role,
            ),
            (
                &keys.account_ids,
                "SELECT id, revision, state FROM accounts WHERE id IN ({})",
                Loaded::Account,
            ),
        ];
        for (ids, query, table) in lookups {
            for chunk in id_texts(ids).chunks(IN_CHUNK) {
                let sql = with_in_list(query, 1, chunk.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(true);
                for id in padded(chunk) {
                    q = q.bind(id);
                }
                for r in q.fetch_all(&mut *conn).await? {
                    // A row may match several lookups (an opportunity by id and by customer):
                    // each is loaded once.
                    match table {
                        Loaded::Opportunity => {
                            let row = state_row(&r, true)?;
                            if seen_opportunities.insert(row.id) {
                                out.opportunities.push(row);
                            }
                        }
                        Loaded::Connection => {
                            let row = state_row(&r, false)?;
                            if seen_connections.insert(row.id) {
                                out.connections.push(row);
                            }
                        }
                        Loaded::Contact => {
                            let row = state_row(&r, false)?;
                            if seen_contacts.insert(row.id) {
                                out.contacts.push(row);
                            }
                        }
                        Loaded::Account => out.accounts.push(state_row(&r, false)?),
                        Loaded::Role => {
                            let id: String = r.try_get("id")?;
                            out.roles.push(RoleRow {
                                id: parse_uuid(&id)?,
                                name: r.try_get("name")?,
                                category: i32::try_from(r.try_get::<i64, _>("category")?)
                                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                            });
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    pub async fn commit(&self, commit: &Commit) -> Result<(), CommitError> {
        let now = super::now_ms();
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        if let Some(settle) = &commit.settle {
            let mut ids = settle.ids.clone();
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(IN_CHUNK) {
                let sql = with_in_list(
                    &format!(
                        "UPDATE {} SET status = 'done', settled_at = $1, lease_owner = NULL, lease_expires_at = NULL, \
                         last_error = NULL WHERE lease_owner = $2 AND status = 'pending' AND id IN ({{}})",
                        DB::INBOX_BY_ID
                    ),
                    3,
                    chunk.len(),
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .persistent(true)
                    .bind(now)
                    .bind(&settle.owner);
                for id in padded(chunk) {
                    q = q.bind(id);
                }
                // Every one of them, or none: a notification whose lease went to another
                // worker must not be settled by this plan.
                if q.execute(&mut *tx).await?.rows_affected() != chunk.len() as u64 {
                    return Err(CommitError::LeaseLost);
                }
            }
        }
        // One statement per kind of row and chunk, not one per row: on SQLite the write
        // lock is held for the whole transaction, and intake waits for it.
        Self::write_state_rows(&mut tx, &OPPORTUNITIES, &commit.opportunities, now).await?;
        Self::write_state_rows(&mut tx, &CONNECTIONS, &commit.connections, now).await?;
        Self::write_state_rows(&mut tx, &CONTACTS, &commit.contacts, now).await?;
        Self::write_state_rows(&mut tx, &ACCOUNTS, &commit.accounts, now).await?;
        for r in &commit.roles {
            sqlx::query(
                "INSERT INTO connection_roles (id, name, category, fetched_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, category = excluded.category, \
                 fetched_at = excluded.fetched_at",
            )
            .bind(r.id.to_string())
            .bind(&r.name)
            .bind(i64::from(r.category))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        // Several plans of one record in one commit: the last one wins, as if committed
        // one after the other.
        let mut last_of_key: HashMap<&WriteKey, usize> = HashMap::with_capacity(commit.writes.len());
        for (i, w) in commit.writes.iter().enumerate() {
            last_of_key.insert(&w.key, i);
        }
        let writes: Vec<&super::PlannedWrite> = commit
            .writes
            .iter()
            .enumerate()
            .filter(|(i, w)| last_of_key.get(&w.key) == Some(i))
            .map(|(_, w)| w)
            .collect();
        for chunk in writes.chunks(ROW_CHUNK) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(WRITE_UPSERT, chunk.len(), 5)))
                .persistent(chunk.len() == ROW_CHUNK)
                .bind(now);
            for w in chunk {
                q = q
                    .bind(w.key.to_string())
                    .bind(w.opportunity_id.map(|u| u.to_string()))
                    .bind(w.phase.number())
                    .bind(&w.payload)
                    .bind(i64::from(commit.background));
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn settle_notification(
        &self,
        id: i64,
        owner: &str,
        settlement: &Settlement,
    ) -> Result<(), StoreError> {
        let now = super::now_ms();
        match settlement {
            Settlement::Retry { at, error } => {
                sqlx::query(
                    "UPDATE inbox SET next_attempt_at = $1, last_error = $2, lease_owner = NULL, \
                     lease_expires_at = NULL WHERE id = $3 AND lease_owner = $4 AND status = 'pending'",
                )
                .bind(at)
                .bind(error)
                .bind(id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
            }
            Settlement::Dead { error } => {
                sqlx::query(
                    "UPDATE inbox SET status = 'dead', last_error = $1, settled_at = $2, lease_owner = NULL, \
                     lease_expires_at = NULL WHERE id = $3 AND lease_owner = $4 AND status = 'pending'",
                )
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    pub async fn ready_writes(&self, now: i64, limit: i64) -> Result<Vec<StoredWrite>, StoreError> {
        // Each row is decoded as it arrives: the raw rows of a large read are never all held.
        let mut rows = sqlx::query(DB::READY_WRITES)
            .bind(now)
            .bind(limit)
            .fetch(&self.pool);
        let mut writes = Vec::new();
        while let Some(row) = rows.try_next().await? {
            writes.push(stored_write(&row)?);
        }
        Ok(writes)
    }

    pub async fn write_statuses(&self, keys: &[WriteKey]) -> Result<HashMap<WriteKey, Status>, StoreError> {
        let mut keys: Vec<String> = keys.iter().map(WriteKey::to_string).collect();
        keys.sort();
        keys.dedup();
        let mut conn = self.pool.acquire().await?;
        let mut out = HashMap::new();
        for chunk in keys.chunks(IN_CHUNK) {
            let sql = with_in_list(
                "SELECT key, status FROM marketo_writes WHERE key IN ({})",
                1,
                chunk.len(),
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(true);
            for key in padded(chunk) {
                q = q.bind(key);
            }
            for r in q.fetch_all(&mut *conn).await? {
                let key: String = r.try_get("key")?;
                if let Ok(key) = key.parse() {
                    out.insert(key, r.try_get("status")?);
                }
            }
        }
        Ok(out)
    }

    pub async fn settle_writes(&self, settled: &[(WriteKey, i64, WriteOutcome)]) -> Result<(), StoreError> {
        let now = super::now_ms();
        let mut done = Vec::new();
        let mut retry = Vec::new();
        let mut dead = Vec::new();
        for item in settled {
            match &item.2 {
                WriteOutcome::Done => done.push(item),
                WriteOutcome::Retry { .. } => retry.push(item),
                WriteOutcome::Dead { .. } => dead.push(item),
            }
        }
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        for chunk in done.chunks(ROW_CHUNK) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(WRITES_DONE, chunk.len(), 2)))
                .persistent(chunk.len() == ROW_CHUNK)
                .bind(now);
            for (key, revision, _) in chunk {
                q = q.bind(key.to_string()).bind(revision);
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in retry.chunks(ROW_CHUNK) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(WRITES_RETRY, chunk.len(), 5)))
                .persistent(chunk.len() == ROW_CHUNK)
                .bind(now);
            for (key, revision, outcome) in chunk {
                if let WriteOutcome::Retry {
                    at,
                    error,
                    count_attempt,
                } = outcome
                {
                    q = q
                        .bind(key.to_string())
                        .bind(revision)
                        .bind(i64::from(*count_attempt))
                        .bind(at)
                        .bind(error);
                }
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in dead.chunks(ROW_CHUNK) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(WRITES_DEAD, chunk.len(), 3)))
                .persistent(chunk.len() == ROW_CHUNK)
                .bind(now);
            for (key, revision, outcome) in chunk {
                if let WriteOutcome::Dead { error } = outcome {
                    q = q.bind(key.to_string()).bind(revision).bind(error);
                }
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn lead_ids(&self, contact_ids: &[Uuid]) -> Result<HashMap<Uuid, i64>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut out = HashMap::new();
        for chunk in id_texts(contact_ids).chunks(IN_CHUNK) {
            let sql = with_in_list(
                "SELECT contact_id, lead_id FROM marketo_leads WHERE contact_id IN ({})",
                1,
                chunk.len(),
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(true);
            for id in padded(chunk) {
                q = q.bind(id);
            }
            for r in q.fetch_all(&mut *conn).await? {
                let contact: String = r.try_get("contact_id")?;
                out.insert(parse_uuid(&contact)?, r.try_get::<i64, _>("lead_id")?);
            }
        }
        Ok(out)
    }

    pub async fn save_lead_ids(&self, leads: &[(Uuid, i64)]) -> Result<(), StoreError> {
        let now = super::now_ms();
        // One row per contact (a statement may not upsert one row twice): the last wins.
        let mut by_contact: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
        for (contact, lead) in leads {
            by_contact.insert(contact.to_string(), *lead);
        }
        let rows: Vec<(String, i64)> = by_contact.into_iter().collect();
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        for chunk in rows.chunks(ROW_CHUNK) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(with_tuples(LEADS_UPSERT, chunk.len(), 2)))
                .persistent(chunk.len() == ROW_CHUNK)
                .bind(now);
            for (contact, lead) in chunk {
                q = q.bind(contact).bind(lead);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn control(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM control WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    pub async fn set_control(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO control (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn notification(&self, id: i64) -> Result<Option<InboxEntry>, StoreError> {
        let row = sqlx::query(
            "SELECT id, dedupe_key, received_at, entity, message, record_id, version, correlation_id, \
             data_missing, status, attempts, next_attempt_at, last_error, settled_at, body, body_codec FROM inbox WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| inbox_entry(&r, true)).transpose()
    }

    pub async fn list_notifications(
        &self,
        status: Option<Status>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, dedupe_key, received_at, entity, message, record_id, version, correlation_id, \
             data_missing, status, attempts, next_attempt_at, last_error, settled_at FROM inbox \
             WHERE ($1 IS NULL OR status = $1) AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(status)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| inbox_entry(r, false)).collect()
    }

    pub async fn retry_notifications(
        &self,
        id: Option<i64>,
        entity: Option<&str>,
        now: i64,
    ) -> Result<u64, StoreError> {
        let q = match id {
            Some(id) => sqlx::query(
                "UPDATE inbox SET status = 'pending', attempts = 0, next_attempt_at = $1, settled_at = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL WHERE id = $2 AND status IN ('dead', 'discarded')",
            )
            .bind(now)
            .bind(id),
            None => sqlx::query(
                "UPDATE inbox SET status = 'pending', attempts = 0, next_attempt_at = $1, settled_at = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL WHERE status = 'dead' AND ($2 IS NULL OR entity = $2)",
            )
            .bind(now)
            .bind(entity),
        };
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    pub async fn discard_notification(&self, id: i64, now: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE inbox SET status = 'discarded', settled_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND status IN ('dead', 'pending')",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn list_writes(
        &self,
        status: Option<Status>,
        opportunity_id: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<StoredWrite>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, opportunity_id, phase, payload, revision, status, attempts, next_attempt_at, \
             last_error, updated_at, background FROM marketo_writes WHERE ($1 IS NULL OR status = $1) \
             AND ($2 IS NULL OR opportunity_id = $2) ORDER BY updated_at DESC, key LIMIT $3",
        )
        .bind(status)
        .bind(opportunity_id.map(|u| u.to_string()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored_write).collect()
    }

    pub async fn retry_writes(&self, key: Option<&WriteKey>, now: i64) -> Result<u64, StoreError> {
        let key = key.map(WriteKey::to_string);
        Ok(sqlx::query(
            "UPDATE marketo_writes SET status = 'pending', attempts = 0, next_attempt_at = $1, updated_at = $1 \
             WHERE status IN ('dead', 'discarded') AND ($2 IS NULL OR key = $2) AND ($2 IS NOT NULL OR status = 'dead')",
        )
        .bind(now)
        .bind(key)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn discard_write(&self, key: &WriteKey, now: i64) -> Result<u64, StoreError> {
        let key = key.to_string();
        Ok(sqlx::query(
            "UPDATE marketo_writes SET status = 'discarded', updated_at = $1 WHERE key = $2 AND status IN ('dead', 'pending')",
        )
        .bind(now)
        .bind(key)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn opportunity_row(&self, id: Uuid) -> Result<Option<StateRow>, StoreError> {
        let row = sqlx::query("SELECT id, revision, state, projection FROM opportunities WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| state_row(&r, true)).transpose()
    }

    /// Puts writes back to pending, done ones included (a drift repair: Marketo lost what
    /// it took). Returns how many.
    pub async fn requeue_writes(&self, keys: &[WriteKey], now: i64) -> Result<u64, StoreError> {
        let keys: Vec<String> = keys.iter().map(WriteKey::to_string).collect();
        let mut n = 0;
        for chunk in keys.chunks(IN_CHUNK) {
            let sql = with_in_list(
                "UPDATE marketo_writes SET status = 'pending', revision = revision + 1, attempts = 0, \
                 next_attempt_at = $1, last_error = NULL, updated_at = $1 WHERE status <> 'pending' AND key IN ({})",
                2,
                chunk.len(),
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(true).bind(now);
            for key in padded(chunk) {
                q = q.bind(key);
            }
            n += q.execute(&self.pool).await?.rows_affected();
        }
        Ok(n)
    }

    /// Up to `limit` opportunity rows in id order after `after` (a sweep over all of them).
    pub async fn opportunities_after(
        &self,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<StateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, revision, state, projection FROM opportunities WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.map(|u| u.to_string()).unwrap_or_default())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| state_row(r, true)).collect()
    }

    /// Settled notifications, oldest first, on the `inbox_settled` index: one short statement
    /// per call, so intake (which needs the same write lock on SQLite) waits at most one batch.
    pub async fn delete_settled(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE status IN ('done', 'discarded') \
             AND settled_at < $1 ORDER BY settled_at LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn reclaim_space(&self) -> Result<(), StoreError> {
        if let Some(statement) = DB::RECLAIM {
            sqlx::query(statement).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Whether a notification is ready to be planned now (claimed ones included): the first
    /// entry of the `(status, next_attempt_at)` index, however long the backlog.
    pub async fn has_ready_notifications(&self, now: i64) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM inbox WHERE status = 'pending' AND next_attempt_at <= $1 LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Pending Marketo writes planned by a background job.
    pub async fn pending_background_writes(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM marketo_writes WHERE status = 'pending' AND background = 1",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Opportunities oppsync knows (tombstones included).
    pub async fn opportunity_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM opportunities")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Pending notifications and pending writes, from `status_counts` (kept by triggers in the
    /// same transactions): a few rows read, not the backlog (waiting loops poll this).
    pub async fn pending_counts(&self) -> Result<(i64, i64), StoreError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(CASE WHEN tbl = 'inbox' THEN n END), 0) AS BIGINT) AS inbox, \
             CAST(COALESCE(SUM(CASE WHEN tbl = 'marketo_writes' THEN n END), 0) AS BIGINT) AS writes \
             FROM status_counts WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("inbox")?, row.try_get("writes")?))
    }

    /// Counts from `status_counts` (kept by triggers) and the oldest pending rows from
    /// the partial indexes of pending rows: a handful of rows read, however many
    /// settled rows the tables keep.
    pub async fn stats(&self, now: i64) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        let rows = sqlx::query(
            "SELECT tbl, status, CAST(SUM(n) AS BIGINT) AS n FROM status_counts GROUP BY tbl, status",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let table: String = r.try_get("tbl")?;
            let status: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            match (table.as_str(), status.as_str()) {
                ("inbox", "pending") => stats.inbox_pending = n,
                ("inbox", "dead") => stats.inbox_dead = n,
                ("inbox", "done") => stats.inbox_done = n,
                ("marketo_writes", "pending") => stats.writes_pending = n,
                ("marketo_writes", "dead") => stats.writes_dead = n,
                ("marketo_writes", "done") => stats.writes_done = n,
                _ => {}
            }
        }
        let row = sqlx::query(
            "SELECT (SELECT MIN(received_at) FROM inbox WHERE status = 'pending') AS inbox, \
             (SELECT MIN(updated_at) FROM marketo_writes WHERE status = 'pending') AS writes",
        )
        .fetch_one(&self.pool)
        .await?;
        let age = |oldest: Option<i64>| oldest.map(|o| (now - o).max(0));
        stats.inbox_oldest_pending_age_ms = age(row.try_get("inbox")?);
        stats.writes_oldest_pending_age_ms = age(row.try_get("writes")?);
        // The first row by id: the oldest kept (ids follow arrival), read on the primary key.
        let oldest: Option<i64> = sqlx::query_scalar("SELECT received_at FROM inbox ORDER BY id LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        stats.inbox_oldest_retained_age_ms = age(oldest);
        stats.store_bytes = Some(sqlx::query_scalar(DB::SIZE).fetch_one(&self.pool).await?);
        Ok(stats)
    }
}

impl SqliteStore {
    /// Intake's writer: the inbox's own connection (see `sqlite_inbox`).
    pub fn inbox(&self) -> &std::sync::Arc<SqliteInbox> {
        &self.intake
    }

    /// Inserts a group in one transaction (SQLite: through intake's own connection, on a
    /// blocking thread). Committed, but durable against a power cut only after
    /// [`SqliteInbox::sync`].
    pub async fn insert_notifications(&self, batch: &[NewNotification]) -> Result<Vec<Received>, StoreError> {
        let inbox = self.intake.clone();
        let batch = batch.to_vec();
        tokio::task::spawn_blocking(move || inbox.insert(&batch))
            .await
            .map_err(|e| StoreError::Sqlite(format!("the insert task failed: {e}")))?
    }

    /// Intake's commit path, tried and undone (readiness after a refused commit).
    pub async fn probe_intake(&self) -> Result<(), StoreError> {
        let inbox = self.intake.clone();
        tokio::task::spawn_blocking(move || inbox.probe())
            .await
            .map_err(|e| StoreError::Sqlite(format!("the probe task failed: {e}")))?
    }
}

impl PgStore {
    /// Intake's commit path, tried and undone (readiness after a refused commit).
    pub async fn probe_intake(&self) -> Result<(), StoreError> {
        let probe = [NewNotification::probe()];
        let mut tx = self.intake.begin().await?;
        Self::insert_query(&probe).fetch_all(&mut *tx).await?;
        tx.rollback().await?;
        Ok(())
    }

    /// The multi-row insert of `chunk`, bound. Values are bound by value where they are
    /// not already owned copies, so each row's bytes are copied once into the statement.
    fn insert_query(
        chunk: &[NewNotification],
    ) -> sqlx::query::Query<'_, sqlx::Postgres, <sqlx::Postgres as sqlx::Database>::Arguments> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(insert_sql(chunk.len())));
        for n in chunk {
            query = query
                .bind(&n.dedupe_key)
                .bind(n.received_at)
                .bind(&n.entity)
                .bind(&n.message)
                .bind(n.record_id.to_string())
                .bind(n.version)
                .bind(&n.correlation_id)
                .bind(i64::from(n.data_missing))
                .bind(n.body.bytes())
                .bind(n.body.codec().as_str())
                // Ready to plan as soon as it is stored.
                .bind(n.received_at);
        }
        query
    }

    /// Inserts a group in one transaction, through intake's own pool (see `Store::connect`);
    /// durable when it returns.
    pub async fn insert_notifications(&self, batch: &[NewNotification]) -> Result<Vec<Received>, StoreError> {
        let mut stored: HashMap<String, i64> = HashMap::with_capacity(batch.len());
        if batch.len() <= INSERT_CHUNK {
            // One statement is a transaction of its own (autocommit): all rows or none,
            // committed durably before it returns, without the BEGIN and COMMIT round trips.
            for row in Self::insert_query(batch).fetch_all(&self.intake).await? {
                stored.insert(row.try_get("dedupe_key")?, row.try_get("id")?);
            }
        } else {
            let mut tx = self.intake.begin().await?;
            for chunk in batch.chunks(INSERT_CHUNK) {
                for row in Self::insert_query(chunk).fetch_all(&mut *tx).await? {
                    stored.insert(row.try_get("dedupe_key")?, row.try_get("id")?);
                }
            }
            tx.commit().await?;
        }
        // The first of several equal keys in a batch was stored; the others are repeats.
        Ok(batch
            .iter()
            .map(|n| match stored.remove(&n.dedupe_key) {
                Some(id) => Received::Stored(id),
                None => Received::Duplicate,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_lists_are_padded_to_a_few_lengths_with_their_last_value() {
        assert_eq!(in_list_len(1), 8);
        assert_eq!(in_list_len(8), 8);
        assert_eq!(in_list_len(9), 32);
        assert_eq!(in_list_len(33), IN_CHUNK);
        assert_eq!(in_list_len(IN_CHUNK), IN_CHUNK);
        let values = [1, 2, 3, 4, 5];
        let list: Vec<i32> = padded(&values).copied().collect();
        assert_eq!(list, [1, 2, 3, 4, 5, 5, 5, 5]);
        assert_eq!(padded::<i32>(&[]).count(), 0);
        let sql = with_in_list("SELECT 1 WHERE x IN ({})", 2, 3);
        assert_eq!(sql, "SELECT 1 WHERE x IN ($2, $3, $4, $5, $6, $7, $8, $9)");
    }
}
