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
//! - a body that has not arrived whole within [`BodyDeadline`] (`HTTP_BODY_TIMEOUT_MS`,
//!   10 s by default) is `408 REQUEST_TIMEOUT` and the connection is closed: a client
//!   trickling a byte every few seconds holds a connection no longer than that.
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

/// How long a request body may take to arrive, registered as app data (10 s without it).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

impl Default for BodyDeadline {
    fn default() -> Self {
        Self(std::time::Duration::from_secs(10))
    }
}

fn deadline(req: &HttpRequest) -> BodyDeadline {
    req.app_data::<web::Data<BodyDeadline>>().map(|d| *d.get_ref()).unwrap_or_default()
}

/// A deserialized, shape-checked JSON body.
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for ValidJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let checked = check_headers(req);
        let payload = payload.take();
        let deadline = deadline(req);
        Box::pin(async move {
            checked?;
            read_json(payload, deadline).await.map(ValidJson)
        })
    }
}

/// A body read only when the handler asks for it ([`LateJson::read`]): for handlers whose
/// other checks (the queue gate) must answer first. Extractors of one handler run side by
/// side, so a [`ValidJson`] refusal could otherwise overtake a slower gate's.
pub struct LateJson {
    checked: Result<(), ApiError>,
    payload: Payload,
    deadline: BodyDeadline,
}

impl std::fmt::Debug for LateJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateJson").finish_non_exhaustive()
    }
}

impl LateJson {
    /// Reads and parses the body, as [`ValidJson`] does.
    ///
    /// # Errors
    /// As [`ValidJson`]: 413, 400 `MALFORMED_JSON` or `VALIDATION_FAILED`.
    pub async fn read<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        self.checked?;
        read_json(self.payload, self.deadline).await
    }
}

impl FromRequest for LateJson {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        std::future::ready(Ok(Self {
            checked: check_headers(req),
            payload: payload.take(),
            deadline: deadline(req),
        }))
    }
}

async fn read_json<T: DeserializeOwned>(mut payload: Payload, deadline: BodyDeadline) -> Result<T, ApiError> {
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::MalformedJson("the body could not be read".into()))?;
            if body.len() + chunk.len() > BODY_LIMIT {
                return Err(ApiError::PayloadTooLarge { limit: BODY_LIMIT });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(deadline.0, read).await.map_err(|_| {
        metrics::counter!("http_body_timeouts_total").increment(1);
        ApiError::RequestTimeout
    })??;
    parse(&body)
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

/// Parses in two steps, so "not JSON" and "JSON of the wrong shape" are told apart. An
/// object that names a key twice is refused as malformed: which of the two values was
/// meant cannot be known, and parsers disagree on which one wins.
///
/// # Errors
/// [`ApiError::MalformedJson`] or [`ApiError::Validation`].
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let StrictValue(value) =
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

/// A JSON value read with every object's keys checked for repeats.
struct StrictValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// Deserializes a JSON integer, also when written with a zero fraction or an exponent
/// (`2.0`, `2e3`): JSON Schema's `integer` counts those as integers, so the OpenAPI
/// document and the server agree. A fraction (`1.5`) or a float of 2^53 or more (where it
/// may not be the number the client wrote) is refused. (A fraction too small for a double
/// to hold, `1.00000000000000001`, reads as 1: the parser has already rounded it.)
///
/// # Errors
/// A serde error that names what was wrong.
pub fn integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    use serde::Deserialize as _;
    use serde::de::Error as _;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match serde_json::Number::deserialize(deserializer)? {
        n if n.is_i64() => n.as_i64().ok_or_else(|| D::Error::custom("not an integer")),
        n if n.is_u64() => Err(D::Error::custom(format_args!("{n} is out of range"))),
        n => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() <= EXACT =>
            {
                #[allow(clippy::cast_possible_truncation, reason = "integral and within 2^53: exact")]
                Ok(f as i64)
            }
            Some(f) if f.fract() == 0.0 => Err(D::Error::custom(format_args!("{n} is out of range"))),
            _ => Err(D::Error::custom(format_args!("expected an integer, got {n}"))),
        },
    }
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
    struct Charge {
        #[serde(deserialize_with = "integer")]
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
        assert_eq!(field_of(parse(br#"{"amount": true}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": 1e30}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": 99999999999999999999}"#)), "amount");
        assert_eq!(field_of(parse(br#"{"amount": 9007199254740994.0}"#)), "amount");
        assert_eq!(
            field_of(parse(br#"{"amount": 9007199254740993.0}"#)),
            "amount",
            "rounds to 2^53: refused"
        );
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
    fn an_integer_written_with_a_zero_fraction_or_an_exponent_is_that_integer() {
        for body in
            [&br#"{"amount": 2}"#[..], br#"{"amount": 2.0}"#, br#"{"amount": 2e0}"#, br#"{"amount": 0.2e1}"#]
        {
            assert_eq!(parse::<Charge>(body).unwrap().amount, 2, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(parse::<Charge>(br#"{"amount": -3.0}"#).unwrap().amount, -3);
    }

    #[test]
    fn an_object_that_repeats_a_key_is_refused_at_any_depth() {
        assert!(
            matches!(parse::<Charge>(br#"{"amount": 1, "amount": 2}"#), Err(ApiError::MalformedJson(m)) if m.contains("duplicate key"))
        );
        assert!(matches!(
            parse::<Charge>(br#"{"amount": 1, "meta": [{"a": 1, "a": 1}]}"#),
            Err(ApiError::MalformedJson(_))
        ));
        assert_eq!(parse::<Charge>(br#"{"amount": 1, "meta": [{"a": 1}, {"a": 2}]}"#).unwrap().amount, 1);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(parse::<Charge>(br#"{"amount": 5, "currency": "KRW"}"#).is_ok());
    }
}
