-- The prelude of every queue script (queue.rs prepends it to each body): helpers only.
-- KEYS: the queue's nine keys, in this order (queue.rs, `RedisQueue::new`):
--   KEYS[1] seq, KEYS[2] waiting, KEYS[3] seen, KEYS[4] active, KEYS[5] tokens,
--   KEYS[6] users, KEYS[7] slot, KEYS[8] log, KEYS[9] rate
--   (`forget` touches 2-6; `describe` reads 2, 3, 5, 9 and may write 3).
-- ARGV: none read here (each body reads its own).
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
