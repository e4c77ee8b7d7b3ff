//! `POST /api/v1/payments`: pay for a seat hold with points, exactly once.

use actix_web::{HttpRequest, HttpResponse, web};
use application::pay::PaymentView;
use application::queue::GateError;
use domain::booking::ReservationId;
use domain::coupon::CouponId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::auth::Caller;
use crate::extract::LateJson;
use crate::gate::queue_token;
use crate::idempotency_header::{idempotency_key, mark_replayed};
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{BodyTooLarge, QueueGate};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayRequest {
    /// The caller's HELD reservation.
    pub reservation_id: uuid::Uuid,
    /// Optional: one of the caller's AVAILABLE, unexpired coupons. Its discount is taken off
    /// the price (never below zero) and it becomes USED with the payment; a payment that
    /// fails leaves it AVAILABLE. Part of what an `Idempotency-Key` stands for.
    /// (The pattern is what a client must send: an empty string is not "no coupon".)
    #[serde(default)]
    #[schema(pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    pub coupon_id: Option<uuid::Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentResponse {
    pub id: uuid::Uuid,
    pub reservation_id: uuid::Uuid,
    /// Points deducted: the seat's price, less the coupon's discount (never below zero).
    #[schema(minimum = 0, maximum = 10_000_000, example = 80_000)]
    pub amount: i64,
    /// The coupon the payment used; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<uuid::Uuid>,
    #[schema(pattern = "^COMPLETED$", example = "COMPLETED")]
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub paid_at: OffsetDateTime,
}

impl From<PaymentView> for PaymentResponse {
    fn from(view: PaymentView) -> Self {
        Self {
            id: view.id,
            reservation_id: view.reservation_id,
            amount: view.amount,
            coupon_id: view.coupon_id,
            status: view.status,
            paid_at: view.paid_at,
        }
    }
}

fn created(view: PaymentView, replayed: bool) -> HttpResponse {
    let mut response = HttpResponse::Created();
    mark_replayed(&mut response, replayed);
    response.json(PaymentResponse::from(view))
}

/// Pay for a seat hold with points.
///
/// Atomically: deducts the seat's price once, records a USE point history row and the
/// payment, marks the reservation CONFIRMED and the seat SOLD, writes a
/// `PaymentCompleted` event to the outbox (published to the Redis Stream
/// `events:payments`), and expires the queue token. A failed payment changes nothing.
///
/// With an `Idempotency-Key`, a repetition (a retry after a lost answer, a double click,
/// on any instance) gets the first answer back, status and body alike, marked
/// `Idempotent-Replayed: true`, even though that payment expired the queue token; one that
/// arrives while the first is still running waits for it. The same key with another
/// reservation is 422. Keys are scoped to the user and kept at least 24 hours.
///
/// # Errors
/// 400, 401, 403, 404 `RESERVATION_NOT_FOUND` / `COUPON_NOT_FOUND`, 409
/// `RESERVATION_EXPIRED`, `ALREADY_PAID`, `PAYMENT_IN_PROGRESS`, `INSUFFICIENT_BALANCE`,
/// `COUPON_NOT_USABLE`, 422, 429, 503.
#[utoipa::path(
    post,
    path = "/api/v1/payments",
    tag = "payments",
    security(("bearerAuth" = [])),
    params(
        ("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token (or, for a replay, the token the replayed payment expired)"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the payment idempotent: 1..=64 visible ASCII characters (`!` to `~`), scoped to the user, kept at least 24 hours", min_length = 1, max_length = 64, pattern = r"^[!-~]{1,64}$"),
    ),
    request_body = PayRequest,
    responses(
        (status = 201, description = "Paid (or, for a replayed key, the first answer: see the header)", body = PaymentResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer of an earlier request with the same key"))),
        (status = 400, description = "Malformed body, reservationId or Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "RESERVATION_NOT_FOUND (also another user's), COUPON_NOT_FOUND (also another user's coupon)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "RESERVATION_EXPIRED (the hold ran out or was cancelled), ALREADY_PAID, PAYMENT_IN_PROGRESS (another payment of it is running now), INSUFFICIENT_BALANCE, COUPON_NOT_USABLE (used already, or expired); nothing changed", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: the key was used for another reservation; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RESOURCE_BUSY: the account stayed busy; nothing changed, retry after Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "SERVICE_UNAVAILABLE (with Retry-After): Redis or MySQL is unavailable, the lock was lost before the commit, or this instance is shutting down or at its limit of concurrent writes, nothing changed. OUTCOME_UNKNOWN (no Retry-After): MySQL did not confirm the commit; retry with the same Idempotency-Key, which is always safe", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn pay(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    let Caller(caller) = Caller::of(&req)?;
    let token = queue_token(&req)?;
    match state.queue_reader.admit_holder(token, caller).await {
        Ok(user) => {
            let key = idempotency_key(&req)?;
            let body: PayRequest = body.read().await?;
            let coupon = body.coupon_id.map(CouponId::from_uuid);
            let outcome = state
                .pay
                .execute(user, token, ReservationId::from_uuid(body.reservation_id), coupon, key)
                .await?;
            let replayed = outcome.is_replay();
            Ok(created(outcome.into_inner(), replayed))
        }
        // The token may be one a payment expired: a retry of that payment, with its key,
        // still gets its answer.
        Err(GateError::Invalid) => {
            let Ok(Some(key)) = idempotency_key(&req) else { return Err(ApiError::QueueTokenInvalid) };
            let Some(user) = state.pay.user_of_spent_token(token).await?.filter(|user| *user == caller)
            else {
                return Err(ApiError::QueueTokenInvalid);
            };
            let body: PayRequest = body.read().await?;
            let coupon = body.coupon_id.map(CouponId::from_uuid);
            match state.pay.replay(user, ReservationId::from_uuid(body.reservation_id), coupon, &key).await? {
                Some(view) => Ok(created(view, true)),
                None => Err(ApiError::QueueTokenInvalid),
            }
        }
        Err(other) => Err(other.into()),
    }
}
