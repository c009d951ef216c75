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
    assert_eq!(store.schema_state().await.unwrap(), SchemaState::Behind(1));
    assert!(
        store.ensure_schema().await.is_err(),
        "an unmigrated store is refused"
    );
    store.migrate().await.unwrap();
    suite::run_all(&store).await;
}
