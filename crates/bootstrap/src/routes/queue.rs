//! `/api/v1/queue/tokens`: a place in line, its view and its live events. The gate that
//! the booking routes put in front of themselves is [`crate::gate`].

use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use application::queue::{IssueTokenError, TokenView};
use domain::queue::QueueStatus;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use crate::auth::Caller;
use crate::extract::LateJson;
use crate::gate::queue_token;
use crate::limits::RateLimits;
use crate::problem::{ApiError, Problem};
use crate::problem_responses::{
    BodyTooLarge, MySqlOrQueueUnavailable, QueueStoreUnavailable, QueueTokenInvalid, RateLimited,
    Unauthenticated,
};
use crate::queue_events::{StreamState, Subscription};

/// How often an event stream sends a comment line when nothing changed, so that proxies
/// and clients see the connection is alive.
const HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssueTokenRequest {
    /// Optional: the caller's own id (the token is always the caller's; any other id is
    /// 403 `FORBIDDEN`).
    #[schema(pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    pub user_id: Option<uuid::Uuid>,
}

/// A queue token as its holder sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenViewResponse {
    /// The token: send it as the `Queue-Token` header.
    pub token: uuid::Uuid,
    pub user_id: uuid::Uuid,
    /// `WAITING` until admitted, then `ACTIVE`.
    #[schema(example = "WAITING")]
    pub status: &'static str,
    /// 1-based place among waiting tokens; null once active.
    #[schema(example = 17, minimum = 1)]
    pub position: Option<u64>,
    /// Seconds until admission at the admission rate observed recently; null when active
    /// or when nobody was admitted recently.
    #[schema(example = 42)]
    pub estimated_wait_seconds: Option<u64>,
    /// When an active token stops being valid; null while waiting.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
}

impl From<&TokenView> for TokenViewResponse {
    fn from(view: &TokenView) -> Self {
        Self {
            token: *view.token.as_uuid(),
            user_id: *view.user_id.as_uuid(),
            status: view.status.as_str(),
            position: view.position,
            estimated_wait_seconds: view.estimated_wait_seconds,
            expires_at: view.expires_at,
        }
    }
}

/// One Server-Sent Event of `GET /api/v1/queue/tokens/me/events` (as an SSE client reads
/// it: an event name and its data line). Documents the stream; never serialised itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueEvent {
    /// `status`: `data` is a token view (the JSON of `TokenViewResponse`); `expired`: the
    /// token is no longer live, `data` is `{}`, and the stream ends; `superseded`: a newer
    /// stream of this token opened (at most 2 are kept), `data` is `{}`, and this one ends
    /// (do not reconnect it).
    #[schema(pattern = "^(status|expired|superseded)$", example = "status")]
    pub event: String,
    /// JSON text: a token view for `status`, `{}` for `expired`.
    #[schema(
        example = r#"{"token":"01a2...","userId":"01a2...","status":"WAITING","position":17,"estimatedWaitSeconds":42,"expiresAt":null}"#
    )]
    pub data: String,
}

/// Take a place in line, for the caller.
///
/// A user with a live token gets that same token back (200), place kept; otherwise a new
/// WAITING token at the end of the line (201). Limited per user
/// (`RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE`).
///
/// # Errors
/// 400 for a malformed body, 401 without a valid access token, 403 for a `userId` that is
/// not the caller's, 429 past the limit, 503 when the queue's store is down.
#[utoipa::path(
    post,
    path = "/api/v1/queue/tokens",
    tag = "queue",
    security(("bearerAuth" = [])),
    request_body = IssueTokenRequest,
    responses(
        (status = 201, description = "A new token", body = TokenViewResponse),
        (status = 200, description = "The user's live token, place kept", body = TokenViewResponse),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        Unauthenticated,
        (status = 403, description = "FORBIDDEN: the body names another user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "USER_NOT_FOUND: the caller's account no longer exists", body = Problem, content_type = "application/problem+json"),
        BodyTooLarge,
        RateLimited,
        MySqlOrQueueUnavailable,
    )
)]
pub async fn issue_token(
    state: web::Data<AppState>,
    limits: web::Data<RateLimits>,
    Caller(user_id): Caller,
    body: LateJson,
) -> Result<HttpResponse, ApiError> {
    let body: IssueTokenRequest = body.read().await?;
    if body.user_id.is_some_and(|named| named != *user_id.as_uuid()) {
        return Err(ApiError::Forbidden(
            "a queue token can be taken only for yourself; leave userId out, or send your own",
        ));
    }
    limits.queue_token(user_id)?;
    let (view, created) = state.issue_token.execute(user_id).await.map_err(|error| match error {
        IssueTokenError::UserNotFound(id) => ApiError::UserNotFound(*id.as_uuid()),
        IssueTokenError::Unexpected(error) => error.into(),
    })?;
    let mut response = if created { HttpResponse::Created() } else { HttpResponse::Ok() };
    Ok(response.json(TokenViewResponse::from(&view)))
}

/// The view of the caller's token.
///
/// # Errors
/// 401 without a valid access token, or when the `Queue-Token` is missing, malformed,
/// unknown, expired or another user's.
#[utoipa::path(
    get,
    path = "/api/v1/queue/tokens/me",
    tag = "queue",
    security(("bearerAuth" = [])),
    params(("Queue-Token" = uuid::Uuid, Header, description = "The queue token")),
    responses(
        (status = 200, description = "The token's view", body = TokenViewResponse),
        QueueTokenInvalid,
        QueueStoreUnavailable,
    )
)]
pub async fn my_token(
    state: web::Data<AppState>,
    Caller(user): Caller,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let view = state.queue_reader.view(queue_token(&req)?, user).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(TokenViewResponse::from(&view)))
}

/// The caller's token as Server-Sent Events.
///
/// An `event: status` with the token's view now, then each time it changes (position,
/// estimate, admission), with a comment line every 15 s in between. The stream ends after
/// the ACTIVE view, or with an `event: expired` when the token is no longer live. When the
/// instance stops, the stream ends with a `retry` hint: reconnect with the same token
/// (the place in line is kept).
///
/// A token has at most 2 open streams (on each instance): a third ends the oldest. An
/// instance serves at most `SSE_MAX_STREAMS` streams; past that it answers 503 with
/// `Retry-After` (another instance may have room).
///
/// # Errors
/// 401 without a valid access token, or when the `Queue-Token` is missing, malformed,
/// unknown, expired or another user's; 503 when this instance serves all the streams it
/// takes.
#[utoipa::path(
    get,
    path = "/api/v1/queue/tokens/me/events",
    tag = "queue",
    security(("bearerAuth" = [])),
    params(("Queue-Token" = uuid::Uuid, Header, description = "The queue token")),
    responses(
        (status = 200, description = "`text/event-stream`: `event: status` with a token view as `data`, each time it changes; `event: expired` when the token is gone. The schema is that of one event.", body = QueueEvent, content_type = "text/event-stream"),
        QueueTokenInvalid,
        (status = 503, description = "SERVICE_UNAVAILABLE (with Retry-After): the queue's store is unavailable, or this instance serves as many event streams as it takes", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn my_token_events(
    state: web::Data<AppState>,
    Caller(user): Caller,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let token = queue_token(&req)?;
    let first = state.queue_reader.view(token, user).await?;
    let updates = state.queue_events.subscribe(token, first.clone()).ok_or_else(|| {
        ApiError::Unavailable(
            "this instance serves as many event streams as it takes; retry shortly (another instance may have room), or poll GET /api/v1/queue/tokens/me".into(),
        )
    })?;
    let stream = futures::stream::unfold(
        Stream {
            first: Some(StreamState::View(first)),
            subscription: updates,
            heartbeat: heartbeat(),
            done: false,
            hub_let_go: false,
        },
        next_event,
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream))
}

struct Stream {
    first: Option<StreamState>,
    subscription: Subscription,
    heartbeat: tokio::time::Interval,
    done: bool,
    /// The hub dropped this token's ender (it let go of the token): nothing can push this
    /// stream out any more, and the closed channel must not be polled again.
    hub_let_go: bool,
}

fn heartbeat() -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT)
}

async fn next_event(mut stream: Stream) -> Option<(Result<Bytes, actix_web::Error>, Stream)> {
    if stream.done {
        return None;
    }
    if let Some(first) = stream.first.take() {
        let bytes = event(&first, &mut stream.done);
        return Some((Ok(bytes), stream));
    }
    loop {
        tokio::select! {
            changed = stream.subscription.updates.changed() => {
                if changed.is_err() {
                    // The hub let go of this token after its last state was read.
                    return None;
                }
                let state = stream.subscription.updates.borrow_and_update().clone();
                let bytes = event(&state, &mut stream.done);
                return Some((Ok(bytes), stream));
            }
            pushed = &mut stream.subscription.superseded, if !stream.hub_let_go => {
                if pushed.is_ok() {
                    // A third stream of this token opened: this, the oldest, ends. No
                    // `retry`: the client that opened the newer one follows it.
                    stream.done = true;
                    return Some((Ok(Bytes::from_static(SUPERSEDED)), stream));
                }
                stream.hub_let_go = true;
            }
            _ = stream.heartbeat.tick() => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), stream)),
        }
    }
}

/// The last frame of a stream that a newer stream of its token pushed out.
const SUPERSEDED: &[u8] = b"event: superseded\ndata: {}\n\n";

/// The SSE frame for `state`; sets `done` when it is the last one.
fn event(state: &StreamState, done: &mut bool) -> Bytes {
    match state {
        StreamState::View(view) => {
            *done = view.status == QueueStatus::Active;
            let data = serde_json::to_string(&TokenViewResponse::from(view)).unwrap_or_default();
            Bytes::from(format!("event: status\ndata: {data}\n\n"))
        }
        StreamState::Gone => {
            *done = true;
            Bytes::from_static(b"event: expired\ndata: {}\n\n")
        }
        StreamState::Closing => {
            // No event: a comment, and a reconnection delay for the client's EventSource.
            *done = true;
            Bytes::from_static(b": this instance is stopping; reconnect\nretry: 1000\n\n")
        }
    }
}
