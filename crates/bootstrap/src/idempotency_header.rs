//! The idempotency headers, for every route that takes a key (a points charge, a
//! payment): `Idempotency-Key` in, `Idempotent-Replayed` out.

use actix_web::{HttpRequest, HttpResponseBuilder};
use application::idempotency::IdempotencyKey;

use crate::problem::ApiError;

/// The request header that makes a write idempotent.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// The answer header that marks a replayed answer.
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";

/// The request's `Idempotency-Key`, if it sent one.
///
/// # Errors
/// 400 naming the header when it is sent more than once, or is not 1..=64 visible ASCII
/// characters.
pub fn idempotency_key(req: &HttpRequest) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = req.headers().get_all(IDEMPOTENCY_KEY);
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::validation(IDEMPOTENCY_KEY, "must be sent once"));
    }
    let invalid = || ApiError::validation(IDEMPOTENCY_KEY, "must be 1 to 64 visible ASCII characters");
    let raw = value.to_str().map_err(|_| invalid())?;
    IdempotencyKey::new(raw).map(Some).map_err(|_| invalid())
}

/// Adds `Idempotent-Replayed: true` to `response` when it is the stored answer of an
/// earlier request with the same key.
pub fn mark_replayed(response: &mut HttpResponseBuilder, replayed: bool) {
    if replayed {
        response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
}
