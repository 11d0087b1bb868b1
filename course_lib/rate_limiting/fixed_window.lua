-- Fixed window: at most `limit` units per window aligned on multiples of `window`.
-- KEYS[1]  string '<window start us>:<units counted in that window>' (one GET and one
--          SET per call: each extra command costs about 1 us of server time)
-- ARGV     now_us ('' = Redis server TIME), cost, limit, window_us
-- Returns  {allowed 0/1, remaining, retry_after_us, reset_after_us}
local cost = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])

local start = now - (now % window)
local reset = start + window - now
local count = 0
local rebased = false
local state = redis.call('GET', KEYS[1])
if state then
  local stored, counted = string.match(state, '^(-?%d+):(-?%d+)$')
  stored = tonumber(stored)
  if stored == start then
    count = tonumber(counted)
  elseif stored > start then
    -- A window that starts after now: the clock stepped back. Its count moves into the
    -- current window, so the step grants no extra quota and blocks no longer than this one.
    count = tonumber(counted)
    rebased = true
  end
end

local function save()
  local ttl = math.ceil(reset / 1000)
  -- Expiry runs on server time; with an injected clock keep the key long enough to replay.
  if ARGV[1] ~= '' and ttl < 60000 then
    ttl = 60000
  end
  redis.call('SET', KEYS[1], string.format('%.0f:%d', start, count), 'PX', ttl)
end

if count + cost > limit then
  if rebased then
    save()
  end
  return {0, math.max(0, limit - count), reset, reset}
end
if cost > 0 or rebased then
  count = count + cost
  save()
end
if count == 0 then
  reset = 0
end
return {1, math.max(0, limit - count), 0, reset}
