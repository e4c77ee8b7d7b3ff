-- States (after queue_prelude.lua): `describe` of each token, false when not live.
-- KEYS: the queue's nine keys (see queue_prelude.lua); uses 2 waiting, 3 seen, 5 tokens,
--   9 rate.
-- ARGV[1] idle ms, ARGV[2..] tokens.
local now = now_ms()
local idle = tonumber(ARGV[1])
local out = {}
for n = 2, #ARGV do
  out[n - 1] = describe(ARGV[n], now, idle, true)
end
return out
