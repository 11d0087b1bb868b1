-- Sliding window log: exact, one sorted-set entry per admitted unit in the last `window`.
-- key      sorted set, score = admission time (us), member = '<time>:<nonce>:<i>:<j>' for
--          the j-th unit of the i-th decision of a call: unique even when requests arrive
--          in the same microsecond, or one batch repeats a key
-- ARGV     now_us ('' = Redis server TIME), nonce (unique per call), limit, window_us, then
--          the costs (see _batch.lua, which calls `decide` once per key)
-- decide   allowed 0/1, remaining, retry_after_us, reset_after_us
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local stamp = string.format('%.0f', now)
local members = stamp .. ':' .. ARGV[2] .. ':'
local ttl = math.ceil(window / 1000)
if injected and ttl < 60000 then
  ttl = 60000
end

local function add(key, n, prefix)
  -- ZADD in slices: Lua's unpack() is limited to a few thousand values.
  local i = 1
  while i <= n do
    local args = {}
    local last = math.min(n, i + 999)
    for j = i, last do
      args[#args + 1] = stamp
      args[#args + 1] = prefix .. j
    end
    redis.call('ZADD', key, unpack(args))
    i = last + 1
  end
end

local function decide(key, cost, i)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  -- Entries after now mean the clock stepped back: they are moved to now, so the step
  -- grants no extra quota and they leave the window one window from now, not one step later.
  local ahead = redis.call('ZREMRANGEBYSCORE', key, '(' .. stamp, '+inf')
  if ahead > 0 then
    add(key, ahead, members .. i .. ':moved:')
  end
  local count = redis.call('ZCARD', key)

  if count + cost > limit then
    -- The request fits once the (count + cost - limit) oldest entries have left the window.
    local index = count + cost - limit - 1
    local entry = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    return 0, math.max(0, limit - count), tonumber(entry[2]) + window - now,
           tonumber(newest[2]) + window - now
  end

  if cost > 0 or ahead > 0 then
    add(key, cost, members .. i .. ':')
    redis.call('PEXPIRE', key, ttl)
  end
  if cost > 0 then
    return 1, math.max(0, limit - count - cost), 0, window
  end

  local reset = 0
  if count > 0 then
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset = tonumber(newest[2]) + window - now
  end
  return 1, math.max(0, limit - count), 0, reset
end
