//! Checkpoints of SQLite's write-ahead log, on a thread of their own.
//!
//! By default SQLite checkpoints inside the commit that takes the log past 1,000 pages: the
//! committing connection copies the log into the database file and syncs it before its commit
//! returns. That is the planner's commit (a tenth of its time in the planner benchmark) or
//! intake's group commit (a webhook waiting). Here a thread of the store's own copies the log
//! every [`CHECKPOINT_INTERVAL`] with a passive checkpoint, which never blocks a writer or a
//! reader, on the otherwise idle core. The connections keep a much higher automatic threshold
//! ([`AUTOCHECKPOINT_FALLBACK_PAGES`]) only as a fallback should this thread fall behind.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use super::StoreError;

/// How often the log is copied into the database file.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// Log pages after which a committing connection checkpoints by itself (`wal_autocheckpoint`,
/// SQLite's default 1,000): reached only if the checkpoint thread cannot keep up.
pub(crate) const AUTOCHECKPOINT_FALLBACK_PAGES: u32 = 10_000;

/// The checkpoint thread; it ends when this handle is dropped (with the store).
#[derive(Debug)]
pub struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Opens a connection of its own to `db` (an existing database in WAL mode) and starts
    /// checkpointing it.
    pub fn start(db: &Path) -> Result<Checkpointer, StoreError> {
        let conn = rusqlite::Connection::open(db)?;
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_FALLBACK_PAGES}; PRAGMA journal_size_limit = {};",
            super::JOURNAL_SIZE_LIMIT
        ))?;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(&conn, &stopped))
            .map_err(|e| StoreError::Sqlite(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { _stop: stop })
    }
}

fn run(conn: &rusqlite::Connection, stopped: &mpsc::Receiver<()>) {
    let mut failing = false;
    loop {
        match stopped.recv_timeout(CHECKPOINT_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            // The handle was dropped: the store is closed.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // (busy, pages in the log, pages copied): busy only for another checkpoint running.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((logged, copied)) => {
                if failing {
                    tracing::info!("write-ahead log checkpoints work again");
                    failing = false;
                }
                tracing::trace!(logged, copied, "checkpoint");
            }
            Err(e) => {
                // Commits then checkpoint by themselves past the fallback threshold.
                if !failing {
                    tracing::warn!(error = %e, "write-ahead log checkpoint failed; retrying");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database in WAL mode whose commits checkpoint only past the fallback threshold.
    fn wal_database(dir: &Path) -> (std::path::PathBuf, rusqlite::Connection) {
        let db = dir.join("c.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_FALLBACK_PAGES}; \
             CREATE TABLE t (v BLOB);"
        ))
        .unwrap();
        (db, conn)
    }

    /// About 2 MiB of rows: 500 pages, below either threshold of automatic checkpoints.
    fn write_rows(conn: &rusqlite::Connection) {
        for _ in 0..200 {
            conn.execute("INSERT INTO t (v) VALUES (zeroblob(10000))", [])
                .unwrap();
        }
    }

    /// Rows written with automatic checkpoints at the fallback threshold reach the database
    /// file within a few intervals: the thread copied them, no commit did.
    #[test]
    fn the_log_is_copied_into_the_database_file_by_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (db, conn) = wal_database(dir.path());
        let file_size = || std::fs::metadata(&db).unwrap().len();
        let before = file_size();
        write_rows(&conn);
        assert_eq!(file_size(), before, "no commit checkpointed");
        let checkpointer = Checkpointer::start(&db).unwrap();
        let mut copied = false;
        for _ in 0..100 {
            std::thread::sleep(CHECKPOINT_INTERVAL / 4);
            if file_size() >= 2_000_000 {
                copied = true;
                break;
            }
        }
        assert!(copied, "database file still {} bytes", file_size());
        drop(checkpointer);
    }

    /// The thread ends with its handle: no checkpoint after the store is gone.
    #[test]
    fn dropping_the_handle_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (db, conn) = wal_database(dir.path());
        drop(Checkpointer::start(&db).unwrap());
        std::thread::sleep(CHECKPOINT_INTERVAL);
        let before = std::fs::metadata(&db).unwrap().len();
        write_rows(&conn);
        std::thread::sleep(CHECKPOINT_INTERVAL * 3);
        assert_eq!(std::fs::metadata(&db).unwrap().len(), before);
    }
}
