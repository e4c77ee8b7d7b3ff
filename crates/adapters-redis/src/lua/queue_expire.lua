-- Expire (after queue_prelude.lua): ends a token now. Returns 1 when it had a record.
-- KEYS: the queue's nine keys (see queue_prelude.lua); uses 2 waiting, 3 seen, 4 active,
--   5 tokens, 6 users.
-- ARGV[1] token.
local rec = redis.call('HGET', K[5], ARGV[1])
if not rec then return 0 end
local _, u = parse(rec)
forget(ARGV[1], u)
return 1
