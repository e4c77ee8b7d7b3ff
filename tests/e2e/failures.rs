use std::time::Duration;

use e2e::booking::{AsFan as _, sign_up};
use e2e::{Cluster, ClusterOptions, PrivateRedis, TcpProxy, client};

use serde_json::Value;

use super::{assert_problem, scalar, send};

#[actix_web::test]
async fn with_redis_gone_charges_fail_closed_reads_go_on_and_readiness_names_redis() {
    let mut redis = PrivateRedis::start().expect("a private redis-server");
    let options = ClusterOptions { redis_url: Some(redis.url()), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let ops = cluster.ops_url(0);
    let fan = sign_up(&http, base, "kim").await.expect("a user");
    let user = fan.id.as_str();
    let charge = format!("{base}/api/v1/users/{user}/points/charge");
    assert_eq!(send(http.post(&charge).bearer(&fan), Some(r#"{"amount": 100}"#)).await.0.as_u16(), 200);

    redis.kill();
    assert!(!redis.answers());

    // No lock, no write: the charge is refused as unavailable, and nothing changes.
    let refused = send(http.post(&charge).bearer(&fan), Some(r#"{"amount": 100}"#)).await;
    assert_problem(&refused, 503, "SERVICE_UNAVAILABLE", None);
    // Reads need neither Redis nor a store to check the access token.
    let balance = send(http.get(format!("{base}/api/v1/users/{user}/points")).bearer(&fan), None).await;
    assert_eq!(balance.2["balance"], 100, "reads do not need Redis: {}", balance.2);
    let history =
        send(http.get(format!("{base}/api/v1/users/{user}/points/history")).bearer(&fan), None).await;
    assert_eq!(history.2.as_array().map(Vec::len), Some(1));
    // The cache is never a reason to fail: the catalog is read from MySQL, and counted.
    let concerts = send(http.get(format!("{base}/api/v1/concerts")), None).await;
    assert_eq!(concerts.0.as_u16(), 200, "{}", concerts.2);
    assert_eq!(concerts.2.as_array().map(Vec::len), Some(3), "the demo concerts: {}", concerts.2);
    let text = super::metrics_text(&http, ops).await;
    assert!(
        text.lines().any(|l| l.starts_with("cache_requests_total{cache=\"concerts\",result=\"bypass\"}")),
        "the bypass is counted"
    );
    let ready = send(http.get(format!("{ops}/health/ready")), None).await;
    assert_problem(&ready, 503, "NOT_READY", None);
    assert_eq!(ready.2["checks"]["redis"], "DOWN");
    assert_eq!(ready.2["checks"]["mysql"], "UP");
    assert_eq!(send(http.get(format!("{ops}/health/live")), None).await.0.as_u16(), 200);

    // Degrade fast: after a few failures in a row the breakers open, and the calls that
    // would each wait out the command timeout are refused (lock) or sent to MySQL (cache)
    // at once. Shown by the breakers' own gauges, not by timing.
    for _ in 0..8 {
        assert_problem(
            &send(http.post(&charge).bearer(&fan), Some(r#"{"amount": 100}"#)).await,
            503,
            "SERVICE_UNAVAILABLE",
            None,
        );
        assert_eq!(send(http.get(format!("{base}/api/v1/concerts")), None).await.0.as_u16(), 200);
    }
    let metrics = super::metrics_text(&http, ops).await;
    for dependency in ["lock", "cache"] {
        assert!(
            metrics.lines().any(|l| l == format!("circuit_breaker_state{{dependency=\"{dependency}\"}} 1")),
            "the {dependency} breaker is open:\n{metrics}"
        );
    }
    assert!(metrics.lines().any(|l| l.starts_with("circuit_breaker_opened_total{dependency=\"lock\"}")));

    // Recover by itself: Redis comes back (empty), and without a restart of the service the
    // next probe closes the breakers and writes go through again.
    redis.restart().expect("redis back");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let answer = send(http.post(&charge).bearer(&fan), Some(r#"{"amount": 100}"#)).await;
        if answer.0.as_u16() == 200 {
            assert_eq!(answer.2["balance"], 200, "exactly the charges that were answered 200: {}", answer.2);
            break;
        }
        assert_eq!(answer.0.as_u16(), 503, "{}", answer.2);
        assert!(std::time::Instant::now() < deadline, "the service never recovered: {}", answer.2);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = super::metrics_text(&http, ops).await;
    assert!(metrics.lines().any(|l| l == "circuit_breaker_state{dependency=\"lock\"} 0"), "{metrics}");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn an_instance_crashing_mid_storm_loses_no_point_and_makes_none_up() {
    use std::cell::Cell;
    use std::collections::BTreeSet;

    use tokio::sync::Notify;

    // The locks the crashed instance held stay until their lease runs out (the product's
    // 10 s), and the survivors' charges queue behind them and behind each other: they get
    // the longest wait there is (60 s), so that none gives up however slow the machine. The
    // lease and the Redis command timeout are the product's too: a 300 ms command timeout
    // (which a 1 s lease requires) is within reach of a busy machine's round trips.
    let options = ClusterOptions::with_env(e2e::PATIENT_LOCKS);
    let cluster = Cluster::start_with(3, &options).await.expect("cluster");
    let http = client();
    let fan = sign_up(&http, cluster.url(1), "crash").await.expect("a user");
    let user = fan.id.as_str();
    let answered = Cell::new(0_usize);
    let progress = Notify::new();

    let storm = futures::future::join_all((0..300).map(|i| {
        let request = http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i))).bearer(&fan);
        let (answered, progress) = (&answered, &progress);
        async move {
            let result = request
                .insert_header(("content-type", "application/json"))
                .send_body(r#"{"amount": 10}"#)
                .await;
            answered.set(answered.get() + 1);
            progress.notify_one();
            (i % 3, result.map(|r| r.status().as_u16()).unwrap_or(0))
        }
    }));
    let crash = async {
        while answered.get() < 60 {
            progress.notified().await;
        }
        cluster.instances[0].crash();
    };
    let (answers, ()) = futures::join!(storm, crash);

    // Survivors answered every request they got, and nobody answered 5xx.
    let survivors_refused: Vec<_> =
        answers.iter().filter(|(instance, status)| *instance != 0 && *status != 200).collect();
    assert!(survivors_refused.is_empty(), "{survivors_refused:?}");
    assert!(answers.iter().all(|(_, status)| *status < 500), "{answers:?}");
    // The crashed instance answered some before dying, and not all (it did crash mid-way).
    let crashed_ok = answers.iter().filter(|(instance, status)| *instance == 0 && *status == 200).count();
    assert!(crashed_ok < 100, "the crash came after every request to it was answered");

    // Every applied charge is in the history once, and the balance is their sum: nothing
    // lost, nothing made up. A charge that committed just before the crash counts even
    // though its answer never left.
    let ok = answers.iter().filter(|(_, status)| *status == 200).count();
    let history = send(
        http.get(format!("{}/api/v1/users/{user}/points/history?limit=1000", cluster.url(1))).bearer(&fan),
        None,
    )
    .await;
    let entries = history.2.as_array().expect("a list");
    let applied = i64::try_from(entries.len()).expect("small");
    assert!(entries.len() >= ok && entries.len() <= 300, "{} applied, {ok} answered", entries.len());
    let balance =
        send(http.get(format!("{}/api/v1/users/{user}/points", cluster.url(2))).bearer(&fan), None).await;
    assert_eq!(balance.2["balance"], applied * 10);
    let afters: BTreeSet<i64> =
        entries.iter().map(|e| e["balanceAfter"].as_i64().expect("balanceAfter")).collect();
    assert_eq!(afters, (1..=applied).map(|n| n * 10).collect(), "each charge saw the one before");

    // And the survivors go on.
    let after = send(
        http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(1))).bearer(&fan),
        Some(r#"{"amount": 10}"#),
    )
    .await;
    assert_eq!(after.0.as_u16(), 200, "{}", after.2);
    assert_eq!(after.2["balance"], (applied + 1) * 10);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn with_mysql_unreachable_every_route_answers_503_with_retry_after_never_500() {
    let direct = test_support::mysql_server_url().await;
    let target = direct.rsplit('@').next().expect("host:port").to_owned();
    let proxy = TcpProxy::start(&target).await.expect("proxy");
    let through_proxy = direct.replace(&target, &format!("127.0.0.1:{}", proxy.port()));
    let options = ClusterOptions {
        database_server: Some(through_proxy),
        // Fail fast once MySQL is gone: a pool wait of 5 s per request is not what is tested.
        env: vec![("DATABASE_MAX_CONNECTIONS".into(), "4".into())],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let fan = sign_up(&http, base, "kim").await.expect("a user");
    let user = fan.id.as_str();

    proxy.cut();

    // Each with the credentials it takes: none, the API key, or the access token (checked
    // without MySQL, so the route itself meets the outage).
    let (key, access) = (Some(fan.api_key.as_str()), Some(fan.access.as_str()));
    let requests = [
        ("POST", format!("{base}/api/v1/users"), None, Some(r#"{"name": "lee"}"#)),
        ("POST", format!("{base}/api/v1/auth/tokens"), key, None),
        ("GET", format!("{base}/api/v1/users/{user}/points"), access, None),
        ("POST", format!("{base}/api/v1/users/{user}/points/charge"), access, Some(r#"{"amount": 100}"#)),
        ("GET", format!("{base}/api/v1/users/{user}/points/history"), access, None),
        // Never read before the cut, so not cached: the catalog needs MySQL too.
        ("GET", format!("{base}/api/v1/concerts"), None, None),
    ];
    let answers = futures::future::join_all(requests.iter().map(|(method, url, bearer, body)| {
        let request = if *method == "POST" { http.post(url) } else { http.get(url) };
        let request = match bearer {
            Some(bearer) => request.insert_header(("Authorization", format!("Bearer {bearer}"))),
            None => request,
        };
        async move {
            let mut response = match body {
                Some(body) => {
                    request.insert_header(("content-type", "application/json")).send_body(*body).await
                }
                None => request.send().await,
            }
            .expect("the server answered");
            let retry_after =
                response.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
            let content_type =
                response.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned());
            let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
            (format!("{method} {url}"), response.status().as_u16(), retry_after, content_type, body)
        }
    }))
    .await;
    for (request, status, retry_after, content_type, body) in &answers {
        assert_eq!(*status, 503, "{request}: {body}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{request}");
        assert_eq!(body["code"], "SERVICE_UNAVAILABLE", "{request}: {body}");
        assert!(retry_after.is_some(), "{request}: no Retry-After");
        let text = body.to_string();
        assert!(!text.contains("sqlx") && !text.contains("Connection") && !text.contains("3306"), "{text}");
    }
    let ready = send(http.get(format!("{}/health/ready", cluster.ops_url(0))), None).await;
    assert_problem(&ready, 503, "NOT_READY", None);
    assert_eq!(ready.2["checks"]["mysql"], "DOWN");
    assert_eq!(ready.2["checks"]["redis"], "UP");
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_server_stopped_while_requests_hold_locks_leaves_no_lock_behind() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};

    const USERS: usize = 3;
    // The grace (1 s) is far shorter than the database's row-lock wait (2 minutes, far
    // longer than the test takes to see the locks taken, however slow the machine): the
    // requests are still holding their point locks when the grace ends and the server drops
    // them. (`LOCK_MAX_HOLD_MS` must be above the statement timeout.)
    let options = ClusterOptions::with_env(&[
        ("SHUTDOWN_GRACE_SECONDS", "1"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "120000"),
        ("LOCK_MAX_HOLD_MS", "180000"),
    ]);
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0).to_owned();
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(sign_up(&http, &base, "held").await.expect("a user"));
    }
    // Hold the users' account rows from outside, so that each charge takes its Redis lock
    // and then waits in MySQL.
    let db = sea_orm::Database::connect(cluster.direct_database_url()).await.expect("db");
    let blocker = db.begin().await.expect("begin");
    for user in &users {
        blocker
            .execute_unprepared(&format!(
                "SELECT * FROM point_accounts WHERE user_id = UNHEX(REPLACE('{}', '-', '')) FOR UPDATE",
                user.id
            ))
            .await
            .expect("row locked");
    }
    let redis = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&test_support::redis_url().await).expect("url"),
    )
    .build()
    .expect("client");
    fred::prelude::ClientLike::init(&redis).await.expect("redis");
    let keys: Vec<String> = users.iter().map(|user| format!("lock:{{point:{}}}", user.id)).collect();
    let exists = |redis: fred::clients::Client, keys: Vec<String>| async move {
        let mut held = 0;
        for key in keys {
            let n: i64 = fred::prelude::KeysInterface::exists(&redis, key).await.expect("EXISTS");
            held += n;
        }
        held
    };

    let charges: Vec<_> = users
        .iter()
        .map(|user| {
            let request = http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(user);
            actix_web::rt::spawn(async move {
                let _ = request
                    .insert_header(("content-type", "application/json"))
                    .send_body(r#"{"amount": 5}"#)
                    .await;
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while exists(redis.clone(), keys.clone()).await < i64::try_from(USERS).expect("small") {
        assert!(std::time::Instant::now() < deadline, "the charges never took their locks");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The stop takes about the grace; the limit only makes a hung stop fail, and is above
    // the row-lock wait so that not even a stop that waited for it could fail on time.
    cluster.instances[0].terminate_and_wait(std::time::Duration::from_secs(180)).expect("stopped");

    assert_eq!(exists(redis.clone(), keys.clone()).await, 0, "locks left behind by a graceful stop");
    blocker.rollback().await.expect("rollback");
    for charge in charges {
        let _ = charge.await;
    }
    db.close().await.ok();
    cluster.shut_down().await;
}

/// Sends `GET path` on `stream`, kept alive, and reads the answer: its status, its head
/// (lower case) and its body.
fn exchange(stream: &mut std::net::TcpStream, path: &str) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("sent");
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end + 4].to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse::<usize>().expect("a length"));
            if answer.len() >= end + 4 + length {
                let status = head[9..12].parse().expect("a status");
                return (status, head, text[end + 4..end + 4 + length].to_owned());
            }
        }
        let read = stream.read(&mut chunk).expect("read");
        assert!(read > 0, "the connection closed before the answer: {text}");
        answer.extend_from_slice(&chunk[..read]);
    }
}

/// A graceful stop ends the workers one by one, and a worker's runtime takes the pooled
/// MySQL connections it opened with it. So no request may still run when the first worker
/// stops, not only the writes that run on tasks of their own: a sign-up (which does not)
/// waiting in MySQL across the SIGTERM is let finish and answered 201, a request sent
/// meanwhile on a kept connection is refused with 503 and `Retry-After` (nothing done,
/// the connection closed), and the process ends only after.
#[actix_web::test]
async fn a_stop_lets_every_request_running_finish_before_the_workers_end_and_refuses_new_ones() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};

    // The row-lock wait and the grace far longer than the test needs (the sign-up is held
    // only until the refusal is seen); `LOCK_MAX_HOLD_MS` must be above the statement
    // timeout.
    let options = ClusterOptions::with_env(&[
        ("SHUTDOWN_GRACE_SECONDS", "120"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "120000"),
        ("LOCK_MAX_HOLD_MS", "180000"),
    ]);
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0).to_owned();
    let ops = cluster.ops_url(0).to_owned();

    // Every insert into `users` waits behind this transaction's next-key locks.
    let db = sea_orm::Database::connect(cluster.direct_database_url()).await.expect("db");
    let blocker = db.begin().await.expect("begin");
    blocker.execute_unprepared("SELECT id FROM users FOR UPDATE").await.expect("users locked");
    let sign_up = {
        let request = http.post(format!("{base}/api/v1/users")).timeout(Duration::from_secs(300));
        actix_web::rt::spawn(async move { send(request, Some(r#"{"name": "late"}"#)).await })
    };
    // (MariaDB lists a prepared INSERT waiting for a gap lock in the process list, not
    // among InnoDB's lock waits.)
    let waits = "SELECT COUNT(*) FROM information_schema.processlist \
                 WHERE db = DATABASE() AND info LIKE 'INSERT INTO `users`%'";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scalar(&db, waits).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the sign-up never waited for the lock");
        assert!(!sign_up.is_finished(), "the sign-up was answered before the lock was released");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }

    // A connection kept open across the stop (the listener takes no new one then).
    let address = base.trim_start_matches("http://").to_owned();
    let mut kept = std::net::TcpStream::connect(&address).expect("connected");
    kept.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    assert_eq!(exchange(&mut kept, "/nowhere").0, 404);

    let instance = &cluster.instances[0];
    instance.terminate().expect("SIGTERM");
    // The door closes at once (the writes drain after the requests).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !instance.printed("no new request is taken") {
        assert!(std::time::Instant::now() < deadline, "the stop never closed its door");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, head, body) = exchange(&mut kept, "/nowhere");
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["code"], "SERVICE_UNAVAILABLE", "{body}");
    assert_eq!(send(http.get(format!("{ops}/health/ready")), None).await.0.as_u16(), 503, "not ready");
    assert!(!instance.exited().expect("status"), "the process waits for the sign-up");
    assert!(!sign_up.is_finished(), "the sign-up still waits in MySQL");

    blocker.rollback().await.expect("rollback");
    let (status, _, body) = sign_up.await.expect("the sign-up");
    assert_eq!(status.as_u16(), 201, "the sign-up running at the stop is answered: {body}");
    let id = body["id"].as_str().expect("an id").replace('-', "");
    let stored = format!(
        "SELECT COUNT(*) FROM users u JOIN point_accounts a ON a.user_id = u.id WHERE u.id = UNHEX('{id}')"
    );
    assert_eq!(scalar(&db, &stored).await, 1, "the user and its account were committed");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while !instance.exited().expect("status") {
        assert!(std::time::Instant::now() < deadline, "the stop never ended");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    db.close().await.ok();
    cluster.shut_down().await;
}

#[actix_web::test]
async fn an_instance_crashing_mid_payments_leaves_every_payment_exact_once_retried() {
    use std::cell::Cell;

    use e2e::booking::{Fan, admitted_users, call, env, open_schedule};
    use serde_json::json;
    use tokio::sync::Notify;

    const USERS: usize = 30;
    const PRICE: i64 = 1_000;
    let mut env = env(USERS + 10);
    env.extend(e2e::owned(e2e::PATIENT_LOCKS));
    let cluster =
        Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let bases: Vec<&str> = (0..3).map(|i| cluster.url(i)).collect();
    let schedule = open_schedule(&http, bases[1], PRICE).await.expect("schedule");
    let users: Vec<(Fan, String)> = admitted_users(&http, &bases, USERS).await.expect("admitted");
    // Each user: points, then a hold of a seat of its own, all answered before the crash.
    let mut reservations = Vec::with_capacity(USERS);
    for (i, (user, token)) in users.iter().enumerate() {
        let base = bases[i % 3];
        let (status, _) = call(
            http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(user),
            Some(json!({"amount": 100_000})),
        )
        .await
        .expect("charge");
        assert_eq!(status, 200);
        let (status, held) = call(
            http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token),
            Some(json!({"scheduleId": schedule, "seatNumber": i + 1})),
        )
        .await
        .expect("hold");
        assert_eq!(status, 201, "{held}");
        reservations.push(held["id"].as_str().expect("id").to_owned());
    }

    // Every user pays at once, with a key, a third of them through instance 0, which is
    // killed (SIGKILL: locks held, transactions open) after the first five answers.
    let answered = Cell::new(0_usize);
    let progress = Notify::new();
    let pay = |i: usize, base: &str| {
        let (user, token) = &users[i];
        http.post(format!("{base}/api/v1/payments"))
            .bearer(user)
            .queue(token)
            .insert_header(("Idempotency-Key", format!("pay-{i}")))
            .send_json(&json!({"reservationId": reservations[i]}))
    };
    let storm = futures::future::join_all((0..USERS).map(|i| {
        let request = pay(i, bases[i % 3]);
        let (answered, progress) = (&answered, &progress);
        async move {
            let status = request.await.map(|r| r.status().as_u16()).unwrap_or(0);
            answered.set(answered.get() + 1);
            progress.notify_one();
            (i, status)
        }
    }));
    let crash = async {
        while answered.get() < 5 {
            progress.notified().await;
        }
        cluster.instances[0].crash();
    };
    let (answers, ()) = futures::join!(storm, crash);
    let cut = answers.iter().filter(|(_, status)| *status == 0).count();
    eprintln!("payments cut by the crash: {cut} of {}", USERS / 3);
    assert!(
        answers.iter().all(|(i, status)| *status == 201 || (i % 3 == 0 && *status == 0)),
        "survivors pay every payment they get: {answers:?}"
    );

    // Clients retry what got no answer, with the same key, on a survivor: once the dead
    // instance's leases run out, each is paid, or replayed if it had committed. Until then
    // its reservation's lock is still held (409 PAYMENT_IN_PROGRESS) or its point lock
    // (waited for).
    for (i, _) in answers.iter().filter(|(_, status)| *status == 0) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let mut response = pay(*i, bases[1]).await.expect("answered");
            let status = response.status().as_u16();
            let body = response.body().await.unwrap_or_default();
            if status == 201 {
                break;
            }
            assert!(
                status == 409 || status == 429 || status == 503,
                "a retry of payment {i}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            assert!(std::time::Instant::now() < deadline, "payment {i} never went through");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Exactly once, everywhere: every seat SOLD once, one payment, one CONFIRMED
    // reservation and one USE row per user, every balance down by the price once.
    let db = sea_orm::Database::connect(cluster.direct_database_url()).await.expect("db");
    let n = i64::try_from(USERS).expect("small");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM seats WHERE status = 'SOLD'").await, n);
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM payments").await, n);
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM reservations WHERE status = 'CONFIRMED'").await, n);
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM point_history WHERE kind = 'USE'").await, n);
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM point_accounts WHERE balance <> 100000 - 1000").await,
        0,
        "every balance paid once"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM (SELECT user_id FROM payments GROUP BY user_id HAVING COUNT(*) <> 1) AS twice"
        )
        .await,
        0
    );
    db.close().await.ok();
    cluster.shut_down().await;
}
