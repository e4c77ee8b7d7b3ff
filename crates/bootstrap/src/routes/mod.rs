//! HTTP handlers and their DTOs, one module per resource. Handlers parse and validate,
//! call one use case, and shape the answer; errors become problems through
//! [`crate::problem::ApiError`].

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod coupons;
pub mod health;
pub mod page;
pub mod payments;
pub mod points;
pub mod queue;
pub mod ranking;
pub mod reservations;
pub mod users;

use actix_web::{HttpResponse, web};
use application::catalog::Catalog;
use application::charge_points::ChargePoints;
use application::create_user::CreateUser;
use application::get_balance::GetBalance;
use application::hold_seat::HoldSeat;
use application::point_history::PointHistory;
use application::queue::{IssueToken, QueueReader};
use application::reservations::Reservations;

use crate::problem::ApiError;

/// What handlers share: the use cases, and what readiness checks.
pub struct AppState {
    pub create_user: CreateUser,
    pub charge_points: ChargePoints,
    pub get_balance: GetBalance,
    pub point_history: PointHistory,
    pub issue_token: IssueToken,
    pub queue_reader: QueueReader,
    pub queue_events: crate::queue_events::QueueEvents,
    pub catalog: Catalog,
    pub hold_seat: HoldSeat,
    pub reservations: Reservations,
    pub pay: application::pay::Pay,
    pub coupons: application::coupons::Coupons,
    pub ranking: application::ranking::Ranking,
    pub sign_in: application::identity::SignIn,
    /// The shared signing keys (`None` when the operator sets them: `AUTH_SIGNING_KEY`).
    pub signing_keys: Option<application::identity::SigningKeys>,
    /// Seat maps rendered once per change ([`catalog::RenderedSeatMaps`]).
    pub seat_maps: catalog::RenderedSeatMaps,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// Every route of the public API. Each path answers the methods it has (HEAD wherever GET
/// is) and `405 METHOD_NOT_ALLOWED` with an `Allow` header for any other (RFC 9110).
/// Health and metrics are not here: they are on the operations listener ([`configure_ops`]).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(get_and_head("/", page::index))
        .service(get_and_head("/app.js", page::script))
        .service(get_and_head("/app.css", page::style));
    cfg.service(
        web::scope("/api/v1")
            .service(
                web::resource("/users")
                    .route(web::post().to(users::create_user))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/auth/tokens")
                    .route(web::post().to(auth::issue_access_token))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/users/{userId}/points")
                    .route(web::get().to(points::get_balance))
                    .route(web::head().to(points::get_balance))
                    .default_service(allow("GET, HEAD")),
            )
            .service(
                web::resource("/users/{userId}/points/charge")
                    .route(web::post().to(points::charge_points))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/queue/tokens")
                    .route(web::post().to(queue::issue_token))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/queue/tokens/me")
                    .route(web::get().to(queue::my_token))
                    .route(web::head().to(queue::my_token))
                    .default_service(allow("GET, HEAD")),
            )
            .service(
                web::resource("/queue/tokens/me/events")
                    .route(web::get().to(queue::my_token_events))
                    .default_service(allow("GET")),
            )
            .service(
                web::resource("/users/{userId}/points/history")
                    .route(web::get().to(points::point_history))
                    .route(web::head().to(points::point_history))
                    .default_service(allow("GET, HEAD")),
            )
            .service(get_and_head("/concerts", catalog::list_concerts))
            // Before `/concerts/{concertId}/...`: `ranking` is not a concert's id.
            .service(get_and_head("/concerts/ranking", ranking::ranking))
            .service(get_and_head("/concerts/{concertId}/schedules", catalog::list_schedules))
            .service(get_and_head("/schedules/{scheduleId}/seats", catalog::seat_map))
            .service(
                web::resource("/reservations")
                    .route(web::post().to(reservations::hold_seat))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/reservations/{reservationId}")
                    .route(web::get().to(reservations::get_reservation))
                    .route(web::head().to(reservations::get_reservation))
                    .route(web::delete().to(reservations::cancel_reservation))
                    .default_service(allow("GET, HEAD, DELETE")),
            )
            .service(
                web::resource("/payments")
                    .route(web::post().to(payments::pay))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/admin/concerts")
                    .route(web::post().to(admin::create_concert))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/admin/concerts/{concertId}")
                    .route(web::put().to(admin::update_concert))
                    .default_service(allow("PUT")),
            )
            .service(
                web::resource("/admin/concerts/{concertId}/schedules")
                    .route(web::post().to(admin::add_schedule))
                    .default_service(allow("POST")),
            )
            .service(
                web::resource("/admin/coupon-campaigns")
                    .route(web::post().to(coupons::create_campaign))
                    .default_service(allow("POST")),
            )
            .service(get_and_head("/coupon-campaigns/{campaignId}", coupons::get_campaign))
            .service(
                web::resource("/coupon-campaigns/{campaignId}/coupons")
                    .route(web::post().to(coupons::issue_coupon))
                    .default_service(allow("POST")),
            )
            .service(get_and_head("/users/{userId}/coupons", coupons::user_coupons))
            .service(
                web::resource("/admin/auth/signing-keys")
                    .route(web::post().to(admin::rotate_signing_key))
                    .default_service(allow("POST")),
            ),
    );
}

/// The operations listener's routes (`OPS_ADDR`): health for load balancers, metrics for
/// Prometheus. Kept off the public listener: clients have no business with either.
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    cfg.service(get_and_head("/health/live", health::live))
        .service(get_and_head("/health/ready", health::ready))
        .service(get_and_head("/metrics", health::metrics));
}

/// A resource answering GET and HEAD (RFC 9110: HEAD wherever GET is), 405 otherwise.
fn get_and_head<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
        .default_service(allow("GET, HEAD"))
}

/// Any path no route claims.
///
/// # Errors
/// Always [`ApiError::RouteNotFound`].
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

/// The answer to a method a path does not have: 405, naming the ones it has.
pub fn allow(methods: &'static str) -> actix_web::Route {
    web::to(move || async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow: methods }) })
}

/// Times an admin sets (a date's window, a campaign's): each in the years 2000 to 9998 in
/// UTC, else a 400 naming its field. Checked, because a local time late on 9999-12-31 is
/// year 10000 in UTC, which MySQL cannot store.
fn admin_times(times: &[(&'static str, time::OffsetDateTime)]) -> Result<(), ApiError> {
    for (field, at) in times {
        let year = at.checked_to_offset(time::UtcOffset::UTC).map(|utc| utc.year());
        if !year.is_some_and(|year| (2000..=9998).contains(&year)) {
            return Err(ApiError::validation(*field, "must be a time in the years 2000 to 9998 (UTC)"));
        }
    }
    Ok(())
}

/// A path segment that must be a UUID; anything else is a 400 naming `field`.
fn uuid_param(raw: &str, field: &'static str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::try_parse(raw)
        .map_err(|_| ApiError::validation(field, format!("must be a UUID, got {raw:?}")))
}
