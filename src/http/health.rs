//! Kubernetes probes. Liveness does no I/O (a slow database must not get the pod killed);
//! readiness says whether this instance should receive traffic.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

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
