//! The initial sync ("backfill"): every opportunity Dynamics already holds (optionally only those
//! an OData filter or a `since` date selects), with its stakeholder connections and the contacts
//! they name, read through the Web API one page at a time and planned through the same rules as
//! webhooks, as full-row changes versioned by `modifiedon`. A webhook for the same record,
//! earlier or later, converges with it per field; a record Marketo already holds plans no write.
//!
//! The job lives in the store (control key [`JOB_KEY`]): its status, counters and the link of the
//! next page. Only the replica that pushes to Marketo runs it, and it saves the link after each
//! planned page, so after a crash (SIGKILL) it goes on from the last page planned: a page planned
//! twice plans nothing new, since its projections are stored with it.
//!
//! Fair to live traffic: its writes are marked background (pushed after the live writes of the
//! same phase), at most `backfill.max_queued_writes` of them wait at once, and it pauses while
//! the daily Marketo quota left is down to `backfill.quota_reserve`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::WorkerContext;
use super::planner::{PlanError, plan_and_commit};
use crate::dynamics::webapi::{Change, CollectionQuery, Page, RowRecord, WebApiError, any_of};
use crate::dynamics::{AttributeValue, DynamicsEvent, EntityKind};
use crate::rules::{self, ContactState, Phase};
use crate::store::{RowKeys, Store, StoreError, now_ms};

/// Control key of the job record (JSON of [`BackfillJob`]).
pub const JOB_KEY: &str = "backfill";
/// Control key naming the job an operator cancelled (kept apart from the job record, which only
/// the runner writes, so a cancel can never be overwritten by the runner's next save).
pub const CANCEL_KEY: &str = "backfill_cancelled";

/// Ids per `(x eq … or …)` filter: keeps a URL well under Dataverse's length limit.
const IDS_PER_QUERY: usize = 50;
/// Connections and contacts of one page of opportunities are read several queries at once
/// (within the client's own bound on calls in flight).
const READ_CONCURRENCY: usize = 4;
/// How often an idle or waiting job looks again.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackfillStatus {
    Running,
    Completed,
    Cancelled,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackfillPhase {
    /// Reading opportunities, their connections and contacts, page by page, planning each page.
    Reading,
    /// Paused: the daily Marketo quota left is down to `backfill.quota_reserve`.
    WaitingForQuota,
    /// Everything is read and planned; its last Marketo writes are being pushed.
    Pushing,
    /// Over (completed, cancelled or failed).
    Done,
}

/// The job as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackfillJob {
    pub id: Uuid,
    pub status: BackfillStatus,
    pub phase: BackfillPhase,
    pub filter: Option<String>,
    pub since: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// The link of the next page to read; None before the first page and after the last.
    pub cursor: Option<String>,
    pub pages_read: u64,
    pub opportunities_read: u64,
    pub connections_read: u64,
    pub contacts_read: u64,
    pub estimated_total: Option<u64>,
    pub writes_queued: u64,
    pub last_error: Option<String>,
    pub updated_at: i64,
}

impl BackfillJob {
    fn new(request: &BackfillRequest) -> BackfillJob {
        let now = now_ms();
        BackfillJob {
            id: Uuid::new_v4(),
            status: BackfillStatus::Running,
            phase: BackfillPhase::Reading,
            filter: request.filter.clone().filter(|f| !f.trim().is_empty()),
            since: request.since.clone(),
            started_at: now,
            finished_at: None,
            cursor: None,
            pages_read: 0,
            opportunities_read: 0,
            connections_read: 0,
            contacts_read: 0,
            estimated_total: None,
            writes_queued: 0,
            last_error: None,
            updated_at: now,
        }
    }

    /// The `$filter` of the opportunity query: the operator's filter and `modifiedon ge since`.
    fn odata_filter(&self) -> Option<String> {
        let since = self.since.as_ref().map(|s| format!("modifiedon ge {s}"));
        match (&self.filter, since) {
            (Some(f), Some(s)) => Some(format!("({f}) and {s}")),
            (Some(f), None) => Some(f.clone()),
            (None, s) => s,
        }
    }

    fn finish(&mut self, status: BackfillStatus) {
        self.status = status;
        self.phase = BackfillPhase::Done;
        self.finished_at = Some(now_ms());
    }
}

/// What to back-fill (the body of `POST /admin/backfill`; both optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    /// An OData `$filter` on opportunities, e.g. `statecode eq 0` (open ones only).
    #[schema(example = "statecode eq 0")]
    pub filter: Option<String>,
    /// Only opportunities modified at or after this time (RFC 3339).
    #[schema(example = "2025-01-01T00:00:00Z")]
    pub since: Option<String>,
}

impl BackfillRequest {
    /// Checks the request and puts `since` in canonical UTC form.
    pub fn validated(mut self) -> Result<BackfillRequest, String> {
        if let Some(s) = &self.since {
            let t = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| {
                format!("since {s:?} is not an RFC 3339 time such as 2025-01-01T00:00:00Z: {e}")
            })?;
            let utc = t.to_offset(time::UtcOffset::UTC);
            self.since = Some(utc.format(&Rfc3339).map_err(|e| e.to_string())?);
        }
        if let Some(f) = &self.filter
            && f.len() > 2_000
        {
            return Err("filter: at most 2000 characters".into());
        }
        Ok(self)
    }
}

/// Progress, as `GET /admin/backfill` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackfillProgress {
    pub id: String,
    pub status: BackfillStatus,
    pub phase: BackfillPhase,
    pub filter: Option<String>,
    pub since: Option<String>,
    /// Epoch milliseconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Rows read through the Web API: opportunities, connections and contacts.
    pub rows_read: u64,
    pub opportunities_read: u64,
    pub connections_read: u64,
    pub contacts_read: u64,
    /// How many opportunities the query matches, when Dataverse counted them.
    pub estimated_total: Option<u64>,
    /// Marketo writes the backfill planned, and how many of them are no longer waiting.
    pub marketo_writes_queued: u64,
    pub marketo_writes_done: u64,
    pub marketo_writes_pending: u64,
    /// Marketo calls left today (of this process's count), and the reserve kept for live traffic.
    pub quota_left: Option<u32>,
    pub quota_reserve: u32,
    /// Estimated seconds to the end, from the reading rate so far and Marketo's rate limit.
    pub eta_secs: Option<u64>,
    pub last_error: Option<String>,
}

/// Why a backfill cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a backfill is already running (started at {} ms)", .0.started_at)]
    AlreadyRunning(Box<BackfillJob>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Dataverse Web API: {0}")]
    Dataverse(#[from] WebApiError),
    #[error("planning: {0}")]
    Plan(#[from] PlanError),
}

impl RunError {
    /// Whether trying again later can help. A rejected query (a bad filter) cannot.
    fn is_permanent(&self) -> bool {
        match self {
            RunError::Dataverse(e) | RunError::Plan(PlanError::Dataverse(e)) => {
                matches!(e, WebApiError::Rejected(_) | WebApiError::Config(_))
            }
            RunError::Plan(PlanError::Corrupt(_) | PlanError::Undecodable(_)) => true,
            _ => false,
        }
    }
}

/// The stored job, if one was ever started.
pub async fn load(store: &Store) -> Result<Option<BackfillJob>, StoreError> {
    match store.control(JOB_KEY).await? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("backfill job: {e}"))),
    }
}

async fn save(store: &Store, job: &mut BackfillJob) -> Result<(), StoreError> {
    job.updated_at = now_ms();
    let text = serde_json::to_string(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.set_control(JOB_KEY, &text).await
}

async fn is_cancelled(store: &Store, job: &BackfillJob) -> Result<bool, StoreError> {
    Ok(store.control(CANCEL_KEY).await?.as_deref() == Some(job.id.to_string().as_str()))
}

/// Records a new job (the leader's runner picks it up); refused while one is running.
pub async fn start(store: &Store, request: &BackfillRequest) -> Result<BackfillJob, StartError> {
    if let Some(job) = load(store).await?
        && job.status == BackfillStatus::Running
        && !is_cancelled(store, &job).await?
    {
        return Err(StartError::AlreadyRunning(Box::new(job)));
    }
    let mut job = BackfillJob::new(request);
    save(store, &mut job).await?;
    tracing::info!(job = %job.id, filter = job.filter.as_deref().unwrap_or(""), since = job.since.as_deref().unwrap_or(""), "backfill started");
    Ok(job)
}

/// Cancels the running job; None when none is running. The runner stops before its next page.
pub async fn cancel(store: &Store) -> Result<Option<BackfillJob>, StoreError> {
    match load(store).await? {
        Some(mut job) if job.status == BackfillStatus::Running => {
            store.set_control(CANCEL_KEY, &job.id.to_string()).await?;
            tracing::info!(job = %job.id, "backfill cancelled");
            job.finish(BackfillStatus::Cancelled);
            Ok(Some(job))
        }
        _ => Ok(None),
    }
}

/// The stored job with what it has achieved so far.
pub async fn progress(
    ctx: Option<&WorkerContext>,
    store: &Store,
    reserve: u32,
) -> Result<Option<BackfillProgress>, StoreError> {
    let Some(mut job) = load(store).await? else {
        return Ok(None);
    };
    if job.status == BackfillStatus::Running && is_cancelled(store, &job).await? {
        job.finish(BackfillStatus::Cancelled);
    }
    let pending = u64::try_from(store.pending_background_writes().await?).unwrap_or(0);
    let usage = ctx.map(|c| c.marketo.usage());
    let running = job.status == BackfillStatus::Running;
    let eta_secs = ctx.filter(|_| running).and_then(|c| {
        let m = &c.config.marketo;
        let records_per_sec =
            f64::from(m.calls_per_window) * m.batch_size.max(1) as f64 / m.window_secs.max(0.001);
        let pushing = pending as f64 / records_per_sec.max(1.0);
        let elapsed = (now_ms() - job.started_at).max(1) as f64 / 1000.0;
        let reading = match (job.phase, job.estimated_total) {
            (BackfillPhase::Pushing, _) => 0.0,
            (_, Some(total)) if job.opportunities_read > 0 => {
                let left = total.saturating_sub(job.opportunities_read) as f64;
                elapsed * left / job.opportunities_read as f64
            }
            _ => return None,
        };
        Some(reading.max(pushing).ceil() as u64)
    });
    Ok(Some(BackfillProgress {
        id: job.id.to_string(),
        status: job.status,
        phase: job.phase,
        filter: job.filter,
        since: job.since,
        started_at: job.started_at,
        finished_at: job.finished_at,
        rows_read: job.opportunities_read + job.connections_read + job.contacts_read,
        opportunities_read: job.opportunities_read,
        connections_read: job.connections_read,
        contacts_read: job.contacts_read,
        estimated_total: job.estimated_total,
        marketo_writes_queued: job.writes_queued,
        marketo_writes_done: job.writes_queued.saturating_sub(pending),
        marketo_writes_pending: pending,
        quota_left: usage.map(|u| u.quota_left),
        quota_reserve: reserve,
        eta_secs,
        last_error: job.last_error,
    }))
}

/// `backfill.on_empty_store`: records a job when the store knows no opportunity and no backfill
/// ever ran. Called as the worker starts, before any webhook can be planned.
pub async fn start_if_empty_store(ctx: &WorkerContext) -> Result<(), StoreError> {
    if !ctx.config.backfill.on_empty_store
        || load(&ctx.store).await?.is_some()
        || ctx.store.opportunity_count().await? > 0
    {
        return Ok(());
    }
    tracing::info!("the store is empty: starting the initial sync (backfill.on_empty_store)");
    start(&ctx.store, &BackfillRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| match e {
            StartError::Store(e) => e,
            StartError::AlreadyRunning(_) => StoreError::Corrupt("a backfill appeared meanwhile".into()),
        })
}

/// Runs the stored job whenever there is one running and this replica pushes to Marketo.
pub async fn run_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        if ctx.lifecycle.is_pushing() {
            let job = match load(&ctx.store).await {
                Ok(job) => job,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the backfill job");
                    None
                }
            };
            if let Some(job) = job.filter(|j| j.status == BackfillStatus::Running) {
                match run(&ctx, job, &shutdown).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "backfill interrupted; going on shortly");
                        let wait = crate::retry::backoff_ms(failures, 1_000, 60_000);
                        sleep_or_cancel(
                            &shutdown,
                            Duration::from_millis(u64::try_from(wait).unwrap_or(1_000)),
                        )
                        .await;
                    }
                }
            }
        }
        sleep_or_cancel(&shutdown, POLL).await;
    }
}

async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Runs `job` until it ends, the process stops, or a store error interrupts it (the loop then
/// resumes it from its saved cursor).
async fn run(
    ctx: &WorkerContext,
    mut job: BackfillJob,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let cfg = &ctx.config.backfill;
    let columns = ctx.config.sync.opportunity_attributes();
    let mut query = CollectionQuery::opportunities(&columns, cfg.page_size);
    if let Some(f) = job.odata_filter() {
        query = query.filter(f);
    }
    let batch = u64::try_from(ctx.config.marketo.batch_size.max(1)).unwrap_or(300);
    // While it reads, the pusher holds each kind's partial batch of its writes (up to a batch
    // less one per phase) for the next page to fill: the queue's bound leaves room for them, or
    // reading would wait on writes that wait on reading.
    let queue_limit = u64::from(cfg.max_queued_writes).max(batch * Phase::ALL.len() as u64);
    let reading = ReadingFlag(ctx);
    let mut failures = 0u32;
    loop {
        if shutdown.is_cancelled() || !ctx.lifecycle.is_pushing() {
            return Ok(());
        }
        if is_cancelled(&ctx.store, &job).await? {
            job.finish(BackfillStatus::Cancelled);
            save(&ctx.store, &mut job).await?;
            return Ok(());
        }
        reading.set(job.phase == BackfillPhase::Reading);
        let pending = u64::try_from(ctx.store.pending_background_writes().await?).unwrap_or(0);
        match job.phase {
            BackfillPhase::Reading | BackfillPhase::WaitingForQuota => {
                if pending >= queue_limit {
                    sleep_or_cancel(shutdown, POLL).await;
                    continue;
                }
                // The calls the queued writes will take count as spent already.
                let left = u64::from(ctx.marketo.usage().quota_left).saturating_sub(pending.div_ceil(batch));
                if left <= u64::from(cfg.quota_reserve) {
                    if job.phase != BackfillPhase::WaitingForQuota {
                        tracing::warn!(
                            quota_left = left,
                            reserve = cfg.quota_reserve,
                            "backfill paused: the Marketo quota left is down to the reserve kept for live traffic"
                        );
                        job.phase = BackfillPhase::WaitingForQuota;
                        save(&ctx.store, &mut job).await?;
                    }
                    sleep_or_cancel(shutdown, Duration::from_secs(5)).await;
                    continue;
                }
                job.phase = BackfillPhase::Reading;
                let step = match (&job.cursor, job.pages_read) {
                    (_, 0) => read_and_plan(ctx, &query, None).await,
                    (Some(link), _) => read_and_plan(ctx, &query, Some(link)).await,
                    (None, _) => {
                        job.phase = BackfillPhase::Pushing;
                        save(&ctx.store, &mut job).await?;
                        continue;
                    }
                };
                match step {
                    Ok(done) => {
                        failures = 0;
                        if job.pages_read == 0 {
                            job.estimated_total = done.total;
                        }
                        job.pages_read += 1;
                        job.opportunities_read += done.opportunities;
                        job.connections_read += done.connections;
                        job.contacts_read += done.contacts;
                        job.writes_queued += done.writes;
                        job.cursor = done.next_link;
                        job.last_error = None;
                        if job.cursor.is_none() {
                            job.phase = BackfillPhase::Pushing;
                        }
                        save(&ctx.store, &mut job).await?;
                        metrics::counter!("oppsync_backfill_rows_read_total")
                            .increment(done.opportunities + done.connections + done.contacts);
                    }
                    Err(e) if e.is_permanent() => {
                        tracing::error!(error = %e, "backfill failed");
                        job.last_error = Some(e.to_string());
                        job.finish(BackfillStatus::Failed);
                        save(&ctx.store, &mut job).await?;
                        return Ok(());
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, failures, "backfill page failed; trying again");
                        job.last_error = Some(e.to_string());
                        save(&ctx.store, &mut job).await?;
                        let wait = crate::retry::backoff_ms(failures, 1_000, 60_000);
                        sleep_or_cancel(
                            shutdown,
                            Duration::from_millis(u64::try_from(wait).unwrap_or(1_000)),
                        )
                        .await;
                    }
                }
            }
            BackfillPhase::Pushing => {
                if pending == 0 {
                    job.finish(BackfillStatus::Completed);
                    save(&ctx.store, &mut job).await?;
                    tracing::info!(
                        job = %job.id,
                        opportunities = job.opportunities_read,
                        writes = job.writes_queued,
                        "backfill completed"
                    );
                    return Ok(());
                }
                sleep_or_cancel(shutdown, POLL).await;
            }
            BackfillPhase::Done => return Ok(()),
        }
    }
}

/// Tells the pusher (`WorkerContext::backfill_reading`) whether pages are still being read, and
/// wakes it when they no longer are, so the partial batches it held go at once. Cleared however
/// the job's run ends.
struct ReadingFlag<'a>(&'a WorkerContext);

impl ReadingFlag<'_> {
    fn set(&self, reading: bool) {
        let was = self.0.backfill_reading.swap(reading, Ordering::Relaxed);
        if was && !reading {
            self.0.pusher_wakeup.notify_one();
        }
    }
}

impl Drop for ReadingFlag<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// What one page achieved.
struct PageDone {
    total: Option<u64>,
    next_link: Option<String>,
    opportunities: u64,
    connections: u64,
    contacts: u64,
    writes: u64,
}

/// Reads one page of opportunities (the first, or the one `link` names), their connections and
/// the contacts oppsync does not know yet, and plans them all in one commit.
async fn read_and_plan(
    ctx: &WorkerContext,
    query: &CollectionQuery,
    link: Option<&str>,
) -> Result<PageDone, RunError> {
    let page = match link {
        None => ctx.dataverse.first_page(&query.clone().with_count()).await?,
        Some(link) => ctx.dataverse.page_at(link, query).await?,
    };
    let opportunities: Vec<&RowRecord> = page.rows().collect();
    let ids: Vec<Uuid> = opportunities.iter().map(|r| r.id).collect();
    // Every connection pair has one row whose record1 is the opportunity (specs/dynamics.md
    // §6.2); its reciprocal row describes the same link.
    let connections = read_all(
        ctx,
        ids.chunks(IDS_PER_QUERY)
            .map(|chunk| CollectionQuery::connections(5_000).filter(any_of("_record1id_value", chunk)))
            .collect(),
    )
    .await?;
    let mut contact_ids: BTreeSet<Uuid> = BTreeSet::new();
    for row in opportunities.iter().copied().chain(connections.iter()) {
        for name in ["customerid", "record1id", "record2id"] {
            if let Some(r) = row.attributes.get(name).and_then(AttributeValue::as_entity_ref)
                && r.logical_name == "contact"
            {
                contact_ids.insert(r.id);
            }
        }
    }
    // Contacts oppsync knows in full already (from webhooks, or an earlier page) are not read
    // again: contact steps keep them current.
    let known = ctx
        .store
        .load_rows(&RowKeys {
            contact_ids: contact_ids.iter().copied().collect(),
            ..RowKeys::default()
        })
        .await?;
    for row in &known.contacts {
        if row.decode::<ContactState>().is_ok_and(|c| c.is_complete()) {
            contact_ids.remove(&row.id);
        }
    }
    let wanted: Vec<Uuid> = contact_ids.into_iter().collect();
    let contacts = read_all(
        ctx,
        wanted
            .chunks(IDS_PER_QUERY)
            .map(|chunk| CollectionQuery::contacts(5_000).filter(any_of("contactid", chunk)))
            .collect(),
    )
    .await?;

    let mut events: Vec<DynamicsEvent> =
        Vec::with_capacity(contacts.len() + opportunities.len() + connections.len());
    events.extend(contacts.iter().map(|c| full_row(EntityKind::Contact, c)));
    events.extend(opportunities.iter().map(|o| full_row(EntityKind::Opportunity, o)));
    events.extend(connections.iter().map(|c| full_row(EntityKind::Connection, c)));
    let writes = if events.is_empty() {
        0
    } else {
        plan_and_commit(ctx, &events, None, true).await?
    };
    Ok(PageDone {
        total: page.total,
        next_link: page.next_link.clone(),
        opportunities: opportunities.len() as u64,
        connections: connections.len() as u64,
        contacts: contacts.len() as u64,
        writes: writes as u64,
    })
}

fn full_row(entity: EntityKind, row: &RowRecord) -> DynamicsEvent {
    rules::full_row_event(entity, row.id, row.modified_on, row.attributes.clone())
}

/// Every row of several queries, each followed to its last page, a few queries at once.
async fn read_all(ctx: &WorkerContext, queries: Vec<CollectionQuery>) -> Result<Vec<RowRecord>, WebApiError> {
    let pages: Vec<Result<Vec<RowRecord>, WebApiError>> = futures::stream::iter(queries)
        .map(|q| async move {
            let mut rows = Vec::new();
            let mut page: Page = ctx.dataverse.first_page(&q).await?;
            loop {
                rows.extend(page.changes.into_iter().filter_map(|c| match c {
                    Change::Row(r) => Some(r),
                    Change::Deleted(_) => None,
                }));
                match page.next_link {
                    Some(next) => page = ctx.dataverse.page_at(&next, &q).await?,
                    None => return Ok(rows),
                }
            }
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut all = Vec::new();
    for rows in pages {
        all.extend(rows?);
    }
    Ok(all)
}
