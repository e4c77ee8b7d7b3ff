//! `/api/v1/users/{userId}/points`: balance, charge, history.

use actix_web::{HttpRequest, HttpResponse, web};
use domain::point::{Balance, ChargeAmount, HistoryLimit, PointHistoryEntry};
use domain::user::UserId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::{AppState, uuid_param};
use crate::auth::Caller;
use crate::extract::LateJson;
use crate::idempotency_header::{idempotency_key, mark_replayed};
use crate::limits::RateLimits;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{BodyTooLarge, MySqlUnavailable, Unauthenticated};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChargeRequest {
    /// Points to add: a whole number in 1..=10,000,000 (`100.0` counts as 100, as JSON
    /// Schema has it; `100.5` is refused).
    #[schema(minimum = 1, maximum = 10_000_000, example = 10_000)]
    #[serde(deserialize_with = "crate::extract::integer")]
    pub amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceResponse {
    pub user_id: uuid::Uuid,
    #[schema(example = 10_000)]
    pub balance: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntryResponse {
    pub id: uuid::Uuid,
    /// `CHARGE`, `USE` or `REFUND`.
    #[schema(example = "CHARGE")]
    pub kind: &'static str,
    pub amount: i64,
    pub balance_after: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl From<&PointHistoryEntry> for HistoryEntryResponse {
    fn from(entry: &PointHistoryEntry) -> Self {
        Self {
            id: entry.id(),
            kind: entry.kind().as_str(),
            amount: entry.amount().points(),
            balance_after: entry.balance_after().points(),
            created_at: entry.created_at(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HistoryQuery {
    /// How many entries, newest first: 1..=1000, default 50.
    #[param(value_type = Option<u16>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
}

fn balance_response(user_id: UserId, balance: Balance) -> BalanceResponse {
    BalanceResponse { user_id: *user_id.as_uuid(), balance: balance.points() }
}

/// The caller's balance.
///
/// # Errors
/// 400 for a malformed id, 401 without a valid access token, 404 for any id but the
/// caller's (another user's answers exactly as an unknown one).
#[utoipa::path(
    get,
    path = "/api/v1/users/{userId}/points",
    tag = "points",
    security(("bearerAuth" = [])),
    params(("userId" = uuid::Uuid, Path, description = "The caller's own id")),
    responses(
        (status = 200, description = "The balance", body = BalanceResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 404, description = "USER_NOT_FOUND (also for another user's id)", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn get_balance(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user_id = caller.owns(UserId::from_uuid(uuid_param(&path, "userId")?))?;
    let balance = state.get_balance.execute(user_id).await?;
    Ok(HttpResponse::Ok().json(balance_response(user_id, balance)))
}

/// Charge the caller's points. Every charge is applied exactly once, whatever the
/// concurrency. Charges are limited per user (`RATE_LIMIT_CHARGES_PER_MINUTE`).
///
/// With an `Idempotency-Key` header, a charge is applied at most once per (user, key): a
/// repetition (a retry after a lost answer, a double click, on any instance) gets the first
/// answer back, status and body alike, marked `Idempotent-Replayed: true`; one that arrives
/// while the first is still running waits for it. The same key with another amount is 422
/// `IDEMPOTENCY_KEY_REUSED`. Keys are scoped to the user and kept at least 24 hours. Only
/// applied charges are recorded: a refused one (4xx, 429, 503) changed nothing and may be
/// retried with its key.
///
/// # Errors
/// 400 for a malformed id, amount or key, 401 without a valid access token, 404 for any id
/// but the caller's, 409 when the balance would pass 1,000,000,000, 422 for a reused key,
/// 429 when the account stayed busy for the whole lock wait or the caller is over its
/// limit, 503 when Redis or MySQL is unavailable.
#[utoipa::path(
    post,
    path = "/api/v1/users/{userId}/points/charge",
    tag = "points",
    security(("bearerAuth" = [])),
    params(
        ("userId" = uuid::Uuid, Path, description = "The caller's own id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the charge idempotent: 1..=64 visible ASCII characters (`!` to `~`), scoped to the user, kept at least 24 hours", min_length = 1, max_length = 64, pattern = r"^[!-~]{1,64}$"),
    ),
    request_body = ChargeRequest,
    responses(
        (status = 200, description = "The new balance (or, for a replayed key, the first answer: see the header)", body = BalanceResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer of an earlier request with the same key"))),
        (status = 400, description = "Malformed id, amount or Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 404, description = "USER_NOT_FOUND (also for another user's id)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "BALANCE_LIMIT_EXCEEDED", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used for another amount; nothing changed", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        (status = 429, description = "RESOURCE_BUSY (the account stayed busy) or RATE_LIMITED (too many charges by this user): nothing changed; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "SERVICE_UNAVAILABLE (with Retry-After): Redis or MySQL is unavailable, the lock was lost before the commit, or this instance is shutting down or at its limit of concurrent writes, nothing changed. OUTCOME_UNKNOWN (no Retry-After): MySQL did not confirm the commit, the charge may or may not have been applied; retry with the same Idempotency-Key, which is always safe", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn charge_points(
    state: web::Data<AppState>,
    limits: web::Data<RateLimits>,
    req: HttpRequest,
    caller: Caller,
    path: web::Path<String>,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    let user_id = caller.owns(UserId::from_uuid(uuid_param(&path, "userId")?))?;
    let body: ChargeRequest = body.read().await?;
    let key = idempotency_key(&req)?;
    let amount = ChargeAmount::new(body.amount).map_err(|e| ApiError::validation("amount", e.to_string()))?;
    // Counted once the request is known to be well formed: bad input changes nothing, the
    // caller's budget of charges included.
    limits.charge(user_id)?;
    let outcome = state.charge_points.execute(user_id, amount, key).await?;
    let mut response = HttpResponse::Ok();
    mark_replayed(&mut response, outcome.is_replay());
    Ok(response.json(balance_response(user_id, outcome.into_inner())))
}

/// The caller's point history, newest first.
///
/// # Errors
/// 400 for a malformed id or limit, 401 without a valid access token, 404 for any id but
/// the caller's.
#[utoipa::path(
    get,
    path = "/api/v1/users/{userId}/points/history",
    tag = "points",
    security(("bearerAuth" = [])),
    params(("userId" = uuid::Uuid, Path, description = "The caller's own id"), HistoryQuery),
    responses(
        (status = 200, description = "Entries, newest first", body = [HistoryEntryResponse]),
        (status = 400, description = "Malformed id or limit", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 404, description = "USER_NOT_FOUND (also for another user's id)", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn point_history(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let user_id = caller.owns(UserId::from_uuid(uuid_param(&path, "userId")?))?;
    let limit = match query.limit.as_deref() {
        None => HistoryLimit::default(),
        Some(raw) => raw
            .trim()
            .parse::<i64>()
            .map_err(|_| ApiError::validation("limit", format!("must be a whole number, got {raw:?}")))
            .and_then(|n| HistoryLimit::new(n).map_err(|e| ApiError::validation("limit", e.to_string())))?,
    };
    let entries = state.point_history.execute(user_id, limit).await?;
    Ok(HttpResponse::Ok().json(entries.iter().map(HistoryEntryResponse::from).collect::<Vec<_>>()))
}
