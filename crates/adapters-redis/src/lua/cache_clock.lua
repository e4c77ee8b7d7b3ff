-- The prelude of the clocked cache scripts (cache.rs prepends it): Redis's clock,
-- `writing()` and `bump()`.
-- KEYS[1] version, KEYS[2] entry, KEYS[3] write marks.
-- ARGV[1] version TTL ms (read by `bump`); each body documents the rest.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function writing()
  return redis.call('ZCOUNT', KEYS[3], now_ms, '+inf') > 0
end
local function bump()
  local v = tonumber(redis.call('GET', KEYS[1]) or '0')
  local next = now_us
  if v + 1 > next then next = v + 1 end
  redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', ARGV[1])
  redis.call('DEL', KEYS[2])
end
