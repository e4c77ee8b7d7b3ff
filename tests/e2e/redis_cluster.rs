//! The whole service on a Redis Cluster (three masters on loopback, started by
//! `deploy/redis-cluster.sh`): the lock's, the cache's and the queue's scripts run there
//! under a storm, so a key of another slot in any of them would fail it with CROSSSLOT.
//! (The coupon gate's and the ranking's scripts run on a cluster in the adapter suite,
//! `tests/on-redis-cluster.sh`.)

use std::collections::BTreeSet;

use e2e::booking::{AsFan as _, admitted_users, call, env, open_schedule, seat_statuses, sign_up};
use e2e::{Cluster, ClusterOptions, ScriptedRedis, client};
use serde_json::json;

use super::send;

#[actix_web::test]
async fn charges_and_holds_stay_exact_over_three_instances_on_a_redis_cluster() {
    const CHARGES: usize = 150;
    let redis = ScriptedRedis::cluster().expect("a three-master Redis Cluster");
    let mut env = env(1_000);
    env.extend(e2e::owned(e2e::PATIENT_LOCKS));
    let options =
        ClusterOptions { redis_url: Some(redis.url().to_owned()), env, ..ClusterOptions::default() };
    let cluster = Cluster::start_with(3, &options).await.expect("three instances on the cluster");
    let http = client();

    // Charges of one account from three instances: one lock key, its fence and its release
    // channel in one slot, hand-offs announced by sharded pub/sub.
    let fan = sign_up(&http, cluster.url(0), "cluster").await.expect("a user");
    let user = fan.id.as_str();
    let answers =
        futures::future::join_all(
            (0..CHARGES).map(|i| {
                let request = http
                    .post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i)))
                    .bearer(&fan)
                    .insert_header(("content-type", "application/json"));
                async move {
                    request.send_body(r#"{"amount": 10}"#).await.map(|r| r.status().as_u16()).unwrap_or(0)
                }
            }),
        )
        .await;
    assert!(answers.iter().all(|status| *status == 200), "{answers:?}");
    let history = send(
        http.get(format!("{}/api/v1/users/{user}/points/history?limit=1000", cluster.url(2))).bearer(&fan),
        None,
    )
    .await;
    let entries = history.2.as_array().expect("a list");
    let afters: BTreeSet<i64> =
        entries.iter().map(|e| e["balanceAfter"].as_i64().expect("balanceAfter")).collect();
    let steps = i64::try_from(CHARGES).expect("small");
    assert_eq!(afters, (1..=steps).map(|n| n * 10).collect(), "each charge saw the one before");

    // Queue tokens (one slot for the whole line), then three racers per seat over twenty
    // seats (seat locks spread over the masters), the seat map cached on every instance.
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let racers = admitted_users(&http, &bases, 60).await.expect("admitted through the queue");
    let schedule = open_schedule(&http, cluster.url(0), 10_000).await.expect("a date");
    let caller = (&racers[0].0, racers[0].1.as_str());
    for base in &bases {
        let map = seat_statuses(&http, base, caller, &schedule).await.expect("the map");
        assert!(map.iter().all(|(_, status)| status == "AVAILABLE"));
    }
    let holds = futures::future::join_all(racers.iter().enumerate().map(|(i, (racer, token))| {
        let seat = i % 20 + 1;
        let request = http.post(format!("{}/api/v1/reservations", cluster.url(i))).bearer(racer).queue(token);
        let schedule = schedule.as_str();
        async move {
            let (status, _) = call(request, Some(json!({"scheduleId": schedule, "seatNumber": seat})))
                .await
                .expect("answered");
            (seat, status)
        }
    }))
    .await;
    assert!(holds.iter().all(|(_, status)| *status == 201 || *status == 409), "{holds:?}");
    let mut winners = [0_u32; 21];
    for (seat, status) in &holds {
        if *status == 201 {
            winners[*seat] += 1;
        }
    }
    assert_eq!(&winners[1..], &[1; 20], "each seat is won exactly once");
    // Held at once on every instance: the cache's version check runs on the cluster too.
    for base in &bases {
        let map = seat_statuses(&http, base, caller, &schedule).await.expect("the map");
        let held: Vec<u64> = map.iter().filter(|(_, s)| s == "HELD").map(|(n, _)| *n).collect();
        assert_eq!(held, (1..=20).collect::<Vec<_>>(), "on {base}");
    }
    cluster.shut_down().await;
    drop(redis);
}
