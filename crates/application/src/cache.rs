//! The cache port: cache-aside, values stored as JSON text.
//!
//! The cache is an optimisation, never a source of truth: the typed helpers here turn a
//! value that does not deserialize into a miss, and callers treat [`CacheError`] as a miss
//! too (log it, count it, read from the database). Locks, on the contrary, fail closed.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A key-value cache shared by every instance.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CachePort: Send + Sync {
    /// The JSON text stored under `key`, if any and not expired.
    ///
    /// # Errors
    /// [`CacheError::Unavailable`] when the cache cannot be reached.
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError>;

    /// Stores `json` under `key` for `ttl` (rounded up to whole milliseconds).
    ///
    /// # Errors
    /// [`CacheError::Unavailable`] when the cache cannot be reached;
    /// [`CacheError::InvalidTtl`] for a zero TTL.
    async fn set(&self, key: &str, json: String, ttl: Duration) -> Result<(), CacheError>;

    /// Removes `key`; removing an absent key is not an error.
    ///
    /// # Errors
    /// [`CacheError::Unavailable`] when the cache cannot be reached.
    async fn delete(&self, key: &str) -> Result<(), CacheError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("a cache entry needs a TTL above zero")]
    InvalidTtl,
    #[error("the value under {key} is not the JSON expected")]
    Undecodable {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the cache is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

/// Reads `key` and decodes it as `T`.
///
/// # Errors
/// [`CacheError::Undecodable`] when the stored text is not a `T` (an old format after a
/// deploy, say); callers treat it like a miss. [`CacheError::Unavailable`] as
/// [`CachePort::get`].
pub async fn get_json<T: DeserializeOwned>(
    cache: &dyn CachePort,
    key: &str,
) -> Result<Option<T>, CacheError> {
    let Some(text) = cache.get(key).await? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| CacheError::Undecodable { key: key.to_owned(), source })
}

/// Encodes `value` as JSON and stores it under `key` for `ttl`.
///
/// # Errors
/// As [`CachePort::set`]; a value that cannot be encoded is [`CacheError::Undecodable`].
pub async fn set_json<T: Serialize + Sync>(
    cache: &dyn CachePort,
    key: &str,
    value: &T,
    ttl: Duration,
) -> Result<(), CacheError> {
    let text = serde_json::to_string(value)
        .map_err(|source| CacheError::Undecodable { key: key.to_owned(), source })?;
    cache.set(key, text, ttl).await
}
