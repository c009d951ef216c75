//! The HTTP surface: Dynamics webhook intake, probes, metrics, the OpenAPI document, the admin
//! API and the refusal of Marketo-side creation. Handlers know the store and little else.

pub mod admin;
pub mod admin_responses;
pub mod admin_sync;
pub mod auth;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod refusal;
pub mod server;
pub mod webhook;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::service::Lifecycle;
use crate::store::{GroupCommitter, Store};
use crate::worker::WorkerControl;
use problem::ApiError;

/// What handlers share.
pub struct AppContext {
    pub config: Arc<Config>,
    pub store: Store,
    pub intake: GroupCommitter,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Option<PrometheusHandle>,
    /// Verifies admin bearer tokens; None when no key is configured (admin routes answer 503).
    pub admin_auth: Option<auth::JwtVerifier>,
    /// The admin API's handle on the worker (pause, resume, re-sync, what it reports).
    pub worker: WorkerControl,
    /// The Dataverse organisation whose notifications are accepted.
    pub organization: Arc<crate::dynamics::organization::Organization>,
}

pub type AppState = Arc<AppContext>;

/// Routes with their OpenAPI documentation, declared together.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(webhook::receive))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(admin::opportunity))
        .routes(routes!(admin::create_opportunity))
        .routes(routes!(admin::resync))
        .routes(routes!(admin::list_notifications))
        .routes(routes!(admin::notification))
        .routes(routes!(admin::retry_notification))
        .routes(routes!(admin::discard_notification))
        .routes(routes!(admin::retry_dead_notifications))
        .routes(routes!(admin::list_writes))
        .routes(routes!(admin::retry_write))
        .routes(routes!(admin::discard_write))
        .routes(routes!(admin::retry_dead_writes))
        .routes(routes!(admin::pause))
        .routes(routes!(admin::resume))
        .routes(routes!(admin::stats))
        .routes(routes!(
            admin_sync::start_backfill,
            admin_sync::backfill_progress,
            admin_sync::cancel_backfill
        ))
        .routes(routes!(admin_sync::reconcile_status, admin_sync::reconcile_now))
        .routes(routes!(admin_sync::drift_report))
        .routes(routes!(admin_sync::drift_repair))
        .routes(routes!(
            refusal::refuse_get,
            refusal::refuse_post,
            refusal::refuse_put,
            refusal::refuse_patch,
            refusal::refuse_delete
        ))
}

/// The service's router with its middleware.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.server.body_limit_bytes;
    let (router, _) = api_router().split_for_parts();
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::Internal("a handler panicked".into()).into_response()
        }))
        // A 5xx is logged by the code that answers it (ApiError, readiness once per change):
        // the trace layer's own failure line would repeat it, on every probe of a failing
        // /readyz.
        .layer(
            TraceLayer::new_for_http()
                // The path only: the query may hold the webhook key (`?code=…`), and no log
                // level may show it.
                .make_span_with(|request: &axum::http::Request<axum::body::Body>| {
                    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
                })
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The OpenAPI document (the same as `openapi/openapi.yaml`, as JSON).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object))
)]
pub async fn openapi_json() -> axum::Json<serde_json::Value> {
    // Built once: the document is a function of the code.
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    axum::Json(
        DOC.get_or_init(|| serde_json::to_value(openapi::document()).unwrap_or_default())
            .clone(),
    )
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::NotFound(format!("There is no route {}.", uri.path())).into_response()
}
