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

#[actix_web::test]
async fn operations_endpoints_answer() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);

    assert_eq!(send(http.get(format!("{base}/health/live")), None).await.0.as_u16(), 200);
    let ready = send(http.get(format!("{base}/health/ready")), None).await;
    assert_eq!(ready.0.as_u16(), 200, "{}", ready.2);
    assert_eq!(ready.2["checks"]["mysql"], "UP");
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
    // API answers are never kept by a shared cache, errors included; a request id that is
    // not a plain identifier is replaced, not echoed.
    for request in [
        http.get(format!("{base}/api/v1/users/{}/points", uuid::Uuid::now_v7())),
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
    let user = send(http.post(format!("{base}/api/v1/users")), Some(r#"{"name": "metered"}"#)).await;
    let user = user.2["id"].as_str().expect("id").to_owned();
    let charged =
        send(http.post(format!("{base}/api/v1/users/{user}/points/charge")), Some(r#"{"amount": 1}"#)).await;
    assert_eq!(charged.0.as_u16(), 200);
    let metrics =
        http.get(format!("{base}/metrics")).send().await.expect("metrics").body().await.expect("body");
    let metrics = std::str::from_utf8(&metrics).expect("text");
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
    let user = uuid::Uuid::now_v7();

    for (path, allow) in [
        ("/api/v1/users".to_owned(), "POST"),
        (format!("/api/v1/users/{user}/points"), "GET, HEAD"),
        (format!("/api/v1/users/{user}/points/charge"), "POST"),
        (format!("/api/v1/users/{user}/points/history"), "GET, HEAD"),
        ("/health/live".to_owned(), "GET, HEAD"),
        ("/health/ready".to_owned(), "GET, HEAD"),
        ("/metrics".to_owned(), "GET, HEAD"),
    ] {
        for method in [Method::TRACE, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
            let request = http.request(method.clone(), format!("{base}{path}"));
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
    let mut head = http.head(format!("{base}/health/live")).send().await.expect("answered");
    assert_eq!(head.status().as_u16(), 200);
    assert!(head.body().await.expect("body").is_empty());

    // 200 requests with methods nobody uses, on known and unknown paths.
    for n in 0..200 {
        let method = Method::from_bytes(format!("FOO{n}").as_bytes()).expect("a method token");
        let path = if n % 2 == 0 { "/api/v1/users".to_owned() } else { format!("/nowhere/{n}") };
        let response = http.request(method, format!("{base}{path}")).send().await.expect("answered");
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    let metrics =
        http.get(format!("{base}/metrics")).send().await.expect("metrics").body().await.expect("body");
    let metrics = std::str::from_utf8(&metrics).expect("text");
    let series: Vec<&str> = metrics.lines().filter(|l| l.starts_with("http_requests_total{")).collect();
    assert!(!metrics.contains("FOO"), "a raw method reached a label");
    assert!(!metrics.contains("/nowhere"), "a raw path reached a label");
    // Standard methods times this test's routes and statuses: a few dozen at most.
    assert!(series.len() < 60, "{} series: {series:#?}", series.len());
    assert!(series.iter().any(|l| l.contains(r#"method="other""#)), "{series:#?}");
    cluster.shut_down().await;
}
