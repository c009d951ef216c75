//! Retention over the real service: settled notifications leave the store once older than
//! `store.retention_days`, a re-delivery is still recognised inside that window, and intake
//! keeps answering while a pass deletes.

use std::time::Duration;

use oppsync::dynamics::AttributeValue;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::sim::env::eventually;
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::{NewNotification, now_ms, suite};
use oppsync::worker::retention;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::app::{EnvOptions, TestEnv};

#[tokio::test]
async fn a_redelivery_inside_the_window_is_a_duplicate_and_after_it_changes_nothing_in_marketo() {
    let env = TestEnv::start_with(EnvOptions {
        // Three seconds: passes every second.
        tweak: Some(Box::new(|c| c.store.retention_days = 3.0 / 86_400.0)),
        ..EnvOptions::default()
    })
    .await;
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(env.sims.dataverse.clone()));
    let (ann, contact) = org.create_contact("Ann", "Lee", "ann@example.com", None);
    env.deliver(&contact).await;
    let (opp, created) =
        org.create_opportunity("Kept deal", Customer::Contact(ann), Decimal::new(900, 0), 40);
    assert_eq!(env.post(&created).await.status(), 202);
    env.settle().await;
    assert!(env.sims.marketo.opportunities().contains_key(&opp.to_string()));

    // Inside the window: Dynamics retrying the same delivery gets a 200 and nothing is stored.
    assert_eq!(env.post(&created).await.status(), 200);

    // Past it, retention has deleted the settled notifications...
    let store = &env.app.state.store;
    let gone = eventually(Duration::from_secs(30), || async {
        let s = store.stats(now_ms()).await.unwrap();
        s.inbox_done == 0 && s.inbox_pending == 0
    })
    .await;
    assert!(gone, "{:?}", store.stats(now_ms()).await.unwrap());
    let metrics = env.metrics_text().await;
    let deleted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("oppsync_store_retention_deleted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(deleted >= 2.0, "{metrics}");
    assert!(metrics.contains("oppsync_store_bytes "), "{metrics}");
    assert!(
        metrics.contains("oppsync_store_oldest_retained_age_seconds "),
        "{metrics}"
    );

    // ...so the same delivery once more is stored anew and planned, and the per-field versions
    // make it change nothing: no Marketo call.
    let calls = env.sims.marketo.rest_call_count();
    assert_eq!(env.post(&created).await.status(), 202);
    env.settle().await;
    assert_eq!(env.sims.marketo.rest_call_count(), calls);
    env.stop().await;
}

#[tokio::test]
async fn intake_keeps_answering_while_a_retention_pass_runs() {
    let env = TestEnv::start_with(EnvOptions {
        intake_only: true,
        ..EnvOptions::default()
    })
    .await;
    let store = env.app.state.store.clone();
    const ROWS: usize = 20_000;
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(2_000) {
        let batch: Vec<NewNotification> = chunk
            .iter()
            .map(|i| suite::notification(&format!("old-{i}"), Uuid::new_v4()))
            .collect();
        suite::store_settled(&store, &batch, "old").await;
    }

    // Small batches with a pause between them: the pass takes at least 200 × 20 ms.
    let cutoff = now_ms() + 1;
    let pass = tokio::spawn({
        let store = store.clone();
        async move {
            retention::pass(
                &store,
                cutoff,
                100,
                Duration::from_millis(20),
                &CancellationToken::new(),
            )
            .await
        }
    });
    let mut answered = 0;
    let mut n = 0;
    while !pass.is_finished() {
        n += 1;
        let notification = NotificationBuilder::opportunity_update(Uuid::new_v4(), 1_750_000_000_000 + n)
            .attr("name", AttributeValue::String(format!("Deal {n}")));
        assert_eq!(
            env.post(&notification).await.status(),
            202,
            "answered during the pass"
        );
        answered += 1;
    }
    assert_eq!(pass.await.unwrap().unwrap(), ROWS as u64);
    assert!(
        answered >= 10,
        "only {answered} webhooks were answered while the pass ran"
    );
    let stats = store.stats(now_ms()).await.unwrap();
    assert_eq!(
        (stats.inbox_done, stats.inbox_pending),
        (0, answered),
        "{stats:?}"
    );
    env.stop().await;
}
