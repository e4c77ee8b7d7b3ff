-- Raise a fencing counter to at least a floor (a quorum lock writing back the number it
-- handed out). Never lowers it.
-- KEYS[1] the fencing counter; ARGV[1] the floor, ARGV[2] how long the counter outlives its
-- last acquisition (ms).
-- Returns 1 when raised, 0 when it already was at least the floor.
local floor = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= floor then
  return 0
end
redis.call('SET', KEYS[1], string.format('%.0f', floor), 'PX', ARGV[2])
return 1
