use e2e::{Cluster, ClusterOptions, PrivateRedis, client};

use super::{assert_problem, send};

#[actix_web::test]
async fn with_redis_gone_charges_fail_closed_reads_go_on_and_readiness_names_redis() {
    let mut redis = PrivateRedis::start().expect("a private redis-server");
    let options = ClusterOptions { redis_url: Some(redis.url()), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let created = send(http.post(format!("{base}/api/v1/users")), Some(r#"{"name": "kim"}"#)).await;
    let user = created.2["id"].as_str().expect("id").to_owned();
    let charge = format!("{base}/api/v1/users/{user}/points/charge");
    assert_eq!(send(http.post(&charge), Some(r#"{"amount": 100}"#)).await.0.as_u16(), 200);

    redis.kill();
    assert!(!redis.answers());

    // No lock, no write: the charge is refused as unavailable, and nothing changes.
    let refused = send(http.post(&charge), Some(r#"{"amount": 100}"#)).await;
    assert_problem(&refused, 503, "SERVICE_UNAVAILABLE", None);
    let balance = send(http.get(format!("{base}/api/v1/users/{user}/points")), None).await;
    assert_eq!(balance.2["balance"], 100, "reads do not need Redis: {}", balance.2);
    let history = send(http.get(format!("{base}/api/v1/users/{user}/points/history")), None).await;
    assert_eq!(history.2.as_array().map(Vec::len), Some(1));
    let ready = send(http.get(format!("{base}/health/ready")), None).await;
    assert_problem(&ready, 503, "NOT_READY", None);
    assert_eq!(ready.2["checks"]["redis"], "DOWN");
    assert_eq!(ready.2["checks"]["mysql"], "UP");
    assert_eq!(send(http.get(format!("{base}/health/live")), None).await.0.as_u16(), 200);
    cluster.shut_down().await;
}

#[actix_web::test]
async fn an_instance_crashing_mid_storm_loses_no_point_and_makes_none_up() {
    use std::cell::Cell;
    use std::collections::BTreeSet;

    use tokio::sync::Notify;

    // A short lease, so the locks the crashed instance held free up well within the
    // survivors' 3 s wait.
    let options =
        ClusterOptions { env: vec![("LOCK_LEASE_MS".into(), "1000".into())], ..ClusterOptions::default() };
    let cluster = Cluster::start_with(3, &options).await.expect("cluster");
    let http = client();
    let created =
        send(http.post(format!("{}/api/v1/users", cluster.url(1))), Some(r#"{"name": "crash"}"#)).await;
    let user = created.2["id"].as_str().expect("id").to_owned();
    let answered = Cell::new(0_usize);
    let progress = Notify::new();

    let storm = futures::future::join_all((0..300).map(|i| {
        let request = http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i)));
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
    let history =
        send(http.get(format!("{}/api/v1/users/{user}/points/history?limit=1000", cluster.url(1))), None)
            .await;
    let entries = history.2.as_array().expect("a list");
    let applied = i64::try_from(entries.len()).expect("small");
    assert!(entries.len() >= ok && entries.len() <= 300, "{} applied, {ok} answered", entries.len());
    let balance = send(http.get(format!("{}/api/v1/users/{user}/points", cluster.url(2))), None).await;
    assert_eq!(balance.2["balance"], applied * 10);
    let afters: BTreeSet<i64> =
        entries.iter().map(|e| e["balanceAfter"].as_i64().expect("balanceAfter")).collect();
    assert_eq!(afters, (1..=applied).map(|n| n * 10).collect(), "each charge saw the one before");

    // And the survivors go on.
    let after = send(
        http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(1))),
        Some(r#"{"amount": 10}"#),
    )
    .await;
    assert_eq!(after.0.as_u16(), 200, "{}", after.2);
    assert_eq!(after.2["balance"], (applied + 1) * 10);
    cluster.shut_down().await;
}
