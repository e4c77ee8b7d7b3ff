-- Release a lock if it is still ours, and announce it to pub/sub waiters.
-- KEYS[1] lock key; ARGV[1] owner token, ARGV[2] release channel.
-- Returns 1 when released, 0 when the key was not (or no longer) ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], KEYS[1])
  return 1
end
return 0
