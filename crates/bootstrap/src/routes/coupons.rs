//! First-come coupons: campaigns (created by an admin, read by anyone), a coupon per user
//! taken first come, first served, and the caller's own coupons. See
//! `application::coupons` for how the race is decided.

use actix_web::{HttpResponse, web};
use domain::coupon::{Campaign, CampaignId, Coupon, NewCampaign};
use domain::user::UserId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::admin::Admin;
use super::{AppState, admin_times, uuid_param};
use crate::auth::Caller;
use crate::extract::{LateJson, ValidJson};
use crate::limits::RateLimits;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{
    AdminKeyInvalid, BodyTooLarge, MySqlUnavailable, RateLimited, Unauthenticated,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignRequest {
    /// 1..=100 characters (stored trimmed).
    #[schema(min_length = 1, max_length = 100, example = "Early birds")]
    pub name: String,
    /// Points taken off a payment's amount (never below zero).
    #[schema(minimum = 1, maximum = 10_000_000, example = 5_000)]
    #[serde(deserialize_with = "crate::extract::integer")]
    pub discount: i64,
    /// How many coupons there are.
    #[schema(minimum = 1, maximum = 1_000_000, example = 100)]
    #[serde(deserialize_with = "crate::extract::integer")]
    pub quantity: i64,
    /// When issuing opens (RFC 3339, years 2000 to 9998, as are the two below).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub issue_opens_at: OffsetDateTime,
    /// When issuing closes: after `issueOpensAt`.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub issue_closes_at: OffsetDateTime,
    /// Until when issued coupons can be used: no earlier than `issueClosesAt`.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub valid_until: OffsetDateTime,
}

/// A campaign, with the coupons it has left.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignResponse {
    pub id: uuid::Uuid,
    pub name: String,
    pub discount: i64,
    pub quantity: u32,
    /// Coupons not issued yet.
    pub remaining: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub issue_opens_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub issue_closes_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub valid_until: OffsetDateTime,
}

impl CampaignResponse {
    fn of(campaign: &Campaign, remaining: u32) -> Self {
        Self {
            id: *campaign.id.as_uuid(),
            name: campaign.name.clone(),
            discount: campaign.discount,
            quantity: campaign.quantity,
            remaining,
            issue_opens_at: campaign.issue_opens_at,
            issue_closes_at: campaign.issue_closes_at,
            valid_until: campaign.valid_until,
        }
    }
}

/// An issued coupon.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CouponResponse {
    pub id: uuid::Uuid,
    pub campaign_id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub discount: i64,
    /// `AVAILABLE` or `USED`.
    #[schema(example = "AVAILABLE")]
    pub status: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub valid_until: OffsetDateTime,
}

impl From<&Coupon> for CouponResponse {
    fn from(coupon: &Coupon) -> Self {
        Self {
            id: *coupon.id.as_uuid(),
            campaign_id: *coupon.campaign_id.as_uuid(),
            user_id: *coupon.user_id.as_uuid(),
            discount: coupon.discount,
            status: coupon.status.as_str(),
            valid_until: coupon.valid_until,
        }
    }
}

/// The body of a coupon request: nothing (the coupon is always the caller's).
#[derive(Debug, Deserialize, ToSchema)]
pub struct IssueCouponRequest {}

#[derive(Debug, Deserialize, IntoParams)]
pub struct CouponsQuery {
    /// How many coupons, newest first: 1..=1000, default 50.
    #[param(value_type = Option<u16>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
}

/// Create a coupon campaign.
///
/// Its stock is loaded into the fast path at once, so the first requests need not.
///
/// # Errors
/// 400 for a malformed body or a broken rule, 401 without the admin key.
#[utoipa::path(
    post,
    path = "/api/v1/admin/coupon-campaigns",
    tag = "admin",
    params(("X-Admin-Key" = String, Header, description = "The admin key (ADMIN_API_KEY)")),
    request_body = CampaignRequest,
    responses(
        (status = 201, description = "The campaign", body = CampaignResponse),
        (status = 400, description = "Malformed body; name 1..=100 characters, discount 1..=10,000,000, quantity 1..=1,000,000, issueOpensAt < issueClosesAt <= validUntil", body = Problem, content_type = "application/problem+json"),
        AdminKeyInvalid,
        BodyTooLarge,
        MySqlUnavailable,
    )
)]
pub async fn create_campaign(
    state: web::Data<AppState>,
    _admin: Admin,
    ValidJson(body): ValidJson<CampaignRequest>,
) -> Result<HttpResponse, ApiError> {
    admin_times(&[
        ("issueOpensAt", body.issue_opens_at),
        ("issueClosesAt", body.issue_closes_at),
        ("validUntil", body.valid_until),
    ])?;
    // MySQL keeps microseconds: validated as they will be stored, so that two times
    // apart by less than a microsecond are not "before" here and equal there.
    let micros = |at: OffsetDateTime| {
        let at = at.to_offset(time::UtcOffset::UTC);
        at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000).unwrap_or(at)
    };
    let quantity = u32::try_from(body.quantity)
        .ok()
        .filter(|n| (1..=domain::coupon::MAX_QUANTITY).contains(n))
        .ok_or_else(|| ApiError::validation("quantity", "quantity must be 1..=1000000"))?;
    let spec = NewCampaign {
        name: body.name,
        discount: body.discount,
        quantity,
        issue_opens_at: micros(body.issue_opens_at),
        issue_closes_at: micros(body.issue_closes_at),
        valid_until: micros(body.valid_until),
    };
    let campaign = state.coupons.create(spec).await?;
    Ok(HttpResponse::Created().json(CampaignResponse::of(&campaign, campaign.quantity)))
}

/// A campaign and the coupons it has left.
///
/// # Errors
/// 400 for a malformed id, 404 for an unknown campaign.
#[utoipa::path(
    get,
    path = "/api/v1/coupon-campaigns/{campaignId}",
    tag = "coupons",
    params(("campaignId" = uuid::Uuid, Path, description = "The campaign's id")),
    responses(
        (status = 200, description = "The campaign", body = CampaignResponse),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "CAMPAIGN_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn get_campaign(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = CampaignId::from_uuid(uuid_param(&path, "campaignId")?);
    let view = state.coupons.view(id).await?;
    Ok(HttpResponse::Ok().json(CampaignResponse::of(&view.campaign, view.remaining)))
}

/// Take a coupon of a campaign, for the caller: first come, first served, one per user.
/// Limited per user (`RATE_LIMIT_COUPONS_PER_MINUTE`).
///
/// # Errors
/// 400 for a malformed id or body, 401 without a valid access token, 404 for an unknown
/// campaign, 409 when sold out, already issued to the caller or outside the issue window,
/// 429 past the per-user limit, 503 when Redis or MySQL is unavailable (no coupon issued).
#[utoipa::path(
    post,
    path = "/api/v1/coupon-campaigns/{campaignId}/coupons",
    tag = "coupons",
    security(("bearerAuth" = [])),
    params(("campaignId" = uuid::Uuid, Path, description = "The campaign's id")),
    request_body = IssueCouponRequest,
    responses(
        (status = 201, description = "The caller's new coupon", body = CouponResponse),
        (status = 400, description = "Malformed id or body", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 404, description = "CAMPAIGN_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "COUPON_SOLD_OUT, COUPON_ALREADY_ISSUED (one per user) or COUPON_ISSUE_CLOSED (outside issueOpensAt..issueClosesAt)", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        RateLimited,
        (status = 503, description = "SERVICE_UNAVAILABLE (with Retry-After): Redis or MySQL is unavailable, or this instance is shutting down or at its limit of concurrent writes; no coupon was issued. OUTCOME_UNKNOWN (no Retry-After): MySQL did not confirm the commit; list your coupons (GET /api/v1/users/{userId}/coupons): until the outcome is settled (within a minute) a retry is refused as already issued", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn issue_coupon(
    state: web::Data<AppState>,
    limits: web::Data<RateLimits>,
    Caller(user): Caller,
    path: web::Path<String>,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    let id = CampaignId::from_uuid(uuid_param(&path, "campaignId")?);
    let _: IssueCouponRequest = body.read().await?;
    limits.coupon(user)?;
    let coupon = state.coupons.issue(id, user).await?;
    Ok(HttpResponse::Created().json(CouponResponse::from(&coupon)))
}

/// The caller's coupons, newest first.
///
/// # Errors
/// 400 for a malformed id or limit, 401 without a valid access token, 404 for another
/// user's id.
#[utoipa::path(
    get,
    path = "/api/v1/users/{userId}/coupons",
    tag = "coupons",
    security(("bearerAuth" = [])),
    params(("userId" = uuid::Uuid, Path, description = "The caller's own id"), CouponsQuery),
    responses(
        (status = 200, description = "The caller's coupons, newest first", body = [CouponResponse]),
        (status = 400, description = "Malformed id or limit", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 404, description = "USER_NOT_FOUND (also for another user's id)", body = Problem, content_type = "application/problem+json"),
        MySqlUnavailable,
    )
)]
pub async fn user_coupons(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<CouponsQuery>,
) -> Result<HttpResponse, ApiError> {
    let user = caller.owns(UserId::from_uuid(uuid_param(&path, "userId")?))?;
    let limit = match query.limit.as_deref() {
        None => 50,
        Some(raw) => raw.trim().parse::<u32>().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
            ApiError::validation("limit", format!("limit must be a whole number in 1..=1000, got {raw:?}"))
        })?,
    };
    let coupons = state.coupons.of_user(user, limit).await?;
    Ok(HttpResponse::Ok().json(coupons.iter().map(CouponResponse::from).collect::<Vec<_>>()))
}
