-- Issue (after queue_prelude.lua): a new WAITING token, or the user's live one.
-- KEYS: the queue's nine keys (see queue_prelude.lua); uses 1 seq, 2 waiting, 3 seen,
--   4 active, 5 tokens, 6 users, 9 rate.
-- ARGV[1] new token, ARGV[2] user, ARGV[3] idle ms.
-- Returns the `describe` array plus [7]: 1 when created now, 0 for the user's live token.
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
