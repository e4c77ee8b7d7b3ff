//! The booking page: three static files compiled into the binary (no build step, nothing
//! fetched from anywhere else), served by the public listener at `/`, `/app.js` and
//! `/app.css`. The page is a client of the public API like any other: it signs up or signs
//! in, and calls `/api/v1` with its access and queue tokens.
//!
//! Every file goes out with a strict Content-Security-Policy: scripts, styles and requests
//! from this origin only, no inline script or style, no plugins, no frames, no forms posting
//! anywhere. Names and titles that users typed are set as text by the script, never as
//! markup, so the policy is a second wall, not the only one.

use actix_web::HttpResponse;
use actix_web::http::header;

const INDEX: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/app.css");

/// The page's policy: nothing but this origin's own script, style and API; no inline code.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    responses((status = 200, description = "The booking page (HTML; its script and style are `/app.js` and `/app.css`)", content_type = "text/html", body = String))
)]
pub async fn index() -> HttpResponse {
    file(INDEX, "text/html; charset=utf-8")
}

#[utoipa::path(
    get,
    path = "/app.js",
    tag = "page",
    responses((status = 200, description = "The booking page's script", content_type = "text/javascript", body = String))
)]
pub async fn script() -> HttpResponse {
    file(SCRIPT, "text/javascript; charset=utf-8")
}

#[utoipa::path(
    get,
    path = "/app.css",
    tag = "page",
    responses((status = 200, description = "The booking page's style sheet", content_type = "text/css", body = String))
)]
pub async fn style() -> HttpResponse {
    file(STYLE, "text/css; charset=utf-8")
}

fn file(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header(("cross-origin-opener-policy", "same-origin"))
        .insert_header(("permissions-policy", "camera=(), microphone=(), geolocation=(), payment=()"))
        // Revalidated on every load: a new release's page never runs with an old script.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page must work under its own policy: no inline script or style, no handler
    /// attributes, nothing loaded from elsewhere, no markup built from strings in the script.
    #[test]
    fn the_page_holds_to_its_content_security_policy() {
        let lower = INDEX.to_ascii_lowercase();
        for script_tag in lower.match_indices("<script").map(|(at, _)| &lower[at..]) {
            let tag = &script_tag[..script_tag.find('>').expect("a closed tag")];
            assert!(tag.contains("src=\"/app.js\""), "a script that is not /app.js: {tag}");
        }
        assert!(!lower.contains("<style"), "an inline style element");
        assert!(!lower.contains(" style="), "an inline style attribute");
        assert!(!lower.contains("javascript:"), "a javascript: URL");
        for handler in [" onclick=", " onload=", " onerror=", " onsubmit=", " oninput=", " onchange="] {
            assert!(!lower.contains(handler), "an inline handler: {handler}");
        }
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "something loaded from elsewhere"
            );
        }
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!SCRIPT.contains(sink), "the script uses {sink}");
        }
    }
}
