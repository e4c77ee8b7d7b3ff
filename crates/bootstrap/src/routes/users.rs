//! `POST /api/v1/users`.

use actix_web::{HttpResponse, web};
use domain::user::{User, UserName};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::extract::ValidJson;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{BodyTooLarge, MySqlUnavailable};

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

impl From<&User> for UserResponse {
    fn from(user: &User) -> Self {
        Self {
            id: *user.id().as_uuid(),
            name: user.name().as_str().to_owned(),
            created_at: user.created_at(),
        }
    }
}

/// Register a user, with an empty point account.
///
/// # Errors
/// 400 for a missing, mistyped or out-of-range name, 503 when MySQL is unavailable.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    request_body = CreateUserRequest,
    responses(
        (status = 201, description = "User created", body = UserResponse),
        (status = 400, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        MySqlUnavailable,
    )
)]
pub async fn create_user(
    state: web::Data<AppState>,
    ValidJson(body): ValidJson<CreateUserRequest>,
) -> Result<HttpResponse, ApiError> {
    let name = UserName::new(&body.name).map_err(|e| ApiError::validation("name", e.to_string()))?;
    let user = state.create_user.execute(name).await?;
    Ok(HttpResponse::Created().json(UserResponse::from(&user)))
}
