-- Decide one request: the issue window on Redis's clock, one coupon per user, the stock
-- never below zero.
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] user, ARGV[2] issuing opens (unix ms), ARGV[3] issuing closes (unix ms,
-- exclusive), ARGV[4] when the keys expire (unix ms), ARGV[5] the decision's id (the
-- coupon's id, made by the caller).
-- Returns 'closed', 'not_loaded', 'already', 'sold_out' or 'issued'. An issued decision
-- takes a coupon off the stock, records the user, and stays pending (user -> '<decision
-- id>|<when, ms>') until it is confirmed or given back.
--
-- The same decision sent again (a client resending a script whose answer it lost) is
-- answered 'issued' again and changes nothing: a winner is never told 'already'.
local mine = redis.call('HGET', KEYS[3], ARGV[1])
if mine and string.sub(mine, 1, #ARGV[5] + 1) == ARGV[5] .. '|' then return 'issued' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(ARGV[2]) or now >= tonumber(ARGV[3]) then return 'closed' end
local stock = redis.call('GET', KEYS[1])
if not stock then return 'not_loaded' end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'already' end
if tonumber(stock) <= 0 then return 'sold_out' end
redis.call('DECR', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5] .. '|' .. string.format('%.0f', now))
-- Either may have been created just now (the first coupon, or the first since the last
-- one was given back): both go when the stock goes.
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[3], ARGV[4])
return 'issued'
