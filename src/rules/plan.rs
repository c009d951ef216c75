//! The Marketo writes that move Marketo from one projection of an opportunity to the next.
//!
//! Writes only ever go to Marketo (sync is one way, DESIGN.md §2): nothing here creates anything
//! in Dynamics. Every record write is an upsert (`createOrUpdate`, keyed by the dedupe fields) or
//! a delete; none needs Marketo's `createOnly`, so replaying a plan is harmless.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::project::{Projection, RoleKey};

/// The Marketo record a write is about. An upsert and a delete of one record share it, so
/// pending writes coalesce to the latest. The planner makes it, the store keys pending writes
/// by it (as its text form), the pusher settles by it and finds dependencies with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKey {
    /// `company:{accountid}`
    Company(Uuid),
    /// `lead:{contactid}`: the contact's Marketo lead.
    Lead(Uuid),
    /// `opportunity:{opportunityid}`
    Opportunity(Uuid),
    /// `role:{opportunityid}:{contactid}:{role name}`
    Role {
        opportunity_id: Uuid,
        contact_id: Uuid,
        role: String,
    },
}

impl fmt::Display for WriteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteKey::Company(id) => write!(f, "company:{id}"),
            WriteKey::Lead(id) => write!(f, "lead:{id}"),
            WriteKey::Opportunity(id) => write!(f, "opportunity:{id}"),
            WriteKey::Role {
                opportunity_id,
                contact_id,
                role,
            } => write!(f, "role:{opportunity_id}:{contact_id}:{role}"),
        }
    }
}

/// A text that is not a write key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Marketo write key (company:ID, lead:ID, opportunity:ID or role:ID:ID:ROLE)")]
pub struct BadWriteKey(pub String);

impl FromStr for WriteKey {
    type Err = BadWriteKey;

    fn from_str(s: &str) -> Result<WriteKey, BadWriteKey> {
        let bad = || BadWriteKey(s.to_owned());
        let id = |t: &str| Uuid::parse_str(t).map_err(|_| bad());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "company" => Ok(WriteKey::Company(id(rest)?)),
            "lead" => Ok(WriteKey::Lead(id(rest)?)),
            "opportunity" => Ok(WriteKey::Opportunity(id(rest)?)),
            "role" => {
                // The role name may itself hold ':'; the two ids before it cannot.
                let (opportunity, rest) = rest.split_once(':').ok_or_else(bad)?;
                let (contact, role) = rest.split_once(':').ok_or_else(bad)?;
                Ok(WriteKey::Role {
                    opportunity_id: id(opportunity)?,
                    contact_id: id(contact)?,
                    role: role.to_owned(),
                })
            }
            _ => Err(bad()),
        }
    }
}

impl Serialize for WriteKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WriteKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<WriteKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Push order (DESIGN.md §2.3, specs/marketo.md §4): companies before the opportunities that
/// name them, leads and opportunities before their roles, role deletes before the opportunity
/// delete. Stored as its number, so the store reads pending writes in this order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Companies,
    Leads,
    Opportunities,
    RoleUpserts,
    RoleDeletes,
    OpportunityDeletes,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Companies,
        Phase::Leads,
        Phase::Opportunities,
        Phase::RoleUpserts,
        Phase::RoleDeletes,
        Phase::OpportunityDeletes,
    ];

    /// The number the store keeps (its order is the push order).
    pub fn number(self) -> i64 {
        match self {
            Phase::Companies => 0,
            Phase::Leads => 1,
            Phase::Opportunities => 2,
            Phase::RoleUpserts => 3,
            Phase::RoleDeletes => 4,
            Phase::OpportunityDeletes => 5,
        }
    }

    pub fn from_number(n: i64) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.number() == n)
    }
}

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
    pub fn key(&self) -> WriteKey {
        match self {
            MarketoWrite::UpsertCompany { account_id, .. } => WriteKey::Company(*account_id),
            MarketoWrite::EnsureLead { contact_id } => WriteKey::Lead(*contact_id),
            MarketoWrite::UpsertOpportunity { opportunity_id, .. }
            | MarketoWrite::DeleteOpportunity { opportunity_id } => WriteKey::Opportunity(*opportunity_id),
            MarketoWrite::UpsertRole {
                opportunity_id,
                contact_id,
                role,
            }
            | MarketoWrite::DeleteRole {
                opportunity_id,
                contact_id,
                role,
            } => WriteKey::Role {
                opportunity_id: *opportunity_id,
                contact_id: *contact_id,
                role: role.clone(),
            },
        }
    }

    /// When this write goes, relative to the others (see [`Phase`]).
    pub fn phase(&self) -> Phase {
        match self {
            MarketoWrite::UpsertCompany { .. } => Phase::Companies,
            MarketoWrite::EnsureLead { .. } => Phase::Leads,
            MarketoWrite::UpsertOpportunity { .. } => Phase::Opportunities,
            MarketoWrite::UpsertRole { .. } => Phase::RoleUpserts,
            MarketoWrite::DeleteRole { .. } => Phase::RoleDeletes,
            MarketoWrite::DeleteOpportunity { .. } => Phase::OpportunityDeletes,
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
