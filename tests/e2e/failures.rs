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
