//! Intake's writer on SQLite: its own connection, used from one dedicated thread (see
//! `group_commit`), with the insert prepared once and run row by row inside one transaction
//! per group.
//!
//! Why not the sqlx pool the rest of the store uses: sqlx runs every statement on a worker
//! thread of its own and copies each bound value there, and a multi-row insert is new SQL for
//! every group size. Per notification that was a thread hand-off, two copies of the body and a
//! share of a statement compile; here it is one bind of borrowed bytes into a cached
//! statement. rusqlite links the same `libsqlite3-sys` as sqlx (kept in step in Cargo.toml),
//! so both use one SQLite library and see each other's commits through the WAL.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{TransactionBehavior, params};

use super::sqlite_checkpoint::{AUTOCHECKPOINT_FALLBACK_PAGES, Checkpointer};
use super::{NewNotification, Received, StoreError};

/// The insert of one notification: a repeated dedupe key changes no row. No `RETURNING id`:
/// SQLite gathers a RETURNING statement's rows in a temporary b-tree, built and dropped per
/// row; the new id is the connection's last insert rowid instead.
const INSERT_ONE: &str = "INSERT INTO inbox (status, attempts, dedupe_key, received_at, entity, message, \
     record_id, version, correlation_id, data_missing, body, body_codec, next_attempt_at) \
     VALUES ('pending', 0, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?2) \
     ON CONFLICT (dedupe_key) DO NOTHING";

/// Runs [`INSERT_ONE`] for `n`: rows inserted (0: a duplicate key).
fn insert_one(insert: &mut rusqlite::CachedStatement<'_>, n: &NewNotification) -> rusqlite::Result<usize> {
    insert.execute(params![
        n.dedupe_key,
        n.received_at,
        n.entity,
        n.message,
        n.record_id.to_string(),
        n.version,
        n.correlation_id,
        i64::from(n.data_missing),
        n.body.bytes(),
        n.body.codec().as_str(),
    ])
}

/// Invocations of [`wait_for_the_write_lock`] polled at the fine interval first, and in all.
const FINE_POLLS: i32 = 200;
const MAX_POLLS: i32 = FINE_POLLS + 10_000;

/// Busy handler of the intake connection, called while the worker's connection holds the write
/// lock (a planner or pusher transaction, typically a few milliseconds). SQLite's own handler
/// (behind `busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25… ms between tries, so a lock released
/// after 0.5 ms cost intake a millisecond or more per group, and tens under a busy worker. This
/// one polls every 50 µs for the first 10 ms, then every millisecond: about 10 s in all, as the
/// rest of the store waits, before the group fails (503, and Dynamics retries).
fn wait_for_the_write_lock(polls_so_far: i32) -> bool {
    let pause = if polls_so_far < FINE_POLLS {
        Duration::from_micros(50)
    } else {
        Duration::from_millis(1)
    };
    std::thread::sleep(pause);
    polls_so_far < MAX_POLLS
}

/// The inbox's intake connection and the write-ahead log it appends to.
pub struct SqliteInbox {
    /// Locked by one writer at a time: the group commit thread, or a direct caller (tests,
    /// tools) through [`super::Store::insert_notifications`].
    conn: Mutex<rusqlite::Connection>,
    /// The database file, by path and as opened at start: a store deleted or replaced under the
    /// process is told by the held file's link count and by the path's inode.
    db: PathBuf,
    db_file: File,
    wal: PathBuf,
    /// The log, opened once it exists and held: each sync goes to the file SQLite writes (its
    /// inode checked against the path), and needs no new descriptor.
    wal_file: Mutex<Option<File>>,
    /// The log's checkpoints, off intake's and the planner's commits; they stop with the store.
    _checkpointer: Checkpointer,
}

impl std::fmt::Debug for SqliteInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("wal", &self.wal)
            .finish_non_exhaustive()
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e.to_string())
    }
}

impl SqliteInbox {
    /// Opens the intake connection to the database file `db` (already created, in WAL mode, by
    /// the sqlx pool). Its commits do not fsync (`synchronous = NORMAL`): [`Self::sync`] does,
    /// once for every group committed before it started (see `group_commit`).
    pub fn open(db: &Path) -> Result<SqliteInbox, StoreError> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        Self::open_with_log(db, PathBuf::from(wal))
    }

    /// As [`Self::open`], with the file [`Self::sync`] makes durable named explicitly (tests put
    /// a FIFO there to hold or fail the sync).
    pub fn open_with_log(db: &Path, wal: PathBuf) -> Result<SqliteInbox, StoreError> {
        let conn = rusqlite::Connection::open(db)?;
        conn.busy_handler(Some(wait_for_the_write_lock))?;
        // journal_mode is a property of the file, set to WAL by the pool already; asked again so
        // this connection never writes a rollback journal whatever opened the file first. The
        // rest are per connection: a statement that may abort keeps a statement journal, which
        // temp_store keeps in memory rather than in a temporary file; the log is cut back after
        // a checkpoint as the pool's connections do, and checkpoints are left to the
        // checkpoint thread.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA journal_size_limit = {}; \
             PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_FALLBACK_PAGES};",
            super::JOURNAL_SIZE_LIMIT
        ))?;
        let db_file = File::open(db).map_err(|e| StoreError::Sqlite(format!("{}: {e}", db.display())))?;
        Ok(SqliteInbox {
            conn: Mutex::new(conn),
            db: db.to_owned(),
            db_file,
            wal,
            wal_file: Mutex::new(None),
            _checkpointer: Checkpointer::start(db)?,
        })
    }

    /// Inserts a group in one transaction: all of it or none. A repeated dedupe key (stored
    /// before, or earlier in the same group) is a duplicate. Blocking: call it from a thread
    /// that may block.
    pub fn insert(&self, batch: &[NewNotification]) -> Result<Vec<Received>, StoreError> {
        let mut conn = self.conn.lock();
        // IMMEDIATE: take the write lock now (waiting up to the busy timeout for the worker's
        // writes), not at the first insert, where a busy database could not be waited for.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(INSERT_ONE)?;
            for n in batch {
                let inserted = insert_one(&mut insert, n)?;
                results.push(match inserted {
                    0 => Received::Duplicate,
                    _ => Received::Stored(tx.last_insert_rowid()),
                });
            }
        }
        tx.commit()?;
        Ok(results)
    }

    /// Inserts a probe row as intake would, and rolls it back: whether a group could be
    /// committed now (readiness, after a refused commit). Blocking.
    pub fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            insert_one(&mut tx.prepare_cached(INSERT_ONE)?, &NewNotification::probe())?;
        }
        tx.rollback()?;
        Ok(())
    }

    /// Makes every group committed so far durable: fsync of the write-ahead log, which is what
    /// `synchronous = FULL` does inside each commit. Blocking.
    ///
    /// The log is opened once and held, so the fsync reaches the file SQLite appends to (a log
    /// opened again by path could be another file, or none, after the store was deleted). While
    /// a connection is open SQLite keeps its log in place (it resets it, never removes it), so a
    /// log or database file that is gone, or whose path now names another file, means the
    /// store was deleted or replaced: [`StoreError::Gone`]. Not being able to open the log (no
    /// descriptor free) is [`StoreError::SyncOpen`], not a failed fsync.
    pub fn sync(&self) -> Result<(), StoreError> {
        check_in_place(&self.db_file, &self.db)?;
        let mut held = self.wal_file.lock();
        if held.is_none() {
            match File::open(&self.wal) {
                Ok(file) => *held = Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Gone(format!(
                        "the write-ahead log {} is missing after a commit",
                        self.wal.display()
                    )));
                }
                Err(e) => return Err(StoreError::SyncOpen(format!("{}: {e}", self.wal.display()))),
            }
        }
        let Some(log) = held.as_ref() else {
            return Err(StoreError::SyncOpen(format!("{}: not open", self.wal.display())));
        };
        check_in_place(log, &self.wal)?;
        log.sync_data().map_err(|e| StoreError::Sync(e.to_string()))
    }
}

/// The file held is still the one at `path`: linked, and the same inode.
fn check_in_place(held: &File, path: &Path) -> Result<(), StoreError> {
    let gone = |what: &str| StoreError::Gone(format!("{} {what}", path.display()));
    let mine = held
        .metadata()
        .map_err(|e| gone(&format!("cannot be examined: {e}")))?;
    if mine.nlink() == 0 {
        return Err(gone("was deleted"));
    }
    match std::fs::metadata(path) {
        Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => Ok(()),
        Ok(_) => Err(gone("was replaced by another file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(gone("was deleted")),
        // Not known to be gone (e.g. a permission or descriptor problem reading the path).
        Err(e) => Err(StoreError::SyncOpen(format!("{}: {e}", path.display()))),
    }
}
