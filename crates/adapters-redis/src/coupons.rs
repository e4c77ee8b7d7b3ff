//! `CouponGate` on Redis: the fast path of first-come coupons, one Lua script per step
//! that changes more than one key (atomic, one round trip), with Redis's clock as the
//! only clock (the issue window, the age of pending decisions).
//!
//! The keys of one campaign share the hash tag `{<campaignId>}`, so every script touches
//! one slot of a Redis Cluster; every key a script touches is passed in `KEYS`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `coupon:{<id>}:stock` | string | coupons left; missing = the campaign is not loaded |
//! | `coupon:{<id>}:users` | set | users holding a coupon or a pending decision |
//! | `coupon:{<id>}:pending` | hash | user -> when the decision was made (ms, Redis's clock) |
//!
//! The stock is the campaign's marker: a load sets it last, only when missing, so a load
//! never undoes decisions made since, and a decision before it answers `NotLoaded`. All
//! three keys expire a day after issuing closes (set at load and by each issued decision),
//! so Redis does not keep closed campaigns for ever.
//!
//! Redis is never the truth: MySQL refuses a coupon past the quantity or a second one per
//! user. When Redis lost the stock while decisions were pending, the rebuilt stock counts
//! those coupons as free until their inserts commit; a decision issued on that count is
//! refused by MySQL and corrected here ([`CouponGate::sold_out`]).

use std::time::Duration;

use anyhow::Context as _;
use application::coupons::{CouponGate, Decision, GateError};
use async_trait::async_trait;
use domain::coupon::{Campaign, CampaignId, CouponId};
use domain::user::UserId;
use fred::clients::Pool;
use fred::prelude::KeysInterface;
use fred::types::Value;
use fred::types::scripts::Script;
use time::OffsetDateTime;

/// How long a campaign's keys outlive its issue window: the reconciler settles decisions
/// left pending until a minute after the close, far inside a day. After that, a view of
/// the campaign counts its coupons in MySQL.
const KEPT_AFTER_CLOSE: time::Duration = time::Duration::DAY;

/// The most issued users one load call adds: a script blocks Redis while it runs, so a
/// large campaign is loaded in several short calls.
const LOAD_BATCH: usize = 5_000;

// The scripts live in `lua/` beside this file, each opening with its KEYS and ARGV. Each
// takes the campaign's three keys, in `RedisCouponGate::keys` order.

/// ARGV: expiry (unix ms), the stock or '' (all batches but the last), users to add.
/// 1, or 0 when the campaign is loaded already.
const LOAD: &str = include_str!("lua/coupon_load.lua");

/// ARGV: user, opens ms, closes ms, expiry ms. 'closed', 'not_loaded', 'already',
/// 'sold_out' or 'issued'.
const DECIDE: &str = include_str!("lua/coupon_decide.lua");

/// ARGV: user, '1' to keep the user. 1 when given back, 0 when not pending.
const GIVE_BACK: &str = include_str!("lua/coupon_give_back.lua");

/// KEYS: stock, users, pending. ARGV: user, decision id. 1 when it was pending.
const CONFIRM: &str = include_str!("lua/coupon_confirm.lua");

/// ARGV: user. The stock to zero, the user's decision undone.
const SOLD_OUT: &str = include_str!("lua/coupon_sold_out.lua");

/// ARGV: age ms. The users pending for at least that long.
const PENDING: &str = include_str!("lua/coupon_pending.lua");

/// The coupon gate in one Redis (or a cluster), keys optionally under a prefix (tests use
/// one each). Cheap to clone.
#[derive(Clone, Debug)]
pub struct RedisCouponGate {
    pool: Pool,
    prefix: String,
    load: Script,
    decide: Script,
    confirm: Script,
    give_back: Script,
    sold_out: Script,
    pending: Script,
}

impl RedisCouponGate {
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        Self::with_prefix(pool, String::new())
    }

    #[must_use]
    pub fn with_prefix(pool: Pool, prefix: String) -> Self {
        Self {
            pool,
            prefix,
            load: Script::from_lua(LOAD),
            decide: Script::from_lua(DECIDE),
            confirm: Script::from_lua(CONFIRM),
            give_back: Script::from_lua(GIVE_BACK),
            sold_out: Script::from_lua(SOLD_OUT),
            pending: Script::from_lua(PENDING),
        }
    }

    /// The Redis key of `campaign` with `suffix` (`stock`, `users`, `pending`).
    #[must_use]
    pub fn redis_key(&self, campaign: CampaignId, suffix: &str) -> String {
        format!("{}coupon:{{{campaign}}}:{suffix}", self.prefix)
    }

    /// Every key of `campaign` (all under its hash tag), in the order the scripts take
    /// them: stock, users, pending.
    #[must_use]
    pub fn keys(&self, campaign: CampaignId) -> Vec<String> {
        ["stock", "users", "pending"].iter().map(|suffix| self.redis_key(campaign, suffix)).collect()
    }

    async fn run(
        &self,
        script: &Script,
        campaign: CampaignId,
        args: Vec<String>,
    ) -> Result<Value, GateError> {
        let keys = self.keys(campaign);
        crate::slots::debug_check(&keys);
        script.evalsha_with_reload(self.pool.next(), keys, args).await.map_err(unavailable)
    }
}

fn unavailable(error: fred::error::Error) -> GateError {
    GateError::Unavailable(anyhow::Error::new(error).context("Redis coupon command failed"))
}

fn malformed(what: &str, reply: &Value) -> GateError {
    GateError::Unavailable(anyhow::anyhow!("unexpected reply from a coupon script ({what}): {reply:?}"))
}

/// `at` in milliseconds since 1970, as a script argument.
fn unix_ms(at: OffsetDateTime) -> String {
    at.unix_timestamp_nanos().div_euclid(1_000_000).to_string()
}

/// When the keys of `campaign` expire.
fn expiry(campaign: &Campaign) -> String {
    unix_ms(campaign.issue_closes_at.saturating_add(KEPT_AFTER_CLOSE))
}

#[async_trait]
impl CouponGate for RedisCouponGate {
    #[tracing::instrument(
        name = "coupons.redis.load",
        skip_all,
        fields(campaign = %campaign.id, issued = issued.len())
    )]
    async fn load(&self, campaign: &Campaign, issued: &[UserId]) -> Result<(), GateError> {
        let expires = expiry(campaign);
        // The users first, in batches; the stock last. Each call does nothing once the
        // stock exists (another load, or a request that loaded it, got there first).
        for batch in issued.chunks(LOAD_BATCH) {
            let mut args = Vec::with_capacity(batch.len() + 2);
            args.push(expires.clone());
            args.push(String::new());
            args.extend(batch.iter().map(ToString::to_string));
            if self.run(&self.load, campaign.id, args).await?.as_i64() == Some(0) {
                return Ok(());
            }
        }
        let stock = campaign.quantity.saturating_sub(u32::try_from(issued.len()).unwrap_or(u32::MAX));
        self.run(&self.load, campaign.id, vec![expires, stock.to_string()]).await.map(drop)
    }

    #[tracing::instrument(name = "coupons.redis.decide", skip_all, fields(campaign = %campaign.id, %user))]
    async fn decide(
        &self,
        campaign: &Campaign,
        user: UserId,
        decision: CouponId,
    ) -> Result<Decision, GateError> {
        let reply = self
            .run(
                &self.decide,
                campaign.id,
                vec![
                    user.to_string(),
                    unix_ms(campaign.issue_opens_at),
                    unix_ms(campaign.issue_closes_at),
                    expiry(campaign),
                    decision.to_string(),
                ],
            )
            .await?;
        match reply.as_string().as_deref() {
            Some("issued") => Ok(Decision::Issued),
            Some("sold_out") => Ok(Decision::SoldOut),
            Some("already") => Ok(Decision::AlreadyIssued),
            Some("closed") => Ok(Decision::Closed),
            Some("not_loaded") => Ok(Decision::NotLoaded),
            _ => Err(malformed("decide", &reply)),
        }
    }

    async fn confirm(&self, campaign: CampaignId, user: UserId, decision: CouponId) -> Result<(), GateError> {
        self.run(&self.confirm, campaign, vec![user.to_string(), decision.to_string()]).await.map(drop)
    }

    async fn give_back(
        &self,
        campaign: CampaignId,
        user: UserId,
        decision: CouponId,
        keep_user: bool,
    ) -> Result<bool, GateError> {
        let keep = if keep_user { "1" } else { "0" };
        let reply = self
            .run(&self.give_back, campaign, vec![user.to_string(), keep.to_owned(), decision.to_string()])
            .await?;
        match reply.as_i64() {
            Some(given_back) => Ok(given_back == 1),
            None => Err(malformed("give back", &reply)),
        }
    }

    async fn sold_out(
        &self,
        campaign: CampaignId,
        user: UserId,
        decision: CouponId,
    ) -> Result<(), GateError> {
        self.run(&self.sold_out, campaign, vec![user.to_string(), decision.to_string()]).await.map(drop)
    }

    async fn pending(
        &self,
        campaign: CampaignId,
        older_than: Duration,
    ) -> Result<Vec<(UserId, CouponId)>, GateError> {
        let age = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        let reply = self.run(&self.pending, campaign, vec![age.to_string()]).await?;
        let uuid = |value: &Value, what: &str| -> anyhow::Result<uuid::Uuid> {
            let text = value.as_string().with_context(|| format!("a pending {what} is not a string"))?;
            uuid::Uuid::try_parse(&text).with_context(|| format!("a pending {what} is not a UUID"))
        };
        reply
            .into_array()
            .chunks(2)
            .map(|pair| match pair {
                [user, decision] => Ok((
                    UserId::from_uuid(uuid(user, "user")?),
                    CouponId::from_uuid(uuid(decision, "decision")?),
                )),
                _ => Err(anyhow::anyhow!("an odd number of pending entries")),
            })
            .collect::<anyhow::Result<_>>()
            .map_err(GateError::Unavailable)
    }

    async fn remaining(&self, campaign: CampaignId) -> Result<Option<u32>, GateError> {
        let left: Option<i64> =
            self.pool.get(self.redis_key(campaign, "stock")).await.map_err(unavailable)?;
        Ok(left.map(|left| u32::try_from(left.max(0)).unwrap_or(u32::MAX)))
    }
}
