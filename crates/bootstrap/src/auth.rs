//! Who is calling: the `Authorization: Bearer` header and the [`Caller`] extractor that
//! every user route takes.
//!
//! The check is the `application::identity::TokenVerifier` port (the JWT adapter here; an
//! external identity provider would be another adapter): no store round trip. A refusal
//! is `401 UNAUTHENTICATED` with `WWW-Authenticate: Bearer`, the same whatever the reason;
//! the reason is logged at debug level, the token never.

use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use application::identity::{TokenVerifier, Unauthenticated};
use domain::user::UserId;
use futures::future::{Ready, ready};

use crate::problem::ApiError;

/// The verifier the extractor uses, registered as app data.
pub type Verifier = web::Data<Arc<dyn TokenVerifier>>;

/// The credentials of `Authorization: Bearer <credentials>`: exactly one such header, the
/// scheme in any case (RFC 9110 §11.1), the credentials one token68 (RFC 7235).
///
/// # Errors
/// [`Unauthenticated::Missing`] with no header, [`Unauthenticated::Malformed`] for any
/// other shape.
pub fn bearer(req: &HttpRequest) -> Result<&str, Unauthenticated> {
    let mut values = req.headers().get_all(header::AUTHORIZATION);
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(Unauthenticated::Missing),
        (Some(value), None) => value,
        (Some(_), Some(_)) => return Err(Unauthenticated::Malformed),
    };
    let text = value.to_str().map_err(|_| Unauthenticated::Malformed)?;
    let (scheme, credentials) = text.split_once(' ').ok_or(Unauthenticated::Malformed)?;
    let credentials = credentials.trim_start_matches(' ');
    let token68 = |c: u8| c.is_ascii_alphanumeric() || b"-._~+/=".contains(&c);
    if !scheme.eq_ignore_ascii_case("bearer") || credentials.is_empty() || !credentials.bytes().all(token68) {
        return Err(Unauthenticated::Malformed);
    }
    Ok(credentials)
}

/// The authenticated user: the subject of a valid access token. Handlers act for this
/// user only, never for an id a client wrote in a path or body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub UserId);

impl Caller {
    /// The caller, from the request's access token.
    ///
    /// # Errors
    /// [`ApiError::Unauthenticated`].
    pub fn of(req: &HttpRequest) -> Result<Self, ApiError> {
        let verifier = req
            .app_data::<Verifier>()
            .ok_or_else(|| ApiError::from(anyhow::anyhow!("no TokenVerifier is registered")))?;
        let checked = bearer(req).and_then(|token| verifier.verify(token));
        checked.map(Self).map_err(|reason| {
            tracing::debug!(%reason, "access token refused");
            metrics::counter!("auth_refusals_total", "reason" => reason_label(reason)).increment(1);
            ApiError::Unauthenticated(reason)
        })
    }

    /// 404 as for an unknown user unless `id` is the caller's: another user's resources
    /// answer exactly as missing ones (their existence is not told).
    ///
    /// # Errors
    /// [`ApiError::UserNotFound`] naming `id`.
    pub fn owns(self, id: UserId) -> Result<UserId, ApiError> {
        if self.0 == id { Ok(id) } else { Err(ApiError::UserNotFound(*id.as_uuid())) }
    }
}

const fn reason_label(reason: Unauthenticated) -> &'static str {
    match reason {
        Unauthenticated::Missing => "missing",
        Unauthenticated::Malformed => "malformed",
        Unauthenticated::UnknownKey => "unknown_key",
        Unauthenticated::BadSignature => "bad_signature",
        Unauthenticated::Expired => "expired",
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Self::of(req))
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn the_bearer_is_one_header_in_the_bearer_scheme() {
        let with = |values: &[&str]| {
            let mut req = TestRequest::default();
            for value in values {
                req = req.append_header((header::AUTHORIZATION, *value));
            }
            req.to_http_request()
        };
        assert_eq!(bearer(&with(&["Bearer abc.def-_"])), Ok("abc.def-_"));
        assert_eq!(bearer(&with(&["bearer  abc"])), Ok("abc"));
        assert_eq!(bearer(&with(&[])), Err(Unauthenticated::Missing));
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "Bearerabc", "Bearer a\"b"] {
            assert_eq!(bearer(&with(&[bad])), Err(Unauthenticated::Malformed), "{bad}");
        }
        assert_eq!(bearer(&with(&["Bearer a", "Bearer a"])), Err(Unauthenticated::Malformed));
    }
}
