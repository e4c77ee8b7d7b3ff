-- Store (after cache_clock.lua).
-- KEYS[1] version, KEYS[2] entry, KEYS[3] write marks.
-- ARGV[1] version TTL ms, ARGV[2] version, ARGV[3] json, ARGV[4] ttl ms.
-- The version stored under, or 0 when refused.
if writing() then return 0 end
local v = redis.call('GET', KEYS[1])
if not v then
  if ARGV[2] ~= '0' then return 0 end
  v = string.format('%.0f', now_us)
  redis.call('SET', KEYS[1], v, 'PX', ARGV[1])
elseif v ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[2], v .. ':' .. ARGV[3], 'PX', ARGV[4])
return v
