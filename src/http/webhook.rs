//! `POST /webhooks/dynamics`: check the caller's secret, decode, commit to the inbox, answer.
//! Dynamics reads only the status: 2xx means delivered, 502/503/504 earn one retry, anything
//! else fails the System Job (specs/dynamics.md §4). So 2xx only after the commit, 503 for
//! trouble on our side, 4xx for what a retry cannot fix.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Extensions, HeaderMap, StatusCode, Uri, header};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::Instrument;
use utoipa::ToSchema;

use super::AppState;
use super::problem::{ApiError, Problem};
use crate::config::WebhookAuth;
use crate::dynamics::organization::ForeignOrganization;
use crate::dynamics::{DecodeError, decode_notification};
use crate::store::{IntakeError, NewNotification, PackedBody, Received, now_ms};

/// How many times the body limit an oversized upload is read and dropped after its 413.
const LINGER_FACTOR: u64 = 8;

/// Reads and drops what is left of a refused body (see the oversized case in `intake`).
async fn linger(mut body: Body, max_bytes: u64, within: Duration) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(within, async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > max_bytes {
                break;
            }
        }
    })
    .await;
}

/// At most one failed-authentication warning per this long; the rest are counted into it.
const AUTH_WARN_EVERY_MS: i64 = 10_000;

/// What intake did with a notification.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntakeAck {
    /// `stored` (202, new) or `duplicate` (200, stored before).
    #[schema(example = "stored")]
    pub status: &'static str,
    /// Inbox id, when newly stored.
    pub id: Option<i64>,
}

/// Receives a Dynamics 365 webhook notification (a serialised RemoteExecutionContext).
#[utoipa::path(
    post,
    path = "/webhooks/dynamics",
    tag = "webhook",
    params(
        ("code" = Option<String>, Query, description = "WebhookKey authentication (webhook.auth = webhook_key)"),
        ("x-ms-dynamics-msg-size-exceeded" = Option<String>, Header, description = "Set by Dynamics when the payload exceeded 256 KB and InputParameters/images were dropped"),
        ("x-ms-correlation-request-id" = Option<String>, Header, description = "Dynamics correlation id, logged"),
        ("x-ms-dynamics-organization" = Option<String>, Header, description = "Host name of the sending organisation; refused with 403 when it is not dataverse.organization_host (default: the host of dataverse.url)"),
    ),
    request_body(content = Object, content_type = "application/json", description = "The RemoteExecutionContext as Dynamics serialises it (DataContractJsonSerializer); a leading UTF-8 byte-order mark is tolerated. Handled: Create, Update and Delete of opportunity and connection; Win, Lose, SetState and SetStateDynamicEntity of opportunity; Create, Update and Delete of contact; Update of account"),
    responses(
        (status = 202, description = "Stored durably; will be synced", body = IntakeAck),
        (status = 200, description = "Already stored (a repeated delivery); nothing more happens", body = IntakeAck),
        (status = 400, description = "Malformed JSON, not a Dynamics execution context, or an id (CorrelationId, RequestId, OperationId, OrganizationId) that is not a Guid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Webhook key missing or not matching", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The notification comes from another Dataverse organisation (body OrganizationId or x-ms-dynamics-organization header), e.g. a sandbox copied from production; nothing is stored", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over server.body_limit_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within server.body_read_timeout_secs", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON, or is sent with a Content-Encoding other than identity", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Entity, message or stage oppsync does not handle", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Could not store durably now; Dynamics retries once", body = Problem, content_type = "application/problem+json"),
    ),
    security(("webhook_key" = []), ("webhook_header" = []), ("webhook_query" = []))
)]
pub async fn receive(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    extensions: Extensions,
    body: Body,
) -> Result<(StatusCode, Json<IntakeAck>), ApiError> {
    let started = Instant::now();
    // Dynamics' own tracking id for the request (specs/dynamics.md §2), logged as it came.
    let correlation_request_id = headers
        .get("x-ms-correlation-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect::<String>())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "webhook",
        correlation_request_id = %correlation_request_id,
        correlation_id = tracing::field::Empty,
        entity = tracing::field::Empty,
        message = tracing::field::Empty,
        record_id = tracing::field::Empty,
    );
    let result = intake(&state, &uri, &headers, body, &span)
        .instrument(span.clone())
        .await;
    let outcome = match &result {
        Ok((StatusCode::ACCEPTED, _)) => "stored",
        Ok(_) => "duplicate",
        Err(e) => outcome_label(e),
    };
    if outcome == "unauthorized" {
        let peer =
            super::server::peer_of(&extensions).map_or_else(|| "unknown".to_owned(), |p| p.ip().to_string());
        warn_failed_authentication(&peer, result.as_ref().err());
    }
    metrics::counter!("oppsync_intake_total", "outcome" => outcome).increment(1);
    metrics::histogram!("oppsync_intake_seconds").record(started.elapsed().as_secs_f64());
    result
}

/// Failed authentications at WARN, with the caller's address and never the key presented: at
/// most one line per [`AUTH_WARN_EVERY_MS`], which counts those it stood for.
fn warn_failed_authentication(peer: &str, error: Option<&ApiError>) {
    static LAST: Mutex<(i64, u64)> = Mutex::new((i64::MIN, 0));
    let now = now_ms();
    let mut last = LAST.lock();
    last.1 += 1;
    if now.saturating_sub(last.0) < AUTH_WARN_EVERY_MS {
        return;
    }
    let failures = std::mem::take(&mut last.1);
    last.0 = now;
    drop(last);
    let why = match error {
        Some(ApiError::WebhookKeyMissing { .. }) => "no webhook key presented",
        _ => "wrong webhook key",
    };
    tracing::warn!(
        peer,
        failures,
        reason = why,
        "webhook refused: authentication failed (failures counts those since the last such line)"
    );
}

fn outcome_label(e: &ApiError) -> &'static str {
    match e {
        ApiError::WebhookKeyMissing { .. } | ApiError::WebhookKeyMismatch { .. } => "unauthorized",
        ApiError::PayloadTooLarge { .. } => "too_large",
        ApiError::UnsupportedMediaType(_) => "not_json",
        ApiError::UnsupportedEncoding(_) => "encoded",
        ApiError::RequestTimeout { .. } => "timeout",
        ApiError::Malformed(_) | ApiError::NotAContext(_) => "malformed",
        ApiError::UnhandledMessage { .. } | ApiError::UnhandledStage(_) => "unhandled",
        ApiError::ForeignOrganization(_) => "foreign_organization",
        ApiError::ShuttingDown => "shutting_down",
        _ => "unavailable",
    }
}

async fn intake(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    span: &tracing::Span,
) -> Result<(StatusCode, Json<IntakeAck>), ApiError> {
    check_secret(state, uri, headers)?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        // Dynamics' exact content type is undocumented (specs/dynamics.md §2): accept any JSON
        // type, and a missing header, but refuse what is clearly not JSON.
        if !(essence == "application/json" || essence.ends_with("+json") || essence == "text/json") {
            return Err(ApiError::UnsupportedMediaType(ct.to_owned()));
        }
    }
    // Dynamics sends the body as it is; a compressed (or claimed compressed) body is refused
    // rather than decoded, or taken as plain text it is not.
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if encoding != "identity" {
            return Err(ApiError::UnsupportedEncoding(encoding));
        }
    }
    let limit = state.config.server.body_limit_bytes;
    // Refused on the declared length, before any of the body is read: nothing of an oversized
    // upload is held. A chunked body is cut at the limit below.
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit as u64
    {
        // The 413 goes out now. A client still sending would see its connection reset (and not
        // the 413) if the unread rest were left in the socket when it closes, so the rest is
        // read and dropped in the background, never held: at most LINGER_FACTOR times the
        // limit, within the body timeout.
        let within = Duration::from_secs(state.config.server.body_read_timeout_secs);
        tokio::spawn(linger(body, (limit as u64).saturating_mul(LINGER_FACTOR), within));
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // A body that trickles in is cut off: a slow client holds a connection, not the service.
    let deadline = Duration::from_secs(state.config.server.body_read_timeout_secs);
    let bytes = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            secs: state.config.server.body_read_timeout_secs,
        })?
        .map_err(|e| {
            if is_length_limit(&e) {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::Malformed(e.to_string())
            }
        })?;
    let size_exceeded = headers.contains_key("x-ms-dynamics-msg-size-exceeded");
    let notification = decode_notification(&bytes, size_exceeded).map_err(|e| match e {
        DecodeError::Malformed(why) => ApiError::Malformed(why),
        DecodeError::NotAContext(why) => ApiError::NotAContext(why),
        DecodeError::Unsupported { entity, message } => ApiError::UnhandledMessage { entity, message },
        DecodeError::UnsupportedStage(stage) => ApiError::UnhandledStage(stage),
    })?;
    let header_host = headers
        .get("x-ms-dynamics-organization")
        .and_then(|v| v.to_str().ok());
    if let Err(foreign) = state
        .organization
        .check(notification.organization_id.as_deref(), header_host)
    {
        let check = match foreign {
            ForeignOrganization::Id { .. } => "organization_id",
            ForeignOrganization::Host { .. } => "host",
        };
        metrics::counter!("oppsync_intake_foreign_organization_total", "check" => check).increment(1);
        tracing::warn!(
            error = %foreign,
            organization_name = %notification
                .organization_name
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(100)
                .collect::<String>(),
            "refused a notification from another Dataverse organisation; nothing stored"
        );
        return Err(ApiError::ForeignOrganization(foreign));
    }
    let event = &notification.event;
    span.record("correlation_id", event.correlation_id.as_deref().unwrap_or(""));
    span.record("entity", event.entity.logical_name());
    span.record("message", event.message.name());
    span.record("record_id", tracing::field::display(event.record_id));
    let new = NewNotification {
        dedupe_key: notification.dedupe_key.clone(),
        entity: event.entity.logical_name().to_owned(),
        message: event.message.name().to_owned(),
        record_id: event.record_id,
        version: event.version,
        correlation_id: event.correlation_id.clone(),
        data_missing: event.data_missing,
        // Compressed here, on the request's task, so the single committer only writes.
        body: PackedBody::pack(&bytes),
        received_at: now_ms(),
    };
    match state.intake.submit(new).await {
        Ok(Received::Stored(id)) => {
            tracing::info!(inbox_id = id, "notification stored");
            state.lifecycle.notify_stored();
            Ok((
                StatusCode::ACCEPTED,
                Json(IntakeAck {
                    status: "stored",
                    id: Some(id),
                }),
            ))
        }
        Ok(Received::Duplicate) => {
            tracing::info!("notification already stored");
            Ok((
                StatusCode::OK,
                Json(IntakeAck {
                    status: "duplicate",
                    id: None,
                }),
            ))
        }
        Err(IntakeError::Closed) => Err(ApiError::ShuttingDown),
        Err(IntakeError::Store(e)) => Err(ApiError::StoreUnavailable(e)),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Checks the secret Dynamics was registered with. Every configured key is compared in
/// constant time, with no early exit, so timing reveals neither which key, how much matched,
/// nor how long the keys are.
fn check_secret(state: &AppState, uri: &Uri, headers: &HeaderMap) -> Result<(), ApiError> {
    let webhook = &state.config.webhook;
    let (presented, location): (Option<String>, String) = match webhook.auth {
        WebhookAuth::WebhookKey => (query_param(uri, "code"), "query parameter `code`".into()),
        WebhookAuth::QueryString => {
            let name = webhook.param_name.clone().unwrap_or_default();
            (query_param(uri, &name), format!("query parameter `{name}`"))
        }
        WebhookAuth::HttpHeader => {
            let name = webhook.header_name.clone().unwrap_or_default();
            let value = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (value, format!("header `{name}`"))
        }
    };
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        return Err(ApiError::WebhookKeyMissing { location });
    };
    // Digests of both sides: equal lengths whatever was presented, so the comparison time says
    // nothing about the keys' lengths either.
    let presented = Sha256::digest(presented.as_bytes());
    let mut matched = subtle::Choice::from(0u8);
    for key in &webhook.keys {
        matched |= presented.ct_eq(&Sha256::digest(key.expose().as_bytes()));
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiError::WebhookKeyMismatch { location })
    }
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}
