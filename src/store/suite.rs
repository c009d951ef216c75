//! The store test suite: one set of checks every backend must pass. Called by the SQLite unit
//! tests and by the PostgreSQL integration tests, each with a fresh, migrated store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failure is a test failure

use uuid::Uuid;

use super::{
    Commit, CommitError, NewNotification, PackedBody, PlannedWrite, Received, RowKeys, RowWrite, SchemaState,
    Settle, Settlement, Status, Store, WriteOutcome, now_ms,
};
use crate::rules::{Phase, WriteKey};

/// A small notification stored under `key` (the other store tests and the retention tests use
/// it too).
pub fn notification(key: &str, record: Uuid) -> NewNotification {
    NewNotification {
        dedupe_key: key.to_owned(),
        entity: "opportunity".into(),
        message: "Update".into(),
        record_id: record,
        version: 1,
        correlation_id: Some("corr".into()),
        data_missing: false,
        body: PackedBody::pack(b"{}"),
        received_at: now_ms(),
    }
}

/// Stores `rows` and settles every one as done, as a planner leased to `owner` would: the rows
/// retention deletes. Returns their ids.
pub async fn store_settled(store: &Store, rows: &[NewNotification], owner: &str) -> Vec<i64> {
    let ids: Vec<i64> = store
        .insert_notifications(rows)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r {
            Received::Stored(id) => id,
            Received::Duplicate => panic!("{owner}: a row was already stored"),
        })
        .collect();
    let limit = i64::try_from(ids.len()).unwrap();
    store
        .claim_notifications(owner, now_ms(), 60_000, limit)
        .await
        .unwrap();
    store
        .commit(&Commit {
            settle: Some(Settle {
                ids: ids.clone(),
                owner: owner.into(),
            }),
            ..Commit::default()
        })
        .await
        .unwrap();
    ids
}

fn write(key: &WriteKey, opportunity: Uuid, payload: &str) -> PlannedWrite {
    PlannedWrite {
        key: key.clone(),
        opportunity_id: Some(opportunity),
        phase: Phase::Opportunities,
        payload: payload.into(),
    }
}

/// Runs every check against a fresh, migrated store. Panics (test failure) on the first miss.
/// On an unmigrated store: notifications stored under the first schema (body as JSON text)
/// read back byte for byte after the upgrade that made bodies compressed bytes, and new ones
/// are stored compressed.
pub async fn run_upgrade(store: &Store) {
    // A new store is told from an older schema: only the new one may be set up unasked.
    assert!(store.is_new().await.unwrap(), "a fresh database is new");
    store.migrate_to(1).await.unwrap();
    assert!(!store.is_new().await.unwrap(), "an older schema is not new");
    let body = r#"{"MessageName":"Update","PrimaryEntityName":"opportunity","note":"Zürich ✓"}"#;
    let insert = "INSERT INTO inbox (dedupe_key, received_at, entity, message, record_id, version, \
                  data_missing, body, status, attempts, next_attempt_at) \
                  VALUES ('old-1', 1, 'opportunity', 'Update', $1, 1, 0, $2, 'pending', 0, 1) RETURNING id";
    let record = Uuid::new_v4().to_string();
    let id: i64 = match store {
        Store::Sqlite(s) => sqlx::query_scalar(insert)
            .bind(&record)
            .bind(body)
            .fetch_one(s.pool())
            .await
            .unwrap(),
        Store::Postgres(s) => sqlx::query_scalar(insert)
            .bind(&record)
            .bind(body)
            .fetch_one(s.pool())
            .await
            .unwrap(),
    };
    assert!(matches!(
        store.schema_state().await.unwrap(),
        SchemaState::Behind(_)
    ));
    store.migrate().await.unwrap();
    store.ensure_schema().await.unwrap();
    let old = store.notification(id).await.unwrap().unwrap();
    assert_eq!(old.body.as_deref(), Some(body));
    assert_eq!(old.record_id, record);
    let out = store
        .insert_notifications(&[notification("new-1", Uuid::new_v4())])
        .await
        .unwrap();
    let Received::Stored(new_id) = out[0] else {
        panic!("{out:?}")
    };
    assert!(new_id > id, "ids keep growing across the rebuild");
    assert_eq!(
        store.notification(new_id).await.unwrap().unwrap().body.as_deref(),
        Some("{}")
    );
    let codecs: Vec<String> = match store {
        Store::Sqlite(s) => sqlx::query_scalar("SELECT body_codec FROM inbox ORDER BY id")
            .fetch_all(s.pool())
            .await
            .unwrap(),
        Store::Postgres(s) => sqlx::query_scalar("SELECT body_codec FROM inbox ORDER BY id")
            .fetch_all(s.pool())
            .await
            .unwrap(),
    };
    assert_eq!(codecs, ["json", "lz4"]);
}

pub async fn run_all(store: &Store) {
    schema_is_up_to_date_after_migrate(store).await;
    duplicates_are_recognised_within_and_across_batches(store).await;
    a_group_commit_larger_than_one_statement_is_one_transaction(store).await;
    claims_lease_each_notification_to_one_worker(store).await;
    commit_is_compare_and_swap(store).await;
    commit_settles_the_notification_atomically(store).await;
    writes_coalesce_per_marketo_record(store).await;
    a_plan_equal_to_what_marketo_holds_or_awaits_is_not_pushed_again(store).await;
    a_batch_commit_settles_and_swaps_all_rows_or_none(store).await;
    failed_notifications_retry_then_dead_letter_and_can_be_redriven(store).await;
    controls_and_lead_ids_round_trip(store).await;
    connections_are_found_by_contact_and_accounts_swap(store).await;
    a_probe_commit_stores_nothing(store).await;
    // Last: every check above moved rows through every status.
    the_kept_counts_match_the_rows(store).await;
    // After the counts: it deletes every settled row the checks above left.
    retention_deletes_settled_notifications_only_and_frees_their_keys(store).await;
}

/// Retention deletes done and discarded notifications settled before its cutoff, a batch at a
/// time; dead letters, pending notifications and rows of state (tombstones) stay; a key it
/// deleted is stored anew when it comes again, and one it kept is still a duplicate.
async fn retention_deletes_settled_notifications_only_and_frees_their_keys(store: &Store) {
    let record = Uuid::new_v4();
    let keys = ["ret-done", "ret-dead", "ret-discarded", "ret-pending"];
    let out = store
        .insert_notifications(&keys.map(|k| notification(k, record)))
        .await
        .unwrap();
    let ids: Vec<i64> = out
        .iter()
        .map(|r| match r {
            Received::Stored(id) => *id,
            Received::Duplicate => panic!("{out:?}"),
        })
        .collect();
    let claimed = store
        .claim_notifications("ret", now_ms(), 60_000, 100)
        .await
        .unwrap();
    assert!(
        ids.iter().all(|id| claimed.iter().any(|c| c.id == *id)),
        "{claimed:?}"
    );
    // A tombstone: an opportunity deleted in Dynamics, kept so a late update cannot revive it.
    let tombstone = Uuid::new_v4();
    store
        .commit(&Commit {
            settle: Some(Settle::one(ids[0], "ret")),
            opportunities: vec![RowWrite {
                id: tombstone,
                expected_revision: None,
                state: r#"{"deleted":true}"#.into(),
                projection: None,
                index: None,
            }],
            ..Commit::default()
        })
        .await
        .unwrap();
    store
        .settle_notification(
            ids[1],
            "ret",
            &Settlement::Dead {
                error: "refused".into(),
            },
        )
        .await
        .unwrap();
    store.discard_notification(ids[2]).await.unwrap();
    store.release_leases("ret").await.unwrap();
    let done = store.notification(ids[0]).await.unwrap().unwrap();
    let settled_at = done.settled_at.unwrap();

    // Inside the window (the cutoff before it settled): kept, and a re-delivery is a duplicate.
    store.delete_settled(settled_at, 500).await.unwrap();
    assert!(store.notification(ids[0]).await.unwrap().is_some());
    assert_eq!(
        store
            .insert_notifications(&[notification("ret-done", record)])
            .await
            .unwrap(),
        vec![Received::Duplicate]
    );

    // Past the window: at most a batch per statement, until the settled ones are gone.
    let cutoff = now_ms() + 1;
    loop {
        let n = store.delete_settled(cutoff, 2).await.unwrap();
        assert!(n <= 2, "{n}");
        if n < 2 {
            break;
        }
    }
    assert!(
        store.notification(ids[0]).await.unwrap().is_none(),
        "done is deleted"
    );
    assert!(
        store.notification(ids[2]).await.unwrap().is_none(),
        "discarded is deleted"
    );
    assert_eq!(
        store.notification(ids[1]).await.unwrap().unwrap().status,
        Status::Dead
    );
    assert_eq!(
        store.notification(ids[3]).await.unwrap().unwrap().status,
        Status::Pending
    );
    let stats = store.stats(now_ms()).await.unwrap();
    assert_eq!(stats.inbox_done, 0, "the kept counts follow deletes: {stats:?}");
    assert!(stats.inbox_dead >= 1 && stats.inbox_pending >= 1, "{stats:?}");
    assert!(stats.store_bytes.is_some_and(|b| b > 0), "{stats:?}");
    assert!(stats.inbox_oldest_retained_age_ms.is_some(), "{stats:?}");
    let rows = store
        .load_rows(&RowKeys {
            opportunity_ids: vec![tombstone],
            ..RowKeys::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.opportunities.len(), 1, "the tombstone stays");
    // A deleted key is free: the same notification again is stored as new.
    assert!(matches!(
        store
            .insert_notifications(&[notification("ret-done", record)])
            .await
            .unwrap()[..],
        [Received::Stored(_)]
    ));
    store.reclaim_space().await.unwrap();
}

/// Readiness's probe of intake's commit path leaves nothing behind.
async fn a_probe_commit_stores_nothing(store: &Store) {
    let before = store.list_notifications(None, None, 100_000).await.unwrap().len();
    store.probe_intake().await.unwrap();
    store.probe_intake().await.unwrap();
    assert_eq!(
        store.list_notifications(None, None, 100_000).await.unwrap().len(),
        before
    );
}

/// A contact's connections are found through the contact id in their state (migration 5), and
/// account rows are compare-and-swap like the others.
async fn connections_are_found_by_contact_and_accounts_swap(store: &Store) {
    let (contact, other, connection, account) =
        (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let state = |contact: Uuid| {
        serde_json::json!({"id": connection, "contact_id": contact, "opportunity_id": null}).to_string()
    };
    let row = |id, rev: Option<i64>, state: String| RowWrite {
        id,
        expected_revision: rev,
        state,
        projection: None,
        index: None,
    };
    let commit = Commit {
        connections: vec![row(connection, None, state(contact))],
        accounts: vec![row(account, None, "{\"name\":\"Contoso\"}".into())],
        ..Commit::default()
    };
    store.commit(&commit).await.unwrap();
    let by_contact = |c: Uuid| RowKeys {
        connections_of_contacts: vec![c],
        account_ids: vec![account],
        ..RowKeys::default()
    };
    let loaded = store.load_rows(&by_contact(contact)).await.unwrap();
    assert_eq!(
        loaded.connections.iter().map(|r| r.id).collect::<Vec<_>>(),
        [connection]
    );
    assert_eq!(loaded.accounts.len(), 1);
    assert_eq!(loaded.accounts[0].state, "{\"name\":\"Contoso\"}");
    assert!(
        store
            .load_rows(&by_contact(other))
            .await
            .unwrap()
            .connections
            .is_empty()
    );
    // The index follows the state: the connection now links another contact.
    let moved = Commit {
        connections: vec![row(connection, Some(1), state(other))],
        accounts: vec![row(account, Some(1), "{\"name\":\"Contoso Ltd\"}".into())],
        ..Commit::default()
    };
    store.commit(&moved).await.unwrap();
    assert!(
        store
            .load_rows(&by_contact(contact))
            .await
            .unwrap()
            .connections
            .is_empty()
    );
    assert_eq!(
        store
            .load_rows(&by_contact(other))
            .await
            .unwrap()
            .connections
            .len(),
        1
    );
    let stale = Commit {
        accounts: vec![row(account, Some(1), "{}".into())],
        ..Commit::default()
    };
    assert!(matches!(store.commit(&stale).await, Err(CommitError::Conflict)));
}

/// The counts `stats` reads (kept by triggers, so a scrape does not count the tables) equal
/// the rows, after all the inserts, claims, settlements, retries, discards and coalescing of
/// the checks before; the oldest pending ages come from the pending rows.
async fn the_kept_counts_match_the_rows(store: &Store) {
    use sqlx::Row;
    async fn counted(store: &Store, sql: &'static str) -> Vec<(String, i64)> {
        match store {
            Store::Sqlite(s) => sqlx::query(sql)
                .fetch_all(s.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<String, _>("status"), r.get::<i64, _>("n")))
                .collect(),
            Store::Postgres(s) => sqlx::query(sql)
                .fetch_all(s.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<String, _>("status"), r.get::<i64, _>("n")))
                .collect(),
        }
    }
    let inbox = counted(store, "SELECT status, COUNT(*) AS n FROM inbox GROUP BY status").await;
    let writes = counted(
        store,
        "SELECT status, COUNT(*) AS n FROM marketo_writes GROUP BY status",
    )
    .await;
    let of =
        |rows: &[(String, i64)], status: &str| rows.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
    let now = now_ms();
    let stats = store.stats(now).await.unwrap();
    assert!(
        of(&inbox, "done") > 0 && of(&writes, "done") > 0,
        "{inbox:?} {writes:?}"
    );
    assert_eq!(stats.inbox_pending, of(&inbox, "pending"), "{inbox:?} {stats:?}");
    assert_eq!(stats.inbox_dead, of(&inbox, "dead"), "{inbox:?} {stats:?}");
    assert_eq!(stats.inbox_done, of(&inbox, "done"), "{inbox:?} {stats:?}");
    assert_eq!(
        stats.writes_pending,
        of(&writes, "pending"),
        "{writes:?} {stats:?}"
    );
    assert_eq!(stats.writes_dead, of(&writes, "dead"), "{writes:?} {stats:?}");
    assert_eq!(stats.writes_done, of(&writes, "done"), "{writes:?} {stats:?}");
    // A new notification is the oldest pending one only if nothing older waits.
    let before = store.stats(now).await.unwrap();
    store
        .insert_notifications(&[notification("counted-last", Uuid::new_v4())])
        .await
        .unwrap();
    let after = store.stats(now_ms()).await.unwrap();
    assert_eq!(after.inbox_pending, before.inbox_pending + 1);
    assert!(after.inbox_oldest_pending_age_ms.is_some());
}

/// Over `INSERT_CHUNK` rows take several statements in one transaction; a repeat in a later
/// statement of the same batch is still recognised.
async fn a_group_commit_larger_than_one_statement_is_one_transaction(store: &Store) {
    let mut batch: Vec<NewNotification> = (0..1100)
        .map(|i| notification(&format!("big-{i:04}"), Uuid::new_v4()))
        .collect();
    batch.push(notification("big-0003", Uuid::new_v4()));
    let out = store.insert_notifications(&batch).await.unwrap();
    assert_eq!(out.len(), 1101);
    assert!(out[..1100].iter().all(|r| matches!(r, Received::Stored(_))));
    assert_eq!(out[1100], Received::Duplicate);
    let pending = store
        .list_notifications(Some(Status::Pending), None, 2000)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1100);
    for n in pending {
        store.discard_notification(n.id).await.unwrap();
    }
}

async fn schema_is_up_to_date_after_migrate(store: &Store) {
    assert_eq!(store.schema_state().await.unwrap(), SchemaState::UpToDate);
    store.ensure_schema().await.unwrap();
    store.ping().await.unwrap();
}

async fn duplicates_are_recognised_within_and_across_batches(store: &Store) {
    let r = Uuid::new_v4();
    let out = store
        .insert_notifications(&[
            notification("dup-a", r),
            notification("dup-b", r),
            notification("dup-a", r),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], Received::Stored(_)));
    assert!(matches!(out[1], Received::Stored(_)));
    assert_eq!(out[2], Received::Duplicate);
    let again = store
        .insert_notifications(&[notification("dup-b", r)])
        .await
        .unwrap();
    assert_eq!(again, vec![Received::Duplicate]);
    let (Received::Stored(id), Received::Stored(id_b)) = (out[0], out[1]) else {
        unreachable!()
    };
    let stored = store.notification(id).await.unwrap().unwrap();
    assert_eq!(stored.dedupe_key, "dup-a");
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.body.as_deref(), Some("{}"));
    // Each answer carries the id of its own row, not a neighbour's.
    let stored_b = store.notification(id_b).await.unwrap().unwrap();
    assert_eq!(stored_b.dedupe_key, "dup-b");
    // Leave a clean inbox for the next checks.
    for n in store
        .list_notifications(Some(Status::Pending), None, 100)
        .await
        .unwrap()
    {
        store.discard_notification(n.id).await.unwrap();
    }
}

async fn claims_lease_each_notification_to_one_worker(store: &Store) {
    let r = Uuid::new_v4();
    store
        .insert_notifications(&[notification("lease-1", r), notification("lease-2", r)])
        .await
        .unwrap();
    let now = now_ms();
    let a = store
        .claim_notifications("worker-a", now, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(a.len(), 2);
    assert!(a[0].id < a[1].id, "claimed in arrival order");
    assert_eq!(a[0].attempts, 1);
    let b = store
        .claim_notifications("worker-b", now, 60_000, 10)
        .await
        .unwrap();
    assert!(b.is_empty(), "a leased notification is not claimed twice");
    // The lease expires (the worker died): another worker takes over.
    let later = now + 61_000;
    let c = store
        .claim_notifications("worker-c", later, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].attempts, 2);
    // The old owner can no longer renew or settle.
    assert_eq!(
        store
            .renew_leases("worker-a", &[c[0].id], later + 1000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .renew_leases("worker-c", &[c[0].id, c[1].id], later + 120_000)
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.release_leases("worker-c").await.unwrap(), 2);
    let d = store
        .claim_notifications("worker-d", now, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(d.len(), 2, "released leases are claimable at once");
    for n in d {
        store.discard_notification(n.id).await.unwrap();
    }
}

async fn commit_is_compare_and_swap(store: &Store) {
    let opp = Uuid::new_v4();
    let contact = Uuid::new_v4();
    let insert = Commit {
        opportunities: vec![RowWrite {
            id: opp,
            expected_revision: None,
            state: r#"{"v":1}"#.into(),
            projection: Some("{}".into()),
            index: Some(contact),
        }],
        ..Commit::default()
    };
    store.commit(&insert).await.unwrap();
    assert!(
        matches!(store.commit(&insert).await, Err(CommitError::Conflict)),
        "second insert conflicts"
    );
    let loaded = store
        .load_rows(&RowKeys {
            opportunities_with_customer: vec![contact],
            ..RowKeys::default()
        })
        .await
        .unwrap();
    assert_eq!(loaded.opportunities.len(), 1);
    assert_eq!(loaded.opportunities[0].revision, 1);
    let update = |rev| Commit {
        opportunities: vec![RowWrite {
            id: opp,
            expected_revision: Some(rev),
            state: r#"{"v":2}"#.into(),
            projection: None,
            index: None,
        }],
        ..Commit::default()
    };
    store.commit(&update(1)).await.unwrap();
    assert!(
        matches!(store.commit(&update(1)).await, Err(CommitError::Conflict)),
        "stale revision conflicts"
    );
    let row = store.opportunity_row(opp).await.unwrap().unwrap();
    assert_eq!((row.revision, row.state.as_str()), (2, r#"{"v":2}"#));
    // A failed commit leaves nothing behind (rolled back as a whole).
    let conn = Uuid::new_v4();
    let mixed = Commit {
        connections: vec![RowWrite {
            id: conn,
            expected_revision: None,
            state: "{}".into(),
            projection: None,
            index: Some(opp),
        }],
        opportunities: vec![RowWrite {
            id: opp,
            expected_revision: Some(1),
            state: "{}".into(),
            projection: None,
            index: None,
        }],
        ..Commit::default()
    };
    assert!(matches!(store.commit(&mixed).await, Err(CommitError::Conflict)));
    let loaded = store
        .load_rows(&RowKeys {
            connection_ids: vec![conn],
            ..RowKeys::default()
        })
        .await
        .unwrap();
    assert!(loaded.connections.is_empty(), "rolled back");
}

async fn commit_settles_the_notification_atomically(store: &Store) {
    let r = Uuid::new_v4();
    store
        .insert_notifications(&[notification("settle-1", r)])
        .await
        .unwrap();
    let claimed = store
        .claim_notifications("w1", now_ms(), 60_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].id;
    let opp = Uuid::new_v4();
    let lost = Commit {
        settle: Some(Settle::one(id, "someone-else")),
        writes: vec![write(&WriteKey::Opportunity(opp), opp, "{}")],
        ..Commit::default()
    };
    assert!(matches!(store.commit(&lost).await, Err(CommitError::LeaseLost)));
    assert!(
        store.list_writes(None, Some(opp), 10).await.unwrap().is_empty(),
        "nothing written without the lease"
    );
    let ok = Commit {
        settle: Some(Settle::one(id, "w1")),
        ..lost
    };
    store.commit(&ok).await.unwrap();
    assert_eq!(
        store.notification(id).await.unwrap().unwrap().status,
        Status::Done
    );
    assert_eq!(store.list_writes(None, Some(opp), 10).await.unwrap().len(), 1);
}

async fn writes_coalesce_per_marketo_record(store: &Store) {
    let opp = Uuid::new_v4();
    let key = WriteKey::Opportunity(opp);
    for i in 0..10 {
        let c = Commit {
            writes: vec![write(&key, opp, &format!(r#"{{"n":{i}}}"#))],
            ..Commit::default()
        };
        store.commit(&c).await.unwrap();
    }
    let writes = store
        .list_writes(Some(Status::Pending), Some(opp), 10)
        .await
        .unwrap();
    assert_eq!(writes.len(), 1, "ten plans of one record are one write");
    assert_eq!(
        writes[0].payload,
        serde_json::json!({"n": 9}),
        "the newest payload wins"
    );
    assert_eq!(writes[0].revision, 10);
    let ready = store.ready_writes(now_ms() + 1, 1000).await.unwrap();
    assert!(ready.iter().any(|w| w.key == key));
    // A push of revision 10 while a newer plan (11) arrives must not settle the newer one.
    let c = Commit {
        writes: vec![write(&key, opp, r#"{"n":10}"#)],
        ..Commit::default()
    };
    store.commit(&c).await.unwrap();
    store
        .settle_writes(&[(key.clone(), 10, WriteOutcome::Done)])
        .await
        .unwrap();
    let w = &store.list_writes(None, Some(opp), 10).await.unwrap()[0];
    assert_eq!((w.status, w.revision), (Status::Pending, 11));
    store
        .settle_writes(&[(
            key.clone(),
            11,
            WriteOutcome::Retry {
                at: now_ms() + 60_000,
                error: "606".into(),
                count_attempt: false,
            },
        )])
        .await
        .unwrap();
    let w = &store.list_writes(None, Some(opp), 10).await.unwrap()[0];
    assert_eq!(w.attempts, 0, "a rate-limit wait is not an attempt");
    assert!(
        store
            .ready_writes(now_ms(), 1000)
            .await
            .unwrap()
            .iter()
            .all(|w| w.key != key),
        "backed off"
    );
    store
        .settle_writes(&[(
            key.clone(),
            11,
            WriteOutcome::Dead {
                error: "1006 Field not found".into(),
            },
        )])
        .await
        .unwrap();
    let statuses = store.write_statuses(std::slice::from_ref(&key)).await.unwrap();
    assert_eq!(statuses.get(&key), Some(&Status::Dead));
    assert_eq!(store.stats(now_ms()).await.unwrap().writes_dead, 1);
    assert_eq!(store.retry_writes(Some(&key)).await.unwrap(), 1);
    store
        .settle_writes(&[(key.clone(), 11, WriteOutcome::Done)])
        .await
        .unwrap();
    let w = &store.list_writes(None, Some(opp), 10).await.unwrap()[0];
    assert_eq!(w.status, Status::Done);
}

async fn a_plan_equal_to_what_marketo_holds_or_awaits_is_not_pushed_again(store: &Store) {
    let opp = Uuid::new_v4();
    let key = WriteKey::Company(opp);
    let plan = |payload: &str| Commit {
        writes: vec![write(&key, opp, payload)],
        ..Commit::default()
    };
    let current = || async { store.list_writes(None, Some(opp), 10).await.unwrap().remove(0) };
    store.commit(&plan(r#"{"a":1}"#)).await.unwrap();
    store.commit(&plan(r#"{"a":1}"#)).await.unwrap();
    let w = current().await;
    assert_eq!(
        (w.status, w.revision),
        (Status::Pending, 1),
        "the same plan twice is one write"
    );
    store
        .settle_writes(&[(key.clone(), 1, WriteOutcome::Done)])
        .await
        .unwrap();
    store.commit(&plan(r#"{"a":1}"#)).await.unwrap();
    let w = current().await;
    assert_eq!(
        (w.status, w.revision),
        (Status::Done, 1),
        "Marketo has it already"
    );
    store.commit(&plan(r#"{"a":2}"#)).await.unwrap();
    let w = current().await;
    assert_eq!((w.status, w.revision), (Status::Pending, 2), "a change is pushed");
    store
        .settle_writes(&[(key.clone(), 2, WriteOutcome::Dead { error: "1003".into() })])
        .await
        .unwrap();
    store.commit(&plan(r#"{"a":2}"#)).await.unwrap();
    let w = current().await;
    assert_eq!(
        (w.status, w.revision),
        (Status::Pending, 3),
        "a dead letter planned again is tried again"
    );
}

async fn a_batch_commit_settles_and_swaps_all_rows_or_none(store: &Store) {
    let r = Uuid::new_v4();
    store
        .insert_notifications(&[
            notification("batch-1", r),
            notification("batch-2", r),
            notification("batch-3", r),
        ])
        .await
        .unwrap();
    let claimed = store
        .claim_notifications("w1", now_ms(), 60_000, 2)
        .await
        .unwrap();
    let other = store
        .claim_notifications("w2", now_ms(), 60_000, 10)
        .await
        .unwrap();
    assert_eq!((claimed.len(), other.len()), (2, 1));
    let ids: Vec<i64> = claimed.iter().map(|e| e.id).collect();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let row = |id, rev: Option<i64>, state: &str| RowWrite {
        id,
        expected_revision: rev,
        state: state.into(),
        projection: None,
        index: None,
    };
    let first = Commit {
        opportunities: vec![row(a, None, "a1"), row(b, None, "b1")],
        connections: vec![row(c, None, "c1")],
        contacts: vec![row(c, None, "k1")],
        ..Commit::default()
    };
    store.commit(&first).await.unwrap();
    // One notification of the batch belongs to another worker: nothing of the commit happens.
    let stolen = Commit {
        settle: Some(Settle {
            ids: vec![ids[0], other[0].id],
            owner: "w1".into(),
        }),
        opportunities: vec![row(a, Some(1), "a2")],
        ..Commit::default()
    };
    assert!(matches!(store.commit(&stolen).await, Err(CommitError::LeaseLost)));
    // One stale revision among several: nothing of the commit happens either.
    let stale = Commit {
        settle: Some(Settle {
            ids: ids.clone(),
            owner: "w1".into(),
        }),
        opportunities: vec![row(a, Some(1), "a2"), row(b, Some(7), "b2")],
        ..Commit::default()
    };
    assert!(matches!(store.commit(&stale).await, Err(CommitError::Conflict)));
    let loaded = store
        .load_rows(&RowKeys {
            opportunity_ids: vec![a, b, a],
            connection_ids: vec![c],
            contact_ids: vec![c],
            ..RowKeys::default()
        })
        .await
        .unwrap();
    let mut states: Vec<(String, i64)> = loaded
        .opportunities
        .iter()
        .map(|r| (r.state.clone(), r.revision))
        .collect();
    states.sort();
    assert_eq!(states, vec![("a1".into(), 1), ("b1".into(), 1)]);
    assert_eq!((loaded.connections.len(), loaded.contacts.len()), (1, 1));
    for id in &ids {
        assert_eq!(
            store.notification(*id).await.unwrap().unwrap().status,
            Status::Pending
        );
    }
    let good = Commit {
        opportunities: vec![row(a, Some(1), "a2"), row(b, Some(1), "b2")],
        connections: vec![row(c, Some(1), "c2")],
        contacts: vec![row(c, Some(1), "k2")],
        ..stale
    };
    store.commit(&good).await.unwrap();
    for id in &ids {
        assert_eq!(
            store.notification(*id).await.unwrap().unwrap().status,
            Status::Done
        );
    }
    assert_eq!(store.opportunity_row(b).await.unwrap().unwrap().revision, 2);
    store.discard_notification(other[0].id).await.unwrap();
}

async fn failed_notifications_retry_then_dead_letter_and_can_be_redriven(store: &Store) {
    let r = Uuid::new_v4();
    store
        .insert_notifications(&[notification("fail-1", r)])
        .await
        .unwrap();
    let now = now_ms();
    let c = store.claim_notifications("w", now, 60_000, 10).await.unwrap();
    let id = c[0].id;
    store
        .settle_notification(
            id,
            "w",
            &Settlement::Retry {
                at: now + 5_000,
                error: "dataverse 503".into(),
            },
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_notifications("w", now, 60_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "not before its time"
    );
    let c = store
        .claim_notifications("w", now + 5_001, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(c[0].last_error.as_deref(), Some("dataverse 503"));
    store
        .settle_notification(
            id,
            "w",
            &Settlement::Dead {
                error: "gave up".into(),
            },
        )
        .await
        .unwrap();
    let stats = store.stats(now_ms()).await.unwrap();
    assert_eq!(stats.inbox_dead, 1);
    assert_eq!(stats.inbox_pending, 0);
    let dead = store
        .list_notifications(Some(Status::Dead), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        store.retry_notifications(None, Some("contact")).await.unwrap(),
        0,
        "filter by entity"
    );
    assert_eq!(
        store
            .retry_notifications(None, Some("opportunity"))
            .await
            .unwrap(),
        1
    );
    let again = store.notification(id).await.unwrap().unwrap();
    assert_eq!((again.status, again.attempts), (Status::Pending, 0));
    assert_eq!(store.discard_notification(id).await.unwrap(), 1);
    assert!(store.is_idle().await.unwrap() || store.stats(now_ms()).await.unwrap().writes_pending > 0);
    // Paging: newest first, strictly below the cursor.
    let page = store.list_notifications(None, None, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    let next = store.list_notifications(None, Some(page[1].id), 2).await.unwrap();
    assert!(next.iter().all(|n| n.id < page[1].id));
}

async fn controls_and_lead_ids_round_trip(store: &Store) {
    assert_eq!(store.control("paused").await.unwrap(), None);
    store.set_control("paused", "true").await.unwrap();
    store.set_control("paused", "false").await.unwrap();
    assert_eq!(store.control("paused").await.unwrap().as_deref(), Some("false"));
    // The typed pause flag.
    assert!(!store.paused().await.unwrap());
    store.set_paused(true).await.unwrap();
    assert!(store.paused().await.unwrap());
    store.set_paused(false).await.unwrap();
    assert!(!store.paused().await.unwrap());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    store.save_lead_ids(&[(a, 7), (b, 8)]).await.unwrap();
    store.save_lead_ids(&[(a, 9)]).await.unwrap();
    let ids = store.lead_ids(&[a, b, Uuid::new_v4()]).await.unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[&a], 9);
}
