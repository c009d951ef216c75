//! Kubernetes probes. Liveness does no I/O (a slow database must not get the pod killed);
//! readiness says whether this instance should receive traffic.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::worker::ReconcileStatus;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each check by name: `ok` or what is wrong.
    pub checks: std::collections::BTreeMap<&'static str, String>,
}

/// Liveness: the process is up, can still store notifications, and its worker runs. No I/O.
/// A failed fsync of the inbox makes it fail: then nothing but a restart (SQLite's recovery
/// reading what is really on disk) makes intake trustworthy again, which is what a failing
/// liveness probe gets. So does a worker whose loops kept failing and were given up: notifications
/// would pile up unplanned behind a green probe.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "The process is up", body = Health),
        (status = 503, description = "An fsync of the inbox failed (`intake_failed`: intake refuses notifications until restarted), or the worker's loops kept failing and were given up (`worker_gone`)", body = Health),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.intake.has_failed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "intake_failed",
            }),
        )
    } else if state.lifecycle.is_worker_gone() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "worker_gone",
            }),
        )
    } else {
        (StatusCode::OK, Json(Health { status: "ok" }))
    }
}

/// Readiness: whether this instance should receive webhooks. It depends on the store (reachable,
/// migrated) and on not draining, and on nothing outside: a Marketo or Dataverse setting (1018,
/// bad credentials, a revoked application user) stops the sync, not intake, and is reported in
/// `/admin/stats`, `oppsync_marketo_blocked` / `oppsync_dataverse_blocked` and the logs. Taking
/// the only replica out of the Service for it would make Dynamics fail its webhooks.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, description = "Ready", body = Readiness), (status = 503, body = Readiness, description = "Not ready; `checks` says why"))
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let mut checks = std::collections::BTreeMap::new();
    let mut ready = true;
    let store = match tokio::time::timeout(std::time::Duration::from_secs(2), async {
        state.store.ensure_schema().await?;
        state.store.ping().await
    })
    .await
    {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => {
            ready = false;
            e.to_string()
        }
        Err(_) => {
            ready = false;
            "the store did not answer within 2 s".to_owned()
        }
    };
    let store_answers = store == "ok";
    checks.insert("store", store);
    // The last commit of intake failed (disk full, a refusing database): ready again once a
    // probe commit (rolled back) goes through.
    let commits = if state.intake.is_refusing() && !state.intake.has_failed() {
        match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.probe_intake()).await {
            Ok(Ok(())) => {
                state.intake.commits_again();
                None
            }
            Ok(Err(e)) => Some(format!("intake cannot commit: {e}")),
            Err(_) => Some("intake's probe commit did not finish within 2 s".to_owned()),
        }
    } else {
        None
    };
    // Intake refuses every notification after a failed fsync or a deleted store: no traffic.
    if let Some(why) = commits {
        ready = false;
        checks.insert("intake", why);
    } else if state.intake.has_failed() {
        ready = false;
        checks.insert(
            "intake",
            "refusing notifications: the inbox could not be made durable; restart oppsync".to_owned(),
        );
    } else {
        checks.insert("intake", "ok".to_owned());
    }
    if state.lifecycle.is_draining() {
        ready = false;
        checks.insert("lifecycle", "shutting down".to_owned());
    } else {
        checks.insert("lifecycle", "ok".to_owned());
    }
    // Informational: which replica pushes to Marketo (never affects readiness).
    checks.insert(
        "pusher",
        if state.lifecycle.is_pushing() {
            "leader"
        } else {
            "standby"
        }
        .to_owned(),
    );
    // Informational too: where reconciliation can see deletes (never affects readiness). Not
    // asked of a store that did not answer, so the probe stays within its timeout.
    let tracking = if store_answers {
        change_tracking(&state).await
    } else {
        "unknown: the store did not answer".to_owned()
    };
    checks.insert("change_tracking", tracking);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Once per change, not once per probe. Draining is a requested stop, not a failure.
    if state.lifecycle.readiness_changed(ready) {
        if ready {
            tracing::info!("ready to take webhooks: the store answers and its schema is current");
        } else if state.lifecycle.is_draining() {
            tracing::info!("not ready: shutting down");
        } else {
            tracing::error!(
                store = %checks.get("store").map_or("", String::as_str),
                intake = %checks.get("intake").map_or("", String::as_str),
                "not ready: the store fails its check"
            );
        }
    }
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        }),
    )
}

/// What the last reconciliation pass learnt of change tracking, table by table.
async fn change_tracking(state: &AppState) -> String {
    let interval = state.config.reconcile.interval_secs;
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        state.worker.reconcile_status(interval),
    )
    .await
    {
        Ok(Ok(status)) => describe_change_tracking(&status),
        Ok(Err(e)) => format!("unknown: {e}"),
        Err(_) => "unknown: the store did not answer within 2 s".to_owned(),
    }
}

/// `on`, the tables where it is off (their deletes then rely on webhooks), or why it is not
/// known.
fn describe_change_tracking(status: &ReconcileStatus) -> String {
    let off: Vec<&str> = status
        .tables
        .iter()
        .filter(|t| t.change_tracking == Some(false))
        .map(|t| t.table.as_str())
        .collect();
    if !off.is_empty() {
        return format!(
            "off for {}: reconciliation finds their updates by modifiedon but not their deletes, \
             which rely on webhooks; `oppsync register --enable-change-tracking` turns it on",
            off.join(", ")
        );
    }
    let known = status.tables.iter().any(|t| t.change_tracking.is_some());
    match (known, status.interval_secs) {
        (true, _) => "on".to_owned(),
        (false, 0) => "not known: reconciliation is off (reconcile.interval_secs = 0)".to_owned(),
        (false, _) => "not known yet: no reconciliation pass has run".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::TableReconcile;

    fn status(interval_secs: u64, tracking: &[(&str, Option<bool>)]) -> ReconcileStatus {
        ReconcileStatus {
            interval_secs,
            tables: tracking
                .iter()
                .map(|(table, change_tracking)| TableReconcile {
                    table: (*table).to_owned(),
                    change_tracking: *change_tracking,
                    ..TableReconcile::default()
                })
                .collect(),
        }
    }

    #[test]
    fn change_tracking_is_described_table_by_table() {
        let off = describe_change_tracking(&status(
            900,
            &[
                ("opportunity", Some(false)),
                ("connection", Some(true)),
                ("contact", Some(false)),
            ],
        ));
        assert!(off.starts_with("off for opportunity, contact:"), "{off}");
        assert!(off.contains("--enable-change-tracking"), "{off}");
        assert_eq!(
            describe_change_tracking(&status(900, &[("opportunity", Some(true)), ("contact", None)])),
            "on"
        );
        assert!(
            describe_change_tracking(&status(900, &[("opportunity", None)])).starts_with("not known yet")
        );
        assert!(
            describe_change_tracking(&status(0, &[("opportunity", None)])).contains("reconciliation is off")
        );
    }
}
