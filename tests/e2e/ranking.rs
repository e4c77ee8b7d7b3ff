//! The popular-concert ranking over two instances: seats paid through either instance are
//! counted (through the outbox) and ranked most first; when Redis loses the ranking it is
//! rebuilt from MySQL to the same answer; a bad limit is a 400 naming `limit`.

use std::time::{Duration, Instant};

use e2e::booking::{AsFan as _, Fan, admitted_users, call, env, open_schedule};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::{Value, json};

use super::{assert_problem, send};

/// The only concert listed that is not in `known`.
async fn newest_concert(http: &awc::Client, base: &str, known: &[String]) -> String {
    let (status, body) = call(http.get(format!("{base}/api/v1/concerts")), None).await.expect("an answer");
    assert_eq!(status, 200, "{body}");
    let new: Vec<String> = body
        .as_array()
        .expect("concerts")
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .filter(|id| !known.contains(id))
        .collect();
    assert_eq!(new.len(), 1, "{body}");
    new[0].clone()
}

/// Charges `user`, holds `seat` of `schedule` and pays for it, on `base`.
async fn buy(http: &awc::Client, base: &str, (user, token): (&Fan, &str), schedule: &str, seat: i64) {
    let (status, body) = call(
        http.post(format!("{base}/api/v1/users/{}/points/charge", user.id)).bearer(user),
        Some(json!({"amount": 10_000})),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 200, "charge: {body}");
    let (status, hold) = call(
        http.post(format!("{base}/api/v1/reservations")).bearer(user).queue(token),
        Some(json!({"scheduleId": schedule, "seatNumber": seat})),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 201, "hold: {hold}");
    let (status, paid) = call(
        http.post(format!("{base}/api/v1/payments")).bearer(user).queue(token),
        Some(json!({"reservationId": hold["id"]})),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 201, "payment: {paid}");
}

/// The ranking as `(concertId, title, reservations)`.
async fn ranking(http: &awc::Client, base: &str) -> Vec<(String, String, u64)> {
    let (status, body) =
        call(http.get(format!("{base}/api/v1/concerts/ranking?limit=10")), None).await.expect("an answer");
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .expect("a list")
        .iter()
        .map(|entry: &Value| {
            (
                entry["concertId"].as_str().expect("concertId").to_owned(),
                entry["title"].as_str().expect("title").to_owned(),
                entry["reservations"].as_u64().expect("reservations"),
            )
        })
        .collect()
}

/// Asks every instance in turn until one answers `expected`, for up to a minute.
async fn until_ranked(http: &awc::Client, cluster: &Cluster, expected: &[(String, String, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut asked = 0;
    loop {
        let got = ranking(http, cluster.url(asked)).await;
        if got == expected {
            return;
        }
        asked += 1;
        assert!(Instant::now() < deadline, "the ranking is {got:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client of the tests' shared Redis.
async fn redis() -> fred::clients::Client {
    use fred::prelude::ClientLike as _;
    let url = test_support::redis_url().await;
    let redis = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).expect("url"))
        .build()
        .expect("client");
    redis.init().await.expect("Redis answers");
    redis
}

/// The ranking's keys under `prefix` in Redis.
async fn ranking_keys(redis: &fred::clients::Client, prefix: &str) -> Vec<String> {
    fred::prelude::ClientLike::custom(redis, fred::cmd!("KEYS"), vec![format!("{prefix}ranking:*")])
        .await
        .expect("KEYS")
}

#[actix_web::test]
async fn paid_seats_are_ranked_and_the_ranking_redis_lost_is_rebuilt_from_mysql() {
    use fred::prelude::KeysInterface as _;
    // The ranking's keys go under CACHE_PREFIX: one of its own, to find (and lose) them.
    let prefix = format!("e2e-rank-{}:", uuid::Uuid::new_v4().simple());
    let mut env = env(100);
    env.extend([
        ("CACHE_PREFIX".to_owned(), prefix.clone()),
        ("PAYMENT_EVENTS_STREAM".to_owned(), format!("e2e:{}:payments", uuid::Uuid::new_v4().simple())),
        ("OUTBOX_RELAY_INTERVAL_MS".to_owned(), "50".to_owned()),
    ]);
    let cluster =
        Cluster::start_with(2, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let http = client();
    let bases = [cluster.url(0), cluster.url(1)];

    // No payment yet: an empty ranking (built from an empty MySQL).
    assert_eq!(ranking(&http, bases[0]).await, Vec::new());
    let fans = admitted_users(&http, &bases, 4).await.expect("admitted users");
    let a_date = open_schedule(&http, bases[0], 1_000).await.expect("a date of A");
    let a = newest_concert(&http, bases[0], &[]).await;
    let b_date = open_schedule(&http, bases[1], 1_000).await.expect("a date of B");
    let b = newest_concert(&http, bases[1], std::slice::from_ref(&a)).await;

    // Three seats of A and one of B, through both instances (each payment ends its
    // buyer's queue token: one buyer per seat).
    for (i, (fan, token)) in fans.iter().enumerate() {
        let (date, seat) = if i < 3 { (&a_date, i64::try_from(i).expect("small") + 1) } else { (&b_date, 1) };
        buy(&http, bases[i % 2], (fan, token), date, seat).await;
    }

    let expected = vec![(a.clone(), "Storm Night".to_owned(), 3), (b.clone(), "Storm Night".to_owned(), 1)];
    until_ranked(&http, &cluster, &expected).await;

    // Redis loses the ranking (a flush, a restart without persistence).
    let redis = redis().await;
    let keys = ranking_keys(&redis, &prefix).await;
    assert!(keys.iter().any(|key| key.ends_with(":built")), "no built marker among {keys:?}");
    let deleted: i64 = redis.del(keys.clone()).await.expect("DEL");
    assert_eq!(usize::try_from(deleted).expect("a count"), keys.len());

    // Rebuilt from MySQL, to the same answer, and marked built again.
    until_ranked(&http, &cluster, &expected).await;
    let rebuilt = ranking_keys(&redis, &prefix).await;
    assert!(rebuilt.iter().any(|key| key.ends_with(":built")), "not rebuilt in Redis: {rebuilt:?}");

    // A bad limit names it; no payment or rebuild is needed to say so.
    for bad in ["0", "101", "x", "", "-1", "1.5"] {
        let answer = send(http.get(format!("{}/api/v1/concerts/ranking?limit={bad}", bases[1])), None).await;
        assert_problem(&answer, 400, "VALIDATION_FAILED", Some("limit"));
    }
    // HEAD answers as GET would, without a body; the edges of the limit are fine.
    let mut head = http.head(format!("{}/api/v1/concerts/ranking", bases[0])).send().await.expect("answered");
    assert_eq!(head.status().as_u16(), 200);
    assert!(head.body().await.expect("body").is_empty());
    let (status, one) = call(http.get(format!("{}/api/v1/concerts/ranking?limit=1", bases[0])), None)
        .await
        .expect("answered");
    assert_eq!((status, one.as_array().map(Vec::len)), (200, Some(1)), "{one}");
    assert_eq!(one[0]["concertId"], a.as_str());
    let (status, _) = call(http.get(format!("{}/api/v1/concerts/ranking?limit=100", bases[1])), None)
        .await
        .expect("answered");
    assert_eq!(status, 200);

    let _ = fred::prelude::ClientLike::quit(&redis).await;
    cluster.shut_down().await;
}
