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
    /// name is stored), at least one of them neither white space nor a control character,
    /// and no control characters at all (C0, DEL, C1).
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000-\u001f\u007f-\u009f]*$",
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
