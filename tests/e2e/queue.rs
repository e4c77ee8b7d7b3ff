//! The waiting queue over several instances: admission order, the cap, lifetimes, the
//! event stream and bad input.

use std::time::{Duration, Instant};

use e2e::{Cluster, ClusterOptions, client};
use futures::StreamExt as _;
use serde_json::Value;

use super::{assert_problem, send};

async fn new_user(http: &awc::Client, base: &str) -> String {
    let created = send(http.post(format!("{base}/api/v1/users")), Some(r#"{"name": "fan"}"#)).await;
    created.2["id"].as_str().expect("id").to_owned()
}

/// `POST /api/v1/queue/tokens` for `user` on `base`: its status and body.
async fn issue(http: &awc::Client, base: &str, user: &str) -> (u16, Value) {
    let answer =
        send(http.post(format!("{base}/api/v1/queue/tokens")), Some(&format!(r#"{{"userId": "{user}"}}"#)))
            .await;
    (answer.0.as_u16(), answer.2)
}

async fn view(http: &awc::Client, base: &str, token: &str) -> Value {
    let answer =
        send(http.get(format!("{base}/api/v1/queue/tokens/me")).insert_header(("Queue-Token", token)), None)
            .await;
    assert_eq!(answer.0.as_u16(), 200, "{}", answer.2);
    answer.2
}

/// A token's status as the gate of its view says it: `ACTIVE`, `WAITING <position>`, or
/// `GONE` (401).
async fn status(http: &awc::Client, base: &str, token: &str) -> String {
    let answer =
        send(http.get(format!("{base}/api/v1/queue/tokens/me")).insert_header(("Queue-Token", token)), None)
            .await;
    match answer.0.as_u16() {
        401 => "GONE".to_owned(),
        200 if answer.2["status"] == "WAITING" => format!("WAITING {}", answer.2["position"]),
        200 => answer.2["status"].as_str().unwrap_or("?").to_owned(),
        other => panic!("unexpected {other}: {}", answer.2),
    }
}

fn options(max_active: &str, active_seconds: &str) -> ClusterOptions {
    ClusterOptions {
        env: vec![
            ("QUEUE_MAX_ACTIVE".into(), max_active.into()),
            ("QUEUE_ACTIVE_SECONDS".into(), active_seconds.into()),
            ("QUEUE_ADMIT_INTERVAL_MS".into(), "100".into()),
        ],
        ..ClusterOptions::default()
    }
}

#[actix_web::test]
async fn tokens_are_admitted_in_issue_order_across_instances_never_past_the_cap() {
    let cluster = Cluster::start_with(3, &options("3", "3")).await.expect("cluster");
    let http = client();
    let mut tokens = Vec::new();
    for i in 0..8 {
        let user = new_user(&http, cluster.url(i)).await;
        let issued = issue(&http, cluster.url(i), &user).await;
        assert_eq!(issued.0, 201, "{}", issued.1);
        assert_eq!(issued.1["userId"], user.as_str());
        // Asking again, on another instance, gives the same token back.
        let again = issue(&http, cluster.url(i + 1), &user).await;
        assert_eq!(again.0, 200, "{}", again.1);
        assert_eq!(again.1["token"], issued.1["token"]);
        tokens.push(issued.1["token"].as_str().expect("token").to_owned());
    }

    // Every instance runs admission: the first three are let in, the rest wait in order.
    // (A pass reads the tokens one after another, not at one instant, so the cap itself
    // is checked where it can be exactly: the contract suite's eight concurrent admitters.)
    let expected: Vec<String> = ["ACTIVE", "ACTIVE", "ACTIVE"]
        .into_iter()
        .map(str::to_owned)
        .chain((1..=5).map(|p| format!("WAITING {p}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            seen.push(status(&http, cluster.url(i), token).await);
        }
        if seen == expected {
            break;
        }
        assert!(Instant::now() < deadline, "not admitted in issue order: {seen:?}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let first = view(&http, cluster.url(0), &tokens[0]).await;
    assert!(first["expiresAt"].as_str().expect("expiresAt").ends_with('Z'));
    assert!(first["position"].is_null() && first["estimatedWaitSeconds"].is_null());
    let fourth = view(&http, cluster.url(1), &tokens[3]).await;
    assert!(fourth["expiresAt"].is_null());

    // Their lifetime runs out: they are gone (401 at the gate and at their view), and the
    // next three get in, in order.
    let expected: Vec<String> =
        ["GONE", "GONE", "GONE", "ACTIVE", "ACTIVE", "ACTIVE", "WAITING 1", "WAITING 2"]
            .into_iter()
            .map(str::to_owned)
            .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            seen.push(status(&http, cluster.url(i), token).await);
        }
        if seen == expected {
            break;
        }
        assert!(Instant::now() < deadline, "the line did not move as it should: {seen:?}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = send(
        http.get(format!("{}/api/v1/queue/tokens/me", cluster.url(0)))
            .insert_header(("Queue-Token", tokens[0].as_str())),
        None,
    )
    .await;
    assert_problem(&gone, 401, "QUEUE_TOKEN_INVALID", None);
    cluster.shut_down().await;
}

/// Reads SSE frames from `response` until the stream ends or `within` passes.
async fn read_events(
    mut body: awc::ClientResponse<
        impl futures::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
    within: Duration,
) -> Vec<(String, Value)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => chunk.expect("a chunk"),
            Ok(None) | Err(_) => break,
        };
        buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = rest.to_owned();
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(rest).expect("json data");
                }
            }
            if !name.is_empty() {
                events.push((name, data));
            }
        }
    }
    events
}

#[actix_web::test]
async fn an_event_stream_shows_the_position_falling_then_active_and_ends() {
    let cluster = Cluster::start_with(2, &options("2", "1")).await.expect("cluster");
    let http = client();
    let mut tokens = Vec::new();
    for i in 0..6 {
        let user = new_user(&http, cluster.url(i)).await;
        let issued = issue(&http, cluster.url(i), &user).await;
        tokens.push(issued.1["token"].as_str().expect("token").to_owned());
    }
    let last = tokens.last().expect("six").clone();

    let response = client()
        .get(format!("{}/api/v1/queue/tokens/me/events", cluster.url(1)))
        .insert_header(("Queue-Token", last.as_str()))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let reading = Instant::now();
    let events = read_events(response, Duration::from_secs(30)).await;
    assert!(reading.elapsed() < Duration::from_secs(30), "the stream did not end after ACTIVE");

    assert!(events.iter().all(|(name, _)| name == "status"), "{events:?}");
    let (_, final_view) = events.last().expect("events");
    assert_eq!(final_view["status"], "ACTIVE", "{events:?}");
    let positions: Vec<u64> = events.iter().filter_map(|(_, v)| v["position"].as_u64()).collect();
    // A view changes with its estimate too, so a position may repeat; it never rises.
    assert!(positions.windows(2).all(|w| w[0] >= w[1]), "positions only fall: {positions:?}");
    // Two are let in per second, and it starts behind at least two others: it sees its
    // place fall at least once before its turn.
    assert!(positions.first() > positions.last(), "the position was seen falling: {positions:?}");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn bad_queue_requests_are_problems() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let tokens = format!("{base}/api/v1/queue/tokens");
    for body in [r#"{}"#, r#"{"userId": "nope"}"#, r#"{"userId": 5}"#, r#"{"userId": null}"#, "[]"] {
        assert_problem(&send(http.post(&tokens), Some(body)).await, 400, "VALIDATION_FAILED", None);
    }
    assert_problem(&send(http.post(&tokens), Some("{")).await, 400, "MALFORMED_JSON", None);
    let stranger = uuid::Uuid::now_v7();
    assert_problem(
        &send(http.post(&tokens), Some(&format!(r#"{{"userId": "{stranger}"}}"#))).await,
        404,
        "USER_NOT_FOUND",
        None,
    );
    for path in ["/api/v1/queue/tokens/me", "/api/v1/queue/tokens/me/events"] {
        let url = format!("{base}{path}");
        assert_problem(&send(http.get(&url), None).await, 401, "QUEUE_TOKEN_INVALID", None);
        for token in ["nope", "", &uuid::Uuid::now_v7().to_string()] {
            let answer = send(http.get(&url).insert_header(("Queue-Token", token)), None).await;
            assert_problem(&answer, 401, "QUEUE_TOKEN_INVALID", None);
        }
    }
    cluster.shut_down().await;
}

#[actix_web::test]
async fn open_event_streams_end_when_the_instance_stops_instead_of_holding_the_shutdown() {
    let mut options = options("1", "600");
    options.env.push(("SHUTDOWN_GRACE_SECONDS".into(), "30".into()));
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0).to_owned();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let user = new_user(&http, &base).await;
        let issued = issue(&http, &base, &user).await;
        tokens.push(issued.1["token"].as_str().expect("token").to_owned());
    }
    // One is let in; the other two wait, their streams open.
    let mut streams = Vec::new();
    for token in &tokens[1..] {
        let response = client()
            .get(format!("{base}/api/v1/queue/tokens/me/events"))
            .insert_header(("Queue-Token", token.as_str()))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("stream");
        assert_eq!(response.status().as_u16(), 200);
        streams.push(response);
    }
    let readers: Vec<_> =
        streams.into_iter().map(|s| actix_web::rt::spawn(read_events(s, Duration::from_secs(40)))).collect();

    let stopping = Instant::now();
    cluster.instances[0]
        .terminate_and_wait(Duration::from_secs(15))
        .expect("stopped without waiting out the grace");

    assert!(stopping.elapsed() < Duration::from_secs(15));
    for reader in readers {
        let events = reader.await.expect("read");
        assert!(
            events.iter().all(|(name, view)| name == "status" && view["status"] == "WAITING"),
            "{events:?}"
        );
    }
    cluster.shut_down().await;
}
