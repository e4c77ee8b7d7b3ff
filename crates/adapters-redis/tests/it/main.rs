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
