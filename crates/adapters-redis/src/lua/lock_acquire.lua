-- Acquire a lock.
-- KEYS[1] lock key; KEYS[2] its fencing counter, for fenced keys only.
-- ARGV[1] owner token, ARGV[2] lease (ms), ARGV[3] how long the counter outlives its last
-- acquisition (ms).
-- Answers {1, fencing number} when acquired (0 for an unfenced key), or {0, the holder's
-- remaining lease in ms} when another token holds it.
local fenced = #KEYS == 2
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  -- Ours already: this is a replay of an attempt whose answer was lost (the client
  -- resends commands after a reconnection). Same acquisition, same fencing number.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if fenced then
    return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
  end
  return {1, 0}
end
if holder then
  return {0, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not fenced then
  return {1, 0}
end
-- max(last + 1, now in microseconds): strictly above every number handed out before,
-- whether the counter is still here or expired (or was lost with a restart) meanwhile,
-- as long as the clock did not step back further than the time since. Microseconds
-- since 1970 stay below 2^53, so Lua's doubles hold them exactly.
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = math.max(last + 1, micros)
redis.call('SET', KEYS[2], string.format('%.0f', fence), 'PX', ARGV[3])
return {1, fence}
