//! The admin API (`/admin/...`): look at and re-drive what oppsync is doing. Every route takes a
//! JWT bearer token (`auth.rs`): `oppsync.read` for reads, `oppsync.write` for changes.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::admin_responses::{ReadRefusals, WorkerRefusals, WriteRefusals};
use super::auth::{AdminRead, AdminWrite};
use super::problem::{ApiError, Problem};
use crate::rules::{
    self, ConnectionRoleInfo, ConnectionState, OpportunityState, Projection, RejectedValue, World, WriteKey,
};
use crate::service::Blocked;
use crate::store::{InboxEntry, RowKeys, Status, StoreError, StoreStats, StoredWrite, now_ms};
use crate::worker::ResyncError;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

/// `Query` whose rejection is a problem+json 400 (axum's own answers text/plain).
#[derive(FromRequestParts)]
#[from_request(via(Query), rejection(ApiError))]
pub struct ProblemQuery<T>(pub T);

/// `Path` whose rejection is a problem+json 400.
#[derive(FromRequestParts)]
#[from_request(via(Path), rejection(ApiError))]
pub struct ProblemPath<T>(pub T);

fn limit(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {n}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Opportunity sync state

/// Where a Marketo opportunity role comes from.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoleSource {
    /// `customer` (the potential customer rule) or `connection` (a stakeholder connection).
    #[schema(example = "connection")]
    pub kind: &'static str,
    /// The Dynamics connection, for `connection`.
    pub connection_id: Option<String>,
}

/// One opportunity role Marketo should hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoleView {
    pub contact_id: String,
    #[schema(example = "Stakeholder")]
    pub role: String,
    /// Every rule that justifies the role (it stays while one does).
    pub sources: Vec<RoleSource>,
}

/// The Marketo company of an opportunity (`externalCompanyId` = Dynamics accountid).
#[derive(Debug, Serialize, ToSchema)]
pub struct CompanyView {
    pub account_id: String,
    pub name: Option<String>,
}

/// What oppsync knows and plans for one opportunity.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpportunitySync {
    pub id: String,
    /// Deleted in Dynamics (a tombstone keeps stale updates from bringing it back).
    pub deleted: bool,
    /// Whether a full row was seen (a Create, a post image or a Web API read).
    pub seen_in_full: bool,
    /// The newest Dynamics version (ms since the epoch) applied to this opportunity.
    pub last_version: Option<i64>,
    /// The Dynamics attributes received, each with its value and version.
    #[schema(value_type = Object)]
    pub dynamics_fields: serde_json::Value,
    /// The potential customer (`customerid`) with its version, if known.
    #[schema(value_type = Option<Object>)]
    pub customer: Option<serde_json::Value>,
    /// The Marketo opportunity fields last planned (null when deleted or not yet planned).
    #[schema(value_type = Option<Object>)]
    pub marketo_fields: Option<serde_json::Value>,
    pub company: Option<CompanyView>,
    pub roles: Vec<RoleView>,
    /// Marketo fields left unchanged because the Dynamics value did not fit the field's
    /// conversion, by Marketo field name.
    pub rejected_values: BTreeMap<String, RejectedValue>,
    /// Marketo writes for this opportunity that are not done (pending or dead), newest first.
    pub writes: Vec<StoredWrite>,
    /// The last error of those writes, if any.
    pub last_error: Option<String>,
}

/// A stored row this version cannot read: the view would be wrong without it.
fn unreadable(e: StoreError) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Sync state of one opportunity.
#[utoipa::path(
    get,
    path = "/admin/opportunities/{id}",
    tag = "admin",
    params(("id" = Uuid, Path, description = "Dynamics opportunityid")),
    responses(
        (status = 200, description = "Success", body = OpportunitySync),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "oppsync knows no such opportunity", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "Stored state unreadable", body = Problem, content_type = "application/problem+json"),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn opportunity(
    _auth: AdminRead,
    State(state): State<AppState>,
    ProblemPath(id): ProblemPath<Uuid>,
) -> Result<Json<OpportunitySync>, ApiError> {
    let store = &state.store;
    let row = store
        .opportunity_row(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("oppsync knows no opportunity {id}.")))?;
    let opp: OpportunityState = row.decode().map_err(unreadable)?;
    let projection: Option<Projection> = row.decode_projection().map_err(unreadable)?;

    // The connections of this opportunity and their role names say which roles they justify.
    let loaded = store
        .load_rows(&RowKeys {
            connections_of_opportunities: vec![id],
            ..RowKeys::default()
        })
        .await?;
    let connections: Vec<ConnectionState> = loaded
        .connections
        .iter()
        .map(|r| r.decode().map_err(unreadable))
        .collect::<Result<_, _>>()?;
    let role_ids: Vec<Uuid> = connections.iter().filter_map(|c| c.role_id).collect();
    let roles_known = if role_ids.is_empty() {
        Vec::new()
    } else {
        store
            .load_rows(&RowKeys {
                role_ids,
                ..RowKeys::default()
            })
            .await?
            .roles
    };
    // The contacts those roles would go to: a deleted one gets none.
    let mut contact_ids: Vec<Uuid> = connections.iter().filter_map(|c| c.contact_id).collect();
    contact_ids.extend(
        opp.customer()
            .filter(|c| c.logical_name == "contact")
            .map(|c| c.id),
    );
    let contacts: BTreeMap<Uuid, rules::ContactState> = if contact_ids.is_empty() {
        BTreeMap::new()
    } else {
        store
            .load_rows(&RowKeys {
                contact_ids,
                ..RowKeys::default()
            })
            .await?
            .contacts
            .iter()
            .map(|r| Ok((r.id, r.decode().map_err(unreadable)?)))
            .collect::<Result<_, ApiError>>()?
    };
    // Which rule justifies each role: the rules' own statement of them, over what is stored.
    let world = World {
        opportunities: BTreeMap::from([(id, opp.clone())]),
        connections: connections.iter().map(|c| (c.id, c.clone())).collect(),
        contacts,
        accounts: BTreeMap::new(),
        roles: roles_known
            .into_iter()
            .map(|r| {
                (
                    r.id,
                    ConnectionRoleInfo {
                        id: r.id,
                        name: r.name,
                        category: r.category,
                    },
                )
            })
            .collect(),
    };
    let sources = rules::role_sources(&opp, &world, &state.config.sync, &mut BTreeSet::new());

    let roles = projection
        .as_ref()
        .map(|p| {
            p.roles
                .iter()
                .map(|key| RoleView {
                    contact_id: key.contact_id.to_string(),
                    role: key.role.clone(),
                    sources: sources
                        .get(key)
                        .into_iter()
                        .flatten()
                        .map(|source| match source {
                            rules::RoleSource::Customer => RoleSource {
                                kind: "customer",
                                connection_id: None,
                            },
                            rules::RoleSource::Connection(c) => RoleSource {
                                kind: "connection",
                                connection_id: Some(c.to_string()),
                            },
                        })
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();

    let mut writes = Vec::new();
    for status in [Status::Pending, Status::Dead] {
        writes.extend(store.list_writes(Some(status), Some(id), MAX_LIMIT).await?);
    }
    writes.sort_by_key(|w| std::cmp::Reverse(w.updated_at));
    let last_error = writes.iter().find_map(|w| w.last_error.clone());
    let last_version = opp
        .fields
        .values()
        .map(|v| v.version)
        .chain(opp.customer.as_ref().map(|c| c.version))
        .chain(opp.deleted_at)
        .max();
    Ok(Json(OpportunitySync {
        id: id.to_string(),
        deleted: opp.deleted_at.is_some(),
        seen_in_full: opp.seen_in_full,
        last_version,
        dynamics_fields: serde_json::to_value(&opp.fields).unwrap_or_default(),
        customer: opp.customer.as_ref().and_then(|c| serde_json::to_value(c).ok()),
        marketo_fields: projection
            .as_ref()
            .and_then(|p| p.opportunity.clone())
            .map(serde_json::Value::Object),
        company: projection.as_ref().and_then(|p| {
            p.company.as_ref().map(|c| CompanyView {
                account_id: c.account_id.to_string(),
                name: c.name.clone(),
            })
        }),
        roles,
        rejected_values: projection
            .as_ref()
            .map(|p| p.rejected.clone())
            .unwrap_or_default(),
        writes,
        last_error,
    }))
}

/// The result of a re-sync.
#[derive(Debug, Serialize, ToSchema)]
pub struct Resynced {
    pub opportunity_id: String,
    /// Marketo writes planned (0 when Marketo already holds the current state).
    pub writes_planned: usize,
}

/// Re-syncs one opportunity from the Dataverse Web API (reads the row and plans it as if a
/// full-row notification had arrived).
#[utoipa::path(
    post,
    path = "/admin/opportunities/{id}/resync",
    tag = "admin",
    params(("id" = Uuid, Path, description = "Dynamics opportunityid")),
    responses(
        (status = 200, description = "Success", body = Resynced),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Dynamics has no such opportunity", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "Stored state unreadable", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Dataverse Web API failed", body = Problem, content_type = "application/problem+json"),
        WorkerRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn resync(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemPath(id): ProblemPath<Uuid>,
) -> Result<Json<Resynced>, ApiError> {
    if !state.worker.is_running() {
        return Err(ApiError::WorkerNotRunning);
    }
    tracing::info!(opportunity = %id, by = claims.sub.as_deref().unwrap_or(""), "admin re-sync");
    match state.worker.resync(id).await {
        Ok(writes) => Ok(Json(Resynced {
            opportunity_id: id.to_string(),
            writes_planned: writes,
        })),
        Err(ResyncError::NotRunning) => Err(ApiError::WorkerNotRunning),
        Err(ResyncError::NotFound(_)) => Err(ApiError::NotFound(format!(
            "Dynamics has no opportunity {id} (the Dataverse Web API answered 404)."
        ))),
        Err(ResyncError::Upstream(e)) => Err(ApiError::Upstream(e.to_string())),
        Err(ResyncError::Store(e)) => Err(e.into()),
        Err(ResyncError::Internal(e)) => Err(ApiError::Internal(e.to_string())),
    }
}

/// Refused: opportunities are created in Dynamics 365 and synced one way to Marketo.
#[utoipa::path(
    post,
    path = "/admin/opportunities",
    tag = "admin",
    responses(
        (status = 401, description = "Bearer token missing or refused", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Always (with a valid token): opportunities are created in Dynamics 365 and synced one way to Marketo", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Admin API not configured", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn create_opportunity(_auth: AdminWrite) -> ApiError {
    ApiError::MarketoSideCreation
}

// ---------------------------------------------------------------------------------------------
// Notifications

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NotificationQuery {
    /// Only notifications with this status.
    #[param(value_type = Option<Status>)]
    pub status: Option<String>,
    /// Paging: only notifications with an id below this (the previous page's `next`).
    pub before: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// A page of notifications, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationPage {
    pub items: Vec<InboxEntry>,
    /// Pass as `before` for the next page; null on the last page.
    pub next: Option<i64>,
}

/// Lists notifications, newest first.
#[utoipa::path(
    get,
    path = "/admin/notifications",
    tag = "admin",
    params(NotificationQuery),
    responses(
        (status = 200, description = "Success", body = NotificationPage),
        (status = 400, description = "Unknown status or limit out of range", body = Problem, content_type = "application/problem+json"),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn list_notifications(
    _auth: AdminRead,
    State(state): State<AppState>,
    ProblemQuery(q): ProblemQuery<NotificationQuery>,
) -> Result<Json<NotificationPage>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown status {s:?}; use pending, done, dead or discarded"
                ))
            })
        })
        .transpose()?;
    let limit = limit(q.limit)?;
    let items = state.store.list_notifications(status, q.before, limit).await?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|e| e.id))
        .flatten();
    Ok(Json(NotificationPage { items, next }))
}

/// One notification, with the body Dynamics sent.
#[utoipa::path(
    get,
    path = "/admin/notifications/{id}",
    tag = "admin",
    params(("id" = i64, Path, description = "Inbox id")),
    responses(
        (status = 200, description = "Success", body = InboxEntry),
        (status = 400, description = "The id is not a number", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such notification", body = Problem, content_type = "application/problem+json"),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn notification(
    _auth: AdminRead,
    State(state): State<AppState>,
    ProblemPath(id): ProblemPath<i64>,
) -> Result<Json<InboxEntry>, ApiError> {
    state
        .store
        .notification(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("There is no notification {id}.")))
}

/// How many records an admin action changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Changed {
    pub changed: u64,
}

async fn notification_exists(state: &AppState, id: i64) -> Result<InboxEntry, ApiError> {
    state
        .store
        .notification(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("There is no notification {id}.")))
}

/// Puts a dead (or discarded) notification back to pending.
#[utoipa::path(
    post,
    path = "/admin/notifications/{id}/retry",
    tag = "admin",
    params(("id" = i64, Path, description = "Inbox id")),
    responses(
        (status = 200, description = "Success", body = Changed),
        (status = 400, description = "The id is not a number", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such notification", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The notification is not dead or discarded", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn retry_notification(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemPath(id): ProblemPath<i64>,
) -> Result<Json<Changed>, ApiError> {
    let entry = notification_exists(&state, id).await?;
    let changed = state.store.retry_notifications(Some(id), None).await?;
    if changed == 0 {
        return Err(ApiError::Conflict(format!(
            "Notification {id} is {}; only dead or discarded ones can be retried.",
            entry.status.as_str()
        )));
    }
    tracing::info!(
        inbox_id = id,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin retry"
    );
    Ok(Json(Changed { changed }))
}

/// Discards a dead or pending notification (it will not be applied).
#[utoipa::path(
    post,
    path = "/admin/notifications/{id}/discard",
    tag = "admin",
    params(("id" = i64, Path, description = "Inbox id")),
    responses(
        (status = 200, description = "Success", body = Changed),
        (status = 400, description = "The id is not a number", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such notification", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The notification is already done or discarded", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn discard_notification(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemPath(id): ProblemPath<i64>,
) -> Result<Json<Changed>, ApiError> {
    let entry = notification_exists(&state, id).await?;
    let changed = state.store.discard_notification(id).await?;
    if changed == 0 {
        return Err(ApiError::Conflict(format!(
            "Notification {id} is {}; only dead or pending ones can be discarded.",
            entry.status.as_str()
        )));
    }
    tracing::info!(
        inbox_id = id,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin discard"
    );
    Ok(Json(Changed { changed }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetryDeadQuery {
    /// Only notifications of this entity (`opportunity`, `connection`, `contact`).
    pub entity: Option<String>,
}

/// Puts every dead notification (optionally of one entity) back to pending.
#[utoipa::path(
    post,
    path = "/admin/notifications/retry-dead",
    tag = "admin",
    params(RetryDeadQuery),
    responses(
        (status = 200, description = "Success", body = Changed),
        (status = 400, description = "Malformed query", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn retry_dead_notifications(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemQuery(q): ProblemQuery<RetryDeadQuery>,
) -> Result<Json<Changed>, ApiError> {
    let changed = state.store.retry_notifications(None, q.entity.as_deref()).await?;
    tracing::info!(
        changed,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin retry of dead notifications"
    );
    Ok(Json(Changed { changed }))
}

// ---------------------------------------------------------------------------------------------
// Marketo writes

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WriteQuery {
    /// Only writes with this status.
    #[param(value_type = Option<Status>)]
    pub status: Option<String>,
    /// Only writes for this Dynamics opportunityid.
    pub opportunity_id: Option<Uuid>,
    /// At most this many, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// Lists Marketo writes, most recently changed first.
#[utoipa::path(
    get,
    path = "/admin/writes",
    tag = "admin",
    params(WriteQuery),
    responses(
        (status = 200, description = "Success", body = Vec<StoredWrite>),
        (status = 400, description = "Unknown status, malformed id or limit out of range", body = Problem, content_type = "application/problem+json"),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn list_writes(
    _auth: AdminRead,
    State(state): State<AppState>,
    ProblemQuery(q): ProblemQuery<WriteQuery>,
) -> Result<Json<Vec<StoredWrite>>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown status {s:?}; use pending, done, dead or discarded"
                ))
            })
        })
        .transpose()?;
    let limit = limit(q.limit)?;
    Ok(Json(
        state.store.list_writes(status, q.opportunity_id, limit).await?,
    ))
}

/// The write key of a path, or a 400 saying what a key looks like.
fn write_key(key: &str) -> Result<WriteKey, ApiError> {
    key.parse()
        .map_err(|e: crate::rules::BadWriteKey| ApiError::BadRequest(e.to_string()))
}

async fn write_status(state: &AppState, key: &WriteKey) -> Result<Status, ApiError> {
    state
        .store
        .write_statuses(std::slice::from_ref(key))
        .await?
        .remove(key)
        .ok_or_else(|| ApiError::NotFound(format!("There is no Marketo write \"{key}\".")))
}

/// Puts a dead (or discarded) Marketo write back to pending.
#[utoipa::path(
    post,
    path = "/admin/writes/{key}/retry",
    tag = "admin",
    params(("key" = String, Path, description = "Marketo record key of the write (URL-encoded)")),
    responses(
        (status = 200, description = "Success", body = Changed),
        (status = 400, description = "The key is not a write key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The write is not dead or discarded", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn retry_write(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemPath(key): ProblemPath<String>,
) -> Result<Json<Changed>, ApiError> {
    let key = write_key(&key)?;
    let status = write_status(&state, &key).await?;
    let changed = state.store.retry_writes(Some(&key)).await?;
    if changed == 0 {
        return Err(ApiError::Conflict(format!(
            "The write \"{key}\" is {}; only dead or discarded ones can be retried.",
            status.as_str()
        )));
    }
    tracing::info!(
        key = %key,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin retry of a write"
    );
    state.worker.wake_pusher();
    Ok(Json(Changed { changed }))
}

/// Discards a dead or pending Marketo write (it will not be pushed).
#[utoipa::path(
    post,
    path = "/admin/writes/{key}/discard",
    tag = "admin",
    params(("key" = String, Path, description = "Marketo record key of the write (URL-encoded)")),
    responses(
        (status = 200, description = "Success", body = Changed),
        (status = 400, description = "The key is not a write key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The write is already done or discarded", body = Problem, content_type = "application/problem+json"),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn discard_write(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
    ProblemPath(key): ProblemPath<String>,
) -> Result<Json<Changed>, ApiError> {
    let key = write_key(&key)?;
    let status = write_status(&state, &key).await?;
    let changed = state.store.discard_write(&key).await?;
    if changed == 0 {
        return Err(ApiError::Conflict(format!(
            "The write \"{key}\" is {}; only dead or pending ones can be discarded.",
            status.as_str()
        )));
    }
    tracing::info!(
        key = %key,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin discard of a write"
    );
    Ok(Json(Changed { changed }))
}

/// Puts every dead Marketo write back to pending.
#[utoipa::path(
    post,
    path = "/admin/writes/retry-dead",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = Changed),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn retry_dead_writes(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
) -> Result<Json<Changed>, ApiError> {
    let changed = state.store.retry_writes(None).await?;
    tracing::info!(
        changed,
        by = claims.sub.as_deref().unwrap_or(""),
        "admin retry of dead writes"
    );
    state.worker.wake_pusher();
    Ok(Json(Changed { changed }))
}

// ---------------------------------------------------------------------------------------------
// Pause, resume, stats

/// Whether pushing to Marketo is paused.
#[derive(Debug, Serialize, ToSchema)]
pub struct PauseState {
    pub paused: bool,
}

/// Pauses pushing to Marketo on every replica (intake and planning go on).
#[utoipa::path(
    post,
    path = "/admin/pause",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = PauseState),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn pause(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
) -> Result<Json<PauseState>, ApiError> {
    state.worker.pause().await?;
    tracing::warn!(
        by = claims.sub.as_deref().unwrap_or(""),
        "pushing to Marketo paused"
    );
    Ok(Json(PauseState { paused: true }))
}

/// Resumes pushing to Marketo.
#[utoipa::path(
    post,
    path = "/admin/resume",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = PauseState),
        WriteRefusals,
    ),
    security(("admin_jwt" = ["oppsync.write"]))
)]
pub async fn resume(
    AdminWrite(claims): AdminWrite,
    State(state): State<AppState>,
) -> Result<Json<PauseState>, ApiError> {
    state.worker.resume().await?;
    tracing::info!(
        by = claims.sub.as_deref().unwrap_or(""),
        "pushing to Marketo resumed"
    );
    Ok(Json(PauseState { paused: false }))
}

/// Marketo API use by this process today.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarketoUsage {
    /// REST calls made today (other integrations share the instance's quota too).
    pub calls_today: u32,
    pub daily_quota: u32,
    pub quota_left: u32,
    /// Times a call waited for the rate limiter (not failures).
    pub limiter_waits: u64,
    pub limiter_wait_seconds: f64,
    pub token_refreshes: u64,
}

/// What oppsync is doing.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminStats {
    pub store: StoreStats,
    /// Pushing to Marketo is paused.
    pub paused: bool,
    /// This process runs a worker (planner and pusher).
    pub worker_running: bool,
    /// Marketo use today (null when this process runs no worker).
    pub marketo: Option<MarketoUsage>,
    /// What stops the sync from outside, each with its message and since when: a Marketo or
    /// Dataverse setting (1018 native CRM sync enabled, bad credentials, a revoked application
    /// user). Intake goes on meanwhile; empty when nothing blocks.
    pub blocked: Vec<Blocked>,
    /// Milliseconds since the epoch, when these were taken.
    pub at: i64,
}

/// Queue depths, dead letters, Marketo calls and quota today.
#[utoipa::path(
    get,
    path = "/admin/stats",
    tag = "admin",
    responses(
        (status = 200, description = "Success", body = AdminStats),
        ReadRefusals,
    ),
    security(("admin_jwt" = ["oppsync.read"]))
)]
pub async fn stats(_auth: AdminRead, State(state): State<AppState>) -> Result<Json<AdminStats>, ApiError> {
    let at = now_ms();
    let store = state.store.stats(at).await?;
    let paused = state.worker.is_paused().await?;
    let marketo = state.worker.marketo_usage().map(|u| MarketoUsage {
        calls_today: u.calls_today,
        daily_quota: u.daily_quota,
        quota_left: u.quota_left,
        limiter_waits: u.limiter_waits,
        limiter_wait_seconds: u.limiter_wait_seconds,
        token_refreshes: u.token_refreshes,
    });
    Ok(Json(AdminStats {
        store,
        paused,
        worker_running: state.worker.is_running(),
        marketo,
        blocked: state.lifecycle.blocked(),
        at,
    }))
}
