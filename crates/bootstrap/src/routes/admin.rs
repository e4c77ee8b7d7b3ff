//! `/api/v1/admin/*`: the catalog's writes, for operators. On only when `ADMIN_API_KEY` is
//! set; every request must carry it in `X-Admin-Key`. Each write evicts the cached answers
//! it changes, on every instance.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use application::catalog::{OpenSchedule, ScheduleDraft};
use domain::booking::{ConcertId, SEATS_PER_SCHEDULE};
use futures::future::{Ready, ready};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::catalog::{ConcertResponse, ScheduleResponse};
use super::{AppState, admin_times, uuid_param};
use crate::extract::ValidJson;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{AdminKeyInvalid, BodyTooLarge, CatalogWriteUnavailable, MySqlUnavailable};

/// The header that carries the admin key.
pub const ADMIN_KEY: &str = "X-Admin-Key";

/// The configured admin key, kept as its SHA-256 digest (`None`: the admin API is off).
/// A sent key is digested and the two digests compared in constant time, so neither the
/// comparison's time nor its early exit on a length mismatch tells anything of the key.
#[derive(Clone)]
pub struct AdminKey(Option<[u8; 32]>);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AdminKey").field(&self.0.map(|_| "set")).finish()
    }
}

impl AdminKey {
    #[must_use]
    pub fn new(key: Option<&str>) -> Self {
        Self(key.map(digest))
    }
}

fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Proof that the request carried the admin key.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let expected = req.app_data::<web::Data<AdminKey>>().and_then(|key| key.0);
        let mut sent = req.headers().get_all(ADMIN_KEY);
        let allowed = match (expected, sent.next(), sent.next()) {
            (Some(expected), Some(value), None) => {
                value.to_str().is_ok_and(|value| constant_time_eq(&expected, &digest(value)))
            }
            _ => false,
        };
        ready(if allowed { Ok(Self) } else { Err(ApiError::AdminKeyInvalid) })
    }
}

/// Compares two digests without stopping at the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcertRequest {
    /// 1..=200 characters, not only spaces, no control characters (stored trimmed).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        example = "Winter Lights Orchestra"
    )]
    pub title: String,
    /// 1..=200 characters, not only spaces, no control characters (stored trimmed).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        example = "Seoul Arts Center"
    )]
    pub venue: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleRequest {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    /// RFC 3339, years 2000 to 9998 (as are the two below).
    pub starts_at: OffsetDateTime,
    /// Before `bookingClosesAt`.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub booking_opens_at: OffsetDateTime,
    /// After `bookingOpensAt`, no later than `startsAt`.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub booking_closes_at: OffsetDateTime,
    /// The price of each of the 50 seats, in points.
    #[schema(minimum = 0, maximum = 10_000_000, example = 80_000)]
    #[serde(deserialize_with = "crate::extract::integer")]
    pub seat_price: i64,
}

/// Add a concert.
///
/// # Errors
/// 400 for a bad title or venue, 401 without the admin key.
#[utoipa::path(
    post,
    path = "/api/v1/admin/concerts",
    tag = "admin",
    params(("X-Admin-Key" = String, Header, description = "The admin key (ADMIN_API_KEY)")),
    request_body = ConcertRequest,
    responses(
        (status = 201, description = "The concert", body = ConcertResponse),
        (status = 400, description = "Malformed body, title or venue", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "ADMIN_KEY_INVALID: missing or wrong X-Admin-Key, or the admin API is off", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        CatalogWriteUnavailable,
    )
)]
pub async fn create_concert(
    state: web::Data<AppState>,
    _admin: Admin,
    ValidJson(body): ValidJson<ConcertRequest>,
) -> Result<HttpResponse, ApiError> {
    let concert = state.catalog.create_concert(&body.title, &body.venue).await?;
    Ok(HttpResponse::Created().json(ConcertResponse::from(&concert)))
}

/// Rename a concert or move it.
///
/// # Errors
/// 400 for a malformed id, title or venue, 401 without the admin key, 404 for an unknown
/// concert.
#[utoipa::path(
    put,
    path = "/api/v1/admin/concerts/{concertId}",
    tag = "admin",
    params(
        ("concertId" = uuid::Uuid, Path, description = "The concert's id"),
        ("X-Admin-Key" = String, Header, description = "The admin key (ADMIN_API_KEY)"),
    ),
    request_body = ConcertRequest,
    responses(
        (status = 200, description = "The concert", body = ConcertResponse),
        (status = 400, description = "Malformed id, body, title or venue", body = Problem, content_type = "application/problem+json"),
        AdminKeyInvalid,
        (status = 404, description = "CONCERT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        CatalogWriteUnavailable,
    )
)]
pub async fn update_concert(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
    ValidJson(body): ValidJson<ConcertRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = ConcertId::from_uuid(uuid_param(&path, "concertId")?);
    let concert = state.catalog.update_concert(id, &body.title, &body.venue).await?;
    Ok(HttpResponse::Ok().json(ConcertResponse::from(&concert)))
}

/// Add a date with 50 seats at `seatPrice`.
///
/// # Errors
/// 400 for a malformed id or body, a window that does not open before it closes or closes
/// after the show starts, or a price out of range; 401 without the admin key; 404 for an
/// unknown concert.
#[utoipa::path(
    post,
    path = "/api/v1/admin/concerts/{concertId}/schedules",
    tag = "admin",
    params(
        ("concertId" = uuid::Uuid, Path, description = "The concert's id"),
        ("X-Admin-Key" = String, Header, description = "The admin key (ADMIN_API_KEY)"),
    ),
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "The date, with its 50 seats available", body = ScheduleResponse),
        (status = 400, description = "Malformed id or body; bookingOpensAt < bookingClosesAt <= startsAt is required; seatPrice 0..=10,000,000", body = Problem, content_type = "application/problem+json"),
        AdminKeyInvalid,
        (status = 404, description = "CONCERT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        CatalogWriteUnavailable,
    )
)]
pub async fn add_schedule(
    state: web::Data<AppState>,
    _admin: Admin,
    path: web::Path<String>,
    ValidJson(body): ValidJson<ScheduleRequest>,
) -> Result<HttpResponse, ApiError> {
    let concert = ConcertId::from_uuid(uuid_param(&path, "concertId")?);
    admin_times(&[
        ("startsAt", body.starts_at),
        ("bookingOpensAt", body.booking_opens_at),
        ("bookingClosesAt", body.booking_closes_at),
    ])?;
    let draft = ScheduleDraft {
        starts_at: body.starts_at,
        booking_opens_at: body.booking_opens_at,
        booking_closes_at: body.booking_closes_at,
        seat_price: body.seat_price,
    };
    let schedule = state.catalog.add_schedule(concert, &draft).await?;
    let seats = usize::from(SEATS_PER_SCHEDULE);
    let open = OpenSchedule { schedule, total_seats: seats, available_seats: seats };
    Ok(HttpResponse::Created().json(ScheduleResponse::from(&open)))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyResponse {
    /// The new key's id (the `kid` of the tokens it will sign).
    pub kid: String,
    /// When it starts signing: every instance has read it by then. Until then, and for the
    /// lifetime of an access token after, the key it replaces still verifies.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub activates_at: OffsetDateTime,
}

/// Rotate the access-token signing key.
///
/// Publishes a new shared key. It starts signing once every instance has had time to load
/// it (twice `AUTH_KEY_REFRESH_SECONDS`, and a margin); the key it replaces keeps verifying
/// until the tokens it signed have run out, so nobody is logged out. Concurrent rotations
/// make one key. Not available when the operator sets the keys (`AUTH_SIGNING_KEY`, the
/// first signs, all verify): rotate those in three rollouts, `old,new` (every instance
/// learns the new key), then `new,old` (the new key signs), then `new` alone once the old
/// key's tokens have run out.
///
/// # Errors
/// 401 without the admin key, 409 when the keys are the operator's, 503 when MySQL is
/// unavailable.
#[utoipa::path(
    post,
    path = "/api/v1/admin/auth/signing-keys",
    tag = "admin",
    params(("X-Admin-Key" = String, Header, description = "The admin key (ADMIN_API_KEY)")),
    responses(
        (status = 201, description = "The new key (its secret never leaves the server)", body = SigningKeyResponse),
        AdminKeyInvalid,
        (status = 409, description = "SIGNING_KEYS_EXTERNAL: the keys are set by AUTH_SIGNING_KEY", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn rotate_signing_key(state: web::Data<AppState>, _admin: Admin) -> Result<HttpResponse, ApiError> {
    let keys = state.signing_keys.as_ref().ok_or(ApiError::SigningKeysExternal)?;
    let key = keys.rotate().await?;
    Ok(HttpResponse::Created().json(SigningKeyResponse { kid: key.kid, activates_at: key.activates_at }))
}
