//! Group commit for intake: concurrent webhook requests queue their notification here and one
//! committer stores many of them in a single transaction, i.e. one fsync for the lot. Each
//! request is answered only after the transaction that holds it has committed.

use std::sync::Arc;

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

struct Job {
    notification: NewNotification,
    reply: oneshot::Sender<Result<Received, IntakeError>>,
}

/// Handle to the committers; cheap to clone. The committers stop once every handle is dropped
/// and the queue is drained.
#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
}

impl GroupCommitter {
    /// Starts `committers` tasks (1 for SQLite, which has one writer anyway; a few for
    /// PostgreSQL), each committing up to `max_batch` notifications per transaction.
    pub fn start(store: Store, max_batch: usize, committers: usize) -> (GroupCommitter, JoinSet<()>) {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.max(1) * 8);
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = JoinSet::new();
        for _ in 0..committers.max(1) {
            let rx = rx.clone();
            let store = store.clone();
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
                    commit_batch(&store, batch).await;
                }
            });
        }
        (GroupCommitter { queue: tx }, tasks)
    }

    /// Stores one notification durably; returns once it is committed (or known duplicate).
    pub async fn submit(&self, notification: NewNotification) -> Result<Received, IntakeError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { notification, reply })
            .await
            .map_err(|_| IntakeError::Closed)?;
        answer.await.map_err(|_| IntakeError::Closed)?
    }
}

async fn commit_batch(store: &Store, batch: Vec<Job>) {
    let (notifications, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|j| (j.notification, j.reply)).unzip();
    metrics::histogram!("oppsync_intake_group_commit_size").record(notifications.len() as f64);
    // Two requests carrying the same dedupe key in one batch: the insert's ON CONFLICT makes
    // the second a duplicate, exactly as if they had arrived in separate transactions.
    match store.insert_notifications(&notifications).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
            let err = IntakeError::Store(e.to_string());
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
