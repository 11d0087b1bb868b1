-- Token bucket: `capacity` tokens refilled continuously at `rate` tokens per second.
-- Tokens are kept in micro-tokens so all arithmetic is on integers below 2^53.
-- KEYS[1]  string '<micro-tokens left>:<time of that reading, us>'
-- ARGV     now_us ('' = Redis server TIME), cost, capacity, rate (tokens/s = micro-tokens/us)
-- Returns  {allowed 0/1, remaining, retry_after_us, reset_after_us}
local cost = tonumber(ARGV[2]) * 1000000
local capacity = tonumber(ARGV[3]) * 1000000
local rate = tonumber(ARGV[4])

local tokens = capacity
local state = redis.call('GET', KEYS[1])
if state then
  local left, stamp = string.match(state, '^(-?%d+):(-?%d+)$')
  tokens = tonumber(left)
  local elapsed = now - tonumber(stamp)
  -- an injected clock that runs backwards means no time passed, not negative tokens
  if elapsed > 0 then
    tokens = math.min(capacity, tokens + elapsed * rate)
  end
end

if tokens < cost then
  return {0, math.floor(tokens / 1000000), math.ceil((cost - tokens) / rate),
          math.ceil((capacity - tokens) / rate)}
end

tokens = math.floor(tokens - cost)
local reset = math.ceil((capacity - tokens) / rate)
if reset > 0 then
  local ttl = math.ceil(reset / 1000)
  if ARGV[1] ~= '' and ttl < 60000 then
    ttl = 60000
  end
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', tokens, now), 'PX', ttl)
else
  -- a full bucket is the same as no bucket: free the memory
  redis.call('DEL', KEYS[1])
end
return {1, math.floor(tokens / 1000000), 0, reset}
