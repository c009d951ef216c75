//! Scenario pieces shared by the end-to-end tests and the reliability harness: random Dynamics
//! histories and a comparable view of what Marketo holds.

use std::collections::{BTreeMap, BTreeSet};

use crate::dynamics::compose::NotificationBuilder;
use crate::dynamics::{AttributeValue, Attributes};
use crate::sim::dataverse::{ROLE_BUSINESS_PARTNER, ROLE_DECISION_MAKER, ROLE_STAKEHOLDER};
use crate::sim::marketo::MarketoSimHandle;
use crate::sim::org::{Customer, DynamicsOrg};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;

/// What Marketo holds, in comparable form: opportunities, roles by lead email, and whether the
/// companies the opportunities point at exist. (A company's display name is best effort: oppsync
/// learns it only when Dynamics sends one, so which name arrives first depends on the order.)
#[derive(Debug, Clone, PartialEq)]
pub struct MarketoView {
    pub opportunities: BTreeMap<String, BTreeMap<String, Value>>,
    pub roles: BTreeSet<(String, String, String)>,
    pub companies: BTreeMap<String, bool>,
}

pub fn view(m: &MarketoSimHandle) -> MarketoView {
    let leads = m.leads();
    let companies_all = m.companies();
    let mut opportunities = BTreeMap::new();
    let mut companies = BTreeMap::new();
    for (id, fields) in m.opportunities() {
        // Marketo's own bookkeeping differs between instances.
        let kept: BTreeMap<String, Value> = fields
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), "marketoGUID" | "createdAt" | "updatedAt" | "seq"))
            .collect();
        if let Some(company) = kept.get("externalCompanyId").and_then(Value::as_str) {
            companies.insert(company.to_owned(), companies_all.contains_key(company));
        }
        opportunities.insert(id, kept);
    }
    let roles = m
        .roles()
        .into_iter()
        .map(|(opp, lead, role)| {
            let email = leads
                .get(&lead)
                .and_then(|l| l.get("email"))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            (opp, email, role)
        })
        .collect();
    MarketoView {
        opportunities,
        roles,
        companies,
    }
}

/// A random but plausible history of changes in one Dynamics org.
pub fn history(seed: u64, org: &mut DynamicsOrg) -> Vec<NotificationBuilder> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let accounts: Vec<(Uuid, String)> = (0..3).map(|i| (Uuid::new_v4(), format!("Account {i}"))).collect();
    let mut contacts = Vec::new();
    for i in 0..5 {
        let parent = if rng.random_bool(0.6) {
            let (id, name) = &accounts[rng.random_range(0..accounts.len())];
            Some((*id, name.as_str()))
        } else {
            None
        };
        let (c, n) = org.create_contact(
            &format!("C{i}"),
            "Person",
            &format!("c{i}-{seed}@example.com"),
            parent,
        );
        contacts.push(c);
        out.push(n);
    }
    let mut opportunities = Vec::new();
    for i in 0..4 {
        let customer = if rng.random_bool(0.5) {
            Customer::Contact(contacts[rng.random_range(0..contacts.len())])
        } else {
            Customer::Account(accounts[rng.random_range(0..accounts.len())].0)
        };
        let (o, n) = org.create_opportunity(
            &format!("Deal {i}"),
            customer,
            Decimal::new(rng.random_range(1..1000) * 100, 0),
            10,
        );
        opportunities.push(o);
        out.push(n);
    }
    let mut stakeholders: BTreeSet<(Uuid, Uuid)> = BTreeSet::new();
    let mut deleted = false;
    for _ in 0..30 {
        let opp = opportunities[rng.random_range(0..opportunities.len())];
        let contact = contacts[rng.random_range(0..contacts.len())];
        match rng.random_range(0..10) {
            0 | 1 => {
                let mut changes = Attributes::new();
                changes.insert(
                    "estimatedvalue".into(),
                    AttributeValue::Money(Decimal::new(rng.random_range(1..1000) * 100, 0)),
                );
                changes.insert(
                    "closeprobability".into(),
                    AttributeValue::Int(rng.random_range(0..100)),
                );
                out.push(org.update_opportunity(opp, changes));
            }
            2 => {
                let customer = if rng.random_bool(0.5) {
                    Customer::Contact(contact)
                } else {
                    Customer::Account(accounts[rng.random_range(0..accounts.len())].0)
                };
                out.push(org.change_customer(opp, customer));
            }
            3 | 4 if !stakeholders.contains(&(opp, contact)) => {
                let role =
                    [ROLE_STAKEHOLDER, ROLE_DECISION_MAKER, ROLE_BUSINESS_PARTNER][rng.random_range(0..3)];
                stakeholders.insert((opp, contact));
                out.extend(if rng.random_bool(0.5) {
                    org.add_stakeholder(opp, contact, role)
                } else {
                    org.add_stakeholder_from_contact(opp, contact, role)
                });
            }
            5 if stakeholders.remove(&(opp, contact)) => out.extend(org.remove_stakeholder(opp, contact)),
            6 if stakeholders.contains(&(opp, contact)) => {
                out.extend(org.deactivate_stakeholder(opp, contact))
            }
            7 => {
                let parent = if rng.random_bool(0.7) {
                    let (id, name) = &accounts[rng.random_range(0..accounts.len())];
                    Some((*id, name.as_str()))
                } else {
                    None
                };
                out.push(org.set_contact_parent(contact, parent));
            }
            8 => out.push(org.win(opp)),
            9 if !deleted && rng.random_bool(0.3) => {
                deleted = true;
                stakeholders.retain(|(o, _)| *o != opp);
                out.extend(org.delete_opportunity(opp));
                opportunities.retain(|o| *o != opp);
            }
            _ => {}
        }
    }
    out
}

/// Contacts under accounts, opportunities (half with a contact customer), two stakeholders each
/// (three or two notifications per stakeholder, as Dynamics sends them), one update each: 7.5
/// notifications per opportunity.
pub fn bulk_workload(opportunities: usize, org: &mut DynamicsOrg) -> Vec<NotificationBuilder> {
    let mut out = Vec::new();
    let accounts: Vec<(Uuid, String)> = (0..(opportunities / 10).max(1))
        .map(|i| (Uuid::new_v4(), format!("Account {i}")))
        .collect();
    let mut contacts = Vec::new();
    for i in 0..(opportunities / 2).max(1) {
        let (id, name) = &accounts[i % accounts.len()];
        let (c, n) = org.create_contact(
            "Bulk",
            &format!("Person{i}"),
            &format!("p{i}@bulk.example"),
            Some((*id, name.as_str())),
        );
        contacts.push(c);
        out.push(n);
    }
    let mut opps = Vec::new();
    for i in 0..opportunities {
        let customer = if i % 2 == 0 {
            Customer::Contact(contacts[i % contacts.len()])
        } else {
            Customer::Account(accounts[i % accounts.len()].0)
        };
        let (o, n) = org.create_opportunity(
            &format!("Deal {i}"),
            customer,
            Decimal::new(1000 + i as i64, 0),
            20,
        );
        opps.push(o);
        out.push(n);
    }
    for (i, o) in opps.iter().enumerate() {
        out.extend(org.add_stakeholder(*o, contacts[(i * 7 + 1) % contacts.len()], ROLE_STAKEHOLDER));
        out.extend(org.add_stakeholder_from_contact(
            *o,
            contacts[(i * 13 + 3) % contacts.len()],
            ROLE_DECISION_MAKER,
        ));
    }
    for (i, o) in opps.iter().enumerate() {
        let mut changes = Attributes::new();
        changes.insert(
            "closeprobability".into(),
            AttributeValue::Int(40 + (i % 50) as i64),
        );
        out.push(org.update_opportunity(*o, changes));
    }
    out
}

/// An organisation that existed before oppsync: `opportunities` opportunities, half with a
/// contact as potential customer (under an account) and half with an account, and 1.5
/// stakeholder connections each on average (one on even, two on odd ones), as pairs of rows.
/// Returns the notifications a calm webhook history of it would have brought, in order.
pub fn existing_org(opportunities: usize, org: &mut DynamicsOrg) -> Vec<NotificationBuilder> {
    let mut out = Vec::new();
    let accounts: Vec<(Uuid, String)> = (0..(opportunities / 10).max(1))
        .map(|i| (Uuid::new_v4(), format!("Account {i}")))
        .collect();
    let mut contacts = Vec::new();
    for i in 0..(opportunities / 2).max(2) {
        let (id, name) = &accounts[i % accounts.len()];
        let parent = (i % 5 != 0).then_some((*id, name.as_str()));
        let (c, n) = org.create_contact(
            "Existing",
            &format!("Person{i}"),
            &format!("e{i}@existing.example"),
            parent,
        );
        contacts.push(c);
        out.push(n);
    }
    for i in 0..opportunities {
        let customer = if i % 2 == 0 {
            Customer::Contact(contacts[i % contacts.len()])
        } else {
            Customer::Account(accounts[i % accounts.len()].0)
        };
        let (o, n) = org.create_opportunity(
            &format!("Existing deal {i}"),
            customer,
            Decimal::new(500 + i as i64, 0),
            30,
        );
        out.push(n);
        out.extend(org.add_stakeholder(o, contacts[(i * 7 + 1) % contacts.len()], ROLE_STAKEHOLDER));
        if i % 2 == 1 {
            out.extend(org.add_stakeholder(o, contacts[(i * 13 + 3) % contacts.len()], ROLE_DECISION_MAKER));
        }
    }
    out
}
