-- Admission step (after queue_prelude.lua): cleanup, admission, the observed rate.
-- KEYS: the queue's nine keys (see queue_prelude.lua); uses 2 waiting, 3 seen, 4 active,
--   5 tokens, 6 users, 7 slot, 8 log, 9 rate.
-- ARGV[1] idle ms, ARGV[2] max active, ARGV[3] batch (0: max-active policy),
-- ARGV[4] interval ms, ARGV[5] lifetime ms, ARGV[6] rate window ms, ARGV[7] cleanup batch,
-- ARGV[8] most admitted per step.
-- Returns {admitted, active, waiting}.
local now = now_ms()
local idle, max_active, batch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval, lifetime, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cleanup = tonumber(ARGV[7])
for _, t in ipairs(redis.call('ZRANGEBYSCORE', K[4], '-inf', now, 'LIMIT', 0, cleanup)) do
  local rec = redis.call('HGET', K[5], t)
  local u = nil
  if rec then local _; _, u = parse(rec) end
  forget(t, u)
end
local abandoned = redis.call('ZRANGEBYSCORE', K[3], '-inf', '(' .. (now - idle), 'LIMIT', 0, cleanup)
for _, t in ipairs(abandoned) do
  local rec = redis.call('HGET', K[5], t)
  local u = nil
  if rec then local _; _, u = parse(rec) end
  forget(t, u)
end
-- Fewer than a full batch abandoned: every waiting token left is live, and admission need
-- not look at when each was last seen.
local all_live = #abandoned < cleanup
-- How many to admit: the arithmetic specified (and unit-tested) once, in Rust, by
-- `AdmitPolicy::to_admit` and `next_batch_mark` in crates/domain/src/queue.rs; this
-- mirrors them, so change both together. It stays here, not in Rust, because it needs the
-- active count and the batch mark as they are inside this atomic step (other instances
-- change both between steps). A negative room admits none (Rust: `saturating_sub`); a
-- `rate` batch of 0 arrives as 1 (queue.rs: 0 here means the `max-active` policy).
local room = math.min(max_active - redis.call('ZCARD', K[4]), tonumber(ARGV[8]))
if batch > 0 then
  -- One batch per interval, whichever instance comes first. The mark advances by whole
  -- intervals, so batches keep their cadence however the steps' timing jitters, and a
  -- long pause skips intervals instead of piling up batches. It advances when a batch is
  -- due even if the cap leaves no room.
  local last = tonumber(redis.call('GET', K[7]) or '0')
  if now < last + interval then
    room = 0
  else
    redis.call('SET', K[7], last + interval * math.floor((now - last) / interval))
    room = math.min(room, batch)
  end
end
-- Admit the head of the line with a handful of variadic commands (not a few per token):
-- a step of 1,000 costs about as much as a step of one, per command. Active entries are
-- written before the tokens leave the line, so a script failing half-way (scripts do not
-- roll back) cannot lose a token. Abandoned tokens met at the head (more went idle than
-- the cleanup above removes per step) are dropped, and the batch is topped up from the
-- line, a few rounds at most.
local admitted = 0
local function each_chunk(list, f)
  for i = 1, #list, 1000 do
    f({unpack(list, i, math.min(i + 999, #list))})
  end
end
local rounds = 0
while room - admitted > 0 and rounds < 4 do
  rounds = rounds + 1
  local head = redis.call('ZRANGE', K[2], 0, room - admitted - 1)
  if #head == 0 then break end
  local stale = now - idle
  local recs = redis.call('HMGET', K[5], unpack(head))
  local seens = {}
  if not all_live then seens = redis.call('ZMSCORE', K[3], unpack(head)) end
  local expires = now + lifetime
  local scored, records, gone = {}, {}, {}
  for n, t in ipairs(head) do
    local rec = recs[n]
    local live = rec and (all_live or tonumber(seens[n] or '0') >= stale)
    -- A waiting record is 'W|user|seq|issued|0': the active one swaps the first and last
    -- fields (no pattern matching per token).
    if live and string.sub(rec, 1, 2) == 'W|' and string.sub(rec, -2) == '|0' then
      scored[#scored + 1] = expires
      scored[#scored + 1] = t
      records[#records + 1] = t
      records[#records + 1] = 'A' .. string.sub(rec, 2, -2) .. expires
      admitted = admitted + 1
    else
      gone[#gone + 1] = t
      if rec then
        local _, u = parse(rec)
        if redis.call('HGET', K[6], u) == t then redis.call('HDEL', K[6], u) end
      end
    end
  end
  for i = 1, #scored, 2000 do
    redis.call('ZADD', K[4], unpack(scored, i, math.min(i + 1999, #scored)))
    redis.call('HSET', K[5], unpack(records, i, math.min(i + 1999, #records)))
  end
  redis.call('ZREMRANGEBYRANK', K[2], 0, #head - 1)
  each_chunk(head, function(chunk) redis.call('ZREM', K[3], unpack(chunk)) end)
  each_chunk(gone, function(chunk) redis.call('HDEL', K[5], unpack(chunk)) end)
end
if admitted > 0 then
  redis.call('LPUSH', K[8], now .. ':' .. admitted)
  redis.call('LTRIM', K[8], 0, 255)
end
-- The rate over the window: what was admitted after the oldest step in it, over the time
-- since that step (its own admissions happened at its start); a single step counts over
-- at least one interval, so it does not look infinitely fast.
local sum, oldest, oldest_n, steps = 0, now, 0, 0
for _, e in ipairs(redis.call('LRANGE', K[8], 0, -1)) do
  local ts, n = string.match(e, '^(%d+):(%d+)$')
  ts, n = tonumber(ts), tonumber(n)
  if ts >= now - window then
    sum = sum + n
    steps = steps + 1
    if ts <= oldest then oldest, oldest_n = ts, n end
  end
end
local rate = 0
if steps >= 2 and now > oldest then
  rate = (sum - oldest_n) * 1000 / (now - oldest)
elseif steps == 1 then
  rate = sum * 1000 / math.max(now - oldest, interval)
end
redis.call('SET', K[9], string.format('%.6f', rate))
return {admitted, redis.call('ZCARD', K[4]), redis.call('ZCARD', K[2])}
