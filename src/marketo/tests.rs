//! The client against the simulator: batching, pacing, tokens, retries, error mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::*;
use crate::config::{MarketoConfig, Secret};
use crate::sim::marketo::{Fault, MarketoSim, MarketoSimConfig, MarketoSimHandle};

const OPPS: &str = "/rest/v1/opportunities.json";

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn opp(id: &str) -> Map<String, Value> {
    obj(json!({ "externalOpportunityId": id, "name": format!("Opportunity {id}"), "stage": "Qualify" }))
}

/// A simulator plus a client aimed at it, with test-sized delays and timeouts.
async fn setup(
    sim_cfg: MarketoSimConfig,
    tweak: impl FnOnce(&mut MarketoConfig),
) -> (MarketoSimHandle, MarketoClient) {
    let sim = MarketoSim::start(sim_cfg).await.unwrap();
    let mut cfg = MarketoConfig {
        base_url: Some(url::Url::parse(&sim.base_url()).unwrap()),
        client_id: Some(sim.client_id()),
        client_secret: Some(Secret::new(sim.client_secret())),
        retry_base_delay_ms: 5,
        retry_max_delay_ms: 40,
        // 70 s writes become 1.4 s.
        timeout_scale: 0.02,
        ..MarketoConfig::default()
    };
    tweak(&mut cfg);
    let client = MarketoClient::new(&cfg).unwrap();
    (sim, client)
}

fn rest_calls(sim: &MarketoSimHandle) -> Vec<crate::sim::marketo::RecordedCall> {
    sim.calls()
        .into_iter()
        .filter(|c| c.path.starts_with("/rest/"))
        .collect()
}

#[test]
fn new_requires_base_url_and_credentials() {
    let err = MarketoClient::new(&MarketoConfig::default()).err().unwrap();
    assert!(err.is_configuration(), "{err}");
    assert!(err.to_string().contains("base_url"), "{err}");
    let cfg = MarketoConfig {
        base_url: Some(url::Url::parse("https://123-ABC-456.mktorest.com").unwrap()),
        client_id: Some("id".into()),
        ..MarketoConfig::default()
    };
    assert!(
        MarketoClient::new(&cfg)
            .err()
            .unwrap()
            .to_string()
            .contains("client_secret")
    );
}

#[tokio::test]
async fn a_thousand_opportunities_go_in_four_calls() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    let records: Vec<_> = (0..1000).map(|i| opp(&format!("OPP-{i:04}"))).collect();
    let results = client.sync_opportunities(records).await.unwrap();
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| matches!(
        r,
        RecordResult::Done {
            status: RecordStatus::Created,
            id: Some(_)
        }
    )));
    assert_eq!(sim.call_count(OPPS), 4);
    assert_eq!(sim.opportunities().len(), 1000);
    let sizes: Vec<usize> = rest_calls(&sim)
        .iter()
        .map(|c| c.body["input"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 1000);
    assert!(sizes.iter().all(|n| *n <= 300), "{sizes:?}");
    // Every write is an idempotent upsert on the dedupe key.
    for call in rest_calls(&sim) {
        assert_eq!(call.body["action"], "createOrUpdate");
        assert_eq!(call.body["dedupeBy"], "dedupeFields");
    }
    assert_eq!(client.usage().calls_today, 4);
}

#[tokio::test]
async fn a_burst_is_paced_under_the_rate_and_concurrency_limits() {
    let window = Duration::from_millis(500);
    let sim_cfg = MarketoSimConfig {
        calls_per_window: 10,
        window,
        max_concurrent: 3,
        ..MarketoSimConfig::default()
    };
    let (sim, client) = setup(sim_cfg, |c| {
        c.calls_per_window = 10;
        c.window_secs = 0.5;
        c.max_concurrent = 3;
    })
    .await;
    // Slow answers keep calls in flight long enough for concurrency to matter.
    sim.inject(Fault::Delay {
        delay: Duration::from_millis(20),
        times: 30,
    });
    let started = Instant::now();
    let calls = (0..30).map(|i| {
        let client = client.clone();
        async move { client.sync_opportunities(vec![opp(&format!("OPP-{i}"))]).await }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    assert!(
        results.iter().all(|r| r.as_ref().is_ok_and(|v| v[0].is_done())),
        "{results:?}"
    );
    assert_eq!(sim.count_606(), 0);
    assert_eq!(sim.count_615(), 0);
    assert!(
        sim.max_calls_in_any_window() <= 10,
        "{}",
        sim.max_calls_in_any_window()
    );
    assert!(sim.max_concurrent_seen() <= 3, "{}", sim.max_concurrent_seen());
    assert_eq!(sim.rest_call_count(), 30, "pacing is not retrying");
    // 30 calls at 10 per window need at least two full windows.
    assert!(elapsed >= window * 2, "{elapsed:?}");
    let usage = client.usage();
    assert!(
        usage.limiter_waits > 0 && usage.limiter_wait_seconds > 0.0,
        "{usage:?}"
    );
}

#[tokio::test]
async fn a_token_expiring_amid_concurrent_calls_is_refreshed_once() {
    let (sim, client) = setup(MarketoSimConfig::default(), |c| c.max_concurrent = 4).await;
    client.sync_opportunities(vec![opp("warm-up")]).await.unwrap();
    assert_eq!(sim.token_issued_count(), 1);
    sim.inject(Fault::Delay {
        delay: Duration::from_millis(100),
        times: 4,
    });
    let calls = (0..12).map(|i| {
        let client = client.clone();
        async move { client.sync_opportunities(vec![opp(&format!("OPP-{i}"))]).await }
    });
    let expire = {
        let sim = sim.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            sim.inject(Fault::ExpireTokenNow);
        }
    };
    let (results, ()) = tokio::join!(futures::future::join_all(calls), expire);
    assert!(
        results.iter().all(|r| r.as_ref().is_ok_and(|v| v[0].is_done())),
        "{results:?}"
    );
    assert!(
        sim.error_count("602") >= 2,
        "several calls saw the expiry: {}",
        sim.error_count("602")
    );
    assert_eq!(sim.token_issued_count(), 2, "exactly one new token");
    // Identity would hand every racer the same new token; count the identity calls too.
    assert_eq!(
        client.usage().token_refreshes,
        2,
        "exactly one refresh (after the first fetch)"
    );
    assert_eq!(sim.call_count("/identity/oauth/token"), 2);
    assert_eq!(sim.opportunities().len(), 13);
}

#[tokio::test]
async fn both_601_and_602_refresh_once_and_retry_with_the_new_token() {
    for (fault, code) in [(Fault::InvalidateToken, "601"), (Fault::ExpireTokenNow, "602")] {
        let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
        client.sync_opportunities(vec![opp("A")]).await.unwrap();
        sim.inject(fault);
        let results = client.sync_opportunities(vec![opp("B")]).await.unwrap();
        assert!(results[0].is_done());
        assert_eq!(sim.token_issued_count(), 2, "{code}");
        let calls = rest_calls(&sim);
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[1].response_code.as_deref(), Some(code));
        assert_eq!(calls[2].response_code, None);
        assert_eq!(calls[0].bearer, calls[1].bearer);
        assert_ne!(
            calls[1].bearer, calls[2].bearer,
            "{code}: retried with the new token"
        );
        assert_eq!(client.usage().token_refreshes, 2);
    }
}

#[tokio::test]
async fn permanent_record_errors_land_at_their_positions() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    sim.inject(Fault::RecordError {
        external_ids: vec!["OPP-3".into(), "OPP-7".into()],
        code: "1003".into(),
        message: "Invalid data".into(),
    });
    let mut records: Vec<_> = (0..10).map(|i| opp(&format!("OPP-{i}"))).collect();
    records[5] = obj(json!({ "externalOpportunityId": "OPP-5", "name": null }));
    records[8].insert("pilotScore__c".into(), json!(7));
    let results = client.sync_opportunities(records).await.unwrap();
    let codes: Vec<Option<&str>> = results
        .iter()
        .map(|r| match r {
            RecordResult::Done { .. } => None,
            RecordResult::Failed { code, .. } => Some(code.as_str()),
        })
        .collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            None,
            Some("1003"),
            None,
            Some("1002"),
            None,
            Some("1003"),
            Some("1006"),
            None
        ]
    );
    assert_eq!(sim.opportunities().len(), 6);
    assert_eq!(sim.call_count(OPPS), 1, "record errors are not retried");
}

#[tokio::test]
async fn crm_enabled_is_a_configuration_error() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    sim.set_crm_enabled(true);
    let err = client.sync_opportunities(vec![opp("A")]).await.unwrap_err();
    assert!(err.is_configuration(), "{err:?}");
    assert_eq!(err.code(), "1018");
    let err = client.probe().await.unwrap_err();
    assert!(err.is_configuration(), "{err:?}");
    assert_eq!(sim.call_count(OPPS), 2, "configuration errors are not retried");

    let sim_cfg = MarketoSimConfig {
        crm_enabled: true,
        crm_response_level: true,
        ..MarketoSimConfig::default()
    };
    let (_sim, client) = setup(sim_cfg, |_| {}).await;
    let err = client.sync_roles(&[role("A", 1, "Champion")]).await.unwrap_err();
    assert!(err.is_configuration() && err.code() == "1018", "{err:?}");
}

#[tokio::test]
async fn probe_proves_writes_are_accepted_without_changing_data() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    let report = client.probe().await.unwrap();
    assert!(
        report.token_ok && report.opportunity_writes_accepted,
        "{report:?}"
    );
    assert!(sim.opportunities().is_empty());
    let call = &rest_calls(&sim)[0];
    assert_eq!(call.body["action"], "updateOnly");

    let (sim, _) = setup(MarketoSimConfig::default(), |_| {}).await;
    let cfg = MarketoConfig {
        base_url: Some(url::Url::parse(&sim.base_url()).unwrap()),
        client_id: Some(sim.client_id()),
        client_secret: Some(Secret::new("wrong")),
        ..MarketoConfig::default()
    };
    let err = MarketoClient::new(&cfg).unwrap().probe().await.unwrap_err();
    assert!(err.is_configuration(), "{err:?}");
    assert!(
        !err.to_string().contains("wrong"),
        "the secret never appears in errors: {err}"
    );
    assert_eq!(sim.rest_call_count(), 0);
}

#[tokio::test]
async fn transient_faults_are_retried_until_they_clear() {
    let faults = [
        Fault::HttpStatus {
            status: 500,
            times: 2,
        },
        Fault::HttpStatus {
            status: 503,
            times: 2,
        },
        Fault::ErrorCode { code: 502, times: 2 },
        Fault::ErrorCode { code: 604, times: 2 },
        Fault::ErrorCode { code: 606, times: 2 },
        Fault::ErrorCode { code: 608, times: 2 },
        Fault::ErrorCode { code: 611, times: 2 },
        Fault::ErrorCode { code: 615, times: 2 },
        Fault::ErrorCode { code: 713, times: 2 },
        Fault::DropConnection { times: 2 },
        // Past the client's (scaled) 1.4 s timeout.
        Fault::Delay {
            delay: Duration::from_millis(2_000),
            times: 1,
        },
    ];
    for fault in faults {
        let label = format!("{fault:?}");
        let (sim, client) = setup(MarketoSimConfig::default(), |c| c.window_secs = 0.05).await;
        sim.inject(fault);
        let results = client.sync_opportunities(vec![opp("A")]).await;
        assert!(
            results.as_ref().is_ok_and(|r| r[0].is_done()),
            "{label}: {results:?}"
        );
        let expected_calls = if label.starts_with("Delay") { 2 } else { 3 };
        assert_eq!(sim.call_count(OPPS), expected_calls, "{label}");
    }
}

#[tokio::test]
async fn exhausted_retries_are_retryable() {
    let (sim, client) = setup(MarketoSimConfig::default(), |c| c.max_retries = 2).await;
    sim.inject(Fault::ErrorCode { code: 608, times: 10 });
    let err = client.sync_opportunities(vec![opp("A")]).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.code(), "608");
    assert_eq!(sim.call_count(OPPS), 3, "one call and two retries");

    let (sim, client) = setup(MarketoSimConfig::default(), |c| c.max_retries = 1).await;
    sim.inject(Fault::DropConnection { times: 10 });
    let err = client.delete_opportunities(&["A".into()]).await.unwrap_err();
    assert!(err.is_retryable() && err.code() == "network", "{err:?}");
}

#[tokio::test]
async fn quota_607_stops_at_once_and_until_the_reset() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    sim.inject(Fault::ErrorCode { code: 607, times: 5 });
    let err = client.sync_opportunities(vec![opp("A")]).await.unwrap_err();
    assert!(matches!(err, MarketoError::QuotaExhausted { .. }), "{err:?}");
    assert_eq!(sim.call_count(OPPS), 1);
    let again = client.sync_opportunities(vec![opp("A")]).await.unwrap_err();
    assert!(matches!(again, MarketoError::QuotaExhausted { .. }));
    assert_eq!(sim.call_count(OPPS), 1, "no call once Marketo said 607");
    assert_eq!(client.usage().quota_left, 0);

    // The client's own count of the daily quota refuses before Marketo has to.
    let (sim, client) = setup(MarketoSimConfig::default(), |c| c.daily_quota = 2).await;
    for id in ["A", "B"] {
        client.sync_opportunities(vec![opp(id)]).await.unwrap();
    }
    let err = client.sync_opportunities(vec![opp("C")]).await.unwrap_err();
    assert!(matches!(err, MarketoError::QuotaExhausted { .. }), "{err:?}");
    assert_eq!(sim.rest_call_count(), 2);
}

#[tokio::test]
async fn bodies_over_the_limit_are_split() {
    let (sim, client) = setup(MarketoSimConfig::default(), |c| c.max_body_bytes = 10_000).await;
    let filler = "x".repeat(1_000);
    let mut records: Vec<_> = (0..30)
        .map(|i| {
            let mut r = opp(&format!("OPP-{i}"));
            r.insert("description".into(), json!(filler));
            r
        })
        .collect();
    let mut huge = opp("HUGE");
    huge.insert("description".into(), json!("y".repeat(20_000)));
    records.push(huge);
    let results = client.sync_opportunities(records).await.unwrap();
    assert!(results[..30].iter().all(RecordResult::is_done));
    assert!(matches!(&results[30], RecordResult::Failed { code, .. } if code == "413"));
    let calls = rest_calls(&sim);
    assert!(calls.len() >= 4, "{}", calls.len());
    for call in &calls {
        assert!(serde_json::to_vec(&call.body).unwrap().len() < 10_000);
    }
    assert_eq!(sim.opportunities().len(), 30);
}

#[tokio::test]
async fn delete_of_a_missing_record_is_done() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    client.sync_opportunities(vec![opp("THERE")]).await.unwrap();
    let results = client
        .delete_opportunities(&["THERE".into(), "NOT-THERE".into()])
        .await
        .unwrap();
    assert!(matches!(
        results[0],
        RecordResult::Done {
            status: RecordStatus::Deleted,
            id: Some(_)
        }
    ));
    assert_eq!(
        results[1],
        RecordResult::Done {
            status: RecordStatus::Unchanged,
            id: None
        }
    );
    assert!(sim.opportunities().is_empty());
    assert_eq!(rest_calls(&sim)[1].body["deleteBy"], "dedupeFields");
}

#[tokio::test]
async fn duplicate_keys_in_one_call_are_merged_last_wins() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    let mut second = opp("DUP");
    second.insert("name".into(), json!("second"));
    let results = client
        .sync_opportunities(vec![opp("DUP"), opp("OTHER"), second])
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(RecordResult::is_done));
    assert_eq!(results[0], results[2]);
    assert_eq!(sim.opportunities()["DUP"]["name"], "second");
    assert_eq!(rest_calls(&sim)[0].body["input"].as_array().unwrap().len(), 2);
}

fn role(opp: &str, lead: i64, name: &str) -> RoleRecord {
    RoleRecord {
        external_opportunity_id: opp.into(),
        lead_id: lead,
        role: name.into(),
        is_primary: false,
    }
}

#[tokio::test]
async fn companies_leads_and_roles_round_trip() {
    let (sim, client) = setup(MarketoSimConfig::default(), |_| {}).await;
    let companies = client
        .sync_companies(vec![obj(
            json!({ "externalCompanyId": "ACCT-1", "company": "Acme" }),
        )])
        .await
        .unwrap();
    assert!(
        matches!(&companies[0], RecordResult::Done { status: RecordStatus::Created, id: Some(id) } if id.parse::<i64>().is_ok())
    );

    sim.add_lead(obj(json!({ "email": "known@example.com" })));
    let leads = client
        .sync_leads(
            vec![
                obj(json!({ "email": "new@example.com", "firstName": "New" })),
                obj(json!({ "firstName": "No email" })),
                obj(json!({ "email": "known@example.com", "lastName": "Known" })),
            ],
            "email",
        )
        .await
        .unwrap();
    assert!(matches!(
        leads[0],
        RecordResult::Done {
            status: RecordStatus::Created,
            ..
        }
    ));
    assert!(matches!(&leads[1], RecordResult::Failed { code, .. } if code == "1003"));
    assert!(matches!(
        leads[2],
        RecordResult::Done {
            status: RecordStatus::Updated,
            ..
        }
    ));

    let found = client
        .find_leads(
            "email",
            &[
                "known@example.com".into(),
                "new@example.com".into(),
                "nobody@example.com".into(),
            ],
            &["email", "lastName"],
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
    let known = found
        .iter()
        .find(|l| l.fields["email"] == "known@example.com")
        .unwrap();
    assert_eq!(known.fields["lastName"], "Known");

    client.sync_opportunities(vec![opp("OPP-1")]).await.unwrap();
    let roles = [
        role("OPP-1", known.id, "Champion"),
        role("OPP-404", known.id, "Champion"),
    ];
    let results = client.sync_roles(&roles).await.unwrap();
    assert!(matches!(
        results[0],
        RecordResult::Done {
            status: RecordStatus::Created,
            ..
        }
    ));
    assert!(matches!(&results[1], RecordResult::Failed { code, .. } if code == "1013"));
    assert_eq!(sim.roles().len(), 1);
    let deleted = client.delete_roles(&roles).await.unwrap();
    assert!(matches!(
        deleted[0],
        RecordResult::Done {
            status: RecordStatus::Deleted,
            ..
        }
    ));
    assert!(matches!(
        deleted[1],
        RecordResult::Done {
            status: RecordStatus::Unchanged,
            ..
        }
    ));
    assert!(sim.roles().is_empty());
}

#[tokio::test]
async fn codes_may_arrive_as_numbers() {
    let env: wire::Envelope =
        serde_json::from_str(r#"{"requestId":"a#b","success":false,"errors":[{"code":606,"message":"m"}]}"#)
            .unwrap();
    assert_eq!(env.errors()[0].code, "606");
    assert!(!env.success);
}
