//! The admin API's one handle on the worker: pause, resume, re-sync, and what it reports. The
//! HTTP surface knows the worker through this type alone, not through the planner's or the
//! pusher's files.

use std::sync::Arc;

use uuid::Uuid;

use super::WorkerContext;
use super::backfill::{self, BackfillProgress, BackfillRequest, StartError};
use super::drift::{self, DriftError, DriftRepair, DriftReport};
use super::planner::{self, PlanError};
use super::reconcile::{self, ReconcileStatus};
use crate::marketo::Usage;
use crate::store::{Store, StoreError};

/// Pause, resume, re-sync and usage for the admin API. The pause flag lives in the store, so
/// pausing works (and is shared by every replica) also where this process runs no worker.
#[derive(Clone)]
pub struct WorkerControl {
    store: Store,
    worker: Option<Arc<WorkerContext>>,
}

/// Why a re-sync did not plan.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("no worker runs in this process")]
    NotRunning,
    #[error("Dynamics has no opportunity {0}")]
    NotFound(Uuid),
    /// Dataverse failed, or the lookups it answered did not settle.
    #[error("{0}")]
    Upstream(#[source] PlanError),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Internal(#[source] PlanError),
}

impl WorkerControl {
    /// `worker` is None where this process runs no worker (`intake_only`).
    pub fn new(store: Store, worker: Option<Arc<WorkerContext>>) -> WorkerControl {
        WorkerControl { store, worker }
    }

    /// Whether this process runs a worker (planner and pusher).
    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Pauses pushing to Marketo on every replica (intake and planning go on).
    pub async fn pause(&self) -> Result<(), StoreError> {
        self.store.set_paused(true).await
    }

    /// Resumes pushing to Marketo, and wakes this process's pusher.
    pub async fn resume(&self) -> Result<(), StoreError> {
        self.store.set_paused(false).await?;
        self.wake_pusher();
        Ok(())
    }

    pub async fn is_paused(&self) -> Result<bool, StoreError> {
        self.store.paused().await
    }

    /// Reads one opportunity from the Dataverse Web API and plans it as if a full-row
    /// notification had arrived; returns the number of Marketo writes planned.
    pub async fn resync(&self, id: Uuid) -> Result<usize, ResyncError> {
        let worker = self.worker.as_ref().ok_or(ResyncError::NotRunning)?;
        match planner::resync_opportunity(worker, id).await {
            Ok(Some(writes)) => Ok(writes),
            Ok(None) => Err(ResyncError::NotFound(id)),
            Err(PlanError::Store(e)) => Err(ResyncError::Store(e)),
            Err(e @ (PlanError::Dataverse(_) | PlanError::Unresolved(_))) => Err(ResyncError::Upstream(e)),
            Err(e) => Err(ResyncError::Internal(e)),
        }
    }

    /// Pokes the pusher (after writes were put back to pending) so it need not wait for its poll.
    pub fn wake_pusher(&self) {
        if let Some(worker) = &self.worker {
            worker.pusher_wakeup.notify_one();
        }
    }

    /// Marketo API use by this process today (None where it runs no worker).
    pub fn marketo_usage(&self) -> Option<Usage> {
        self.worker.as_ref().map(|w| w.marketo.usage())
    }

    /// Records a new initial sync (the replica that pushes runs it); refused while one runs.
    pub async fn start_backfill(&self, request: &BackfillRequest) -> Result<(), StartError> {
        backfill::start(&self.store, request).await.map(|_| ())
    }

    /// The current (or last) initial sync and what it achieved; None if none was ever started.
    pub async fn backfill_progress(
        &self,
        quota_reserve: u32,
    ) -> Result<Option<BackfillProgress>, StoreError> {
        backfill::progress(self.worker.as_deref(), &self.store, quota_reserve).await
    }

    /// Cancels the running initial sync; false when none is running.
    pub async fn cancel_backfill(&self) -> Result<bool, StoreError> {
        Ok(backfill::cancel(&self.store).await?.is_some())
    }

    /// What each table's reconciliation found last.
    pub async fn reconcile_status(&self, interval_secs: u64) -> Result<ReconcileStatus, StoreError> {
        reconcile::status(&self.store, interval_secs).await
    }

    /// Runs a reconciliation pass now (None where no worker runs in this process).
    pub async fn reconcile_now(&self) -> Option<Result<ReconcileStatus, StoreError>> {
        match &self.worker {
            Some(worker) => Some(reconcile::pass(worker).await),
            None => None,
        }
    }

    /// Compares Marketo with oppsync's projections within `budget` Marketo calls (None where no
    /// worker runs in this process).
    pub async fn drift_report(&self, budget: usize) -> Option<Result<DriftReport, DriftError>> {
        let worker = self.worker.as_ref()?;
        Some(drift::report(worker, budget).await.map(|(r, _)| r))
    }

    /// Reports within `budget`, then queues the writes that put Marketo back.
    pub async fn drift_repair(&self, budget: usize) -> Option<Result<DriftRepair, DriftError>> {
        let worker = self.worker.as_ref()?;
        Some(drift::repair(worker, budget).await)
    }
}
