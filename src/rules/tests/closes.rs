//! Closing and re-opening deals (Win, Lose, SetState), deleted contacts, and company names.

use serde_json::json;

use super::*;

fn close(n: u128, version: Version, message: MessageKind, state: i32, status: i32) -> DynamicsEvent {
    event(
        EntityKind::Opportunity,
        message,
        opp_id(n),
        version,
        attrs(&[
            ("statecode", option(state)),
            ("statuscode", option(status)),
            ("actualvalue", money(48_000)),
        ]),
    )
}

fn with_actual_value(mut cfg: SyncConfig) -> SyncConfig {
    cfg.fields.push(FieldMapping::new(
        "actualvalue",
        "expectedRevenue",
        Conversion::Money,
    ));
    cfg
}

fn fields(h: &Harness, n: u128) -> Map<String, Value> {
    h.project(n).opportunity.unwrap_or_default()
}

#[test]
fn win_makes_the_opportunity_won_with_its_actual_value() {
    let mut h = Harness::new(world_with_contacts(0));
    h.cfg = with_actual_value(h.cfg.clone());
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let writes = h.deliver(&close(1, 20, MessageKind::Win, 1, 3));
    assert_eq!(writes.len(), 1, "{writes:?}");
    let f = fields(&h, 1);
    assert_eq!(
        (&f["stage"], &f["isClosed"], &f["isWon"], &f["expectedRevenue"]),
        (&json!("Won"), &json!(true), &json!(true), &json!(48000))
    );
}

#[test]
fn lose_makes_it_lost_and_a_reopen_makes_it_open_again() {
    let mut h = Harness::new(world_with_contacts(0));
    let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
    let _ = h.deliver(&close(1, 20, MessageKind::Lose, 2, 5));
    let f = fields(&h, 1);
    assert_eq!(
        (&f["stage"], &f["isClosed"], &f["isWon"]),
        (&json!("Lost"), &json!(true), &json!(false))
    );
    let _ = h.deliver(&opp_update(
        1,
        30,
        &[("statecode", option(0)), ("statuscode", option(1))],
    ));
    let f = fields(&h, 1);
    assert_eq!((&f["stage"], &f["isClosed"]), (&json!("Open"), &json!(false)));
    // SetState back to Won, then a late Lose (older) changes nothing.
    let _ = h.deliver(&close(1, 40, MessageKind::SetStateDynamicEntity, 1, 3));
    assert_eq!(fields(&h, 1)["stage"], json!("Won"));
    assert!(h.deliver(&close(1, 20, MessageKind::Lose, 2, 5)).is_empty());
    assert_eq!(fields(&h, 1)["stage"], json!("Won"));
}

#[test]
fn a_win_and_the_update_of_the_same_close_converge_in_any_order() {
    let update = event(
        EntityKind::Opportunity,
        MessageKind::Update,
        opp_id(1),
        21,
        attrs(&[
            ("statecode", option(1)),
            ("statuscode", option(3)),
            ("actualvalue", money(48_000)),
        ]),
    );
    let win = close(1, 20, MessageKind::Win, 1, 3);
    let mut results = Vec::new();
    for order in [
        vec![&win],
        vec![&win, &update],
        vec![&update, &win],
        vec![&update, &win, &win, &update],
    ] {
        let mut h = Harness::new(world_with_contacts(0));
        h.cfg = with_actual_value(h.cfg.clone());
        let _ = h.deliver(&opp_create(1, 10, account(1), &[]));
        let mut opportunity_writes = 0;
        for e in order {
            opportunity_writes += h
                .deliver(e)
                .iter()
                .filter(|w| matches!(w, MarketoWrite::UpsertOpportunity { .. }))
                .count();
        }
        assert_eq!(
            opportunity_writes, 1,
            "one write for the close, whatever the order"
        );
        results.push(h.marketo.opportunities.clone());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:#?}");
}

#[test]
fn a_deleted_contact_loses_its_customer_and_stakeholder_roles() {
    let mut h = Harness::new(world_with_contacts(2));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&conn_create(1, 11, opportunity(1), contact(2), STAKEHOLDER));
    assert_eq!(h.project(1).roles.len(), 2);
    for c in [1, 2] {
        let writes = h.deliver(&event(
            EntityKind::Contact,
            MessageKind::Delete,
            contact_id(c),
            20,
            Attributes::new(),
        ));
        assert!(
            writes.iter().any(
                |w| matches!(w, MarketoWrite::DeleteRole { contact_id: id, .. } if *id == contact_id(c))
            ),
            "{writes:?}"
        );
    }
    assert!(h.project(1).roles.is_empty());
    // A late update of the deleted contact does not bring it back.
    let _ = h.deliver(&contact_update(
        1,
        30,
        &[("emailaddress1", text("again@example.com"))],
    ));
    assert!(h.project(1).roles.is_empty());
}

#[test]
fn the_losing_contact_of_a_merge_loses_its_roles() {
    let mut h = Harness::new(world_with_contacts(1));
    let _ = h.deliver(&opp_create(1, 10, contact(1), &[]));
    let _ = h.deliver(&contact_update(1, 20, &[("merged", AttributeValue::Bool(true))]));
    assert!(h.project(1).roles.is_empty());
}

#[test]
fn a_company_without_a_name_needs_the_account_and_the_cached_name_wins() {
    let unnamed = reference("account", account_id(7));
    let mut world = world_with_contacts(0);
    let _ = apply(&mut world, &opp_create(1, 10, unnamed, &[]));
    let cfg = SyncConfig::default();
    assert_eq!(
        project(opp_id(1), &world, &cfg),
        Err(vec![Lookup::Account(account_id(7))])
    );
    let mut account = AccountState::new(account_id(7));
    account.merge_name(Some("Fabrikam".into()), 5);
    world.accounts.insert(account_id(7), account);
    let p = project(opp_id(1), &world, &cfg).unwrap();
    assert_eq!(p.company.and_then(|c| c.name), Some("Fabrikam".into()));
}

#[test]
fn an_account_rename_renames_a_company_already_in_marketo_only() {
    let rename = |version, name: &str| {
        event(
            EntityKind::Account,
            MessageKind::Update,
            account_id(1),
            version,
            attrs(&[("name", text(name))]),
        )
    };
    let mut world = World::default();
    let applied = apply(&mut world, &rename(10, "Contoso")).unwrap();
    assert!(applied.companies.is_empty(), "not a company yet");
    assert_eq!(applied.accounts_changed, BTreeSet::from([account_id(1)]));
    world.accounts.get_mut(&account_id(1)).unwrap().in_marketo = true;
    let applied = apply(&mut world, &rename(20, "Contoso Ltd")).unwrap();
    assert_eq!(applied.companies, BTreeSet::from([account_id(1)]));
    // An older rename arriving late changes nothing.
    assert!(apply(&mut world, &rename(15, "Old")).unwrap().is_empty());
    assert_eq!(
        world.accounts[&account_id(1)].known_name(),
        Some(Some("Contoso Ltd"))
    );
}
