-- Extend a lock's lease if it is still ours.
-- KEYS[1] lock key; ARGV[1] owner token, ARGV[2] lease (ms).
-- Returns 1 when extended, 0 when the key was not (or no longer) ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
