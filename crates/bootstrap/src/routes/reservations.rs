//! `/api/v1/reservations`: hold a seat, read a reservation, cancel a hold. The user is
//! always the queue token's, never a field of the body.

use actix_web::{HttpResponse, web};
use domain::booking::{Reservation, ReservationId, ScheduleId, SeatNumber};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{AppState, uuid_param};
use crate::extract::LateJson;
use crate::gate::Admitted;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{BodyTooLarge, MySqlOrQueueUnavailable, QueueGate};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldRequest {
    pub schedule_id: uuid::Uuid,
    /// 1..=50 (`7.0` counts as 7, as JSON Schema has it).
    #[schema(minimum = 1, maximum = 50, example = 7)]
    #[serde(deserialize_with = "crate::extract::integer")]
    pub seat_number: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReservationResponse {
    pub id: uuid::Uuid,
    pub schedule_id: uuid::Uuid,
    #[schema(minimum = 1, maximum = 50, example = 7)]
    pub seat_number: u8,
    #[schema(minimum = 0, maximum = 10_000_000, example = 80_000)]
    pub price: i64,
    /// `HELD`, `CONFIRMED`, `EXPIRED` (also a hold that ran out, before the job marks it)
    /// or `CANCELLED`.
    #[schema(pattern = "^(HELD|CONFIRMED|EXPIRED|CANCELLED)$", example = "HELD")]
    pub status: &'static str,
    /// When the hold ends (or ended): pay before then.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub held_until: OffsetDateTime,
}

impl From<&Reservation> for ReservationResponse {
    fn from(r: &Reservation) -> Self {
        Self {
            id: *r.id.as_uuid(),
            schedule_id: *r.schedule_id.as_uuid(),
            seat_number: r.seat_number.get(),
            price: r.price.points(),
            status: r.status.as_str(),
            held_until: r.held_until,
        }
    }
}

/// Hold a seat for `RESERVATION_HOLD_SECONDS` (default 300). Of any number of concurrent
/// requests for a free seat, on any instances, exactly one gets 201; the others 409
/// `SEAT_UNAVAILABLE` at once (no waiting in line for a seat someone else is taking).
///
/// # Errors
/// 400 for a malformed body, 401/403 without an ACTIVE queue token, 404 for an unknown
/// schedule, 409 `SEAT_UNAVAILABLE`, `BOOKING_CLOSED` or `HOLD_LIMIT_REACHED`, 503 when a store is unavailable
/// (nothing changed).
#[utoipa::path(
    post,
    path = "/api/v1/reservations",
    tag = "reservations",
    security(("bearerAuth" = [])),
    params(("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token")),
    request_body = HoldRequest,
    responses(
        (status = 201, description = "The seat is held for the token's user", body = ReservationResponse),
        (status = 400, description = "Malformed body, scheduleId or seatNumber", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "SCHEDULE_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "SEAT_UNAVAILABLE (held, sold, or being taken right now), BOOKING_CLOSED (outside the booking window) or HOLD_LIMIT_REACHED (the caller holds MAX_HOLDS_PER_USER live seats of this date, 4 by default)", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        (status = 503, description = "SERVICE_UNAVAILABLE: Redis or MySQL is unavailable, the lock was lost before the commit, or this instance is shutting down or at its limit of concurrent writes; nothing changed, retry after Retry-After. OUTCOME_UNKNOWN: MySQL did not confirm the commit; read your reservations before retrying", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn hold_seat(
    state: web::Data<AppState>,
    Admitted(user): Admitted,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    // The gate has answered; only now is the body read.
    let body: HoldRequest = body.read().await?;
    let seat =
        SeatNumber::new(body.seat_number).map_err(|e| ApiError::validation("seatNumber", e.to_string()))?;
    let reservation = state.hold_seat.execute(user, ScheduleId::from_uuid(body.schedule_id), seat).await?;
    Ok(HttpResponse::Created().json(ReservationResponse::from(&reservation)))
}

/// One of the caller's reservations, its status as of now.
///
/// # Errors
/// 400 for a malformed id, 401/403 without an ACTIVE queue token, 404 for an unknown
/// reservation or another user's.
#[utoipa::path(
    get,
    path = "/api/v1/reservations/{reservationId}",
    tag = "reservations",
    security(("bearerAuth" = [])),
    params(
        ("reservationId" = uuid::Uuid, Path, description = "The reservation's id"),
        ("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token"),
    ),
    responses(
        (status = 200, description = "The reservation", body = ReservationResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "RESERVATION_NOT_FOUND (also another user's)", body = Problem, content_type = "application/problem+json"),
        MySqlOrQueueUnavailable,
    )
)]
pub async fn get_reservation(
    state: web::Data<AppState>,
    path: web::Path<String>,
    Admitted(user): Admitted,
) -> Result<HttpResponse, ApiError> {
    let id = ReservationId::from_uuid(uuid_param(&path, "reservationId")?);
    let reservation = state.reservations.get(user, id).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(ReservationResponse::from(&reservation)))
}

/// Cancel a hold: the reservation CANCELLED, its seat AVAILABLE again on every instance.
///
/// # Errors
/// 400 for a malformed id, 401/403 without an ACTIVE queue token, 404 for an unknown
/// reservation or another user's, 409 `RESERVATION_NOT_HELD` (confirmed, cancelled, or a
/// hold that ran out), 429 when the seat stayed busy, 503 when a store is unavailable.
#[utoipa::path(
    delete,
    path = "/api/v1/reservations/{reservationId}",
    tag = "reservations",
    security(("bearerAuth" = [])),
    params(
        ("reservationId" = uuid::Uuid, Path, description = "The reservation's id"),
        ("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token"),
    ),
    responses(
        (status = 200, description = "Cancelled", body = ReservationResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "RESERVATION_NOT_FOUND (also another user's)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "RESERVATION_NOT_HELD: confirmed, cancelled, or its hold ran out", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RESOURCE_BUSY: the seat stayed busy; nothing changed, retry after Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "SERVICE_UNAVAILABLE: Redis or MySQL is unavailable, the lock was lost before the commit, or this instance is shutting down or at its limit of concurrent writes; nothing changed. OUTCOME_UNKNOWN: MySQL did not confirm the commit; read the reservation before retrying", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_reservation(
    state: web::Data<AppState>,
    path: web::Path<String>,
    Admitted(user): Admitted,
) -> Result<HttpResponse, ApiError> {
    let id = ReservationId::from_uuid(uuid_param(&path, "reservationId")?);
    let reservation = state.reservations.cancel(user, id).await?;
    Ok(HttpResponse::Ok().json(ReservationResponse::from(&reservation)))
}
