//! Reconciliation: every `reconcile.interval_secs`, the replica that pushes asks Dataverse what
//! changed in opportunity, connection, contact and account since its last pass, and plans those rows
//! through the same rules as webhooks (full rows versioned by `modifiedon`, deletions as deletes).
//! A change a webhook already brought plans nothing (per-field versions); a change a webhook
//! missed is planned, and counted.
//!
//! With change tracking on a table (`Prefer: odata.track-changes`), the pass follows the stored
//! `@odata.deltaLink` and sees deletions as `$deletedEntity` entries. Where a table has it off, the
//! pass reads `modifiedon gt <last pass>` instead, which cannot see deletions: for opportunities it
//! then checks, a bounded number per pass, that the opportunities oppsync knows still exist, and
//! reports those that are gone as deletes that need their webhook (specs/dynamics.md, addendum).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::WorkerContext;
use super::planner::{PlanError, plan_and_commit};
use crate::dynamics::webapi::{Change, CollectionQuery, Page, WebApiError, any_of};
use crate::dynamics::{Attributes, DynamicsEvent, EntityKind, MessageKind};
use crate::rules::{self, OpportunityState};
use crate::store::{RowKeys, Store, StoreError, now_ms};

/// The tables a pass asks about, by entity set.
const TABLES: [(EntityKind, &str); 4] = [
    (EntityKind::Opportunity, "opportunities"),
    (EntityKind::Connection, "connections"),
    (EntityKind::Contact, "contacts"),
    (EntityKind::Account, "accounts"),
];

/// A `modifiedon` query starts this long before the last pass began: clocks of oppsync and
/// Dataverse differ a little, and a row changed during the pass may carry an earlier time.
const OVERLAP_MS: i64 = 60_000;
/// Ids per existence check.
const IDS_PER_CHECK: usize = 50;
/// Most missing deletes kept in the report.
const MAX_REPORTED: usize = 1_000;

/// What the store keeps per table (control key `reconcile:<entity set>`), and what
/// `GET /admin/reconcile` shows of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TableReconcile {
    /// Logical name: opportunity, connection, contact.
    pub table: String,
    /// Whether the table answered with change tracking at the last pass (None before any).
    pub change_tracking: Option<bool>,
    /// When the last pass of this table that succeeded began (epoch ms).
    pub last_pass_at: Option<i64>,
    /// When the stored delta token was issued (epoch ms).
    pub delta_token_at: Option<i64>,
    /// Rows (changed or deleted) the last pass found.
    pub changes_found: u64,
    /// Marketo writes the last pass planned: changes webhooks had not brought.
    pub writes_planned: u64,
    /// Opportunities oppsync holds that Dataverse no longer has, seen where change tracking is
    /// off: their Delete webhook was lost. Re-deliver it (or delete them in Marketo by hand).
    pub deletes_needing_webhook: Vec<String>,
    pub last_error: Option<String>,
    /// The delta link to follow next (not shown).
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub delta_link: Option<String>,
    /// Where the existence check goes on (not shown).
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub check_after: Option<Uuid>,
}

/// The stored form keeps the hidden members too.
#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    view: TableReconcile,
    delta_link: Option<String>,
    check_after: Option<Uuid>,
}

/// The state of reconciliation, as `GET /admin/reconcile` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReconcileStatus {
    /// Seconds between passes (0: off).
    pub interval_secs: u64,
    pub tables: Vec<TableReconcile>,
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Dataverse Web API: {0}")]
    Dataverse(#[from] WebApiError),
    #[error("planning: {0}")]
    Plan(#[from] PlanError),
}

fn key(set: &str) -> String {
    format!("reconcile:{set}")
}

async fn load(store: &Store, kind: EntityKind, set: &str) -> Result<TableReconcile, StoreError> {
    match store.control(&key(set)).await? {
        None => Ok(TableReconcile {
            table: kind.logical_name().to_owned(),
            ..TableReconcile::default()
        }),
        Some(text) => {
            let stored: Stored = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("reconcile state of {set}: {e}")))?;
            Ok(TableReconcile {
                delta_link: stored.delta_link,
                check_after: stored.check_after,
                ..stored.view
            })
        }
    }
}

async fn save(store: &Store, set: &str, state: &TableReconcile) -> Result<(), StoreError> {
    let stored = Stored {
        view: state.clone(),
        delta_link: state.delta_link.clone(),
        check_after: state.check_after,
    };
    let text = serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.set_control(&key(set), &text).await
}

/// What the store says of each table.
pub async fn status(store: &Store, interval_secs: u64) -> Result<ReconcileStatus, StoreError> {
    let mut tables = Vec::new();
    for (kind, set) in TABLES {
        tables.push(load(store, kind, set).await?);
    }
    Ok(ReconcileStatus {
        interval_secs,
        tables,
    })
}

/// Runs a pass every `reconcile.interval_secs` while this replica pushes to Marketo.
pub async fn run_loop(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let interval = ctx.config.reconcile.interval_secs;
    if interval == 0 {
        return shutdown.cancelled().await;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
        }
        if !ctx.lifecycle.is_pushing() {
            continue;
        }
        match pass(&ctx).await {
            Ok(status) => {
                let found: u64 = status.tables.iter().map(|t| t.changes_found).sum();
                let planned: u64 = status.tables.iter().map(|t| t.writes_planned).sum();
                tracing::info!(changes = found, writes = planned, "reconcile pass done");
            }
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; the next one goes on"),
        }
    }
}

/// One pass over every table; a table that fails keeps its error and the others go on.
pub async fn pass(ctx: &WorkerContext) -> Result<ReconcileStatus, StoreError> {
    let mut tables = Vec::new();
    for (kind, set) in TABLES {
        let mut state = load(&ctx.store, kind, set).await?;
        let started = now_ms();
        state.changes_found = 0;
        state.writes_planned = 0;
        match table_pass(ctx, kind, &mut state).await {
            Ok(()) => {
                state.last_pass_at = Some(started);
                state.last_error = None;
            }
            Err(e) => {
                tracing::warn!(table = kind.logical_name(), error = %e, "reconcile pass of a table failed");
                state.last_error = Some(e.to_string());
            }
        }
        metrics::counter!("oppsync_reconcile_missed_changes_total", "table" => kind.logical_name())
            .increment(state.writes_planned);
        if let Some(at) = state.delta_token_at {
            metrics::gauge!("oppsync_reconcile_delta_token_age_seconds", "table" => kind.logical_name())
                .set((now_ms() - at) as f64 / 1000.0);
        }
        if kind == EntityKind::Opportunity {
            metrics::gauge!("oppsync_reconcile_deletes_needing_webhook")
                .set(state.deletes_needing_webhook.len() as f64);
        }
        save(&ctx.store, set, &state).await?;
        tables.push(state);
    }
    metrics::gauge!("oppsync_reconcile_last_pass_timestamp_seconds").set(now_ms() as f64 / 1000.0);
    Ok(ReconcileStatus {
        interval_secs: ctx.config.reconcile.interval_secs,
        tables,
    })
}

fn query(ctx: &WorkerContext, kind: EntityKind) -> CollectionQuery {
    let size = ctx.config.reconcile.page_size;
    match kind {
        EntityKind::Opportunity => {
            CollectionQuery::opportunities(&ctx.config.sync.opportunity_attributes(), size)
        }
        EntityKind::Connection => CollectionQuery::connections(size),
        EntityKind::Contact => CollectionQuery::contacts(size),
        EntityKind::Account => CollectionQuery::accounts(size),
    }
}

async fn table_pass(
    ctx: &WorkerContext,
    kind: EntityKind,
    state: &mut TableReconcile,
) -> Result<(), PassError> {
    let base = query(ctx, kind);
    // Change tracking first, every pass: it may have been turned on since.
    let tracked = base.clone().tracking_changes();
    let first = match &state.delta_link {
        Some(link) => ctx.dataverse.page_at(link, &tracked).await,
        None => ctx.dataverse.first_page(&tracked).await,
    };
    match first {
        Ok(page) => {
            if state.change_tracking != Some(true) {
                tracing::info!(
                    table = kind.logical_name(),
                    "change tracking is on: reconciliation follows delta links"
                );
            }
            state.change_tracking = Some(true);
            state.deletes_needing_webhook.clear();
            let mut page = page;
            loop {
                apply(ctx, kind, &page, state).await?;
                if let Some(next) = page.next_link.clone() {
                    page = ctx.dataverse.page_at(&next, &tracked).await?;
                    continue;
                }
                if let Some(delta) = page.delta_link.clone() {
                    state.delta_link = Some(delta);
                    state.delta_token_at = Some(now_ms());
                }
                return Ok(());
            }
        }
        Err(WebApiError::ChangeTrackingOff(_)) => {
            if state.change_tracking != Some(false) {
                tracing::warn!(
                    table = kind.logical_name(),
                    "change tracking is off: reconciliation reads modifiedon and cannot see deletes (`oppsync register --enable-change-tracking` turns it on)"
                );
            }
            state.change_tracking = Some(false);
            state.delta_link = None;
            state.delta_token_at = None;
        }
        Err(e) => return Err(e.into()),
    }
    let mut q = base;
    if let Some(last) = state.last_pass_at {
        let since = OffsetDateTime::from_unix_timestamp_nanos(i128::from(last - OVERLAP_MS) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok());
        if let Some(since) = since {
            q = q.filter(format!("modifiedon gt {since}"));
        }
    }
    let mut page = ctx.dataverse.first_page(&q).await?;
    loop {
        apply(ctx, kind, &page, state).await?;
        match page.next_link.clone() {
            Some(next) => page = ctx.dataverse.page_at(&next, &q).await?,
            None => break,
        }
    }
    if kind == EntityKind::Opportunity {
        check_deletes(ctx, state).await?;
    }
    Ok(())
}

/// Plans one page of changes.
async fn apply(
    ctx: &WorkerContext,
    kind: EntityKind,
    page: &Page,
    state: &mut TableReconcile,
) -> Result<(), PassError> {
    // Of accounts, only those oppsync already holds matter (a lost rename of a Marketo
    // company); the rest of the organisation's accounts are not kept.
    let held: Option<BTreeSet<Uuid>> = if kind == EntityKind::Account {
        let ids: Vec<Uuid> = page
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Row(row) => Some(row.id),
                Change::Deleted(_) => None,
            })
            .collect();
        let keys = RowKeys {
            account_ids: ids,
            ..RowKeys::default()
        };
        Some(
            ctx.store
                .load_rows(&keys)
                .await?
                .accounts
                .iter()
                .map(|r| r.id)
                .collect(),
        )
    } else {
        None
    };
    let mut events = Vec::with_capacity(page.changes.len());
    for change in &page.changes {
        if let (Some(held), Change::Row(row)) = (&held, change)
            && !held.contains(&row.id)
        {
            continue;
        }
        match change {
            Change::Row(row) => events.push(rules::full_row_event(
                kind,
                row.id,
                row.modified_on,
                row.attributes.clone(),
            )),
            // A deleted account changes no company: Marketo keeps the name it has.
            Change::Deleted(_) if kind == EntityKind::Account => {}
            Change::Deleted(id) => events.push(deleted(kind, *id)),
        }
    }
    state.changes_found += page.changes.len() as u64;
    if !events.is_empty() {
        let writes = plan_and_commit(ctx, &events, None, true).await?;
        state.writes_planned += writes as u64;
    }
    Ok(())
}

/// A delete seen through change tracking. A delete is final whatever its version (rules), and
/// Dataverse gives no time for it: now.
fn deleted(entity: EntityKind, id: Uuid) -> DynamicsEvent {
    DynamicsEvent {
        entity,
        message: MessageKind::Delete,
        record_id: id,
        version: now_ms(),
        attributes: Attributes::new(),
        pre_image: Attributes::new(),
        data_missing: false,
        correlation_id: None,
        operation_id: None,
        request_id: None,
        depth: 1,
    }
}

/// Where opportunity change tracking is off: checks that known opportunities still exist, a
/// bounded number per pass (going on where the last pass stopped), and reports the missing ones.
async fn check_deletes(ctx: &WorkerContext, state: &mut TableReconcile) -> Result<(), PassError> {
    let batches = i64::from(ctx.config.reconcile.delete_check_batches);
    let limit = batches * IDS_PER_CHECK as i64;
    let rows = ctx.store.opportunities_after(state.check_after, limit).await?;
    state.check_after = if (rows.len() as i64) < limit {
        None
    } else {
        rows.last().map(|r| r.id)
    };
    let mut reported: BTreeSet<String> = state.deletes_needing_webhook.iter().cloned().collect();
    let mut live: Vec<Uuid> = Vec::new();
    for row in &rows {
        let gone = row.decode::<OpportunityState>().is_ok_and(|s| s.is_deleted());
        if gone {
            reported.remove(&row.id.to_string());
        } else {
            live.push(row.id);
        }
    }
    for chunk in live.chunks(IDS_PER_CHECK) {
        let q =
            CollectionQuery::opportunities(&[], IDS_PER_CHECK as u32).filter(any_of("opportunityid", chunk));
        let page = ctx.dataverse.first_page(&q).await?;
        let found: BTreeSet<Uuid> = page.rows().map(|r| r.id).collect();
        for id in chunk {
            if found.contains(id) {
                reported.remove(&id.to_string());
            } else {
                reported.insert(id.to_string());
            }
        }
    }
    if !reported.is_empty() {
        tracing::warn!(
            count = reported.len(),
            "opportunities deleted in Dynamics whose Delete webhook never came (change tracking is off): re-deliver it"
        );
    }
    state.deletes_needing_webhook = reported.into_iter().take(MAX_REPORTED).collect();
    Ok(())
}
