-- Open a rebuild of the window, unless the ranking is built: clear the window's buckets,
-- seen sets, cached top and parked recordings, and hold the rebuild's token, so
-- that every recording from now until the rebuild finishes is parked.
-- KEYS[1] built marker, KEYS[2] rebuild token, KEYS[3] parked recordings, KEYS[4] the
-- cached top, KEYS[5..] the window's buckets and seen sets.
-- ARGV[1] the token, ARGV[2] how long the rebuild may take (ms).
-- Returns 1, or 0 when the ranking is built (nothing changed).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', unpack(KEYS, 3))
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
