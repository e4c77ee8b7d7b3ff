//! The problem answers that several routes document word for word, defined once for
//! `#[utoipa::path(responses(...))]`.
//!
//! Each type here is an `IntoResponses`: listed in a route's `responses(...)` beside its
//! own tuples, it adds the same entries those tuples would (status, description, an
//! `application/problem+json` body referencing the `Problem` schema), so the document is
//! unchanged. A route whose wording differs keeps its own tuple: the descriptions are
//! part of the contract. The types are never built; they only describe.

use utoipa::IntoResponses;

use crate::problem::Problem;

/// The queue gate's refusals ([`crate::gate::Admitted`]): 401 and 403.
#[derive(Debug, IntoResponses)]
pub enum QueueGate {
    #[response(
        status = 401,
        description = "UNAUTHENTICATED (no valid access token; with WWW-Authenticate: Bearer) or QUEUE_TOKEN_INVALID (no live queue token of the caller's)",
        content_type = "application/problem+json"
    )]
    Invalid(Problem),
    #[response(
        status = 403,
        description = "QUEUE_TOKEN_NOT_ACTIVE",
        content_type = "application/problem+json"
    )]
    NotActive(Problem),
}

/// 401 for the routes that read a token of any status (its own view, its events).
#[derive(Debug, IntoResponses)]
#[response(
    status = 401,
    description = "UNAUTHENTICATED (no valid access token) or QUEUE_TOKEN_INVALID (missing, malformed, unknown, expired, or another user's)",
    content_type = "application/problem+json"
)]
pub struct QueueTokenInvalid(pub Problem);

/// 401 for every route that acts for a user ([`crate::auth::Caller`]).
#[derive(Debug, IntoResponses)]
#[response(
    status = 401,
    description = "UNAUTHENTICATED: no Authorization: Bearer <accessToken>, or one that is malformed, expired or badly signed",
    content_type = "application/problem+json",
    headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"concert-api\"`, with `error=\"invalid_token\"` when a token was sent"))
)]
pub struct Unauthenticated(pub Problem);

/// 429 for the routes with a per-client limit ([`crate::limits`]).
#[derive(Debug, IntoResponses)]
#[response(
    status = 429,
    description = "RATE_LIMITED: too many such requests from this client; nothing changed, retry after Retry-After",
    content_type = "application/problem+json",
    headers(("Retry-After" = u64, description = "Seconds until this client may try again"))
)]
pub struct RateLimited(pub Problem);

/// 401 for the admin routes after the first (which words it at length).
#[derive(Debug, IntoResponses)]
#[response(status = 401, description = "ADMIN_KEY_INVALID", content_type = "application/problem+json")]
pub struct AdminKeyInvalid(pub Problem);

/// What every route with a body may answer about the body itself: 413 over
/// [`crate::extract::BODY_LIMIT`], 408 when it does not arrive within
/// `HTTP_BODY_TIMEOUT_MS` ([`crate::extract::BodyDeadline`]).
#[derive(Debug, IntoResponses)]
pub enum BodyTooLarge {
    #[response(
        status = 413,
        description = "PAYLOAD_TOO_LARGE: body over 64 KiB",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    #[response(
        status = 408,
        description = "REQUEST_TIMEOUT: the body did not arrive whole within HTTP_BODY_TIMEOUT_MS (10 s by default); the connection is closed",
        content_type = "application/problem+json"
    )]
    Timeout(Problem),
}

/// 503 for the routes that need only MySQL and change nothing on failure.
#[derive(Debug, IntoResponses)]
#[response(
    status = 503,
    description = "SERVICE_UNAVAILABLE: MySQL is unavailable; nothing changed, retry after Retry-After",
    content_type = "application/problem+json"
)]
pub struct MySqlUnavailable(pub Problem);

/// 503 for the routes that need MySQL and the queue's store.
#[derive(Debug, IntoResponses)]
#[response(
    status = 503,
    description = "SERVICE_UNAVAILABLE: MySQL or the queue's store is unavailable",
    content_type = "application/problem+json"
)]
pub struct MySqlOrQueueUnavailable(pub Problem);

/// 503 for the routes that need only the queue's store.
#[derive(Debug, IntoResponses)]
#[response(
    status = 503,
    description = "SERVICE_UNAVAILABLE: the queue's store is unavailable",
    content_type = "application/problem+json"
)]
pub struct QueueStoreUnavailable(pub Problem);

/// 503 for the catalog's writes (the admin routes): MySQL, and Redis for the cache marks.
#[derive(Debug, IntoResponses)]
#[response(
    status = 503,
    description = "SERVICE_UNAVAILABLE: MySQL or Redis (the cache) is unavailable; nothing changed",
    content_type = "application/problem+json"
)]
pub struct CatalogWriteUnavailable(pub Problem);
