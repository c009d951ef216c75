//! Admin routes of the initial sync (`/admin/backfill`: start one, follow it, cancel it) and of
//! reconciliation (`/admin/reconcile`: what the last pass found; run one now). Both run in the
//! worker, on the replica that pushes to Marketo.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;
use super::admin_responses::{ReadRefusals, WorkerRefusals, WriteRefusals};
use super::auth::{AdminRead, AdminWrite};
use super::problem::{ApiError, Problem};
use serde::Deserialize;
use utoipa::IntoParams;

use super::admin::ProblemQuery;
use crate::worker::{
    BackfillProgress, BackfillRequest, DriftError, DriftRepair, DriftReport, ReconcileStatus, StartError,
};

async fn current(state: &AppState) -> Result<BackfillProgress, ApiError> {
    state
        .worker
        .backfill_progress(state.config.backfill.quota_reserve)
        .await?
        .ok_or_else(|| ApiError::NotFound("No backfill has been started.".into()))
}

/// Starts the initial sync: every opportunity (optionally only those `filter` and `since`
/// select), its stakeholder connections and contacts, read from Dataverse and planned through the
/// same rules as webhooks. The body is optional.
#[utoipa::path(
    post,
    path = "/admin/backfill",
    tag = "admin",
    request_body(content = Option<BackfillRequest>, description = "What to back-fill (optional)", content_type = "application/json"),
    responses(
        (status = 202, description = "Started; follow it with GET /admin/backfill", body = BackfillProgress),
        (status = 400, description = "The body is not a valid request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A backfill is already running", body = Problem, content_type = "application/problem+json"),
        WorkerRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn start_backfill(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<BackfillProgress>), ApiError> {
    if !state.worker.is_running() {
        return Err(ApiError::WorkerNotRunning);
    }
    let request: BackfillRequest = if body.iter().all(u8::is_ascii_whitespace) {
        BackfillRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "The body is not a backfill request ({{\"filter\", \"since\"}}): {e}"
            ))
        })?
    };
    let request = request.validated().map_err(ApiError::BadRequest)?;
    match state.worker.start_backfill(&request).await {
        Ok(_) => {}
        Err(StartError::AlreadyRunning(job)) => {
            return Err(ApiError::Conflict(format!(
                "Backfill {} is already running; cancel it with DELETE /admin/backfill or wait for it to end.",
                job.id
            )));
        }
        Err(StartError::Store(e)) => return Err(e.into()),
    }
    tracing::info!(
        by = claims.sub.as_deref().unwrap_or(""),
        "admin started a backfill"
    );
    Ok((StatusCode::ACCEPTED, Json(current(&state).await?)))
}

/// Progress of the current (or last) backfill.
#[utoipa::path(
    get,
    path = "/admin/backfill",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = BackfillProgress),
        (status = 404, description = "No backfill was ever started", body = Problem, content_type = "application/problem+json"),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn backfill_progress(
    _auth: AdminRead,
    State(state): State<AppState>,
) -> Result<Json<BackfillProgress>, ApiError> {
    Ok(Json(current(&state).await?))
}

/// Cancels the running backfill. What it planned already is still pushed; a new backfill can
/// start at once.
#[utoipa::path(
    delete,
    path = "/admin/backfill",
    tag = "admin",
    responses(
        (status = 200, description = "Cancelled", body = BackfillProgress),
        (status = 409, description = "No backfill is running", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn cancel_backfill(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
) -> Result<Json<BackfillProgress>, ApiError> {
    if state.worker.cancel_backfill().await? {
        tracing::info!(
            by = claims.sub.as_deref().unwrap_or(""),
            "admin cancelled the backfill"
        );
        Ok(Json(current(&state).await?))
    } else {
        Err(ApiError::Conflict("No backfill is running.".into()))
    }
}

/// What reconciliation found at its last pass, per table: whether change tracking is on, when the
/// pass ran, the changes it found and the writes they needed, and (change tracking off) the
/// opportunities deleted in Dynamics whose Delete webhook never came.
#[utoipa::path(
    get,
    path = "/admin/reconcile",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = ReconcileStatus),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn reconcile_status(
    _auth: AdminRead,
    State(state): State<AppState>,
) -> Result<Json<ReconcileStatus>, ApiError> {
    Ok(Json(
        state
            .worker
            .reconcile_status(state.config.reconcile.interval_secs)
            .await?,
    ))
}

/// Runs a reconciliation pass now and answers what it found (as `GET /admin/reconcile`).
#[utoipa::path(
    post,
    path = "/admin/reconcile",
    tag = "admin",
    responses(
        (status = 200, description = "The pass ran; per table what it found (a table that failed shows last_error)", body = ReconcileStatus),
        WorkerRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn reconcile_now(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
) -> Result<Json<ReconcileStatus>, ApiError> {
    tracing::info!(
        by = claims.sub.as_deref().unwrap_or(""),
        "admin runs a reconcile pass"
    );
    match state.worker.reconcile_now().await {
        Some(result) => Ok(Json(result?)),
        None => Err(ApiError::WorkerNotRunning),
    }
}

/// The Marketo call budget of a drift report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DriftQuery {
    /// Most Marketo calls to spend (default 100; each 300 opportunities take 6).
    #[param(minimum = 6, maximum = 10000)]
    pub budget: Option<usize>,
}

fn budget(q: &DriftQuery) -> Result<usize, ApiError> {
    match q.budget {
        None => Ok(100),
        Some(n) if (6..=10_000).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "budget must be between 6 and 10000 Marketo calls, not {n}"
        ))),
    }
}

fn drift_error(e: DriftError) -> ApiError {
    match e {
        DriftError::Store(e) => e.into(),
        DriftError::Marketo(e) => ApiError::Upstream(format!("Marketo: {e}")),
        e @ DriftError::Corrupt(..) => ApiError::Internal(e.to_string()),
    }
}

/// Compares what Marketo holds for oppsync's opportunities and their roles with what oppsync
/// projects, querying Marketo by externalOpportunityId within a call budget, and lists every
/// difference: missing, extra, or a field that differs.
#[utoipa::path(
    get,
    path = "/admin/drift",
    tag = "admin",
    params(DriftQuery),
    responses(
        (status = 200, description = "Success", body = DriftReport),
        (status = 400, description = "Budget out of range", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Bearer token missing or refused", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Scope oppsync.read missing", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Marketo failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Admin API not configured, worker not running, or store unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn drift_report(
    _auth: AdminRead,
    State(state): State<AppState>,
    ProblemQuery(q): ProblemQuery<DriftQuery>,
) -> Result<Json<DriftReport>, ApiError> {
    let budget = budget(&q)?;
    match state.worker.drift_report(budget).await {
        Some(r) => Ok(Json(r.map_err(drift_error)?)),
        None => Err(ApiError::WorkerNotRunning),
    }
}

/// Reports the drift (as GET /admin/drift) and queues the writes that fix it: every write of each
/// opportunity that differs, and deletes of extra roles.
#[utoipa::path(
    post,
    path = "/admin/drift/repair",
    tag = "admin",
    params(DriftQuery),
    responses(
        (status = 200, description = "The writes are queued", body = DriftRepair),
        (status = 400, description = "Budget out of range", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Marketo failed", body = Problem, content_type = "application/problem+json"),
        WorkerRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn drift_repair(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemQuery(q): ProblemQuery<DriftQuery>,
) -> Result<Json<DriftRepair>, ApiError> {
    let budget = budget(&q)?;
    tracing::info!(by = claims.sub.as_deref().unwrap_or(""), "admin repairs drift");
    match state.worker.drift_repair(budget).await {
        Some(r) => Ok(Json(r.map_err(drift_error)?)),
        None => Err(ApiError::WorkerNotRunning),
    }
}
