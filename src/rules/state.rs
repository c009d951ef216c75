//! What oppsync knows of Dynamics rows, and how one event is merged into it.
//!
//! Every piece of state is a set of last-writer-wins registers (one per attribute) keyed by the
//! event's version (`modifiedon`, epoch ms), plus a delete tombstone. Merging is therefore
//! commutative, associative and idempotent: async steps may deliver in any order and any number
//! of times (DESIGN.md §3 "Order-safe", "Idempotent") and the result is the state of the newest
//! change, per field. Equal versions are broken by comparing the values' JSON, so every order
//! picks the same winner.
//!
//! Delete is final whatever its version: a Delete's version comes from `OperationCreatedOn`, a
//! different clock than the `modifiedon` of updates, so it may look older than the last update;
//! Dynamics never reuses a row id, so nothing can legitimately follow a delete.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dynamics::{
    AttributeValue, Attributes, DynamicsEvent, EntityKind, EntityRef, MessageKind, Version,
};

/// A value and the version of the change that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub value: T,
    pub version: Version,
}

impl<T: Serialize + PartialEq> Versioned<T> {
    /// Whether `candidate` should replace `self`: newer wins; on a tie the larger JSON wins, so
    /// that reorderings converge.
    fn loses_to(&self, candidate: &Versioned<T>) -> bool {
        match candidate.version.cmp(&self.version) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                candidate.value != self.value && tie_key(&candidate.value) > tie_key(&self.value)
            }
        }
    }
}

fn tie_key<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Attributes by logical name, each with its own version.
pub type VersionedAttributes = BTreeMap<String, Versioned<AttributeValue>>;

/// Merges one register; true when it changed.
fn merge_register<T: Serialize + PartialEq + Clone>(
    slot: &mut Option<Versioned<T>>,
    candidate: Versioned<T>,
) -> bool {
    match slot {
        Some(current) if !current.loses_to(&candidate) => false,
        _ => {
            *slot = Some(candidate);
            true
        }
    }
}

/// Merges `attributes` at `version` into `into`; true when any register changed.
fn merge_attributes<'a>(
    into: &mut VersionedAttributes,
    attributes: impl IntoIterator<Item = (&'a String, &'a AttributeValue)>,
    version: Version,
) -> bool {
    let mut changed = false;
    for (name, value) in attributes {
        let mut slot = into.remove(name);
        changed |= merge_register(
            &mut slot,
            Versioned {
                value: value.clone(),
                version,
            },
        );
        if let Some(v) = slot {
            into.insert(name.clone(), v);
        }
    }
    changed
}

/// The `customerid` attribute.
const CUSTOMER: &str = "customerid";

/// One opportunity, as far as oppsync knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpportunityState {
    pub id: Uuid,
    /// Every attribute received except `customerid`, each with its version.
    pub fields: VersionedAttributes,
    /// Potential customer (`customerid`), versioned like a field; `value` None when cleared.
    pub customer: Option<Versioned<Option<EntityRef>>>,
    /// True once a full row was merged: a Create, a post image or a Web API read. Until then an
    /// absent attribute means "not known" rather than "null", and the projection asks for a read.
    /// A full row is recognised by carrying `name`, `customerid` and `statecode` together: all
    /// three are set on every opportunity, and a partial Target rarely changes all three at once.
    pub seen_in_full: bool,
    /// Tombstone: version of the Delete. A deleted opportunity keeps no fields.
    pub deleted_at: Option<Version>,
}

impl OpportunityState {
    pub fn new(id: Uuid) -> Self {
        OpportunityState {
            id,
            fields: BTreeMap::new(),
            customer: None,
            seen_in_full: false,
            deleted_at: None,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// The current potential customer, if known and set.
    pub fn customer(&self) -> Option<&EntityRef> {
        self.customer.as_ref().and_then(|c| c.value.as_ref())
    }

    /// The newest version merged into this state.
    pub fn version(&self) -> Option<Version> {
        self.deleted_at.or_else(|| {
            self.fields
                .values()
                .map(|v| v.version)
                .chain(self.customer.as_ref().map(|c| c.version))
                .max()
        })
    }

    /// The statecode (0 Open, 1 Won, 2 Lost), when known.
    pub fn statecode(&self) -> Option<i32> {
        self.fields
            .get("statecode")
            .and_then(|v| v.value.as_option_value())
    }

    fn delete(&mut self, version: Version) -> bool {
        let before = self.clone();
        let at = self.deleted_at.map_or(version, |d| d.max(version));
        *self = OpportunityState {
            deleted_at: Some(at),
            ..OpportunityState::new(self.id)
        };
        *self != before
    }

    fn merge_row(&mut self, message: MessageKind, attributes: &Attributes, version: Version) -> bool {
        if self.is_deleted() {
            return false;
        }
        let mut changed = merge_attributes(
            &mut self.fields,
            attributes.iter().filter(|(name, _)| name.as_str() != CUSTOMER),
            version,
        );
        if let Some(customer) = attributes.get(CUSTOMER) {
            changed |= merge_register(
                &mut self.customer,
                Versioned {
                    value: customer.as_entity_ref().cloned(),
                    version,
                },
            );
        }
        let full = message == MessageKind::Create
            || ["name", CUSTOMER, "statecode"]
                .iter()
                .all(|a| attributes.contains_key(*a));
        if full && !self.seen_in_full {
            self.seen_in_full = true;
            changed = true;
        }
        changed
    }
}

/// The contact whose opportunity role and parent account the customer rule uses (DESIGN.md §2):
/// Some when the opportunity's `customerid` is a contact. The store indexes opportunities by it.
pub fn customer_contact(state: &OpportunityState) -> Option<Uuid> {
    state
        .customer()
        .filter(|c| c.logical_name == "contact")
        .map(|c| c.id)
}

/// Connection attributes the rules read (specs/dynamics.md §6.1); the rest is not stored. What
/// `register` asks Dynamics to send and the Web API client selects follow this list.
pub const CONNECTION_ATTRIBUTES: &[&str] = &[
    "record1id",
    "record2id",
    "record1roleid",
    "record2roleid",
    "statecode",
];

/// One connection row (either of the forward/reciprocal pair), normalised to the opportunity
/// and contact it links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionState {
    pub id: Uuid,
    /// The attributes of [`CONNECTION_ATTRIBUTES`], each with its version.
    pub attributes: VersionedAttributes,
    /// The side that is an opportunity, whichever of record1/record2 it is.
    pub opportunity_id: Option<Uuid>,
    /// The other side, when it is a contact.
    pub contact_id: Option<Uuid>,
    /// The role on the contact's side (`record2roleid` when record2 is the contact,
    /// `record1roleid` when record1 is).
    pub role_id: Option<Uuid>,
    /// statecode 0 (or not yet known); 1 is Inactive.
    pub active: bool,
    pub deleted_at: Option<Version>,
    /// The newest version merged (the Delete's once deleted).
    pub version: Version,
}

impl ConnectionState {
    pub fn new(id: Uuid) -> Self {
        ConnectionState {
            id,
            attributes: BTreeMap::new(),
            opportunity_id: None,
            contact_id: None,
            role_id: None,
            active: false,
            deleted_at: None,
            version: Version::MIN,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    fn reference(&self, name: &str) -> Option<&EntityRef> {
        self.attributes.get(name).and_then(|v| v.value.as_entity_ref())
    }

    fn normalise(&mut self) {
        let side = |n: &str| self.reference(n).map(|r| (r.logical_name.clone(), r.id));
        let (one, two) = (side("record1id"), side("record2id"));
        let opportunity_id = [&one, &two]
            .into_iter()
            .flatten()
            .find(|(kind, _)| kind == "opportunity")
            .map(|(_, id)| *id);
        let contact_side = match (&one, &two) {
            (Some((a, _)), Some((b, id))) if a == "opportunity" && b == "contact" => {
                Some((*id, "record2roleid"))
            }
            (Some((a, id)), Some((b, _))) if a == "contact" && b == "opportunity" => {
                Some((*id, "record1roleid"))
            }
            _ => None,
        };
        let role_id = contact_side.and_then(|(_, role)| self.reference(role).map(|r| r.id));
        self.opportunity_id = opportunity_id;
        self.contact_id = contact_side.map(|(id, _)| id);
        self.role_id = role_id;
        self.active = self
            .attributes
            .get("statecode")
            .and_then(|v| v.value.as_option_value())
            .is_none_or(|s| s == 0);
    }

    fn delete(&mut self, version: Version) -> bool {
        let before = self.clone();
        let at = self.deleted_at.map_or(version, |d| d.max(version));
        *self = ConnectionState {
            deleted_at: Some(at),
            version: at,
            ..ConnectionState::new(self.id)
        };
        *self != before
    }

    fn merge_row(&mut self, attributes: &Attributes, version: Version) -> bool {
        if self.is_deleted() {
            return false;
        }
        let before = self.clone();
        merge_attributes(
            &mut self.attributes,
            attributes
                .iter()
                .filter(|(name, _)| CONNECTION_ATTRIBUTES.contains(&name.as_str())),
            version,
        );
        self.version = self.version.max(version);
        self.normalise();
        *self != before
    }

    /// Whether this connection currently links an opportunity and a contact.
    pub fn links_contact(&self) -> bool {
        !self.is_deleted() && self.active && self.opportunity_id.is_some() && self.contact_id.is_some()
    }
}

/// The opportunity a stored connection concerns (for the store's index).
pub fn connection_opportunity(state: &ConnectionState) -> Option<Uuid> {
    state.opportunity_id
}

/// Contact attributes the rules read (specs/dynamics.md §7.1). `merged` marks the losing
/// contact of a merge. What `register` asks Dynamics to send and the Web API client selects
/// follow this list.
pub const CONTACT_ATTRIBUTES: &[&str] = &[
    "parentcustomerid",
    "emailaddress1",
    "firstname",
    "lastname",
    "merged",
];

/// What oppsync knows of a contact: its parent account (the company of opportunities whose
/// potential customer it is) and what lead matching needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactState {
    pub id: Uuid,
    /// The attributes of [`CONTACT_ATTRIBUTES`], each with its version. An absent one is unknown.
    pub attributes: VersionedAttributes,
    /// `parentcustomerid`, only when it is an account.
    pub parent_account: Option<EntityRef>,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    /// The newest version merged.
    pub version: Version,
    /// Tombstone: the contact was deleted in Dynamics (its Delete notification, or merged into
    /// another contact). It then has no roles; Dynamics never reuses a row id, so nothing
    /// brings it back.
    #[serde(default)]
    pub deleted_at: Option<Version>,
    /// The last Web API read found no such contact (its Delete notification may not have come,
    /// or no Delete step is registered): a role for it cannot be pushed, and says why.
    #[serde(default)]
    pub not_found: bool,
}

impl ContactState {
    pub fn new(id: Uuid) -> Self {
        ContactState {
            id,
            attributes: BTreeMap::new(),
            parent_account: None,
            email: None,
            first_name: None,
            last_name: None,
            version: Version::MIN,
            deleted_at: None,
            not_found: false,
        }
    }

    /// A contact a Web API read did not find: a full row of nulls, marked not found.
    pub fn not_found(id: Uuid) -> Self {
        let mut contact = ContactState::from_row(id, &Attributes::new(), Version::MIN);
        contact.not_found = true;
        contact
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    fn delete(&mut self, version: Version) -> bool {
        let before = self.clone();
        self.deleted_at = Some(self.deleted_at.map_or(version, |d| d.max(version)));
        *self != before
    }

    /// A contact from a full row (a Web API read converted to webhook logical names, with
    /// `parentcustomerid` as an entity reference) at its `modifiedon`: attributes the row
    /// lacks are null.
    pub fn from_row(id: Uuid, row: &Attributes, version: Version) -> Self {
        let mut contact = ContactState::new(id);
        contact.merge_row(row, version, true);
        contact
    }

    /// True when the parent account and email are known (possibly as null), so the customer rule
    /// and lead matching need no read.
    pub fn is_complete(&self) -> bool {
        self.is_deleted()
            || ["parentcustomerid", "emailaddress1"]
                .iter()
                .all(|a| self.attributes.contains_key(*a))
    }

    /// Merges another view of the same contact (e.g. a fresh Web API read); newer fields win.
    /// True when something changed.
    pub fn merge(&mut self, other: &ContactState) -> bool {
        let before = self.clone();
        for (name, value) in &other.attributes {
            let mut slot = self.attributes.remove(name);
            merge_register(&mut slot, value.clone());
            if let Some(v) = slot {
                self.attributes.insert(name.clone(), v);
            }
        }
        self.version = self.version.max(other.version);
        if let Some(at) = other.deleted_at {
            self.delete(at);
        }
        // The newer view tells whether Dataverse has the row.
        self.not_found = other.not_found;
        self.derive();
        *self != before
    }

    fn merge_row(&mut self, attributes: &Attributes, version: Version, full: bool) -> bool {
        let before = self.clone();
        let null = AttributeValue::Null;
        let mut row: Vec<(&String, &AttributeValue)> = attributes
            .iter()
            .filter(|(name, _)| CONTACT_ATTRIBUTES.contains(&name.as_str()))
            .collect();
        let missing: Vec<String> = if full {
            CONTACT_ATTRIBUTES
                .iter()
                .filter(|a| !attributes.contains_key(**a))
                .map(|a| (*a).to_owned())
                .collect()
        } else {
            Vec::new()
        };
        row.extend(missing.iter().map(|name| (name, &null)));
        merge_attributes(&mut self.attributes, row, version);
        self.version = self.version.max(version);
        self.not_found = false;
        // The losing contact of a merge is deactivated and flagged `merged`: it is gone as a
        // person, like a deleted one.
        if attributes.get("merged").and_then(AttributeValue::as_bool) == Some(true) {
            self.delete(version);
        }
        self.derive();
        *self != before
    }

    fn derive(&mut self) {
        let text = |name: &str| {
            self.attributes
                .get(name)
                .and_then(|v| v.value.as_str())
                .map(str::to_owned)
        };
        self.parent_account = self
            .attributes
            .get("parentcustomerid")
            .and_then(|v| v.value.as_entity_ref())
            .filter(|r| r.logical_name == "account")
            .cloned();
        self.email = text("emailaddress1");
        self.first_name = text("firstname");
        self.last_name = text("lastname");
    }
}

/// Account attributes the rules read: the name, which is the Marketo company's name.
pub const ACCOUNT_ATTRIBUTES: &[&str] = &[ACCOUNT_NAME];
const ACCOUNT_NAME: &str = "name";

/// Attributes of the rules' lists that are lookups (an `EntityReference` on the wire), which
/// the Web API names `_x_value`.
pub const LOOKUP_ATTRIBUTES: &[&str] = &[
    "record1id",
    "record2id",
    "record1roleid",
    "record2roleid",
    "parentcustomerid",
];

/// What oppsync knows of an account: its name, which is the Marketo company's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    pub id: Uuid,
    /// The name with the version that set it (None inside: the account has no name, or a read
    /// found no such account). None until known.
    pub name: Option<Versioned<Option<String>>>,
    /// True once a projection made this account a Marketo company: a rename is then pushed to
    /// the company. Accounts no opportunity uses are not written to Marketo.
    #[serde(default)]
    pub in_marketo: bool,
}

impl AccountState {
    pub fn new(id: Uuid) -> Self {
        AccountState {
            id,
            name: None,
            in_marketo: false,
        }
    }

    /// The known name (outer None: not known yet).
    pub fn known_name(&self) -> Option<Option<&str>> {
        self.name.as_ref().map(|n| n.value.as_deref())
    }

    /// Merges a name seen at `version`; true when it changed.
    pub fn merge_name(&mut self, name: Option<String>, version: Version) -> bool {
        merge_register(&mut self.name, Versioned { value: name, version })
    }
}

/// A connection role (`connectionrole`), looked up once and cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRoleInfo {
    pub id: Uuid,
    pub name: String,
    pub category: i32,
}

/// The slice of known state the worker loads for one event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub opportunities: BTreeMap<Uuid, OpportunityState>,
    pub connections: BTreeMap<Uuid, ConnectionState>,
    pub contacts: BTreeMap<Uuid, ContactState>,
    pub roles: BTreeMap<Uuid, ConnectionRoleInfo>,
    #[serde(default)]
    pub accounts: BTreeMap<Uuid, AccountState>,
}

impl World {
    /// Merges a contact read from the Web API; returns the opportunities of this world whose
    /// projection may change because of it (empty when nothing changed).
    pub fn merge_contact(&mut self, contact: &ContactState) -> BTreeSet<Uuid> {
        let changed = self
            .contacts
            .entry(contact.id)
            .or_insert_with(|| ContactState::new(contact.id))
            .merge(contact);
        if changed {
            self.opportunities_of_contact(contact.id)
        } else {
            BTreeSet::new()
        }
    }

    /// Opportunities in this world that give `contact` a role: as potential customer or through
    /// a connection.
    fn opportunities_of_contact(&self, contact: Uuid) -> BTreeSet<Uuid> {
        let as_customer = self
            .opportunities
            .values()
            .filter(|o| customer_contact(o) == Some(contact))
            .map(|o| o.id);
        let as_stakeholder = self
            .connections
            .values()
            .filter(|c| c.contact_id == Some(contact))
            .filter_map(|c| c.opportunity_id);
        as_customer.chain(as_stakeholder).collect()
    }
}

/// What [`apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Applied {
    /// Opportunities whose projection may have changed: project and plan these.
    pub opportunities: BTreeSet<Uuid>,
    /// Opportunity states that changed (to be stored).
    pub opportunities_changed: BTreeSet<Uuid>,
    /// Connection states that changed (to be stored).
    pub connections_changed: BTreeSet<Uuid>,
    /// Contact states that changed (to be stored).
    pub contacts_changed: BTreeSet<Uuid>,
    /// Account states that changed (to be stored).
    pub accounts_changed: BTreeSet<Uuid>,
    /// Marketo companies whose name changed (an account already in Marketo was renamed).
    pub companies: BTreeSet<Uuid>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        *self == Applied::default()
    }
}

/// The event came without its row (payload over 256 KB, specs/dynamics.md §0.5): read the row
/// through the Web API, put it in `attributes`, clear `data_missing` and apply again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {} {id} arrived without its data (payload over 256 KB); read the row", entity.logical_name())]
pub struct NeedsRow {
    pub entity: EntityKind,
    pub id: Uuid,
}

/// Merges one event into `world`: order-independent and idempotent (see the module comment).
/// Attributes use webhook logical names (`customerid`, `parentcustomerid` as entity references).
/// A contact Delete leaves a tombstone (the contact loses its roles); an account Update
/// changes the name of the company.
pub fn apply(world: &mut World, event: &DynamicsEvent) -> Result<Applied, NeedsRow> {
    if event.data_missing && event.message != MessageKind::Delete {
        return Err(NeedsRow {
            entity: event.entity,
            id: event.record_id,
        });
    }
    let mut applied = Applied::default();
    let id = event.record_id;
    match event.entity {
        EntityKind::Opportunity => {
            let state = world
                .opportunities
                .entry(id)
                .or_insert_with(|| OpportunityState::new(id));
            let changed = match event.message {
                MessageKind::Delete => state.delete(event.version),
                message => state.merge_row(message, &event.attributes, event.version),
            };
            if changed {
                applied.opportunities.insert(id);
                applied.opportunities_changed.insert(id);
            }
        }
        EntityKind::Connection => {
            let state = world
                .connections
                .entry(id)
                .or_insert_with(|| ConnectionState::new(id));
            let before = state.opportunity_id;
            let changed = match event.message {
                MessageKind::Delete => state.delete(event.version),
                _ => state.merge_row(&event.attributes, event.version),
            };
            if changed {
                applied.connections_changed.insert(id);
                applied
                    .opportunities
                    .extend(before.into_iter().chain(state.opportunity_id));
                if event.message == MessageKind::Delete {
                    applied.opportunities.extend(event_opportunity(event));
                }
            }
        }
        EntityKind::Contact => {
            let contact = world.contacts.entry(id).or_insert_with(|| ContactState::new(id));
            let changed = if event.message == MessageKind::Delete {
                contact.delete(event.version)
            } else if contact.is_deleted() {
                false
            } else {
                contact.merge_row(
                    &event.attributes,
                    event.version,
                    event.message == MessageKind::Create,
                )
            };
            if changed {
                applied.contacts_changed.insert(id);
                applied.opportunities = world.opportunities_of_contact(id);
            }
        }
        EntityKind::Account => {
            // Only the name is read; an Update that does not carry it changes nothing.
            let Some(name) = event.attributes.get(ACCOUNT_NAME) else {
                return Ok(applied);
            };
            let account = world.accounts.entry(id).or_insert_with(|| AccountState::new(id));
            if account.merge_name(name.as_str().map(str::to_owned), event.version) {
                applied.accounts_changed.insert(id);
                if account.in_marketo {
                    applied.companies.insert(id);
                }
            }
        }
    }
    Ok(applied)
}

/// The opportunity an event concerns, so the worker can load its slice before [`apply`]: the
/// record itself for an opportunity; for a connection the side that is an opportunity, from the
/// attributes or else the pre image (a Delete carries the row there). None for a contact, or for
/// a connection event that names neither side (a partial Update without images: look the
/// connection up by id instead).
pub fn event_opportunity(event: &DynamicsEvent) -> Option<Uuid> {
    match event.entity {
        EntityKind::Opportunity => Some(event.record_id),
        EntityKind::Contact | EntityKind::Account => None,
        EntityKind::Connection => [&event.attributes, &event.pre_image]
            .into_iter()
            .flat_map(|a| [a.get("record1id"), a.get("record2id")])
            .flatten()
            .filter_map(AttributeValue::as_entity_ref)
            .find(|r| r.logical_name == "opportunity")
            .map(|r| r.id),
    }
}

/// A synthetic event for a full row read through the Web API (after [`NeedsRow`], or a re-sync):
/// `attributes` in webhook logical names (lookups as entity references, nulls explicit),
/// `version` the row's `modifiedon`.
pub fn full_row_event(
    entity: EntityKind,
    id: Uuid,
    version: Version,
    attributes: Attributes,
) -> DynamicsEvent {
    DynamicsEvent {
        entity,
        message: MessageKind::Update,
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
