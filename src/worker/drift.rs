//! The drift report: what Marketo holds for oppsync's opportunities and their roles against what
//! oppsync projects for them, read from Marketo in batches by `externalOpportunityId` within a
//! call budget; and its repair, which queues the writes that put Marketo back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::WorkerContext;
use crate::marketo::MarketoError;
use crate::rules::{self, MarketoWrite, Projection, WriteKey};
use crate::store::{Commit, PlannedWrite, StoreError};

/// Opportunities per opportunity query (Marketo's most per call).
const OPPORTUNITIES_PER_CALL: usize = 300;
/// Opportunities per role query: Marketo answers at most 300 rows a call.
const ROLES_QUERY_OPPORTUNITIES: usize = 60;

/// What kind of difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// oppsync projects it; Marketo lacks it.
    Missing,
    /// Marketo holds it; oppsync projects nothing of the kind (deleted, or removed).
    Extra,
    /// Both hold it; a field's value differs.
    FieldDiffers,
}

/// One difference between Marketo and oppsync's projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Difference {
    pub opportunity_id: String,
    pub kind: DriftKind,
    /// `opportunity` or `role`.
    #[schema(example = "opportunity")]
    pub record: String,
    /// The field that differs (field_differs), or the role's name.
    pub field: Option<String>,
    /// For roles: the Marketo lead.
    pub lead_id: Option<i64>,
    /// What oppsync projects (field_differs, missing).
    #[schema(value_type = Option<Object>)]
    pub expected: Option<Value>,
    /// What Marketo holds (field_differs, extra).
    #[schema(value_type = Option<Object>)]
    pub actual: Option<Value>,
}

/// The drift report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DriftReport {
    /// Opportunities compared.
    pub opportunities_checked: usize,
    /// Marketo calls made, and the budget given.
    pub calls: usize,
    pub budget: usize,
    /// True when the budget ran out before every opportunity was compared.
    pub incomplete: bool,
    pub differences: Vec<Difference>,
}

/// What a repair queued.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DriftRepair {
    pub report: DriftReport,
    /// Opportunities whose writes were queued again.
    pub opportunities_repaired: usize,
    pub writes_queued: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Marketo: {0}")]
    Marketo(#[from] MarketoError),
    #[error("stored projection of {0} is unreadable: {1}")]
    Corrupt(Uuid, String),
}

/// Values equal as Marketo keeps them: numbers by value, absent as null.
fn same(expected: &Value, actual: Option<&Value>) -> bool {
    let actual = actual.unwrap_or(&Value::Null);
    match (expected, actual) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Number(a), Value::String(b)) | (Value::String(b), Value::Number(a)) => {
            b.parse::<f64>().ok() == a.as_f64()
        }
        (Value::String(a), Value::String(b)) => a == b,
        (a, b) => a == b,
    }
}

/// Compares up to `budget` calls' worth of opportunities (in id order from the first).
pub async fn report(
    ctx: &WorkerContext,
    budget: usize,
) -> Result<(DriftReport, BTreeMap<Uuid, Projection>), DriftError> {
    let mut out = DriftReport {
        opportunities_checked: 0,
        calls: 0,
        budget,
        incomplete: false,
        differences: Vec::new(),
    };
    let mut projections: BTreeMap<Uuid, Projection> = BTreeMap::new();
    let mut after: Option<Uuid> = None;
    // One opportunity call and the role calls of 300 opportunities.
    let calls_per_round = 1 + OPPORTUNITIES_PER_CALL.div_ceil(ROLES_QUERY_OPPORTUNITIES);
    loop {
        let rows = ctx
            .store
            .opportunities_after(after, OPPORTUNITIES_PER_CALL as i64)
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id);
        if out.calls + calls_per_round > budget {
            out.incomplete = true;
            break;
        }
        let mut chunk: BTreeMap<Uuid, Projection> = BTreeMap::new();
        for row in &rows {
            if let Some(text) = &row.projection {
                let p: Projection =
                    serde_json::from_str(text).map_err(|e| DriftError::Corrupt(row.id, e.to_string()))?;
                chunk.insert(row.id, p);
            }
        }
        compare(ctx, &chunk, &mut out).await?;
        out.opportunities_checked += chunk.len();
        projections.extend(chunk);
        if rows.len() < OPPORTUNITIES_PER_CALL {
            break;
        }
    }
    Ok((out, projections))
}

async fn compare(
    ctx: &WorkerContext,
    chunk: &BTreeMap<Uuid, Projection>,
    out: &mut DriftReport,
) -> Result<(), DriftError> {
    if chunk.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = chunk.keys().map(Uuid::to_string).collect();
    let mut fields: BTreeSet<String> = BTreeSet::new();
    for p in chunk.values() {
        fields.extend(p.opportunity.iter().flat_map(|o| o.keys().cloned()));
    }
    fields.insert("externalOpportunityId".into());
    let fields: Vec<String> = fields.into_iter().collect();
    let held = ctx.marketo.find_opportunities(&ids, &fields).await?;
    out.calls += ids.len().div_ceil(OPPORTUNITIES_PER_CALL);
    let held: HashMap<String, Map<String, Value>> = held
        .into_iter()
        .filter_map(|m| Some((m.get("externalOpportunityId")?.as_str()?.to_owned(), m)))
        .collect();
    let mut roles_held: HashMap<String, BTreeSet<(i64, String)>> = HashMap::new();
    for part in ids.chunks(ROLES_QUERY_OPPORTUNITIES) {
        for r in ctx.marketo.find_roles(part).await? {
            let (Some(opp), Some(lead), Some(role)) = (
                r.get("externalOpportunityId").and_then(Value::as_str),
                r.get("leadId")
                    .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok())),
                r.get("role").and_then(Value::as_str),
            ) else {
                continue;
            };
            roles_held
                .entry(opp.to_owned())
                .or_default()
                .insert((lead, role.to_owned()));
        }
        out.calls += 1;
    }
    let contacts: Vec<Uuid> = chunk
        .values()
        .flat_map(|p| p.roles.iter().map(|r| r.contact_id))
        .collect();
    let leads = ctx.store.lead_ids(&contacts).await?;
    for (id, p) in chunk {
        let key = id.to_string();
        let diff = |kind, record: &str, field: Option<String>, lead_id, expected, actual| Difference {
            opportunity_id: key.clone(),
            kind,
            record: record.to_owned(),
            field,
            lead_id,
            expected,
            actual,
        };
        match (&p.opportunity, held.get(&key)) {
            (Some(_), None) => {
                out.differences
                    .push(diff(DriftKind::Missing, "opportunity", None, None, None, None))
            }
            (None, Some(m)) => out.differences.push(diff(
                DriftKind::Extra,
                "opportunity",
                None,
                None,
                None,
                Some(Value::Object(m.clone())),
            )),
            (Some(expected), Some(actual)) => {
                for (field, value) in expected {
                    if !same(value, actual.get(field)) {
                        out.differences.push(diff(
                            DriftKind::FieldDiffers,
                            "opportunity",
                            Some(field.clone()),
                            None,
                            Some(value.clone()),
                            actual.get(field).cloned(),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
        let held_roles = roles_held.remove(&key).unwrap_or_default();
        // Roles whose contact has no lead yet are still being written: not drift.
        let expected_roles: BTreeSet<(i64, String)> = p
            .roles
            .iter()
            .filter_map(|r| Some((*leads.get(&r.contact_id)?, r.role.clone())))
            .collect();
        for (lead, role) in expected_roles.difference(&held_roles) {
            out.differences.push(diff(
                DriftKind::Missing,
                "role",
                Some(role.clone()),
                Some(*lead),
                None,
                None,
            ));
        }
        for (lead, role) in held_roles.difference(&expected_roles) {
            out.differences.push(diff(
                DriftKind::Extra,
                "role",
                Some(role.clone()),
                Some(*lead),
                None,
                None,
            ));
        }
    }
    Ok(())
}

/// Reports within `budget`, then queues every write of each opportunity that differs (its whole
/// projection, as if never written) and deletes of the extra roles and opportunities.
pub async fn repair(ctx: &WorkerContext, budget: usize) -> Result<DriftRepair, DriftError> {
    let (report, projections) = report(ctx, budget).await?;
    let drifted: BTreeSet<Uuid> = report
        .differences
        .iter()
        .filter_map(|d| Uuid::parse_str(&d.opportunity_id).ok())
        .collect();
    // Extra roles name a lead; the write keys name the contact.
    let lead_contacts: HashMap<i64, Uuid> = {
        let contacts: Vec<Uuid> = projections
            .values()
            .flat_map(|p| p.roles.iter().map(|r| r.contact_id))
            .collect();
        ctx.store
            .lead_ids(&contacts)
            .await?
            .into_iter()
            .map(|(c, l)| (l, c))
            .collect()
    };
    let mut writes: Vec<MarketoWrite> = Vec::new();
    for id in &drifted {
        let Some(p) = projections.get(id) else { continue };
        writes.extend(rules::plan(None, p));
        for d in report
            .differences
            .iter()
            .filter(|d| d.opportunity_id == id.to_string())
        {
            if d.record == "role"
                && d.kind == DriftKind::Extra
                && let (Some(lead), Some(role)) = (d.lead_id, &d.field)
                && let Some(contact) = lead_contacts.get(&lead)
            {
                writes.push(MarketoWrite::DeleteRole {
                    opportunity_id: *id,
                    contact_id: *contact,
                    role: role.clone(),
                });
            }
        }
    }
    let planned: Vec<PlannedWrite> = writes
        .iter()
        .map(|w| {
            Ok(PlannedWrite {
                key: w.key(),
                opportunity_id: match w {
                    MarketoWrite::UpsertCompany { .. } | MarketoWrite::EnsureLead { .. } => None,
                    MarketoWrite::UpsertOpportunity { opportunity_id, .. }
                    | MarketoWrite::UpsertRole { opportunity_id, .. }
                    | MarketoWrite::DeleteRole { opportunity_id, .. }
                    | MarketoWrite::DeleteOpportunity { opportunity_id } => Some(*opportunity_id),
                },
                phase: w.phase(),
                payload: serde_json::to_string(w).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let keys: Vec<WriteKey> = planned.iter().map(|w| w.key.clone()).collect();
    if !planned.is_empty() {
        ctx.store
            .commit(&Commit {
                writes: planned,
                ..Commit::default()
            })
            .await
            .map_err(|e| match e {
                crate::store::CommitError::Store(e) => e,
                other => StoreError::Corrupt(other.to_string()),
            })?;
        // A write equal to one Marketo took already is not queued again by the commit: Marketo
        // has drifted from it since, so it goes again.
        ctx.store.requeue_writes(&keys).await?;
        ctx.pusher_wakeup.notify_one();
    }
    tracing::info!(
        opportunities = drifted.len(),
        writes = keys.len(),
        "drift repair queued"
    );
    Ok(DriftRepair {
        report,
        opportunities_repaired: drifted.len(),
        writes_queued: keys.len(),
    })
}
