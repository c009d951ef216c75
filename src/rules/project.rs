//! What Marketo should hold for one opportunity, given what oppsync knows (DESIGN.md §2).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::config::{EXTERNAL_COMPANY_ID, EXTERNAL_OPPORTUNITY_ID, SyncConfig};
use super::mapping::convert;
use super::state::{ContactState, OpportunityState, World};
use crate::dynamics::{AttributeValue, EntityRef};

/// A read the projection needs before it can be made.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Lookup {
    /// The contact's parent account or email is unknown: read the contact.
    Contact(Uuid),
    /// The connection role's name and category are unknown: read the role.
    ConnectionRole(Uuid),
    /// The opportunity was never seen in full (no Create, no post image, no read): read the row.
    OpportunityRow(Uuid),
    /// The company's account name is unknown (references rarely carry it): read the account.
    Account(Uuid),
}

/// A Marketo company (`externalCompanyId` = Dynamics accountid).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CompanyRecord {
    pub account_id: Uuid,
    /// Display name when Dynamics sent one (it usually sends null).
    pub name: Option<String>,
}

/// One Marketo opportunity role (key: opportunity, lead, role; the lead stands for the contact).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoleKey {
    pub contact_id: Uuid,
    pub role: String,
}

/// A Dynamics value that did not fit its field's conversion: the Marketo field is not sent,
/// so Marketo keeps what it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RejectedValue {
    /// The Dynamics attribute.
    pub dynamics: String,
    /// Why it was rejected (the value and the conversion).
    pub reason: String,
}

/// What Marketo should hold for one opportunity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub opportunity_id: Uuid,
    /// Marketo field values, including `externalOpportunityId` and `externalCompanyId` (null when
    /// there is no company). None when the opportunity is deleted. A field whose value was
    /// rejected is absent (left unchanged in Marketo) and listed in `rejected`.
    pub opportunity: Option<Map<String, Value>>,
    pub company: Option<CompanyRecord>,
    pub roles: BTreeSet<RoleKey>,
    /// Marketo fields whose Dynamics value did not fit the conversion, by Marketo field name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, RejectedValue>,
}

impl Projection {
    /// The projection of a deleted opportunity: nothing.
    pub fn deleted(opportunity_id: Uuid) -> Self {
        Projection {
            opportunity_id,
            opportunity: None,
            company: None,
            roles: BTreeSet::new(),
            rejected: BTreeMap::new(),
        }
    }
}

/// Why the rules give an opportunity a role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RoleSource {
    /// The potential customer (`customerid`) is this contact.
    Customer,
    /// This active connection to the contact has a role in a stakeholder category.
    Connection(Uuid),
}

/// Every role the rules give `state`'s opportunity, each with the rules that justify it (a role
/// stays while one does). Connection roles not known yet are added to `lookups`. The one
/// statement of the role rules: [`project`] and the admin view both use it.
pub fn role_sources(
    state: &OpportunityState,
    world: &World,
    cfg: &SyncConfig,
    lookups: &mut BTreeSet<Lookup>,
) -> BTreeMap<RoleKey, BTreeSet<RoleSource>> {
    let mut roles: BTreeMap<RoleKey, BTreeSet<RoleSource>> = BTreeMap::new();
    if state.is_deleted() {
        return roles;
    }
    // Potential customer (DESIGN.md §2): a contact gets a role.
    // A deleted contact gets no role, whatever still names it.
    let deleted = |id: Uuid| world.contacts.get(&id).is_some_and(ContactState::is_deleted);
    if let Some(customer) = state.customer()
        && customer.logical_name == "contact"
        && !deleted(customer.id)
    {
        roles
            .entry(RoleKey {
                contact_id: customer.id,
                role: cfg.customer_role.clone(),
            })
            .or_default()
            .insert(RoleSource::Customer);
    }
    // Stakeholders: active connections to a contact whose role is in a stakeholder category.
    // Both rows of a reciprocal pair give the same key, so the second is a no-op.
    for connection in world.connections.values() {
        if connection.opportunity_id != Some(state.id) || !connection.links_contact() {
            continue;
        }
        let (Some(contact_id), Some(role_id)) = (connection.contact_id, connection.role_id) else {
            continue;
        };
        let Some(role) = world.roles.get(&role_id) else {
            lookups.insert(Lookup::ConnectionRole(role_id));
            continue;
        };
        if cfg.stakeholder_categories.contains(&role.category) && !deleted(contact_id) {
            roles
                .entry(RoleKey {
                    contact_id,
                    role: role.name.clone(),
                })
                .or_default()
                .insert(RoleSource::Connection(connection.id));
        }
    }
    roles
}

/// What Marketo should hold for `opportunity_id`, given `world`. Err lists every lookup still
/// needed (sorted, without duplicates); resolve them, put the results in the world, and call again.
///
/// Every role contact must be in the world and complete (parent account and email known): the
/// customer rule needs the parent account, and lead matching the email.
pub fn project(opportunity_id: Uuid, world: &World, cfg: &SyncConfig) -> Result<Projection, Vec<Lookup>> {
    let Some(state) = world.opportunities.get(&opportunity_id) else {
        return Err(vec![Lookup::OpportunityRow(opportunity_id)]);
    };
    if state.is_deleted() {
        return Ok(Projection::deleted(opportunity_id));
    }
    let mut lookups = BTreeSet::new();
    if !state.seen_in_full {
        lookups.insert(Lookup::OpportunityRow(opportunity_id));
    }
    let sources = role_sources(state, world, cfg, &mut lookups);
    let roles: BTreeSet<RoleKey> = sources.keys().cloned().collect();
    let role_contacts: BTreeSet<Uuid> = roles.iter().map(|r| r.contact_id).collect();

    // Potential customer (DESIGN.md §2): an account is the company; a contact's parent account
    // (when that is an account) is. (Its role comes from `role_sources`.)
    let mut company_account: Option<&EntityRef> = None;
    if let Some(customer) = state.customer() {
        match customer.logical_name.as_str() {
            "account" => company_account = Some(customer),
            "contact" => {
                let contact = world.contacts.get(&customer.id);
                // A deleted contact has no role (role_sources); its last known account stays
                // the company.
                company_account = contact.and_then(|c| c.parent_account.as_ref());
            }
            _ => {}
        }
    }
    // The company's name: the account's own (cached from an account notification or a read)
    // wins over a name a reference carried; with neither, the account is read.
    let company = company_account.map(|account| {
        let name = match world.accounts.get(&account.id).and_then(|a| a.known_name()) {
            Some(known) => known.map(str::to_owned),
            None => {
                if account.name.is_none() {
                    lookups.insert(Lookup::Account(account.id));
                }
                account.name.clone()
            }
        };
        CompanyRecord {
            account_id: account.id,
            name,
        }
    });

    for contact in role_contacts {
        if !world.contacts.get(&contact).is_some_and(|c| c.is_complete()) {
            lookups.insert(Lookup::Contact(contact));
        }
    }
    if !lookups.is_empty() {
        return Err(lookups.into_iter().collect());
    }

    let mut fields = Map::new();
    fields.insert(
        EXTERNAL_OPPORTUNITY_ID.to_owned(),
        Value::String(opportunity_id.to_string()),
    );
    fields.insert(
        EXTERNAL_COMPANY_ID.to_owned(),
        company
            .as_ref()
            .map_or(Value::Null, |c| Value::String(c.account_id.to_string())),
    );
    let customer_value = state.customer.as_ref().map(|c| {
        c.value
            .clone()
            .map_or(AttributeValue::Null, AttributeValue::EntityReference)
    });
    let mut rejected = BTreeMap::new();
    for mapping in &cfg.fields {
        let value = if mapping.dynamics == "customerid" {
            customer_value.as_ref()
        } else {
            state.fields.get(&mapping.dynamics).map(|v| &v.value)
        };
        match convert(mapping, value) {
            Ok(v) => {
                fields.insert(mapping.marketo.clone(), v);
            }
            Err(r) => {
                rejected.insert(
                    mapping.marketo.clone(),
                    RejectedValue {
                        dynamics: mapping.dynamics.clone(),
                        reason: r.reason,
                    },
                );
            }
        }
    }
    // statecode: 0 Open, 1 Won, 2 Lost (specs/dynamics.md §5).
    let statecode = state.statecode();
    if let Some(name) = cfg.derived.is_closed_field() {
        fields.insert(
            name.to_owned(),
            statecode.map_or(Value::Null, |s| Value::Bool(s == 1 || s == 2)),
        );
    }
    if let Some(name) = cfg.derived.is_won_field() {
        fields.insert(
            name.to_owned(),
            statecode.map_or(Value::Null, |s| Value::Bool(s == 1)),
        );
    }
    Ok(Projection {
        opportunity_id,
        opportunity: Some(fields),
        company,
        roles,
        rejected,
    })
}
