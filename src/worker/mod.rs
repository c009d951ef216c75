//! The worker: claims notifications from the inbox and plans them (`planner`), and pushes the
//! resulting Marketo writes (`pusher`). Intake never waits for either; a Dataverse or Marketo
//! outage delays work and never drops it.

pub mod backfill;
mod control;
pub mod drift;
pub mod planner;
pub mod pusher;
mod quota;
pub mod reconcile;
pub mod retention;

pub use backfill::{BackfillPhase, BackfillProgress, BackfillRequest, BackfillStatus, StartError};
pub use control::{ResyncError, WorkerControl};
pub use drift::{Difference, DriftError, DriftKind, DriftRepair, DriftReport};
pub use reconcile::{ReconcileStatus, TableReconcile};

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dynamics::webapi::{DataverseClient, WebApiError};
use crate::marketo::MarketoClient;
use crate::service::{BlockReason, Lifecycle, System};
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
    /// The initial sync is reading pages (set by its job, read by the pusher's gate).
    pub backfill_reading: AtomicBool,
    /// Faults tests inject into the worker.
    #[cfg(test)]
    pub test_hooks: tests::Hooks,
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
            backfill_reading: AtomicBool::new(false),
            #[cfg(test)]
            test_hooks: tests::Hooks::default(),
        }
    }

    /// Notes what a Dataverse call came to: refused credentials (a wrong secret, a disabled or
    /// revoked application user) block the sync until fixed (reported, never readiness); an
    /// answer ends such a block.
    pub(crate) fn note_dataverse<T>(&self, result: &Result<T, WebApiError>) {
        match result {
            Ok(_) => self.lifecycle.set_blocked(System::Dataverse, None),
            Err(WebApiError::Auth(message)) => {
                let reason = if message.contains("HTTP 403") {
                    BlockReason::AccessDenied
                } else {
                    BlockReason::BadCredentials
                };
                self.lifecycle
                    .set_blocked(System::Dataverse, Some((reason, message.clone())));
            }
            Err(_) => {}
        }
    }

    /// Pushing is paused by configuration at start or by an operator (shared by replicas).
    pub async fn is_paused(&self) -> bool {
        matches!(self.store.paused().await, Ok(true))
    }
}

/// Starts the planner and the pusher, each supervised; they stop when `shutdown` is cancelled.
pub async fn start(ctx: Arc<WorkerContext>, shutdown: CancellationToken) -> JoinSet<()> {
    // The pause rule (docs/operations.md, "Pausing"): `worker.paused = true` records a pause;
    // `false` leaves a recorded one in place, which only the admin API's resume lifts.
    if ctx.config.worker.paused {
        match ctx.store.set_paused(true).await {
            Ok(()) => tracing::info!(
                "pushing to Marketo paused (worker.paused = true); POST /admin/resume lifts it"
            ),
            Err(e) => {
                tracing::error!(error = %crate::errors::chain(&e), "could not record the paused state")
            }
        }
    } else if let Ok(true) = ctx.store.paused().await {
        tracing::warn!(
            "pushing to Marketo is paused: a pause is recorded in the store (by the admin API or an earlier worker.paused = true); worker.paused = false does not lift it, POST /admin/resume does"
        );
    }
    if let Err(e) = backfill::start_if_empty_store(&ctx).await {
        tracing::error!(error = %crate::errors::chain(&e), "could not start the initial sync on the empty store");
    }
    let mut tasks = JoinSet::new();
    tasks.spawn(supervise("planner", ctx.clone(), shutdown.clone(), plan_loop));
    tasks.spawn(supervise(
        "backfill",
        ctx.clone(),
        shutdown.clone(),
        backfill::run_loop,
    ));
    tasks.spawn(supervise(
        "reconcile",
        ctx.clone(),
        shutdown.clone(),
        reconcile::run_loop,
    ));
    tasks.spawn(supervise(
        "retention",
        ctx.clone(),
        shutdown.clone(),
        retention::run_loop,
    ));
    tasks.spawn(supervise("pusher", ctx, shutdown, push_loop));
    tasks
}

/// Restarts within this long count towards `worker.restart_limit`.
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Longest wait before a restart.
const RESTART_MAX: Duration = Duration::from_secs(60);

/// Runs one worker loop and keeps it running. A panic or an unexpected return is logged as an
/// error, counted (`oppsync_worker_loop_failures_total{loop}`) and followed by a restart after
/// a backoff.
///
/// Why restart in process rather than exit: intake shares the process, and it must keep taking
/// notifications (every one is durable in the inbox) while the worker recovers; an exit would
/// refuse webhooks until Kubernetes brought the pod back, and Dynamics retries only once. A loop
/// that keeps failing (more than `worker.restart_limit` restarts in ten minutes) is given up
/// instead: the worker is then gone, `/healthz` fails, and Kubernetes restarts the pod, which
/// is the remedy left for a process in a bad state. Never silent either way.
async fn supervise<F, Fut>(name: &'static str, ctx: Arc<WorkerContext>, shutdown: CancellationToken, run: F)
where
    F: Fn(Arc<WorkerContext>, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    metrics::counter!("oppsync_worker_loop_failures_total", "loop" => name).increment(0);
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let ended = tokio::spawn(run(ctx.clone(), shutdown.clone())).await;
        if shutdown.is_cancelled() && ended.is_ok() {
            return;
        }
        let why = match ended {
            Ok(()) => "it returned while the service was running".to_owned(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                format!("it panicked: {message}")
            }
            Err(e) => format!("it was cancelled: {e}"),
        };
        metrics::counter!("oppsync_worker_loop_failures_total", "loop" => name).increment(1);
        // The notifications the failed planner had claimed go back at once (their renewer
        // died with the batch), so the restarted loop, or another replica, plans them now
        // rather than after the lease expires. (Only the planner holds leases.)
        if name == "planner"
            && let Err(e) = ctx.store.release_leases(&ctx.owner).await
        {
            tracing::warn!(error = %crate::errors::chain(&e), "could not release the failed loop's leases");
        }
        if shutdown.is_cancelled() {
            tracing::error!(worker_loop = name, reason = %why, "worker loop failed while shutting down");
            return;
        }
        let now = Instant::now();
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            restarts.pop_front();
        }
        if restarts.len() >= ctx.config.worker.restart_limit as usize {
            tracing::error!(
                worker_loop = name,
                reason = %why,
                restarts = restarts.len(),
                "worker loop failed again; giving up: /healthz now fails so that the pod is restarted"
            );
            ctx.lifecycle.set_worker_gone();
            return;
        }
        let delay = Duration::from_millis(ctx.config.worker.restart_base_ms)
            .saturating_mul(1u32 << restarts.len().min(16))
            .min(RESTART_MAX);
        restarts.push_back(now);
        tracing::error!(
            worker_loop = name,
            reason = %why,
            restart_in_ms = delay.as_millis() as u64,
            "worker loop failed; restarting it"
        );
        sleep_or_cancel(&shutdown, delay).await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// A task that lives exactly as long as this handle: dropping the handle (the batch done, or
/// unwound by a panic) aborts it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AbortOnDrop<Claimed> {
    /// The claimed batch, once the task ends (an error if it panicked).
    async fn join(mut self) -> Claimed {
        (&mut self.0)
            .await
            .unwrap_or_else(|e| Err(format!("claiming task failed: {e}")))
    }
}

/// Renews the leases of `ids` every third of `lease_ms` until the returned handle is dropped.
fn renew_leases_while_held(ctx: &Arc<WorkerContext>, ids: Vec<i64>, lease_ms: i64) -> AbortOnDrop<()> {
    let ctx = ctx.clone();
    AbortOnDrop(tokio::spawn(async move {
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
                tracing::warn!(error = %crate::errors::chain(&e), "lease renewal failed");
            }
        }
    }))
}

async fn plan_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let lease_ms = i64::try_from(ctx.config.worker.lease_secs).unwrap_or(300) * 1000;
    // The next batch, claimed and decoded while the current one was planned: planning waits on
    // SQLite for much of its time, and claiming and decoding use the other core meanwhile. It
    // is planned only after the current batch committed, so it sees what that one wrote.
    let mut next: Option<AbortOnDrop<Claimed>> = None;
    while !shutdown.is_cancelled() {
        let claimed = match next.take() {
            Some(prefetch) => prefetch.join().await,
            None => claim_next(ctx.clone(), lease_ms).await,
        };
        let (batch, _renewer) = match claimed {
            Ok(Some(claimed)) => claimed,
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = ctx.lifecycle.notification_stored() => {}
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not claim notifications; retrying");
                sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        next = Some(AbortOnDrop(tokio::spawn(claim_next(ctx.clone(), lease_ms))));
        planner::process_decoded(&ctx, batch).await;
    }
    // A batch claimed ahead and not planned goes back with the rest.
    if let Some(prefetch) = next.take() {
        let _ = prefetch.join().await;
    }
    if let Err(e) = ctx.store.release_leases(&ctx.owner).await {
        tracing::warn!(error = %crate::errors::chain(&e), "could not release leases at shutdown");
    }
}

/// A claimed, decoded batch and the renewal of its leases (held as long as the batch is).
type Claimed = Result<Option<(planner::DecodedBatch, AbortOnDrop<()>)>, String>;

/// Claims up to `worker.claim_batch` notifications, renews their leases from then on, and
/// decodes them; `None` when none is ready.
async fn claim_next(ctx: Arc<WorkerContext>, lease_ms: i64) -> Claimed {
    let entries = ctx
        .store
        .claim_notifications(
            &ctx.owner,
            now_ms(),
            lease_ms,
            i64::from(ctx.config.worker.claim_batch),
        )
        .await
        .map_err(|e| crate::errors::chain(&e))?;
    if entries.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    // Renew the batch's leases while it is being worked on, well before they expire, so a
    // slow Dataverse read never lets another worker take a notification mid-plan. The renewer
    // cannot outlive the batch: a panic unwinds through it and aborts it.
    let renewer = renew_leases_while_held(&ctx, ids, lease_ms);
    Ok(Some((planner::DecodedBatch::decode(entries), renewer)))
}

async fn push_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let mut lease: Option<PushLease> = None;
    let mut quota = quota::QuotaKeeper::default();
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
                    // Today's count goes on from what the last pusher kept.
                    quota::restore(&ctx).await;
                    lease = Some(l);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %crate::errors::chain(&e), "could not try the push lease"),
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
        let cycle = pusher::push_cycle(&ctx).await;
        quota.save(&ctx, false).await;
        match cycle {
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
                tracing::warn!(error = %crate::errors::chain(&e), "push cycle failed; retrying");
                sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
            }
        }
    }
    if lease.is_some() {
        quota.save(&ctx, true).await;
    }
    ctx.lifecycle.set_pushing(false);
}

async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests;
