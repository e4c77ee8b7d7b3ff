//! What a hostile or unlucky client must not be able to leave behind: a hold or a payment
//! whose client hangs up right after sending still releases its locks, lifts its seat
//! map's write mark and (a payment) ends its queue token; a storm of fresh idempotency
//! keys leaves no lock state in Redis.

use std::time::{Duration, Instant};

use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, RedisConnections};
use e2e::booking::{AsFan as _, admitted_users, call, env, open_schedule, seat_statuses};
use e2e::{Cluster, ClusterOptions, client};
use fred::prelude::{ClientLike as _, KeysInterface as _, SortedSetsInterface as _};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

/// How long the tests wait for the server's work to settle: far longer than it takes.
const SETTLE: Duration = Duration::from_secs(90);

/// Keys of the shared Redis matching `pattern`.
async fn keys(redis: &RedisConnections, pattern: &str) -> Vec<String> {
    redis.pool.next().custom(fred::cmd!("KEYS"), vec![pattern.to_owned()]).await.expect("KEYS")
}

/// Sends `POST {path}` with `headers` and `body` to `base` over a raw connection, then
/// resets the connection (`SO_LINGER` 0) `after` the last byte: a client that hangs up
/// without waiting for the answer (what the server does with the request is up to it).
async fn send_and_hang_up(base: &str, path: &str, headers: &[(&str, &str)], body: &str, after: Duration) {
    let address = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address).await.expect("connected");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = stream;
    stream.write_all(request.as_bytes()).await.expect("sent");
    stream.flush().await.expect("flushed");
    // The client's own behaviour, not a wait for the server: it gives up this soon.
    tokio::time::sleep(after).await;
    stream.set_zero_linger().expect("SO_LINGER");
    drop(stream);
}

#[actix_web::test]
async fn holds_and_payments_whose_clients_hang_up_right_after_sending_still_end_their_work() {
    const PAYERS: usize = 30;
    let prefix = format!("e2e-{}:", uuid::Uuid::new_v4().simple());
    let mut env = env(1_000);
    env.push(("CACHE_PREFIX".into(), prefix.clone()));
    env.extend(e2e::owned(e2e::PATIENT_LOCKS));
    let cluster =
        Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let bases: Vec<&str> = (0..3).map(|i| cluster.url(i)).collect();
    let schedule = open_schedule(&http, bases[0], 1_000).await.expect("a date");
    let users = admitted_users(&http, &bases, PAYERS + 1).await.expect("admitted users");
    let observer = (&users[PAYERS].0, users[PAYERS].1.as_str());
    let mut reservations = Vec::with_capacity(PAYERS);
    for (i, (user, token)) in users[..PAYERS].iter().enumerate() {
        let base = bases[i % 3];
        let (status, body) = call(
            http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(user),
            Some(json!({"amount": 10_000})),
        )
        .await
        .expect("answered");
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(
            http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token),
            Some(json!({"scheduleId": schedule, "seatNumber": i + 1})),
        )
        .await
        .expect("answered");
        assert_eq!(status, 201, "{body}");
        reservations.push(body["id"].as_str().expect("id").to_owned());
    }

    let redis = RedisConnections::connect(&test_support::redis_url().await, 1, DEFAULT_COMMAND_TIMEOUT)
        .await
        .expect("redis");
    let marks_key = format!("{prefix}cache:seats:{{{schedule}}}:w");

    // Holds whose clients hang up: each one that committed lifts its seat map's write mark
    // all the same. A mark left standing would last the lock's longest hold plus a lease
    // (over two minutes here), far past the wait below. (Each of these users then holds two
    // seats of the date, within the default limit of four.)
    futures::future::join_all(users[..15].iter().enumerate().map(|(i, (user, token))| {
        let body = json!({"scheduleId": schedule, "seatNumber": 31 + i}).to_string();
        let base = bases[i % 3];
        let bearer = format!("Bearer {}", user.access);
        async move {
            send_and_hang_up(
                base,
                "/api/v1/reservations",
                &[("Authorization", bearer.as_str()), ("Queue-Token", token.as_str())],
                &body,
                Duration::from_millis(u64::try_from(i * i * 4).expect("small")),
            )
            .await;
        }
    }))
    .await;
    let deadline = Instant::now() + SETTLE / 2;
    loop {
        // The locks themselves; each seat's fencing counter stays (with its expiry).
        let seat_locks: Vec<String> = keys(&redis, &format!("lock:{{seat:{schedule}:*"))
            .await
            .into_iter()
            .filter(|key| !key.ends_with(":fence"))
            .collect();
        let marks: i64 = redis.pool.zcard(&marks_key).await.expect("ZCARD");
        if seat_locks.is_empty() && marks == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after hung-up holds: {marks} write marks and seat locks {seat_locks:?} still standing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held_now = seat_statuses(&http, bases[1], observer, &schedule)
        .await
        .expect("seat map")
        .iter()
        .filter(|(number, status)| (31..46).contains(number) && status == "HELD")
        .count();
    eprintln!("{held_now} of 15 holds went through before their clients hung up");
    assert!(held_now > 0, "no hold got through before its client hung up: the holds tested nothing");

    // Every payer sends its payment and resets the connection within a few milliseconds.
    futures::future::join_all(users[..PAYERS].iter().zip(&reservations).enumerate().map(
        |(i, ((user, token), reservation))| {
            let body = json!({"reservationId": reservation}).to_string();
            let base = bases[i % 3];
            let bearer = format!("Bearer {}", user.access);
            async move {
                send_and_hang_up(
                    base,
                    "/api/v1/payments",
                    &[("Authorization", bearer.as_str()), ("Queue-Token", token.as_str())],
                    &body,
                    // From at once to most of a second: the early ones are cut before or
                    // during the payment, the late ones surely after its commit (so the
                    // test has paid seats to check on however slow the machine).
                    Duration::from_millis(u64::try_from(i * i).expect("small")),
                )
                .await;
            }
        },
    ))
    .await;

    // Settled: no payment holds a lock any more, and every paid seat's token is spent.
    // Without the payment running to its end, a hang-up between the commit and the
    // token's expiry leaves a paid token ACTIVE for good.
    let deadline = Instant::now() + SETTLE;
    let (sold, still_active) = loop {
        let mut locked = 0;
        for reservation in &reservations {
            locked += keys(&redis, &format!("lock:{{reservation:{reservation}}}")).await.len();
        }
        for (user, _) in &users[..PAYERS] {
            locked += keys(&redis, &format!("lock:{{point:{}}}", user.id)).await.len();
        }
        let seats = seat_statuses(&http, bases[0], observer, &schedule).await.expect("seat map");
        let mut sold = 0;
        let mut still_active = Vec::new();
        for (i, (user, token)) in users[..PAYERS].iter().enumerate() {
            let seat = u64::try_from(i + 1).expect("small");
            if seats.iter().any(|(number, status)| *number == seat && status == "SOLD") {
                sold += 1;
                let (status, view) = call(
                    http.get(format!("{}/api/v1/queue/tokens/me", bases[i % 3])).bearer(user).queue(token),
                    None,
                )
                .await
                .expect("answered");
                if status == 200 && view["status"] == "ACTIVE" {
                    still_active.push(token.clone());
                }
            }
        }
        if locked == 0 && still_active.is_empty() {
            break (sold, still_active);
        }
        if Instant::now() > deadline {
            break (sold, still_active);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(still_active.is_empty(), "paid tokens still ACTIVE: {still_active:?} ({sold} seats sold)");
    assert!(sold > 0, "no payment got through before its client hung up: the test tested nothing");
    // The mark is lifted before the token is expired, in the same task: none is left.
    let marks: i64 = redis.pool.zcard(format!("{prefix}cache:seats:{{{schedule}}}:w")).await.expect("ZCARD");
    assert_eq!(marks, 0, "write marks left standing on the seat map");
    eprintln!("{sold} of {PAYERS} payments went through before their clients hung up");
    redis.quit().await;
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_storm_of_new_idempotency_keys_leaves_no_lock_state_behind() {
    let cluster =
        Cluster::start_with(2, &ClusterOptions::with_env(e2e::PATIENT_LOCKS)).await.expect("cluster");
    let http = client();
    let fan = e2e::booking::sign_up(&http, cluster.url(0), "kim").await.expect("a user");
    let user = fan.id.as_str();

    // 350 charges, each with a new key: the first 100 are applied, the other 250 refused
    // by the balance limit (1,000,000,000).
    let mut applied = 0;
    let mut refused = 0;
    for chunk in (0..350).collect::<Vec<usize>>().chunks(25) {
        let answers = futures::future::join_all(chunk.iter().map(|i| {
            let request = http
                .post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(*i)))
                .bearer(&fan)
                .insert_header(("Idempotency-Key", format!("storm-{i}")));
            call(request, Some(json!({"amount": 10_000_000})))
        }))
        .await;
        for answer in answers {
            match answer.expect("answered") {
                (200, _) => applied += 1,
                (409, body) if body["code"] == "BALANCE_LIMIT_EXCEEDED" => refused += 1,
                (status, body) => panic!("unexpected answer {status}: {body}"),
            }
        }
    }
    assert_eq!((applied, refused), (100, 250));

    let redis = RedisConnections::connect(&test_support::redis_url().await, 1, DEFAULT_COMMAND_TIMEOUT)
        .await
        .expect("redis");
    // Every request has answered, so every lock is released: the idempotency locks are
    // unfenced and leave nothing; the account's lock leaves one counter, with an expiry.
    let idem = keys(&redis, &format!("lock:{{idem:{user}:*")).await;
    assert!(idem.is_empty(), "{} idempotency lock keys left, e.g. {:?}", idem.len(), idem.first());
    let point = keys(&redis, &format!("lock:{{point:{user}}}*")).await;
    assert_eq!(point, vec![format!("lock:{{point:{user}}}:fence")], "the account's lock state");
    let ttl: i64 = redis.pool.pttl(&point[0]).await.expect("PTTL");
    assert!(ttl > 0, "the fencing counter has no expiry (PTTL {ttl})");
    redis.quit().await;
    cluster.shut_down().await;
}

async fn concert_ids(http: &awc::Client, base: &str) -> Vec<String> {
    let (status, body) = call(http.get(format!("{base}/api/v1/concerts")), None).await.expect("answered");
    assert_eq!(status, 200, "{body}");
    body.as_array().expect("concerts").iter().map(|c| c["id"].as_str().expect("id").to_owned()).collect()
}

#[actix_web::test]
async fn a_database_dropped_and_created_again_under_its_name_lists_its_own_concerts() {
    // The demo seed, on both lives of the database; the cache prefix is the database's name,
    // so the second life meets the first one's cached concert list in Redis.
    let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    let options = ClusterOptions { database_name: Some(name), ..ClusterOptions::default() };
    let http = client();
    let first = Cluster::start_with(2, &options).await.expect("cluster");
    let before = concert_ids(&http, first.url(0)).await;
    assert_eq!(before.len(), 3, "the demo concerts: {before:?}");
    // Cached now, on both instances' path.
    assert_eq!(concert_ids(&http, first.url(1)).await, before);
    first.shut_down().await; // drops the database

    let second = Cluster::start_with(2, &options).await.expect("cluster");
    for i in 0..2 {
        let after = concert_ids(&http, second.url(i)).await;
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(
            after.iter().all(|id| !before.contains(id)),
            "the concerts of the dropped database are still listed: {after:?} (before: {before:?})"
        );
    }
    second.shut_down().await;
}
