//! `POST /api/v1/users`.

use actix_web::{HttpRequest, HttpResponse, web};
use domain::user::{User, UserName};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::extract::LateJson;
use crate::limits::RateLimits;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{BodyTooLarge, MySqlUnavailable, RateLimited};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateUserRequest {
    /// 1 to 50 characters (white space around the name counts, and is trimmed before the
    /// name is stored), at least one of them visible (neither white space, a control
    /// character, nor an invisible one such as U+200B or U+FEFF), no control characters at
    /// all (C0, DEL, C1) and no bidirectional controls (U+061C, U+200E, U+200F,
    /// U+202A..U+202E, U+2066..U+2069). The same rule as `domain::user::UserName`.
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*[^\u0000-\u0020\u007f-\u00a0\u00ad\u034f\u061c\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0][^\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*$",
        example = "kim"
    )]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserResponse {
    pub id: uuid::Uuid,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// A new user, with its API key shown this once.
/// Its `Debug` leaves the secret out.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedUserResponse {
    #[serde(flatten)]
    pub user: UserResponse,
    /// The user's API key, shown only in this answer (the server keeps its digest, so it
    /// cannot be shown again): exchange it for access tokens at `POST /api/v1/auth/tokens`.
    #[schema(example = "ck_3q2-7wE1bS0hZf5cX8yVnLk4pR6tJ9mQaUoGiD2eB7s", pattern = "^ck_[A-Za-z0-9_-]{43}$")]
    pub api_key: String,
}

impl From<&User> for UserResponse {
    fn from(user: &User) -> Self {
        Self {
            id: *user.id().as_uuid(),
            name: user.name().as_str().to_owned(),
            created_at: user.created_at(),
        }
    }
}

/// Register a user, with an empty point account and an API key.
///
/// The answer carries the user's `apiKey` this once; only its digest is kept. Sign-ups are
/// limited per client address (`RATE_LIMIT_SIGNUPS_PER_MINUTE`).
///
/// # Errors
/// 400 for a missing, mistyped or out-of-range name, 429 past the per-address limit, 503
/// when MySQL is unavailable.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    request_body = CreateUserRequest,
    responses(
        (status = 201, description = "User created; `apiKey` is shown only here", body = CreatedUserResponse),
        (status = 400, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        RateLimited,
        MySqlUnavailable,
    )
)]
pub async fn create_user(
    state: web::Data<AppState>,
    limits: web::Data<RateLimits>,
    req: HttpRequest,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    limits.signup(&req)?;
    let body: CreateUserRequest = body.read().await?;
    let name = UserName::new(&body.name).map_err(|e| ApiError::validation("name", e.to_string()))?;
    let (user, api_key) = state.create_user.execute(name).await?;
    Ok(HttpResponse::Created()
        .json(CreatedUserResponse { user: UserResponse::from(&user), api_key: api_key.as_str().to_owned() }))
}

impl std::fmt::Debug for CreatedUserResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedUserResponse").finish_non_exhaustive()
    }
}
