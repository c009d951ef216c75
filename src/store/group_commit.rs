//! Group commit for intake: concurrent webhook requests queue their notification here and one
//! committer stores many of them in a single transaction. Each request is answered only once
//! the transaction that holds it is durable.
//!
//! On SQLite, one committer thread takes whatever has queued, inserts it in one transaction,
//! makes it durable (an fsync of SQLite's log) and hands the answers to the runtime; what
//! arrives meanwhile is the next group. Inserting the next group while the previous one's
//! fsync runs, on a second thread, was measured slower: groups then hold two or three rows at
//! 16 connections, and every transaction rewrites the same few pages of the log (the table's
//! and its indexes' right edges), on top of a thread hand-off per group. It is a thread, not a
//! task: the insert and the fsync block.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{INTAKE_COMMITTERS_PG, NewNotification, Received, SqliteInbox, Store, StoreError};

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

/// A committed group and who waits for it.
struct Committed {
    replies: Vec<Reply>,
    results: Vec<Received>,
}

/// Handle to the committers; cheap to clone. The committers stop once every handle is dropped
/// and the queue is drained, after answering what they committed.
#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
    failed: Arc<AtomicBool>,
    /// The last group's commit failed (disk full, a refusing database): intake answers 503
    /// for now, and readiness says so until a probe commit goes through.
    refusing: Arc<AtomicBool>,
}

impl GroupCommitter {
    /// Starts the committers for `store`, each group taking up to `max_batch` notifications.
    /// SQLite: one thread on the inbox's own connection (SQLite has one writer anyway) and a
    /// task on the runtime that answers; the thread ends on its own once every handle is
    /// dropped. PostgreSQL: one task per connection of intake's pool, whose commits are
    /// durable by themselves. The returned set holds the tasks. Fails only if the thread
    /// cannot be started.
    pub fn start(store: Store, max_batch: usize) -> std::io::Result<(GroupCommitter, JoinSet<()>)> {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.max(1) * 8);
        let failed = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        match &store {
            Store::Sqlite(s) => {
                let inbox = s.inbox().clone();
                let (answer_tx, answer_rx) = mpsc::unbounded_channel::<Answer>();
                // A named thread, not the blocking pool: it lives as long as intake, and shows
                // under its name in `top -H` and profiles.
                std::thread::Builder::new().name("intake-commit".into()).spawn({
                    let failed = failed.clone();
                    let refusing = refusing.clone();
                    move || sqlite_commit_loop(&inbox, rx, answer_tx, &failed, &refusing, max_batch)
                })?;
                tasks.spawn(answer_loop(answer_rx));
            }
            Store::Postgres(_) => {
                let rx = Arc::new(Mutex::new(rx));
                for _ in 0..INTAKE_COMMITTERS_PG {
                    tasks.spawn(commit_loop(
                        store.clone(),
                        rx.clone(),
                        refusing.clone(),
                        max_batch,
                    ));
                }
            }
        }
        Ok((
            GroupCommitter {
                queue: tx,
                failed,
                refusing,
            },
            tasks,
        ))
    }

    /// Whether an fsync failed: intake then refuses everything until restarted.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the last group's commit failed (intake answers 503 for now).
    pub fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::Acquire)
    }

    /// A probe commit went through (readiness): intake takes notifications again.
    pub fn commits_again(&self) {
        self.refusing.store(false, Ordering::Release);
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

/// One group: `first` and whatever else has queued, up to `max_batch`, split into what is
/// stored and who waits for it.
fn group(
    first: Job,
    queue: &mut mpsc::Receiver<Job>,
    max_batch: usize,
) -> (Vec<NewNotification>, Vec<Reply>) {
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    metrics::histogram!("oppsync_intake_group_commit_size").record(batch.len() as f64);
    batch.into_iter().map(|j| (j.notification, j.reply)).unzip()
}

/// Answers a stored group, each request with its own result.
fn deliver(replies: Vec<Reply>, results: Vec<Received>) {
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(Ok(result));
    }
}

fn refuse(replies: Vec<Reply>, err: &IntakeError) {
    for reply in replies {
        let _ = reply.send(Err(err.clone()));
    }
}

/// SQLite's committer thread: takes whatever has queued (up to `max_batch`) as one group,
/// inserts it in one transaction, makes it durable, hands the answers to the runtime. Ends
/// when every handle is dropped and the queue is drained.
fn sqlite_commit_loop(
    inbox: &SqliteInbox,
    mut queue: mpsc::Receiver<Job>,
    answers: mpsc::UnboundedSender<Answer>,
    failed: &AtomicBool,
    refusing: &AtomicBool,
    max_batch: usize,
) {
    while let Some(first) = queue.blocking_recv() {
        let (notifications, replies) = group(first, &mut queue, max_batch);
        if failed.load(Ordering::Acquire) {
            refuse(replies, &failed_sync_error());
            continue;
        }
        // Two requests carrying the same dedupe key in one group: the second is a duplicate,
        // exactly as if they had arrived in separate transactions.
        let results = match inbox.insert(&notifications) {
            Ok(results) => {
                refusing.store(false, Ordering::Release);
                results
            }
            Err(e) => {
                refusing.store(true, Ordering::Release);
                tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
                refuse(replies, &IntakeError::Store(e.to_string()));
                continue;
            }
        };
        let group = Committed { replies, results };
        // The answer task outlives this loop (it stops when `answers` is dropped).
        match inbox.sync() {
            Ok(()) => {
                let _ = answers.send(Answer::Durable(group));
            }
            Err(e @ StoreError::SyncOpen(_)) => {
                // Not a failed fsync (e.g. no descriptor free): this group is not known durable
                // and is refused (Dynamics retries; a retry is a duplicate of a stored row if it
                // did reach the disk), and the next group tries again.
                tracing::error!(error = %e, "could not sync the inbox; the group is refused and the next one tries again");
                let _ = answers.send(Answer::Failed(group, IntakeError::Store(e.to_string())));
            }
            Err(e) => {
                // The store's files were deleted or replaced: nothing SQLite writes from now
                // on reaches them. Or: after a failed fsync the kernel may have dropped the
                // unwritten pages and report the next fsync as clean, so no later sync can
                // vouch for this group
                // or any other: intake refuses from now on (503, so Dynamics retries once, and
                // the failure shows in System Jobs) until oppsync is restarted and SQLite's
                // recovery reads what is really on disk.
                failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "the inbox cannot be made durable; intake refuses notifications until restarted");
                let _ = answers.send(Answer::Failed(group, IntakeError::Store(e.to_string())));
            }
        }
    }
}

/// What became of a committed group.
enum Answer {
    Durable(Committed),
    Failed(Committed, IntakeError),
}

/// Answers the waiting requests on the runtime: a wake from a task of the runtime is a push on
/// its own queue, where a wake from the committer thread would be a cross-thread hand-off per
/// request. One message per group crosses instead.
async fn answer_loop(mut answers: mpsc::UnboundedReceiver<Answer>) {
    while let Some(answer) = answers.recv().await {
        match answer {
            Answer::Durable(group) => deliver(group.replies, group.results),
            Answer::Failed(group, err) => refuse(group.replies, &err),
        }
    }
}

/// A PostgreSQL committer: a commit there is durable when it returns, so it answers at once.
async fn commit_loop(
    store: Store,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    refusing: Arc<AtomicBool>,
    max_batch: usize,
) {
    loop {
        let (notifications, replies) = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { break };
            group(first, &mut queue, max_batch)
        };
        match store.insert_notifications(&notifications).await {
            Ok(results) => {
                refusing.store(false, Ordering::Release);
                deliver(replies, results);
            }
            Err(e) => {
                refusing.store(true, Ordering::Release);
                tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
                refuse(replies, &IntakeError::Store(e.to_string()));
            }
        }
    }
}

fn failed_sync_error() -> IntakeError {
    IntakeError::Store(
        "an earlier fsync of the inbox failed, or its files were deleted or replaced; restart oppsync".into(),
    )
}
