//! The waiting queue on Redis: the default adapter.
//!
//! Every key shares one hash tag, `{<name>}`, so every script touches one hash slot and
//! runs unchanged on Redis Cluster; every key a script touches is passed in `KEYS`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{q}:seq` | string | `INCR` sequence: FIFO order, even for tokens issued in one millisecond by several instances |
//! | `{q}:waiting` | sorted set | waiting tokens, scored by sequence; a position is a `ZRANK` (O(log n)) |
//! | `{q}:seen` | sorted set | waiting tokens, scored by when their holder last asked (abandonment) |
//! | `{q}:active` | sorted set | active tokens, scored by expiry |
//! | `{q}:tokens` | hash | token -> `status|user|seq|issued|expires` |
//! | `{q}:users` | hash | user -> live token (idempotent re-issue) |
//! | `{q}:slot` | string | when the last `rate` batch was admitted (ms) |
//! | `{q}:log` | list | `time:count` of recent admissions |
//! | `{q}:rate` | string | admissions per second over the recent window, as of the last step |
//!
//! Each operation is one Lua script, so atomic; every script reads the clock with `TIME`,
//! so all instances share Redis's clock (expiry, abandonment, admission intervals).

use std::time::Duration;

use anyhow::Context as _;
use application::queue::{Issued, QueueConfig, WaitingQueue};
use async_trait::async_trait;
use domain::queue::{Admission, AdmitPolicy, QueueStatus, QueueTokenId, TokenState};
use domain::unavailable::Unavailable;
use domain::user::UserId;
use fred::clients::Pool;
use fred::types::Value;
use fred::types::scripts::Script;
use time::OffsetDateTime;

/// The most expired or abandoned tokens one step cleans up (bounds a step's time).
const CLEANUP_BATCH: u32 = 1_000;
/// The most tokens one step admits: a script blocks Redis while it runs, so a step stays
/// short even when a huge cap frees up at once (the next steps admit the rest).
pub const MAX_ADMIT_PER_STEP: u64 = 5_000;
// The script unpacks a step's tokens into one command: Lua 5.1 in Redis takes about 8,000
// values at most.
const _: () = assert!(MAX_ADMIT_PER_STEP <= 7_000);

// The scripts live in `lua/` beside this file, each opening with its KEYS and ARGV. Every
// body runs after the prelude (`RedisQueue::new` joins them).

/// The helpers every queue script starts with (`now_ms`, `parse`, `forget`, `describe`).
const PRELUDE: &str = include_str!("lua/queue_prelude.lua");

/// A new WAITING token, or the user's live one.
const ISSUE_LUA: &str = include_str!("lua/queue_issue.lua");

/// `describe` of many tokens.
const STATES_LUA: &str = include_str!("lua/queue_states.lua");

/// One admission step: cleanup, admission, the observed rate.
const ADMIT_LUA: &str = include_str!("lua/queue_admit.lua");

/// Ends a token now.
const EXPIRE_LUA: &str = include_str!("lua/queue_expire.lua");

/// The queue on Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisQueue {
    pool: Pool,
    options: QueueConfig,
    keys: Vec<String>,
    issue: Script,
    states: Script,
    admit: Script,
    expire: Script,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue").field("options", &self.options).finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// A queue whose keys all carry the hash tag `{name}` (tests use a unique name).
    #[must_use]
    pub fn new(pool: Pool, name: &str, options: QueueConfig) -> Self {
        let tag = format!("{{{name}}}");
        let keys = ["seq", "waiting", "seen", "active", "tokens", "users", "slot", "log", "rate"]
            .iter()
            .map(|k| format!("{tag}:{k}"))
            .collect();
        let script = |body: &str| Script::from_lua(format!("{PRELUDE}{body}"));
        Self {
            pool,
            keys,
            issue: script(ISSUE_LUA),
            states: script(STATES_LUA),
            admit: script(ADMIT_LUA),
            expire: script(EXPIRE_LUA),
            options,
        }
    }

    /// Every key of this queue (all under its hash tag), e.g. to remove the queue.
    #[must_use]
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    async fn run(&self, script: &Script, args: Vec<String>) -> anyhow::Result<Value> {
        crate::slots::debug_check(&self.keys);
        script.evalsha_with_reload(self.pool.next(), self.keys.clone(), args).await.map_err(|error| {
            anyhow::Error::new(Unavailable { reason: "redis", source: Box::new(error) })
                .context("a queue script failed")
        })
    }

    fn idle_ms(&self) -> String {
        millis(self.options.waiting_idle).to_string()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Reads one `describe` result: `{token, user, status, position, expires, rate}`.
fn token_state(value: Value) -> anyhow::Result<Option<TokenState>> {
    if value.is_null() {
        return Ok(None);
    }
    let fields = value.into_array();
    let text =
        |i: usize| fields.get(i).and_then(Value::as_string).with_context(|| format!("field {i} missing"));
    let number =
        |i: usize| fields.get(i).and_then(Value::as_i64).with_context(|| format!("field {i} missing"));
    let token = QueueTokenId::parse(&text(0)?).context("a stored token is not a UUID")?;
    let user_id = UserId::from_uuid(uuid::Uuid::try_parse(&text(1)?).context("a stored user is not a UUID")?);
    let status = match text(2)?.as_str() {
        "WAITING" => QueueStatus::Waiting,
        "ACTIVE" => QueueStatus::Active,
        other => anyhow::bail!("unknown queue status {other:?}"),
    };
    let position = u64::try_from(number(3)?).ok().filter(|p| *p > 0);
    let expires_ms = number(4)?;
    let expires_at = (expires_ms > 0)
        .then(|| OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires_ms) * 1_000_000))
        .transpose()
        .context("a stored expiry is out of range")?;
    let admissions_per_second = text(5)?.parse::<f64>().unwrap_or(0.0);
    Ok(Some(TokenState { token, user_id, status, position, expires_at, admissions_per_second }))
}

#[async_trait]
impl WaitingQueue for RedisQueue {
    #[tracing::instrument(name = "queue.redis.issue", skip(self))]
    async fn issue(&self, user_id: UserId) -> anyhow::Result<Issued> {
        let candidate = QueueTokenId::generate();
        let reply =
            self.run(&self.issue, vec![candidate.to_string(), user_id.to_string(), self.idle_ms()]).await?;
        let created = matches!(reply.clone().into_array().get(6).and_then(Value::as_i64), Some(1));
        let state = token_state(reply)?.context("a token just issued is not live")?;
        Ok(Issued { state, created })
    }

    async fn state(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>> {
        Ok(self.states(vec![token]).await?.into_iter().next().flatten())
    }

    async fn states(&self, tokens: Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenState>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = Vec::with_capacity(tokens.len() + 1);
        args.push(self.idle_ms());
        args.extend(tokens.iter().map(ToString::to_string));
        let reply = self.run(&self.states, args).await?;
        let states: Vec<Option<TokenState>> =
            reply.into_array().into_iter().map(token_state).collect::<anyhow::Result<_>>()?;
        // `describe` answers `false` (a nil element), never nothing: one answer per token.
        anyhow::ensure!(states.len() == tokens.len(), "{} states for {} tokens", states.len(), tokens.len());
        Ok(states)
    }

    #[tracing::instrument(name = "queue.redis.admit", skip(self))]
    async fn admit(&self) -> anyhow::Result<Admission> {
        // The script decides how many to admit, as `AdmitPolicy::to_admit` and
        // `next_batch_mark` specify: it must, since it reads the active count and the batch
        // mark inside its atomic step. A batch of 0 tells it the policy is `max-active`, so a
        // `rate` batch goes as at least 1 (settings never make a batch of 0).
        let (max_active, batch, interval) = match self.options.policy {
            AdmitPolicy::MaxActive { max_active } => (max_active, 0, self.options.admit_interval),
            AdmitPolicy::Rate { batch, interval, max_active } => (max_active, batch.max(1), interval),
        };
        let reply = self
            .run(
                &self.admit,
                vec![
                    self.idle_ms(),
                    max_active.to_string(),
                    batch.to_string(),
                    millis(interval).max(1).to_string(),
                    millis(self.options.active_lifetime).to_string(),
                    millis(self.options.rate_window).to_string(),
                    CLEANUP_BATCH.to_string(),
                    MAX_ADMIT_PER_STEP.to_string(),
                ],
            )
            .await?;
        let counts: Vec<u64> = reply
            .into_array()
            .iter()
            .map(|v| v.as_i64().and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
            .collect();
        match counts.as_slice() {
            [admitted, active, waiting] => {
                Ok(Admission { admitted: *admitted, active: *active, waiting: *waiting })
            }
            other => anyhow::bail!("unexpected admission reply {other:?}"),
        }
    }

    async fn expire(&self, token: QueueTokenId) -> anyhow::Result<bool> {
        let reply = self.run(&self.expire, vec![token.to_string()]).await?;
        Ok(reply.as_i64() == Some(1))
    }
}
