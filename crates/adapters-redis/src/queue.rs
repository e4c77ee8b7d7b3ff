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

const PRELUDE: &str = r"
local K = KEYS
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function parse(rec)
  local s, u, q, i, e = string.match(rec, '^(%a)|([^|]*)|(%d+)|(%d+)|(%d+)$')
  return s, u, tonumber(q), tonumber(i), tonumber(e)
end
local function forget(token, user)
  redis.call('ZREM', K[2], token)
  redis.call('ZREM', K[3], token)
  redis.call('ZREM', K[4], token)
  redis.call('HDEL', K[5], token)
  if user and redis.call('HGET', K[6], user) == token then
    redis.call('HDEL', K[6], user)
  end
end
-- {token, user, status, position, expires, rate} of a live token, or false.
local function describe(token, now, idle, touch)
  local rec = redis.call('HGET', K[5], token)
  if not rec then return false end
  local s, u, q, i, e = parse(rec)
  local rate = redis.call('GET', K[9]) or '0'
  if s == 'A' then
    if e <= now then return false end
    return {token, u, 'ACTIVE', 0, e, rate}
  end
  local seen = redis.call('ZSCORE', K[3], token)
  if (not seen) or tonumber(seen) < now - idle then return false end
  local rank = redis.call('ZRANK', K[2], token)
  if not rank then return false end
  -- Marking a token seen is a sorted-set write; once per tenth of the idle timeout is
  -- plenty, and keeps a status call a read in all other cases.
  if touch and tonumber(seen) < now - idle / 10 then redis.call('ZADD', K[3], now, token) end
  return {token, u, 'WAITING', rank + 1, 0, rate}
end
";

const ISSUE_LUA: &str = r"
-- ARGV: new token, user, idle ms
local now = now_ms()
local idle = tonumber(ARGV[3])
local existing = redis.call('HGET', K[6], ARGV[2])
if existing then
  local d = describe(existing, now, idle, true)
  if d then d[7] = 0; return d end
  forget(existing, ARGV[2])
end
local seq = redis.call('INCR', K[1])
redis.call('ZADD', K[2], seq, ARGV[1])
redis.call('ZADD', K[3], now, ARGV[1])
redis.call('HSET', K[5], ARGV[1], 'W|' .. ARGV[2] .. '|' .. seq .. '|' .. now .. '|0')
redis.call('HSET', K[6], ARGV[2], ARGV[1])
local d = describe(ARGV[1], now, idle, false)
d[7] = 1
return d
";

const STATES_LUA: &str = r"
-- ARGV: idle ms, token...
local now = now_ms()
local idle = tonumber(ARGV[1])
local out = {}
for n = 2, #ARGV do
  out[n - 1] = describe(ARGV[n], now, idle, true)
end
return out
";

const ADMIT_LUA: &str = r"
-- ARGV: idle ms, max active, batch (0: max-active policy), interval ms, lifetime ms,
--       rate window ms, cleanup batch, most admitted per step
local now = now_ms()
local idle, max_active, batch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval, lifetime, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cleanup = tonumber(ARGV[7])
for _, t in ipairs(redis.call('ZRANGEBYSCORE', K[4], '-inf', now, 'LIMIT', 0, cleanup)) do
  local rec = redis.call('HGET', K[5], t)
  local u = nil
  if rec then local _; _, u = parse(rec) end
  forget(t, u)
end
local abandoned = redis.call('ZRANGEBYSCORE', K[3], '-inf', '(' .. (now - idle), 'LIMIT', 0, cleanup)
for _, t in ipairs(abandoned) do
  local rec = redis.call('HGET', K[5], t)
  local u = nil
  if rec then local _; _, u = parse(rec) end
  forget(t, u)
end
-- Fewer than a full batch abandoned: every waiting token left is live, and admission need
-- not look at when each was last seen.
local all_live = #abandoned < cleanup
local room = math.min(max_active - redis.call('ZCARD', K[4]), tonumber(ARGV[8]))
if batch > 0 then
  -- One batch per interval, whichever instance comes first. The mark advances by whole
  -- intervals, so batches keep their cadence however the steps' timing jitters, and a
  -- long pause skips intervals instead of piling up batches.
  local last = tonumber(redis.call('GET', K[7]) or '0')
  if now < last + interval then
    room = 0
  else
    redis.call('SET', K[7], last + interval * math.floor((now - last) / interval))
    room = math.min(room, batch)
  end
end
-- Admit the head of the line with a handful of variadic commands (not a few per token):
-- a step of 1,000 costs about as much as a step of one, per command. Active entries are
-- written before the tokens leave the line, so a script failing half-way (scripts do not
-- roll back) cannot lose a token. Abandoned tokens met at the head (more went idle than
-- the cleanup above removes per step) are dropped, and the batch is topped up from the
-- line, a few rounds at most.
local admitted = 0
local function each_chunk(list, f)
  for i = 1, #list, 1000 do
    f({unpack(list, i, math.min(i + 999, #list))})
  end
end
local rounds = 0
while room - admitted > 0 and rounds < 4 do
  rounds = rounds + 1
  local head = redis.call('ZRANGE', K[2], 0, room - admitted - 1)
  if #head == 0 then break end
  local stale = now - idle
  local recs = redis.call('HMGET', K[5], unpack(head))
  local seens = {}
  if not all_live then seens = redis.call('ZMSCORE', K[3], unpack(head)) end
  local expires = now + lifetime
  local scored, records, gone = {}, {}, {}
  for n, t in ipairs(head) do
    local rec = recs[n]
    local live = rec and (all_live or tonumber(seens[n] or '0') >= stale)
    -- A waiting record is 'W|user|seq|issued|0': the active one swaps the first and last
    -- fields (no pattern matching per token).
    if live and string.sub(rec, 1, 2) == 'W|' and string.sub(rec, -2) == '|0' then
      scored[#scored + 1] = expires
      scored[#scored + 1] = t
      records[#records + 1] = t
      records[#records + 1] = 'A' .. string.sub(rec, 2, -2) .. expires
      admitted = admitted + 1
    else
      gone[#gone + 1] = t
      if rec then
        local _, u = parse(rec)
        if redis.call('HGET', K[6], u) == t then redis.call('HDEL', K[6], u) end
      end
    end
  end
  for i = 1, #scored, 2000 do
    redis.call('ZADD', K[4], unpack(scored, i, math.min(i + 1999, #scored)))
    redis.call('HSET', K[5], unpack(records, i, math.min(i + 1999, #records)))
  end
  redis.call('ZREMRANGEBYRANK', K[2], 0, #head - 1)
  each_chunk(head, function(chunk) redis.call('ZREM', K[3], unpack(chunk)) end)
  each_chunk(gone, function(chunk) redis.call('HDEL', K[5], unpack(chunk)) end)
end
if admitted > 0 then
  redis.call('LPUSH', K[8], now .. ':' .. admitted)
  redis.call('LTRIM', K[8], 0, 255)
end
-- The rate over the window: what was admitted after the oldest step in it, over the time
-- since that step (its own admissions happened at its start); a single step counts over
-- at least one interval, so it does not look infinitely fast.
local sum, oldest, oldest_n, steps = 0, now, 0, 0
for _, e in ipairs(redis.call('LRANGE', K[8], 0, -1)) do
  local ts, n = string.match(e, '^(%d+):(%d+)$')
  ts, n = tonumber(ts), tonumber(n)
  if ts >= now - window then
    sum = sum + n
    steps = steps + 1
    if ts <= oldest then oldest, oldest_n = ts, n end
  end
end
local rate = 0
if steps >= 2 and now > oldest then
  rate = (sum - oldest_n) * 1000 / (now - oldest)
elseif steps == 1 then
  rate = sum * 1000 / math.max(now - oldest, interval)
end
redis.call('SET', K[9], string.format('%.6f', rate))
return {admitted, redis.call('ZCARD', K[4]), redis.call('ZCARD', K[2])}
";

const EXPIRE_LUA: &str = r"
-- ARGV: token
local rec = redis.call('HGET', K[5], ARGV[1])
if not rec then return 0 end
local _, u = parse(rec)
forget(ARGV[1], u)
return 1
";

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
