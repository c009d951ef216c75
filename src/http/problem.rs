//! RFC 9457 problem details: every error oppsync answers over HTTP is one of these, decided in
//! one place (`ApiError`'s `IntoResponse`). Internal causes are logged, never shown.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{AdminRefusal, TokenRefusal};

/// An RFC 9457 problem details object (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "urn:oppsync:problem:webhook-key-mismatch")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    pub status: u16,
    /// What happened and what the caller can do, in a sentence.
    pub detail: String,
    /// Extra members for some kinds (e.g. the handled entity/message pairs).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:oppsync:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            extra: None,
        }
    }

    pub fn with(mut self, key: &str, value: serde_json::Value) -> Problem {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// Everything that can go wrong answering an HTTP request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("webhook secret missing")]
    WebhookKeyMissing { location: String },
    #[error("webhook secret does not match")]
    WebhookKeyMismatch { location: String },
    #[error("body too large")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported media type {0}")]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0}")]
    UnsupportedEncoding(String),
    #[error("the body did not arrive within {secs} s")]
    RequestTimeout { secs: u64 },
    #[error("malformed body: {0}")]
    Malformed(String),
    #[error("not a Dynamics execution context: {0}")]
    NotAContext(String),
    #[error("unhandled {message} of {entity}")]
    UnhandledMessage { entity: String, message: String },
    #[error("unhandled stage {0}")]
    UnhandledStage(i32),
    #[error("{0}")]
    ForeignOrganization(crate::dynamics::organization::ForeignOrganization),
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("shutting down")]
    ShuttingDown,
    #[error("no worker runs in this process")]
    WorkerNotRunning,
    #[error("opportunities are created in Dynamics")]
    MarketoSideCreation,
    #[error("admin API not configured")]
    AdminNotConfigured,
    #[error("bearer token refused: {0:?}")]
    InvalidToken(TokenRefusal),
    #[error("insufficient scope: {0} needed")]
    InsufficientScope(&'static str),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn problem(&self) -> Problem {
        use StatusCode as S;
        match self {
            ApiError::WebhookKeyMissing { location } => Problem::new(
                S::UNAUTHORIZED,
                "webhook-key-missing",
                "Webhook key missing",
                format!(
                    "The request carries no webhook key ({location}); register the service endpoint with the key oppsync is configured with."
                ),
            ),
            ApiError::WebhookKeyMismatch { location } => Problem::new(
                S::UNAUTHORIZED,
                "webhook-key-mismatch",
                "Webhook key does not match",
                format!("The webhook key ({location}) does not match any configured key."),
            ),
            ApiError::PayloadTooLarge { limit } => Problem::new(
                S::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                format!("The body exceeds the limit of {limit} bytes (server.body_limit_bytes)."),
            ),
            ApiError::UnsupportedMediaType(ct) => Problem::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                format!("The body must be JSON (application/json), not {ct:?}."),
            ),
            ApiError::RequestTimeout { secs } => Problem::new(
                S::REQUEST_TIMEOUT,
                "body-timeout",
                "Body too slow",
                format!("The request body did not arrive in full within {secs} s."),
            ),
            ApiError::UnsupportedEncoding(encoding) => Problem::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-content-encoding",
                "Unsupported content encoding",
                format!(
                    "The body must be sent as it is (Content-Encoding: identity), not {:?}.",
                    encoding.chars().take(64).collect::<String>()
                ),
            ),
            ApiError::Malformed(why) => Problem::new(
                S::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                format!("The body is not valid JSON: {why}."),
            ),
            ApiError::NotAContext(why) => Problem::new(
                S::BAD_REQUEST,
                "not-an-execution-context",
                "Not a Dynamics execution context",
                format!("The body is JSON but not a Dynamics RemoteExecutionContext: {why}."),
            ),
            ApiError::UnhandledMessage { entity, message } => {
                let handled: Vec<String> = crate::dynamics::event::HANDLED
                    .iter()
                    .map(|(e, m)| format!("{} {}", e.logical_name(), m.name()))
                    .collect();
                Problem::new(
                    S::UNPROCESSABLE_ENTITY,
                    "unhandled-message",
                    "Entity or message not handled",
                    format!(
                        "oppsync does not handle {message} of {entity}; it handles {}. Remove this step from the service endpoint.",
                        handled.join(", ")
                    ),
                )
                .with("handled", serde_json::json!(handled))
            }
            ApiError::UnhandledStage(stage) => Problem::new(
                S::UNPROCESSABLE_ENTITY,
                "unhandled-stage",
                "Stage not handled",
                format!(
                    "oppsync handles PostOperation steps (stage 40) only, not stage {stage}: register the step as PostOperation, asynchronous."
                ),
            ),
            ApiError::ForeignOrganization(foreign) => {
                use crate::dynamics::organization::ForeignOrganization as F;
                let (what, ours, theirs) = match foreign {
                    F::Id { ours, theirs } => ("OrganizationId", ours.to_string(), theirs.clone()),
                    F::Host { ours, theirs } => ("x-ms-dynamics-organization", ours.clone(), theirs.clone()),
                };
                Problem::new(
                    S::FORBIDDEN,
                    "foreign-organization",
                    "Notification from another organisation",
                    format!(
                        "The notification comes from the Dataverse organisation {theirs} ({what}), but oppsync serves {ours}; nothing was stored. A sandbox copied from production keeps the service endpoint: remove it from the copy, or point the copy at its own oppsync."
                    ),
                )
                .with("organization", serde_json::json!(theirs))
                .with("expected_organization", serde_json::json!(ours))
            }
            ApiError::StoreUnavailable(_) => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Temporarily unavailable",
                "The notification could not be stored durably; it was not accepted. Retry later.",
            ),
            ApiError::ShuttingDown => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Shutting down",
                "This instance is shutting down and accepts nothing new. Retry shortly.",
            ),
            ApiError::WorkerNotRunning => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "worker-not-running",
                "Worker not running",
                "This instance runs no worker (planner and pusher), which this action needs; call an instance that does.",
            ),
            ApiError::MarketoSideCreation => Problem::new(
                S::FORBIDDEN,
                "marketo-side-creation-refused",
                "Opportunities are created in Dynamics",
                "Opportunities are created in Dynamics 365 and synced one way to Marketo; oppsync never creates an opportunity from the Marketo side.",
            ),
            ApiError::AdminNotConfigured => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "admin-not-configured",
                "Admin API not configured",
                "The admin API is disabled because no JWT key is configured (admin.jwt_secret or admin.jwt_public_key_file).",
            ),
            ApiError::InvalidToken(refusal) => {
                let (slug, detail) = refusal.describe();
                Problem::new(S::UNAUTHORIZED, slug, "Bearer token refused", detail)
            }
            ApiError::InsufficientScope(needed) => Problem::new(
                S::FORBIDDEN,
                "insufficient-scope",
                "Insufficient scope",
                format!(
                    "The token lacks the scope {needed} (in `scope` or `scp`); oppsync.write also grants oppsync.read."
                ),
            ),
            ApiError::NotFound(what) => Problem::new(S::NOT_FOUND, "not-found", "Not found", what.clone()),
            ApiError::BadRequest(why) => {
                Problem::new(S::BAD_REQUEST, "bad-request", "Bad request", why.clone())
            }
            ApiError::Conflict(why) => Problem::new(S::CONFLICT, "conflict", "Conflict", why.clone()),
            ApiError::Upstream(why) => Problem::new(
                S::BAD_GATEWAY,
                "upstream-unavailable",
                "Upstream unavailable",
                format!("A service oppsync depends on did not answer as expected: {why}."),
            ),
            ApiError::Internal(_) => Problem::new(
                S::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "Something went wrong inside oppsync; the cause is in its logs.",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::StoreUnavailable(cause) | ApiError::Internal(cause) | ApiError::Upstream(cause) => {
                tracing::error!(error = %cause, "request failed")
            }
            _ => tracing::debug!(error = %self, "request refused"),
        }
        let challenge = match &self {
            // RFC 6750 §3: say why, so that clients know whether to fetch a new token.
            // No credentials at all: a bare challenge, no error code (RFC 6750 §3.1).
            ApiError::InvalidToken(TokenRefusal::Missing) => Some("Bearer realm=\"oppsync\"".to_owned()),
            ApiError::InvalidToken(refusal) => Some(format!(
                "Bearer realm=\"oppsync\", error=\"invalid_token\", error_description=\"{}\"",
                refusal.describe().0
            )),
            ApiError::InsufficientScope(needed) => Some(format!(
                "Bearer realm=\"oppsync\", error=\"insufficient_scope\", scope=\"{needed}\""
            )),
            _ => None,
        };
        let mut response = self.problem().into_response();
        if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

impl From<AdminRefusal> for ApiError {
    fn from(refusal: AdminRefusal) -> Self {
        match refusal {
            AdminRefusal::NotConfigured => ApiError::AdminNotConfigured,
            AdminRefusal::Token(refusal) => ApiError::InvalidToken(refusal),
            AdminRefusal::InsufficientScope(needed) => ApiError::InsufficientScope(needed),
        }
    }
}

impl IntoResponse for AdminRefusal {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::StoreUnavailable(e.to_string())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::BadRequest(format!("malformed query: {}", e.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError::BadRequest(format!("malformed path: {}", e.body_text()))
    }
}
