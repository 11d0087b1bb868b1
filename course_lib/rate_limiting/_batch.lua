-- Put after every limiter script by course_lib.rate_limiting.redis_base.script: decides
-- each key of KEYS in order with the script's `decide`, so one call decides a batch (`hit`
-- is a batch of one).
-- ARGV  now_us ('' = Redis server TIME), nonce, the limiter's two parameters, then one cost
--       per key, or none when every cost is 1 (the common case: half the arguments to
--       pack, send and read)
-- Returns 4 integers per key, in order: allowed 0/1, remaining, retry_after_us,
--       reset_after_us (one flat array: no table per decision to build and convert)
-- A script runs atomically, so each decision (and the whole batch) sees no other client; the
-- same key repeated is counted in order, each decision seeing the ones before it.
if #KEYS == 1 then
  -- `hit`: the reply built in one go, so a call for one key costs no more server time than
  -- a script without the loop (about 1 us less than the loop below, measured)
  return {decide(KEYS[1], tonumber(ARGV[5]) or 1, 1)}
end
local replies = {}
local costs = #ARGV > 4
for i = 1, #KEYS do
  local cost = 1
  if costs then
    cost = tonumber(ARGV[4 + i])
  end
  local n = 4 * i
  replies[n - 3], replies[n - 2], replies[n - 1], replies[n] = decide(KEYS[i], cost, i)
end
return replies
