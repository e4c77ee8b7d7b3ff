-- The users whose decisions have been pending for at least a given age, on Redis's clock.
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] the age (ms).
-- Returns user, decision id, user, decision id, ... in no particular order. Pending decisions are the few on their way
-- to MySQL (at most the campaign's quantity), so one HGETALL reads them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local entries = redis.call('HGETALL', KEYS[3])
local out = {}
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local bar = string.find(value, '|', 1, true)
  if bar and tonumber(string.sub(value, bar + 1)) <= cutoff then
    out[#out + 1] = entries[i]
    out[#out + 1] = string.sub(value, 1, bar - 1)
  end
end
return out
