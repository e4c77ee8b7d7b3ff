-- Claim an event id for one entry of one consumer.
-- KEYS[1] the event's processed key; ARGV[1] `{consumer}:claimed:{entry}`, ARGV[2] the
-- visibility timeout (ms).
-- Returns nil when the claim is new, else what the key held (renewing the claim's lease
-- when it is this very claim: a redelivery to its own consumer, or a keep).
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return held
