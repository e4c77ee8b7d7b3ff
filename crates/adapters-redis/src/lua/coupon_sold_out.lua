-- MySQL refused a decided coupon as sold out: the stock goes to zero (keeping its expiry)
-- and the user's decision is undone, so that they may ask again (and hear 'sold_out').
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] user, ARGV[2] the decision's id (the user's entry is undone only if it is still
-- that decision's).
-- Returns 1.
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if mine and string.sub(mine, 1, #ARGV[2] + 1) == ARGV[2] .. '|' then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
end
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
-- DECRBY keeps the key's expiry (SET ... KEEPTTL needs Redis 6); a missing stock stays
-- missing.
if left ~= 0 then redis.call('DECRBY', KEYS[1], left) end
return 1
