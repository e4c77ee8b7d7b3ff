//! `RankingStore` on Redis: the popular-concert ranking's hourly counts, one Lua script
//! per step (atomic, one round trip). See `docs/ranking.md`.
//!
//! Every key shares the hash tag `{concerts}`, so every script touches one slot of a Redis
//! Cluster; every key a script touches is passed in `KEYS`. `<h>` is an hour, counted from
//! 1970 (UTC).
//!
//! | key | type | holds | lives |
//! |---|---|---|---|
//! | `ranking:{concerts}:<h>` | sorted set | concert -> payments paid in hour h | until h leaves the window (25 h after it began) |
//! | `ranking:{concerts}:seen:<h>` | set | the payments counted in hour h | as its bucket |
//! | `ranking:{concerts}:built` | string | the marker: the buckets are complete | until the hour of the rebuild leaves the window |
//! | `ranking:{concerts}:top:<h>` | sorted set | the window ending with h, summed | [`TOP_TTL`] |
//! | `ranking:{concerts}:rebuild` | string | the running rebuild's token | [`REBUILD_TTL`] |
//! | `ranking:{concerts}:parked` | hash | payment -> "<h> <concert>", recorded while a rebuild runs | [`REBUILD_TTL`] |
//!
//! Keys go under a prefix (the deployment's `CACHE_PREFIX`; tests use one each), so that
//! deployments sharing one Redis keep their rankings apart.

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use application::ranking::{
    ConcertCount, Hour, RankingStore, RebuildToken, Recorded, Sale, TOP_TTL, WINDOW_HOURS,
};
use async_trait::async_trait;
use domain::booking::ConcertId;
use fred::clients::Pool;
use fred::types::Value;
use fred::types::scripts::Script;

/// How long a rebuild may take from its opening to its last load: far beyond one query of
/// a day's payments and a few loads. A rebuild past it loads nothing more, and is made
/// again by the next read.
pub const REBUILD_TTL: Duration = Duration::from_secs(60);

/// The most payments one load call carries: a script blocks Redis while it runs, so a
/// large window is loaded in several short calls.
const LOAD_BATCH: usize = 5_000;

/// How long an hour's keys outlive its start: until it leaves the window.
const KEPT_SECONDS: i64 = (WINDOW_HOURS + 1) * 3_600;

// The scripts live in `lua/` beside this file, each opening with its KEYS and ARGV.

/// KEYS: marker, rebuild, parked, bucket, seen. ARGV: payment, concert, hour, expiry
/// (unix s), parked ttl ms. 'counted', 'duplicate', 'parked' or 'unbuilt'.
const RECORD: &str = include_str!("lua/ranking_record.lua");

/// KEYS: marker, top, the window's buckets. ARGV: top ttl ms, limit. {0} when not built,
/// else {1, concert, count, ...}.
const TOP: &str = include_str!("lua/ranking_top.lua");

/// KEYS: marker, rebuild, parked, top, the load window's buckets and seen sets. ARGV:
/// token, ttl ms. 1, or 0 when built.
const BEGIN: &str = include_str!("lua/ranking_begin.lua");

/// KEYS: marker, rebuild, parked, the load window's (bucket, seen) pairs. ARGV: token,
/// first hour, last batch '1', marker expiry (unix s), kept s, then (hour, concert,
/// payment) triples. 1, or 0 when the rebuild is not this token's.
const LOAD: &str = include_str!("lua/ranking_load.lua");

/// The ranking in one Redis (or a cluster), keys optionally under a prefix. Cheap to clone.
#[derive(Clone)]
pub struct RedisRanking {
    pool: Pool,
    prefix: String,
    record: Script,
    top: Script,
    begin: Script,
    load: Script,
}

impl fmt::Debug for RedisRanking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRanking").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl RedisRanking {
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self::with_prefix(pool, String::new())
    }

    #[must_use]
    pub fn with_prefix(pool: Pool, prefix: String) -> Self {
        Self {
            pool,
            prefix,
            record: Script::from_lua(RECORD),
            top: Script::from_lua(TOP),
            begin: Script::from_lua(BEGIN),
            load: Script::from_lua(LOAD),
        }
    }

    /// The Redis key `ranking:{concerts}:<suffix>` under this store's prefix.
    #[must_use]
    pub fn redis_key(&self, suffix: impl fmt::Display) -> String {
        format!("{}ranking:{{concerts}}:{suffix}", self.prefix)
    }

    pub(crate) fn bucket(&self, hour: Hour) -> String {
        self.redis_key(hour.index())
    }

    pub(crate) fn seen(&self, hour: Hour) -> String {
        self.redis_key(format_args!("seen:{}", hour.index()))
    }

    /// The marker, the rebuild's token and the parked recordings: the first keys of the
    /// record, begin and load scripts.
    pub(crate) fn control_keys(&self) -> Vec<String> {
        vec![self.redis_key("built"), self.redis_key("rebuild"), self.redis_key("parked")]
    }

    /// The hours a rebuild clears and loads: the window ending with `now`, and the hour
    /// after it (a payment stamped by an instance whose clock runs a little ahead).
    fn load_window(now: Hour) -> impl Iterator<Item = Hour> {
        now.window().chain(std::iter::once(now.plus(1)))
    }

    pub(crate) fn pairs(&self, now: Hour) -> impl Iterator<Item = String> + '_ {
        Self::load_window(now).flat_map(move |hour| [self.bucket(hour), self.seen(hour)])
    }

    async fn run(&self, script: &Script, keys: Vec<String>, args: Vec<String>) -> anyhow::Result<Value> {
        crate::slots::debug_check(&keys);
        script.evalsha_with_reload(self.pool.next(), keys, args).await.context("Redis ranking command failed")
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

fn malformed(what: &str, reply: &Value) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from a ranking script ({what}): {reply:?}")
}

/// `{1, concert, count, ...}` as counts.
fn counts(reply: Vec<Value>) -> anyhow::Result<Vec<ConcertCount>> {
    let mut counts = Vec::with_capacity(reply.len() / 2);
    for pair in reply.chunks(2) {
        let [member, score] = pair else { anyhow::bail!("a ranking entry without its count") };
        let member = member.as_string().context("a ranked member is not a string")?;
        let concert = uuid::Uuid::try_parse(&member).context("a ranked member is not a UUID")?;
        let score = score.as_string().context("a ranked count is not a string")?;
        let score: f64 =
            score.parse().with_context(|| format!("a ranked count {score:?} is not a number"))?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "whole, positive counts")]
        let reservations = score.max(0.0).round() as u64;
        counts.push(ConcertCount { concert: ConcertId::from_uuid(concert), reservations });
    }
    Ok(counts)
}

#[async_trait]
impl RankingStore for RedisRanking {
    #[tracing::instrument(name = "ranking.redis.record", skip_all, fields(payment = %sale.payment))]
    async fn record(&self, sale: &Sale) -> anyhow::Result<Recorded> {
        let hour = sale.hour();
        let mut keys = self.control_keys();
        keys.extend([self.bucket(hour), self.seen(hour)]);
        let reply = self
            .run(
                &self.record,
                keys,
                vec![
                    sale.payment.to_string(),
                    sale.concert.to_string(),
                    hour.index().to_string(),
                    hour.leaves_window_at().unix_timestamp().to_string(),
                    millis(REBUILD_TTL),
                ],
            )
            .await?;
        match reply.as_string().as_deref() {
            Some("counted") => Ok(Recorded::Counted),
            Some("duplicate") => Ok(Recorded::Duplicate),
            Some("parked") => Ok(Recorded::Parked),
            Some("unbuilt") => Ok(Recorded::Unbuilt),
            _ => Err(malformed("record", &reply)),
        }
    }

    #[tracing::instrument(name = "ranking.redis.top", skip(self))]
    async fn top(&self, now: Hour, limit: u32) -> anyhow::Result<Option<Vec<ConcertCount>>> {
        let mut keys = vec![self.redis_key("built"), self.redis_key(format_args!("top:{}", now.index()))];
        keys.extend(now.window().map(|hour| self.bucket(hour)));
        let reply = self.run(&self.top, keys, vec![millis(TOP_TTL), limit.max(1).to_string()]).await?;
        let mut entries = reply.into_array().into_iter();
        match entries.next().and_then(|built| built.as_i64()) {
            Some(0) => Ok(None),
            Some(1) => counts(entries.collect()).map(Some),
            _ => Err(anyhow::anyhow!("unexpected reply from the ranking's top script")),
        }
    }

    #[tracing::instrument(name = "ranking.redis.begin_rebuild", skip(self))]
    async fn begin_rebuild(&self, now: Hour) -> anyhow::Result<Option<RebuildToken>> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut keys = self.control_keys();
        keys.push(self.redis_key(format_args!("top:{}", now.index())));
        keys.extend(self.pairs(now));
        let reply = self.run(&self.begin, keys, vec![token.clone(), millis(REBUILD_TTL)]).await?;
        match reply.as_i64() {
            Some(1) => Ok(Some(RebuildToken(token))),
            Some(0) => Ok(None),
            _ => Err(malformed("begin", &reply)),
        }
    }

    #[tracing::instrument(name = "ranking.redis.finish_rebuild", skip_all, fields(payments = sales.len()))]
    async fn finish_rebuild(&self, token: &RebuildToken, now: Hour, sales: &[Sale]) -> anyhow::Result<bool> {
        let mut keys = self.control_keys();
        keys.extend(self.pairs(now));
        // One call at least: the last one marks the ranking built, payments or none.
        let batches: Vec<&[Sale]> =
            if sales.is_empty() { vec![sales] } else { sales.chunks(LOAD_BATCH).collect() };
        let count = batches.len();
        for (i, batch) in batches.into_iter().enumerate() {
            let mut args = Vec::with_capacity(5 + 3 * batch.len());
            args.extend([
                token.0.clone(),
                now.window_start().index().to_string(),
                if i + 1 == count { "1" } else { "0" }.to_owned(),
                now.leaves_window_at().unix_timestamp().to_string(),
                KEPT_SECONDS.to_string(),
            ]);
            for sale in batch {
                args.extend([
                    sale.hour().index().to_string(),
                    sale.concert.to_string(),
                    sale.payment.to_string(),
                ]);
            }
            let reply = self.run(&self.load, keys.clone(), args).await?;
            match reply.as_i64() {
                Some(1) => {}
                Some(0) => return Ok(false),
                _ => return Err(malformed("load", &reply)),
            }
        }
        Ok(true)
    }
}
