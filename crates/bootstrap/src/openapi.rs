//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/api-docs/openapi.json`, with Swagger UI (vendored in the binary) at `/docs`.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{
    admin, auth, catalog, coupons, page, payments, points, queue, ranking, reservations, users,
};

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
        auth::issue_access_token,
        points::get_balance,
        points::charge_points,
        points::point_history,
        queue::issue_token,
        queue::my_token,
        queue::my_token_events,
        catalog::list_concerts,
        ranking::ranking,
        catalog::list_schedules,
        catalog::seat_map,
        reservations::hold_seat,
        reservations::get_reservation,
        reservations::cancel_reservation,
        payments::pay,
        admin::create_concert,
        admin::update_concert,
        admin::add_schedule,
        admin::rotate_signing_key,
        coupons::create_campaign,
        coupons::get_campaign,
        coupons::issue_coupon,
        coupons::user_coupons,
        page::index,
        page::script,
        page::style,
    ),
    modifiers(&SecuritySchemes, &RefusedWhileStopping),
    components(schemas(Problem, queue::QueueEvent)),
    tags(
        (name = "users", description = "Sign-up and access tokens. Sign-up shows the user's `apiKey` once; \
            `POST /api/v1/auth/tokens` exchanges it (as `Authorization: Bearer <apiKey>`) for an access token \
            (a JWT, `AUTH_TOKEN_SECONDS`, 15 minutes by default) that every user route takes as \
            `Authorization: Bearer <accessToken>`. The user is always the token's subject: another user's \
            points, history, queue token, reservation or payment answer exactly as unknown ones."),
        (name = "points", description = "Prepaid points: balance, charge, history"),
        (name = "coupons", description = "First-come coupon campaigns: at most `quantity` coupons are ever issued, \
            at most one per user, and an issued coupon is never lost. Each request is decided in Redis by one atomic \
            script; MySQL keeps the truth and guards both rules again."),
        (name = "page", description = "The booking page for people (not for API clients): HTML, script and style, \
            served with a Content-Security-Policy that allows this origin's own files and API only"),
        (name = "queue", description = "The waiting queue: a token with a place in line, its view and live events. \
            The booking routes admit only the holder of an ACTIVE token (header `Queue-Token`): no header, \
            a malformed, unknown or expired token is 401 `QUEUE_TOKEN_INVALID`; a WAITING one is 403 \
            `QUEUE_TOKEN_NOT_ACTIVE`. How tokens are admitted is the server's configuration: \
            `QUEUE_ADMIT_POLICY` `max-active` keeps up to `QUEUE_MAX_ACTIVE` tokens active, `rate` admits \
            `QUEUE_ADMIT_BATCH` every `QUEUE_ADMIT_INTERVAL_MS` (never past `QUEUE_MAX_ACTIVE`); an active \
            token lasts `QUEUE_ACTIVE_SECONDS`; a waiting token nobody asks about (no view, no open event \
            stream) for `QUEUE_WAITING_IDLE_SECONDS` leaves the line; `QUEUE_BACKEND` is `redis` or `mysql`."),
        (name = "concerts", description = "Concerts and their ranking (no token), their open dates and seat maps \
            (ACTIVE queue token). Served from a cache that is never older than the last change: a seat held, \
            cancelled or sold through any instance shows so in every answer given after that request returned, and \
            a hold that ran out shows AVAILABLE at once. The ranking is the exception: counted from payment events \
            and cached for up to 10 s."),
        (name = "reservations", description = "Seat holds (ACTIVE queue token; the user is the token's). A hold \
            lasts RESERVATION_HOLD_SECONDS (default 300); one seat is held by at most one reservation at a time."),
        (name = "payments", description = "Paying a hold with points: exactly once whatever the retries (Idempotency-Key), \
            atomically (points, history, payment, reservation CONFIRMED, seat SOLD, outbox event), then the queue token \
            expired. Events go to the Redis Stream events:payments through a transactional outbox, at least once, in \
            order per reservation."),
        (name = "admin", description = "Catalog writes; only when ADMIN_API_KEY is set, with it in X-Admin-Key \
            (else 401 ADMIN_KEY_INVALID). Each write evicts the cached answers it changes on every instance."),
    )
)]
pub struct ApiDoc;

/// The security schemes the routes name: `bearerAuth` (an access token) on every user
/// route, `apiKey` (the key sign-up showed, also sent as a bearer) on `POST /auth/tokens`,
/// so Swagger UI's Authorize button fills both in.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An access token from POST /api/v1/auth/tokens"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The apiKey that POST /api/v1/users showed once"))
                    .build(),
            ),
        );
    }
}

/// What every route of the public listener may answer while its instance stops
/// ([`crate::draining`]).
const STOPPING: &str = "SERVICE_UNAVAILABLE (with Retry-After and Connection: close) also while this instance is \
    shutting down: nothing was done; retry, another instance answers";

/// Every route of the public listener (all but `/health/...`, served by the operations
/// listener) may be refused with 503 while its instance stops: said on each, beside what
/// its own 503 means, or as its only 503.
struct RefusedWhileStopping;

impl utoipa::Modify for RefusedWhileStopping {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        for (path, item) in &mut openapi.paths.paths {
            if path.starts_with("/health") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                match operation.responses.responses.get_mut("503") {
                    Some(RefOr::T(response)) if !response.description.contains("shutting down") => {
                        response.description =
                            format!("{}. {STOPPING}", response.description.trim_end_matches('.'));
                    }
                    Some(_) => {}
                    None => {
                        let problem =
                            ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
                        let refusal = ResponseBuilder::new()
                            .description(STOPPING)
                            .content("application/problem+json", problem)
                            .build();
                        operation.responses.responses.insert("503".to_owned(), RefOr::T(refusal));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;

    use super::*;

    #[test]
    fn every_public_route_says_it_may_be_refused_while_the_instance_stops() {
        let document = ApiDoc::openapi();
        let mut seen = 0;
        for (path, item) in &document.paths.paths {
            let operations = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
            for operation in operations.into_iter().flatten() {
                let refusal = operation.responses.responses.get("503");
                if path.starts_with("/health") {
                    continue;
                }
                seen += 1;
                let Some(utoipa::openapi::RefOr::T(refusal)) = refusal else {
                    panic!("{path}: no 503 of its own")
                };
                assert!(refusal.description.contains("shutting down"), "{path}: {}", refusal.description);
            }
        }
        assert!(seen > 20, "every route looked at: {seen}");
    }
}
