-- Count one completed payment in the bucket of its hour, once.
-- KEYS[1] built marker, KEYS[2] rebuild token, KEYS[3] parked recordings, KEYS[4] the
-- hour's bucket, KEYS[5] the payments counted in that hour (seen).
-- ARGV[1] payment id, ARGV[2] concert id, ARGV[3] the hour (hours since 1970), ARGV[4]
-- when the hour's keys expire (unix s), ARGV[5] how long parked recordings are kept (ms).
-- Returns 'counted', 'duplicate' (counted before: nothing changed), 'parked' (a rebuild
-- is running: it replays the payment unless MySQL gave it the payment already) or
-- 'unbuilt' (no ranking: the rebuild that builds it counts the payment from MySQL).
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('SADD', KEYS[5], ARGV[1]) == 0 then return 'duplicate' end
  redis.call('ZINCRBY', KEYS[4], 1, ARGV[2])
  redis.call('EXPIREAT', KEYS[4], ARGV[4])
  redis.call('EXPIREAT', KEYS[5], ARGV[4])
  return 'counted'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3] .. ' ' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  return 'parked'
end
return 'unbuilt'
