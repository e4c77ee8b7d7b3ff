//! `CachePort` on Redis: plain string values (JSON text) with a millisecond TTL.

use std::time::Duration;

use application::cache::{CacheError, CachePort};
use async_trait::async_trait;
use fred::clients::Pool;
use fred::prelude::{Expiration, KeysInterface};

/// A cache in one Redis, keys optionally under a prefix (tests use one each).
#[derive(Clone, Debug)]
pub struct RedisCache {
    pool: Pool,
    prefix: String,
}

impl RedisCache {
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self::with_prefix(pool, String::new())
    }

    #[must_use]
    pub fn with_prefix(pool: Pool, prefix: String) -> Self {
        Self { pool, prefix }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn unavailable(error: fred::error::Error) -> CacheError {
    CacheError::Unavailable(anyhow::Error::new(error).context("Redis cache command failed"))
}

#[async_trait]
impl CachePort for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.pool.get(self.key(key)).await.map_err(unavailable)
    }

    async fn set(&self, key: &str, json: String, ttl: Duration) -> Result<(), CacheError> {
        if ttl.is_zero() {
            return Err(CacheError::InvalidTtl);
        }
        // Round up so a sub-millisecond TTL is not an (invalid) zero.
        let millis = i64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX);
        self.pool
            .set::<(), _, _>(self.key(key), json, Some(Expiration::PX(millis)), None, false)
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.pool.del::<i64, _>(self.key(key)).await.map(drop).map_err(unavailable)
    }
}
