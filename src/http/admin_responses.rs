//! The refusals every admin route shares, documented once for the OpenAPI description: a
//! token missing or refused (401), the scope missing (403), the admin API or what the route
//! needs unavailable (503). Each route lists its own answers and one of these sets.

use utoipa::IntoResponses;

use super::problem::Problem;

/// Refusals of a route that needs the `oppsync.read` scope.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum ReadRefusals {
    #[response(
        status = 401,
        description = "Bearer token missing or refused",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    #[response(
        status = 403,
        description = "Scope oppsync.read missing",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    #[response(
        status = 503,
        description = "Admin API not configured, or the store is unavailable",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}

/// Refusals of a route that needs the `oppsync.write` scope and the store.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum WriteRefusals {
    #[response(
        status = 401,
        description = "Bearer token missing or refused",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    #[response(
        status = 403,
        description = "Scope oppsync.write missing",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    #[response(
        status = 503,
        description = "Admin API not configured, or the store is unavailable",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}

/// Refusals of a route that needs the `oppsync.write` scope and the running worker.
#[derive(IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
pub enum WorkerRefusals {
    #[response(
        status = 401,
        description = "Bearer token missing or refused",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    #[response(
        status = 403,
        description = "Scope oppsync.write missing",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    #[response(
        status = 503,
        description = "Admin API not configured, worker not running, or store unavailable",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}
