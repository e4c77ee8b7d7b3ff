-- Give back a pending decision whose coupon MySQL does not have: once only, and only that
-- decision (not a later one of the same user).
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] user, ARGV[2] '1' to keep the user recorded (MySQL has a coupon of theirs), '0'
-- to let them ask again, ARGV[3] the decision's id.
-- Returns 1 when given back, 0 when that decision was not (or no longer) pending.
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if not mine or string.sub(mine, 1, #ARGV[3] + 1) ~= ARGV[3] .. '|' then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
-- A lost stock stays lost (INCR would make a campaign of one coupon out of nothing): the
-- next load rebuilds it from MySQL, which never had this coupon.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCR', KEYS[1]) end
if ARGV[2] ~= '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
