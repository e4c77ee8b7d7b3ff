//! Integration tests of the Redis adapters against a real Redis (`TEST_REDIS_URL`, or a
//! testcontainers Redis). Every test uses keys under its own random prefix.

mod cache;
mod cache_failover;
mod coupons;
mod events;
mod lock;
mod queue;
mod quorum;
mod ranking;

use adapters_redis::connection::RedisConnections;

async fn connect() -> RedisConnections {
    let url = test_support::redis_url().await;
    RedisConnections::connect(&url, 4, adapters_redis::connection::DEFAULT_COMMAND_TIMEOUT)
        .await
        .expect("Redis is reachable")
}

/// Every key matching `pattern`, with `KEYS` on every node: a cluster spreads keys over
/// its masters, and a `KEYS` sent to one answers for that one only.
async fn keys_everywhere(pool: &fred::clients::Pool, pattern: &str) -> Vec<String> {
    use fred::prelude::ClientLike as _;
    let client = pool.next();
    if !client.is_clustered() {
        return client.custom(fred::cmd!("KEYS"), vec![pattern.to_owned()]).await.expect("KEYS");
    }
    let mut nodes = client.active_connections();
    nodes.sort_by_key(ToString::to_string);
    nodes.dedup();
    let mut keys = Vec::new();
    for node in nodes {
        let found: Vec<String> = client
            .with_cluster_node(node)
            .custom(fred::cmd!("KEYS"), vec![pattern.to_owned()])
            .await
            .expect("KEYS");
        keys.extend(found);
    }
    keys
}
