//! `/api/v1/concerts`, `/api/v1/concerts/{concertId}/schedules`,
//! `/api/v1/schedules/{scheduleId}/seats`: the catalog, read through the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use actix_web::{HttpResponse, web};
use application::cache::Peeked;
use application::catalog::{ConcertView, OpenSchedule, SeatMap};
use domain::booking::{ConcertId, ScheduleId, SeatStatus};
use futures::future::Either;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{AppState, uuid_param};
use crate::gate::{Admitted, Gate};
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{MySqlOrQueueUnavailable, QueueGate};

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcertResponse {
    pub id: uuid::Uuid,
    #[schema(example = "Winter Lights Orchestra")]
    pub title: String,
    #[schema(example = "Seoul Arts Center")]
    pub venue: String,
}

impl From<&ConcertView> for ConcertResponse {
    fn from(concert: &ConcertView) -> Self {
        Self { id: concert.id, title: concert.title.clone(), venue: concert.venue.clone() }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleResponse {
    pub id: uuid::Uuid,
    pub concert_id: uuid::Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub starts_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub booking_opens_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub booking_closes_at: OffsetDateTime,
    #[schema(example = 50, minimum = 0)]
    pub total_seats: u32,
    /// Seats AVAILABLE now (a hold that ran out counts as available).
    #[schema(example = 37, minimum = 0)]
    pub available_seats: u32,
}

impl From<&OpenSchedule> for ScheduleResponse {
    fn from(open: &OpenSchedule) -> Self {
        let s = &open.schedule;
        Self {
            id: s.id,
            concert_id: s.concert_id,
            starts_at: s.starts_at,
            booking_opens_at: s.booking_opens_at,
            booking_closes_at: s.booking_closes_at,
            total_seats: u32::try_from(open.total_seats).unwrap_or(u32::MAX),
            available_seats: u32::try_from(open.available_seats).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeatResponse {
    #[schema(minimum = 1, maximum = 50, example = 7)]
    pub seat_number: u8,
    #[schema(minimum = 0, maximum = 10_000_000, example = 80_000)]
    pub price: i64,
    /// `AVAILABLE`, `HELD` or `SOLD`, as of this answer.
    #[schema(pattern = "^(AVAILABLE|HELD|SOLD)$", example = "AVAILABLE")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeatMapResponse {
    pub schedule_id: uuid::Uuid,
    /// All 50 seats, numbers ascending.
    pub seats: Vec<SeatResponse>,
}

impl SeatMapResponse {
    fn at(map: &SeatMap, now: OffsetDateTime) -> Self {
        Self {
            schedule_id: map.schedule.id,
            seats: map
                .seats
                .iter()
                .map(|seat| SeatResponse {
                    seat_number: seat.number,
                    price: seat.price,
                    status: seat.status_at(now).as_str(),
                })
                .collect(),
        }
    }
}

/// Seat maps rendered as JSON bytes, by date. A rendering is reused while the cache hands
/// back the same map (the same allocation: the same version of the same date) and no hold
/// shown in it has run out since, which are the only two things an answer depends on; so a
/// hot seat map is serialised once per change on each instance, not once per request.
#[derive(Default)]
pub struct RenderedSeatMaps(Mutex<HashMap<uuid::Uuid, Rendered>>);

struct Rendered {
    map: Weak<SeatMap>,
    body: web::Bytes,
    /// The moment it shows: it serves no earlier one (a clock stepped back).
    at: OffsetDateTime,
    /// When the first hold shown runs out (the answer changes then); `None`: never.
    until: Option<OffsetDateTime>,
}

/// Renderings kept per instance before the ones of maps no longer cached are dropped.
const RENDERED_CAPACITY: usize = 10_000;

impl RenderedSeatMaps {
    fn body(&self, map: &Arc<SeatMap>, now: OffsetDateTime) -> Result<web::Bytes, ApiError> {
        let id = map.schedule.id;
        {
            let rendered = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(r) = rendered.get(&id)
                && std::ptr::eq(r.map.as_ptr(), Arc::as_ptr(map))
                && r.at <= now
                && r.until.is_none_or(|until| now < until)
            {
                return Ok(r.body.clone());
            }
        }
        let body = web::Bytes::from(
            serde_json::to_vec(&SeatMapResponse::at(map, now))
                .map_err(|e| anyhow::Error::new(e).context("failed to render a seat map"))?,
        );
        let until = map
            .seats
            .iter()
            .filter(|seat| seat.status_at(now) == SeatStatus::Held)
            .filter_map(|seat| seat.held_until)
            .min();
        let mut rendered = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if rendered.len() >= RENDERED_CAPACITY {
            rendered.retain(|_, r| r.map.strong_count() > 0);
        }
        rendered.insert(id, Rendered { map: Arc::downgrade(map), body: body.clone(), at: now, until });
        Ok(body)
    }
}

impl std::fmt::Debug for RenderedSeatMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedSeatMaps").finish_non_exhaustive()
    }
}

/// Every concert. No queue token needed.
///
/// # Errors
/// 503 when MySQL is unavailable and the answer is not cached.
#[utoipa::path(
    get,
    path = "/api/v1/concerts",
    tag = "concerts",
    responses(
        (status = 200, description = "Every concert, by title", body = [ConcertResponse]),
        (status = 503, description = "SERVICE_UNAVAILABLE: MySQL is unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_concerts(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let concerts = state.catalog.concerts().await?;
    Ok(HttpResponse::Ok().json(concerts.iter().map(ConcertResponse::from).collect::<Vec<_>>()))
}

/// The concert's dates whose booking window is open now, with their seat counts.
///
/// # Errors
/// 400 for a malformed id, 401/403 without an ACTIVE queue token, 404 for an unknown
/// concert, 503 when a store is unavailable.
#[utoipa::path(
    get,
    path = "/api/v1/concerts/{concertId}/schedules",
    tag = "concerts",
    security(("bearerAuth" = [])),
    params(
        ("concertId" = uuid::Uuid, Path, description = "The concert's id"),
        ("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token"),
    ),
    responses(
        (status = 200, description = "Open dates, by start time", body = [ScheduleResponse]),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "CONCERT_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        MySqlOrQueueUnavailable,
    )
)]
pub async fn list_schedules(
    state: web::Data<AppState>,
    path: web::Path<String>,
    _admitted: Admitted,
) -> Result<HttpResponse, ApiError> {
    let concert = ConcertId::from_uuid(uuid_param(&path, "concertId")?);
    let schedules = state.catalog.open_schedules(concert).await?;
    Ok(HttpResponse::Ok().json(schedules.iter().map(ScheduleResponse::from).collect::<Vec<_>>()))
}

/// The date's 50 seats and their status now. Served from the cache, yet never older than
/// the last change: a seat held or sold through any instance shows so in every answer
/// given after that request returned; a hold that ran out shows AVAILABLE at once.
///
/// # Errors
/// 400 for a malformed id, 401/403 without an ACTIVE queue token, 404 for an unknown
/// schedule, 503 when a store is unavailable.
#[utoipa::path(
    get,
    path = "/api/v1/schedules/{scheduleId}/seats",
    tag = "concerts",
    security(("bearerAuth" = [])),
    params(
        ("scheduleId" = uuid::Uuid, Path, description = "The schedule's (date's) id"),
        ("Queue-Token" = uuid::Uuid, Header, description = "An ACTIVE queue token"),
    ),
    responses(
        (status = 200, description = "The seat map", body = SeatMapResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        QueueGate,
        (status = 404, description = "SCHEDULE_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        MySqlOrQueueUnavailable,
    )
)]
pub async fn seat_map(
    state: web::Data<AppState>,
    path: web::Path<String>,
    gate: Gate,
) -> Result<HttpResponse, ApiError> {
    let schedule = uuid_param(&path, "scheduleId").map(ScheduleId::from_uuid);
    // The queue gate and the cache's version check go out side by side: one round trip's
    // wait, not two. The cache only: a caller the gate refuses reads no MySQL.
    let peek = match (&schedule, gate.has_token()) {
        (Ok(schedule), true) => Either::Left(state.catalog.cached_seat_map(*schedule)),
        _ => Either::Right(std::future::ready(Err(Peeked::NOTHING))),
    };
    let (admitted, cached) = futures::future::join(gate.admit(), peek).await;
    admitted?;
    let schedule = schedule?;
    let map = match cached {
        Ok(map) => map,
        // A miss goes on from the peek's check instead of sending another.
        Err(peeked) => state.catalog.seat_map_after(schedule, peeked).await?,
    };
    let body = state.seat_maps.body(&map, application::clock::now_utc())?;
    Ok(HttpResponse::Ok().content_type("application/json").body(body))
}

#[cfg(test)]
mod tests {
    use application::catalog::{ScheduleView, SeatView, StoredSeat};
    use time::Duration;

    use super::*;

    fn map(held_until: Option<OffsetDateTime>) -> Arc<SeatMap> {
        let now = OffsetDateTime::now_utc();
        let seat = |number: u8, stored, held_until| SeatView { number, price: 100, stored, held_until };
        Arc::new(SeatMap {
            schedule: ScheduleView {
                id: uuid::Uuid::now_v7(),
                concert_id: uuid::Uuid::now_v7(),
                starts_at: now,
                booking_opens_at: now,
                booking_closes_at: now,
            },
            seats: vec![seat(1, StoredSeat::Held, held_until), seat(2, StoredSeat::Available, None)],
        })
    }

    fn statuses(body: &web::Bytes) -> Vec<String> {
        let json: serde_json::Value = serde_json::from_slice(body).expect("json");
        json["seats"]
            .as_array()
            .expect("seats")
            .iter()
            .map(|s| s["status"].as_str().expect("status").to_owned())
            .collect()
    }

    #[test]
    fn a_rendering_is_reused_for_the_same_map_until_a_hold_in_it_runs_out() {
        let rendered = RenderedSeatMaps::default();
        let now = OffsetDateTime::now_utc();
        let map = map(Some(now + Duration::minutes(5)));

        let first = rendered.body(&map, now).unwrap();
        let again = rendered.body(&map, now + Duration::minutes(4)).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "the same bytes, not rendered again");
        assert_eq!(statuses(&again), ["HELD", "AVAILABLE"]);

        let after = rendered.body(&map, now + Duration::minutes(5)).unwrap();
        assert_eq!(statuses(&after), ["AVAILABLE", "AVAILABLE"], "the hold ran out: rendered again");
    }

    #[test]
    fn another_version_of_the_map_is_rendered_again() {
        let rendered = RenderedSeatMaps::default();
        let now = OffsetDateTime::now_utc();
        let held = map(Some(now + Duration::minutes(5)));
        let first = rendered.body(&held, now).unwrap();
        // The same date, a new version from the cache (the hold was cancelled).
        let mut cancelled = (*held).clone();
        cancelled.seats[0] =
            SeatView { stored: StoredSeat::Available, held_until: None, ..cancelled.seats[0].clone() };
        let cancelled = Arc::new(cancelled);

        let second = rendered.body(&cancelled, now).unwrap();

        assert_ne!(first.as_ptr(), second.as_ptr());
        assert_eq!(statuses(&second), ["AVAILABLE", "AVAILABLE"]);
    }
}
