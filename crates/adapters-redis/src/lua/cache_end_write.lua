-- End write (after cache_clock.lua): bumps the version and drops the write's mark.
-- KEYS[1] version, KEYS[2] entry, KEYS[3] write marks.
-- ARGV[1] version TTL ms, ARGV[2] token.
bump()
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
