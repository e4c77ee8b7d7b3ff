use std::time::Duration;

use adapters_redis::cache::RedisCache;
use application::cache::{CacheError, CachePort, get_json, set_json};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::connect;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Concert {
    id: u64,
    title: String,
}

async fn cache() -> RedisCache {
    RedisCache::with_prefix(connect().await.pool, test_support::unique_prefix("cache"))
}

#[tokio::test]
async fn a_json_value_round_trips_and_a_missing_key_is_none() {
    let cache = cache().await;
    let concert = Concert { id: 7, title: "Winter Night".into() };

    set_json(&cache, "concerts", &concert, Duration::from_secs(60)).await.expect("set");

    assert_eq!(get_json::<Concert>(&cache, "concerts").await.expect("get"), Some(concert));
    assert_eq!(get_json::<Concert>(&cache, "absent").await.expect("get"), None);
}

#[tokio::test]
async fn a_value_expires_after_its_ttl() {
    let cache = cache().await;
    cache.set("short", "1".into(), Duration::from_millis(100)).await.expect("set");
    assert_eq!(cache.get("short").await.expect("get").as_deref(), Some("1"));

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut gone = false;
    while Instant::now() < deadline {
        if cache.get("short").await.expect("get").is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the value outlived its TTL");
}

#[tokio::test]
async fn delete_removes_a_value_and_tolerates_an_absent_one() {
    let cache = cache().await;
    cache.set("k", "\"v\"".into(), Duration::from_secs(60)).await.expect("set");

    cache.delete("k").await.expect("delete");
    cache.delete("k").await.expect("delete again");

    assert_eq!(cache.get("k").await.expect("get"), None);
}

#[tokio::test]
async fn a_zero_ttl_is_refused() {
    let cache = cache().await;
    let result = cache.set("k", "1".into(), Duration::ZERO).await;
    assert!(matches!(result, Err(CacheError::InvalidTtl)));
}

#[tokio::test]
async fn a_value_of_another_shape_is_reported_undecodable() {
    let cache = cache().await;
    cache.set("old-format", "[1,2,3]".into(), Duration::from_secs(60)).await.expect("set");

    let result = get_json::<Concert>(&cache, "old-format").await;

    assert!(matches!(result, Err(CacheError::Undecodable { .. })));
}
