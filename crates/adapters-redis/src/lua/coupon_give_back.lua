-- Give back a pending decision whose coupon MySQL does not have: once only.
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] user, ARGV[2] '1' to keep the user recorded (MySQL has a coupon of theirs), '0'
-- to let them ask again.
-- Returns 1 when given back, 0 when the decision was not (or no longer) pending.
if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then return 0 end
-- A lost stock stays lost (INCR would make a campaign of one coupon out of nothing): the
-- next load rebuilds it from MySQL, which never had this coupon.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCR', KEYS[1]) end
if ARGV[2] ~= '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
