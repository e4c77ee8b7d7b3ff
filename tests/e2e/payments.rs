//! Payments over three instances: exactly one payment of a hold whatever the concurrency
//! (with the distributed lock and without it), replays with one key, a payment racing
//! charges of the same user, refusals that change nothing, the replay of a payment whose
//! token it expired, and the event on the stream.

use std::time::{Duration, Instant};

use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, RedisConnections};
use adapters_redis::events::EventConsumer;
use e2e::booking::{AsFan as _, Fan, admitted_users, call, env, open_schedule, seat_statuses};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::{Value, json};

use super::{assert_problem, send};

struct Setup {
    cluster: Cluster,
    stream: String,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let stream = format!("e2e:{}:payments", uuid::Uuid::new_v4().simple());
    let mut env = env(1_000);
    env.push(("PAYMENT_EVENTS_STREAM".into(), stream.clone()));
    env.push(("OUTBOX_RELAY_INTERVAL_MS".into(), "50".into()));
    // Payments and charges of one user queue for its point lock, keyed duplicates for their
    // key's: no wait may run out on a slow machine.
    env.extend(e2e::owned(e2e::PATIENT_LOCKS));
    env.extend(e2e::owned(extra));
    let cluster =
        Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    Setup { cluster, stream }
}

async fn charge(http: &awc::Client, base: &str, user: &Fan, amount: i64) -> u16 {
    call(
        http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(user),
        Some(json!({"amount": amount})),
    )
    .await
    .expect("answered")
    .0
}

async fn balance(http: &awc::Client, base: &str, user: &Fan) -> i64 {
    let (_, body) = call(http.get(format!("{base}/api/v1/users/{}/points", user.id)).bearer(user), None)
        .await
        .expect("answered");
    body["balance"].as_i64().expect("balance")
}

async fn history_kinds(http: &awc::Client, base: &str, user: &Fan) -> Vec<String> {
    let (_, body) = call(
        http.get(format!("{base}/api/v1/users/{}/points/history?limit=1000", user.id)).bearer(user),
        None,
    )
    .await
    .expect("answered");
    body.as_array().expect("entries").iter().map(|e| e["kind"].as_str().unwrap_or("?").to_owned()).collect()
}

/// A user with one of its queue tokens: `(user, token)`, as the booking calls take them.
type Caller<'a> = (&'a Fan, &'a str);

async fn hold(
    http: &awc::Client,
    base: &str,
    (user, token): Caller<'_>,
    schedule: &str,
    seat: i64,
) -> String {
    let (status, body) = call(
        http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token),
        Some(json!({"scheduleId": schedule, "seatNumber": seat})),
    )
    .await
    .expect("answered");
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn pay(
    http: &awc::Client,
    base: &str,
    (user, token): Caller<'_>,
    reservation: &str,
    key: Option<&str>,
) -> (u16, Value, bool) {
    let mut request = http.post(format!("{base}/api/v1/payments")).bearer(user).queue(token);
    if let Some(key) = key {
        request = request.insert_header(("Idempotency-Key", key));
    }
    let mut response = request.send_json(&json!({"reservationId": reservation})).await.expect("answered");
    let replayed = response.headers().get("Idempotent-Replayed").is_some();
    let bytes = response.body().await.expect("body");
    (response.status().as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null), replayed)
}

/// The `PaymentCompleted` events on `stream` (a fresh consumer group reads them all).
async fn events_on(stream: &str, at_least: usize) -> Vec<Value> {
    let redis = RedisConnections::connect(&test_support::redis_url().await, 1, DEFAULT_COMMAND_TIMEOUT)
        .await
        .expect("redis");
    let consumer =
        EventConsumer::new(redis.pool.clone(), stream, &format!("t{}", uuid::Uuid::new_v4().simple()), "c");
    consumer.ensure_group().await.expect("group");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while events.len() < at_least {
        assert!(Instant::now() < deadline, "only {} events reached {stream}", events.len());
        let batch = consumer.poll(100, Duration::from_millis(100)).await.expect("poll");
        for event in &batch {
            assert_eq!(event.event_type, "PaymentCompleted");
            if event.first_time {
                events.push(serde_json::from_str(&event.payload).expect("json"));
            }
        }
        consumer.acknowledge(&batch).await.expect("acknowledged");
    }
    events
}

async fn ten_payments_of_one_hold(locks: bool) {
    let extra: &[(&str, &str)] = if locks { &[] } else { e2e::NO_LOCKS };
    let Setup { cluster, stream } = setup(extra).await;
    let http = client();
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let users = admitted_users(&http, &bases, 2).await.expect("users");
    let (user, token) = (&users[0].0, users[0].1.as_str());
    let payer = (user, token);
    assert_eq!(charge(&http, bases[0], user, 100_000).await, 200);
    let schedule = open_schedule(&http, bases[0], 70_000).await.expect("schedule");
    let reservation = hold(&http, bases[1], payer, &schedule, 8).await;

    let answers =
        futures::future::join_all((0..10).map(|i| pay(&http, cluster.url(i), payer, &reservation, None)))
            .await;

    let paid = answers.iter().filter(|(s, _, _)| *s == 201).count();
    let refused = answers
        .iter()
        .filter(|(s, b, _)| {
            (*s == 409 && ["PAYMENT_IN_PROGRESS", "ALREADY_PAID"].contains(&b["code"].as_str().unwrap_or("")))
                || (*s == 401 && b["code"] == "QUEUE_TOKEN_INVALID")
        })
        .count();
    assert_eq!((paid, refused), (1, 9), "locks {locks}: {answers:?}");
    assert_eq!(balance(&http, bases[2], user).await, 30_000, "deducted once");
    assert_eq!(history_kinds(&http, bases[2], user).await, vec!["USE", "CHARGE"]);
    // SOLD on every instance right after; the token is spent.
    for base in &bases {
        let map =
            seat_statuses(&http, base, (&users[1].0, users[1].1.as_str()), &schedule).await.expect("map");
        assert_eq!(map[7], (8, "SOLD".to_owned()), "on {base}");
    }
    let spent =
        send(http.get(format!("{}/api/v1/queue/tokens/me", bases[0])).bearer(user).queue(token), None).await;
    assert_problem(&spent, 401, "QUEUE_TOKEN_INVALID", None);
    // The event reached the stream, once.
    let events = events_on(&stream, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0]["reservationId"].as_str(), events[0]["amount"].as_i64()),
        (Some(reservation.as_str()), Some(70_000))
    );
    cluster.shut_down().await;
}

#[actix_web::test]
async fn ten_concurrent_payments_of_one_hold_pay_it_once() {
    ten_payments_of_one_hold(true).await;
}

#[actix_web::test]
async fn with_the_lock_removed_ten_concurrent_payments_still_pay_once() {
    ten_payments_of_one_hold(false).await;
}

async fn eight_replays(locks: bool) {
    let extra: &[(&str, &str)] = if locks { &[] } else { e2e::NO_LOCKS };
    let Setup { cluster, stream } = setup(extra).await;
    let http = client();
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let users = admitted_users(&http, &bases, 1).await.expect("users");
    let (user, token) = (&users[0].0, users[0].1.as_str());
    let payer = (user, token);
    assert_eq!(charge(&http, bases[0], user, 100_000).await, 200);
    let schedule = open_schedule(&http, bases[0], 25_000).await.expect("schedule");
    let reservation = hold(&http, bases[1], payer, &schedule, 3).await;

    let answers = futures::future::join_all(
        (0..8).map(|i| pay(&http, cluster.url(i), payer, &reservation, Some("pay-once-1"))),
    )
    .await;

    assert!(answers.iter().all(|(s, _, _)| *s == 201), "locks {locks}: {answers:?}");
    assert!(answers.windows(2).all(|w| w[0].1 == w[1].1), "identical bodies: {answers:?}");
    assert_eq!(answers.iter().filter(|(_, _, replayed)| !replayed).count(), 1, "one ran, seven replayed");
    assert_eq!(balance(&http, bases[2], user).await, 75_000, "deducted once");
    // A retry after the token was spent still gets the answer (not 401), on any instance;
    // without the key, or with another, it is 401.
    let (status, body, replayed) = pay(&http, bases[2], payer, &reservation, Some("pay-once-1")).await;
    assert_eq!((status, &body, replayed), (201, &answers[0].1, true));
    assert_eq!(pay(&http, bases[0], payer, &reservation, None).await.0, 401);
    assert_eq!(pay(&http, bases[0], payer, &reservation, Some("another-key")).await.0, 401);
    assert_eq!(events_on(&stream, 1).await.len(), 1);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn eight_concurrent_replays_with_one_key_give_eight_identical_answers_and_one_deduction() {
    eight_replays(true).await;
}

#[actix_web::test]
async fn with_the_lock_removed_eight_replays_with_one_key_still_deduct_once() {
    eight_replays(false).await;
}

#[actix_web::test]
async fn a_payment_racing_forty_charges_of_the_same_user_leaves_the_exact_balance() {
    for locks in [true, false] {
        let extra: &[(&str, &str)] = if locks { &[] } else { e2e::NO_LOCKS };
        let Setup { cluster, .. } = setup(extra).await;
        let http = client();
        let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
        let users = admitted_users(&http, &bases, 1).await.expect("users");
        let (user, token) = (users[0].0.clone(), users[0].1.clone());
        assert_eq!(charge(&http, bases[0], &user, 100_000).await, 200);
        let schedule = open_schedule(&http, bases[0], 70_000).await.expect("schedule");
        let reservation = hold(&http, bases[1], (&user, token.as_str()), &schedule, 20).await;

        let charges = futures::future::join_all((0..40).map(|i| charge(&http, cluster.url(i), &user, 1_000)));
        let (charged, paid) =
            futures::join!(charges, pay(&http, bases[2], (&user, token.as_str()), &reservation, None));

        assert!(charged.iter().all(|s| *s == 200), "locks {locks}: {charged:?}");
        assert_eq!(paid.0, 201, "{:?}", paid.1);
        assert_eq!(balance(&http, bases[0], &user).await, 100_000 + 40_000 - 70_000, "locks {locks}");
        let kinds = history_kinds(&http, bases[0], &user).await;
        assert_eq!((kinds.len(), kinds.iter().filter(|k| *k == "USE").count()), (42, 1));
        cluster.shut_down().await;
    }
}

#[actix_web::test]
async fn refused_payments_change_nothing() {
    // Holds last the product's 5 minutes: every step here needs its hold still held. (A
    // hold that ran out is the next test's.)
    let Setup { cluster, .. } = setup(&[]).await;
    let http = client();
    let base = cluster.url(0);
    let users = admitted_users(&http, &[base], 2).await.expect("users");
    let (user, token) = (&users[0].0, users[0].1.as_str());
    let (me, them) = ((user, token), (&users[1].0, users[1].1.as_str()));
    assert_eq!(charge(&http, base, user, 10_000).await, 200);
    let schedule = open_schedule(&http, base, 70_000).await.expect("schedule");
    let reservation = hold(&http, base, me, &schedule, 1).await;
    let payments = format!("{base}/api/v1/payments");
    let post = |(user, token): (&Fan, &str)| http.post(&payments).bearer(user).queue(token);

    // Not enough points: 409, nothing changed, the token still works.
    let poor = send(post(me), Some(&format!(r#"{{"reservationId": "{reservation}"}}"#))).await;
    assert_problem(&poor, 409, "INSUFFICIENT_BALANCE", None);
    assert_eq!(balance(&http, base, user).await, 10_000);
    assert_eq!(history_kinds(&http, base, user).await, vec!["CHARGE"]);
    assert_eq!(seat_statuses(&http, base, me, &schedule).await.expect("map")[0].1, "HELD");
    // Bad input, someone else's reservation, an unknown one.
    for (body, field) in [
        ("{}".to_owned(), "reservationId"),
        (r#"{"reservationId": "nope"}"#.to_owned(), "reservationId"),
        (r#"{"reservationId": 5}"#.to_owned(), "reservationId"),
    ] {
        assert_problem(&send(post(me), Some(&body)).await, 400, "VALIDATION_FAILED", Some(field));
    }
    let unknown = format!(r#"{{"reservationId": "{}"}}"#, uuid::Uuid::now_v7());
    assert_problem(&send(post(me), Some(&unknown)).await, 404, "RESERVATION_NOT_FOUND", None);
    let theirs = format!(r#"{{"reservationId": "{reservation}"}}"#);
    assert_problem(&send(post(them), Some(&theirs)).await, 404, "RESERVATION_NOT_FOUND", None);
    let bad_key = post(me).insert_header(("Idempotency-Key", "has space"));
    assert_problem(&send(bad_key, Some(&theirs)).await, 400, "VALIDATION_FAILED", Some("Idempotency-Key"));
    let tokenless = http.post(&payments).bearer(user);
    assert_problem(&send(tokenless, Some(&theirs)).await, 401, "QUEUE_TOKEN_INVALID", None);
    // The payer's own token, in someone else's hands or in nobody's: refused.
    assert_problem(&send(post((them.0, token)), Some(&theirs)).await, 401, "QUEUE_TOKEN_INVALID", None);
    let anonymous = http.post(&payments).queue(token);
    assert_problem(&send(anonymous, Some(&theirs)).await, 401, "UNAUTHENTICATED", None);

    // The same key for two reservations: 422 for the second.
    assert_eq!(charge(&http, base, user, 200_000).await, 200);
    let other = hold(&http, base, me, &schedule, 2).await;
    let keyed = |r: &str| {
        (post(me).insert_header(("Idempotency-Key", "k-422")), format!(r#"{{"reservationId": "{r}"}}"#))
    };
    let (first, body) = keyed(&other);
    assert_eq!(send(first, Some(&body)).await.0.as_u16(), 201);
    // The payment spent the token; a replay under the key still answers (for the other
    // reservation, the key is reused).
    let (again, body) = keyed(&reservation);
    let reused = send(again, Some(&body)).await;
    assert_problem(&reused, 422, "IDEMPOTENCY_KEY_REUSED", None);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_payment_of_a_hold_that_ran_out_is_refused_and_changes_nothing() {
    // The shortest hold there is (1 s). Nothing here needs it still held: it is made, then
    // read until it shows EXPIRED, however long that takes.
    let Setup { cluster, .. } = setup(&[("RESERVATION_HOLD_SECONDS", "1")]).await;
    let http = client();
    let base = cluster.url(0);
    let users = admitted_users(&http, &[base], 1).await.expect("users");
    let (user, token) = (&users[0].0, users[0].1.as_str());
    // Points enough: the hold's end is the only reason to refuse.
    assert_eq!(charge(&http, base, user, 100_000).await, 200);
    let schedule = open_schedule(&http, base, 70_000).await.expect("schedule");
    let reservation = hold(&http, base, (user, token), &schedule, 1).await;
    let url = format!("{base}/api/v1/reservations/{reservation}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, read) = call(http.get(&url).bearer(user).queue(token), None).await.expect("read");
        if read["status"] == "EXPIRED" {
            break;
        }
        assert_eq!(read["status"], "HELD", "{read}");
        assert!(Instant::now() < deadline, "the hold never ran out: {read}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 409, nothing changed: no points taken, no history, the token still admitted.
    let late = send(
        http.post(format!("{base}/api/v1/payments")).bearer(user).queue(token),
        Some(&format!(r#"{{"reservationId": "{reservation}"}}"#)),
    )
    .await;
    assert_problem(&late, 409, "RESERVATION_EXPIRED", None);
    assert_eq!(balance(&http, base, user).await, 100_000);
    assert_eq!(history_kinds(&http, base, user).await, vec!["CHARGE"]);
    let (status, view) =
        call(http.get(format!("{base}/api/v1/queue/tokens/me")).bearer(user).queue(token), None)
            .await
            .expect("view");
    assert_eq!((status, view["status"].as_str()), (200, Some("ACTIVE")), "{view}");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_payment_whose_answer_was_lost_is_paid_once_when_retried_with_its_key() {
    use std::io::Write as _;
    let Setup { cluster, stream } = setup(&[]).await;
    let http = client();
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let users = admitted_users(&http, &bases, 4).await.expect("users");
    let schedule = open_schedule(&http, bases[0], 30_000).await.expect("schedule");
    for (n, (user, token)) in users.iter().enumerate() {
        assert_eq!(charge(&http, bases[0], user, 50_000).await, 200);
        let seat = i64::try_from(n).unwrap_or(0) + 1;
        let reservation = hold(&http, bases[0], (user, token.as_str()), &schedule, seat).await;
        // The client sends the whole payment and hangs up without reading the answer.
        let address = bases[n % 3].trim_start_matches("http://").to_owned();
        let body = format!(r#"{{"reservationId": "{reservation}"}}"#);
        let request = format!(
            "POST /api/v1/payments HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {}\r\n\
             Queue-Token: {token}\r\nIdempotency-Key: lost-{n}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            user.access,
            body.len()
        );
        let mut sent = std::net::TcpStream::connect(&address).expect("connect");
        sent.write_all(request.as_bytes()).expect("sent");
        sent.shutdown(std::net::Shutdown::Both).expect("hung up");
        drop(sent);

        // So it retries with the same key, on another instance: paid (now, or before and
        // replayed, even though that payment spent the token), never twice.
        let (status, answer, _) =
            pay(&http, bases[(n + 1) % 3], (user, token.as_str()), &reservation, Some(&format!("lost-{n}")))
                .await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(balance(&http, bases[2], user).await, 20_000, "user {n} paid once");
    }
    assert_eq!(events_on(&stream, 4).await.len(), 4);
    cluster.shut_down().await;
}
