-- Load a campaign, or one batch of it: the users already holding a coupon, then (on the
-- last call) the stock. The stock is set last, so until it exists every decision answers
-- 'not_loaded', however many batches a load takes; a load that died half-way is made
-- again from the start (adding users twice is harmless).
-- KEYS[1] stock, KEYS[2] users, KEYS[3] pending.
-- ARGV[1] when the keys expire (unix ms), ARGV[2] the stock to set ('' on the batches
-- before the last), ARGV[3..] users to add.
-- Returns 1, or 0 when the campaign is loaded already (nothing is changed then).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
-- One command per thousand users: Lua 5.1 in Redis unpacks about 8,000 values at most.
for i = 3, #ARGV, 1000 do
  redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if #ARGV >= 3 then redis.call('PEXPIREAT', KEYS[2], ARGV[1]) end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'NX')
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
  redis.call('PEXPIREAT', KEYS[2], ARGV[1])
  redis.call('PEXPIREAT', KEYS[3], ARGV[1])
end
return 1
