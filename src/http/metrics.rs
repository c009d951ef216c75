//! `GET /metrics` in Prometheus text format: the registry of `crate::service::metrics`, with the
//! store-derived gauges refreshed at scrape time.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::store::now_ms;

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response();
    };
    if let Ok(stats) = state.store.stats(now_ms()).await {
        metrics::gauge!("oppsync_inbox_depth").set(stats.inbox_pending as f64);
        metrics::gauge!("oppsync_inbox_oldest_age_seconds")
            .set(stats.inbox_oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("oppsync_marketo_writes_pending").set(stats.writes_pending as f64);
        metrics::gauge!("oppsync_marketo_writes_oldest_age_seconds")
            .set(stats.writes_oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("oppsync_dead_letters", "kind" => "notification").set(stats.inbox_dead as f64);
        metrics::gauge!("oppsync_dead_letters", "kind" => "marketo_write").set(stats.writes_dead as f64);
        if let Some(bytes) = stats.store_bytes {
            metrics::gauge!("oppsync_store_bytes").set(bytes as f64);
        }
        metrics::gauge!("oppsync_store_oldest_retained_age_seconds")
            .set(stats.inbox_oldest_retained_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::counter!("oppsync_store_retention_deleted_total").increment(0);
    }
    state.lifecycle.export_blocked();
    if let Ok(paused) = state.worker.is_paused().await {
        metrics::gauge!("oppsync_paused").set(if paused { 1.0 } else { 0.0 });
    }
    if let Some(usage) = state.worker.marketo_usage() {
        metrics::gauge!("oppsync_marketo_quota_used").set(f64::from(usage.calls_today));
        metrics::gauge!("oppsync_marketo_quota_left").set(f64::from(usage.quota_left));
        // Counters appear only once incremented; register them so dashboards and alerts see a
        // zero rather than no series before the first wait or refresh.
        metrics::counter!("oppsync_marketo_limiter_waits_total").increment(0);
        metrics::counter!("oppsync_marketo_token_refreshes_total").increment(0);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
