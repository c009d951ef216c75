//! Group commit for intake: concurrent webhook requests queue their notification here and one
//! committer stores many of them in a single transaction. Each request is answered only once
//! the transaction that holds it is durable.
//!
//! On SQLite, two stages, like a database's own log writer: a writer thread inserts groups;
//! a syncer thread makes them durable (an fsync of SQLite's log) and then answers them. While
//! the syncer waits on the disk, the next group is being inserted, and one fsync covers every
//! group inserted before it started. Both are threads, not tasks: the insert and the fsync
//! block, and a thread that only does that wakes faster than a task handing work to one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;

use super::{INTAKE_COMMITTERS_PG, NewNotification, Received, SqliteInbox, Store};

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
    /// Starts the committers and the syncer for `store`, each group taking up to `max_batch`
    /// notifications. SQLite: one writer thread on the inbox's own connection (SQLite has one
    /// writer anyway), one syncer thread, and a task on the runtime that answers; the threads
    /// end on their own once every handle is dropped. PostgreSQL: one task per connection of
    /// intake's pool, whose commits are durable by themselves. The returned set holds the
    /// tasks. Fails only if a thread cannot be started.
    pub fn start(store: Store, max_batch: usize) -> std::io::Result<(GroupCommitter, JoinSet<()>)> {
        let (tx, rx) = mpsc::channel::<Job>(max_batch.max(1) * 8);
        let failed = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        match &store {
            Store::Sqlite(s) => {
                let inbox = s.inbox().clone();
                let (sync_tx, sync_rx) = std::sync::mpsc::channel::<Committed>();
                // Named threads, not the blocking pool: they live as long as intake, and show
                // under their names in `top -H` and profiles.
                std::thread::Builder::new().name("intake-writer".into()).spawn({
                    let inbox = inbox.clone();
                    let failed = failed.clone();
                    move || write_loop(&inbox, rx, sync_tx, &failed, max_batch)
                })?;
                let (answer_tx, answer_rx) = mpsc::unbounded_channel::<Answer>();
                std::thread::Builder::new().name("intake-sync".into()).spawn({
                    let failed = failed.clone();
                    move || sync_loop(&inbox, sync_rx, answer_tx, &failed)
                })?;
                tasks.spawn(answer_loop(answer_rx));
            }
            Store::Postgres(_) => {
                let rx = Arc::new(Mutex::new(rx));
                for _ in 0..INTAKE_COMMITTERS_PG {
                    tasks.spawn(commit_loop(store.clone(), rx.clone(), max_batch));
                }
            }
        }
        Ok((GroupCommitter { queue: tx, failed }, tasks))
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

/// SQLite's writer thread: takes whatever has queued (up to `max_batch`) as one group, inserts
/// it in one transaction, hands it to the syncer. Ends when every handle is dropped and the
/// queue is drained; the syncer then ends after answering what it was handed.
fn write_loop(
    inbox: &SqliteInbox,
    mut queue: mpsc::Receiver<Job>,
    synced: std::sync::mpsc::Sender<Committed>,
    failed: &AtomicBool,
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
        match inbox.insert(&notifications) {
            Ok(results) => {
                // The syncer outlives this loop (it stops when `synced` is dropped).
                let _ = synced.send(Committed { replies, results });
            }
            Err(e) => {
                tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
                refuse(replies, &IntakeError::Store(e.to_string()));
            }
        }
    }
}

/// SQLite's syncer thread: takes every group committed so far, makes them durable with one
/// fsync of the log, answers them. While it waits on the disk the writer inserts the next
/// group.
fn sync_loop(
    inbox: &SqliteInbox,
    committed: std::sync::mpsc::Receiver<Committed>,
    answers: mpsc::UnboundedSender<Answer>,
    failed: &AtomicBool,
) {
    while let Ok(first) = committed.recv() {
        let mut groups = vec![first];
        groups.extend(committed.try_iter());
        match inbox.sync() {
            Ok(()) => {
                let _ = answers.send(Answer::Durable(groups));
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the unwritten pages and
                // report the next fsync as clean, so no later sync can vouch for these groups
                // or any other: intake refuses from now on (503, so Dynamics retries once, and
                // the failure shows in System Jobs) until oppsync is restarted and SQLite's
                // recovery reads what is really on disk.
                failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "fsync of the inbox failed; intake refuses notifications until restarted");
                let _ = answers.send(Answer::Failed(groups, IntakeError::Store(e.to_string())));
            }
        }
    }
}

/// What the syncer learnt of some committed groups.
enum Answer {
    Durable(Vec<Committed>),
    Failed(Vec<Committed>, IntakeError),
}

/// Answers the waiting requests on the runtime: a wake from a task of the runtime is a push on
/// its own queue, where a wake from the syncer thread would be a cross-thread hand-off per
/// request. One message per fsync crosses instead.
async fn answer_loop(mut answers: mpsc::UnboundedReceiver<Answer>) {
    while let Some(answer) = answers.recv().await {
        match answer {
            Answer::Durable(groups) => {
                for group in groups {
                    deliver(group.replies, group.results);
                }
            }
            Answer::Failed(groups, err) => {
                for group in groups {
                    refuse(group.replies, &err);
                }
            }
        }
    }
}

/// A PostgreSQL committer: a commit there is durable when it returns, so it answers at once.
async fn commit_loop(store: Store, queue: Arc<Mutex<mpsc::Receiver<Job>>>, max_batch: usize) {
    loop {
        let (notifications, replies) = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { break };
            group(first, &mut queue, max_batch)
        };
        match store.insert_notifications(&notifications).await {
            Ok(results) => deliver(replies, results),
            Err(e) => {
                tracing::error!(error = %e, batch = notifications.len(), "group commit failed");
                refuse(replies, &IntakeError::Store(e.to_string()));
            }
        }
    }
}

fn failed_sync_error() -> IntakeError {
    IntakeError::Store("an earlier fsync of the inbox failed; restart oppsync".into())
}
