//! One test per rule and edge case of DESIGN.md §2, given/when/then.

use serde_json::json;
use time::macros::datetime;

use super::*;

/// A contact as the planner builds it from a Dataverse Web API read: a full row (selected
/// columns that are absent are null) at the version of its `modifiedon`.
fn web_api_contact(
    id: Uuid,
    modified_on: Version,
    email: Option<&str>,
    parent: AttributeValue,
) -> ContactState {
    let mut row = Attributes::new();
    row.insert(
        "emailaddress1".into(),
        email.map_or(AttributeValue::Null, |e| AttributeValue::String(e.into())),
    );
    row.insert("parentcustomerid".into(), parent);
    ContactState::from_row(id, &row, modified_on)
}

fn fields(p: &Projection) -> &Map<String, Value> {
    match &p.opportunity {
        Some(f) => f,
        None => panic!("opportunity is deleted"),
    }
}

fn upserted_fields(writes: &[MarketoWrite]) -> Vec<&Map<String, Value>> {
    writes
        .iter()
        .filter_map(|w| match w {
            MarketoWrite::UpsertOpportunity { fields, .. } => Some(fields),
            _ => None,
        })
        .collect()
}

// Rule 1: field mapping.

#[test]
fn opportunity_create_maps_default_fields_like_native_sync() {
    // given a contact customer with no account
    let mut h = Harness::new(world_with_contacts(1));
    // when the opportunity is created with every default field
    let writes = h.deliver(&opp_create(
        1,
        10,
        contact(1),
        &[
            ("description", text("Twelve seats")),
            ("closeprobability", AttributeValue::Int(40)),
            ("estimatedvalue", money(25_000)),
            (
                "estimatedclosedate",
                AttributeValue::DateTime(datetime!(2025-03-31 00:00 UTC)),
            ),
            ("salesstage", option(1)),
        ],
    ));
    // then Marketo gets the native sync's fields under Marketo names, keyed by opportunityid
    let upserts = upserted_fields(&writes);
    assert_eq!(upserts.len(), 1);
    assert_eq!(
        Value::Object(upserts[0].clone()),
        json!({
            "externalOpportunityId": opp_id(1).to_string(),
            "externalCompanyId": null,
            "name": "Deal 1",
            "description": "Twelve seats",
            "probability": 40,
            "amount": 25000,
            "closeDate": "2025-03-31",
            "stage": "Open",
            "isClosed": false,
            "isWon": false,
        })
    );
}

#[test]
fn unmapped_field_change_produces_no_marketo_write() {
    // given a synced opportunity
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    // when only an unmapped attribute changes
    let writes = h.deliver(&opp_update(
        1,
        20,
        &[("stepname", text("3-Propose")), ("salesstage", option(2))],
    ));
    // then nothing is written to Marketo
    assert_eq!(writes, []);
}

#[test]
fn partial_update_of_mapped_field_upserts_the_whole_opportunity() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[("estimatedvalue", money(100))]));
    // when only the estimated value changes (Target without post image)
    let writes = h.deliver(&opp_update(1, 20, &[("estimatedvalue", money(200))]));
    // then the opportunity is upserted with the new amount and the other known fields
    let upserts = upserted_fields(&writes);
    assert_eq!(upserts.len(), 1);
    assert_eq!(upserts[0]["amount"], json!(200));
    assert_eq!(upserts[0]["name"], json!("Deal 1"));
    assert_eq!(writes.len(), 1, "no role or company writes: {writes:?}");
}

#[test]
fn clearing_a_mapped_field_writes_null() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[("description", text("x"))]));
    let writes = h.deliver(&opp_update(1, 20, &[("description", AttributeValue::Null)]));
    assert_eq!(upserted_fields(&writes)[0]["description"], Value::Null);
}

#[test]
fn attribute_absent_from_a_full_row_is_null() {
    let h = {
        let mut h = Harness::new(world_with_contacts(1));
        let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
        h
    };
    let p = h.project(1);
    assert_eq!(fields(&p)["amount"], Value::Null);
    assert_eq!(fields(&p)["closeDate"], Value::Null);
}

#[test]
fn won_opportunity_is_closed_and_won() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let writes = h.deliver(&opp_update(
        1,
        20,
        &[("statecode", option(1)), ("statuscode", option(3))],
    ));
    let f = upserted_fields(&writes)[0];
    assert_eq!(
        (&f["stage"], &f["isClosed"], &f["isWon"]),
        (&json!("Won"), &json!(true), &json!(true))
    );
}

#[test]
fn lost_opportunity_is_closed_and_not_won() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let writes = h.deliver(&opp_update(1, 20, &[("statecode", option(2))]));
    let f = upserted_fields(&writes)[0];
    assert_eq!(
        (&f["stage"], &f["isClosed"], &f["isWon"]),
        (&json!("Lost"), &json!(true), &json!(false))
    );
}

#[test]
fn only_configured_fields_are_mapped_with_their_conversions() {
    // given a mapping of rating (labelled), owner (lookup id and name), and the customer id
    let mut h = Harness::new(world_with_contacts(1));
    let mut rating = FieldMapping::new("opportunityratingcode", "rating", Conversion::OptionsetLabel);
    rating.labels.insert("1".into(), "Hot".into());
    h.cfg.fields = vec![
        FieldMapping::new("name", "name", Conversion::String),
        rating,
        FieldMapping::new("ownerid", "ownerId", Conversion::LookupId),
        FieldMapping::new("ownerid", "ownerName", Conversion::LookupName),
        FieldMapping::new("customerid", "customerId", Conversion::LookupId),
    ];
    h.cfg.derived = DerivedFields {
        is_closed: None,
        is_won: Some(String::new()),
    };
    assert_eq!(h.cfg.problems(), Vec::<String>::new());
    let owner = Uuid::from_u128(0x9000);
    // when an opportunity is created with those and other attributes (Web API style option set)
    let _ = h.deliver(&opp_create(
        1,
        10,
        contact(1),
        &[
            ("opportunityratingcode", AttributeValue::Int(1)),
            (
                "ownerid",
                AttributeValue::EntityReference(EntityRef {
                    logical_name: "systemuser".into(),
                    id: owner,
                    name: Some("Ann".into()),
                }),
            ),
            ("estimatedvalue", money(5)),
        ],
    ));
    // then only the configured Marketo fields (and the keys) are written
    assert_eq!(
        Value::Object(fields(&h.project(1)).clone()),
        json!({
            "externalOpportunityId": opp_id(1).to_string(),
            "externalCompanyId": null,
            "name": "Deal 1",
            "rating": "Hot",
            "ownerId": owner.to_string(),
            "ownerName": "Ann",
            "customerId": contact_id(1).to_string(),
        })
    );
}

#[test]
fn partial_update_of_an_opportunity_never_seen_in_full_asks_for_the_row() {
    // given nothing known of opportunity 1
    let mut world = world_with_contacts(1);
    // when a partial update arrives (no Create seen, no post image)
    let applied = apply(&mut world, &opp_update(1, 20, &[("estimatedvalue", money(5))]));
    assert!(applied.is_ok_and(|a| a.opportunities.contains(&opp_id(1))));
    // then the projection asks for the row
    assert_eq!(
        project(opp_id(1), &world, &SyncConfig::default()),
        Err(vec![Lookup::OpportunityRow(opp_id(1))])
    );
    // and once the row read is applied as a synthetic update, it projects with both values
    let row = attrs(&[
        ("name", text("Read")),
        ("customerid", contact(1)),
        ("statecode", option(0)),
        ("estimatedvalue", money(4)),
    ]);
    assert!(
        apply(
            &mut world,
            &full_row_event(EntityKind::Opportunity, opp_id(1), 15, row)
        )
        .is_ok()
    );
    let p = project(opp_id(1), &world, &SyncConfig::default());
    let f = p.map(|p| p.opportunity.unwrap_or_default());
    assert_eq!(
        f.as_ref().map(|f| (&f["name"], &f["amount"])),
        Ok((&json!("Read"), &json!(5)))
    );
}

#[test]
fn unknown_opportunity_asks_for_the_row() {
    assert_eq!(
        project(opp_id(7), &World::default(), &SyncConfig::default()),
        Err(vec![Lookup::OpportunityRow(opp_id(7))])
    );
}

#[test]
fn oversized_notification_needs_the_row_except_delete() {
    let mut world = World::default();
    let mut e = opp_update(1, 20, &[]);
    e.data_missing = true;
    assert_eq!(
        apply(&mut world, &e),
        Err(NeedsRow {
            entity: EntityKind::Opportunity,
            id: opp_id(1)
        })
    );
    let mut d = opp_delete(1, 30);
    d.data_missing = true;
    assert!(apply(&mut world, &d).is_ok_and(|a| a.opportunities.contains(&opp_id(1))));
}

// Rule 2: potential customer is a contact.

#[test]
fn customer_contact_without_account_creates_role_and_no_company() {
    let mut h = Harness::new(world_with_contacts(1));
    let writes = h.deliver(&opp_create(1, 10, contact(1), &[]));
    assert_eq!(
        writes.iter().map(|w| w.key().to_string()).collect::<Vec<_>>(),
        [
            format!("lead:{}", contact_id(1)),
            format!("opportunity:{}", opp_id(1)),
            format!("role:{}:{}:Potential Customer", opp_id(1), contact_id(1)),
        ]
    );
    let p = h.project(1);
    assert_eq!(p.company, None);
    assert_eq!(p.roles, BTreeSet::from([role(1, "Potential Customer")]));
}

#[test]
fn customer_contact_with_account_sets_company_to_parent_account() {
    // given contact 1 works for account 1
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&contact_update(1, 5, &[("parentcustomerid", account(1))]));
    // when an opportunity names contact 1 as potential customer
    let writes = h.deliver(&opp_create(1, 10, contact(1), &[]));
    // then the company is upserted first and the opportunity points at it
    assert_eq!(
        writes[0],
        MarketoWrite::UpsertCompany {
            account_id: account_id(1),
            name: Some("Account 1".into())
        }
    );
    assert_eq!(
        upserted_fields(&writes)[0]["externalCompanyId"],
        json!(account_id(1).to_string())
    );
    assert_eq!(
        h.project(1).roles,
        BTreeSet::from([role(1, "Potential Customer")])
    );
}

#[test]
fn customer_contact_whose_parent_is_a_contact_has_no_company() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&contact_update(1, 5, &[("parentcustomerid", contact(2))]));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    assert_eq!(h.project(1).company, None);
    assert_eq!(fields(&h.project(1))["externalCompanyId"], Value::Null);
}

#[test]
fn customer_role_name_comes_from_config() {
    let mut h = Harness::new(world_with_contacts(1));
    h.cfg.customer_role = "Buyer".into();
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    assert_eq!(h.project(1).roles, BTreeSet::from([role(1, "Buyer")]));
}

#[test]
fn unknown_customer_contact_needs_a_contact_lookup() {
    // given contact 9 is unknown, and contact 8 known only by a partial update (no parent)
    let mut world = world_with_contacts(0);
    let cfg = SyncConfig::default();
    assert!(apply(&mut world, &opp_create(1, 10, contact(9), &[])).is_ok());
    assert_eq!(
        project(opp_id(1), &world, &cfg),
        Err(vec![Lookup::Contact(contact_id(9))])
    );
    assert!(apply(&mut world, &opp_create(2, 10, contact(8), &[])).is_ok());
    assert!(
        apply(
            &mut world,
            &contact_update(8, 5, &[("emailaddress1", text("x@y.z"))])
        )
        .is_ok()
    );
    assert_eq!(
        project(opp_id(2), &world, &cfg),
        Err(vec![Lookup::Contact(contact_id(8))])
    );
    // when the contact is read from the Web API (in webhook vocabulary, as the planner hands
    // it over: a full row, versioned by modifiedon 2025-01-15T12:00:00Z) and merged
    let read = web_api_contact(
        contact_id(8),
        1_736_942_400_000,
        Some("x@y.z"),
        AttributeValue::EntityReference(EntityRef {
            logical_name: "account".into(),
            id: account_id(3),
            name: Some("Contoso".into()),
        }),
    );
    assert_eq!(world.merge_contact(&read), BTreeSet::from([opp_id(2)]));
    // then the projection has the company, with the name Dynamics gave
    let company = project(opp_id(2), &world, &cfg).map(|p| p.company);
    assert_eq!(
        company,
        Ok(Some(CompanyRecord {
            account_id: account_id(3),
            name: Some("Contoso".into())
        }))
    );
}

#[test]
fn web_api_contact_read_merges_by_version() {
    // given a contact whose newer webhook set account 2
    let mut world = world_with_contacts(1);
    assert!(
        apply(
            &mut world,
            &contact_update(1, 2_000_000_000_000, &[("parentcustomerid", account(2))])
        )
        .is_ok()
    );
    // when an older read (modifiedon 2025-01-15) says account 3
    let stale = web_api_contact(
        contact_id(1),
        1_736_942_400_000,
        None,
        AttributeValue::EntityReference(EntityRef {
            logical_name: "account".into(),
            id: account_id(3),
            name: None,
        }),
    );
    let _ = world.merge_contact(&stale);
    // then the newer parent stays, and the email (newer in the read) is cleared
    let c = &world.contacts[&contact_id(1)];
    assert_eq!(c.parent_account.as_ref().map(|a| a.id), Some(account_id(2)));
    assert_eq!(c.email, None);
}

// Rule 3: potential customer is an account.

#[test]
fn customer_account_sets_company_and_creates_no_role() {
    let mut h = Harness::new(world_with_contacts(0));
    let writes = h.deliver(&opp_create(1, 10, account(1), &[]));
    assert_eq!(writes.len(), 2);
    assert_eq!(
        writes[0],
        MarketoWrite::UpsertCompany {
            account_id: account_id(1),
            name: Some("Account 1".into())
        }
    );
    assert_eq!(h.project(1).roles, BTreeSet::new());
}

// Rule 4: customer changes.

#[test]
fn customer_change_from_contact_to_contact_moves_the_role() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let writes = h.deliver(&opp_update(1, 20, &[("customerid", contact(2))]));
    assert!(writes.contains(&MarketoWrite::EnsureLead {
        contact_id: contact_id(2)
    }));
    assert!(writes.contains(&MarketoWrite::UpsertRole {
        opportunity_id: opp_id(1),
        contact_id: contact_id(2),
        role: "Potential Customer".into()
    }));
    assert!(writes.contains(&MarketoWrite::DeleteRole {
        opportunity_id: opp_id(1),
        contact_id: contact_id(1),
        role: "Potential Customer".into()
    }));
    assert_eq!(
        h.project(1).roles,
        BTreeSet::from([role(2, "Potential Customer")])
    );
}

#[test]
fn customer_change_from_contact_to_account_removes_the_role_and_sets_company() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let writes = h.deliver(&opp_update(1, 20, &[("customerid", account(1))]));
    assert_eq!(
        writes.first(),
        Some(&MarketoWrite::UpsertCompany {
            account_id: account_id(1),
            name: Some("Account 1".into())
        })
    );
    assert_eq!(
        writes.last(),
        Some(&MarketoWrite::DeleteRole {
            opportunity_id: opp_id(1),
            contact_id: contact_id(1),
            role: "Potential Customer".into()
        })
    );
    assert_eq!(h.marketo.roles, BTreeSet::new());
}

#[test]
fn old_customer_who_is_also_a_stakeholder_keeps_the_stakeholder_role() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    assert_eq!(
        h.project(1).roles,
        BTreeSet::from([role(1, "Potential Customer"), role(1, "Stakeholder")])
    );
    let _ = h.deliver(&opp_update(1, 20, &[("customerid", contact(2))]));
    assert_eq!(
        h.project(1).roles,
        BTreeSet::from([role(1, "Stakeholder"), role(2, "Potential Customer")])
    );
}

#[test]
fn customer_and_stakeholder_roles_of_one_contact_coincide_when_names_do() {
    let mut h = Harness::new(world_with_contacts(1));
    h.cfg.customer_role = "Stakeholder".into();
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    // when the customer moves to an account, the stakeholder connection still justifies the role
    let writes = h.deliver(&opp_update(1, 20, &[("customerid", account(1))]));
    assert!(
        !writes
            .iter()
            .any(|w| matches!(w, MarketoWrite::DeleteRole { .. })),
        "{writes:?}"
    );
    assert_eq!(h.project(1).roles, BTreeSet::from([role(1, "Stakeholder")]));
}

// Rule 5: stakeholders through connections.

#[test]
fn stakeholder_added_from_the_opportunity_creates_a_role() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let writes = h.deliver(&conn_create(1, 11, opportunity(1), contact(2), DECISION_MAKER));
    assert_eq!(
        writes,
        [
            MarketoWrite::EnsureLead {
                contact_id: contact_id(2)
            },
            MarketoWrite::UpsertRole {
                opportunity_id: opp_id(1),
                contact_id: contact_id(2),
                role: "Decision Maker".into()
            },
        ]
    );
}

#[test]
fn stakeholder_added_from_the_contact_side_creates_a_role() {
    // record1 = contact with its role in record1roleid, record2 = opportunity
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_reciprocal(1, 11, contact(2), opportunity(1), STAKEHOLDER));
    assert_eq!(h.project(1).roles, BTreeSet::from([role(2, "Stakeholder")]));
}

#[test]
fn reciprocal_row_and_repeated_notifications_change_nothing() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER));
    assert_eq!(
        h.deliver(&conn_reciprocal(2, 11, contact(2), opportunity(1), STAKEHOLDER)),
        []
    );
    assert_eq!(
        h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER)),
        []
    );
    // the back-fill update of relatedconnectionid
    let backfill = event(
        EntityKind::Connection,
        MessageKind::Update,
        conn_id(1),
        12,
        attrs(&[("relatedconnectionid", reference("connection", conn_id(2)))]),
    );
    assert_eq!(h.deliver(&backfill), []);
    assert_eq!(h.marketo.roles.len(), 1);
}

#[test]
fn connections_to_users_teams_or_accounts_change_nothing() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let user = reference("systemuser", Uuid::from_u128(0x8000));
    let team = reference("team", Uuid::from_u128(0x8001));
    assert_eq!(
        h.deliver(&conn_create(1, 11, opportunity(1), user, SALES_TEAM)),
        []
    );
    assert_eq!(
        h.deliver(&conn_create(2, 11, opportunity(1), team, STAKEHOLDER)),
        []
    );
    assert_eq!(
        h.deliver(&conn_create(3, 11, opportunity(1), account(2), STAKEHOLDER)),
        []
    );
    assert_eq!(
        h.deliver(&conn_create(4, 11, account(2), contact(1), STAKEHOLDER)),
        []
    );
    assert_eq!(h.project(1).roles, BTreeSet::new());
}

#[test]
fn connection_with_a_non_stakeholder_role_changes_nothing() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    assert_eq!(
        h.deliver(&conn_create(1, 11, opportunity(1), contact(1), BUSINESS)),
        []
    );
    assert_eq!(h.project(1).roles, BTreeSet::new());
}

#[test]
fn configured_stakeholder_categories_decide_which_roles_count() {
    let mut h = Harness::new(world_with_contacts(1));
    h.cfg.stakeholder_categories = vec![1000, 1];
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), BUSINESS));
    assert_eq!(h.project(1).roles, BTreeSet::from([role(1, "Business Partner")]));
}

#[test]
fn unknown_connection_role_needs_a_role_lookup() {
    let mut world = world_with_contacts(1);
    let cfg = SyncConfig::default();
    assert!(apply(&mut world, &opp_create(1, 10, account(1), &[])).is_ok());
    assert!(
        apply(
            &mut world,
            &conn_create(1, 11, opportunity(1), contact(1), UNKNOWN_ROLE)
        )
        .is_ok()
    );
    assert_eq!(
        project(opp_id(1), &world, &cfg),
        Err(vec![Lookup::ConnectionRole(UNKNOWN_ROLE)])
    );
    world.roles.insert(
        UNKNOWN_ROLE,
        ConnectionRoleInfo {
            id: UNKNOWN_ROLE,
            name: "Champion".into(),
            category: 1000,
        },
    );
    assert_eq!(
        project(opp_id(1), &world, &cfg).map(|p| p.roles),
        Ok(BTreeSet::from([role(1, "Champion")]))
    );
}

// Rule 6: connection deleted or deactivated.

#[test]
fn deactivated_connection_removes_its_role() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    let writes = h.deliver(&conn_state(1, 12, 1));
    assert_eq!(
        writes,
        [MarketoWrite::DeleteRole {
            opportunity_id: opp_id(1),
            contact_id: contact_id(1),
            role: "Stakeholder".into()
        }]
    );
    // and reactivating brings it back
    let writes = h.deliver(&conn_state(1, 13, 0));
    assert_eq!(writes.len(), 2);
}

#[test]
fn deleted_connection_removes_its_role() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    let writes = h.deliver(&conn_delete(1, 12));
    assert_eq!(
        writes,
        [MarketoWrite::DeleteRole {
            opportunity_id: opp_id(1),
            contact_id: contact_id(1),
            role: "Stakeholder".into()
        }]
    );
}

#[test]
fn role_stays_while_the_reciprocal_row_is_active() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    let _ = h.deliver(&conn_reciprocal(2, 11, contact(1), opportunity(1), STAKEHOLDER));
    assert_eq!(h.deliver(&conn_delete(1, 12)), []);
    let writes = h.deliver(&conn_delete(2, 12));
    assert_eq!(writes.len(), 1);
}

#[test]
fn role_stays_while_the_customer_rule_justifies_it() {
    let mut h = Harness::new(world_with_contacts(1));
    h.cfg.customer_role = "Stakeholder".into();
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    assert_eq!(h.deliver(&conn_delete(1, 12)), []);
    assert_eq!(h.project(1).roles, BTreeSet::from([role(1, "Stakeholder")]));
}

#[test]
fn role_stays_while_another_connection_justifies_it() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER));
    let _ = h.deliver(&conn_create(3, 11, opportunity(1), contact(1), STAKEHOLDER));
    assert_eq!(h.deliver(&conn_state(1, 12, 1)), []);
}

// Rule 7: opportunity delete.

#[test]
fn opportunity_delete_deletes_its_roles_then_the_opportunity() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER));
    let writes = h.deliver(&opp_delete(1, 12));
    assert_eq!(
        writes.iter().map(|w| w.phase().number()).collect::<Vec<_>>(),
        [4, 4, 5],
        "{writes:?}"
    );
    assert_eq!(
        h.marketo,
        MarketoModel {
            leads: BTreeSet::from([contact_id(1), contact_id(2)]),
            ..MarketoModel::default()
        }
    );
}

#[test]
fn update_arriving_after_the_delete_changes_nothing() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&opp_delete(1, 30));
    assert_eq!(h.deliver(&opp_update(1, 20, &[("name", text("stale"))])), []);
    assert_eq!(h.deliver(&opp_update(1, 40, &[("name", text("even newer"))])), []);
    assert_eq!(h.project(1), Projection::deleted(opp_id(1)));
}

#[test]
fn delete_is_final_even_when_its_version_looks_older() {
    // OperationCreatedOn and modifiedon are different clocks (module comment of state.rs)
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&opp_update(1, 50, &[("name", text("renamed"))]));
    let _ = h.deliver(&opp_delete(1, 40));
    assert_eq!(h.project(1), Projection::deleted(opp_id(1)));
    assert_eq!(h.marketo.opportunities.len(), 0);
}

#[test]
fn connection_notifications_for_a_deleted_opportunity_change_nothing() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&opp_delete(1, 20));
    assert_eq!(
        h.deliver(&conn_create(1, 21, opportunity(1), contact(1), STAKEHOLDER)),
        []
    );
    assert_eq!(h.deliver(&conn_delete(1, 22)), []);
}

#[test]
fn delete_of_an_opportunity_never_planned_still_deletes_it_in_marketo() {
    let mut h = Harness::new(world_with_contacts(0));
    assert_eq!(
        h.deliver(&opp_delete(1, 20)),
        [MarketoWrite::DeleteOpportunity {
            opportunity_id: opp_id(1)
        }]
    );
    assert_eq!(h.deliver(&opp_delete(1, 20)), []);
}

// Rule 8: ordering and repetition.

#[test]
fn older_partial_update_never_overwrites_a_newer_field() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&opp_update(1, 30, &[("estimatedvalue", money(300))]));
    // an older update of the same field plus a field nobody touched since
    let writes = h.deliver(&opp_update(
        1,
        20,
        &[
            ("estimatedvalue", money(200)),
            ("description", text("older but only")),
        ],
    ));
    let f = upserted_fields(&writes)[0];
    assert_eq!(
        (&f["amount"], &f["description"]),
        (&json!(300), &json!("older but only"))
    );
}

#[test]
fn equal_versions_pick_the_same_winner_in_any_order() {
    let a = opp_update(1, 20, &[("name", text("A"))]);
    let b = opp_update(1, 20, &[("name", text("B"))]);
    let mut one = world_with_contacts(1);
    let mut two = world_with_contacts(1);
    for e in [&a, &b] {
        assert!(apply(&mut one, e).is_ok());
    }
    for e in [&b, &a] {
        assert!(apply(&mut two, e).is_ok());
    }
    assert_eq!(one, two);
}

#[test]
fn older_customer_change_does_not_overwrite_a_newer_one() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&opp_update(1, 30, &[("customerid", account(1))]));
    assert_eq!(h.deliver(&opp_update(1, 20, &[("customerid", contact(2))])), []);
    assert_eq!(customer_contact(&h.world.opportunities[&opp_id(1)]), None);
}

#[test]
fn connection_delete_beats_an_older_update_delivered_later() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_delete(1, 20));
    assert_eq!(
        h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER)),
        []
    );
    assert_eq!(h.deliver(&conn_state(1, 30, 0)), []);
    assert!(h.world.connections[&conn_id(1)].is_deleted());
}

#[test]
fn older_connection_state_does_not_overwrite_a_newer_one() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&conn_state(1, 30, 1));
    // the create (older) arrives after the deactivation
    assert_eq!(
        h.deliver(&conn_create(1, 11, opportunity(1), contact(1), STAKEHOLDER)),
        []
    );
    assert!(!h.world.connections[&conn_id(1)].active);
}

// Rule 9: contact parent changes.

#[test]
fn contact_parent_change_moves_the_company_of_its_customer_opportunities() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&opp_create(2, 10, contact(1), &[]));
    let _ = h.deliver(&opp_create(3, 10, contact(2), &[]));
    let e = contact_update(1, 20, &[("parentcustomerid", account(5))]);
    let applied = apply(&mut h.world.clone(), &e);
    assert_eq!(
        applied.map(|a| a.opportunities),
        Ok(BTreeSet::from([opp_id(1), opp_id(2)]))
    );
    let writes = h.deliver(&e);
    assert_eq!(
        writes
            .iter()
            .filter(|w| matches!(w, MarketoWrite::UpsertOpportunity { .. }))
            .count(),
        2
    );
    assert_eq!(h.project(1).company.map(|c| c.account_id), Some(account_id(5)));
    assert_eq!(h.project(3).company, None);
}

#[test]
fn older_contact_notification_does_not_overwrite_a_newer_one() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&contact_update(1, 30, &[("parentcustomerid", account(3))]));
    assert_eq!(
        h.deliver(&contact_update(1, 20, &[("parentcustomerid", account(2))])),
        []
    );
    assert_eq!(h.project(1).company.map(|c| c.account_id), Some(account_id(3)));
}

#[test]
fn contact_email_change_is_stored_without_marketo_writes() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let applied = apply(
        &mut h.world,
        &contact_update(1, 30, &[("emailaddress1", text("new@example.com"))]),
    );
    assert!(applied.is_ok_and(|a| a.contacts_changed == BTreeSet::from([contact_id(1)])));
    assert_eq!(
        h.world.contacts[&contact_id(1)].email.as_deref(),
        Some("new@example.com")
    );
}

#[test]
fn indexes_name_the_customer_contact_and_the_connection_opportunity() {
    let mut world = world_with_contacts(1);
    assert!(apply(&mut world, &opp_create(1, 10, contact(1), &[])).is_ok());
    assert!(
        apply(
            &mut world,
            &conn_reciprocal(1, 11, contact(1), opportunity(1), STAKEHOLDER)
        )
        .is_ok()
    );
    assert_eq!(
        customer_contact(&world.opportunities[&opp_id(1)]),
        Some(contact_id(1))
    );
    assert_eq!(
        connection_opportunity(&world.connections[&conn_id(1)]),
        Some(opp_id(1))
    );
    assert_eq!(world.connections[&conn_id(1)].role_id, Some(STAKEHOLDER));
}

#[test]
fn event_opportunity_reads_either_side_or_the_pre_image() {
    assert_eq!(event_opportunity(&opp_update(4, 1, &[])), Some(opp_id(4)));
    assert_eq!(
        event_opportunity(&conn_create(1, 1, opportunity(2), contact(1), STAKEHOLDER)),
        Some(opp_id(2))
    );
    assert_eq!(
        event_opportunity(&conn_reciprocal(1, 1, contact(1), opportunity(3), STAKEHOLDER)),
        Some(opp_id(3))
    );
    let mut delete = conn_delete(1, 5);
    assert_eq!(event_opportunity(&delete), None);
    delete.pre_image = attrs(&[("record1id", contact(1)), ("record2id", opportunity(6))]);
    assert_eq!(event_opportunity(&delete), Some(opp_id(6)));
    assert_eq!(event_opportunity(&contact_update(1, 1, &[])), None);
}

#[test]
fn connection_delete_reports_the_opportunity_from_the_pre_image_when_state_is_unknown() {
    let mut world = World::default();
    let mut delete = conn_delete(1, 5);
    delete.pre_image = attrs(&[("record1id", opportunity(6)), ("record2id", contact(1))]);
    assert_eq!(
        apply(&mut world, &delete).map(|a| a.opportunities),
        Ok(BTreeSet::from([opp_id(6)]))
    );
}

#[test]
fn state_round_trips_through_json() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[("estimatedvalue", money(5))]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER));
    let json = serde_json::to_string(&h.world).unwrap_or_default();
    assert_eq!(serde_json::from_str::<World>(&json).ok(), Some(h.world.clone()));
    let p = h.project(1);
    let json = serde_json::to_string(&p).unwrap_or_default();
    assert_eq!(serde_json::from_str::<Projection>(&json).ok(), Some(p));
}

// Rule 10 and plan shape.

#[test]
fn every_kind_of_write_is_planned_in_its_phase_and_its_stored_form_round_trips() {
    let mut h = Harness::new(world_with_contacts(2));
    let mut all = h.deliver(&contact_update(1, 5, &[("parentcustomerid", account(1))]));
    all.extend(h.deliver(&opp_create(1, 10, contact(1), &[])));
    all.extend(h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER)));
    all.extend(h.deliver(&opp_update(1, 12, &[("customerid", account(2))])));
    all.extend(h.deliver(&opp_delete(1, 13)));
    assert_eq!(
        all.iter().map(MarketoWrite::phase).collect::<BTreeSet<_>>(),
        BTreeSet::from(crate::rules::Phase::ALL)
    );
    for w in &all {
        // the stored form names the write, so a pending write never turns into something else
        let json = serde_json::to_string(w).unwrap_or_default();
        assert_eq!(serde_json::from_str::<MarketoWrite>(&json).ok().as_ref(), Some(w));
    }
}

#[test]
fn plan_puts_company_lead_opportunity_then_roles() {
    let mut world = world_with_contacts(2);
    assert!(
        apply(
            &mut world,
            &contact_update(1, 5, &[("parentcustomerid", account(1))])
        )
        .is_ok()
    );
    assert!(apply(&mut world, &opp_create(1, 10, contact(1), &[])).is_ok());
    assert!(
        apply(
            &mut world,
            &conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER)
        )
        .is_ok()
    );
    let new = project(opp_id(1), &world, &SyncConfig::default());
    let Ok(new) = new else { panic!("{new:?}") };
    let writes = plan(None, &new);
    let phases: Vec<i64> = writes.iter().map(|w| w.phase().number()).collect();
    assert_eq!(phases, [0, 1, 1, 2, 3, 3]);
    assert!(phases.is_sorted());
}

#[test]
fn unchanged_projection_plans_nothing() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let p = h.project(1);
    assert_eq!(plan(Some(&p), &p), []);
}

#[test]
fn keys_share_one_record_between_upsert_and_delete() {
    let (o, c) = (opp_id(1), contact_id(1));
    let up = MarketoWrite::UpsertRole {
        opportunity_id: o,
        contact_id: c,
        role: "Stakeholder".into(),
    };
    let down = MarketoWrite::DeleteRole {
        opportunity_id: o,
        contact_id: c,
        role: "Stakeholder".into(),
    };
    assert_eq!(up.key(), down.key());
    assert_eq!(up.key().to_string(), format!("role:{o}:{c}:Stakeholder"));
    // The text form reads back as the same key, a role name with ':' included.
    for key in [
        up.key(),
        MarketoWrite::UpsertRole {
            opportunity_id: o,
            contact_id: c,
            role: "Partner: EMEA".into(),
        }
        .key(),
        MarketoWrite::EnsureLead { contact_id: c }.key(),
    ] {
        assert_eq!(key.to_string().parse::<crate::rules::WriteKey>(), Ok(key));
    }
    assert!("opportunity:x".parse::<crate::rules::WriteKey>().is_err());
    assert_eq!(
        MarketoWrite::UpsertOpportunity {
            opportunity_id: o,
            fields: Map::new()
        }
        .key(),
        MarketoWrite::DeleteOpportunity { opportunity_id: o }.key()
    );
    assert_eq!(
        MarketoWrite::UpsertCompany {
            account_id: account_id(1),
            name: Some("Account 1".into())
        }
        .key()
        .to_string(),
        format!("company:{}", account_id(1))
    );
    assert_eq!(
        MarketoWrite::EnsureLead { contact_id: c }.key().to_string(),
        format!("lead:{c}")
    );
}
