//! Acceptance property (DESIGN.md §3 "Order-safe", "Idempotent"): a history of changes, delivered
//! in any order with any repetitions, ends in the same world, the same projections and the same
//! Marketo as delivering it in order.

use proptest::prelude::*;

use super::*;

const OPPORTUNITIES: u128 = 3;
const CONTACTS: u128 = 3;

/// One change in Dynamics (its version is its place in the history).
#[derive(Debug, Clone)]
enum Change {
    OpportunityCreate {
        opp: u128,
        customer: Customer,
        amount: i64,
    },
    MappedUpdate {
        opp: u128,
        amount: i64,
    },
    DescriptionCleared {
        opp: u128,
    },
    UnmappedUpdate {
        opp: u128,
        step: i64,
    },
    NewCustomer {
        opp: u128,
        customer: Customer,
    },
    Close {
        opp: u128,
        statecode: i32,
    },
    OpportunityDelete {
        opp: u128,
    },
    /// A connection row between an opportunity and a contact, from either side.
    ConnectionCreate {
        conn: u128,
        opp: u128,
        contact: u128,
        role: u8,
        from_contact: bool,
    },
    /// A connection to something that is not a contact.
    ConnectionToUser {
        conn: u128,
        opp: u128,
    },
    ConnectionState {
        conn: u128,
        statecode: i32,
    },
    ConnectionDelete {
        conn: u128,
    },
    ContactParent {
        contact: u128,
        parent: Customer,
    },
}

#[derive(Debug, Clone, Copy)]
enum Customer {
    Contact(u128),
    Account(u128),
    Nobody,
}

impl Customer {
    fn value(self) -> AttributeValue {
        match self {
            Customer::Contact(n) => contact(n),
            Customer::Account(n) => account(n),
            Customer::Nobody => AttributeValue::Null,
        }
    }
}

fn customer() -> impl Strategy<Value = Customer> {
    prop_oneof![
        (1..=CONTACTS).prop_map(Customer::Contact),
        (1..=2u128).prop_map(Customer::Account),
        Just(Customer::Nobody),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    let opp = 1..=OPPORTUNITIES;
    let conn = 1..=5u128;
    prop_oneof![
        3 => (opp.clone(), customer(), 0..5i64).prop_map(|(opp, customer, amount)| Change::OpportunityCreate { opp, customer, amount }),
        2 => (opp.clone(), 0..5i64).prop_map(|(opp, amount)| Change::MappedUpdate { opp, amount }),
        1 => opp.clone().prop_map(|opp| Change::DescriptionCleared { opp }),
        1 => (opp.clone(), 0..3i64).prop_map(|(opp, step)| Change::UnmappedUpdate { opp, step }),
        2 => (opp.clone(), customer()).prop_map(|(opp, customer)| Change::NewCustomer { opp, customer }),
        1 => (opp.clone(), 0..3i32).prop_map(|(opp, statecode)| Change::Close { opp, statecode }),
        1 => opp.clone().prop_map(|opp| Change::OpportunityDelete { opp }),
        4 => (conn.clone(), opp.clone(), 1..=CONTACTS, 0..3u8, any::<bool>())
            .prop_map(|(conn, opp, contact, role, from_contact)| Change::ConnectionCreate { conn, opp, contact, role, from_contact }),
        1 => (conn.clone(), opp).prop_map(|(conn, opp)| Change::ConnectionToUser { conn, opp }),
        2 => (conn.clone(), 0..2i32).prop_map(|(conn, statecode)| Change::ConnectionState { conn, statecode }),
        1 => conn.prop_map(|conn| Change::ConnectionDelete { conn }),
        2 => (1..=CONTACTS, customer()).prop_map(|(contact, parent)| Change::ContactParent { contact, parent }),
    ]
}

fn to_event(change: &Change, version: Version) -> DynamicsEvent {
    let role_id = |r: u8| [STAKEHOLDER, DECISION_MAKER, BUSINESS][usize::from(r) % 3];
    match *change {
        Change::OpportunityCreate {
            opp,
            customer,
            amount,
        } => opp_create(
            opp,
            version,
            customer.value(),
            &[("estimatedvalue", money(amount)), ("description", text("new"))],
        ),
        Change::MappedUpdate { opp, amount } => {
            opp_update(opp, version, &[("estimatedvalue", money(amount))])
        }
        Change::DescriptionCleared { opp } => {
            opp_update(opp, version, &[("description", AttributeValue::Null)])
        }
        Change::UnmappedUpdate { opp, step } => {
            opp_update(opp, version, &[("stepname", AttributeValue::Int(step))])
        }
        Change::NewCustomer { opp, customer } => {
            opp_update(opp, version, &[("customerid", customer.value())])
        }
        Change::Close { opp, statecode } => opp_update(opp, version, &[("statecode", option(statecode))]),
        Change::OpportunityDelete { opp } => opp_delete(opp, version),
        Change::ConnectionCreate {
            conn,
            opp,
            contact: c,
            role,
            from_contact: false,
        } => conn_create(conn, version, opportunity(opp), contact(c), role_id(role)),
        Change::ConnectionCreate {
            conn,
            opp,
            contact: c,
            role,
            from_contact: true,
        } => conn_reciprocal(conn, version, contact(c), opportunity(opp), role_id(role)),
        Change::ConnectionToUser { conn, opp } => conn_create(
            conn,
            version,
            opportunity(opp),
            reference("systemuser", Uuid::from_u128(0x8000)),
            STAKEHOLDER,
        ),
        Change::ConnectionState { conn, statecode } => conn_state(conn, version, statecode),
        Change::ConnectionDelete { conn } => conn_delete(conn, version),
        Change::ContactParent { contact, parent } => {
            contact_update(contact, version, &[("parentcustomerid", parent.value())])
        }
    }
}

/// A history (strictly increasing versions) and a delivery: a shuffle of it with repetitions.
fn history_and_delivery() -> impl Strategy<Value = (Vec<DynamicsEvent>, Vec<DynamicsEvent>)> {
    prop::collection::vec(change(), 0..40).prop_flat_map(|changes| {
        let history: Vec<DynamicsEvent> = changes
            .iter()
            .enumerate()
            .map(|(i, c)| to_event(c, 100 + 10 * i as Version))
            .collect();
        let n = history.len().max(1);
        let repeats = prop::collection::vec(0..n, 0..12);
        (Just(history), repeats).prop_flat_map(|(history, repeats)| {
            let mut delivery = history.clone();
            delivery.extend(repeats.iter().filter_map(|i| history.get(*i).cloned()));
            (Just(history), Just(delivery).prop_shuffle())
        })
    })
}

fn deliver_all(events: &[DynamicsEvent]) -> Harness {
    let mut h = Harness::new(world_with_contacts(CONTACTS));
    for e in events {
        let _ = h.deliver(e);
    }
    h
}

fn projections(h: &Harness) -> Vec<Result<Projection, Vec<Lookup>>> {
    (1..=OPPORTUNITIES)
        .map(|n| project(opp_id(n), &h.world, &h.cfg))
        .collect()
}

/// What users see in Marketo: opportunities and roles exactly; companies and leads as far as
/// the final opportunities and roles use them. (A company or lead upserted on the way by one
/// order and not another is harmless: oppsync never deletes companies or leads.)
fn marketo_in_use(m: &MarketoModel) -> MarketoModel {
    let companies = m
        .companies
        .iter()
        .filter(|(id, _)| {
            m.opportunities
                .values()
                .any(|f| f.get("externalCompanyId") == Some(&Value::String(id.to_string())))
        })
        .map(|(id, name)| (*id, name.clone()))
        .collect();
    let leads = m
        .leads
        .iter()
        .filter(|c| m.roles.iter().any(|(_, rc, _)| rc == *c))
        .copied()
        .collect();
    MarketoModel {
        companies,
        leads,
        opportunities: m.opportunities.clone(),
        roles: m.roles.clone(),
    }
}

/// Marketo as a fresh full sync of the final projections would leave it.
fn marketo_from_scratch(h: &Harness) -> MarketoModel {
    let mut m = MarketoModel::default();
    for p in projections(h).into_iter().flatten() {
        if p.opportunity.is_some() {
            m.replay(&plan(None, &p));
        }
    }
    marketo_in_use(&m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn any_order_and_repetition_converges_to_the_in_order_world_and_marketo((history, delivery) in history_and_delivery()) {
        let in_order = deliver_all(&history);
        let shuffled = deliver_all(&delivery);
        prop_assert_eq!(&shuffled.world, &in_order.world);
        prop_assert_eq!(projections(&shuffled), projections(&in_order));
        prop_assert_eq!(marketo_in_use(&shuffled.marketo), marketo_in_use(&in_order.marketo));
        prop_assert_eq!(marketo_in_use(&in_order.marketo), marketo_from_scratch(&in_order));
    }
}
