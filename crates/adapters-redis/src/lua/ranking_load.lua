-- Load one batch of a rebuild: each payment MySQL counted, once, in the bucket of its
-- hour; on the last batch, replay the parked recordings (those MySQL counted are in the
-- seen sets already, and change nothing) and mark the ranking built.
-- KEYS[1] built marker, KEYS[2] rebuild token, KEYS[3] parked recordings, KEYS[4..] the
-- window's buckets and seen sets (the payments counted), in pairs, oldest hour first.
-- ARGV[1] the token, ARGV[2] the window's first hour (hours since 1970), ARGV[3] '1' on
-- the last batch, ARGV[4] when the marker expires (unix s), ARGV[5] how long an hour's
-- keys outlive its start (s), ARGV[6..] payments as triples: hour, concert id, payment id.
-- Returns 1, or 0 when the rebuild is no longer this token's (it ran out, or another
-- began): nothing changed then.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local first = tonumber(ARGV[2])
local hours = (#KEYS - 3) / 2
local kept = tonumber(ARGV[5])
local function count(hour, concert, payment)
  local i = hour - first
  -- An hour outside the window is not read by anyone: left out.
  if i < 0 or i >= hours then return end
  local bucket, seen = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  if redis.call('SADD', seen, payment) == 1 then
    redis.call('ZINCRBY', bucket, 1, concert)
    local expires = string.format('%.0f', hour * 3600 + kept)
    redis.call('EXPIREAT', bucket, expires)
    redis.call('EXPIREAT', seen, expires)
  end
end
for i = 6, #ARGV, 3 do
  count(tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2])
end
if ARGV[3] ~= '1' then return 1 end
local parked = redis.call('HGETALL', KEYS[3])
for i = 1, #parked, 2 do
  local hour, concert = string.match(parked[i + 1], '^(%-?%d+) (%S+)$')
  if hour then count(tonumber(hour), concert, parked[i]) end
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[1], '1')
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return 1
