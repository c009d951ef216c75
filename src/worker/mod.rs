//! The worker: claims notifications from the inbox and plans them (`planner`), and pushes the
//! resulting Marketo writes (`pusher`). Intake never waits for either; a Dataverse or Marketo
//! outage delays work and never drops it.

mod control;
pub mod planner;
pub mod pusher;

pub use control::{ResyncError, WorkerControl};

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dynamics::webapi::DataverseClient;
use crate::marketo::MarketoClient;
use crate::service::Lifecycle;
use crate::store::{PushLease, Store, now_ms};

/// What the worker tasks share.
pub struct WorkerContext {
    pub config: Arc<Config>,
    pub store: Store,
    pub marketo: MarketoClient,
    pub dataverse: DataverseClient,
    pub lifecycle: Arc<Lifecycle>,
    /// This process's lease owner name (host, pid and a random part).
    pub owner: String,
    /// Poked when a plan committed new writes, so the pusher need not wait for its poll.
    pub pusher_wakeup: Notify,
    /// How far ahead of a free rate-window place the pusher starts preparing its call.
    pub prepare_ahead: pusher::PrepareAhead,
}

impl WorkerContext {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        marketo: MarketoClient,
        dataverse: DataverseClient,
        lifecycle: Arc<Lifecycle>,
    ) -> WorkerContext {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "oppsync".into());
        let owner = format!("{host}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        WorkerContext {
            config,
            store,
            marketo,
            dataverse,
            lifecycle,
            owner,
            pusher_wakeup: Notify::new(),
            prepare_ahead: pusher::PrepareAhead::new(),
        }
    }

    /// Pushing is paused by configuration at start or by an operator (shared by replicas).
    pub async fn is_paused(&self) -> bool {
        matches!(self.store.paused().await, Ok(true))
    }
}

/// Exponential backoff with full jitter: a random delay up to `base * 2^attempts`, capped.
pub fn backoff_ms(attempts: u32, base_ms: i64, max_ms: i64) -> i64 {
    let ceiling = base_ms
        .saturating_mul(1_i64 << attempts.min(20))
        .min(max_ms)
        .max(base_ms);
    rand::rng().random_range(base_ms / 2..=ceiling)
}

/// Starts the planner and the pusher; they stop when `shutdown` is cancelled.
pub async fn start(ctx: Arc<WorkerContext>, shutdown: CancellationToken) -> JoinSet<()> {
    if ctx.config.worker.paused
        && let Err(e) = ctx.store.set_paused(true).await
    {
        tracing::error!(error = %e, "could not record the paused state");
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(plan_loop(ctx.clone(), shutdown.clone()));
    tasks.spawn(push_loop(ctx, shutdown));
    tasks
}

async fn plan_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let lease_ms = i64::try_from(ctx.config.worker.lease_secs).unwrap_or(300) * 1000;
    while !shutdown.is_cancelled() {
        let claimed = match ctx
            .store
            .claim_notifications(
                &ctx.owner,
                now_ms(),
                lease_ms,
                i64::from(ctx.config.worker.claim_batch),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim notifications; retrying");
                sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        if claimed.is_empty() {
            sleep_or_cancel(&shutdown, poll).await;
            continue;
        }
        let ids: Vec<i64> = claimed.iter().map(|e| e.id).collect();
        // Renew the batch's leases while it is being worked on, well before they expire, so a
        // slow Dataverse read never lets another worker take a notification mid-plan.
        let renewer = {
            let ctx = ctx.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(
                        u64::try_from(lease_ms / 3).unwrap_or(100_000),
                    ))
                    .await;
                    if let Err(e) = ctx
                        .store
                        .renew_leases(&ctx.owner, &ids, now_ms() + lease_ms)
                        .await
                    {
                        tracing::warn!(error = %e, "lease renewal failed");
                    }
                }
            })
        };
        planner::process_batch(&ctx, claimed).await;
        renewer.abort();
    }
    if let Err(e) = ctx.store.release_leases(&ctx.owner).await {
        tracing::warn!(error = %e, "could not release leases at shutdown");
    }
}

async fn push_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let mut lease: Option<PushLease> = None;
    while !shutdown.is_cancelled() {
        // Only the lease holder pushes; the others retry every second and take over when the
        // holder's connection (and with it the advisory lock) goes away.
        let held = match lease.as_mut() {
            Some(l) => l.is_held().await,
            None => false,
        };
        if !held {
            if lease.take().is_some() {
                tracing::warn!("lost the push lease");
            }
            match ctx.store.try_push_lease().await {
                Ok(Some(l)) => {
                    tracing::info!(owner = %ctx.owner, "this replica now pushes to Marketo");
                    if matches!(l, PushLease::Postgres(_)) {
                        // A replica that just died may have made calls in the current rate
                        // window; let them age out before the first call of ours.
                        let window = Duration::from_secs_f64(ctx.config.marketo.window_secs.max(0.0));
                        sleep_or_cancel(&shutdown, window).await;
                    }
                    lease = Some(l);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not try the push lease"),
            }
        }
        ctx.lifecycle.set_pushing(lease.is_some());
        metrics::gauge!("oppsync_pusher_leader").set(if lease.is_some() { 1.0 } else { 0.0 });
        if lease.is_none() {
            sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
            continue;
        }
        if ctx.is_paused().await {
            // One indexed read per poll: a resume is noticed within the poll interval.
            sleep_or_cancel(&shutdown, poll).await;
            continue;
        }
        match pusher::push_cycle(&ctx).await {
            Ok(outcome) if outcome.settled > 0 => {}
            Ok(outcome) => {
                if let Some(at) = outcome.next_slot {
                    // Every call the rate limit allows is taken: nothing can go before then, so
                    // new writes wait in the store (where they coalesce and fill batches).
                    let lead = ctx.prepare_ahead.lead();
                    let at = tokio::time::Instant::from_std(at.checked_sub(lead).unwrap_or(at))
                        .min(tokio::time::Instant::now() + poll);
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                    continue;
                }
                // Held partial batches fill up: look again when one is due, when new writes
                // were planned (at most every `batch_linger_ms`, 100 ms at most: each look
                // reads every ready write), or at the poll interval.
                let mut wait = poll;
                if let Some(due) = outcome.due_at {
                    wait = wait.min(Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)));
                }
                let throttle = Duration::from_millis(ctx.config.marketo.batch_linger_ms.min(100)).min(wait);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = async {
                        tokio::time::sleep(throttle).await;
                        ctx.pusher_wakeup.notified().await;
                    } => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "push cycle failed; retrying");
                sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
            }
        }
    }
    ctx.lifecycle.set_pushing(false);
}

async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
