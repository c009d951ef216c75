//! The Marketo writes that move Marketo from one projection of an opportunity to the next.
//!
//! Writes only ever go to Marketo (sync is one way, DESIGN.md §2): nothing here creates anything
//! in Dynamics. Every record write is an upsert (`createOrUpdate`, keyed by the dedupe fields) or
//! a delete; none needs Marketo's `createOnly`, so replaying a plan is harmless.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::project::{Projection, RoleKey};

/// One write to Marketo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MarketoWrite {
    UpsertCompany {
        account_id: Uuid,
        name: Option<String>,
    },
    /// The pusher finds the contact's Marketo lead, or creates it (`sync.missing_lead`).
    EnsureLead {
        contact_id: Uuid,
    },
    UpsertOpportunity {
        opportunity_id: Uuid,
        fields: Map<String, Value>,
    },
    UpsertRole {
        opportunity_id: Uuid,
        contact_id: Uuid,
        role: String,
    },
    DeleteRole {
        opportunity_id: Uuid,
        contact_id: Uuid,
        role: String,
    },
    DeleteOpportunity {
        opportunity_id: Uuid,
    },
}

impl MarketoWrite {
    /// The Marketo record this write is about; an upsert and a delete of one record share it, so
    /// pending writes coalesce to the latest.
    pub fn key(&self) -> String {
        match self {
            MarketoWrite::UpsertCompany { account_id, .. } => format!("company:{account_id}"),
            MarketoWrite::EnsureLead { contact_id } => format!("lead:{contact_id}"),
            MarketoWrite::UpsertOpportunity { opportunity_id, .. }
            | MarketoWrite::DeleteOpportunity { opportunity_id } => format!("opportunity:{opportunity_id}"),
            MarketoWrite::UpsertRole {
                opportunity_id,
                contact_id,
                role,
            }
            | MarketoWrite::DeleteRole {
                opportunity_id,
                contact_id,
                role,
            } => format!("role:{opportunity_id}:{contact_id}:{role}"),
        }
    }

    /// Push order (DESIGN.md §2.3, specs/marketo.md §4): companies before the opportunities that
    /// name them, leads and opportunities before their roles, role deletes before the opportunity
    /// delete.
    pub fn phase(&self) -> u8 {
        match self {
            MarketoWrite::UpsertCompany { .. } => 0,
            MarketoWrite::EnsureLead { .. } => 1,
            MarketoWrite::UpsertOpportunity { .. } => 2,
            MarketoWrite::UpsertRole { .. } => 3,
            MarketoWrite::DeleteRole { .. } => 4,
            MarketoWrite::DeleteOpportunity { .. } => 5,
        }
    }
}

/// The writes turning `old` (the last planned projection, None if never) into `new`, in push
/// order. Only what changed is written.
#[must_use]
pub fn plan(old: Option<&Projection>, new: &Projection) -> Vec<MarketoWrite> {
    let opportunity_id = new.opportunity_id;
    let old_roles = old.map(|o| o.roles.clone()).unwrap_or_default();
    let mut writes = Vec::new();
    let Some(fields) = &new.opportunity else {
        // Deleted. With no earlier plan the opportunity may still be in Marketo from before, so
        // delete it anyway (Marketo skips a missing record with 1013).
        if old.is_none_or(|o| o.opportunity.is_some()) {
            writes.extend(old_roles.iter().map(|r| delete_role(opportunity_id, r)));
            writes.push(MarketoWrite::DeleteOpportunity { opportunity_id });
        }
        return writes;
    };
    if let Some(company) = &new.company
        && old.is_none_or(|o| o.company.as_ref() != Some(company))
    {
        writes.push(MarketoWrite::UpsertCompany {
            account_id: company.account_id,
            name: company.name.clone(),
        });
    }
    let added: Vec<&RoleKey> = new.roles.difference(&old_roles).collect();
    let mut leads: Vec<Uuid> = added.iter().map(|r| r.contact_id).collect();
    leads.sort();
    leads.dedup();
    writes.extend(
        leads
            .into_iter()
            .map(|contact_id| MarketoWrite::EnsureLead { contact_id }),
    );
    if old.is_none_or(|o| o.opportunity.as_ref() != Some(fields)) {
        writes.push(MarketoWrite::UpsertOpportunity {
            opportunity_id,
            fields: fields.clone(),
        });
    }
    writes.extend(added.into_iter().map(|r| MarketoWrite::UpsertRole {
        opportunity_id,
        contact_id: r.contact_id,
        role: r.role.clone(),
    }));
    writes.extend(
        old_roles
            .difference(&new.roles)
            .map(|r| delete_role(opportunity_id, r)),
    );
    writes
}

fn delete_role(opportunity_id: Uuid, role: &RoleKey) -> MarketoWrite {
    MarketoWrite::DeleteRole {
        opportunity_id,
        contact_id: role.contact_id,
        role: role.role.clone(),
    }
}
