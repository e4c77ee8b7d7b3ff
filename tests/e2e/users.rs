use e2e::booking::{AsFan as _, Fan, new_user};
use e2e::{Cluster, client};

use super::{assert_problem, send};

#[actix_web::test]
async fn a_user_is_created_and_bad_names_are_refused() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let users = format!("{}/api/v1/users", cluster.url(0));

    let created = send(http.post(&users), Some(r#"{"name": "kim", "ignored": true}"#)).await;
    assert_eq!(created.0.as_u16(), 201, "{}", created.2);
    assert_eq!(created.2["name"], "kim");
    assert!(uuid::Uuid::parse_str(created.2["id"].as_str().expect("id")).is_ok());
    assert!(created.2["createdAt"].as_str().expect("createdAt").ends_with('Z'));
    // The API key is shown once, here; it buys access tokens.
    let api_key = created.2["apiKey"].as_str().expect("apiKey");
    assert!(!api_key.is_empty(), "{}", created.2);

    for body in [r#"{}"#, r#"{"name": ""}"#, r#"{"name": "   "}"#, r#"{"name": 123}"#, r#"{"name": null}"#] {
        assert_problem(&send(http.post(&users), Some(body)).await, 400, "VALIDATION_FAILED", Some("name"));
    }
    let too_long = format!(r#"{{"name": "{}"}}"#, "a".repeat(51));
    assert_problem(&send(http.post(&users), Some(&too_long)).await, 400, "VALIDATION_FAILED", Some("name"));
    // The 50 are counted as sent, white space included (as the OpenAPI schema states).
    let padded = format!(r#"{{"name": " {}"}}"#, "a".repeat(50));
    assert_problem(&send(http.post(&users), Some(&padded)).await, 400, "VALIDATION_FAILED", Some("name"));
    for control in [r#"{"name": "a\u0000b"}"#, r#"{"name": "a\u001fb"}"#, r#"{"name": "a\u0085b"}"#] {
        assert_problem(&send(http.post(&users), Some(control)).await, 400, "VALIDATION_FAILED", Some("name"));
    }
    // Names nobody can see, and names that display as another text.
    for unseen in [
        r#"{"name": "\u200b"}"#,
        r#"{"name": "\u200b\u200c\u200d"}"#,
        r#"{"name": " \ufeff "}"#,
        r#"{"name": "abc\u202etxt"}"#,
        r#"{"name": "\u2066kim\u2069"}"#,
    ] {
        assert_problem(&send(http.post(&users), Some(unseen)).await, 400, "VALIDATION_FAILED", Some("name"));
    }
    assert_problem(
        &send(http.post(&users), Some(r#"{"name": "kim", "name": "lee"}"#)).await,
        400,
        "MALFORMED_JSON",
        None,
    );
    assert_problem(&send(http.post(&users), Some("not json")).await, 400, "MALFORMED_JSON", None);
    assert_problem(&send(http.post(&users), Some("")).await, 400, "MALFORMED_JSON", None);
    let huge = format!(r#"{{"name": "{}"}}"#, "a".repeat(70 * 1024));
    assert_problem(&send(http.post(&users), Some(&huge)).await, 413, "PAYLOAD_TOO_LARGE", None);
    cluster.shut_down().await;
}

/// Sends `request` (with `body`, when given) and asserts `401 UNAUTHENTICATED`, a
/// problem+json with `WWW-Authenticate: Bearer...`.
async fn assert_unauthenticated(request: awc::ClientRequest, body: Option<&str>, what: &str) {
    let mut response = match body {
        Some(body) => {
            request.insert_header(("content-type", "application/json")).send_body(body.to_owned()).await
        }
        None => request.send().await,
    }
    .expect("the server answered");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (challenge, content_type) = (header("www-authenticate"), header("content-type"));
    let bytes = response.body().await.expect("a body");
    let problem: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    assert_eq!(response.status().as_u16(), 401, "{what}: {problem}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{what}");
    assert_eq!(problem["code"], "UNAUTHENTICATED", "{what}: {problem}");
    assert!(challenge.as_deref().is_some_and(|c| c.starts_with("Bearer")), "{what}: {challenge:?}");
}

#[actix_web::test]
async fn an_api_key_buys_access_tokens_and_every_user_route_needs_one() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let fan = new_user(&http, base).await.expect("a user");

    // An access token for the key: a Bearer token with its end.
    let (status, token) = e2e::booking::call(
        http.post(format!("{base}/api/v1/auth/tokens"))
            .insert_header(("Authorization", format!("Bearer {}", fan.api_key))),
        None,
    )
    .await
    .expect("answered");
    assert_eq!(status, 201, "{token}");
    assert_eq!(token["tokenType"], "Bearer", "{token}");
    assert!(token["accessToken"].as_str().is_some_and(|t| !t.is_empty()), "{token}");
    assert!(token["expiresAt"].as_str().is_some_and(|at| at.ends_with('Z')), "{token}");
    // A second one works as well as the first.
    let again = Fan { access: token["accessToken"].as_str().expect("a token").to_owned(), ..fan.clone() };
    let balance = send(http.get(format!("{base}/api/v1/users/{}/points", fan.id)).bearer(&again), None).await;
    assert_eq!(balance.0.as_u16(), 200, "{}", balance.2);

    // No key, a wrong one, or an access token where the key goes: no token.
    let tokens = format!("{base}/api/v1/auth/tokens");
    assert_unauthenticated(http.post(&tokens), None, "no key").await;
    let forged = format!("Bearer {}", "k".repeat(fan.api_key.len()));
    assert_unauthenticated(http.post(&tokens).insert_header(("Authorization", forged)), None, "a wrong key")
        .await;
    assert_unauthenticated(http.post(&tokens).bearer(&fan), None, "an access token as the key").await;

    // Every user route: no bearer, a malformed one, the API key itself, another scheme. The
    // caller's live queue token goes along (the queue view asks for it; the others ignore
    // it): it is worth nothing without its owner's access token.
    let (_, queue) = e2e::booking::queue_token(&http, base, &fan).await.expect("a queue token");
    let routes = [
        ("GET", format!("/api/v1/users/{}/points", fan.id), None),
        ("POST", format!("/api/v1/users/{}/points/charge", fan.id), Some(r#"{"amount": 5}"#)),
        ("GET", format!("/api/v1/users/{}/points/history", fan.id), None),
        ("POST", "/api/v1/queue/tokens".to_owned(), Some("{}")),
        ("GET", "/api/v1/queue/tokens/me".to_owned(), None),
    ];
    for (method, path, body) in &routes {
        let request = || http.request(method.parse().expect("method"), format!("{base}{path}")).queue(&queue);
        let what = |how: &str| format!("{method} {path} {how}");
        assert_unauthenticated(request(), *body, &what("without credentials")).await;
        let malformed = Fan { access: "not-a-token".to_owned(), ..fan.clone() };
        assert_unauthenticated(request().bearer(&malformed), *body, &what("with a malformed token")).await;
        let key = Fan { access: fan.api_key.clone(), ..fan.clone() };
        assert_unauthenticated(request().bearer(&key), *body, &what("with the API key")).await;
        let basic = request().insert_header(("Authorization", format!("Basic {}", fan.access)));
        assert_unauthenticated(basic, *body, &what("with another scheme")).await;
    }
    // None of it charged anything.
    let balance = send(http.get(format!("{base}/api/v1/users/{}/points", fan.id)).bearer(&fan), None).await;
    assert_eq!(balance.2["balance"], 0, "{}", balance.2);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn operations_endpoints_answer() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let ops = cluster.ops_url(0);

    // Health and metrics are served on the operations listener only.
    assert_eq!(send(http.get(format!("{ops}/health/live")), None).await.0.as_u16(), 200);
    let ready = send(http.get(format!("{ops}/health/ready")), None).await;
    assert_eq!(ready.0.as_u16(), 200, "{}", ready.2);
    assert_eq!(ready.2["checks"]["mysql"], "UP");
    for path in ["/health/live", "/health/ready", "/metrics"] {
        assert_problem(&send(http.get(format!("{base}{path}")), None).await, 404, "NOT_FOUND", None);
    }
    let docs = http.get(format!("{base}/docs/")).send().await.expect("docs");
    assert_eq!(docs.status().as_u16(), 200);
    // Swagger UI cannot be framed, and loads only from here.
    let csp = docs.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp:?}");
    assert_eq!(docs.headers().get("x-frame-options").map(|v| v.to_str().unwrap_or_default()), Some("DENY"));
    assert_eq!(
        docs.headers().get("x-content-type-options").map(|v| v.to_str().unwrap_or_default()),
        Some("nosniff")
    );
    let user = e2e::booking::sign_up(&http, base, "metered").await.expect("a user");
    // API answers are never kept by a shared cache, errors included (an unknown account, a
    // request without credentials); a request id that is not a plain identifier is
    // replaced, not echoed.
    for request in [
        http.get(format!("{base}/api/v1/users/{}/points", uuid::Uuid::now_v7())).bearer(&user),
        http.get(format!("{base}/api/v1/users/{}/points", user.id)),
        http.get(format!("{base}/api/v1/concerts")),
    ] {
        let answer =
            request.insert_header(("X-Request-Id", "id level=error")).send().await.expect("answered");
        let header = |name: &str| answer.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header("cache-control").as_deref(), Some("no-store"));
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
        let id = header("x-request-id").expect("an id");
        assert_ne!(id, "id level=error");
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }
    let spec = send(http.get(format!("{base}/api-docs/openapi.json")), None).await;
    assert!(spec.2["paths"]["/api/v1/users/{userId}/points/charge"]["post"].is_object(), "{}", spec.2);
    let charged = send(
        http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(&user),
        Some(r#"{"amount": 1}"#),
    )
    .await;
    assert_eq!(charged.0.as_u16(), 200);
    let metrics = super::metrics_text(&http, ops).await;
    for family in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "lock_wait_seconds_bucket",
        "lock_hold_seconds_bucket",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
    assert_problem(&send(http.get(format!("{base}/no/such/route")), None).await, 404, "NOT_FOUND", None);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn other_methods_are_405_with_allow_and_invented_methods_do_not_grow_the_metrics() {
    use awc::http::Method;

    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let ops = cluster.ops_url(0);
    let fan = new_user(&http, base).await.expect("a user");
    let user = fan.id.as_str();

    // The public routes (with the caller's credentials, so that only the method is wrong),
    // then the operations listener's.
    for (root, path, allow) in [
        (base, "/api/v1/users".to_owned(), "POST"),
        (base, "/api/v1/auth/tokens".to_owned(), "POST"),
        (base, format!("/api/v1/users/{user}/points"), "GET, HEAD"),
        (base, format!("/api/v1/users/{user}/points/charge"), "POST"),
        (base, format!("/api/v1/users/{user}/points/history"), "GET, HEAD"),
        (ops, "/health/live".to_owned(), "GET, HEAD"),
        (ops, "/health/ready".to_owned(), "GET, HEAD"),
        (ops, "/metrics".to_owned(), "GET, HEAD"),
    ] {
        for method in [Method::TRACE, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
            let request = http.request(method.clone(), format!("{root}{path}")).bearer(&fan);
            let response = request.send().await.expect("answered");
            assert_eq!(response.status().as_u16(), 405, "{method} {path}");
            assert_eq!(
                response.headers().get("allow").and_then(|v| v.to_str().ok()),
                Some(allow),
                "{method} {path}"
            );
            assert_eq!(
                response.headers().get("content-type").and_then(|v| v.to_str().ok()),
                Some("application/problem+json")
            );
        }
    }

    // HEAD answers as GET would, without a body.
    let mut head = http.head(format!("{ops}/health/live")).send().await.expect("answered");
    assert_eq!(head.status().as_u16(), 200);
    assert!(head.body().await.expect("body").is_empty());

    // 200 requests with methods nobody uses, on known and unknown paths.
    for n in 0..200 {
        let method = Method::from_bytes(format!("FOO{n}").as_bytes()).expect("a method token");
        let path = if n % 2 == 0 { "/api/v1/users".to_owned() } else { format!("/nowhere/{n}") };
        let response = http.request(method, format!("{base}{path}")).send().await.expect("answered");
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    let metrics = super::metrics_text(&http, ops).await;
    let series: Vec<&str> = metrics.lines().filter(|l| l.starts_with("http_requests_total{")).collect();
    assert!(!metrics.contains("FOO"), "a raw method reached a label");
    assert!(!metrics.contains("/nowhere"), "a raw path reached a label");
    // Standard methods times this test's routes and statuses: a few dozen at most.
    assert!(series.len() < 60, "{} series: {series:#?}", series.len());
    assert!(series.iter().any(|l| l.contains(r#"method="other""#)), "{series:#?}");
    cluster.shut_down().await;
}
