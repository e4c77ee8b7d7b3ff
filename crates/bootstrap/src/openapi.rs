//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/api-docs/openapi.json`, with Swagger UI (vendored in the binary) at `/docs`.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{health, points, queue, users};

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "concert-server",
        description = "Concert seat reservations through a traffic spike: users, points, \
                       waiting queue, seat holds and payments. Errors are RFC 9457 \
                       application/problem+json with a stable `code`."
    ),
    paths(
        users::create_user,
        points::get_balance,
        points::charge_points,
        points::point_history,
        queue::issue_token,
        queue::my_token,
        queue::my_token_events,
        health::live,
        health::ready,
    ),
    components(schemas(Problem, queue::QueueEvent)),
    tags(
        (name = "users", description = "Registration"),
        (name = "points", description = "Prepaid points: balance, charge, history"),
        (name = "queue", description = "The waiting queue: a token with a place in line, its view and live events. \
            The booking routes admit only the holder of an ACTIVE token (header `Queue-Token`): no header, \
            a malformed, unknown or expired token is 401 `QUEUE_TOKEN_INVALID`; a WAITING one is 403 \
            `QUEUE_TOKEN_NOT_ACTIVE`. How tokens are admitted is the server's configuration: \
            `QUEUE_ADMIT_POLICY` `max-active` keeps up to `QUEUE_MAX_ACTIVE` tokens active, `rate` admits \
            `QUEUE_ADMIT_BATCH` every `QUEUE_ADMIT_INTERVAL_MS` (never past `QUEUE_MAX_ACTIVE`); an active \
            token lasts `QUEUE_ACTIVE_SECONDS`; a waiting token nobody asks about (no view, no open event \
            stream) for `QUEUE_WAITING_IDLE_SECONDS` leaves the line; `QUEUE_BACKEND` is `redis` or `mysql`."),
        (name = "operations", description = "Health"),
    )
)]
pub struct ApiDoc;
