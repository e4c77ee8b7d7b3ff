-- Release a lock if it is still ours, and announce it to pub/sub waiters.
-- KEYS[1] lock key; ARGV[1] owner token, ARGV[2] the key's release channel
-- (`<key>:released`: sharded pub/sub, in the key's hash slot, so that on a Redis Cluster
-- only the key's node carries the announcement, to the subscribers of that key alone).
-- Returns 1 when released, 0 when the key was not (or no longer) ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SPUBLISH', ARGV[2], KEYS[1])
  return 1
end
return 0
