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
    assert_eq!(store.schema_state().await.unwrap(), SchemaState::Behind(2));
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
