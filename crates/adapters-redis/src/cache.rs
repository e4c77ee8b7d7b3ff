//! `CachePort` on Redis: per cached answer a version key, an entry key, a sorted set of
//! write marks and a load claim; each operation is one Lua script (atomic, one round
//! trip), with Redis's clock as the only clock.
//!
//! The keys of one answer share a hash tag, so every script touches one slot of a Redis
//! Cluster: `cache:{name}:{<id>}:v` (the version), `...:e` (the entry,
//! `<version>:<json>`), `...:w` (write marks: token scored by when it runs out), `...:l`
//! (the load claim).
//!
//! Versions: reads never create one (an id that does not exist leaves nothing behind); a
//! store creates it only if still missing; every write moves it to `max(v + 1, now in
//! microseconds)`, so a version lost to a failover or an eviction never comes back to a
//! value an entry was stored under. It lives 7 days past the last write, far longer than
//! any entry.

use std::time::Duration;

use application::cache::{CacheError, CacheKey, CachePort, CacheRead};
use async_trait::async_trait;
use fred::clients::Pool;
use fred::prelude::{KeysInterface, ServerInterface};
use fred::types::Value;
use fred::types::scripts::Script;

/// How long a version key lives after the last write; far above any entry's TTL.
const VERSION_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

// The scripts live in `lua/` beside this file, each opening with its KEYS and ARGV.

/// Redis's clock, and whether a write is marked on KEYS[3] now; the clocked scripts below
/// run after it (`RedisCache::with_prefix` joins them).
const CLOCK: &str = include_str!("lua/cache_clock.lua");

/// KEYS: version, entry, marks. ARGV: version TTL ms, the caller's version or ''.
/// {'w'} while a write is marked; {'u', v} when v is the caller's; {'e', v, json, pttl}
/// for the current entry; {'m', v} else (v = '0' when there is no version yet).
const READ: &str = include_str!("lua/cache_read.lua");

/// KEYS: version, entry, marks. ARGV: version TTL ms, version, json, ttl ms.
/// The version stored under, or 0 when refused.
const STORE: &str = include_str!("lua/cache_store.lua");

/// KEYS: version, entry, marks. ARGV: version TTL ms, token, mark ttl ms.
const BEGIN_WRITE: &str = include_str!("lua/cache_begin_write.lua");

/// KEYS: version, entry, marks. ARGV: version TTL ms, token.
const END_WRITE: &str = include_str!("lua/cache_end_write.lua");

/// KEYS: claim. ARGV: token. Standalone (no clock).
const RELEASE_CLAIM: &str = include_str!("lua/cache_release_claim.lua");

/// How many replicas must have a write mark before the write may go on, and how long to
/// wait for them ([`RedisCache::with_replica_acks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaAcks {
    pub replicas: u32,
    pub timeout: Duration,
}

/// A cache in one Redis (or a cluster), keys optionally under a prefix (tests use one each).
#[derive(Clone, Debug)]
pub struct RedisCache {
    pool: Pool,
    prefix: String,
    acks: Option<ReplicaAcks>,
    read: Script,
    store: Script,
    begin_write: Script,
    end_write: Script,
    release_claim: Script,
}

impl RedisCache {
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self::with_prefix(pool, String::new())
    }

    #[must_use]
    pub fn with_prefix(pool: Pool, prefix: String) -> Self {
        let clocked = |body: &str| Script::from_lua(format!("{CLOCK}{body}"));
        Self {
            pool,
            prefix,
            acks: None,
            read: clocked(READ),
            store: clocked(STORE),
            begin_write: clocked(BEGIN_WRITE),
            end_write: clocked(END_WRITE),
            release_claim: Script::from_lua(RELEASE_CLAIM),
        }
    }

    /// Makes every write mark wait until `acks.replicas` replicas have it (`WAIT`), and
    /// fail (so that the write is refused, 503) when fewer had it within `acks.timeout`.
    ///
    /// Why: Redis replicates asynchronously. A mark (with its version bump and eviction)
    /// that the master acknowledged but no replica received is lost when a replica is
    /// promoted; the write then commits in MySQL while the new master still holds the entry
    /// from before it, and serves it as current until it runs out. With the mark on the
    /// replica first, the promoted node has it. The mark's lift needs no wait: a lift lost in
    /// a failover leaves the mark in place, and reads bypass the cache until it runs out.
    /// `replicas` of 0 means no wait.
    #[must_use]
    pub fn with_replica_acks(mut self, acks: ReplicaAcks) -> Self {
        self.acks = (acks.replicas > 0).then_some(acks);
        self
    }

    /// The Redis key of `key` with `suffix` (`v`, `e`, `w`, `l`).
    #[must_use]
    pub fn redis_key(&self, key: &CacheKey, suffix: &str) -> String {
        format!("{}cache:{}:{{{}}}:{suffix}", self.prefix, key.name(), key.id())
    }

    pub(crate) fn keys(&self, key: &CacheKey) -> Vec<String> {
        vec![self.redis_key(key, "v"), self.redis_key(key, "e"), self.redis_key(key, "w")]
    }

    async fn run(&self, script: &Script, keys: Vec<String>, args: Vec<String>) -> Result<Value, CacheError> {
        crate::slots::debug_check(&keys);
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
            self.run(&self.read, self.keys(key), vec![millis(VERSION_TTL), known]).await?.into_array();
        match reply.first().and_then(Value::as_string).as_deref() {
            Some("w") => Ok(CacheRead::Writing),
            Some("u") => Ok(CacheRead::Unchanged { version: version_of(reply.get(1))? }),
            Some("e") => Ok(CacheRead::Entry {
                version: version_of(reply.get(1))?,
                json: reply.get(2).and_then(Value::as_string).ok_or_else(|| malformed("entry"))?,
                ttl_left: reply.get(3).and_then(Value::as_u64).map_or(Duration::ZERO, Duration::from_millis),
            }),
            Some("m") => Ok(CacheRead::Missing { version: version_of(reply.get(1))? }),
            _ => Err(malformed("read")),
        }
    }

    async fn store(
        &self,
        key: &CacheKey,
        version: u64,
        json: String,
        ttl: Duration,
    ) -> Result<Option<u64>, CacheError> {
        let reply = self
            .run(
                &self.store,
                self.keys(key),
                vec![millis(VERSION_TTL), version.to_string(), json, millis(ttl)],
            )
            .await?;
        Ok(reply.as_string().and_then(|v| v.parse::<u64>().ok()).filter(|v| *v != 0))
    }

    async fn begin_write(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<(), CacheError> {
        // WAIT counts the writes of its own connection: the mark and the wait go on one.
        let client = self.pool.next();
        crate::slots::debug_check(&self.keys(key));
        self.begin_write
            .evalsha_with_reload::<Value, _, _>(
                client,
                self.keys(key),
                vec![millis(VERSION_TTL), token.to_string(), millis(ttl)],
            )
            .await
            .map_err(unavailable)?;
        let Some(acks) = self.acks else { return Ok(()) };
        let timeout_ms = i64::try_from(acks.timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        let node = crate::slots::routed_to(client, &self.redis_key(key, "w"));
        let acked: i64 = node.wait(i64::from(acks.replicas), timeout_ms).await.map_err(unavailable)?;
        if acked < i64::from(acks.replicas) {
            metrics::counter!("cache_replica_ack_failures_total").increment(1);
            return Err(CacheError::Unavailable(anyhow::anyhow!(
                "a write mark reached {acked} of {} replicas within {:?}",
                acks.replicas,
                acks.timeout
            )));
        }
        Ok(())
    }

    async fn end_write(&self, key: &CacheKey, token: u64) -> Result<(), CacheError> {
        self.run(&self.end_write, self.keys(key), vec![millis(VERSION_TTL), token.to_string()])
            .await
            .map(drop)
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
