//! Planning: claimed notifications → decoded events → rules over the stored state → new state,
//! projections and Marketo writes, committed together with the notifications' settlement in one
//! transaction. A claimed batch is planned as a whole: its rows are loaded in a few queries, its
//! events merged in version order, each touched opportunity projected once, and one commit
//! settles every notification of it; a batch that cannot be planned falls back to one
//! notification at a time, so a failure is charged to the notification that caused it.
//!
//! Commits are compare-and-swap on row revisions, so concurrent workers (threads or replicas)
//! touching one opportunity serialise: the loser reloads and re-applies. Because the rules'
//! merge is order-independent, the result equals in-order application.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use tracing::Instrument;
use uuid::Uuid;

use super::WorkerContext;
use crate::dynamics::webapi::{ContactRecord, WebApiError};
use crate::dynamics::{
    AttributeValue, Attributes, DynamicsEvent, EntityKind, MessageKind, decode_notification,
};
use crate::retry::backoff_ms;
use crate::rules::{self, ConnectionRoleInfo, ContactState, Lookup, Projection, World};
use crate::store::{
    Commit, CommitError, InboxEntry, LoadedRows, PlannedWrite, RoleRow, RowKeys, RowWrite, Settle,
    Settlement, StoreError, now_ms,
};

/// Dataverse reads one lookup round makes at once (the in-process limit; Dataverse's own service
/// protection answers 429 beyond its limits, which the Web API client waits out).
const LOOKUP_CONCURRENCY: usize = 8;

/// Why a notification could not be planned now.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("Dataverse Web API: {0}")]
    Dataverse(#[from] WebApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored state is unreadable: {0}")]
    Corrupt(String),
    #[error("the notification cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the notification's lease was lost to another worker")]
    LeaseLost,
    #[error("lookups did not settle after several rounds: {0}")]
    Unresolved(String),
}

impl PlanError {
    /// Whether retrying later can help (everything but a body that never decodes).
    fn is_permanent(&self) -> bool {
        matches!(self, PlanError::Undecodable(_) | PlanError::Corrupt(_))
    }
}

/// The event a stored notification carries.
fn decode(entry: &InboxEntry) -> Result<DynamicsEvent, PlanError> {
    let body = entry.body.as_deref().unwrap_or_default();
    decode_notification(body.as_bytes(), entry.data_missing)
        .map(|n| n.event)
        .map_err(|e| PlanError::Undecodable(e.to_string()))
}

/// A claimed batch, decoded: what is planned together, and what goes one at a time (with its
/// event, or why it did not decode).
///
/// A notification no longer holds its body once decoded: the event (or the error) is all
/// planning needs, and a batch (two, with the one claimed ahead) would otherwise keep every body
/// twice, as text and decoded.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    together: Vec<(InboxEntry, DynamicsEvent)>,
    alone: Vec<(InboxEntry, Result<DynamicsEvent, PlanError>)>,
}

impl DecodedBatch {
    /// Decodes a claimed batch (CPU only: the plan loop does it for the next batch while the
    /// current one is planned). Notifications that need a Web API read of their own row (sent
    /// without data) or do not decode go one at a time.
    pub fn decode(entries: Vec<InboxEntry>) -> DecodedBatch {
        let mut batch = DecodedBatch::default();
        for mut entry in entries {
            let decoded = decode(&entry);
            entry.body = None;
            match decoded {
                Ok(event) if !(event.data_missing && event.message != MessageKind::Delete) => {
                    batch.together.push((entry, event));
                }
                // Read in full, or dead-lettered with the reason, one at a time.
                other => batch.alone.push((entry, other)),
            }
        }
        if batch.together.len() == 1 {
            batch
                .alone
                .extend(batch.together.drain(..).map(|(entry, event)| (entry, Ok(event))));
        }
        // Version order (then arrival order): the merge does not depend on it, but a reader of
        // the plan can rely on it.
        batch
            .together
            .sort_by_key(|(entry, event)| (event.version, entry.id));
        batch
    }
}

/// Processes a claimed, decoded batch to the end: every notification committed, rescheduled or
/// dead-lettered. Every notification of a batch that fails as a whole goes one at a time.
pub async fn process_decoded(ctx: &WorkerContext, batch: DecodedBatch) {
    #[cfg(test)]
    ctx.test_hooks.before_planning();
    let DecodedBatch { together, mut alone } = batch;
    if !together.is_empty() {
        let started = now_ms();
        let settle = Settle {
            ids: together.iter().map(|(entry, _)| entry.id).collect(),
            owner: ctx.owner.clone(),
        };
        let events: Vec<DynamicsEvent> = together.iter().map(|(_, event)| event.clone()).collect();
        let span = tracing::info_span!("plan_batch", notifications = together.len());
        match plan_and_commit(ctx, &events, Some(settle), false)
            .instrument(span.clone())
            .await
        {
            Ok(writes) => {
                let now = now_ms();
                metrics::counter!("oppsync_worker_notifications_total", "outcome" => "applied")
                    .increment(together.len() as u64);
                for (entry, _) in &together {
                    metrics::histogram!("oppsync_worker_lag_seconds")
                        .record((now - entry.received_at) as f64 / 1000.0);
                    tracing::debug!(
                        parent: &span,
                        inbox_id = entry.id,
                        correlation_id = entry.correlation_id.as_deref().unwrap_or(""),
                        "notification applied"
                    );
                }
                tracing::info!(
                    parent: &span,
                    writes,
                    took_ms = now - started,
                    "notifications applied"
                );
            }
            Err(e) => {
                // Whatever went wrong (a lookup, a lease, a row), planning each on its own
                // settles the others and charges the failure to the one that caused it.
                tracing::info!(parent: &span, error = %crate::errors::chain(&e), "batch not planned as a whole; planning one at a time");
                alone.extend(together.into_iter().map(|(entry, event)| (entry, Ok(event))));
            }
        }
    }
    alone.sort_by_key(|(entry, _)| entry.id);
    for (entry, event) in alone {
        process(ctx, entry, event).await;
    }
}

/// Processes one claimed notification to the end: committed, rescheduled or dead-lettered.
/// `event`: its body decoded, or why it did not decode.
async fn process(ctx: &WorkerContext, entry: InboxEntry, event: Result<DynamicsEvent, PlanError>) {
    let span = tracing::info_span!(
        "plan",
        inbox_id = entry.id,
        correlation_id = entry.correlation_id.as_deref().unwrap_or(""),
        entity = %entry.entity,
        message = %entry.message,
        record_id = %entry.record_id,
    );
    let started = now_ms();
    match plan_one(ctx, &entry, event).instrument(span.clone()).await {
        Ok(writes) => {
            metrics::counter!("oppsync_worker_notifications_total", "outcome" => "applied").increment(1);
            metrics::histogram!("oppsync_worker_lag_seconds")
                .record((now_ms() - entry.received_at) as f64 / 1000.0);
            tracing::info!(writes, took_ms = now_ms() - started, "notification applied");
        }
        Err(PlanError::LeaseLost) => {
            tracing::warn!(parent: &span, "lease lost; another worker owns this notification now");
        }
        Err(e) => {
            let attempts = u32::try_from(entry.attempts).unwrap_or(u32::MAX);
            let reason = crate::errors::chain(&e);
            let settlement = if e.is_permanent() || attempts >= ctx.config.worker.max_attempts {
                metrics::counter!("oppsync_worker_notifications_total", "outcome" => "dead").increment(1);
                tracing::error!(
                    parent: &span,
                    error = %reason,
                    attempts,
                    retry = %format!("POST /admin/notifications/{}/retry", entry.id),
                    "notification dead-lettered; fix the cause, then retry it"
                );
                Settlement::Dead { error: reason }
            } else {
                metrics::counter!("oppsync_worker_notifications_total", "outcome" => "retry").increment(1);
                tracing::warn!(parent: &span, error = %reason, attempts, "notification will be retried");
                Settlement::Retry {
                    at: now_ms()
                        + backoff_ms(
                            attempts,
                            ctx.config.worker.retry_base_ms,
                            ctx.config.worker.retry_max_ms,
                        ),
                    error: reason,
                }
            };
            if let Err(e) = ctx
                .store
                .settle_notification(entry.id, &ctx.owner, &settlement)
                .await
            {
                // The lease expires and the notification is claimed again: nothing is lost.
                tracing::error!(error = %crate::errors::chain(&e), "could not settle notification");
            }
        }
    }
}

async fn plan_one(
    ctx: &WorkerContext,
    entry: &InboxEntry,
    event: Result<DynamicsEvent, PlanError>,
) -> Result<usize, PlanError> {
    let mut event = event?;
    if event.data_missing && event.message != MessageKind::Delete {
        match read_row(ctx, &event).await? {
            Some(full) => event = full,
            None => {
                // The row is gone from Dynamics already; its Delete notification will follow.
                tracing::info!("row no longer exists in Dynamics; nothing to apply");
                let commit = Commit {
                    settle: Some(Settle::one(entry.id, &ctx.owner)),
                    ..Commit::default()
                };
                return commit_once(ctx, &commit).await.map(|_| 0);
            }
        }
    }
    plan_and_commit(
        ctx,
        std::slice::from_ref(&event),
        Some(Settle::one(entry.id, &ctx.owner)),
        false,
    )
    .await
}

/// Loads, applies `events` (in the given order), projects and commits, settling `settle`.
/// Compare-and-swap loop: a conflict means another worker changed a row we read. `background`:
/// the writes are a background job's (the initial sync), pushed after live ones.
pub(crate) async fn plan_and_commit(
    ctx: &WorkerContext,
    events: &[DynamicsEvent],
    settle: Option<Settle>,
    background: bool,
) -> Result<usize, PlanError> {
    for _ in 0..8 {
        let t0 = now_ms();
        let mut step = PlanStep::load(ctx, events).await?;
        let t1 = now_ms();
        for event in events {
            step.apply(event)?;
        }
        step.project(ctx).await?;
        let t2 = now_ms();
        let rejected = step.rejected_values();
        let (mut commit, writes) = step.into_commit(settle.clone())?;
        commit.background = background;
        let result = ctx.store.commit(&commit).await;
        // Where a plan's time goes; the commit includes waiting for SQLite's write lock.
        tracing::debug!(
            load_ms = t1 - t0,
            project_ms = t2 - t1,
            commit_ms = now_ms() - t2,
            "plan timing"
        );
        match result {
            Ok(()) => {
                report_rejected(&rejected);
                if writes > 0 {
                    ctx.pusher_wakeup.notify_one();
                }
                return Ok(writes);
            }
            Err(CommitError::Conflict) => {
                metrics::counter!("oppsync_worker_commit_conflicts_total").increment(1);
                continue;
            }
            Err(CommitError::LeaseLost) => return Err(PlanError::LeaseLost),
            Err(CommitError::Store(e)) => return Err(e.into()),
        }
    }
    Err(PlanError::Unresolved(
        "too many concurrent changes to the same rows".into(),
    ))
}

/// Values that did not fit their conversion, in committed plans: counted and logged with the
/// opportunity and the field (the admin view of the opportunity lists them too).
fn report_rejected(rejected: &[(Uuid, String, rules::RejectedValue)]) {
    for (opportunity, field, r) in rejected {
        metrics::counter!("oppsync_mapping_rejected_total", "field" => field.clone()).increment(1);
        tracing::warn!(
            opportunity_id = %opportunity,
            field = %field,
            dynamics_attribute = %r.dynamics,
            reason = %r.reason,
            "a Dynamics value does not fit its mapping; the Marketo field is left unchanged"
        );
    }
}

async fn commit_once(ctx: &WorkerContext, commit: &Commit) -> Result<(), PlanError> {
    match ctx.store.commit(commit).await {
        Ok(()) => Ok(()),
        Err(CommitError::LeaseLost) => Err(PlanError::LeaseLost),
        Err(CommitError::Conflict) => Err(PlanError::Unresolved("conflict".into())),
        Err(CommitError::Store(e)) => Err(e.into()),
    }
}

/// Re-sync of one opportunity (admin): reads the row and its customer through the Web API and
/// plans as if a full-row notification had arrived.
pub async fn resync_opportunity(ctx: &WorkerContext, id: Uuid) -> Result<Option<usize>, PlanError> {
    let columns = ctx.config.sync.opportunity_attributes();
    let row = ctx.dataverse.opportunity(id, &columns).await;
    ctx.note_dataverse(&row);
    let Some(row) = row? else {
        return Ok(None);
    };
    let event = rules::full_row_event(EntityKind::Opportunity, id, row.modified_on, row.attributes);
    let writes = plan_and_commit(ctx, std::slice::from_ref(&event), None, false).await?;
    ctx.pusher_wakeup.notify_one();
    Ok(Some(writes))
}

/// A full row read for a notification that arrived without its data (payload over 256 KB).
async fn read_row(ctx: &WorkerContext, event: &DynamicsEvent) -> Result<Option<DynamicsEvent>, PlanError> {
    let read = read_row_from_dataverse(ctx, event).await;
    ctx.note_dataverse(&read);
    Ok(read?)
}

async fn read_row_from_dataverse(
    ctx: &WorkerContext,
    event: &DynamicsEvent,
) -> Result<Option<DynamicsEvent>, WebApiError> {
    let id = event.record_id;
    Ok(match event.entity {
        EntityKind::Opportunity => {
            let columns = ctx.config.sync.opportunity_attributes();
            ctx.dataverse
                .opportunity(id, &columns)
                .await?
                .map(|r| rules::full_row_event(EntityKind::Opportunity, id, r.modified_on, r.attributes))
        }
        EntityKind::Connection => ctx
            .dataverse
            .connection(id)
            .await?
            .map(|r| rules::full_row_event(EntityKind::Connection, id, r.modified_on, r.attributes)),
        EntityKind::Contact => {
            ctx.dataverse.contact(id).await?.map(|c| {
                rules::full_row_event(EntityKind::Contact, id, c.modified_on, contact_attributes(&c))
            })
        }
        EntityKind::Account => ctx.dataverse.account(id).await?.map(|a| {
            let name = a.name.map_or(AttributeValue::Null, AttributeValue::String);
            rules::full_row_event(
                EntityKind::Account,
                id,
                a.modified_on,
                Attributes::from([("name".to_owned(), name)]),
            )
        }),
    })
}

/// A Web API contact in webhook vocabulary, nulls explicit (a full row).
pub fn contact_attributes(c: &ContactRecord) -> Attributes {
    let text = |v: &Option<String>| {
        v.clone()
            .map(AttributeValue::String)
            .unwrap_or(AttributeValue::Null)
    };
    let mut a = Attributes::new();
    a.insert(
        "parentcustomerid".into(),
        c.parent
            .clone()
            .map(AttributeValue::EntityReference)
            .unwrap_or(AttributeValue::Null),
    );
    a.insert("emailaddress1".into(), text(&c.email));
    a.insert("firstname".into(), text(&c.first_name));
    a.insert("lastname".into(), text(&c.last_name));
    a
}

/// The rows loaded for a batch of events, the world built from them, and what changed.
struct PlanStep {
    world: World,
    revisions: Revisions,
    projections: BTreeMap<Uuid, Option<Projection>>,
    changed_opportunities: BTreeSet<Uuid>,
    changed_connections: BTreeSet<Uuid>,
    changed_contacts: BTreeSet<Uuid>,
    changed_accounts: BTreeSet<Uuid>,
    /// Accounts already asked of the store (found or not).
    accounts_asked: BTreeSet<Uuid>,
    /// Marketo companies to rename (an account in Marketo changed its name).
    renamed_companies: BTreeSet<Uuid>,
    new_roles: Vec<ConnectionRoleInfo>,
    /// Opportunities the applied events may have changed the projection of.
    affected: BTreeSet<Uuid>,
    planned: BTreeMap<Uuid, Projection>,
    /// Opportunities a Web API read found gone from Dynamics.
    gone: BTreeSet<Uuid>,
}

#[derive(Default)]
struct Revisions {
    opportunities: BTreeMap<Uuid, i64>,
    connections: BTreeMap<Uuid, i64>,
    contacts: BTreeMap<Uuid, i64>,
    accounts: BTreeMap<Uuid, i64>,
}

/// A stored row this version cannot read (or a state it cannot write) is corrupt: a dead
/// letter, not a store failure to retry.
fn corrupt(e: StoreError) -> PlanError {
    PlanError::Corrupt(e.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, PlanError> {
    crate::store::encode_state(value).map_err(corrupt)
}

/// What a lookup still needs from the Web API after the store had its say.
enum Fetch {
    Contact(Uuid),
    Role(Uuid),
    Opportunity(Uuid),
    Account(Uuid),
}

/// A Web API answer for a [`Fetch`].
enum Fetched {
    Contact(Uuid, Option<ContactRecord>),
    Role(Uuid, Option<crate::dynamics::webapi::ConnectionRoleRecord>),
    Opportunity(Uuid, Option<crate::dynamics::webapi::RowRecord>),
    Account(Uuid, Option<crate::dynamics::webapi::AccountRecord>),
}

impl PlanStep {
    /// Loads what the events touch: each one's opportunity with every connection, for a contact
    /// the opportunities it is the customer of, and the contacts and roles those reference. The
    /// keys of the whole batch go together, so a batch costs three rounds of queries.
    async fn load(ctx: &WorkerContext, events: &[DynamicsEvent]) -> Result<PlanStep, PlanError> {
        let mut keys = RowKeys::default();
        for event in events {
            if let Some(opp) = rules::event_opportunity(event) {
                keys.opportunity_ids.push(opp);
                keys.connections_of_opportunities.push(opp);
            }
            match event.entity {
                EntityKind::Connection => keys.connection_ids.push(event.record_id),
                EntityKind::Contact => {
                    keys.contact_ids.push(event.record_id);
                    keys.opportunities_with_customer.push(event.record_id);
                    // A deleted contact loses its stakeholder roles too.
                    if event.message == MessageKind::Delete {
                        keys.connections_of_contacts.push(event.record_id);
                    }
                }
                EntityKind::Account => keys.account_ids.push(event.record_id),
                EntityKind::Opportunity => {}
            }
        }
        let mut rows = ctx.store.load_rows(&keys).await?;
        let mut step = PlanStep {
            world: World::default(),
            revisions: Revisions::default(),
            projections: BTreeMap::new(),
            changed_opportunities: BTreeSet::new(),
            changed_connections: BTreeSet::new(),
            changed_contacts: BTreeSet::new(),
            changed_accounts: BTreeSet::new(),
            accounts_asked: BTreeSet::new(),
            renamed_companies: BTreeSet::new(),
            new_roles: Vec::new(),
            affected: BTreeSet::new(),
            planned: BTreeMap::new(),
            gone: BTreeSet::new(),
        };
        step.absorb(&rows)?;
        // Second round: the opportunities of loaded connections (a partial connection Update
        // names neither side) and of contacts, with their connections; then every contact and
        // role those reference.
        let mut more = RowKeys::default();
        let asked: BTreeSet<Uuid> = keys.connections_of_opportunities.iter().copied().collect();
        let known: BTreeSet<Uuid> = step.world.opportunities.keys().copied().collect();
        let mut opportunities: BTreeSet<Uuid> = step.world.opportunities.keys().copied().collect();
        opportunities.extend(
            step.world
                .connections
                .values()
                .filter_map(rules::connection_opportunity),
        );
        for opp in &opportunities {
            if !known.contains(opp) {
                more.opportunity_ids.push(*opp);
            }
            if !asked.contains(opp) {
                more.connections_of_opportunities.push(*opp);
            }
        }
        if !more.opportunity_ids.is_empty() || !more.connections_of_opportunities.is_empty() {
            rows = ctx.store.load_rows(&more).await?;
            step.absorb(&rows)?;
        }
        let mut refs = RowKeys::default();
        for o in step.world.opportunities.values() {
            if let Some(c) = rules::customer_contact(o) {
                refs.contact_ids.push(c);
            }
            if let Some(account) = o.customer().filter(|c| c.logical_name == "account") {
                refs.account_ids.push(account.id);
            }
        }
        for c in step.world.contacts.values() {
            refs.account_ids.extend(c.parent_account.as_ref().map(|a| a.id));
        }
        for c in step.world.connections.values() {
            refs.contact_ids.extend(c.contact_id);
            refs.role_ids.extend(c.role_id);
        }
        refs.contact_ids.retain(|c| !step.world.contacts.contains_key(c));
        refs.contact_ids.sort();
        refs.contact_ids.dedup();
        refs.role_ids.sort();
        refs.role_ids.dedup();
        refs.account_ids.retain(|a| !step.world.accounts.contains_key(a));
        refs.account_ids.sort();
        refs.account_ids.dedup();
        rows = ctx.store.load_rows(&refs).await?;
        step.absorb(&rows)?;
        // The parent accounts of contacts loaded just now.
        let mut parents = RowKeys::default();
        for c in step.world.contacts.values() {
            if let Some(a) = &c.parent_account
                && !step.world.accounts.contains_key(&a.id)
            {
                parents.account_ids.push(a.id);
            }
        }
        if !parents.account_ids.is_empty() {
            parents.account_ids.sort();
            parents.account_ids.dedup();
            rows = ctx.store.load_rows(&parents).await?;
            step.absorb(&rows)?;
        }
        Ok(step)
    }

    fn absorb(&mut self, rows: &LoadedRows) -> Result<(), PlanError> {
        for r in &rows.opportunities {
            if self.world.opportunities.contains_key(&r.id) {
                continue;
            }
            self.world
                .opportunities
                .insert(r.id, r.decode().map_err(corrupt)?);
            self.revisions.opportunities.insert(r.id, r.revision);
            let projection = r.decode_projection::<Projection>().map_err(corrupt)?;
            self.projections.insert(r.id, projection);
        }
        for r in &rows.connections {
            if self.world.connections.contains_key(&r.id) {
                continue;
            }
            self.world.connections.insert(r.id, r.decode().map_err(corrupt)?);
            self.revisions.connections.insert(r.id, r.revision);
        }
        for r in &rows.contacts {
            if self.world.contacts.contains_key(&r.id) {
                continue;
            }
            self.world.contacts.insert(r.id, r.decode().map_err(corrupt)?);
            self.revisions.contacts.insert(r.id, r.revision);
        }
        for r in &rows.accounts {
            if self.world.accounts.contains_key(&r.id) {
                continue;
            }
            self.world.accounts.insert(r.id, r.decode().map_err(corrupt)?);
            self.revisions.accounts.insert(r.id, r.revision);
        }
        for r in &rows.roles {
            self.world.roles.insert(
                r.id,
                ConnectionRoleInfo {
                    id: r.id,
                    name: r.name.clone(),
                    category: r.category,
                },
            );
        }
        Ok(())
    }

    /// Merges one event into the world and notes what it changed.
    fn apply(&mut self, event: &DynamicsEvent) -> Result<(), PlanError> {
        let applied =
            rules::apply(&mut self.world, event).map_err(|e| PlanError::Unresolved(e.to_string()))?;
        self.changed_opportunities.extend(&applied.opportunities_changed);
        self.changed_connections.extend(&applied.connections_changed);
        self.changed_contacts.extend(&applied.contacts_changed);
        self.changed_accounts.extend(&applied.accounts_changed);
        self.renamed_companies.extend(&applied.companies);
        self.affected.extend(&applied.opportunities);
        Ok(())
    }

    /// Resolves every lookup the projections need and projects each opportunity whose
    /// projection may have changed, once, from the world after every event of the batch.
    async fn project(&mut self, ctx: &WorkerContext) -> Result<(), PlanError> {
        let mut pending: BTreeSet<Uuid> = std::mem::take(&mut self.affected);
        // An opportunity that was never planned (e.g. its earlier plan was blocked) is planned now.
        for (id, projection) in &self.projections {
            if projection.is_none() && self.world.opportunities.contains_key(id) {
                pending.insert(*id);
            }
        }
        for round in 0..4 {
            // Every account a projection may name must be loaded from the store first: its
            // cached name decides the company's, and its row's revision the commit's.
            self.load_accounts(ctx).await?;
            let mut lookups: BTreeSet<Lookup> = BTreeSet::new();
            let mut done = Vec::new();
            // Gone from Dynamics (a read found no row): planned as deleted, nothing to look up.
            pending.retain(|id| !self.gone.contains(id));
            for id in &pending {
                if !self.world.opportunities.contains_key(id) {
                    // A connection to an opportunity oppsync has never seen: plan it from a read.
                    lookups.insert(Lookup::OpportunityRow(*id));
                    continue;
                }
                match rules::project(*id, &self.world, &ctx.config.sync) {
                    Ok(p) => {
                        self.planned.insert(*id, p);
                        done.push(*id);
                    }
                    Err(needed) => lookups.extend(needed),
                }
            }
            for id in done {
                pending.remove(&id);
            }
            if pending.is_empty() {
                return Ok(());
            }
            if round == 3 {
                break;
            }
            // What a lookup changed is projected again, even if it was planned already.
            for id in self.resolve(ctx, &lookups).await? {
                if !self.gone.contains(&id) {
                    self.planned.remove(&id);
                    pending.insert(id);
                }
            }
        }
        Err(PlanError::Unresolved(format!(
            "{} opportunity projection(s) still need lookups",
            pending.len()
        )))
    }

    /// Loads the stored rows of the accounts the world's opportunities and contacts name and
    /// that were not asked for yet.
    async fn load_accounts(&mut self, ctx: &WorkerContext) -> Result<(), PlanError> {
        let customers = self
            .world
            .opportunities
            .values()
            .filter_map(|o| o.customer().filter(|c| c.logical_name == "account").map(|c| c.id));
        let parents = self
            .world
            .contacts
            .values()
            .filter_map(|c| c.parent_account.as_ref().map(|a| a.id));
        let mut keys = RowKeys::default();
        for id in customers.chain(parents).collect::<BTreeSet<Uuid>>() {
            if !self.world.accounts.contains_key(&id) && self.accounts_asked.insert(id) {
                keys.account_ids.push(id);
            }
        }
        if !keys.account_ids.is_empty() {
            let rows = ctx.store.load_rows(&keys).await?;
            self.absorb(&rows)?;
        }
        Ok(())
    }

    /// Performs one round of lookups and merges the results; returns opportunities to
    /// (re)project. The store is asked first, in one load for all of them; what it cannot
    /// answer is read through the Web API, several reads at once.
    async fn resolve(
        &mut self,
        ctx: &WorkerContext,
        lookups: &BTreeSet<Lookup>,
    ) -> Result<BTreeSet<Uuid>, PlanError> {
        let mut keys = RowKeys::default();
        // Contacts and opportunities not loaded yet (e.g. a customer that just changed to
        // them); roles are looked up in the store every time, as they are cached there.
        let absent_contacts: BTreeSet<Uuid> = lookups
            .iter()
            .filter_map(|l| match l {
                Lookup::Contact(id) if !self.world.contacts.contains_key(id) => Some(*id),
                _ => None,
            })
            .collect();
        let absent_opportunities: BTreeSet<Uuid> = lookups
            .iter()
            .filter_map(|l| match l {
                Lookup::OpportunityRow(id) if !self.world.opportunities.contains_key(id) => Some(*id),
                _ => None,
            })
            .collect();
        let absent_accounts: BTreeSet<Uuid> = lookups
            .iter()
            .filter_map(|l| match l {
                Lookup::Account(id) if !self.world.accounts.contains_key(id) => Some(*id),
                _ => None,
            })
            .collect();
        keys.contact_ids.extend(&absent_contacts);
        keys.account_ids.extend(&absent_accounts);
        keys.opportunity_ids.extend(&absent_opportunities);
        keys.connections_of_opportunities.extend(&absent_opportunities);
        keys.role_ids.extend(lookups.iter().filter_map(|l| match l {
            Lookup::ConnectionRole(id) => Some(*id),
            _ => None,
        }));
        let rows = ctx.store.load_rows(&keys).await?;
        self.absorb(&rows)?;

        let mut affected = BTreeSet::new();
        let mut fetches = Vec::new();
        for lookup in lookups {
            match lookup {
                Lookup::Contact(id) => {
                    if absent_contacts.contains(id)
                        && self.world.contacts.get(id).is_some_and(ContactState::is_complete)
                    {
                        affected.extend(self.opportunities_of(*id));
                    } else {
                        fetches.push(Fetch::Contact(*id));
                    }
                }
                Lookup::ConnectionRole(id) => match self.world.roles.get(id) {
                    Some(_) => affected.extend(self.opportunities_with_role(*id)),
                    None => fetches.push(Fetch::Role(*id)),
                },
                Lookup::Account(id) => {
                    if absent_accounts.contains(id)
                        && self
                            .world
                            .accounts
                            .get(id)
                            .is_some_and(|a| a.known_name().is_some())
                    {
                        affected.extend(self.opportunities_of_account(*id));
                    } else {
                        fetches.push(Fetch::Account(*id));
                    }
                }
                Lookup::OpportunityRow(id) => {
                    if absent_opportunities.contains(id)
                        && self
                            .world
                            .opportunities
                            .get(id)
                            .is_some_and(|o| o.seen_in_full || o.is_deleted())
                    {
                        affected.insert(*id);
                    } else {
                        fetches.push(Fetch::Opportunity(*id));
                    }
                }
            }
        }
        let columns = ctx.config.sync.opportunity_attributes();
        let fetched: Vec<Result<Fetched, WebApiError>> = futures::stream::iter(fetches)
            .map(|fetch| {
                let columns = &columns;
                async move {
                    Ok(match fetch {
                        Fetch::Contact(id) => Fetched::Contact(id, ctx.dataverse.contact(id).await?),
                        Fetch::Role(id) => Fetched::Role(id, ctx.dataverse.connection_role(id).await?),
                        Fetch::Account(id) => Fetched::Account(id, ctx.dataverse.account(id).await?),
                        Fetch::Opportunity(id) => {
                            Fetched::Opportunity(id, ctx.dataverse.opportunity(id, columns).await?)
                        }
                    })
                }
            })
            .buffered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
        for result in &fetched {
            ctx.note_dataverse(result);
        }
        for result in fetched {
            match result? {
                Fetched::Contact(id, record) => {
                    let contact = match record {
                        Some(c) => ContactState::from_row(id, &contact_attributes(&c), c.modified_on),
                        // Not in Dataverse: no parent account, no email, and said so.
                        None => ContactState::not_found(id),
                    };
                    affected.extend(self.world.merge_contact(&contact));
                    self.changed_contacts.insert(id);
                }
                Fetched::Role(id, record) => {
                    let info = match record {
                        Some(r) => ConnectionRoleInfo {
                            id,
                            name: r.name,
                            category: r.category,
                        },
                        // A role that no longer exists cannot make a stakeholder.
                        None => ConnectionRoleInfo {
                            id,
                            name: String::new(),
                            category: -1,
                        },
                    };
                    self.world.roles.insert(id, info.clone());
                    self.new_roles.push(info);
                    affected.extend(self.opportunities_with_role(id));
                }
                Fetched::Account(id, record) => {
                    // An account that does not exist (any more) has no name to give.
                    let (name, version) = match record {
                        Some(a) => (a.name, a.modified_on),
                        None => (None, crate::dynamics::Version::MIN),
                    };
                    let account = self
                        .world
                        .accounts
                        .entry(id)
                        .or_insert_with(|| rules::AccountState::new(id));
                    account.merge_name(name, version);
                    self.changed_accounts.insert(id);
                    affected.extend(self.opportunities_of_account(id));
                }
                Fetched::Opportunity(id, record) => match record {
                    Some(row) => {
                        let event = rules::full_row_event(
                            EntityKind::Opportunity,
                            id,
                            row.modified_on,
                            row.attributes,
                        );
                        let applied = rules::apply(&mut self.world, &event)
                            .map_err(|e| PlanError::Unresolved(e.to_string()))?;
                        self.changed_opportunities.extend(&applied.opportunities_changed);
                        affected.extend(applied.opportunities);
                        affected.insert(id);
                    }
                    None => {
                        // Gone from Dynamics: its Delete notification will follow; push nothing now.
                        tracing::info!(opportunity_id = %id, "opportunity no longer exists in Dynamics");
                        self.planned.insert(id, Projection::deleted(id));
                        self.gone.insert(id);
                    }
                },
            }
        }
        Ok(affected)
    }

    fn opportunities_with_role(&self, role: Uuid) -> BTreeSet<Uuid> {
        self.world
            .connections
            .values()
            .filter(|c| c.role_id == Some(role))
            .filter_map(rules::connection_opportunity)
            .collect()
    }

    /// Opportunities of this world whose company is `account`.
    fn opportunities_of_account(&self, account: Uuid) -> BTreeSet<Uuid> {
        self.world
            .opportunities
            .values()
            .filter(|o| {
                let customer = o.customer();
                customer.is_some_and(|c| c.logical_name == "account" && c.id == account)
                    || rules::customer_contact(o)
                        .and_then(|c| self.world.contacts.get(&c))
                        .and_then(|c| c.parent_account.as_ref())
                        .is_some_and(|a| a.id == account)
            })
            .map(|o| o.id)
            .collect()
    }

    fn opportunities_of(&self, contact: Uuid) -> BTreeSet<Uuid> {
        let as_customer = self
            .world
            .opportunities
            .values()
            .filter(|o| rules::customer_contact(o) == Some(contact))
            .map(|o| o.id);
        let as_stakeholder = self
            .world
            .connections
            .values()
            .filter(|c| c.contact_id == Some(contact))
            .filter_map(rules::connection_opportunity);
        as_customer.chain(as_stakeholder).collect()
    }

    /// The rejected values of every projection planned.
    fn rejected_values(&self) -> Vec<(Uuid, String, rules::RejectedValue)> {
        self.planned
            .iter()
            .flat_map(|(id, p)| p.rejected.iter().map(|(f, r)| (*id, f.clone(), r.clone())))
            .collect()
    }

    fn into_commit(mut self, settle: Option<Settle>) -> Result<(Commit, usize), PlanError> {
        let mut commit = Commit {
            settle,
            ..Commit::default()
        };
        let mut writes = 0;
        // Accounts that become Marketo companies are remembered, so a later rename reaches
        // the company; a name only a reference carried is kept as the oldest guess.
        for projection in self.planned.values() {
            let Some(company) = &projection.company else {
                continue;
            };
            let account = self
                .world
                .accounts
                .entry(company.account_id)
                .or_insert_with(|| rules::AccountState::new(company.account_id));
            if !account.in_marketo {
                account.in_marketo = true;
                if account.known_name().is_none() {
                    account.merge_name(company.name.clone(), crate::dynamics::Version::MIN);
                }
                self.changed_accounts.insert(company.account_id);
            }
        }
        // A renamed account that is a Marketo company: its company is written at once, whatever
        // opportunities name it.
        for id in &self.renamed_companies {
            let Some(account) = self.world.accounts.get(id) else {
                continue;
            };
            let w = rules::MarketoWrite::UpsertCompany {
                account_id: *id,
                name: account.known_name().flatten().map(str::to_owned),
            };
            commit.writes.push(PlannedWrite {
                key: w.key(),
                opportunity_id: None,
                phase: w.phase(),
                payload: json(&w)?,
            });
            writes += 1;
        }
        let mut opportunities: BTreeSet<Uuid> = self.changed_opportunities.clone();
        for (id, projection) in &self.planned {
            let old = self.projections.get(id).and_then(Option::as_ref);
            // Every opportunity re-projected is written back, changed or not: its revision then
            // serialises all events that touch it. Without that, two deletes of the connection
            // pair, planned at once, would each still see the other row active (write skew).
            opportunities.insert(*id);
            for w in rules::plan(old, projection) {
                // A company write names the account as this plan saw it: writing the account
                // back makes its revision part of the commit, so a rename committed meanwhile
                // and this plan cannot both commit (the loser re-plans with the new name).
                if let rules::MarketoWrite::UpsertCompany { account_id, .. } = &w
                    && self.world.accounts.contains_key(account_id)
                {
                    self.changed_accounts.insert(*account_id);
                }
                commit.writes.push(PlannedWrite {
                    key: w.key(),
                    opportunity_id: Some(*id),
                    phase: w.phase(),
                    payload: json(&w)?,
                });
                writes += 1;
            }
        }
        for id in opportunities {
            let Some(state) = self.world.opportunities.get(&id) else {
                continue;
            };
            let projection = match self.planned.get(&id) {
                Some(p) => Some(json(p)?),
                None => self
                    .projections
                    .get(&id)
                    .and_then(Option::as_ref)
                    .map(json)
                    .transpose()?,
            };
            commit.opportunities.push(RowWrite {
                id,
                expected_revision: self.revisions.opportunities.get(&id).copied(),
                state: json(state)?,
                projection,
                index: rules::customer_contact(state),
            });
        }
        for id in &self.changed_connections {
            let Some(state) = self.world.connections.get(id) else {
                continue;
            };
            commit.connections.push(RowWrite {
                id: *id,
                expected_revision: self.revisions.connections.get(id).copied(),
                state: json(state)?,
                projection: None,
                index: rules::connection_opportunity(state),
            });
        }
        // The customer contact's parent account decides a projection's company. Writing it back
        // (changed or not) makes its revision part of this commit, so a concurrent change of the
        // contact and a plan that read it cannot both commit (write skew), whichever comes first.
        let mut contacts = self.changed_contacts.clone();
        for id in self.planned.keys() {
            if let Some(customer) = self.world.opportunities.get(id).and_then(rules::customer_contact)
                && self.revisions.contacts.contains_key(&customer)
            {
                contacts.insert(customer);
            }
        }
        for id in &contacts {
            let Some(state) = self.world.contacts.get(id) else {
                continue;
            };
            commit.contacts.push(RowWrite {
                id: *id,
                expected_revision: self.revisions.contacts.get(id).copied(),
                state: json(state)?,
                projection: None,
                index: None,
            });
        }
        for id in &self.changed_accounts {
            let Some(state) = self.world.accounts.get(id) else {
                continue;
            };
            commit.accounts.push(RowWrite {
                id: *id,
                expected_revision: self.revisions.accounts.get(id).copied(),
                state: json(state)?,
                projection: None,
                index: None,
            });
        }
        commit.roles = self
            .new_roles
            .iter()
            .map(|r| RoleRow {
                id: r.id,
                name: r.name.clone(),
                category: r.category,
            })
            .collect();
        Ok((commit, writes))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dynamics::compose::NotificationBuilder;
    use crate::store::Status;

    fn entry(id: i64, body: String) -> InboxEntry {
        InboxEntry {
            id,
            dedupe_key: format!("k{id}"),
            received_at: 0,
            entity: "contact".into(),
            message: "Create".into(),
            record_id: Uuid::new_v4().to_string(),
            version: 0,
            correlation_id: None,
            data_missing: false,
            status: Status::Pending,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            settled_at: None,
            body: Some(body),
        }
    }

    #[test]
    fn a_claimed_batch_keeps_events_or_decode_errors_and_no_body() {
        let create = |id| {
            entry(
                id,
                NotificationBuilder::contact_create(Uuid::new_v4(), 1_750_000_000_000).to_json(),
            )
        };
        let batch = DecodedBatch::decode(vec![create(1), entry(2, "{not json".into()), create(3)]);
        assert_eq!(batch.together.len(), 2);
        assert_eq!(batch.alone.len(), 1);
        let (garbled, result) = &batch.alone[0];
        assert_eq!(garbled.id, 2);
        assert!(matches!(result, Err(PlanError::Undecodable(_))), "{result:?}");
        let bodies = batch
            .together
            .iter()
            .map(|(e, _)| e)
            .chain(batch.alone.iter().map(|(e, _)| e));
        assert!(bodies.into_iter().all(|e| e.body.is_none()));
    }
}
