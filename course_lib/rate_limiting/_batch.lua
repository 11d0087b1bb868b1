-- Put after every limiter script (see redis_base.script): decides each key of KEYS in
-- order with the script's `decide`, so one call decides a batch (`hit` is a batch of one).
-- ARGV  now_us ('' = Redis server TIME), nonce, the limiter's parameters..., then one cost
--       per key: the last #KEYS arguments
-- Returns one reply per key, in order: {allowed 0/1, remaining, retry_after_us, reset_after_us}
-- A script runs atomically, so each decision (and the whole batch) sees no other client; the
-- same key repeated is counted in order, each decision seeing the ones before it.
local first_cost = #ARGV - #KEYS
local replies = {}
for i = 1, #KEYS do
  replies[i] = decide(KEYS[i], tonumber(ARGV[first_cost + i]), i)
end
return replies
