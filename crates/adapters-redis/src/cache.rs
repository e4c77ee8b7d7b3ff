//! `CachePort` on Redis: a version key and an entry key per cached answer, each operation
//! one Lua script (atomic, one round trip).
//!
//! Keys of one answer share a hash tag, so every script touches one slot of a Redis
//! Cluster: `cache:{name}:{<id>}:v` (the version), `...:e` (the entry, `<version>:<json>`),
//! `...:l` (the load claim).
//!
//! Versions: a missing version key is started at Redis's clock in microseconds, so a
//! version lost to eviction or expiry starts again above every version it had (an entry
//! stored under an old version can never look current); an invalidation increments it.
//! The version key outlives any entry (7 days, renewed by each invalidation).

use std::time::Duration;

use application::cache::{CacheError, CacheKey, CachePort, CacheRead};
use async_trait::async_trait;
use fred::clients::Pool;
use fred::prelude::KeysInterface;
use fred::types::Value;
use fred::types::scripts::Script;

/// How long a version key lives without an invalidation; far above any entry's TTL.
const VERSION_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Starts the version key when missing. Leaves `v` set.
const START_VERSION: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  local t = redis.call('TIME')
  v = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[1], v, 'PX', ARGV[1])
end
";

/// KEYS: version, entry. ARGV: version TTL ms, the caller's version or ''.
/// Returns {v} when v is the caller's, {v, json, pttl} for a current entry, {v, 0} else.
const READ: &str = r"
if v == ARGV[2] then return {v} end
local e = redis.call('GET', KEYS[2])
if e then
  local sep = string.find(e, ':', 1, true)
  if sep and string.sub(e, 1, sep - 1) == v then
    return {v, string.sub(e, sep + 1), redis.call('PTTL', KEYS[2])}
  end
end
return {v, 0}
";

/// KEYS: version, entry. ARGV: version TTL ms, version, json, ttl ms. 1 if stored.
const STORE: &str = r"
if v ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2] .. ':' .. ARGV[3], 'PX', ARGV[4])
return 1
";

/// KEYS: version, entry. ARGV: version TTL ms.
const INVALIDATE: &str = r"
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
";

/// KEYS: claim. ARGV: token.
const RELEASE_CLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A cache in one Redis (or a cluster), keys optionally under a prefix (tests use one each).
#[derive(Clone, Debug)]
pub struct RedisCache {
    pool: Pool,
    prefix: String,
    read: Script,
    store: Script,
    invalidate: Script,
    release_claim: Script,
}

impl RedisCache {
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self::with_prefix(pool, String::new())
    }

    #[must_use]
    pub fn with_prefix(pool: Pool, prefix: String) -> Self {
        let versioned = |body: &str| Script::from_lua(format!("{START_VERSION}{body}"));
        Self {
            pool,
            prefix,
            read: versioned(READ),
            store: versioned(STORE),
            invalidate: versioned(INVALIDATE),
            release_claim: Script::from_lua(RELEASE_CLAIM),
        }
    }

    /// The Redis key of `key` with `suffix` (`v`, `e`, `l`).
    #[must_use]
    pub fn redis_key(&self, key: &CacheKey, suffix: &str) -> String {
        format!("{}cache:{}:{{{}}}:{suffix}", self.prefix, key.name(), key.id())
    }

    fn pair(&self, key: &CacheKey) -> Vec<String> {
        vec![self.redis_key(key, "v"), self.redis_key(key, "e")]
    }

    async fn run(&self, script: &Script, keys: Vec<String>, args: Vec<String>) -> Result<Value, CacheError> {
        script.evalsha_with_reload(self.pool.next(), keys, args).await.map_err(unavailable)
    }
}

fn unavailable(error: fred::error::Error) -> CacheError {
    CacheError::Unavailable(anyhow::Error::new(error).context("Redis cache command failed"))
}

fn millis(duration: Duration) -> String {
    // Round up, so that a sub-millisecond TTL is not an (invalid) zero.
    duration.as_nanos().div_ceil(1_000_000).max(1).to_string()
}

fn malformed(what: &str) -> CacheError {
    CacheError::Unavailable(anyhow::anyhow!("unexpected reply from a cache script: {what}"))
}

fn version_of(value: Option<&Value>) -> Result<u64, CacheError> {
    value.and_then(Value::as_string).and_then(|v| v.parse().ok()).ok_or_else(|| malformed("version"))
}

#[async_trait]
impl CachePort for RedisCache {
    async fn read(&self, key: &CacheKey, known: Option<u64>) -> Result<CacheRead, CacheError> {
        let known = known.map(|v| v.to_string()).unwrap_or_default();
        let reply =
            self.run(&self.read, self.pair(key), vec![millis(VERSION_TTL), known]).await?.into_array();
        let version = version_of(reply.first())?;
        match reply.len() {
            1 => Ok(CacheRead::Unchanged { version }),
            3 => {
                let json = reply[1].as_string().ok_or_else(|| malformed("entry"))?;
                let ttl_left = reply[2].as_u64().map_or(Duration::ZERO, Duration::from_millis);
                Ok(CacheRead::Entry { version, json, ttl_left })
            }
            _ => Ok(CacheRead::Missing { version }),
        }
    }

    async fn store(
        &self,
        key: &CacheKey,
        version: u64,
        json: String,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        let reply = self
            .run(
                &self.store,
                self.pair(key),
                vec![millis(VERSION_TTL), version.to_string(), json, millis(ttl)],
            )
            .await?;
        Ok(reply.as_i64() == Some(1))
    }

    async fn invalidate(&self, key: &CacheKey) -> Result<(), CacheError> {
        self.run(&self.invalidate, self.pair(key), vec![millis(VERSION_TTL)]).await.map(drop)
    }

    async fn claim_load(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<bool, CacheError> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let set: Option<String> = self
            .pool
            .set(
                self.redis_key(key, "l"),
                token.to_string(),
                Some(fred::types::Expiration::PX(ms)),
                Some(fred::types::SetOptions::NX),
                false,
            )
            .await
            .map_err(unavailable)?;
        Ok(set.is_some())
    }

    async fn release_load(&self, key: &CacheKey, token: u64) -> Result<(), CacheError> {
        self.run(&self.release_claim, vec![self.redis_key(key, "l")], vec![token.to_string()]).await.map(drop)
    }
}
