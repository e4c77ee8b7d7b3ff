//! `POST /api/v1/auth/tokens`: an API key for a short-lived access token.

use actix_web::{HttpRequest, HttpResponse, web};
use application::identity::SignInError;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::auth::bearer;
use crate::limits::RateLimits;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{MySqlUnavailable, RateLimited};

/// Its `Debug` leaves the secret out.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessTokenResponse {
    /// A signed JWT: send it as `Authorization: Bearer <accessToken>` on every user route.
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// When it stops being accepted (`AUTH_TOKEN_SECONDS` after issue, 15 minutes by
    /// default): take a new one with the API key.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
}

/// Take an access token.
///
/// Send the API key that sign-up showed, as `Authorization: Bearer <apiKey>` (no body).
/// The token is verified by every instance without a store lookup. Requests are limited
/// per client address (`RATE_LIMIT_AUTH_PER_MINUTE`).
///
/// # Errors
/// 401 `UNAUTHENTICATED` for a missing or unknown API key, 429 past the limit, 503 when
/// MySQL is unavailable.
#[utoipa::path(
    post,
    path = "/api/v1/auth/tokens",
    tag = "users",
    security(("apiKey" = [])),
    responses(
        (status = 201, description = "A new access token", body = AccessTokenResponse),
        (status = 401, description = "UNAUTHENTICATED: no Authorization: Bearer <apiKey>, or no user has this key (with WWW-Authenticate: Bearer)", body = Problem, content_type = "application/problem+json"),
        RateLimited,
        MySqlUnavailable,
    )
)]
pub async fn issue_access_token(
    state: web::Data<AppState>,
    limits: web::Data<RateLimits>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    limits.access_token(&req)?;
    let key = bearer(&req).map_err(|_| ApiError::ApiKeyInvalid)?;
    let (_, token) = state.sign_in.execute(key).await.map_err(|error| match error {
        SignInError::Unauthenticated => {
            metrics::counter!("auth_refusals_total", "reason" => "api_key").increment(1);
            ApiError::ApiKeyInvalid
        }
        SignInError::Failure(failure) => failure.into(),
    })?;
    Ok(HttpResponse::Created().json(AccessTokenResponse {
        access_token: token.token,
        token_type: "Bearer",
        expires_at: token.expires_at,
    }))
}

impl std::fmt::Debug for AccessTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokenResponse").finish_non_exhaustive()
    }
}
