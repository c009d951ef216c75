//! `GET /metrics` in Prometheus text format. Counters and histograms are recorded where things
//! happen (intake, worker, Marketo client); store-derived gauges are refreshed at scrape time.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::AppState;
use crate::store::now_ms;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (tests start several apps in one process).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

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
    }
    if let Ok(paused) = state.store.control(crate::worker::pusher::PAUSED).await {
        metrics::gauge!("oppsync_paused").set(if paused.as_deref() == Some("true") {
            1.0
        } else {
            0.0
        });
    }
    if let Some(worker) = &state.worker {
        let usage = worker.marketo.usage();
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
