//! [`ValidJson`]: a JSON body extractor whose errors are this API's problems.
//!
//! - a body over [`BODY_LIMIT`] is `413 PAYLOAD_TOO_LARGE`, judged by `Content-Length`
//!   when given and by counting otherwise, so a huge body is never buffered whole;
//! - the body is parsed as JSON whatever its `Content-Type` says (clients such as
//!   `curl -d` send form types by default, and the API promises 400, not 415);
//! - bytes that are not JSON are `400 MALFORMED_JSON`;
//! - JSON of the wrong shape is `400 VALIDATION_FAILED` naming the field (`amount`,
//!   `name`), found with `serde_path_to_error`.
//!
//! Unknown fields are ignored, as the API promises.

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use futures::StreamExt as _;
use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// The largest body accepted: 64 KiB. Every request of this API is a few dozen bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A deserialized, shape-checked JSON body.
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for ValidJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let checked = check_headers(req);
        let mut payload = payload.take();
        Box::pin(async move {
            checked?;
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk =
                    chunk.map_err(|_| ApiError::MalformedJson("the body could not be read".into()))?;
                if body.len() + chunk.len() > BODY_LIMIT {
                    return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
                }
                body.extend_from_slice(&chunk);
            }
            parse(&body).map(ValidJson)
        })
    }
}

fn check_headers(req: &HttpRequest) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > BODY_LIMIT) {
        return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
    }
    Ok(())
}

/// Parses in two steps, so "not JSON" and "JSON of the wrong shape" are told apart.
///
/// # Errors
/// [`ApiError::MalformedJson`] or [`ApiError::Validation`].
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let message = error.inner().to_string();
        let path = error.path().to_string();
        let field = if path == "." {
            // A missing field is reported at its parent; serde names it in the message.
            missing_field(&message).unwrap_or_else(|| "body".to_owned())
        } else {
            path
        };
        ApiError::Validation { field, message }
    })
}

fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split_once('`').map(|(field, _)| field.to_owned())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only deserialized")]
    struct Charge {
        amount: i64,
    }

    fn field_of(result: Result<Charge, ApiError>) -> String {
        match result {
            Err(ApiError::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_field_is_named() {
        assert_eq!(field_of(parse(br#"{}"#)), "amount");
    }

    #[test]
    fn a_mistyped_field_is_named() {
        assert_eq!(field_of(parse(br#"{"amount": "100"}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": 1.5}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": 1e30}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": null}"#)), "amount");
    }

    #[test]
    fn a_body_of_the_wrong_kind_is_a_validation_error_on_the_body() {
        assert_eq!(field_of(parse(b"[1, 2]")), "body");
    }

    #[test]
    fn bytes_that_are_not_json_are_malformed() {
        assert!(matches!(parse::<Charge>(b"{amount: 1"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(parse::<Charge>(b""), Err(ApiError::MalformedJson(_))));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(parse::<Charge>(br#"{"amount": 5, "currency": "KRW"}"#).is_ok());
    }
}
