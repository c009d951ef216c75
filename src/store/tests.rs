use super::{SchemaState, Store, suite};

async fn fresh_sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let store = Store::connect(&url, 4).await.unwrap();
    (store, dir)
}

#[tokio::test]
async fn sqlite_passes_the_store_suite() {
    let (store, _dir) = fresh_sqlite().await;
    // Every migration of the backend is missing (counted, so a new migration needs no edit here).
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    assert_eq!(
        store.schema_state().await.unwrap(),
        SchemaState::Behind(migrations)
    );
    assert!(
        store.ensure_schema().await.is_err(),
        "an unmigrated store is refused"
    );
    store.migrate().await.unwrap();
    suite::run_all(&store).await;
}

#[tokio::test]
async fn a_schema_migrated_by_a_newer_version_is_refused() {
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from the future', true, x'00', 0)",
    )
    .execute(s.pool())
    .await
    .unwrap();
    assert_eq!(store.schema_state().await.unwrap(), SchemaState::Ahead);
    let err = store.ensure_schema().await.unwrap_err().to_string();
    assert!(err.contains("newer than this binary"), "{err}");
}

#[tokio::test]
async fn sqlite_upgrade_keeps_stored_bodies() {
    let (store, _dir) = fresh_sqlite().await;
    suite::run_upgrade(&store).await;
}

/// The answer waits for the fsync of the log, and a failed fsync stops intake for good (until
/// a restart): a FIFO in place of the log blocks the sync until the test opens its other end,
/// and then fails it (a pipe cannot be fsync'd).
#[tokio::test]
async fn intake_answers_only_after_the_log_sync_and_stops_when_it_fails() {
    use super::{GroupCommitter, IntakeError, SqliteInbox, SqliteStore};
    let (store, dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let fifo = dir.path().join("fake-wal");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let Store::Sqlite(s) = &store else { unreachable!() };
    let inbox = SqliteInbox::open_with_log(&dir.path().join("test.db"), fifo.clone()).unwrap();
    let store = Store::Sqlite(SqliteStore::new(s.pool().clone(), std::sync::Arc::new(inbox)));
    let (intake, _tasks) = GroupCommitter::start(store.clone(), 16).unwrap();
    let notification = |key: &str| suite::notification(key, uuid::Uuid::new_v4());
    let pending = tokio::spawn({
        let intake = intake.clone();
        async move { intake.submit(notification("a")).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "answered before the log was synced");
    // Unblock the committer's open of the FIFO; its fsync then fails.
    let _writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let answer = pending.await.unwrap();
    assert!(matches!(answer, Err(IntakeError::Store(_))), "{answer:?}");
    assert!(intake.has_failed());
    let later = intake.submit(notification("b")).await;
    assert!(
        matches!(later, Err(IntakeError::Store(ref e)) if e.contains("restart")),
        "{later:?}"
    );
}

/// A group is one transaction: a row that fails takes the rows before it in the group with it,
/// and the connection is usable for the next group.
#[tokio::test]
async fn an_sqlite_group_that_fails_stores_none_of_its_rows() {
    use super::Received;
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    sqlx::query(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON inbox WHEN NEW.dedupe_key = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let notification = |key: &str| suite::notification(key, uuid::Uuid::new_v4());
    let err = s
        .inbox()
        .insert(&[notification("first"), notification("boom")])
        .unwrap_err();
    assert!(err.to_string().contains("refused by the test"), "{err}");
    assert!(store.list_notifications(None, None, 10).await.unwrap().is_empty());
    let out = s
        .inbox()
        .insert(&[notification("first"), notification("first")])
        .unwrap();
    assert!(matches!(out[0], Received::Stored(_)), "{out:?}");
    assert_eq!(out[1], Received::Duplicate);
}

/// While the worker's connection holds the write lock, intake's insert waits for it (its own
/// busy handler) instead of failing.
#[tokio::test]
async fn an_sqlite_group_waits_for_the_write_lock_held_by_the_worker() {
    use super::Received;
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    let mut worker = s.pool().begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("UPDATE inbox SET attempts = attempts WHERE id = 0")
        .execute(&mut *worker)
        .await
        .unwrap();
    let inbox = s.inbox().clone();
    let insert = tokio::task::spawn_blocking(move || {
        inbox.insert(&[suite::notification("waits", uuid::Uuid::new_v4())])
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !insert.is_finished(),
        "the insert went ahead while the lock was held"
    );
    worker.commit().await.unwrap();
    let out = insert.await.unwrap().unwrap();
    assert!(matches!(out[0], Received::Stored(_)), "{out:?}");
}

#[tokio::test]
async fn an_in_memory_sqlite_store_is_refused_with_a_reason() {
    let err = Store::connect("sqlite::memory:", 2)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("in-memory"), "{err}");
}

/// A new SQLite store and the log and shared-memory files SQLite adds are its owner's only
/// (they hold contact names and emails).
#[tokio::test]
async fn a_new_sqlite_store_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("private.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
        .insert_notifications(&[suite::notification("private", uuid::Uuid::new_v4())])
        .await
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}: {mode:o}");
    }
}

/// "Database or disk is full" in the middle of a write transaction (SQLite then rolls it back by
/// itself, and sqlx's own rollback fails): once space is back, writes work again, with no
/// restart. `PRAGMA max_page_count` makes SQLite full on demand, per connection.
#[tokio::test]
async fn writes_resume_by_themselves_after_the_database_was_full() {
    use sqlx::Row;
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    let limit_every_connection = |pages: Option<i64>| async move {
        let mut held = Vec::new();
        while let Ok(Some(mut conn)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), s.pool().acquire())
                .await
                .map(Result::ok)
        {
            let limit = match pages {
                Some(p) => p,
                None => sqlx::query("PRAGMA page_count")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap()
                    .get::<i64, _>(0),
            };
            sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {limit}")))
                .execute(&mut *conn)
                .await
                .unwrap();
            held.push(conn);
        }
        assert!(!held.is_empty());
    };
    let big = |id: uuid::Uuid, revision: Option<i64>| super::Commit {
        opportunities: vec![super::RowWrite {
            id,
            expected_revision: revision,
            state: "x".repeat(4 << 20),
            projection: None,
            index: None,
        }],
        ..super::Commit::default()
    };
    // Full: no page may be added.
    limit_every_connection(None).await;
    let id = uuid::Uuid::new_v4();
    let full = store.commit(&big(id, None)).await.unwrap_err().to_string();
    assert!(full.contains("full"), "{full}");
    // Space is back.
    limit_every_connection(Some(1 << 30)).await;
    // As many writes as the pool has connections: each goes through a different one.
    for _ in 0..4 {
        let id = uuid::Uuid::new_v4();
        store.commit(&big(id, None)).await.unwrap();
        assert!(store.opportunity_row(id).await.unwrap().is_some());
    }
    store
        .insert_notifications(&[suite::notification("after-full", uuid::Uuid::new_v4())])
        .await
        .unwrap();
    let claimed = store
        .claim_notifications("me", super::now_ms(), 60_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
}

/// When the database ends a transaction by itself (SQLite does on "disk full" at COMMIT, or an
/// I/O error), sqlx's rollback fails and the connection stays counted inside a transaction:
/// every BEGIN on it would fail ("non-zero transaction depth") until a restart. Such a
/// connection is replaced, and the writes after it go through. (The database's own rollback is
/// played here by a ROLLBACK sent behind sqlx's back.)
#[tokio::test]
async fn a_connection_whose_transaction_the_database_ended_is_replaced() {
    use sqlx::Connection;
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    for _ in 0..4 {
        let mut conn = s.pool().acquire().await.unwrap();
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
        drop(tx);
        drop(conn);
    }
    for i in 0..8 {
        let id = uuid::Uuid::new_v4();
        let write = super::Commit {
            opportunities: vec![super::RowWrite {
                id,
                expected_revision: None,
                state: "{}".into(),
                projection: None,
                index: None,
            }],
            ..super::Commit::default()
        };
        store
            .commit(&write)
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
}

/// A new SQLite file frees space incrementally, so what retention deletes can go back to the
/// file system (`Store::reclaim_space`), and the file shrinks by as much.
#[tokio::test]
async fn a_new_sqlite_store_gives_deleted_space_back() {
    use super::now_ms;
    let (store, _dir) = fresh_sqlite().await;
    store.migrate().await.unwrap();
    let Store::Sqlite(s) = &store else { unreachable!() };
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(mode, 2, "incremental");
    // Bodies that do not compress, so the rows take real pages.
    let rows: Vec<_> = (0..2_000)
        .map(|i| {
            let mut n = suite::notification(&format!("space-{i}"), uuid::Uuid::new_v4());
            let noise: String = (0..1_500)
                .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                .collect();
            n.body = super::PackedBody::pack(noise.as_bytes());
            n
        })
        .collect();
    suite::store_settled(&store, &rows, "space").await;
    let full = store.stats(now_ms()).await.unwrap().store_bytes.unwrap();
    while store.delete_settled(now_ms() + 1, 500).await.unwrap() > 0 {}
    store.reclaim_space().await.unwrap();
    let after = store.stats(now_ms()).await.unwrap().store_bytes.unwrap();
    assert!(after * 2 < full, "{full} bytes before, {after} after");
}
