-- Begin write (after cache_clock.lua): bumps the version and marks a write.
-- KEYS[1] version, KEYS[2] entry, KEYS[3] write marks.
-- ARGV[1] version TTL ms, ARGV[2] token, ARGV[3] mark ttl ms.
bump()
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms - 1)
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[3]), ARGV[2])
-- The set lives as long as its latest mark (never shortened by a writer with a shorter
-- TTL than an earlier one's).
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], last[2])
return 1
