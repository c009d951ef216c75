//! A scripted Dynamics organisation: domain operations ("add a stakeholder", "win the
//! opportunity") turned into the webhook notifications Dynamics would send for them, with the
//! images `oppsync register` asks for, and the same rows kept in the Dataverse simulator so the
//! Web API reads oppsync makes see what Dynamics holds.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::dynamics::compose::{NotificationBuilder, datetime_from_ms, reference};
use crate::dynamics::{AttributeValue, Attributes, EntityRef, Version};
use crate::sim::dataverse::{ConnectionFixture, ContactFixture, DataverseSimHandle};

/// The potential customer of an opportunity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Customer {
    Contact(Uuid),
    Account(Uuid),
}

impl Customer {
    fn reference(self) -> AttributeValue {
        match self {
            Customer::Contact(id) => reference("contact", id),
            Customer::Account(id) => reference("account", id),
        }
    }
}

struct ConnectionPair {
    master: Uuid,
    reciprocal: Uuid,
    opportunity: Uuid,
    contact: Uuid,
    role: Uuid,
}

/// The org's rows and clock. Every operation returns the notifications, in the order Dynamics
/// would send them.
pub struct DynamicsOrg {
    clock: Version,
    dataverse: Vec<DataverseSimHandle>,
    opportunities: BTreeMap<Uuid, Attributes>,
    contacts: BTreeMap<Uuid, Attributes>,
    connections: Vec<ConnectionPair>,
}

const IMAGE: &str = "PostImage";

impl DynamicsOrg {
    /// An org whose clock starts at `start_ms`; rows are mirrored into `dataverse` if given.
    pub fn new(start_ms: Version, dataverse: Option<DataverseSimHandle>) -> DynamicsOrg {
        DynamicsOrg {
            clock: start_ms,
            dataverse: dataverse.into_iter().collect(),
            opportunities: BTreeMap::new(),
            contacts: BTreeMap::new(),
            connections: Vec::new(),
        }
    }

    /// Also keeps the rows in another Dataverse simulator (two services fed the same history).
    pub fn mirror_to(&mut self, dataverse: DataverseSimHandle) {
        self.dataverse.push(dataverse);
    }

    fn tick(&mut self) -> Version {
        self.clock += 1000;
        self.clock
    }

    pub fn now(&self) -> Version {
        self.clock
    }

    pub fn create_contact(
        &mut self,
        first: &str,
        last: &str,
        email: &str,
        parent_account: Option<(Uuid, &str)>,
    ) -> (Uuid, NotificationBuilder) {
        let id = Uuid::new_v4();
        let v = self.tick();
        let mut a = Attributes::new();
        a.insert("contactid".into(), AttributeValue::String(id.to_string()));
        a.insert("firstname".into(), AttributeValue::String(first.into()));
        a.insert("lastname".into(), AttributeValue::String(last.into()));
        a.insert(
            "fullname".into(),
            AttributeValue::String(format!("{first} {last}")),
        );
        a.insert("emailaddress1".into(), AttributeValue::String(email.into()));
        a.insert("parentcustomerid".into(), parent_value(parent_account));
        a.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        self.contacts.insert(id, a.clone());
        self.mirror_contact(id, v);
        let n = NotificationBuilder::contact_create(id, v)
            .attrs(a.clone())
            .post_image(IMAGE, a);
        (id, n)
    }

    /// The contact moves to another account (or to none).
    pub fn set_contact_parent(
        &mut self,
        contact: Uuid,
        parent_account: Option<(Uuid, &str)>,
    ) -> NotificationBuilder {
        let v = self.tick();
        let row = self.contacts.entry(contact).or_default();
        row.insert("parentcustomerid".into(), parent_value(parent_account));
        row.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        let full = row.clone();
        self.mirror_contact(contact, v);
        NotificationBuilder::contact_update(contact, v)
            .attr("parentcustomerid", parent_value(parent_account))
            .post_image(IMAGE, full)
    }

    pub fn create_opportunity(
        &mut self,
        name: &str,
        customer: Customer,
        estimated_value: Decimal,
        close_probability: i64,
    ) -> (Uuid, NotificationBuilder) {
        let id = Uuid::new_v4();
        let v = self.tick();
        let mut a = Attributes::new();
        a.insert("opportunityid".into(), AttributeValue::String(id.to_string()));
        a.insert("name".into(), AttributeValue::String(name.into()));
        a.insert("customerid".into(), customer.reference());
        a.insert("estimatedvalue".into(), AttributeValue::Money(estimated_value));
        a.insert("closeprobability".into(), AttributeValue::Int(close_probability));
        a.insert("description".into(), AttributeValue::Null);
        a.insert("estimatedclosedate".into(), AttributeValue::Null);
        a.insert("statecode".into(), AttributeValue::OptionSet(0));
        a.insert("statuscode".into(), AttributeValue::OptionSet(1));
        a.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        self.opportunities.insert(id, a.clone());
        self.mirror_opportunity(id);
        let n = NotificationBuilder::opportunity_create(id, v)
            .attrs(a.clone())
            .post_image(IMAGE, a);
        (id, n)
    }

    /// An update of some columns: Target holds only those (plus the key and `modifiedon`),
    /// the post image the whole row after the change.
    pub fn update_opportunity(&mut self, id: Uuid, changes: Attributes) -> NotificationBuilder {
        let v = self.tick();
        self.update_opportunity_at(id, changes, v)
    }

    fn update_opportunity_at(&mut self, id: Uuid, changes: Attributes, v: Version) -> NotificationBuilder {
        let row = self.opportunities.entry(id).or_default();
        for (k, val) in &changes {
            row.insert(k.clone(), val.clone());
        }
        row.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        let full = row.clone();
        self.mirror_opportunity(id);
        NotificationBuilder::opportunity_update(id, v)
            .attrs(changes)
            .attr("opportunityid", AttributeValue::String(id.to_string()))
            .post_image(IMAGE, full)
    }

    pub fn change_customer(&mut self, id: Uuid, customer: Customer) -> NotificationBuilder {
        let mut changes = Attributes::new();
        changes.insert("customerid".into(), customer.reference());
        self.update_opportunity(id, changes)
    }

    /// Close as won (statecode 1, statuscode 3): arrives as an Update of statecode.
    pub fn win(&mut self, id: Uuid) -> NotificationBuilder {
        let mut changes = Attributes::new();
        changes.insert("statecode".into(), AttributeValue::OptionSet(1));
        changes.insert("statuscode".into(), AttributeValue::OptionSet(3));
        self.update_opportunity(id, changes)
    }

    /// Closes the opportunity as Dynamics does, through the `Win` (or `Lose`) message with the
    /// status reason, actual revenue and close date. Returns the Win/Lose notification and the
    /// Update notification the same close makes if Dynamics also runs Update steps for it
    /// (unknown, specs/dynamics.md addendum): deliver either or both, in any order.
    pub fn close(
        &mut self,
        id: Uuid,
        won: bool,
        status: i32,
        actual_value: Decimal,
    ) -> (NotificationBuilder, NotificationBuilder) {
        let v = self.tick();
        // DateOnly: the close date is midnight UTC of the day.
        let day_ms = v - v.rem_euclid(86_400_000);
        let close =
            NotificationBuilder::opportunity_close(id, v, won, status, Some(actual_value), Some(day_ms));
        let mut changes = Attributes::new();
        changes.insert(
            "statecode".into(),
            AttributeValue::OptionSet(if won { 1 } else { 2 }),
        );
        changes.insert("statuscode".into(), AttributeValue::OptionSet(status));
        changes.insert("actualvalue".into(), AttributeValue::Money(actual_value));
        changes.insert(
            "actualclosedate".into(),
            AttributeValue::DateTime(datetime_from_ms(day_ms)),
        );
        let update = self.update_opportunity_at(id, changes, v);
        (close, update)
    }

    /// Re-opens a closed opportunity (statecode 0, status reason 1 In Progress) through an
    /// Update, as current Dataverse routes SetState.
    pub fn reopen(&mut self, id: Uuid) -> NotificationBuilder {
        let mut changes = Attributes::new();
        changes.insert("statecode".into(), AttributeValue::OptionSet(0));
        changes.insert("statuscode".into(), AttributeValue::OptionSet(1));
        self.update_opportunity(id, changes)
    }

    /// A state change through `SetStateDynamicEntity` (or `SetState`), as older organisations
    /// send it.
    pub fn set_state(
        &mut self,
        id: Uuid,
        dynamic_entity: bool,
        state: i32,
        status: i32,
    ) -> NotificationBuilder {
        let v = self.tick();
        let row = self.opportunities.entry(id).or_default();
        row.insert("statecode".into(), AttributeValue::OptionSet(state));
        row.insert("statuscode".into(), AttributeValue::OptionSet(status));
        row.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        self.mirror_opportunity(id);
        NotificationBuilder::opportunity_set_state(id, v, dynamic_entity, state, status)
    }

    /// An account as Dataverse holds it (no notification: oppsync reads accounts it needs).
    pub fn put_account(&mut self, id: Uuid, name: &str) {
        let v = self.tick();
        for dv in &self.dataverse {
            dv.put_account(id, name, datetime_from_ms(v));
        }
    }

    /// The account is renamed: the account Update step (filtered on `name`) fires.
    pub fn rename_account(&mut self, id: Uuid, name: &str) -> NotificationBuilder {
        let v = self.tick();
        for dv in &self.dataverse {
            dv.put_account(id, name, datetime_from_ms(v));
        }
        let mut image = Attributes::new();
        image.insert("accountid".into(), AttributeValue::String(id.to_string()));
        image.insert("name".into(), AttributeValue::String(name.into()));
        image.insert("modifiedon".into(), AttributeValue::DateTime(datetime_from_ms(v)));
        NotificationBuilder::account_update(id, v)
            .attr("name", AttributeValue::String(name.into()))
            .post_image(IMAGE, image)
    }

    /// The contact is deleted (the contact Delete step fires).
    pub fn delete_contact(&mut self, id: Uuid) -> NotificationBuilder {
        let v = self.tick();
        self.contacts.remove(&id);
        for dv in &self.dataverse {
            dv.remove_contact(id);
        }
        NotificationBuilder::contact_delete(id, v)
    }

    pub fn delete_opportunity(&mut self, id: Uuid) -> Vec<NotificationBuilder> {
        let v = self.tick();
        let pre = self.opportunities.remove(&id).unwrap_or_default();
        for dv in &self.dataverse {
            dv.remove_opportunity(id);
        }
        let mut out = Vec::new();
        // Dynamics cascade-deletes the opportunity's connections (specs/dynamics.md §6.1).
        let pairs: Vec<usize> = self
            .connections
            .iter()
            .enumerate()
            .filter(|(_, c)| c.opportunity == id)
            .map(|(i, _)| i)
            .collect();
        for i in pairs.into_iter().rev() {
            let pair = self.connections.remove(i);
            out.extend(self.connection_deletes(&pair, v));
        }
        out.insert(
            0,
            NotificationBuilder::opportunity_delete(id, v).pre_image("PreImage", pre),
        );
        out
    }

    /// A stakeholder added from the opportunity's subgrid: the master row's Create, the
    /// reciprocal row's Create, then the Update back-filling `relatedconnectionid` (§6.2).
    pub fn add_stakeholder(
        &mut self,
        opportunity: Uuid,
        contact: Uuid,
        role: Uuid,
    ) -> Vec<NotificationBuilder> {
        let v = self.tick();
        let master = Uuid::new_v4();
        let reciprocal = Uuid::new_v4();
        let master_attrs = connection_row(master, opportunity, contact, role, true, reciprocal, 0);
        let recip_attrs = connection_row(reciprocal, opportunity, contact, role, false, master, 0);
        let first = {
            let mut a = master_attrs.clone();
            a.insert("relatedconnectionid".into(), reference("connection", master));
            a
        };
        let out = vec![
            NotificationBuilder::connection_create(master, v)
                .attrs(first.clone())
                .post_image(IMAGE, first),
            NotificationBuilder::connection_create(reciprocal, v)
                .attrs(recip_attrs.clone())
                .post_image(IMAGE, recip_attrs),
            NotificationBuilder::connection_update(master, v + 1)
                .attr("relatedconnectionid", reference("connection", reciprocal))
                .post_image(IMAGE, master_attrs),
        ];
        self.clock = v + 1;
        for dv in &self.dataverse {
            for (id, r1, r2, r1role, r2role) in [
                (
                    master,
                    reference_of("opportunity", opportunity),
                    reference_of("contact", contact),
                    None,
                    Some(role),
                ),
                (
                    reciprocal,
                    reference_of("contact", contact),
                    reference_of("opportunity", opportunity),
                    Some(role),
                    None,
                ),
            ] {
                dv.put_connection(ConnectionFixture {
                    id,
                    record1: r1,
                    record2: r2,
                    record1_role: r1role,
                    record2_role: r2role,
                    state: 0,
                    modified_on: datetime_from_ms(v),
                });
            }
        }
        self.connections.push(ConnectionPair {
            master,
            reciprocal,
            opportunity,
            contact,
            role,
        });
        out
    }

    /// The stakeholder added from the contact's side: record1 = contact (the master row).
    pub fn add_stakeholder_from_contact(
        &mut self,
        opportunity: Uuid,
        contact: Uuid,
        role: Uuid,
    ) -> Vec<NotificationBuilder> {
        let v = self.tick();
        let master = Uuid::new_v4();
        let reciprocal = Uuid::new_v4();
        let mut master_attrs = connection_row(master, opportunity, contact, role, false, reciprocal, 0);
        master_attrs.insert("ismaster".into(), AttributeValue::Bool(true));
        let mut recip_attrs = connection_row(reciprocal, opportunity, contact, role, true, master, 0);
        recip_attrs.insert("ismaster".into(), AttributeValue::Bool(false));
        self.clock = v + 1;
        self.connections.push(ConnectionPair {
            master,
            reciprocal,
            opportunity,
            contact,
            role,
        });
        vec![
            NotificationBuilder::connection_create(master, v)
                .attrs(master_attrs.clone())
                .post_image(IMAGE, master_attrs),
            NotificationBuilder::connection_create(reciprocal, v)
                .attrs(recip_attrs.clone())
                .post_image(IMAGE, recip_attrs),
        ]
    }

    /// The stakeholder removed: both rows are deleted.
    pub fn remove_stakeholder(&mut self, opportunity: Uuid, contact: Uuid) -> Vec<NotificationBuilder> {
        let v = self.tick();
        let Some(i) = self
            .connections
            .iter()
            .position(|c| c.opportunity == opportunity && c.contact == contact)
        else {
            return Vec::new();
        };
        let pair = self.connections.remove(i);
        self.connection_deletes(&pair, v)
    }

    /// The stakeholder deactivated (statecode 1) instead of deleted.
    pub fn deactivate_stakeholder(&mut self, opportunity: Uuid, contact: Uuid) -> Vec<NotificationBuilder> {
        let v = self.tick();
        let Some(pair) = self
            .connections
            .iter()
            .find(|c| c.opportunity == opportunity && c.contact == contact)
        else {
            return Vec::new();
        };
        [
            (pair.master, true, pair.reciprocal),
            (pair.reciprocal, false, pair.master),
        ]
        .into_iter()
        .map(|(id, master_side, other)| {
            let attrs = connection_row(
                id,
                pair.opportunity,
                pair.contact,
                pair.role,
                master_side,
                other,
                1,
            );
            NotificationBuilder::connection_update(id, v)
                .attr("statecode", AttributeValue::OptionSet(1))
                .attr("statuscode", AttributeValue::OptionSet(2))
                .post_image(IMAGE, attrs)
        })
        .collect()
    }

    fn connection_deletes(&self, pair: &ConnectionPair, v: Version) -> Vec<NotificationBuilder> {
        for dv in &self.dataverse {
            dv.remove_connection(pair.master);
            dv.remove_connection(pair.reciprocal);
        }
        [
            (pair.master, true, pair.reciprocal),
            (pair.reciprocal, false, pair.master),
        ]
        .into_iter()
        .map(|(id, master_side, other)| {
            let pre = connection_row(
                id,
                pair.opportunity,
                pair.contact,
                pair.role,
                master_side,
                other,
                0,
            );
            NotificationBuilder::connection_delete(id, v).pre_image("PreImage", pre)
        })
        .collect()
    }

    fn mirror_contact(&self, id: Uuid, v: Version) {
        let Some(row) = self.contacts.get(&id) else { return };
        let text = |k: &str| row.get(k).and_then(AttributeValue::as_str).map(str::to_owned);
        let fixture = ContactFixture {
            id,
            first_name: text("firstname"),
            last_name: text("lastname"),
            full_name: text("fullname"),
            email: text("emailaddress1"),
            parent: row
                .get("parentcustomerid")
                .and_then(AttributeValue::as_entity_ref)
                .cloned(),
            modified_on: datetime_from_ms(v),
        };
        for dv in &self.dataverse {
            dv.put_contact(fixture.clone());
        }
    }

    fn mirror_opportunity(&self, id: Uuid) {
        if let Some(row) = self.opportunities.get(&id) {
            for dv in &self.dataverse {
                dv.put_opportunity(id, row.clone());
            }
        }
    }
}

fn parent_value(parent: Option<(Uuid, &str)>) -> AttributeValue {
    match parent {
        Some((id, name)) => AttributeValue::EntityReference(EntityRef {
            logical_name: "account".into(),
            id,
            name: Some(name.into()),
        }),
        None => AttributeValue::Null,
    }
}

fn reference_of(logical_name: &str, id: Uuid) -> EntityRef {
    EntityRef {
        logical_name: logical_name.into(),
        id,
        name: None,
    }
}

/// One connection row. `opportunity_first`: record1 is the opportunity (the role sits on
/// record2, the contact's side); otherwise record1 is the contact and carries the role.
fn connection_row(
    id: Uuid,
    opportunity: Uuid,
    contact: Uuid,
    role: Uuid,
    opportunity_first: bool,
    related: Uuid,
    state: i32,
) -> Attributes {
    let mut a = Attributes::new();
    a.insert("connectionid".into(), AttributeValue::String(id.to_string()));
    let (r1, r2) = if opportunity_first {
        (
            reference("opportunity", opportunity),
            reference("contact", contact),
        )
    } else {
        (
            reference("contact", contact),
            reference("opportunity", opportunity),
        )
    };
    a.insert("record1id".into(), r1);
    a.insert("record2id".into(), r2);
    if opportunity_first {
        a.insert("record2roleid".into(), reference("connectionrole", role));
        a.insert("record1roleid".into(), AttributeValue::Null);
    } else {
        a.insert("record1roleid".into(), reference("connectionrole", role));
        a.insert("record2roleid".into(), AttributeValue::Null);
    }
    a.insert("relatedconnectionid".into(), reference("connection", related));
    a.insert("ismaster".into(), AttributeValue::Bool(opportunity_first));
    a.insert("statecode".into(), AttributeValue::OptionSet(state));
    a.insert(
        "statuscode".into(),
        AttributeValue::OptionSet(if state == 0 { 1 } else { 2 }),
    );
    a
}
