//! Every error answer, as RFC 9457 `application/problem+json`, mapped in one place.
//!
//! `code` is stable and machine-readable; `detail` is for people. Unexpected errors are
//! logged with their whole cause chain and answered with an opaque 500: no SQL, Redis or
//! stack text ever reaches a client.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use application::catalog::CatalogError;
use application::charge_points::ChargePointsError;
use application::create_user::CreateUserError;
use application::failure::{Dependency, Failure};
use application::get_balance::GetBalanceError;
use application::hold_seat::HoldSeatError;
use application::pay::PayError;
use application::point_history::PointHistoryError;
use application::reservations::ReservationError;
use domain::booking::BookingError;
use domain::point::MAX_BALANCE;
use serde::Serialize;
use utoipa::ToSchema;

/// The problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:concert-server:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Stable, machine-readable: `VALIDATION_FAILED`, `USER_NOT_FOUND`, ...
    pub code: &'static str,
    /// For `VALIDATION_FAILED`: the offending field (`amount`, `userId`, `limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer of the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("no such route")]
    RouteNotFound,
    #[error("this route does not accept that method; it accepts {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("user {0} not found")]
    UserNotFound(uuid::Uuid),
    #[error("concert {0} not found")]
    ConcertNotFound(uuid::Uuid),
    #[error("schedule {0} not found")]
    ScheduleNotFound(uuid::Uuid),
    #[error("reservation {0} not found")]
    ReservationNotFound(uuid::Uuid),
    #[error("coupon campaign {0} not found")]
    CampaignNotFound(uuid::Uuid),
    #[error("coupon {0} not found among yours")]
    CouponNotFound(uuid::Uuid),
    #[error("the coupon is {0}; pay without it, or with another")]
    CouponNotUsable(&'static str),
    #[error("every coupon of this campaign has been issued")]
    CouponSoldOut,
    #[error("you have a coupon of this campaign already; one per user")]
    CouponAlreadyIssued,
    #[error("coupons of this campaign are not being issued now (see its issueOpensAt and issueClosesAt)")]
    CouponIssueClosed,
    #[error("this seat is held or sold, or someone is taking it right now; pick another seat")]
    SeatUnavailable,
    #[error("booking for this schedule is not open now")]
    BookingClosed,
    #[error("the reservation is {0}; only a HELD reservation whose hold lasts can be cancelled")]
    ReservationNotHeld(&'static str),
    #[error("the X-Admin-Key header is missing or wrong, or the admin API is off (ADMIN_API_KEY unset)")]
    AdminKeyInvalid,
    #[error("the reservation is {0}: its hold ran out or ended, so it can no longer be paid")]
    ReservationExpired(&'static str),
    #[error("the reservation is paid already")]
    AlreadyPaid,
    #[error("another payment of this reservation is in progress; read the reservation to see how it ended")]
    PaymentInProgress,
    #[error("{0}")]
    InsufficientBalance(String),
    #[error(
        "the Queue-Token header is missing, malformed, unknown or expired; take a place in line with POST /api/v1/queue/tokens"
    )]
    QueueTokenInvalid,
    #[error("this queue token is still waiting in line; it is let in when admitted")]
    QueueTokenNotActive,
    /// No usable access token (or, at `POST /auth/tokens`, API key). The reason is logged,
    /// never answered: every refusal reads the same.
    #[error("{}", unauthenticated_detail(*.0))]
    Unauthenticated(application::identity::Unauthenticated),
    #[error(
        "the signing keys are set by AUTH_SIGNING_KEY: rotate them by listing the new key first, the old one after it"
    )]
    SigningKeysExternal,
    /// `POST /auth/tokens` with no API key, or one no user has.
    #[error("Authorization: Bearer <apiKey> is missing, or no user has this API key")]
    ApiKeyInvalid,
    /// The caller asked to act for someone else.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("you hold {0} seats of this date already, the most one user may; pay for or cancel one first")]
    HoldLimitReached(u32),
    /// A per-client limit: too many requests of one kind from this client.
    #[error("too many {what} from this client; retry after {retry_after} s")]
    RateLimited { what: &'static str, retry_after: u64 },
    /// The body did not arrive within the deadline.
    #[error("the request body did not arrive in time; send it whole, promptly")]
    RequestTimeout,
    #[error("{0}")]
    BalanceLimitExceeded(String),
    #[error("this Idempotency-Key was used before for a different request; use a new key for a new request")]
    IdempotencyKeyReused,
    /// Too many concurrent changes to one resource; the client may retry shortly.
    #[error("{0}")]
    Busy(String),
    /// A dependency the request needs is down (the lock store fails closed).
    #[error("{0}")]
    Unavailable(String),
    /// The database did not confirm a commit: the change may or may not have been made.
    #[error(
        "the database did not confirm the commit, so the change may or may not have been made; check before retrying, or retry with the same Idempotency-Key, which is always safe"
    )]
    OutcomeUnknown,
    /// Readiness: a dependency of the instance does not answer.
    #[error("{0}")]
    NotReady(String),
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

/// A failure from below: 503 `SERVICE_UNAVAILABLE` when its cause chain says a retry may
/// succeed (the database unreachable, out of connections, a deadlock or a timeout), 503
/// `OUTCOME_UNKNOWN` (no `Retry-After`: a blind retry could apply it twice) when a commit
/// went unconfirmed, else a 500.
impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        if domain::unavailable::is_outcome_unknown(&error) {
            tracing::error!(error = format!("{error:#}"), "commit outcome unknown");
            Self::OutcomeUnknown
        } else if domain::unavailable::is_unavailable(&error) {
            tracing::warn!(error = format!("{error:#}"), "database unavailable");
            Self::Unavailable("the database is unavailable; nothing was changed, retry shortly".into())
        } else {
            Self::Unexpected(error)
        }
    }
}

fn unauthenticated_detail(reason: application::identity::Unauthenticated) -> &'static str {
    match reason {
        application::identity::Unauthenticated::Missing => {
            "this route needs Authorization: Bearer <accessToken>; take one with POST /api/v1/auth/tokens"
        }
        _ => {
            "the access token is malformed, expired or not valid; take a new one with POST /api/v1/auth/tokens"
        }
    }
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation { field: field.into(), message: message.into() }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "VALIDATION_FAILED",
            Self::MalformedJson(_) => "MALFORMED_JSON",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::RouteNotFound => "NOT_FOUND",
            Self::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::UserNotFound(_) => "USER_NOT_FOUND",
            Self::ConcertNotFound(_) => "CONCERT_NOT_FOUND",
            Self::ScheduleNotFound(_) => "SCHEDULE_NOT_FOUND",
            Self::ReservationNotFound(_) => "RESERVATION_NOT_FOUND",
            Self::CampaignNotFound(_) => "CAMPAIGN_NOT_FOUND",
            Self::CouponNotFound(_) => "COUPON_NOT_FOUND",
            Self::CouponNotUsable(_) => "COUPON_NOT_USABLE",
            Self::CouponSoldOut => "COUPON_SOLD_OUT",
            Self::CouponAlreadyIssued => "COUPON_ALREADY_ISSUED",
            Self::CouponIssueClosed => "COUPON_ISSUE_CLOSED",
            Self::SeatUnavailable => "SEAT_UNAVAILABLE",
            Self::BookingClosed => "BOOKING_CLOSED",
            Self::ReservationNotHeld(_) => "RESERVATION_NOT_HELD",
            Self::AdminKeyInvalid => "ADMIN_KEY_INVALID",
            Self::ReservationExpired(_) => "RESERVATION_EXPIRED",
            Self::AlreadyPaid => "ALREADY_PAID",
            Self::PaymentInProgress => "PAYMENT_IN_PROGRESS",
            Self::InsufficientBalance(_) => "INSUFFICIENT_BALANCE",
            Self::QueueTokenInvalid => "QUEUE_TOKEN_INVALID",
            Self::QueueTokenNotActive => "QUEUE_TOKEN_NOT_ACTIVE",
            Self::Unauthenticated(_) | Self::ApiKeyInvalid => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::SigningKeysExternal => "SIGNING_KEYS_EXTERNAL",
            Self::HoldLimitReached(_) => "HOLD_LIMIT_REACHED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::RequestTimeout => "REQUEST_TIMEOUT",
            Self::BalanceLimitExceeded(_) => "BALANCE_LIMIT_EXCEEDED",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::Busy(_) => "RESOURCE_BUSY",
            Self::Unavailable(_) => "SERVICE_UNAVAILABLE",
            Self::NotReady(_) => "NOT_READY",
            Self::OutcomeUnknown => "OUTCOME_UNKNOWN",
            Self::Unexpected(_) => "INTERNAL_ERROR",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "Invalid request",
            Self::MalformedJson(_) => "Malformed JSON",
            Self::PayloadTooLarge { .. } => "Payload too large",
            Self::RouteNotFound => "Not found",
            Self::MethodNotAllowed { .. } => "Method not allowed",
            Self::UserNotFound(_) => "User not found",
            Self::ConcertNotFound(_) => "Concert not found",
            Self::ScheduleNotFound(_) => "Schedule not found",
            Self::ReservationNotFound(_) => "Reservation not found",
            Self::CampaignNotFound(_) => "Campaign not found",
            Self::CouponNotFound(_) => "Coupon not found",
            Self::CouponNotUsable(_) => "Coupon not usable",
            Self::CouponSoldOut => "Coupons sold out",
            Self::CouponAlreadyIssued => "Coupon already issued",
            Self::CouponIssueClosed => "Coupon issue closed",
            Self::SeatUnavailable => "Seat unavailable",
            Self::BookingClosed => "Booking closed",
            Self::ReservationNotHeld(_) => "Reservation not held",
            Self::AdminKeyInvalid => "Admin key invalid",
            Self::ReservationExpired(_) => "Reservation expired",
            Self::AlreadyPaid => "Already paid",
            Self::PaymentInProgress => "Payment in progress",
            Self::InsufficientBalance(_) => "Insufficient balance",
            Self::QueueTokenInvalid => "Queue token invalid",
            Self::QueueTokenNotActive => "Queue token not active",
            Self::Unauthenticated(_) | Self::ApiKeyInvalid => "Unauthenticated",
            Self::Forbidden(_) => "Forbidden",
            Self::SigningKeysExternal => "Signing keys set by the operator",
            Self::HoldLimitReached(_) => "Hold limit reached",
            Self::RateLimited { .. } => "Too many requests",
            Self::RequestTimeout => "Request timeout",
            Self::BalanceLimitExceeded(_) => "Balance limit exceeded",
            Self::IdempotencyKeyReused => "Idempotency key reused",
            Self::Busy(_) => "Resource busy",
            Self::Unavailable(_) => "Service unavailable",
            Self::NotReady(_) => "Not ready",
            Self::OutcomeUnknown => "Outcome unknown",
            Self::Unexpected(_) => "Internal server error",
        }
    }

    /// What the client reads. For unexpected errors, deliberately nothing specific.
    fn detail(&self) -> String {
        match self {
            Self::Unexpected(_) => "An unexpected error occurred. It has been logged.".to_owned(),
            // Domain messages name their field already ("amount must be ..."); serde's do not.
            Self::Validation { field, message } if message.starts_with(field.as_str()) => message.clone(),
            other => other.to_string(),
        }
    }

    #[must_use]
    pub fn problem(&self) -> Problem {
        let code = self.code();
        Problem {
            kind: format!("urn:concert-server:problem:{}", code.to_ascii_lowercase().replace('_', "-")),
            title: self.title(),
            status: self.status_code().as_u16(),
            detail: self.detail(),
            code,
            field: match self {
                Self::Validation { field, .. } => Some(field.clone()),
                _ => None,
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Validation { .. } | Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RouteNotFound
            | Self::UserNotFound(_)
            | Self::ConcertNotFound(_)
            | Self::ScheduleNotFound(_)
            | Self::ReservationNotFound(_)
            | Self::CampaignNotFound(_)
            | Self::CouponNotFound(_) => StatusCode::NOT_FOUND,
            Self::SeatUnavailable
            | Self::BookingClosed
            | Self::ReservationNotHeld(_)
            | Self::ReservationExpired(_)
            | Self::AlreadyPaid
            | Self::PaymentInProgress
            | Self::InsufficientBalance(_)
            | Self::CouponSoldOut
            | Self::CouponAlreadyIssued
            | Self::CouponIssueClosed
            | Self::CouponNotUsable(_) => StatusCode::CONFLICT,
            Self::AdminKeyInvalid => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::QueueTokenInvalid => StatusCode::UNAUTHORIZED,
            Self::QueueTokenNotActive | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthenticated(_) | Self::ApiKeyInvalid => StatusCode::UNAUTHORIZED,
            Self::HoldLimitReached(_) | Self::SigningKeysExternal => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BalanceLimitExceeded(_) => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::NotReady(_) | Self::OutcomeUnknown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        // Unavailable dependencies are logged where their cause is known (`From` below,
        // the readiness check); only unexpected errors are logged here.
        if let Self::Unexpected(error) = self {
            tracing::error!(error = format!("{error:?}"), "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        if matches!(self, Self::Busy(_) | Self::Unavailable(_) | Self::NotReady(_)) {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        if let Self::MethodNotAllowed { allow } = self {
            response.insert_header((header::ALLOW, HeaderValue::from_static(allow)));
        }
        if let Self::RateLimited { retry_after, .. } = self {
            response.insert_header((header::RETRY_AFTER, retry_after.to_string()));
        }
        if let Self::Unauthenticated(reason) = self {
            // RFC 6750 §3: a request with no credentials gets the scheme alone; one whose
            // token was refused is told so (but not why).
            response.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(match reason {
                    application::identity::Unauthenticated::Missing => r#"Bearer realm="concert-api""#,
                    _ => r#"Bearer realm="concert-api", error="invalid_token""#,
                }),
            ));
        }
        if matches!(self, Self::ApiKeyInvalid) {
            response.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="concert-api""#),
            ));
        }
        if matches!(self, Self::RequestTimeout) {
            // The rest of the body is not read: the connection cannot carry another request.
            response.force_close();
        }
        response.json(self.problem())
    }
}

/// The one HTTP meaning of every infrastructure failure, whatever the use case:
/// - a lock that stayed busy: 429 `RESOURCE_BUSY` with `Retry-After`;
/// - a lease lost before the commit, or a lock store or cache that cannot be reached:
///   503 `SERVICE_UNAVAILABLE` with `Retry-After` (the work was rolled back or never
///   began: nothing changed);
/// - anything else: by its cause chain (503 for a database that may answer a retry, 503
///   `OUTCOME_UNKNOWN` for an unconfirmed commit, else an opaque 500).
impl From<Failure> for ApiError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Contended(key) => {
                tracing::info!(%key, "lock contended");
                Self::Busy(
                    match key.kind() {
                        "point" => "too many concurrent changes to this account; nothing was changed, retry shortly",
                        "seat" => "this seat is being changed right now; nothing was changed, retry shortly",
                        "idem" => "a request with this Idempotency-Key is still running; retry shortly to get its answer",
                        _ => "this resource is being changed right now; nothing was changed, retry shortly",
                    }
                    .into(),
                )
            }
            Failure::LeaseLost(key) => {
                tracing::warn!(%key, "lock lease lost before the commit; rolled back");
                Self::Unavailable(
                    "the lock service could not keep this change's lock; nothing was changed, retry shortly"
                        .into(),
                )
            }
            Failure::Unavailable { what: Dependency::WriteCapacity, .. } => Self::Unavailable(
                "this instance is running as many writes as it takes; nothing was changed, retry shortly"
                    .into(),
            ),
            Failure::Unavailable { what: Dependency::ShuttingDown, .. } => Self::Unavailable(
                "this instance is shutting down; nothing was changed, retry (another instance will answer)"
                    .into(),
            ),
            Failure::Unavailable { what, source } => {
                tracing::warn!(error = format!("{source:#}"), dependency = %what, "dependency unavailable for a write");
                Self::Unavailable(format!("the {what} is unavailable; nothing was changed, retry shortly"))
            }
            Failure::Unexpected(error) => error.into(),
        }
    }
}

impl From<CreateUserError> for ApiError {
    fn from(error: CreateUserError) -> Self {
        match error {
            CreateUserError::Failure(failure) => failure.into(),
        }
    }
}

impl From<ChargePointsError> for ApiError {
    fn from(error: ChargePointsError) -> Self {
        match error {
            ChargePointsError::UserNotFound(id) => Self::UserNotFound(*id.as_uuid()),
            ChargePointsError::BalanceLimitExceeded { balance, amount } => {
                Self::BalanceLimitExceeded(format!(
                    "charging {amount} points to a balance of {balance} would pass the limit of {MAX_BALANCE}"
                ))
            }
            ChargePointsError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            ChargePointsError::Failure(failure) => failure.into(),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::ConcertNotFound(id) => Self::ConcertNotFound(*id.as_uuid()),
            CatalogError::ScheduleNotFound(id) => Self::ScheduleNotFound(*id.as_uuid()),
            CatalogError::Invalid(e) => Self::validation(invalid_field(&e), e.to_string()),
            CatalogError::Failure(failure) => failure.into(),
        }
    }
}

/// The request field a domain rule is about.
fn invalid_field(error: &BookingError) -> &'static str {
    match error {
        BookingError::SeatOutOfRange { .. } => "seatNumber",
        BookingError::PriceOutOfRange { .. } => "seatPrice",
        BookingError::InvalidWindow => "bookingClosesAt",
        BookingError::InvalidLabel { what } => what,
        _ => "body",
    }
}

impl From<HoldSeatError> for ApiError {
    fn from(error: HoldSeatError) -> Self {
        match error {
            HoldSeatError::ScheduleNotFound(id) => Self::ScheduleNotFound(*id.as_uuid()),
            HoldSeatError::BookingClosed => Self::BookingClosed,
            HoldSeatError::SeatUnavailable => Self::SeatUnavailable,
            HoldSeatError::HoldLimitReached(limit) => Self::HoldLimitReached(limit),
            HoldSeatError::Failure(failure) => failure.into(),
        }
    }
}

impl From<ReservationError> for ApiError {
    fn from(error: ReservationError) -> Self {
        match error {
            ReservationError::NotFound(id) => Self::ReservationNotFound(*id.as_uuid()),
            ReservationError::NotHeld(status) => Self::ReservationNotHeld(status.as_str()),
            ReservationError::Failure(failure) => failure.into(),
        }
    }
}

impl From<PayError> for ApiError {
    fn from(error: PayError) -> Self {
        match error {
            PayError::ReservationNotFound(id) => Self::ReservationNotFound(*id.as_uuid()),
            PayError::ReservationExpired(status) => Self::ReservationExpired(status.as_str()),
            PayError::AlreadyPaid => Self::AlreadyPaid,
            PayError::PaymentInProgress => Self::PaymentInProgress,
            PayError::InsufficientBalance { balance, amount } => Self::InsufficientBalance(format!(
                "the balance of {balance} points does not cover the price of {amount}; charge points and pay again"
            )),
            PayError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            PayError::CouponNotFound(id) => Self::CouponNotFound(*id.as_uuid()),
            PayError::CouponNotUsable(why) => Self::CouponNotUsable(why),
            PayError::Failure(failure) => failure.into(),
        }
    }
}

impl From<application::coupons::CouponUseCaseError> for ApiError {
    fn from(error: application::coupons::CouponUseCaseError) -> Self {
        use application::coupons::CouponUseCaseError as E;
        use domain::coupon::CouponError;
        match error {
            E::CampaignNotFound(id) => Self::CampaignNotFound(*id.as_uuid()),
            E::SoldOut => Self::CouponSoldOut,
            E::AlreadyIssued => Self::CouponAlreadyIssued,
            E::IssueClosed => Self::CouponIssueClosed,
            E::Invalid(rule) => {
                let field = match rule {
                    CouponError::NameLength => "name",
                    CouponError::DiscountOutOfRange => "discount",
                    CouponError::QuantityOutOfRange => "quantity",
                    CouponError::EmptyIssueWindow => "issueClosesAt",
                    CouponError::ValidBeforeIssueCloses => "validUntil",
                };
                Self::validation(field, rule.to_string())
            }
            E::Failure(failure) => failure.into(),
        }
    }
}

impl From<GetBalanceError> for ApiError {
    fn from(error: GetBalanceError) -> Self {
        match error {
            GetBalanceError::UserNotFound(id) => Self::UserNotFound(*id.as_uuid()),
            GetBalanceError::Failure(failure) => failure.into(),
        }
    }
}

impl From<PointHistoryError> for ApiError {
    fn from(error: PointHistoryError) -> Self {
        match error {
            PointHistoryError::UserNotFound(id) => Self::UserNotFound(*id.as_uuid()),
            PointHistoryError::Failure(failure) => failure.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::to_bytes;

    use super::*;

    #[actix_web::test]
    async fn an_unexpected_error_reaches_the_client_without_its_text() {
        let error = ApiError::from(anyhow::anyhow!("SQLSTATE[42000] near 'SELEC' at line 1"));

        let response = error.error_response();

        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "application/problem+json");
        let body = to_bytes(response.into_body()).await.unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(!text.contains("SQLSTATE"), "{text}");
        assert!(text.contains("\"code\":\"INTERNAL_ERROR\""), "{text}");
    }

    #[actix_web::test]
    async fn a_retryable_database_failure_is_a_503_with_retry_after_and_no_internal_text() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "10.0.0.7:3306 refused");
        let error = ApiError::from(
            anyhow::Error::new(domain::unavailable::Unavailable {
                reason: "unreachable",
                source: Box::new(cause),
            })
            .context("failed to read the user"),
        );

        let response = error.error_response();

        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let body = to_bytes(response.into_body()).await.unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("\"code\":\"SERVICE_UNAVAILABLE\""), "{text}");
        assert!(!text.contains("10.0.0.7"), "{text}");
    }

    #[actix_web::test]
    async fn a_lost_lock_is_503_in_every_use_case_and_a_busy_one_429_both_with_retry_after() {
        use application::lock::LockKey;

        let lost = |kind| Failure::LeaseLost(LockKey::new(kind, "x"));
        let busy = |kind| Failure::Contended(LockKey::new(kind, "x"));
        for (error, status, code) in [
            (ApiError::from(ChargePointsError::Failure(lost("point"))), 503, "SERVICE_UNAVAILABLE"),
            (ApiError::from(PayError::Failure(lost("point"))), 503, "SERVICE_UNAVAILABLE"),
            (ApiError::from(HoldSeatError::Failure(lost("seat"))), 503, "SERVICE_UNAVAILABLE"),
            (ApiError::from(ReservationError::Failure(lost("seat"))), 503, "SERVICE_UNAVAILABLE"),
            (ApiError::from(ChargePointsError::Failure(busy("point"))), 429, "RESOURCE_BUSY"),
            (ApiError::from(ReservationError::Failure(busy("seat"))), 429, "RESOURCE_BUSY"),
        ] {
            let response = error.error_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
            let body = to_bytes(response.into_body()).await.unwrap();
            let text = std::str::from_utf8(&body).unwrap();
            assert!(text.contains(&format!("\"code\":\"{code}\"")), "{text}");
            assert!(!text.contains("lock:"), "no key reaches the client: {text}");
        }
    }

    #[test]
    fn a_validation_problem_names_its_field() {
        let problem = ApiError::validation("amount", "must be between 1 and 10000000").problem();
        assert_eq!(problem.status, 400);
        assert_eq!(problem.code, "VALIDATION_FAILED");
        assert_eq!(problem.field.as_deref(), Some("amount"));
        assert_eq!(problem.kind, "urn:concert-server:problem:validation-failed");
        assert_eq!(problem.detail, "amount: must be between 1 and 10000000");
        let named = ApiError::validation("limit", "limit must be between 1 and 1000, got 0").problem();
        assert_eq!(named.detail, "limit must be between 1 and 1000, got 0", "the field is not named twice");
    }
}
