//! Tests of the rules, written as given/when/then against DESIGN.md §2, and the convergence
//! property (any order, any repetition → the same world and the same Marketo).

mod closes;
mod convergence;
mod rules;

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::*;
use crate::dynamics::{
    AttributeValue, Attributes, DynamicsEvent, EntityKind, EntityRef, MessageKind, Version,
};

pub(super) const STAKEHOLDER: Uuid = Uuid::from_u128(0x5000);
pub(super) const DECISION_MAKER: Uuid = Uuid::from_u128(0x5001);
pub(super) const SALES_TEAM: Uuid = Uuid::from_u128(0x5002);
pub(super) const BUSINESS: Uuid = Uuid::from_u128(0x5003);
/// A role oppsync has not looked up yet.
pub(super) const UNKNOWN_ROLE: Uuid = Uuid::from_u128(0x5999);

pub(super) fn opp_id(n: u128) -> Uuid {
    Uuid::from_u128(0x1000 + n)
}
pub(super) fn contact_id(n: u128) -> Uuid {
    Uuid::from_u128(0x2000 + n)
}
pub(super) fn account_id(n: u128) -> Uuid {
    Uuid::from_u128(0x3000 + n)
}
pub(super) fn conn_id(n: u128) -> Uuid {
    Uuid::from_u128(0x4000 + n)
}

pub(super) fn reference(logical_name: &str, id: Uuid) -> AttributeValue {
    AttributeValue::EntityReference(EntityRef {
        logical_name: logical_name.to_owned(),
        id,
        name: None,
    })
}
pub(super) fn contact(n: u128) -> AttributeValue {
    reference("contact", contact_id(n))
}
/// An account reference with its name, as an image carries it (a reference without a name
/// makes the projection read the account, see `company_name_*` tests).
pub(super) fn account(n: u128) -> AttributeValue {
    AttributeValue::EntityReference(EntityRef {
        logical_name: "account".to_owned(),
        id: account_id(n),
        name: Some(format!("Account {n}")),
    })
}
pub(super) fn opportunity(n: u128) -> AttributeValue {
    reference("opportunity", opp_id(n))
}
pub(super) fn text(s: &str) -> AttributeValue {
    AttributeValue::String(s.to_owned())
}
pub(super) fn money(units: i64) -> AttributeValue {
    AttributeValue::Money(Decimal::new(units, 0))
}
pub(super) fn option(v: i32) -> AttributeValue {
    AttributeValue::OptionSet(v)
}

pub(super) fn attrs(pairs: &[(&str, AttributeValue)]) -> Attributes {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

pub(super) fn event(
    entity: EntityKind,
    message: MessageKind,
    id: Uuid,
    version: Version,
    attributes: Attributes,
) -> DynamicsEvent {
    DynamicsEvent {
        entity,
        message,
        record_id: id,
        version,
        attributes,
        pre_image: Attributes::new(),
        data_missing: false,
        correlation_id: None,
        operation_id: None,
        request_id: None,
        depth: 1,
    }
}

/// An opportunity Create with a name, statecode Open and the given customer and attributes.
pub(super) fn opp_create(
    n: u128,
    version: Version,
    customer: AttributeValue,
    more: &[(&str, AttributeValue)],
) -> DynamicsEvent {
    let mut a = attrs(&[
        ("name", text(&format!("Deal {n}"))),
        ("statecode", option(0)),
        ("customerid", customer),
    ]);
    a.extend(attrs(more));
    event(
        EntityKind::Opportunity,
        MessageKind::Create,
        opp_id(n),
        version,
        a,
    )
}
/// A partial opportunity Update (Target only, no post image).
pub(super) fn opp_update(n: u128, version: Version, changed: &[(&str, AttributeValue)]) -> DynamicsEvent {
    event(
        EntityKind::Opportunity,
        MessageKind::Update,
        opp_id(n),
        version,
        attrs(changed),
    )
}
pub(super) fn opp_delete(n: u128, version: Version) -> DynamicsEvent {
    event(
        EntityKind::Opportunity,
        MessageKind::Delete,
        opp_id(n),
        version,
        Attributes::new(),
    )
}
/// A connection row record1 → record2, the role on record2's side (and record1's when given).
pub(super) fn conn_create(
    n: u128,
    version: Version,
    record1: AttributeValue,
    record2: AttributeValue,
    record2role: Uuid,
) -> DynamicsEvent {
    event(
        EntityKind::Connection,
        MessageKind::Create,
        conn_id(n),
        version,
        attrs(&[
            ("record1id", record1),
            ("record2id", record2),
            ("record2roleid", reference("connectionrole", record2role)),
            ("statecode", option(0)),
            ("ismaster", AttributeValue::Bool(true)),
        ]),
    )
}
/// The reciprocal row of a connection added from the opportunity: contact → opportunity, the
/// contact's role now on record1's side.
pub(super) fn conn_reciprocal(
    n: u128,
    version: Version,
    contact: AttributeValue,
    opportunity: AttributeValue,
    role: Uuid,
) -> DynamicsEvent {
    event(
        EntityKind::Connection,
        MessageKind::Create,
        conn_id(n),
        version,
        attrs(&[
            ("record1id", contact),
            ("record2id", opportunity),
            ("record1roleid", reference("connectionrole", role)),
            ("statecode", option(0)),
            ("ismaster", AttributeValue::Bool(false)),
        ]),
    )
}
pub(super) fn conn_state(n: u128, version: Version, statecode: i32) -> DynamicsEvent {
    event(
        EntityKind::Connection,
        MessageKind::Update,
        conn_id(n),
        version,
        attrs(&[("statecode", option(statecode))]),
    )
}
pub(super) fn conn_delete(n: u128, version: Version) -> DynamicsEvent {
    event(
        EntityKind::Connection,
        MessageKind::Delete,
        conn_id(n),
        version,
        Attributes::new(),
    )
}
pub(super) fn contact_update(n: u128, version: Version, changed: &[(&str, AttributeValue)]) -> DynamicsEvent {
    event(
        EntityKind::Contact,
        MessageKind::Update,
        contact_id(n),
        version,
        attrs(changed),
    )
}

/// Contacts 1..=n known in full with no account, and the connection roles.
pub(super) fn world_with_contacts(n: u128) -> World {
    let mut world = World::default();
    for c in 1..=n {
        let row = attrs(&[
            ("emailaddress1", text(&format!("c{c}@example.com"))),
            ("parentcustomerid", AttributeValue::Null),
        ]);
        world
            .contacts
            .insert(contact_id(c), ContactState::from_row(contact_id(c), &row, 1));
    }
    for (id, name, category) in [
        (STAKEHOLDER, "Stakeholder", 1000),
        (DECISION_MAKER, "Decision Maker", 1000),
        (SALES_TEAM, "Account Manager", 1001),
        (BUSINESS, "Business Partner", 1),
    ] {
        world.roles.insert(
            id,
            ConnectionRoleInfo {
                id,
                name: name.to_owned(),
                category,
            },
        );
    }
    world
}

pub(super) fn role(contact: u128, role: &str) -> RoleKey {
    RoleKey {
        contact_id: contact_id(contact),
        role: role.to_owned(),
    }
}

/// What Marketo holds, by record key, built by replaying writes. Asserts Marketo's own
/// preconditions: a role needs its opportunity and lead, an opportunity its company.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct MarketoModel {
    pub companies: BTreeMap<Uuid, Option<String>>,
    pub leads: BTreeSet<Uuid>,
    pub opportunities: BTreeMap<Uuid, Map<String, Value>>,
    pub roles: BTreeSet<(Uuid, Uuid, String)>,
}

impl MarketoModel {
    pub fn replay(&mut self, writes: &[MarketoWrite]) {
        for w in writes {
            match w {
                MarketoWrite::UpsertCompany { account_id, name } => {
                    self.companies.insert(*account_id, name.clone());
                }
                MarketoWrite::EnsureLead { contact_id } => {
                    self.leads.insert(*contact_id);
                }
                MarketoWrite::UpsertOpportunity {
                    opportunity_id,
                    fields,
                } => {
                    if let Some(Value::String(company)) = fields.get("externalCompanyId") {
                        let known = self.companies.keys().any(|c| c.to_string() == *company);
                        assert!(
                            known,
                            "opportunity {opportunity_id} names company {company} before it was upserted"
                        );
                    }
                    self.opportunities.insert(*opportunity_id, fields.clone());
                }
                MarketoWrite::UpsertRole {
                    opportunity_id,
                    contact_id,
                    role,
                } => {
                    assert!(
                        self.opportunities.contains_key(opportunity_id),
                        "role before its opportunity"
                    );
                    assert!(self.leads.contains(contact_id), "role before its lead");
                    self.roles.insert((*opportunity_id, *contact_id, role.clone()));
                }
                MarketoWrite::DeleteRole {
                    opportunity_id,
                    contact_id,
                    role,
                } => {
                    self.roles.remove(&(*opportunity_id, *contact_id, role.clone()));
                }
                MarketoWrite::DeleteOpportunity { opportunity_id } => {
                    assert!(
                        !self.roles.iter().any(|(o, _, _)| o == opportunity_id),
                        "opportunity {opportunity_id} deleted while roles remain"
                    );
                    self.opportunities.remove(opportunity_id);
                }
            }
        }
    }
}

/// The worker's loop in miniature: apply, project every affected opportunity, plan from the
/// last planned projection, replay onto Marketo. Projections that need lookups are skipped (the
/// worker would read the row; a later event completes them).
pub(super) struct Harness {
    pub world: World,
    pub cfg: SyncConfig,
    pub planned: BTreeMap<Uuid, Projection>,
    pub marketo: MarketoModel,
}

impl Harness {
    pub fn new(world: World) -> Self {
        Harness {
            world,
            cfg: SyncConfig::default(),
            planned: BTreeMap::new(),
            marketo: MarketoModel::default(),
        }
    }

    /// Delivers one event; returns the writes it planned.
    pub fn deliver(&mut self, e: &DynamicsEvent) -> Vec<MarketoWrite> {
        let applied = match apply(&mut self.world, e) {
            Ok(a) => a,
            Err(needs) => panic!("unexpected {needs}"),
        };
        let mut writes = Vec::new();
        for opp in applied.opportunities {
            let Ok(new) = project(opp, &self.world, &self.cfg) else {
                continue;
            };
            let planned = plan(self.planned.get(&opp), &new);
            self.marketo.replay(&planned);
            writes.extend(planned);
            self.planned.insert(opp, new);
        }
        writes
    }

    pub fn project(&self, n: u128) -> Projection {
        match project(opp_id(n), &self.world, &self.cfg) {
            Ok(p) => p,
            Err(lookups) => panic!("lookups needed: {lookups:?}"),
        }
    }
}
