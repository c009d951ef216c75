//! The process-wide metrics registry (Prometheus). Counters and histograms are recorded where
//! things happen (intake, worker, Marketo client) through the `metrics` macros; `GET /metrics`
//! renders the registry installed here.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

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
                .inspect(|_| describe())
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The exporter keeps every histogram sample in a buffer until the registry is rendered or
/// upkept. With no scraper (or a slow one) that buffer grew by about 1 MiB a minute at 300
/// notifications/s, so the service folds it into the buckets on a timer itself.
pub async fn run_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// `# HELP` text of every metric oppsync records (a test checks none is left without).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "oppsync_intake_total",
        "Webhook notifications received, by outcome (stored, duplicate, refused …)"
    );
    describe_histogram!(
        "oppsync_intake_seconds",
        "Time to answer a webhook, including the durable commit"
    );
    describe_histogram!(
        "oppsync_intake_group_commit_size",
        "Notifications committed together by one group commit"
    );
    describe_counter!(
        "oppsync_worker_notifications_total",
        "Notifications planned, by outcome (applied, retry, dead)"
    );
    describe_histogram!(
        "oppsync_worker_lag_seconds",
        "Time from a notification's arrival to its plan's commit"
    );
    describe_counter!(
        "oppsync_worker_commit_conflicts_total",
        "Plans retried because another worker changed the same rows first"
    );
    describe_counter!(
        "oppsync_worker_loop_failures_total",
        "Worker loops (planner, pusher) that panicked or stopped and were restarted or given up"
    );
    describe_counter!(
        "oppsync_mapping_rejected_total",
        "Dynamics values that did not fit their field's conversion, by Marketo field; the field was left unchanged"
    );
    describe_counter!(
        "oppsync_marketo_calls_total",
        "Marketo REST calls, by endpoint and outcome (ok or the error code)"
    );
    describe_counter!(
        "oppsync_marketo_records_total",
        "Records in Marketo write answers, by endpoint and status"
    );
    describe_counter!(
        "oppsync_marketo_throttled_total",
        "Marketo answers asking to slow down (606, 615, 604, 608, HTTP 429), by code; never a failed attempt"
    );
    describe_gauge!(
        "oppsync_marketo_pace_calls",
        "Calls per rate window the pusher allows itself now (lowered by throttle answers, recovering window by window)"
    );
    describe_counter!(
        "oppsync_marketo_limiter_waits_total",
        "Calls that waited for the client-side rate or concurrency limit"
    );
    describe_gauge!(
        "oppsync_marketo_limiter_wait_seconds_total",
        "Total time calls waited for the client-side limits, in seconds"
    );
    describe_counter!(
        "oppsync_marketo_token_refreshes_total",
        "Marketo access tokens fetched"
    );
    describe_gauge!(
        "oppsync_marketo_quota_used",
        "Marketo calls this process made today (the daily quota resets at 00:00 CST)"
    );
    describe_gauge!(
        "oppsync_marketo_quota_left",
        "Marketo calls left of the configured daily quota"
    );
    describe_gauge!(
        "oppsync_marketo_blocked",
        "1 while a Marketo setting blocks pushing, by reason (crm_sync_enabled = 1018, bad_credentials, access_denied, misconfigured)"
    );
    describe_gauge!(
        "oppsync_dataverse_blocked",
        "1 while a Dataverse setting blocks reads, by reason (bad_credentials, access_denied = e.g. a revoked application user)"
    );
    describe_gauge!(
        "oppsync_pusher_leader",
        "1 on the replica that holds the push lease"
    );
    describe_gauge!("oppsync_paused", "1 while pushing to Marketo is paused");
    describe_gauge!("oppsync_inbox_depth", "Notifications waiting to be planned");
    describe_gauge!(
        "oppsync_inbox_oldest_age_seconds",
        "Age of the oldest notification waiting to be planned"
    );
    describe_gauge!(
        "oppsync_marketo_writes_pending",
        "Marketo writes waiting to be pushed"
    );
    describe_gauge!(
        "oppsync_marketo_writes_oldest_age_seconds",
        "Age of the oldest Marketo write waiting to be pushed"
    );
    describe_gauge!(
        "oppsync_store_bytes",
        "Size of the store on disk: the SQLite database file, or oppsync's PostgreSQL tables with their indexes"
    );
    describe_gauge!(
        "oppsync_store_oldest_retained_age_seconds",
        "Age of the oldest notification kept (settled ones are deleted after store.retention_days)"
    );
    describe_counter!(
        "oppsync_store_retention_deleted_total",
        "Settled notifications deleted by retention"
    );
    describe_gauge!(
        "oppsync_dead_letters",
        "Dead letters waiting for an operator, by kind (notification, marketo_write)"
    );
    describe_counter!(
        "oppsync_intake_foreign_organization_total",
        "Notifications refused because they come from another Dataverse organisation (a sandbox copy)"
    );
    describe_counter!(
        "oppsync_backfill_rows_read_total",
        "Rows the initial sync read through the Dataverse Web API"
    );
    describe_counter!(
        "oppsync_dataverse_requests_total",
        "Dataverse Web API answers, by HTTP status (429: service protection limits)"
    );
    describe_gauge!(
        "oppsync_reconcile_last_pass_timestamp_seconds",
        "When the last reconciliation pass ended (seconds since the epoch)"
    );
    describe_counter!(
        "oppsync_reconcile_missed_changes_total",
        "Marketo writes reconciliation planned for changes no webhook brought, by table"
    );
    describe_gauge!(
        "oppsync_reconcile_delta_token_age_seconds",
        "Age of the stored change-tracking token, by table"
    );
    describe_gauge!(
        "oppsync_reconcile_deletes_needing_webhook",
        "Opportunities gone from Dataverse whose Delete webhook never came (change tracking off)"
    );
}
