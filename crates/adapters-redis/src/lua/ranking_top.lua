-- The top of the window: its buckets added up into the cached top (kept briefly, so that
-- a busy page sums them once per few seconds), then its first entries.
-- KEYS[1] built marker, KEYS[2] the cached top of this window, KEYS[3..] the window's
-- buckets.
-- ARGV[1] how long the cached top is kept (ms), ARGV[2] how many entries (at least 1).
-- Returns {0} when the ranking is not built; else {1, concert, count, concert, count, ...},
-- most first: the first ARGV[2] entries and every entry tied with the last of them (the
-- caller breaks ties by title, which Redis does not know).
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- An empty window stores nothing: the next read sums it again, which costs nothing.
  redis.call('ZUNIONSTORE', KEYS[2], #KEYS - 2, unpack(KEYS, 3))
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
local n = tonumber(ARGV[2])
local last = redis.call('ZREVRANGE', KEYS[2], n - 1, n - 1, 'WITHSCORES')
local entries
if #last == 0 then
  entries = redis.call('ZREVRANGE', KEYS[2], 0, -1, 'WITHSCORES')
else
  entries = redis.call('ZREVRANGEBYSCORE', KEYS[2], '+inf', last[2], 'WITHSCORES')
end
table.insert(entries, 1, 1)
return entries
