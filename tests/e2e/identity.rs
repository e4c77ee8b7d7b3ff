//! Identity and abuse limits, tried as a hostile client would (issue 13's report): each
//! attack is refused with its documented status and changes nothing.

use std::time::{Duration, Instant};

use awc::http::StatusCode;
use e2e::booking::{
    ADMIN_KEY, AsFan as _, Fan, access_token, admitted_users, call, env, new_user, open_schedule,
    queue_token, seat_statuses, sign_up,
};
use e2e::{Cluster, ClusterOptions, client, owned};
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::{assert_problem, send};

/// A JWT header's `kid`.
fn kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

/// A token for `sub` signed with `secret` under `kid`, as a forger would make one.
fn forged(kid: &str, secret: &[u8], sub: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let claims =
        json!({"sub": sub, "iss": "concert-server", "aud": "concert-api", "iat": now, "exp": now + 600});
    let header = jsonwebtoken::Header {
        kid: Some(kid.to_owned()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).expect("signed")
}

fn as_fan(id: &str, access: String) -> Fan {
    Fan { id: id.to_owned(), api_key: String::new(), access }
}

async fn balance(http: &awc::Client, base: &str, fan: &Fan) -> i64 {
    let (status, body) = call(http.get(format!("{base}/api/v1/users/{}/points", fan.id)).bearer(fan), None)
        .await
        .expect("answer");
    assert_eq!(status, 200, "{body}");
    body["balance"].as_i64().expect("balance")
}

#[actix_web::test]
async fn every_attack_of_the_report_is_refused_and_changes_nothing() {
    let cluster = Cluster::start_with(2, &ClusterOptions { env: env(10), ..ClusterOptions::default() })
        .await
        .expect("cluster");
    let http = client();
    let (a, b) = (cluster.url(0), cluster.url(1));
    let schedule = open_schedule(&http, a, 10_000).await.expect("schedule");
    let mut admitted = admitted_users(&http, &[a, b], 1).await.expect("victim admitted");
    let (victim, victim_token) = admitted.remove(0);
    let (status, _) = call(
        http.post(format!("{a}/api/v1/users/{}/points/charge", victim.id)).bearer(&victim),
        Some(json!({"amount": 300_000})),
    )
    .await
    .expect("charge");
    assert_eq!(status, 200);
    let attacker = new_user(&http, b).await.expect("attacker");

    // A queue token for someone else: 403, and the victim's place is untouched.
    let stolen = send(
        http.post(format!("{b}/api/v1/queue/tokens")).bearer(&attacker),
        Some(&json!({"userId": victim.id}).to_string()),
    )
    .await;
    assert_problem(&stolen, 403, "FORBIDDEN", None);
    let (status, again) = queue_token(&http, a, &victim).await.expect("victim's token");
    assert_eq!((status, again.as_str()), (200, victim_token.as_str()), "re-issuing keeps the victim's token");

    // The victim's ACTIVE token in the attacker's hands: worth nothing on every gated route.
    let seats = format!("{b}/api/v1/schedules/{schedule}/seats");
    assert_problem(
        &send(http.get(&seats).bearer(&attacker).queue(&victim_token), None).await,
        401,
        "QUEUE_TOKEN_INVALID",
        None,
    );
    let hold = json!({"scheduleId": schedule, "seatNumber": 1}).to_string();
    let held = send(
        http.post(format!("{b}/api/v1/reservations")).bearer(&attacker).queue(&victim_token),
        Some(&hold),
    )
    .await;
    assert_problem(&held, 401, "QUEUE_TOKEN_INVALID", None);
    let me =
        send(http.get(format!("{b}/api/v1/queue/tokens/me")).bearer(&attacker).queue(&victim_token), None)
            .await;
    assert_problem(&me, 401, "QUEUE_TOKEN_INVALID", None);

    // The victim holds a seat; the attacker cannot read, cancel or pay it with the victim's token.
    let (status, reservation) = call(
        http.post(format!("{a}/api/v1/reservations")).bearer(&victim).queue(&victim_token),
        Some(json!({"scheduleId": schedule, "seatNumber": 2})),
    )
    .await
    .expect("hold");
    assert_eq!(status, 201, "{reservation}");
    let id = reservation["id"].as_str().expect("id");
    let pay = json!({"reservationId": id}).to_string();
    let paid =
        send(http.post(format!("{b}/api/v1/payments")).bearer(&attacker).queue(&victim_token), Some(&pay))
            .await;
    assert_problem(&paid, 401, "QUEUE_TOKEN_INVALID", None);
    let cancelled = send(
        http.delete(format!("{b}/api/v1/reservations/{id}")).bearer(&attacker).queue(&victim_token),
        None,
    )
    .await;
    assert_problem(&cancelled, 401, "QUEUE_TOKEN_INVALID", None);

    // Someone else's points: read, history and charge answer as for an unknown user.
    for (method, path, body) in [
        ("GET", format!("/api/v1/users/{}/points", victim.id), None),
        ("GET", format!("/api/v1/users/{}/points/history", victim.id), None),
        ("POST", format!("/api/v1/users/{}/points/charge", victim.id), Some(r#"{"amount": 1000000}"#)),
    ] {
        let request =
            if method == "GET" { http.get(format!("{b}{path}")) } else { http.post(format!("{b}{path}")) };
        assert_problem(&send(request.bearer(&attacker), body).await, 404, "USER_NOT_FOUND", None);
    }

    // Forged access tokens: the victim's id as subject, signed with a guessed key (under the
    // real key id, and under another), and with no signature at all.
    let real_kid = kid(&victim.access).expect("kid");
    for token in [
        forged(&real_kid, b"a guessed secret of at least 32 bytes!!", &victim.id),
        forged("some-other-key", b"a guessed secret of at least 32 bytes!!", &victim.id),
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", victim.access.split('.').nth(1).expect("payload")),
        victim.api_key.clone(),
    ] {
        let forger = as_fan(&victim.id, token);
        let answer =
            send(http.get(format!("{b}/api/v1/users/{}/points", victim.id)).bearer(&forger), None).await;
        assert_problem(&answer, 401, "UNAUTHENTICATED", None);
        let charge = send(
            http.post(format!("{a}/api/v1/users/{}/points/charge", victim.id)).bearer(&forger),
            Some(r#"{"amount": 5}"#),
        )
        .await;
        assert_problem(&charge, 401, "UNAUTHENTICATED", None);
    }

    // Nothing changed: the balance, the history, the seat (held by the victim), the token.
    for base in [a, b] {
        assert_eq!(balance(&http, base, &victim).await, 300_000);
    }
    let (_, history) =
        call(http.get(format!("{b}/api/v1/users/{}/points/history", victim.id)).bearer(&victim), None)
            .await
            .expect("history");
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    let map = seat_statuses(&http, b, (&victim, &victim_token), &schedule).await.expect("map");
    let held: Vec<_> = map.iter().filter(|(_, s)| s != "AVAILABLE").collect();
    assert_eq!(held, vec![&(2, "HELD".to_owned())]);
    let (status, view) =
        call(http.get(format!("{a}/api/v1/queue/tokens/me")).bearer(&victim).queue(&victim_token), None)
            .await
            .expect("view");
    assert_eq!((status, view["status"].as_str()), (200, Some("ACTIVE")));
    cluster.shut_down().await;
}

#[actix_web::test]
async fn ten_concurrent_holds_by_one_user_on_one_date_leave_exactly_four() {
    let cluster = Cluster::start_with(2, &ClusterOptions { env: env(10), ..ClusterOptions::default() })
        .await
        .expect("cluster");
    let http = client();
    let bases = [cluster.url(0), cluster.url(1)];
    let schedule = open_schedule(&http, bases[0], 1_000).await.expect("schedule");
    let other_date = open_schedule(&http, bases[0], 1_000).await.expect("schedule");
    let (fan, token) = admitted_users(&http, &bases, 1).await.expect("admitted").remove(0);

    let hold = |seat: u64, schedule: String| {
        let (http, fan, token) = (&http, &fan, &token);
        let base = bases[usize::try_from(seat).unwrap_or(0) % 2];
        async move {
            call(
                http.post(format!("{base}/api/v1/reservations")).bearer(fan).queue(token),
                Some(json!({"scheduleId": schedule, "seatNumber": seat})),
            )
            .await
            .expect("answer")
        }
    };
    let answers = futures::future::join_all((1..=10).map(|seat| hold(seat, schedule.clone()))).await;
    let won = answers.iter().filter(|(status, _)| *status == 201).count();
    let limited = answers
        .iter()
        .filter(|(status, body)| *status == 409 && body["code"] == "HOLD_LIMIT_REACHED")
        .count();
    assert_eq!((won, limited), (4, 6), "{answers:?}");
    let map = seat_statuses(&http, bases[1], (&fan, &token), &schedule).await.expect("map");
    assert_eq!(map.iter().filter(|(_, s)| s == "HELD").count(), 4, "{map:?}");

    // The limit is per date: another date takes holds of its own.
    let (status, _) = hold(1, other_date).await;
    assert_eq!(status, 201);
    // A cancelled hold frees a place under the limit.
    let first = answers
        .iter()
        .find(|(status, _)| *status == 201)
        .map(|(_, body)| body["id"].clone())
        .expect("a hold");
    let (status, _) = call(
        http.delete(format!("{}/api/v1/reservations/{}", bases[0], first.as_str().expect("id")))
            .bearer(&fan)
            .queue(&token),
        None,
    )
    .await
    .expect("cancel");
    assert_eq!(status, 200);
    // Seats 11 and up were never asked for: free, so only the limit can refuse them.
    let (status, body) = hold(11, schedule.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = hold(12, schedule).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("HOLD_LIMIT_REACHED")), "{body}");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn per_client_limits_answer_429_with_retry_after_and_trust_forwarded_for_only_from_proxies() {
    let mut env = owned(&[
        ("RATE_LIMIT_SIGNUPS_PER_MINUTE", "3"),
        ("RATE_LIMIT_AUTH_PER_MINUTE", "3"),
        ("RATE_LIMIT_CHARGES_PER_MINUTE", "2"),
        ("RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE", "2"),
        // The tests' client is the proxy here: its X-Forwarded-For names the client.
        ("TRUSTED_PROXIES", "127.0.0.1, ::1"),
    ]);
    env.push(("SEED_DEMO_DATA".into(), "false".into()));
    let cluster =
        Cluster::start_with(1, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let sign_up_from = |address: &'static str| {
        let http = &http;
        async move {
            let mut response = http
                .post(format!("{base}/api/v1/users"))
                .insert_header(("X-Forwarded-For", address))
                .send_json(&json!({"name": "fan"}))
                .await
                .expect("answer");
            let retry =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (response.status(), retry, body)
        }
    };

    for _ in 0..3 {
        assert_eq!(sign_up_from("198.51.100.7").await.0, StatusCode::CREATED);
    }
    let (status, retry, body) = sign_up_from("198.51.100.7").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "RATE_LIMITED");
    assert!(retry.and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| (1..=60).contains(&s)), "Retry-After");
    // Another client has its own budget; a spoofed left part does not buy one.
    assert_eq!(sign_up_from("203.0.113.9").await.0, StatusCode::CREATED);
    assert_eq!(sign_up_from("6.6.6.6, 198.51.100.7").await.0, StatusCode::TOO_MANY_REQUESTS);

    // Per user: charges and queue tokens. The refused ones change nothing.
    let fan = sign_up(&http, base, "fan").await.expect("fan");
    let charge = || {
        let (http, fan) = (&http, &fan);
        async move {
            call(
                http.post(format!("{base}/api/v1/users/{}/points/charge", fan.id)).bearer(fan),
                Some(json!({"amount": 100})),
            )
            .await
            .expect("answer")
        }
    };
    // Bad input is refused before it is counted: it does not spend the budget.
    for amount in [0, -5] {
        let (status, body) = call(
            http.post(format!("{base}/api/v1/users/{}/points/charge", fan.id)).bearer(&fan),
            Some(json!({"amount": amount})),
        )
        .await
        .expect("answer");
        assert_eq!((status, body["code"].as_str()), (400, Some("VALIDATION_FAILED")), "{body}");
    }
    assert_eq!(charge().await.0, 200);
    assert_eq!(charge().await.0, 200);
    let (status, body) = charge().await;
    assert_eq!((status, body["code"].as_str()), (429, Some("RATE_LIMITED")), "{body}");
    assert_eq!(balance(&http, base, &fan).await, 200);
    assert_eq!(queue_token(&http, base, &fan).await.expect("token").0, 201);
    assert_eq!(queue_token(&http, base, &fan).await.expect("token").0, 200);
    let refused = send(http.post(format!("{base}/api/v1/queue/tokens")).bearer(&fan), Some("{}")).await;
    assert_problem(&refused, 429, "RATE_LIMITED", None);

    // Access tokens per address (the harness's requests carry no X-Forwarded-For: the
    // proxy's own address is the client). The sign-up above took one already.
    assert!(access_token(&http, base, &fan.api_key).await.is_ok());
    assert!(access_token(&http, base, &fan.api_key).await.is_ok());
    assert!(access_token(&http, base, &fan.api_key).await.is_err(), "the fourth in a minute is refused");
    cluster.shut_down().await;
}

/// Reads an event stream until `needle` arrives or the stream ends; whether it came.
async fn stream_says(
    response: &mut awc::ClientResponse<
        impl futures::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
    needle: &str,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(60), response.next()).await {
            Ok(Some(Ok(chunk))) => {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains(needle) {
                    return true;
                }
            }
            _ => return false,
        }
    }
    false
}

#[actix_web::test]
async fn a_third_event_stream_ends_the_first_and_a_full_instance_answers_503() {
    let mut env = env(1);
    env.push(("SSE_MAX_STREAMS".into(), "3".into()));
    let cluster =
        Cluster::start_with(1, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    // One user takes the only ACTIVE place, so the others stay WAITING (a stream of an
    // ACTIVE token ends after its first event).
    admitted_users(&http, &[base], 1).await.expect("the active one");
    let waiting = |fan: Fan| {
        let http = &http;
        async move {
            let (_, token) = queue_token(http, base, &fan).await.expect("token");
            (fan, token)
        }
    };
    let (b, b_token) = waiting(new_user(&http, base).await.expect("b")).await;
    let (c, c_token) = waiting(new_user(&http, base).await.expect("c")).await;
    let open = |fan: &Fan, token: &str| {
        http.get(format!("{base}/api/v1/queue/tokens/me/events")).bearer(fan).queue(token).send()
    };

    let mut first = open(&b, &b_token).await.expect("first stream");
    assert_eq!(first.status(), StatusCode::OK);
    assert!(stream_says(&mut first, "event: status").await);
    let mut second = open(&b, &b_token).await.expect("second stream");
    assert!(stream_says(&mut second, "event: status").await);
    let mut third = open(&b, &b_token).await.expect("third stream");
    assert!(stream_says(&mut third, "event: status").await);
    assert!(stream_says(&mut first, "event: superseded").await, "the third stream ends the first");
    assert!(first.next().await.is_none(), "and the first stream is over");
    drop(first);
    // The server counts it closed once it let go of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = super::metrics_text(&http, cluster.ops_url(0)).await;
        if text.lines().any(|line| line == "queue_event_streams_open 2") {
            break;
        }
        assert!(Instant::now() < deadline, "streams never went back to 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two of B's and one of C's fill the instance (3); a fourth is refused, 503 with Retry-After.
    let mut c_stream = open(&c, &c_token).await.expect("c's stream");
    assert!(stream_says(&mut c_stream, "event: status").await);
    let full = open(&c, &c_token).await.expect("answer");
    // C's second stream would end nothing of B's, and the instance has no room for it.
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(full.headers().get("retry-after").is_some());
    // Someone else's token on the stream route: 401.
    let stolen =
        send(http.get(format!("{base}/api/v1/queue/tokens/me/events")).bearer(&c).queue(&b_token), None)
            .await;
    assert_problem(&stolen, 401, "QUEUE_TOKEN_INVALID", None);
    drop((second, third, c_stream));
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_body_trickled_byte_by_byte_is_cut_with_408() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cluster = Cluster::start_with(1, &ClusterOptions::with_env(&[("HTTP_BODY_TIMEOUT_MS", "1000")]))
        .await
        .expect("cluster");
    let address = cluster.url(0).trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.expect("connect");
    socket
        .write_all(b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{")
        .await
        .expect("write");
    // The rest never comes: the server answers by itself once its deadline passes.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server closed the connection");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn after_a_rotation_tokens_of_the_previous_key_still_verify_everywhere_and_unknown_keys_never() {
    let mut env = env(10);
    // A new key then signs 2 x 1 + 5 = 7 s after its rotation.
    env.push(("AUTH_KEY_REFRESH_SECONDS".into(), "1".into()));
    let cluster =
        Cluster::start_with(2, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let (a, b) = (cluster.url(0), cluster.url(1));
    let fan = sign_up(&http, a, "fan").await.expect("fan");
    let old_kid = kid(&fan.access).expect("kid");
    assert_eq!(
        kid(&access_token(&http, b, &fan.api_key).await.expect("token")),
        Some(old_kid.clone()),
        "one shared key"
    );

    let (status, rotated) = call(
        http.post(format!("{a}/api/v1/admin/auth/signing-keys")).insert_header(("X-Admin-Key", ADMIN_KEY)),
        None,
    )
    .await
    .expect("rotated");
    assert_eq!(status, 201, "{rotated}");
    let new_kid = rotated["kid"].as_str().expect("kid").to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(rotated.get("secret").is_none());

    // Poll until each instance signs with the new key.
    let mut fresh = Vec::new();
    for base in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let token = access_token(&http, base, &fan.api_key).await.expect("token");
            if kid(&token).as_deref() == Some(new_kid.as_str()) {
                fresh.push(token);
                break;
            }
            assert!(Instant::now() < deadline, "{base} never signed with the new key");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Old and new tokens verify on both instances.
    for token in [fan.access.clone(), fresh[0].clone(), fresh[1].clone()] {
        let holder = as_fan(&fan.id, token);
        for base in [a, b] {
            assert_eq!(balance(&http, base, &holder).await, 0);
        }
    }
    // A key nobody published does not.
    let stranger =
        as_fan(&fan.id, forged("never-published", b"0123456789abcdefghijklmnopqrstuvwxyz", &fan.id));
    let refused = send(http.get(format!("{b}/api/v1/users/{}/points", fan.id)).bearer(&stranger), None).await;
    assert_problem(&refused, 401, "UNAUTHENTICATED", None);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn no_secret_reaches_the_logs_of_a_whole_booking_and_malformed_requests_are_not_errors() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cluster = Cluster::start_with(2, &ClusterOptions { env: env(10), ..ClusterOptions::default() })
        .await
        .expect("cluster");
    let http = client();
    let (a, b) = (cluster.url(0), cluster.url(1));
    let schedule = open_schedule(&http, a, 5_000).await.expect("schedule");
    let (fan, token) = admitted_users(&http, &[a, b], 1).await.expect("admitted").remove(0);
    let (status, _) = call(
        http.post(format!("{b}/api/v1/users/{}/points/charge", fan.id)).bearer(&fan),
        Some(json!({"amount": 10_000})),
    )
    .await
    .expect("charge");
    assert_eq!(status, 200);
    let (status, held) = call(
        http.post(format!("{a}/api/v1/reservations")).bearer(&fan).queue(&token),
        Some(json!({"scheduleId": schedule, "seatNumber": 9})),
    )
    .await
    .expect("hold");
    assert_eq!(status, 201);
    let (status, paid) = call(
        http.post(format!("{b}/api/v1/payments"))
            .bearer(&fan)
            .queue(&token)
            .insert_header(("Idempotency-Key", "pay-9")),
        Some(json!({"reservationId": held["id"]})),
    )
    .await
    .expect("pay");
    assert_eq!(status, 201, "{paid}");
    // Refused credentials are logged too (as refusals), never as text.
    let _ = send(
        http.get(format!("{a}/api/v1/users/{}/points", fan.id))
            .insert_header(("Authorization", format!("Bearer {}x", fan.access))),
        None,
    )
    .await;
    // Garbage that is not HTTP, on both listeners.
    for address in [a, cluster.ops_url(0)] {
        let mut socket =
            tokio::net::TcpStream::connect(address.trim_start_matches("http://")).await.expect("connect");
        socket.write_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n").await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer)).await;
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"));
    }
    // Every line both servers wrote so far.
    let logs: Vec<String> = cluster
        .instances
        .iter()
        .flat_map(|instance| instance.output.lock().map(|lines| lines.clone()).unwrap_or_default())
        .collect();
    assert!(logs.len() > 20, "the servers logged the flow");
    for (what, secret) in [
        ("apiKey", fan.api_key.as_str()),
        ("access token", fan.access.as_str()),
        ("queue token", token.as_str()),
    ] {
        let leaks: Vec<&String> = logs.iter().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "the {what} is in the logs: {leaks:?}");
    }
    // The access token's signature alone must not be there either.
    let signature = fan.access.rsplit('.').next().expect("signature");
    assert!(!logs.iter().any(|line| line.contains(signature)));
    let errors: Vec<&String> = logs.iter().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:?}");
    cluster.shut_down().await;
}
