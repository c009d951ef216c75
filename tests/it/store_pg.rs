use oppsync::store::{SchemaState, Store, suite};

use crate::support::pg::TestDatabase;

#[tokio::test]
async fn postgres_passes_the_store_suite() {
    let db = TestDatabase::create().await.unwrap();
    let store = Store::connect(&db.url, 4).await.unwrap();
    // Every migration of the backend is missing (counted, so a new migration needs no edit here).
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
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
    drop(store);
    db.drop_now().await;
}

#[tokio::test]
async fn postgres_upgrade_keeps_stored_bodies() {
    let db = TestDatabase::create().await.unwrap();
    let store = Store::connect(&db.url, 4).await.unwrap();
    suite::run_upgrade(&store).await;
    drop(store);
    db.drop_now().await;
}
