//! `/api/v1/concerts/ranking`: the popular concerts, by confirmed reservations over about
//! the last day. See `application::ranking` for where the counts come from.

use actix_web::{HttpResponse, web};
use application::ranking::{RankedConcert, RankingLimit};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::MySqlUnavailable;

#[derive(Debug, Deserialize, IntoParams)]
pub struct RankingQuery {
    /// How many concerts: 1..=100, default 10.
    #[param(value_type = Option<u8>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
}

/// A concert and its confirmed reservations in the window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankedConcertResponse {
    pub concert_id: uuid::Uuid,
    #[schema(example = "Winter Lights Orchestra")]
    pub title: String,
    /// Seats paid for (completed payments) in the window.
    #[schema(example = 42, minimum = 1)]
    pub reservations: u64,
}

impl From<&RankedConcert> for RankedConcertResponse {
    fn from(ranked: &RankedConcert) -> Self {
        Self { concert_id: ranked.concert_id, title: ranked.title.clone(), reservations: ranked.reservations }
    }
}

/// The concerts with the most confirmed reservations (completed payments) over the current
/// hour and the 24 whole hours before it (UTC), most first; ties by title, then id. No
/// token needed.
///
/// Counted as payments complete (within about a second, through the outbox) and cached
/// for up to 10 s, so a payment shows here within seconds, not at once. A concert with no
/// payment in the window is not listed.
///
/// # Errors
/// 400 for a malformed limit, 503 when the ranking must be counted in MySQL and MySQL is
/// unavailable.
#[utoipa::path(
    get,
    path = "/api/v1/concerts/ranking",
    tag = "concerts",
    params(RankingQuery),
    responses(
        (status = 200, description = "Concerts, most confirmed reservations first", body = [RankedConcertResponse]),
        (status = 400, description = "VALIDATION_FAILED (field `limit`): not a whole number in 1..=100", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn ranking(
    state: web::Data<AppState>,
    query: web::Query<RankingQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = match query.limit.as_deref() {
        None => RankingLimit::default(),
        Some(raw) => {
            raw.trim().parse::<i64>().ok().and_then(|n| RankingLimit::new(n).ok()).ok_or_else(|| {
                ApiError::validation("limit", format!("limit must be a whole number in 1..=100, got {raw:?}"))
            })?
        }
    };
    let ranked = state.ranking.top(limit).await?;
    Ok(HttpResponse::Ok().json(ranked.iter().map(RankedConcertResponse::from).collect::<Vec<_>>()))
}
