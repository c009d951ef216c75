//! Retention: settled notifications (done, discarded) are deleted once they are older than
//! `store.retention_days`, so the store grows with the records oppsync follows, not with the
//! traffic. Dead letters stay until an operator retries or discards them (a discarded one then
//! ages out like the rest); the rows of state, deletion tombstones included, are never deleted
//! here: they are one per Dynamics record, and the rules need them to refuse stale changes.
//!
//! Deleting runs in the worker, off the request path, in short statements with a pause between
//! them: on SQLite intake needs the same write lock, and waits at most one batch for it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{WorkerContext, sleep_or_cancel};
use crate::store::{Store, StoreError, now_ms};

/// Rows per delete statement.
pub const BATCH: i64 = 500;
/// Pause between two delete statements of a pass.
pub const BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// The retention window in milliseconds; None keeps everything (`retention_days = 0`).
pub fn window_ms(retention_days: f64) -> Option<i64> {
    (retention_days > 0.0).then_some((retention_days * 86_400_000.0) as i64)
}

/// Time between passes: a tenth of the window, between one second and ten minutes.
fn interval(window_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from((window_ms / 10).clamp(1_000, 600_000)).unwrap_or(600_000))
}

pub async fn run_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let Some(window) = window_ms(ctx.config.store.retention_days) else {
        shutdown.cancelled().await;
        return;
    };
    while !shutdown.is_cancelled() {
        match pass(&ctx.store, now_ms() - window, BATCH, BETWEEN_BATCHES, &shutdown).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention: settled notifications deleted"),
            Err(e) => {
                tracing::warn!(error = %crate::errors::chain(&e), "retention pass failed; trying again later")
            }
        }
        sleep_or_cancel(&shutdown, interval(window)).await;
    }
}

/// One pass: deletes settled notifications settled before `before`, `batch` at a time with
/// `pause` between statements, until none is left (or shutdown); then gives some free space
/// back. Returns how many were deleted.
pub async fn pass(
    store: &Store,
    before: i64,
    batch: i64,
    pause: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, StoreError> {
    let mut deleted = 0;
    loop {
        let n = store.delete_settled(before, batch).await?;
        deleted += n;
        metrics::counter!("oppsync_store_retention_deleted_total").increment(n);
        if n < u64::try_from(batch).unwrap_or(0) || shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    store.reclaim_space().await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_days_keeps_everything_and_passes_come_a_tenth_of_the_window_apart() {
        assert_eq!(window_ms(0.0), None);
        assert_eq!(window_ms(14.0), Some(14 * 86_400_000));
        assert_eq!(interval(14 * 86_400_000), Duration::from_secs(600));
        assert_eq!(interval(60_000), Duration::from_secs(6));
        assert_eq!(interval(100), Duration::from_secs(1));
    }
}
