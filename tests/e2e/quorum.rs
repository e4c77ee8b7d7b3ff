//! The quorum lock (`REDIS_LOCK_NODES`) behind the whole service: three instances taking
//! their locks on three private Redis nodes.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::time::Duration;

use e2e::booking::{AsFan as _, sign_up};
use e2e::{Cluster, ClusterOptions, PrivateRedis, client};
use tokio::sync::Notify;

use super::send;

#[actix_web::test]
async fn charges_stay_exact_on_a_quorum_lock_with_a_node_lost_mid_storm_and_fail_closed_without_a_majority() {
    const CHARGES: usize = 200;
    let mut nodes: Vec<PrivateRedis> = (0..3).map(|_| PrivateRedis::start().expect("redis-server")).collect();
    let urls: Vec<String> = nodes.iter().map(PrivateRedis::url).collect();
    let mut options = ClusterOptions::with_env(e2e::PATIENT_LOCKS);
    options.env.push(("REDIS_LOCK_NODES".into(), urls.join(",")));
    // A node slower than its timeout counts as down: with one node killed, the two left
    // must both answer in time, so the timeout gets room for a loaded machine (the
    // product's 250 ms is for a healthy network, not a busy debug build).
    options.env.push(("LOCK_NODE_TIMEOUT_MS".into(), "2000".into()));
    let cluster = Cluster::start_with(3, &options).await.expect("cluster");
    let http = client();
    let fan = sign_up(&http, cluster.url(0), "quorum").await.expect("a user");
    let user = fan.id.as_str();
    let charge = |i: usize| {
        http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i)))
            .bearer(&fan)
            .insert_header(("content-type", "application/json"))
    };

    // A storm of charges on one account; a lock node dies a quarter of the way in.
    let answered = Cell::new(0_usize);
    let progress = Notify::new();
    let storm = futures::future::join_all((0..CHARGES).map(|i| {
        let request = charge(i);
        let (answered, progress) = (&answered, &progress);
        async move {
            let answer = request.send_body(r#"{"amount": 10}"#).await;
            answered.set(answered.get() + 1);
            progress.notify_one();
            answer.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    }));
    let node_loss = async {
        while answered.get() < CHARGES / 4 {
            progress.notified().await;
        }
        nodes[0].kill();
    };
    let (answers, ()) = futures::join!(storm, node_loss);
    let refused: Vec<_> = answers.iter().filter(|status| **status != 200).collect();
    assert!(refused.is_empty(), "a minority of nodes down must not refuse a charge: {refused:?}");

    // Exactly once each, in order, whichever instance and whichever majority served it.
    let history = send(
        http.get(format!("{}/api/v1/users/{user}/points/history?limit=1000", cluster.url(1))).bearer(&fan),
        None,
    )
    .await;
    let entries = history.2.as_array().expect("a list");
    assert_eq!(entries.len(), CHARGES);
    let steps = i64::try_from(CHARGES).expect("small");
    let afters: BTreeSet<i64> =
        entries.iter().map(|e| e["balanceAfter"].as_i64().expect("balanceAfter")).collect();
    assert_eq!(afters, (1..=steps).map(|n| n * 10).collect(), "each charge saw the one before");

    // A second node down: no majority, so no lock and no write: 503 with Retry-After.
    nodes[1].kill();
    let mut refused = charge(2).send_body(r#"{"amount": 10}"#).await.expect("an answer");
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.expect("a problem");
    assert_eq!(body["code"], "SERVICE_UNAVAILABLE", "{body}");

    // A node returns (empty): the instances take locks again by themselves.
    nodes[1].restart().expect("restarted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = charge(0).send_body(r#"{"amount": 10}"#).await.map(|r| r.status().as_u16()).unwrap_or(0);
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "charges still refused ({status}) after a node returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let balance =
        send(http.get(format!("{}/api/v1/users/{user}/points", cluster.url(1))).bearer(&fan), None).await;
    assert_eq!(balance.2["balance"], (steps + 1) * 10, "only the charge that succeeded was applied");
    cluster.shut_down().await;
}
