-- A decision is in MySQL: no longer pending. Only that decision (not a later one of the
-- same user).
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] user, ARGV[2] the decision's id.
-- Returns 1 when it was pending, 0 else.
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if not mine or string.sub(mine, 1, #ARGV[2] + 1) ~= ARGV[2] .. '|' then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
