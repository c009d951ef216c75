//! Group commit for intake: concurrent webhook requests queue their notification here and one
//! committer stores many of them in a single transaction. Each request is answered only once
//! the transaction that holds it is durable.
//!
//! Two stages, like a database's own log writer: committers insert groups; one syncer makes
//! them durable (`Store::sync_intake`: an fsync of SQLite's log, nothing on PostgreSQL) and
//! then answers them. While the syncer waits on the disk, the next group is being inserted, and
//! one fsync covers every group inserted before it started.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{NewNotification, Received, Store};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    #[error("the store could not commit: {0}")]
    Store(String),
    #[error("intake is shutting down")]
    Closed,
}

type Reply = oneshot::Sender<Result<Received, IntakeError>>;

struct Job {
    notification: NewNotification,
    reply: Reply,
}

/// A committed group waiting for the fsync that makes it durable.
struct Committed {
    replies: Vec<Reply>,
    results: Vec<Received>,
}

/// Handle to the committers; cheap to clone. The committers stop once every handle is dropped
/// and the queue is drained; the syncer stops after answering what they committed.
#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
    failed: Arc<AtomicBool>,
}

impl GroupCommitter {
    /// Starts `committers` tasks (1 for SQLite, which has one writer anyway; a few for
    /// PostgreSQL), each committing up to `max_batch` notifications per transaction, and the
    /// syncer.
    pub fn start(store: Store, max_batch: usize, committers: usize) -> (GroupCommitter, JoinSet<()>) {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.max(1) * 8);
        let (sync_tx, sync_rx) = mpsc::unbounded_channel::<Committed>();
        let failed = Arc::new(AtomicBool::new(false));
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = JoinSet::new();
        for _ in 0..committers.max(1) {
            let rx = rx.clone();
            let store = store.clone();
            let sync_tx = sync_tx.clone();
            let failed = failed.clone();
            tasks.spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { break };
                        let mut batch = vec![first];
                        while batch.len() < max_batch {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    if failed.load(Ordering::Acquire) {
                        refuse_after_failed_sync(batch);
                        continue;
                    }
                    if let Some(committed) = commit_batch(&store, batch).await {
                        // The syncer outlives the committers (it stops when they all have).
                        let _ = sync_tx.send(committed);
                    }
                }
            });
        }
        drop(sync_tx);
        tasks.spawn(sync_loop(store, sync_rx, failed.clone()));
        (GroupCommitter { queue: tx, failed }, tasks)
    }

    /// Whether an fsync failed: intake then refuses everything until restarted.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stores one notification durably; returns once it is durable (or known duplicate).
    pub async fn submit(&self, notification: NewNotification) -> Result<Received, IntakeError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(failed_sync_error());
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { notification, reply })
            .await
            .map_err(|_| IntakeError::Closed)?;
        answer.await.map_err(|_| IntakeError::Closed)?
    }
}

/// Inserts a group; on failure answers it at once (nothing of it was committed).
async fn commit_batch(store: &Store, batch: Vec<Job>) -> Option<Committed> {
    let (notifications, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|j| (j.notification, j.reply)).unzip();
    metrics::histogram!("oppsync_intake_group_commit_size").record(notifications.len() as f64);
    // Two requests carrying the same dedupe key in one batch: the insert's ON CONFLICT makes
    // the second a duplicate, exactly as if they had arrived in separate transactions.
    match store.insert_notifications(&notifications).await {
        Ok(results) => Some(Committed { replies, results }),
        Err(e) => {
            tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
            let err = IntakeError::Store(e.to_string());
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
            None
        }
    }
}

/// Takes every group committed so far, makes them durable with one sync, answers them.
async fn sync_loop(store: Store, mut committed: mpsc::UnboundedReceiver<Committed>, failed: Arc<AtomicBool>) {
    while let Some(first) = committed.recv().await {
        let mut groups = vec![first];
        while let Ok(more) = committed.try_recv() {
            groups.push(more);
        }
        match store.sync_intake().await {
            Ok(()) => {
                for group in groups {
                    for (reply, result) in group.replies.into_iter().zip(group.results) {
                        let _ = reply.send(Ok(result));
                    }
                }
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the unwritten pages and
                // report the next fsync as clean, so no later sync can vouch for these groups
                // or any other: intake refuses from now on (503, so Dynamics retries once, and
                // the failure shows in System Jobs) until oppsync is restarted and SQLite's
                // recovery reads what is really on disk.
                failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "fsync of the inbox failed; intake refuses notifications until restarted");
                let err = IntakeError::Store(e.to_string());
                for group in groups {
                    for reply in group.replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}

fn failed_sync_error() -> IntakeError {
    IntakeError::Store("an earlier fsync of the inbox failed; restart oppsync".into())
}

fn refuse_after_failed_sync(batch: Vec<Job>) {
    for job in batch {
        let _ = job.reply.send(Err(failed_sync_error()));
    }
}
