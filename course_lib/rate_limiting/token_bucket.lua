-- Token bucket: `capacity` tokens refilled continuously at `rate` tokens per second.
-- Tokens are kept in micro-tokens so all arithmetic is on integers below 2^53.
-- key      string '<micro-tokens left>:<time of that reading, us>'
-- ARGV     now_us ('' = Redis server TIME), nonce (unused), capacity, rate (tokens/s =
--          micro-tokens/us), then the costs (see _batch.lua, which calls `decide` per key)
-- decide   allowed 0/1, remaining, retry_after_us, reset_after_us
local capacity = tonumber(ARGV[3]) * 1000000
local rate = tonumber(ARGV[4])

local function save(key, tokens, reset)
  local ttl = math.ceil(reset / 1000)
  if injected and ttl < 60000 then
    ttl = 60000
  end
  redis.call('SET', key, string.format('%.0f:%.0f', tokens, now), 'PX', ttl)
end

local function decide(key, cost)
  cost = cost * 1000000
  local tokens = capacity
  local rebased = false
  local state = redis.call('GET', key)
  if state then
    local left, stamp = string.match(state, '^(-?%d+):(-?%d+)$')
    tokens = math.max(0, tonumber(left))
    local elapsed = now - tonumber(stamp)
    if elapsed > 0 then
      tokens = math.min(capacity, tokens + elapsed * rate)
    elseif elapsed < 0 then
      -- A reading from the future: the clock stepped back. No time passed, and the reading
      -- is restamped now, or the bucket would not refill until the clock caught up.
      rebased = true
    end
  end

  if tokens < cost then
    local reset = math.ceil((capacity - tokens) / rate)
    if rebased then
      save(key, tokens, reset)
    end
    return 0, math.floor(tokens / 1000000), math.ceil((cost - tokens) / rate), reset
  end

  tokens = math.floor(tokens - cost)
  local reset = math.ceil((capacity - tokens) / rate)
  if reset > 0 then
    save(key, tokens, reset)
  else
    -- a full bucket is the same as no bucket: free the memory
    redis.call('DEL', key)
  end
  return 1, math.floor(tokens / 1000000), 0, reset
end
