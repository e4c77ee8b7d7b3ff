-- Read (after cache_clock.lua).
-- KEYS[1] version, KEYS[2] entry, KEYS[3] write marks.
-- ARGV[1] version TTL ms, ARGV[2] the caller's version or ''.
-- {'w'} while a write is marked; {'u', v} when v is the caller's; {'e', v, json, pttl}
-- for the current entry; {'m', v} else (v = '0' when there is no version yet).
if writing() then return {'w'} end
local v = redis.call('GET', KEYS[1])
if not v then return {'m', '0'} end
if v == ARGV[2] then return {'u', v} end
local e = redis.call('GET', KEYS[2])
if e then
  local sep = string.find(e, ':', 1, true)
  if sep and string.sub(e, 1, sep - 1) == v then
    return {'e', v, string.sub(e, sep + 1), redis.call('PTTL', KEYS[2])}
  end
end
return {'m', v}
