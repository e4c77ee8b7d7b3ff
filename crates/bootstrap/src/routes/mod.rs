//! HTTP handlers and their DTOs, one module per resource. Handlers parse and validate,
//! call one use case, and shape the answer; errors become problems through
//! [`crate::problem::ApiError`].

pub mod health;
pub mod points;
pub mod users;

use actix_web::{HttpResponse, web};
use application::charge_points::ChargePoints;
use application::create_user::CreateUser;
use application::get_balance::GetBalance;
use application::point_history::PointHistory;

use crate::problem::ApiError;

/// What handlers share: the use cases, and what readiness checks.
pub struct AppState {
    pub create_user: CreateUser,
    pub charge_points: ChargePoints,
    pub get_balance: GetBalance,
    pub point_history: PointHistory,
    pub readiness: health::Readiness,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// Every route of the API and of operations.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .service(
                web::resource("/users")
                    .route(web::post().to(users::create_user))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{userId}/points")
                    .route(web::get().to(points::get_balance))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{userId}/points/charge")
                    .route(web::post().to(points::charge_points))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{userId}/points/history")
                    .route(web::get().to(points::point_history))
                    .default_service(web::to(method_not_allowed)),
            ),
    )
    .route("/health/live", web::get().to(health::live))
    .route("/health/ready", web::get().to(health::ready))
    .route("/metrics", web::get().to(health::metrics));
}

/// Any path no route claims.
///
/// # Errors
/// Always [`ApiError::RouteNotFound`].
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// A path segment that must be a UUID; anything else is a 400 naming `field`.
fn uuid_param(raw: &str, field: &'static str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::try_parse(raw)
        .map_err(|_| ApiError::validation(field, format!("must be a UUID, got {raw:?}")))
}
