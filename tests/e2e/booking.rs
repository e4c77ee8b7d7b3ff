//! Booking over three instances: seat storms with exact outcomes (with the distributed
//! lock and without it), freshness of the cached seat map on every instance, cancel, hold
//! expiry, the queue gate over HTTP, and bad input.

use std::time::{Duration, Instant};

use e2e::booking::{ADMIN_KEY, AsFan as _, Fan, admitted_users, call, env, open_schedule, seat_statuses};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::{Value, json};

use super::{assert_problem, send};

async fn cluster(extra: &[(&str, &str)], max_active: usize) -> Cluster {
    let mut env = env(max_active);
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster")
}

/// One of `racers` as `(user, token)`, the shape the booking calls take.
fn who(racer: &(Fan, String)) -> (&Fan, &str) {
    (&racer.0, racer.1.as_str())
}

async fn hold(
    http: &awc::Client,
    base: &str,
    (user, token): (&Fan, &str),
    schedule: &str,
    seat: i64,
) -> (u16, Value) {
    call(
        http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token),
        Some(json!({"scheduleId": schedule, "seatNumber": seat})),
    )
    .await
    .expect("answered")
}

fn bases(cluster: &Cluster) -> Vec<&str> {
    cluster.instances.iter().map(|i| i.base_url.as_str()).collect()
}

/// The status of `seat` as each instance shows it.
async fn seat_everywhere(
    http: &awc::Client,
    cluster: &Cluster,
    caller: (&Fan, &str),
    schedule: &str,
    seat: u64,
) -> Vec<String> {
    let mut seen = Vec::new();
    for base in bases(cluster) {
        let map = seat_statuses(http, base, caller, schedule).await.expect("seat map");
        assert_eq!(map.iter().map(|(n, _)| *n).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
        seen.push(map.into_iter().find(|(n, _)| *n == seat).expect("the seat").1);
    }
    seen
}

async fn one_seat_storm(locks: bool) {
    let extra: &[(&str, &str)] = if locks { &[] } else { e2e::NO_LOCKS };
    let cluster = cluster(extra, 1_000).await;
    let http = client();
    let racers = admitted_users(&http, &bases(&cluster), 120).await.expect("racers");
    let schedule = open_schedule(&http, cluster.url(0), 90_000).await.expect("schedule");
    // Every instance has the map cached (all AVAILABLE) before the storm.
    assert!(
        seat_everywhere(&http, &cluster, who(&racers[0]), &schedule, 25)
            .await
            .iter()
            .all(|s| s == "AVAILABLE")
    );

    let answers = futures::future::join_all(
        racers.iter().enumerate().map(|(i, racer)| hold(&http, cluster.url(i), who(racer), &schedule, 25)),
    )
    .await;

    let won: Vec<_> = answers.iter().enumerate().filter(|(_, (s, _))| *s == 201).collect();
    let lost = answers.iter().filter(|(s, b)| *s == 409 && b["code"] == "SEAT_UNAVAILABLE").count();
    assert_eq!((won.len(), lost), (1, 119), "locks {locks}: {answers:?}");
    let (winner, (_, reservation)) = won[0];
    assert_eq!((reservation["status"].as_str(), reservation["price"].as_i64()), (Some("HELD"), Some(90_000)));
    // Held, as soon as the hold returned, on every instance.
    let (owner, token) = who(&racers[winner]);
    assert!(
        seat_everywhere(&http, &cluster, (owner, token), &schedule, 25).await.iter().all(|s| s == "HELD")
    );
    let id = reservation["id"].as_str().expect("id");
    // Its owner reads it on any instance; anyone else gets 404.
    for i in 0..3 {
        let (status, body) = call(
            http.get(format!("{}/api/v1/reservations/{id}", cluster.url(i))).bearer(owner).queue(token),
            None,
        )
        .await
        .expect("answered");
        assert_eq!((status, body["status"].as_str()), (200, Some("HELD")), "{body}");
    }
    let (someone, theirs) = who(&racers[(winner + 1) % racers.len()]);
    let answer = send(
        http.get(format!("{}/api/v1/reservations/{id}", cluster.url(1))).bearer(someone).queue(theirs),
        None,
    )
    .await;
    assert_problem(&answer, 404, "RESERVATION_NOT_FOUND", None);
    let answer = send(
        http.delete(format!("{}/api/v1/reservations/{id}", cluster.url(1))).bearer(someone).queue(theirs),
        None,
    )
    .await;
    assert_problem(&answer, 404, "RESERVATION_NOT_FOUND", None);

    // Cancel on one instance frees the seat on every instance at once.
    let (status, cancelled) = call(
        http.delete(format!("{}/api/v1/reservations/{id}", cluster.url(2))).bearer(owner).queue(token),
        None,
    )
    .await
    .expect("answered");
    assert_eq!((status, cancelled["status"].as_str()), (200, Some("CANCELLED")), "{cancelled}");
    assert!(
        seat_everywhere(&http, &cluster, (owner, token), &schedule, 25)
            .await
            .iter()
            .all(|s| s == "AVAILABLE")
    );
    let again = send(
        http.delete(format!("{}/api/v1/reservations/{id}", cluster.url(0))).bearer(owner).queue(token),
        None,
    )
    .await;
    assert_problem(&again, 409, "RESERVATION_NOT_HELD", None);
    // And someone else can take it.
    assert_eq!(hold(&http, cluster.url(1), (someone, theirs), &schedule, 25).await.0, 201);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_hundred_and_twenty_racers_for_one_seat_get_exactly_one_hold_and_the_seat_shows_held_everywhere() {
    one_seat_storm(true).await;
}

#[actix_web::test]
async fn with_the_lock_removed_the_database_alone_still_gives_one_seat_one_hold() {
    one_seat_storm(false).await;
}

async fn twenty_seats_storm(locks: bool) {
    let extra: &[(&str, &str)] = if locks { &[] } else { e2e::NO_LOCKS };
    let cluster = cluster(extra, 1_000).await;
    let http = client();
    let racers = admitted_users(&http, &bases(&cluster), 60).await.expect("racers");
    let schedule = open_schedule(&http, cluster.url(0), 10_000).await.expect("schedule");

    // Three racers per seat, each on another instance.
    let (http_ref, cluster_ref, schedule_ref) = (&http, &cluster, &schedule);
    let answers = futures::future::join_all(racers.iter().enumerate().map(|(i, racer)| {
        let seat = i64::try_from(i % 20 + 1).unwrap_or(1);
        async move { (seat, hold(http_ref, cluster_ref.url(i), who(racer), schedule_ref, seat).await) }
    }))
    .await;

    assert!(answers.iter().all(|(_, (s, _))| *s == 201 || *s == 409), "locks {locks}: {answers:?}");
    let mut winners = [0; 21];
    for (seat, (status, _)) in &answers {
        if *status == 201 {
            winners[usize::try_from(*seat).unwrap_or(0)] += 1;
        }
    }
    assert_eq!(&winners[1..], &[1; 20], "each seat is won exactly once (locks {locks})");
    for base in bases(&cluster) {
        let map = seat_statuses(&http, base, who(&racers[0]), &schedule).await.expect("map");
        let held: Vec<u64> = map.iter().filter(|(_, s)| s == "HELD").map(|(n, _)| *n).collect();
        assert_eq!(held, (1..=20).collect::<Vec<_>>(), "on {base}");
    }
    cluster.shut_down().await;
}

#[actix_web::test]
async fn three_racers_per_seat_over_twenty_seats_win_each_seat_once() {
    twenty_seats_storm(true).await;
}

#[actix_web::test]
async fn three_racers_per_seat_with_the_lock_removed_still_win_each_seat_once() {
    twenty_seats_storm(false).await;
}

#[actix_web::test]
async fn a_hold_that_runs_out_shows_available_everywhere_at_once_and_the_job_then_expires_it() {
    let cluster =
        cluster(&[("RESERVATION_HOLD_SECONDS", "3"), ("HOLD_EXPIRY_INTERVAL_MS", "500")], 1_000).await;
    let http = client();
    let people = admitted_users(&http, &bases(&cluster), 2).await.expect("users");
    let schedule = open_schedule(&http, cluster.url(0), 1_000).await.expect("schedule");
    let (holder, watcher) = (who(&people[0]), who(&people[1]));
    let (status, held) = hold(&http, cluster.url(0), holder, &schedule, 3).await;
    assert_eq!(status, 201, "{held}");
    let id = held["id"].as_str().expect("id");
    let held_until = held["heldUntil"].as_str().expect("heldUntil").to_owned();
    // Its whole second, written as `rfc3339` writes times (the hold lasts at least that long).
    let held_until_second = held_until[..19].to_owned() + "Z";

    // HELD on every instance while it lasts. A 3 s hold may run out before a slow machine
    // has read three seat maps, so a map is checked only when it was read before the hold's
    // end (on a fast machine, all three; the storms check HELD everywhere with holds that
    // cannot run out).
    for base in bases(&cluster) {
        let map = seat_statuses(&http, base, watcher, &schedule).await.expect("seat map");
        let seat = map.into_iter().find(|(n, _)| *n == 3).expect("seat 3").1;
        if e2e::booking::rfc3339(now_secs()) < held_until_second {
            assert_eq!(seat, "HELD", "on {base}, before {held_until}");
        }
    }

    // Right after the hold's end, every answer (cached maps included) shows it free.
    let deadline = Instant::now() + Duration::from_secs(60);
    while e2e::booking::rfc3339(now_secs()) <= held_until_second {
        assert!(Instant::now() < deadline, "the clock never passed {held_until}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(seat_everywhere(&http, &cluster, watcher, &schedule, 3).await.iter().all(|s| s == "AVAILABLE"));
    let (_, read) = call(
        http.get(format!("{}/api/v1/reservations/{id}", cluster.url(1))).bearer(holder.0).queue(holder.1),
        None,
    )
    .await
    .expect("answered");
    assert_eq!(read["status"], "EXPIRED", "{read}");
    let cancel = send(
        http.delete(format!("{}/api/v1/reservations/{id}", cluster.url(2))).bearer(holder.0).queue(holder.1),
        None,
    )
    .await;
    assert_problem(&cancel, 409, "RESERVATION_NOT_HELD", None);

    // The job marks it EXPIRED in the database (counted once over all instances).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut expired = 0.0;
        for instance in &cluster.instances {
            let text = super::metrics_text(&http, &instance.ops_url).await;
            expired += counter(&text, "reservation_holds_expired_total");
        }
        if expired >= 1.0 {
            assert!((expired - 1.0).abs() < f64::EPSILON, "expired {expired} times");
            break;
        }
        assert!(Instant::now() < deadline, "the expiry job never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The seat is free to hold again.
    assert_eq!(hold(&http, cluster.url(2), watcher, &schedule, 3).await.0, 201);
    cluster.shut_down().await;
}

fn now_secs() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    i64::try_from(now.as_secs()).unwrap_or(0)
}

fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_web::test]
async fn the_gate_bad_input_and_the_admin_key_are_refused_with_problems_that_change_nothing() {
    let cluster = cluster(&[], 1).await;
    let http = client();
    let base = cluster.url(0);
    let people = admitted_users(&http, &[base], 1).await.expect("an admitted user");
    let me = who(&people[0]);
    let (user, token) = me;
    let schedule = open_schedule(&http, base, 5_000).await.expect("schedule");
    // A second user waits behind the first (QUEUE_MAX_ACTIVE=1).
    let waiting_user = e2e::booking::new_user(&http, base).await.expect("user");
    let (_, waiting) = e2e::booking::queue_token(&http, base, &waiting_user).await.expect("token");
    // The catalog needs no credentials.
    let concerts = send(http.get(format!("{base}/api/v1/concerts")), None).await;
    assert_eq!(concerts.0.as_u16(), 200, "{}", concerts.2);
    let concert = concerts.2[0]["id"].as_str().expect("a concert").to_owned();

    // The gate, over HTTP, on every booking route.
    for (method, path) in [
        ("GET", format!("/api/v1/concerts/{concert}/schedules")),
        ("GET", format!("/api/v1/schedules/{schedule}/seats")),
        ("POST", "/api/v1/reservations".to_owned()),
        ("GET", format!("/api/v1/reservations/{}", uuid::Uuid::now_v7())),
        ("DELETE", format!("/api/v1/reservations/{}", uuid::Uuid::now_v7())),
    ] {
        let request = |caller: Option<&Fan>, t: Option<&str>| {
            let mut r = http.request(method.parse().expect("method"), format!("{base}{path}"));
            if let Some(caller) = caller {
                r = r.bearer(caller);
            }
            match t {
                Some(t) => r.queue(t),
                None => r,
            }
        };
        let body = (method == "POST").then_some(r#"{"scheduleId": "x", "seatNumber": 1}"#);
        let as_user = |t: Option<&str>| request(Some(user), t);
        assert_problem(&send(as_user(None), body).await, 401, "QUEUE_TOKEN_INVALID", None);
        assert_problem(&send(as_user(Some("not-a-uuid")), body).await, 401, "QUEUE_TOKEN_INVALID", None);
        let unknown = uuid::Uuid::new_v4().to_string();
        assert_problem(&send(as_user(Some(&unknown)), body).await, 401, "QUEUE_TOKEN_INVALID", None);
        let queued = request(Some(&waiting_user), Some(&waiting));
        assert_problem(&send(queued, body).await, 403, "QUEUE_TOKEN_NOT_ACTIVE", None);
        // A queue token is worth nothing to anyone but its owner, nor without an access token.
        assert_problem(&send(as_user(Some(&waiting)), body).await, 401, "QUEUE_TOKEN_INVALID", None);
        let borrowed = request(Some(&waiting_user), Some(token));
        assert_problem(&send(borrowed, body).await, 401, "QUEUE_TOKEN_INVALID", None);
        assert_problem(&send(request(None, Some(token)), body).await, 401, "UNAUTHENTICATED", None);
    }

    // Bad holds.
    let post = || http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token);
    for (body, field) in [
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": 0}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": 51}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": -5}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": 1099511627776}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": "7"}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": 7.5}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}", "seatNumber": null}}"#), "seatNumber"),
        (format!(r#"{{"scheduleId": "{schedule}"}}"#), "seatNumber"),
        (r#"{"seatNumber": 7}"#.to_owned(), "scheduleId"),
        (r#"{"scheduleId": "nope", "seatNumber": 7}"#.to_owned(), "scheduleId"),
        (r#"{"scheduleId": 12, "seatNumber": 7}"#.to_owned(), "scheduleId"),
    ] {
        assert_problem(&send(post(), Some(&body)).await, 400, "VALIDATION_FAILED", Some(field));
    }
    assert_problem(&send(post(), Some("{not json")).await, 400, "MALFORMED_JSON", None);
    let dup = format!(r#"{{"scheduleId": "{schedule}", "seatNumber": 7, "seatNumber": 8}}"#);
    assert_problem(&send(post(), Some(&dup)).await, 400, "MALFORMED_JSON", None);
    let unknown = format!(r#"{{"scheduleId": "{}", "seatNumber": 7}}"#, uuid::Uuid::now_v7());
    assert_problem(&send(post(), Some(&unknown)).await, 404, "SCHEDULE_NOT_FOUND", None);

    // Bad ids in paths.
    let get = |path: String| http.get(format!("{base}{path}")).bearer(user).queue(token);
    assert_problem(
        &send(get("/api/v1/schedules/12/seats".into()), None).await,
        400,
        "VALIDATION_FAILED",
        Some("scheduleId"),
    );
    assert_problem(
        &send(get("/api/v1/concerts/x/schedules".into()), None).await,
        400,
        "VALIDATION_FAILED",
        Some("concertId"),
    );
    assert_problem(
        &send(get("/api/v1/reservations/7".into()), None).await,
        400,
        "VALIDATION_FAILED",
        Some("reservationId"),
    );
    let nobody = uuid::Uuid::now_v7();
    assert_problem(
        &send(get(format!("/api/v1/schedules/{nobody}/seats")), None).await,
        404,
        "SCHEDULE_NOT_FOUND",
        None,
    );
    assert_problem(
        &send(get(format!("/api/v1/concerts/{nobody}/schedules")), None).await,
        404,
        "CONCERT_NOT_FOUND",
        None,
    );

    // A date whose window is not open: listed nowhere, held never.
    let (_, later) = call(
        http.post(format!("{base}/api/v1/admin/concerts/{concert}/schedules"))
            .insert_header(("X-Admin-Key", ADMIN_KEY)),
        Some(json!({
            "startsAt": e2e::booking::rfc3339(now_secs() + 90 * 86_400),
            "bookingOpensAt": e2e::booking::rfc3339(now_secs() + 86_400),
            "bookingClosesAt": e2e::booking::rfc3339(now_secs() + 80 * 86_400),
            "seatPrice": 1_000,
        })),
    )
    .await
    .expect("answered");
    let later = later["id"].as_str().expect("a date").to_owned();
    let closed = send(post(), Some(&format!(r#"{{"scheduleId": "{later}", "seatNumber": 1}}"#))).await;
    assert_problem(&closed, 409, "BOOKING_CLOSED", None);
    let (_, listed) =
        call(get(format!("/api/v1/concerts/{concert}/schedules")), None).await.expect("answered");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "only the open date: {listed}");

    // The admin API: key, then input.
    let admin = |key: Option<&str>| {
        let r = http.post(format!("{base}/api/v1/admin/concerts"));
        match key {
            Some(k) => r.insert_header(("X-Admin-Key", k)),
            None => r,
        }
    };
    let concert_body = r#"{"title": "T", "venue": "V"}"#;
    assert_problem(&send(admin(None), Some(concert_body)).await, 401, "ADMIN_KEY_INVALID", None);
    assert_problem(
        &send(admin(Some("wrong-key-0123456789")), Some(concert_body)).await,
        401,
        "ADMIN_KEY_INVALID",
        None,
    );
    for (body, field) in [
        (r#"{"title": "", "venue": "V"}"#, "title"),
        (r#"{"title": "   ", "venue": "V"}"#, "title"),
        (r#"{"title": "T"}"#, "venue"),
        (r#"{"title": 5, "venue": "V"}"#, "title"),
    ] {
        assert_problem(
            &send(admin(Some(ADMIN_KEY)), Some(body)).await,
            400,
            "VALIDATION_FAILED",
            Some(field),
        );
    }
    let long = format!(r#"{{"title": "{}", "venue": "V"}}"#, "x".repeat(201));
    assert_problem(&send(admin(Some(ADMIN_KEY)), Some(&long)).await, 400, "VALIDATION_FAILED", Some("title"));
    let schedule_post = || {
        http.post(format!("{base}/api/v1/admin/concerts/{concert}/schedules"))
            .insert_header(("X-Admin-Key", ADMIN_KEY))
    };
    let at = |days: i64| e2e::booking::rfc3339(now_secs() + days * 86_400);
    for (body, field) in [
        (
            json!({"startsAt": at(10), "bookingOpensAt": at(5), "bookingClosesAt": at(1), "seatPrice": 1}),
            "bookingClosesAt",
        ),
        (
            json!({"startsAt": at(10), "bookingOpensAt": at(1), "bookingClosesAt": at(11), "seatPrice": 1}),
            "bookingClosesAt",
        ),
        (
            json!({"startsAt": at(10), "bookingOpensAt": at(1), "bookingClosesAt": at(5), "seatPrice": -1}),
            "seatPrice",
        ),
        (
            json!({"startsAt": at(10), "bookingOpensAt": at(1), "bookingClosesAt": at(5), "seatPrice": 10_000_001}),
            "seatPrice",
        ),
        (
            json!({"startsAt": "tomorrow", "bookingOpensAt": at(1), "bookingClosesAt": at(5), "seatPrice": 1}),
            "startsAt",
        ),
        (
            json!({"startsAt": "0001-01-01T00:00:00Z", "bookingOpensAt": "0001-01-01T00:00:00Z", "bookingClosesAt": "0001-01-01T00:00:00Z", "seatPrice": 1}),
            "startsAt",
        ),
    ] {
        let answer = send(schedule_post(), Some(&body.to_string())).await;
        assert_problem(&answer, 400, "VALIDATION_FAILED", Some(field));
    }

    // None of it changed anything: every seat of the date is free, and the concert has
    // its two dates only.
    let map = seat_statuses(&http, base, me, &schedule).await.expect("map");
    assert!(map.iter().all(|(_, s)| s == "AVAILABLE"), "{map:?}");
    let (_, listed) =
        call(get(format!("/api/v1/concerts/{concert}/schedules")), None).await.expect("answered");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let answer = send(get(format!("/api/v1/schedules/{schedule}/nothing")), None).await;
    assert_problem(&answer, 404, "NOT_FOUND", None);
    cluster.shut_down().await;
}
