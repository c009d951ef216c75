//! Pushing: pending Marketo writes (already coalesced per Marketo record by the store) go out in
//! dependency order — companies, leads, opportunities, roles, role deletes, opportunity deletes —
//! as few, full batches as the client can make, and each write settles: done, retry later, or a
//! dead letter with Marketo's code and message.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::WorkerContext;
use crate::marketo::{MarketoError, RecordResult, RoleRecord};
use crate::retry::backoff_ms;
use crate::rules::config::{EXTERNAL_COMPANY_ID, EXTERNAL_OPPORTUNITY_ID};
use crate::rules::{ContactState, LeadMatch, MarketoWrite, MissingLead, Phase, WriteKey};
use crate::service::{BlockReason, System};
use crate::store::{RowKeys, Status, StoreError, StoredWrite, WriteOutcome, now_ms};

/// Most writes one cycle reads, however many calls are free.
const CYCLE_LIMIT: i64 = 10_000;

/// How many pending writes a cycle reads, in push order, when `free_calls` calls may start:
/// what those calls and the next one can carry, twice over (writes waiting for a dependency
/// take places in the read without going). A backlog of 100,000 writes then costs a few
/// thousand rows of memory and decoding per cycle, not the whole backlog's worth.
pub fn read_limit(free_calls: usize, batch_size: usize) -> i64 {
    let rows = free_calls
        .saturating_add(1)
        .saturating_mul(batch_size.max(1))
        .saturating_mul(2);
    i64::try_from(rows).unwrap_or(i64::MAX).min(CYCLE_LIMIT)
}

/// Calls a batch of leads may take (`ensure_leads`): a lookup, then the creation of the leads
/// not found.
const LEAD_CALLS_PER_BATCH: usize = 2;

/// A partial batch that keeps growing is sent at the latest this many lingers after its oldest
/// record was planned, so a steady trickle of changes is not held back indefinitely. Thirty, not
/// ten: while a burst is still being planned (seconds, on a busy machine), ten lingers sent
/// partial batches that more records were about to fill, which cost calls.
const MAX_WAIT_LINGERS: i64 = 30;

/// How long before a place in the rate window frees up the pusher starts preparing the call
/// that takes it; the call then waits in the limiter for the exact moment. Preparing (reading
/// and batching the ready writes) takes a few milliseconds with little pending and hundreds
/// with thousands pending on a busy machine: too late leaves the place unused, too early binds
/// records that later plans would have joined. So the lead follows the measured preparation
/// time: it rises to a slow preparation at once and decays by a quarter per cycle, with a
/// margin, bounded.
#[derive(Debug)]
pub struct PrepareAhead {
    /// The smoothed preparation time, in microseconds.
    micros: AtomicU64,
}

impl PrepareAhead {
    const INITIAL: Duration = Duration::from_millis(100);
    const MIN: Duration = Duration::from_millis(20);
    const MAX: Duration = Duration::from_millis(500);

    pub fn new() -> PrepareAhead {
        PrepareAhead {
            // The lead adds half again: start where the initial lead is exactly INITIAL.
            micros: AtomicU64::new((Self::INITIAL.as_micros() as u64 * 2).div_ceil(3)),
        }
    }

    /// How far ahead of a free place to start preparing: the smoothed preparation time plus
    /// half again, within [`Self::MIN`, `Self::MAX`].
    pub fn lead(&self) -> Duration {
        let micros = self.micros.load(Ordering::Relaxed);
        Duration::from_micros(micros.saturating_mul(3) / 2).clamp(Self::MIN, Self::MAX)
    }

    /// Notes how long one preparation took.
    pub fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let decayed = self.micros.load(Ordering::Relaxed) / 4 * 3;
        // One writer (the push loop): a plain load and store is enough.
        self.micros.store(took.max(decayed), Ordering::Relaxed);
    }
}

impl Default for PrepareAhead {
    fn default() -> Self {
        Self::new()
    }
}

/// What one push cycle did, and when another one may find something to send.
#[derive(Debug, Default)]
pub struct CycleOutcome {
    /// Writes settled (done, retry later, dead).
    pub settled: usize,
    /// Nothing went because every call the limiter allows is taken: look again then.
    pub next_slot: Option<std::time::Instant>,
    /// A partial batch held back to fill up is due then (epoch ms).
    pub due_at: Option<i64>,
}

impl CycleOutcome {
    /// Notes that a held partial batch becomes due at `at`: the earliest such time wins.
    fn note_due(&mut self, at: Option<i64>) {
        self.due_at = match (self.due_at, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

use crate::marketo::QUOTA_DAY_MS as DAY_MS;

/// Calls of the day's quota partial batches may spend ahead of an even spend over the day: a
/// tenth of the quota (5,000 of the default 50,000), at least a rate window's worth.
fn quota_burst(window_calls: usize, quota: u32) -> i64 {
    i64::try_from(window_calls)
        .unwrap_or(i64::MAX)
        .max(i64::from(quota / 10))
}

/// How long partial batches must wait for the day's quota: None while the next call stays
/// within an even spend over the day (`quota` × the share of the quota day gone, plus `burst`,
/// never more than `quota`), else the milliseconds until it does (or until the day ends). The
/// default quota is 0.58 calls a second on average: a steady trickle of changes, each sent
/// alone, would spend it before the day is out, so once the day runs ahead of its pace the
/// records wait and coalesce into fewer, fuller calls. Full batches are never held (they carry
/// 300 records a call).
pub fn quota_hold_ms(used_today: u32, quota: u32, day_elapsed_ms: i64, burst: i64) -> Option<i64> {
    if quota == 0 {
        return None;
    }
    let quota = i64::from(quota);
    let elapsed = day_elapsed_ms.clamp(0, DAY_MS);
    let next = i64::from(used_today) + 1;
    let allowed = |at: i64| (quota * at / DAY_MS + burst).min(quota);
    if next <= allowed(elapsed) {
        return None;
    }
    if next > quota {
        return Some(DAY_MS - elapsed);
    }
    // The first moment `allowed` reaches `next`: quota × at / DAY_MS ≥ next − burst.
    let at = ((next - burst).saturating_mul(DAY_MS) + quota - 1) / quota;
    Some((at - elapsed).max(1))
}

/// How long a partial batch waits for records to stop joining it while calls are plentiful: a
/// change at quiet load goes out within this, while a stream of changes (records joining every
/// few milliseconds) keeps its groups filling towards full batches.
pub const QUICK_LINGER_MS: i64 = 50;

/// How long a partial batch waits for records to stop joining it, given how many calls may
/// start now out of `call_room` (the smaller of the rate window and the concurrency): the quick
/// linger while at least half are free, `configured` once calls fill them (fewer, fuller calls
/// when they are scarce).
pub fn linger_ms(configured: i64, free_calls: usize, call_room: usize) -> i64 {
    if free_calls.saturating_mul(2) >= call_room.max(1) {
        QUICK_LINGER_MS.min(configured)
    } else {
        configured
    }
}

/// Decides how much of a group of ready writes (one Marketo endpoint) goes out now. Full
/// batches go whenever a call is free. The partial rest waits to fill up: it goes when nothing
/// has joined the group for `batch_linger_ms`, nothing in it waits for a write of an earlier
/// phase, no notification waits to be planned and, for a rest of background writes, the initial
/// sync reads no more pages (so no more records are coming), when its
/// oldest record has waited `MAX_WAIT_LINGERS` lingers, or when it must go for a dependent
/// batch to go. Calls that could not start now are not made: their records stay in the store,
/// where newer plans of the same records coalesce.
#[derive(Clone, Copy)]
struct Gate {
    now: i64,
    linger: i64,
    /// A partial batch that keeps growing goes this long after its oldest record was planned
    /// (`MAX_WAIT_LINGERS` configured lingers, whatever the linger now).
    max_wait: i64,
    batch: usize,
    /// Calls that may still start this cycle.
    free_calls: usize,
    /// Notifications are waiting to be planned: more records are coming even if none joined a
    /// group lately (the planner may be slow, not the stream over).
    planning: bool,
    /// The day's quota is spent ahead of its pace: partial batches wait until then (epoch ms).
    quota_hold_until: Option<i64>,
    /// The initial sync is still reading pages: a partial rest of its (background) writes is not
    /// the last of them, whether or not records joined lately (the next page may be a Dataverse
    /// round trip or a queue drain away). Each such rest sent early cost a call of its own.
    background_reading: bool,
}

/// One group's ready writes as the gate sees them.
struct Group {
    /// Writes that may go now (their dependencies are done), oldest first.
    ready: usize,
    oldest: Option<i64>,
    /// The newest plan in the group, including writes still waiting for a dependency.
    newest: Option<i64>,
    /// Some write of the group waits for a dependency: more records will join.
    blocked: bool,
    /// Calls one batch of the group may take.
    calls_per_batch: usize,
    /// The cycle's read stopped inside this group: more of its writes wait unread, so its
    /// partial rest is not the group's last batch and never goes as one.
    more_unread: bool,
    /// Of the ready writes, how many are live (not a background job's). Live writes come
    /// first in push order, so a partial rest holds a live write only if the full batches
    /// cannot carry them all.
    live: usize,
}

impl Group {
    fn of(times: impl IntoIterator<Item = i64>) -> Group {
        let mut g = Group {
            ready: 0,
            oldest: None,
            newest: None,
            blocked: false,
            calls_per_batch: 1,
            more_unread: false,
            live: 0,
        };
        for t in times {
            g.ready += 1;
            g.live += 1;
            g.oldest = Some(g.oldest.map_or(t, |o: i64| o.min(t)));
            g.newest = Some(g.newest.map_or(t, |n: i64| n.max(t)));
        }
        g
    }

    /// Marks a group the cycle's read stopped inside (`cut`).
    fn cut(self, cut: bool) -> Group {
        Group {
            more_unread: self.more_unread || cut,
            ..self
        }
    }

    /// A group of which only `live` writes are live, the rest a background job's.
    fn live(self, live: usize) -> Group {
        Group {
            live: live.min(self.ready),
            ..self
        }
    }

    /// A group whose batches may take `calls` calls each.
    fn costing(self, calls: usize) -> Group {
        Group {
            calls_per_batch: calls.max(1),
            ..self
        }
    }
}

impl Gate {
    /// `background`: writes of a background job are among the ready ones (see `linger_ms`).
    async fn new(ctx: &WorkerContext, background: bool) -> Result<Gate, StoreError> {
        let now = now_ms();
        let free_calls = ctx.marketo.free_calls(ctx.prepare_ahead.lead());
        let window_calls = ctx.config.marketo.calls_per_window as usize;
        // Free calls are bounded by the window and by the calls in flight: room is half of the
        // smaller of the two.
        let call_room = window_calls.min(ctx.config.marketo.max_concurrent as usize);
        let configured = i64::try_from(ctx.config.marketo.batch_linger_ms).unwrap_or(i64::MAX);
        let usage = ctx.marketo.usage();
        let quota_hold_until = quota_hold_ms(
            usage.calls_today,
            usage.daily_quota,
            crate::marketo::quota_day_elapsed_ms(now),
            quota_burst(window_calls, usage.daily_quota),
        )
        .map(|ms| now.saturating_add(ms));
        Ok(Gate {
            now,
            linger: if background {
                configured
            } else {
                linger_ms(configured, free_calls, call_room)
            },
            max_wait: configured.saturating_mul(MAX_WAIT_LINGERS),
            batch: ctx.config.marketo.batch_size.max(1),
            free_calls,
            planning: ctx.store.has_ready_notifications(now).await?,
            quota_hold_until,
            background_reading: ctx.backfill_reading.load(Ordering::Relaxed),
        })
    }

    /// Whether the companies' partial rest must go this cycle, because opportunities go and an
    /// opportunity may not precede its company. While the initial sync reads, a rest of its own
    /// companies waits to fill a batch instead, and the opportunities naming them wait with it:
    /// each page names a few accounts no earlier page did, and sent with every opportunity batch
    /// they took almost four times the calls. A live opportunity or company is never held so.
    fn companies_needed(&self, opportunities_go: bool, live_opportunities: usize, companies: &Group) -> bool {
        opportunities_go && (!self.background_reading || live_opportunities > 0 || companies.live > 0)
    }

    /// How many of the group's ready writes (oldest first) go now, taking their calls from
    /// `free_calls`; notes when a held partial batch becomes due. `needed_first`: a dependent
    /// batch goes this cycle, so the partial rest goes too, quiet or not.
    fn admit(&mut self, group: &Group, needed_first: bool, outcome: &mut CycleOutcome) -> usize {
        if group.ready == 0 {
            return 0;
        }
        let full_batches = group.ready / self.batch;
        let rest = group.ready % self.batch;
        let quiet_at = group.newest.map(|n| n.saturating_add(self.linger));
        let deadline = group.oldest.map(|o| o.saturating_add(self.max_wait));
        // A rest of background writes only, while the initial sync still reads: more are coming.
        let background_coming = self.background_reading && group.live <= full_batches * self.batch;
        let more_coming = group.blocked || self.planning || background_coming;
        let quiet = !more_coming && quiet_at.is_some_and(|at| at <= self.now);
        let waited = deadline.is_some_and(|at| at <= self.now);
        let held_for_quota = self.quota_hold_until.is_some_and(|at| at > self.now);
        let rest_goes =
            rest > 0 && !group.more_unread && (needed_first || (!held_for_quota && (quiet || waited)));
        let batches_wanted = full_batches + usize::from(rest_goes);
        // A batch is admitted only with every call it may take free, so none of its calls
        // waits in the limiter for a later window, holding the cycle (and the calls of the
        // next one) back. With a single call free it costs one, as the limiter may never
        // have more free at once (a concurrency of one): the group is not starved.
        let per_batch = group.calls_per_batch.min(self.free_calls).max(1);
        let batches = batches_wanted.min(self.free_calls / per_batch);
        self.free_calls -= batches * per_batch;
        if rest > 0 && !rest_goes {
            // Blocked, still planning or still reading: no quiet time to wait for (a new write
            // or the poll brings the pusher back).
            let quiet_at = if more_coming { None } else { quiet_at };
            if held_for_quota {
                outcome.note_due(self.quota_hold_until);
            } else {
                outcome.note_due(quiet_at);
                outcome.note_due(deadline);
            }
        }
        if batches == batches_wanted {
            if rest_goes {
                group.ready
            } else {
                full_batches * self.batch
            }
        } else {
            batches * self.batch
        }
    }
}

/// A company upsert: `externalCompanyId` and the name Dynamics gave, if any.
#[derive(Debug, Clone)]
struct CompanyUpsert {
    account_id: Uuid,
    name: Option<String>,
}

/// An opportunity upsert: its Marketo fields (`externalOpportunityId` among them).
#[derive(Debug, Clone)]
struct OpportunityUpsert {
    opportunity_id: Uuid,
    fields: Map<String, Value>,
}

/// A role upsert or delete: (opportunity, contact, role); the contact's lead id is looked up
/// when it goes.
#[derive(Debug, Clone)]
struct RoleWrite {
    opportunity_id: Uuid,
    contact_id: Uuid,
    role: String,
}

/// A ready write: its stored row (key, revision, attempts, when planned) and what it does.
#[derive(Debug, Clone)]
struct Ready<T> {
    row: StoredWrite,
    write: T,
}

/// The ready writes, parsed once and sorted by kind, each kind its own batches: a call only
/// ever carries records of its own endpoint.
#[derive(Debug, Default)]
struct WriteGroups {
    companies: Vec<Ready<CompanyUpsert>>,
    /// Contacts whose Marketo lead is needed.
    leads: Vec<Ready<Uuid>>,
    opportunities: Vec<Ready<OpportunityUpsert>>,
    role_upserts: Vec<Ready<RoleWrite>>,
    role_deletes: Vec<Ready<RoleWrite>>,
    opportunity_deletes: Vec<Ready<Uuid>>,
}

impl WriteGroups {
    /// Sorts `ready` by kind. A payload that does not parse, or that is not about the record
    /// its key names, is settled as a dead letter (in the returned list), never sent.
    fn parse(ready: Vec<StoredWrite>) -> (WriteGroups, Settled) {
        let mut groups = WriteGroups::default();
        let mut unreadable = Vec::new();
        for mut row in ready {
            // Read from the parsed payload in place: a clone of thousands of payloads per cycle
            // showed in the time to the first call.
            let write = match MarketoWrite::deserialize(&row.payload) {
                Ok(w) => w,
                Err(e) => {
                    unreadable.push((row.key, row.revision, dead(format!("unreadable write: {e}"))));
                    continue;
                }
            };
            if write.key() != row.key || write.phase() != row.phase {
                let reason = format!(
                    "the stored write is inconsistent: its payload is about {} ({:?}), its row about {} ({:?})",
                    write.key(),
                    write.phase(),
                    row.key,
                    row.phase
                );
                unreadable.push((row.key, row.revision, dead(reason)));
                continue;
            }
            // The typed write carries what goes; the parsed JSON would only hold memory.
            row.payload = Value::Null;
            match write {
                MarketoWrite::UpsertCompany { account_id, name } => groups.companies.push(Ready {
                    row,
                    write: CompanyUpsert { account_id, name },
                }),
                MarketoWrite::EnsureLead { contact_id } => groups.leads.push(Ready {
                    row,
                    write: contact_id,
                }),
                MarketoWrite::UpsertOpportunity {
                    opportunity_id,
                    fields,
                } => groups.opportunities.push(Ready {
                    row,
                    write: OpportunityUpsert {
                        opportunity_id,
                        fields,
                    },
                }),
                MarketoWrite::UpsertRole {
                    opportunity_id,
                    contact_id,
                    role,
                } => groups.role_upserts.push(Ready {
                    row,
                    write: RoleWrite {
                        opportunity_id,
                        contact_id,
                        role,
                    },
                }),
                MarketoWrite::DeleteRole {
                    opportunity_id,
                    contact_id,
                    role,
                } => groups.role_deletes.push(Ready {
                    row,
                    write: RoleWrite {
                        opportunity_id,
                        contact_id,
                        role,
                    },
                }),
                MarketoWrite::DeleteOpportunity { opportunity_id } => {
                    groups.opportunity_deletes.push(Ready {
                        row,
                        write: opportunity_id,
                    })
                }
            }
        }
        (groups, unreadable)
    }
}

fn planned_at<T>(writes: &[Ready<T>]) -> impl Iterator<Item = i64> + '_ {
    writes.iter().map(|r| r.row.updated_at)
}

/// How many of the writes are live, not a background job's.
fn live<T>(writes: &[Ready<T>]) -> usize {
    writes.iter().filter(|r| !r.row.background).count()
}

/// One push cycle: settles what can go now and says when to look again.
pub async fn push_cycle(ctx: &WorkerContext) -> Result<CycleOutcome, StoreError> {
    let mut outcome = CycleOutcome::default();
    let free_calls = ctx.marketo.free_calls(ctx.prepare_ahead.lead());
    if free_calls == 0 {
        outcome.next_slot = ctx.marketo.next_free_call_at();
        return Ok(outcome);
    }
    let started = Instant::now();
    let limit = read_limit(free_calls, ctx.config.marketo.batch_size);
    let ready = ctx.store.ready_writes(now_ms(), limit).await?;
    if ready.is_empty() {
        return Ok(outcome);
    }
    // A read that reached its limit stopped inside the phase of its last write.
    let cut_phase = (i64::try_from(ready.len()).unwrap_or(i64::MAX) >= limit)
        .then(|| ready.last().map(|w| w.phase))
        .flatten();
    let cut = |phase: Phase| cut_phase == Some(phase);
    let read = started.elapsed();
    let ready_count = ready.len();
    // A background job (the initial sync) plans its records page after page, out of sight of
    // the inbox: its partial batches always linger, or each page would cost calls of its own.
    let background = ready.iter().any(|w| w.background);
    let tally = Tally::new(ctx.marketo.usage().calls_today);
    let (groups, unreadable) = WriteGroups::parse(ready);
    settle(ctx, &unreadable, &tally).await?;
    outcome.settled = unreadable.len();
    let WriteGroups {
        mut companies,
        mut leads,
        mut opportunities,
        role_upserts,
        role_deletes,
        opportunity_deletes,
    } = groups;

    // Companies before the opportunities that name them, leads beside them (they depend on
    // nothing here: fewer phase barriers leave fewer rate-window slots unused); roles need
    // both, so they follow, and an opportunity's delete follows its role deletes.
    let mut gate = Gate::new(ctx, background).await?;
    let opportunities_group = Group::of(planned_at(&opportunities))
        .live(live(&opportunities))
        .cut(cut(Phase::Opportunities));
    let companies_group = Group::of(planned_at(&companies))
        .live(live(&companies))
        .cut(cut(Phase::Companies));
    let leads_group = Group::of(planned_at(&leads))
        .live(live(&leads))
        .costing(LEAD_CALLS_PER_BATCH)
        .cut(cut(Phase::Leads));
    // Opportunities decide first whether they go; if they do, every company goes ahead of them
    // (companies rarely fill a batch, and an opportunity may not precede its company). Asked of
    // a gate with unlimited calls, so the question does not spend any.
    let mut unlimited = Gate {
        free_calls: usize::MAX,
        ..gate
    };
    let opportunities_go = unlimited.admit(&opportunities_group, false, &mut CycleOutcome::default()) > 0;
    let companies_needed = gate.companies_needed(opportunities_go, live(&opportunities), &companies_group);
    let companies_now = gate.admit(&companies_group, companies_needed, &mut outcome);
    // A company that does not fit this cycle holds back the opportunities that name it.
    let held_companies: HashSet<Uuid> = companies
        .iter()
        .skip(companies_now)
        .map(|c| c.write.account_id)
        .collect();
    companies.truncate(companies_now);
    let leads_now = gate.admit(&leads_group, false, &mut outcome);
    leads.truncate(leads_now);
    if !held_companies.is_empty() {
        opportunities.retain(|o| {
            o.write
                .fields
                .get(EXTERNAL_COMPANY_ID)
                .and_then(Value::as_str)
                .and_then(|c| Uuid::parse_str(c).ok())
                .is_none_or(|c| !held_companies.contains(&c))
        });
    }
    let opportunities_now = gate.admit(
        &Group::of(planned_at(&opportunities))
            .live(live(&opportunities))
            .cut(cut(Phase::Opportunities)),
        false,
        &mut outcome,
    );
    opportunities.truncate(opportunities_now);
    let prepared = started.elapsed();
    ctx.prepare_ahead.record(prepared);
    tracing::debug!(
        ready = ready_count,
        read_ms = read.as_millis() as u64,
        prepare_ms = prepared.as_millis() as u64,
        "push cycle"
    );
    let companies_then_opportunities = async {
        let mut settled = 0;
        if !companies.is_empty() {
            let outcomes = push_companies(ctx, companies).await;
            settled += outcomes.len();
            settle(ctx, &outcomes, &tally).await?;
        }
        if !opportunities.is_empty() {
            let outcomes = push_opportunities(ctx, opportunities).await;
            settled += outcomes.len();
            settle(ctx, &outcomes, &tally).await?;
        }
        Ok::<usize, StoreError>(settled)
    };
    let leads = async {
        if leads.is_empty() {
            return Ok(0);
        }
        let outcomes = ensure_leads(ctx, leads).await?;
        settle(ctx, &outcomes, &tally).await?;
        Ok::<usize, StoreError>(outcomes.len())
    };
    let (settled_in_order, settled_leads) = tokio::join!(companies_then_opportunities, leads);
    outcome.settled += settled_in_order? + settled_leads?;

    // Roles: decided after the writes above settled, with the calls free by then.
    let mut gate = Gate::new(ctx, background).await?;
    let mut held_role_opportunities: HashSet<Uuid> = HashSet::new();
    for (writes, kind, phase) in [
        (role_upserts, RoleCall::Upsert, Phase::RoleUpserts),
        (role_deletes, RoleCall::Delete, Phase::RoleDeletes),
    ] {
        if writes.is_empty() {
            continue;
        }
        let waiting: Vec<(WriteKey, Uuid)> = writes
            .iter()
            .map(|r| (r.row.key.clone(), r.write.opportunity_id))
            .collect();
        let outcomes = push_roles(ctx, kind, writes, cut(phase), &mut gate, &mut outcome).await?;
        let done: HashSet<&WriteKey> = outcomes.iter().map(|(k, _, _)| k).collect();
        held_role_opportunities.extend(waiting.iter().filter(|(k, _)| !done.contains(k)).map(|(_, o)| *o));
        outcome.settled += outcomes.len();
        settle(ctx, &outcomes, &tally).await?;
    }
    // An opportunity's delete waits for its role deletes (Marketo refuses to delete an
    // opportunity that still has roles).
    let (mut deletes, waiting): (Vec<_>, Vec<_>) = opportunity_deletes
        .into_iter()
        .partition(|d| !held_role_opportunities.contains(&d.write));
    let mut group = Group::of(planned_at(&deletes))
        .live(live(&deletes))
        .cut(cut(Phase::OpportunityDeletes));
    group.blocked = !waiting.is_empty();
    deletes.truncate(gate.admit(&group, false, &mut outcome));
    if !deletes.is_empty() {
        let outcomes = delete_opportunities(ctx, deletes).await;
        outcome.settled += outcomes.len();
        settle(ctx, &outcomes, &tally).await?;
    }
    tally.log(ctx);
    Ok(outcome)
}

type Settled = Vec<(WriteKey, i64, WriteOutcome)>;

/// Stores what became of writes, and says it: every dead letter at WARN, with the record, the
/// reason and how to retry it (a dead letter must not be seen only in /metrics).
async fn settle(
    ctx: &WorkerContext,
    settled: &[(WriteKey, i64, WriteOutcome)],
    tally: &Tally,
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    ctx.store.settle_writes(settled).await?;
    for (key, _, outcome) in settled {
        tally.add(key, outcome);
        if let WriteOutcome::Dead { error } = outcome {
            tracing::warn!(
                write = %key,
                reason = %error,
                retry = %retry_route(key),
                "Marketo write dead-lettered; fix the cause, then retry it"
            );
        }
    }
    Ok(())
}

/// The admin call that retries a dead write (its key percent-encoded as one path segment).
fn retry_route(key: &WriteKey) -> String {
    let key = key.to_string();
    let encoded = url::Url::parse("http://oppsync/admin/writes/")
        .ok()
        .and_then(|mut url| {
            url.path_segments_mut()
                .ok()?
                .pop_if_empty()
                .push(&key)
                .push("retry");
            Some(url.path().to_owned())
        });
    format!(
        "POST {}",
        encoded.unwrap_or_else(|| format!("/admin/writes/{key}/retry"))
    )
}

/// What one push cycle settled, by kind of write and outcome, and the Marketo calls it made: one
/// INFO line per cycle.
struct Tally {
    counts: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), usize>>,
    calls_before: u32,
}

impl Tally {
    fn new(calls_before: u32) -> Self {
        Tally {
            counts: std::sync::Mutex::default(),
            calls_before,
        }
    }

    fn add(&self, key: &WriteKey, outcome: &WriteOutcome) {
        let kind = match key {
            WriteKey::Company(_) => "companies",
            WriteKey::Lead(_) => "leads",
            WriteKey::Opportunity(_) => "opportunities",
            WriteKey::Role { .. } => "roles",
        };
        let what = match outcome {
            WriteOutcome::Done => "done",
            WriteOutcome::Retry { .. } => "retry",
            WriteOutcome::Dead { .. } => "dead",
        };
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry((kind, what)).or_default() += 1;
        }
    }

    fn log(&self, ctx: &WorkerContext) {
        let Ok(counts) = self.counts.lock() else { return };
        if counts.is_empty() {
            return;
        }
        let summary: Vec<String> = counts
            .iter()
            .map(|((kind, what), n)| format!("{kind} {what}: {n}"))
            .collect();
        let records: usize = counts.values().sum();
        // The day's count (it restarts at Marketo's midnight: then this undercounts once).
        let calls = ctx.marketo.usage().calls_today.saturating_sub(self.calls_before);
        tracing::info!(calls, records, summary = %summary.join(", "), "push cycle settled");
    }
}

fn dead(error: String) -> WriteOutcome {
    WriteOutcome::Dead { error }
}

async fn push_companies(ctx: &WorkerContext, writes: Vec<Ready<CompanyUpsert>>) -> Settled {
    let records = writes
        .iter()
        .map(|c| {
            let mut r = Map::new();
            r.insert(
                EXTERNAL_COMPANY_ID.into(),
                Value::String(c.write.account_id.to_string()),
            );
            if let Some(name) = &c.write.name {
                r.insert("company".into(), Value::String(name.clone()));
            }
            r
        })
        .collect();
    let result = ctx.marketo.sync_companies(records).await;
    settle_call(ctx, &writes, result)
}

async fn push_opportunities(ctx: &WorkerContext, writes: Vec<Ready<OpportunityUpsert>>) -> Settled {
    let records = writes
        .iter()
        .map(|o| {
            let mut fields = o.write.fields.clone();
            // The record is the one the write is keyed by, whatever the field map says.
            fields.insert(
                EXTERNAL_OPPORTUNITY_ID.into(),
                Value::String(o.write.opportunity_id.to_string()),
            );
            fields
        })
        .collect();
    let result = ctx.marketo.sync_opportunities(records).await;
    settle_call(ctx, &writes, result)
}

async fn delete_opportunities(ctx: &WorkerContext, writes: Vec<Ready<Uuid>>) -> Settled {
    let ids: Vec<String> = writes.iter().map(|d| d.write.to_string()).collect();
    let result = ctx.marketo.delete_opportunities(&ids).await;
    settle_call(ctx, &writes, result)
}

/// Settles every write of one client call from its per-record results or its error.
fn settle_call<T>(
    ctx: &WorkerContext,
    writes: &[Ready<T>],
    result: Result<Vec<RecordResult>, MarketoError>,
) -> Settled {
    match result {
        Ok(results) => {
            // The instance takes record writes again (leads never clear a block: 1018 does not
            // refuse them).
            ctx.lifecycle.set_blocked(System::Marketo, None);
            writes
                .iter()
                .zip(results)
                .map(|(w, r)| {
                    let outcome = match r {
                        RecordResult::Done { .. } => WriteOutcome::Done,
                        RecordResult::Failed { code, message } => dead(format!("Marketo {code}: {message}")),
                    };
                    (w.row.key.clone(), w.row.revision, outcome)
                })
                .collect()
        }
        Err(e) => writes
            .iter()
            .map(|w| (w.row.key.clone(), w.row.revision, failed_call(ctx, &w.row, &e)))
            .collect(),
    }
}

/// What a failed call means for one write. Reasons carry the whole error chain.
fn failed_call(ctx: &WorkerContext, write: &StoredWrite, e: &MarketoError) -> WriteOutcome {
    let attempts = u32::try_from(write.attempts).unwrap_or(u32::MAX) + 1;
    let reason = crate::errors::chain(e);
    match e {
        MarketoError::Retryable { .. } if attempts >= ctx.config.worker.max_attempts => {
            dead(format!("gave up after {attempts} attempts: {reason}"))
        }
        MarketoError::Retryable { .. } => WriteOutcome::Retry {
            at: now_ms()
                + backoff_ms(
                    attempts,
                    ctx.config.worker.retry_base_ms,
                    ctx.config.worker.retry_max_ms,
                ),
            error: reason,
            count_attempt: true,
        },
        // Another integration filled the shared instance: the limiter has paused every call and
        // slowed the pace. Waiting is not a failure of the write, however long it lasts.
        MarketoError::Throttled { .. } => WriteOutcome::Retry {
            at: ctx
                .marketo
                .next_free_call_at()
                .map(|at| {
                    now_ms()
                        + at.saturating_duration_since(std::time::Instant::now())
                            .as_millis() as i64
                })
                .unwrap_or_else(now_ms),
            error: reason,
            count_attempt: false,
        },
        // Waiting for the daily reset is not a failure of the write.
        MarketoError::QuotaExhausted { .. } => WriteOutcome::Retry {
            at: now_ms() + 15 * 60_000,
            error: reason,
            count_attempt: false,
        },
        MarketoError::Configuration { .. } => {
            // Logged (once per change), shown in /admin/stats and oppsync_marketo_blocked by the
            // lifecycle; readiness stays green, intake goes on.
            ctx.lifecycle
                .set_blocked(System::Marketo, Some((block_reason(e), reason.clone())));
            // Probe again within a minute: someone may be fixing the instance right now.
            WriteOutcome::Retry {
                at: now_ms() + ctx.config.worker.retry_max_ms.min(60_000),
                error: reason,
                count_attempt: false,
            }
        }
        MarketoError::Rejected { .. } => dead(reason),
    }
}

/// What a Marketo configuration error says is wrong.
fn block_reason(e: &MarketoError) -> BlockReason {
    match e.code() {
        "1018" => BlockReason::CrmSyncEnabled,
        // Identity refused the client id or secret.
        "http_400" | "http_401" | "invalid_client" | "unauthorized" | "no_token" => {
            BlockReason::BadCredentials
        }
        "603" | "http_403" => BlockReason::AccessDenied,
        _ => BlockReason::Misconfigured,
    }
}

/// Finds (or creates) the Marketo lead of each contact that needs a role.
async fn ensure_leads(ctx: &WorkerContext, writes: Vec<Ready<Uuid>>) -> Result<Settled, StoreError> {
    let contacts: Vec<Uuid> = writes.iter().map(|w| w.write).collect();
    let known = ctx.store.lead_ids(&contacts).await?;
    let unknown: Vec<Uuid> = contacts
        .iter()
        .filter(|c| !known.contains_key(c))
        .copied()
        .collect();
    let rows = ctx
        .store
        .load_rows(&RowKeys {
            contact_ids: unknown.clone(),
            ..RowKeys::default()
        })
        .await?;
    let mut states: HashMap<Uuid, ContactState> = HashMap::new();
    for r in rows.contacts {
        if let Ok(state) = r.decode::<ContactState>() {
            states.insert(r.id, state);
        }
    }
    let sync = &ctx.config.sync;
    // The value each contact is matched by.
    let match_value = |c: &Uuid| -> Option<String> {
        match sync.lead_match {
            LeadMatch::Email => states
                .get(c)
                .and_then(|s| s.email.clone())
                .map(|e| e.to_lowercase()),
            LeadMatch::Field => Some(c.to_string()),
        }
    };
    let (filter_type, lookup_field) = match sync.lead_match {
        LeadMatch::Email => ("email".to_owned(), "email".to_owned()),
        LeadMatch::Field => {
            let f = sync.lead_match_field.clone().unwrap_or_default();
            (f.clone(), f)
        }
    };
    let mut outcome: HashMap<Uuid, WriteOutcome> = HashMap::new();
    let mut found: Vec<(Uuid, i64)> = Vec::new();
    let values: Vec<String> = unknown.iter().filter_map(&match_value).collect();
    let mut lead_by_value: HashMap<String, i64> = HashMap::new();
    if !values.is_empty() {
        match ctx
            .marketo
            .find_leads(&filter_type, &values, &["id", filter_type.as_str()])
            .await
        {
            Ok(leads) => {
                for lead in leads {
                    if let Some(v) = lead.fields.get(&filter_type).and_then(Value::as_str) {
                        // Several leads may match one email; the lowest id is the oldest.
                        let e = lead_by_value.entry(v.to_lowercase()).or_insert(lead.id);
                        *e = (*e).min(lead.id);
                    }
                }
            }
            Err(e) => {
                return Ok(writes
                    .iter()
                    .map(|w| (w.row.key.clone(), w.row.revision, failed_call(ctx, &w.row, &e)))
                    .collect());
            }
        }
    }
    let mut to_create: Vec<Uuid> = Vec::new();
    for c in &unknown {
        match match_value(c) {
            // A read found no such contact: say so, rather than blame a missing email.
            None if states.get(c).is_some_and(|s| s.not_found) => {
                outcome.insert(*c, dead(format!("contact {c} not found in Dataverse")));
            }
            None => {
                outcome.insert(
                    *c,
                    dead(format!(
                        "contact {c} has no email address, and Marketo leads are matched by email (sync.lead_match)"
                    )),
                );
            }
            Some(v) => match lead_by_value.get(&v) {
                Some(id) => found.push((*c, *id)),
                None if sync.missing_lead == MissingLead::Create => to_create.push(*c),
                None => {
                    outcome.insert(
                        *c,
                        dead(format!(
                            "no Marketo lead matches contact {c} and sync.missing_lead = dead_letter"
                        )),
                    );
                }
            },
        }
    }
    if !to_create.is_empty() {
        let records: Vec<Map<String, Value>> = to_create
            .iter()
            .map(|c| {
                let s = states.get(c);
                let mut r = Map::new();
                if let Some(email) = s.and_then(|s| s.email.clone()) {
                    r.insert("email".into(), Value::String(email));
                }
                if let Some(first) = s.and_then(|s| s.first_name.clone()) {
                    r.insert("firstName".into(), Value::String(first));
                }
                if let Some(last) = s.and_then(|s| s.last_name.clone()) {
                    r.insert("lastName".into(), Value::String(last));
                }
                if let Some(field) = &sync.lead_match_field {
                    r.insert(field.clone(), Value::String(c.to_string()));
                }
                r
            })
            .collect();
        match ctx.marketo.sync_leads(records, &lookup_field).await {
            Ok(results) => {
                for (c, r) in to_create.iter().zip(results) {
                    match r {
                        RecordResult::Done { id: Some(id), .. } => match id.parse::<i64>() {
                            Ok(id) => found.push((*c, id)),
                            Err(_) => {
                                outcome.insert(
                                    *c,
                                    dead(format!("Marketo returned a non-numeric lead id {id:?}")),
                                );
                            }
                        },
                        RecordResult::Done { id: None, .. } => {
                            outcome.insert(*c, dead("Marketo created the lead but returned no id".into()));
                        }
                        RecordResult::Failed { code, message } => {
                            outcome.insert(*c, dead(format!("Marketo {code}: {message}")));
                        }
                    }
                }
            }
            Err(e) => {
                for w in &writes {
                    if to_create.contains(&w.write) {
                        outcome.insert(w.write, failed_call(ctx, &w.row, &e));
                    }
                }
            }
        }
    }
    ctx.store.save_lead_ids(&found).await?;
    for (c, _) in &found {
        outcome.insert(*c, WriteOutcome::Done);
    }
    for c in known.keys() {
        outcome.insert(*c, WriteOutcome::Done);
    }
    Ok(writes
        .iter()
        .map(|w| {
            let o = outcome
                .get(&w.write)
                .cloned()
                .unwrap_or_else(|| dead("lead not resolved".into()));
            (w.row.key.clone(), w.row.revision, o)
        })
        .collect())
}

/// Which role endpoint a batch of role writes goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoleCall {
    Upsert,
    Delete,
}

/// Role upserts wait for their opportunity and lead; role deletes need the lead id (a role whose
/// contact never got a lead was never created, so its delete is already done). Only what the
/// `gate` lets through goes now.
async fn push_roles(
    ctx: &WorkerContext,
    kind: RoleCall,
    writes: Vec<Ready<RoleWrite>>,
    more_unread: bool,
    gate: &mut Gate,
    outcome: &mut CycleOutcome,
) -> Result<Settled, StoreError> {
    let contacts: Vec<Uuid> = writes.iter().map(|w| w.write.contact_id).collect();
    let leads = ctx.store.lead_ids(&contacts).await?;
    let statuses = if kind == RoleCall::Upsert {
        let dependencies: Vec<WriteKey> = writes
            .iter()
            .flat_map(|w| {
                [
                    WriteKey::Opportunity(w.write.opportunity_id),
                    WriteKey::Lead(w.write.contact_id),
                ]
            })
            .collect();
        ctx.store.write_statuses(&dependencies).await?
    } else {
        HashMap::new()
    };
    let mut settled = Vec::new();
    // When the role writes still waiting for their opportunity or lead were planned.
    let mut blocked: Vec<i64> = Vec::new();
    let mut going: Vec<(&Ready<RoleWrite>, RoleRecord)> = Vec::new();
    for w in &writes {
        let role = &w.write;
        let record = |lead: i64| RoleRecord {
            external_opportunity_id: role.opportunity_id.to_string(),
            lead_id: lead,
            role: role.role.clone(),
            is_primary: kind == RoleCall::Upsert && role.role == ctx.config.sync.customer_role,
        };
        let (key, revision) = (w.row.key.clone(), w.row.revision);
        match kind {
            RoleCall::Upsert => {
                let opportunity = WriteKey::Opportunity(role.opportunity_id);
                let lead_key = WriteKey::Lead(role.contact_id);
                match (
                    statuses.get(&opportunity),
                    statuses.get(&lead_key),
                    leads.get(&role.contact_id),
                ) {
                    (Some(Status::Dead), _, _) => settled.push((
                        key,
                        revision,
                        dead(format!(
                            "its opportunity could not be written to Marketo ({opportunity} is a dead letter)"
                        )),
                    )),
                    (_, Some(Status::Dead), _) => settled.push((
                        key,
                        revision,
                        dead(format!(
                            "the contact has no Marketo lead ({lead_key} is a dead letter)"
                        )),
                    )),
                    // Marketo refuses a role whose opportunity or lead does not exist yet.
                    (Some(Status::Pending), _, _) | (_, Some(Status::Pending), _) => {
                        blocked.push(w.row.updated_at)
                    }
                    (_, _, None) => blocked.push(w.row.updated_at), // the lead is still being resolved
                    (_, _, Some(lead)) => going.push((w, record(*lead))),
                }
            }
            RoleCall::Delete => match leads.get(&role.contact_id) {
                None => settled.push((key, revision, WriteOutcome::Done)),
                Some(lead) => going.push((w, record(*lead))),
            },
        }
    }
    let mut group = Group::of(going.iter().map(|(w, _)| w.row.updated_at))
        .live(going.iter().filter(|(w, _)| !w.row.background).count())
        .cut(more_unread);
    if kind == RoleCall::Upsert {
        group.newest = group.newest.max(blocked.iter().copied().max());
        group.blocked = !blocked.is_empty();
    }
    going.truncate(gate.admit(&group, false, outcome));
    if !going.is_empty() {
        let records: Vec<RoleRecord> = going.iter().map(|(_, r)| r.clone()).collect();
        let items: Vec<Ready<RoleWrite>> = going.iter().map(|(w, _)| (*w).clone()).collect();
        let result = match kind {
            RoleCall::Upsert => ctx.marketo.sync_roles(&records).await,
            RoleCall::Delete => ctx.marketo.delete_roles(&records).await,
        };
        settled.extend(settle_call(ctx, &items, result));
    }
    Ok(settled)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const LINGER: i64 = 1_000;

    fn gate(now: i64, free_calls: usize, planning: bool) -> Gate {
        Gate {
            now,
            linger: LINGER,
            max_wait: LINGER * MAX_WAIT_LINGERS,
            batch: 300,
            free_calls,
            planning,
            quota_hold_until: None,
            background_reading: false,
        }
    }

    /// `n` writes planned one millisecond apart, the first at `from`.
    fn group(from: i64, n: usize) -> Group {
        Group::of((0..n).map(|i| from + i as i64))
    }

    #[test]
    fn full_batches_go_and_the_partial_rest_waits_while_records_keep_joining() {
        let mut outcome = CycleOutcome::default();
        let mut g = gate(10_000, 10, false);
        // 650 ready, the newest planned 100 ms ago: two full batches go, 50 wait.
        assert_eq!(g.admit(&group(9_250, 650), false, &mut outcome), 600);
        assert_eq!(g.free_calls, 8);
        // Due when quiet for a linger after the newest record.
        assert_eq!(outcome.due_at, Some(9_250 + 649 + LINGER));
    }

    #[test]
    fn a_cycle_reads_what_its_free_calls_can_carry_not_the_backlog() {
        assert_eq!(read_limit(1, 300), 1_200);
        assert_eq!(read_limit(5, 300), 3_600);
        assert_eq!(read_limit(100, 300), CYCLE_LIMIT);
        assert_eq!(read_limit(0, 0), 2);
    }

    #[test]
    fn a_group_the_read_stopped_inside_sends_full_batches_only() {
        // 700 old writes read out of a longer backlog: two full batches go; the 100 left are
        // not the group's last, so they wait for the next read rather than go half empty.
        let backlog = group(1_000, 700).cut(true);
        let mut outcome = CycleOutcome::default();
        let mut g = gate(1_000_000, 10, false);
        assert_eq!(g.admit(&backlog, false, &mut outcome), 600);
        assert_eq!(g.free_calls, 8);
        // The same writes as the whole group: the old partial rest goes too.
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            gate(1_000_000, 10, false).admit(&group(1_000, 700), false, &mut outcome),
            700
        );
    }

    #[test]
    fn a_quiet_partial_batch_goes_unless_notifications_wait_to_be_planned() {
        let quiet = group(5_000, 50);
        let mut outcome = CycleOutcome::default();
        assert_eq!(gate(7_000, 10, false).admit(&quiet, false, &mut outcome), 50);
        let mut outcome = CycleOutcome::default();
        assert_eq!(gate(7_000, 10, true).admit(&quiet, false, &mut outcome), 0);
        // Still planning: only the deadline is due, not the quiet time.
        assert_eq!(outcome.due_at, Some(5_000 + MAX_WAIT_LINGERS * LINGER));
    }

    #[test]
    fn the_initial_syncs_partial_batches_wait_for_its_next_page_while_it_reads() {
        // 350 background writes, quiet for a second: one full batch goes, the 50 wait while
        // the initial sync still reads (its next page fills them), only their deadline due.
        let background = group(5_000, 350).live(0);
        let mut reading = gate(7_000, 10, false);
        reading.background_reading = true;
        let mut outcome = CycleOutcome::default();
        assert_eq!(reading.admit(&background, false, &mut outcome), 300);
        assert_eq!(outcome.due_at, Some(5_000 + MAX_WAIT_LINGERS * LINGER));
        // Once it reads no more, the quiet rest goes.
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            gate(7_000, 10, false).admit(&background, false, &mut outcome),
            350
        );
        // A live write in the rest is not held for the sync's pages: it goes with the rest.
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            reading.admit(&group(5_000, 350).live(301), false, &mut outcome),
            350
        );
        // Live writes the full batches carry leave a background rest, which waits.
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            reading.admit(&group(5_000, 350).live(300), false, &mut outcome),
            300
        );
        // The deadline still sends it.
        let mut outcome = CycleOutcome::default();
        let mut late = reading;
        late.now = 5_000 + MAX_WAIT_LINGERS * LINGER;
        assert_eq!(late.admit(&background, false, &mut outcome), 350);
    }

    #[test]
    fn the_initial_syncs_companies_wait_for_a_full_batch_not_for_each_opportunity_batch() {
        let companies = group(5_000, 350).live(0);
        let mut reading = gate(7_000, 10, false);
        reading.background_reading = true;
        // Opportunities go, all of the sync's: its company rest is not brought along.
        assert!(!reading.companies_needed(true, 0, &companies));
        let mut outcome = CycleOutcome::default();
        let needed = reading.companies_needed(true, 0, &companies);
        assert_eq!(reading.admit(&companies, needed, &mut outcome), 300);
        // A live opportunity may name one of them, a live company may be in the rest, or the
        // sync reads no more: the rest goes ahead of the opportunities, as it always did.
        assert!(reading.companies_needed(true, 1, &companies));
        assert!(reading.companies_needed(true, 0, &group(5_000, 350).live(1)));
        assert!(gate(7_000, 10, false).companies_needed(true, 0, &companies));
        // No opportunity goes: nothing needs the companies early.
        assert!(!gate(7_000, 10, false).companies_needed(false, 5, &companies));
    }

    #[test]
    fn a_partial_batch_that_keeps_growing_goes_after_thirty_lingers() {
        // The oldest record 29 lingers old, the newest just planned: it waits.
        let now = 100_000;
        let growing = Group::of([now - 29 * LINGER, now - 1]);
        let mut outcome = CycleOutcome::default();
        assert_eq!(gate(now, 10, true).admit(&growing, false, &mut outcome), 0);
        assert_eq!(outcome.due_at, Some(now + LINGER));
        // At thirty lingers it goes, planning or not.
        let growing = Group::of([now - 30 * LINGER, now - 1]);
        let mut outcome = CycleOutcome::default();
        assert_eq!(gate(now, 10, true).admit(&growing, false, &mut outcome), 2);
    }

    #[test]
    fn a_change_goes_at_once_while_half_the_rate_window_is_free() {
        assert_eq!(linger_ms(LINGER, 100, 100), QUICK_LINGER_MS);
        assert_eq!(linger_ms(LINGER, 50, 100), QUICK_LINGER_MS);
        assert_eq!(linger_ms(LINGER, 49, 100), LINGER);
        assert_eq!(linger_ms(LINGER, 0, 100), LINGER);
        assert_eq!(linger_ms(0, 100, 100), 0);
        // The quick linger: a change goes once nothing joined it for 50 ms...
        let mut quick = gate(10_000, 10, false);
        quick.linger = QUICK_LINGER_MS;
        let mut outcome = CycleOutcome::default();
        assert_eq!(quick.admit(&group(9_950, 1), false, &mut outcome), 1);
        // ...while a stream keeps its group filling, up to the configured lingers' deadline.
        let mut outcome = CycleOutcome::default();
        assert_eq!(quick.admit(&Group::of([5_000, 9_990]), false, &mut outcome), 0);
        assert_eq!(outcome.due_at, Some(9_990 + QUICK_LINGER_MS));
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            quick.admit(&Group::of([10_000 - 30 * LINGER, 9_990]), false, &mut outcome),
            2
        );
    }

    #[test]
    fn partial_batches_wait_while_the_day_spends_its_quota_ahead_of_pace() {
        let quota = 50_000;
        let burst = quota_burst(100, quota);
        assert_eq!(burst, 5_000);
        // Early in the day the burst allows some calls, then the pace holds them.
        assert_eq!(quota_hold_ms(0, quota, 0, burst), None);
        assert_eq!(quota_hold_ms(4_999, quota, 0, burst), None);
        let hold = quota_hold_ms(5_000, quota, 0, burst).unwrap();
        // One more call is allowed once a 50,000th of the day has gone (1.728 s).
        assert_eq!(hold, 1_728);
        assert_eq!(quota_hold_ms(5_000, quota, hold, burst), None);
        // At noon half the quota plus the burst may be spent; the quota itself never.
        assert_eq!(quota_hold_ms(29_999, quota, DAY_MS / 2, burst), None);
        assert!(quota_hold_ms(30_000, quota, DAY_MS / 2, burst).is_some());
        assert_eq!(quota_hold_ms(50_000, quota, DAY_MS - 1, burst), Some(1));
        // Held partial batches are due when the pace allows them, quiet or not.
        let mut held = gate(100_000, 10, false);
        held.quota_hold_until = Some(100_500);
        let mut outcome = CycleOutcome::default();
        assert_eq!(held.admit(&group(1_000, 20), false, &mut outcome), 0);
        assert_eq!(outcome.due_at, Some(100_500));
        // Full batches are never held.
        assert_eq!(held.admit(&group(1_000, 320), false, &mut outcome), 300);
    }

    /// A simulated quota day of steady changes, one every 1.5 s (57,600 in the day), each a
    /// record for two endpoints: sent one call each, they would take 115,200 calls, more than
    /// twice the default quota. Paced, the day ends within its quota, and no change waits more
    /// than a few seconds.
    #[test]
    fn a_day_of_steady_changes_never_runs_out_of_quota() {
        let quota = 50_000;
        let burst = quota_burst(100, quota);
        let mut used: u32 = 0;
        let mut oldest_waiting: [Option<i64>; 2] = [None, None];
        let mut records = 0;
        let mut longest_wait = 0;
        // The pusher looks every 100 ms (a held batch is due at the time the pace gives).
        for now in (0..DAY_MS).step_by(100) {
            if now % 1_500 == 0 {
                for endpoint in &mut oldest_waiting {
                    endpoint.get_or_insert(now);
                    records += 1;
                }
            }
            for endpoint in &mut oldest_waiting {
                if let Some(since) = *endpoint
                    && quota_hold_ms(used, quota, now, burst).is_none()
                {
                    used += 1;
                    longest_wait = longest_wait.max(now - since);
                    *endpoint = None;
                }
            }
        }
        assert_eq!(records, 115_200);
        assert!(used <= quota, "{used} calls against a quota of {quota}");
        assert!(used > quota / 2, "the quota is used, not hoarded: {used}");
        assert!(longest_wait <= 5_000, "a change waited {longest_wait} ms");
    }

    #[test]
    fn a_partial_batch_goes_when_a_dependent_batch_needs_it_first() {
        let mut outcome = CycleOutcome::default();
        assert_eq!(
            gate(10_000, 10, true).admit(&group(9_900, 20), true, &mut outcome),
            20
        );
    }

    #[test]
    fn no_more_calls_than_the_limiter_has_free() {
        let mut outcome = CycleOutcome::default();
        let mut g = gate(100_000, 2, false);
        assert_eq!(g.admit(&group(1_000, 1_000), false, &mut outcome), 600);
        assert_eq!(g.free_calls, 0);
        assert_eq!(g.admit(&group(1_000, 300), false, &mut outcome), 0);
    }

    #[test]
    fn a_batch_taking_two_calls_goes_only_with_both_free_unless_one_is_all_there_is() {
        let leads = || group(1_000, 1_000).costing(LEAD_CALLS_PER_BATCH);
        let mut outcome = CycleOutcome::default();
        // Seven calls free: three batches of two calls; the seventh call is left for others.
        let mut g = gate(100_000, 7, false);
        assert_eq!(g.admit(&leads(), false, &mut outcome), 900);
        assert_eq!(g.free_calls, 1);
        // One call free (or a concurrency of one): a batch goes at the cost of one call.
        assert_eq!(g.admit(&leads(), false, &mut outcome), 300);
        assert_eq!(g.free_calls, 0);
        assert_eq!(g.admit(&leads(), false, &mut outcome), 0);
        // A quiet partial rest counts as a batch too.
        let mut g = gate(100_000, 4, false);
        assert_eq!(
            g.admit(
                &group(1_000, 350).costing(LEAD_CALLS_PER_BATCH),
                false,
                &mut outcome
            ),
            350
        );
        assert_eq!(g.free_calls, 0);
    }

    #[test]
    fn prepare_ahead_follows_the_preparation_time_within_bounds() {
        let ahead = PrepareAhead::new();
        assert_eq!(ahead.lead(), PrepareAhead::INITIAL);
        // A slow preparation raises the lead at once (with half again as margin).
        ahead.record(Duration::from_millis(200));
        assert_eq!(ahead.lead(), Duration::from_millis(300));
        // Fast ones lower it a quarter per cycle, down to the floor.
        ahead.record(Duration::from_millis(1));
        assert_eq!(ahead.lead(), Duration::from_millis(225));
        for _ in 0..30 {
            ahead.record(Duration::from_millis(1));
        }
        assert_eq!(ahead.lead(), PrepareAhead::MIN);
        // A preparation slower than the bound is capped.
        ahead.record(Duration::from_secs(5));
        assert_eq!(ahead.lead(), PrepareAhead::MAX);
    }
}
