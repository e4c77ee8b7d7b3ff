//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/api-docs/openapi.json`, with Swagger UI (vendored in the binary) at `/docs`.

use utoipa::OpenApi;

use crate::problem::Problem;
use crate::routes::{health, points, users};

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
        health::live,
        health::ready,
    ),
    components(schemas(Problem)),
    tags(
        (name = "users", description = "Registration"),
        (name = "points", description = "Prepaid points: balance, charge, history"),
        (name = "operations", description = "Health"),
    )
)]
pub struct ApiDoc;
