//! Per-request context: a request id, a tracing span, a log line and HTTP metrics.

use std::time::Instant;

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument as _;

/// The header that carries a request's id in and out.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The method as a metric label: one of the standard methods, else `other`, so that a
/// client inventing methods cannot create series without end.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Takes the caller's `X-Request-Id` when it is a plain identifier (1..=64 letters, digits,
/// `-`, `_`, `.` or `:`; anything else could forge log fields), makes one otherwise, sets
/// the security headers ([`secure`]), runs the request inside a span carrying it, echoes it back, logs
/// one line per request and records `http_requests_total` and
/// `http_request_duration_seconds` by route pattern (never by raw path: ids in paths
/// would make a metric per user; unknown paths share `unmatched`), by method (unknown
/// methods share `other`) and by status code: every label is bounded.
///
/// # Errors
/// Whatever the inner service returns.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, Error> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_plain_identifier(v))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
    let docs = req.path().starts_with("/docs") || req.path().starts_with("/api-docs");
    let api = req.path().starts_with("/api/");
    let method = method_label(req.method());
    // The route pattern is known once the router has matched the request, inside `next`:
    // asked for here it would run every pattern's regex once more (a tenth of a cached
    // seat map's CPU). So the span gets it when the answer is back; the lines logged while
    // the request runs carry its method and id.
    let span = tracing::info_span!("request", %method, route = tracing::field::Empty, %request_id);

    let mut response = next.call(req).instrument(span.clone()).await?;

    let route = response.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    span.record("route", route.as_str());
    let status = response.status().as_u16();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    secure(response.headers_mut(), api, docs);
    let elapsed = started.elapsed();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        let latency_ms = elapsed.as_secs_f64() * 1_000.0;
        if status >= 500 {
            tracing::warn!(status, latency_ms, "request failed");
        } else {
            tracing::info!(status, latency_ms, "request served");
        }
    });
    Ok(response)
}

/// Whether a client's request id is a plain identifier: 1..=64 ASCII letters, digits, `-`,
/// `_`, `.` or `:`.
fn is_plain_identifier(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The security headers every answer carries (unless its handler set its own):
/// `X-Content-Type-Options: nosniff` everywhere; `Cache-Control: no-store` on the API's
/// answers (balances, tokens, reservations: nothing a shared cache may keep); on Swagger UI
/// and the OpenAPI document a Content-Security-Policy that loads only from this origin and
/// lets no page frame it (`frame-ancestors 'none'`, and `X-Frame-Options: DENY` for older
/// browsers). Swagger UI's own page needs inline script and style, so those are allowed
/// there, and only there.
fn secure(headers: &mut actix_web::http::header::HeaderMap, api: bool, docs: bool) {
    use actix_web::http::header;
    let mut set = |name: HeaderName, value: &'static str| {
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    };
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if api {
        set(header::CACHE_CONTROL, "no-store");
    }
    if docs {
        set(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        );
        set(header::X_FRAME_OPTIONS, "DENY");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_taken_as_request_ids() {
        for good in ["abc", "req-1_2.3:4", &"a".repeat(64)] {
            assert!(is_plain_identifier(good), "{good:?}");
        }
        for bad in ["", "a b", "a\"b", "id=1 level=error", "x\u{202e}", &"a".repeat(65), "a/b", "{x}"] {
            assert!(!is_plain_identifier(bad), "{bad:?}");
        }
    }

    #[test]
    fn security_headers_are_set_where_they_belong_and_never_overwrite_a_handlers_own() {
        use actix_web::http::header::{self, HeaderMap};
        let mut api = HeaderMap::new();
        api.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        secure(&mut api, true, false);
        assert_eq!(api.get(header::X_CONTENT_TYPE_OPTIONS).unwrap(), "nosniff");
        assert_eq!(api.get(header::CACHE_CONTROL).unwrap(), "max-age=5", "the handler's own is kept");
        assert!(api.get(header::CONTENT_SECURITY_POLICY).is_none());

        let mut docs = HeaderMap::new();
        secure(&mut docs, false, true);
        let csp = docs.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(docs.get(header::X_FRAME_OPTIONS).unwrap(), "DENY");
        assert!(docs.get(header::CACHE_CONTROL).is_none());
    }
}
