-- Sliding window counter (Cloudflare's approximation): two counters per key, the current
-- fixed window and the previous one; the previous one is weighted by how much of it still
-- overlaps the sliding window:  estimate = previous * (window - elapsed) / window + current.
-- key      string '<current window start us>:<current count>:<previous count>'
-- ARGV     now_us ('' = Redis server TIME), nonce (unused), limit, window_us, then the
--          costs (see _batch.lua, which calls `decide` once per key)
-- decide   allowed 0/1, remaining, retry_after_us, reset_after_us
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
-- `now` is read once per call: every key of a batch shares the window
local start = now - (now % window)
local elapsed = now - start
local ttl = math.ceil((2 * window - elapsed) / 1000)
if injected and ttl < 60000 then
  ttl = 60000
end

local function save(key, current, previous)
  local value = string.format('%.0f:%d:%d', start, current, previous)
  redis.call('SET', key, value, 'PX', ttl)
end

local function reset_after(cur, prev)
  if cur > 0 then
    return 2 * window - elapsed
  elseif prev > 0 then
    return window - elapsed
  end
  return 0
end

local function decide(key, cost)
  local current, previous = 0, 0
  local rebased = false
  local state = redis.call('GET', key)
  if state then
    local w, c, p = string.match(state, '^(-?%d+):(%d+):(%d+)$')
    local stored = tonumber(w)
    if stored == start then
      current, previous = tonumber(c), tonumber(p)
    elseif stored == start - window then
      previous = tonumber(c)
    elseif stored > start then
      -- Windows that start after now: the clock stepped back. Their counts move into the
      -- current and previous windows, so the step grants no extra quota and blocks no
      -- longer than the counts would have anyway.
      current, previous = tonumber(c), tonumber(p)
      rebased = true
    end
  end

  local estimate = previous * (window - elapsed) / window + current

  if estimate + cost > limit then
    local retry
    if current + cost <= limit then
      -- wait in this window for the previous window's weight to shrink enough
      local at = window * (1 - (limit - current - cost) / previous)
      retry = at - elapsed
    else
      -- wait until the next window, where today's count becomes the weighted one
      local at = window * (1 - (limit - cost) / current)
      retry = window - elapsed + at
    end
    if rebased then
      save(key, current, previous)
    end
    return 0, math.max(0, math.floor(limit - estimate)), math.ceil(retry),
           reset_after(current, previous)
  end

  if cost > 0 or rebased then
    current = current + cost
    save(key, current, previous)
  end
  return 1, math.max(0, math.floor(limit - estimate - cost)), 0,
         reset_after(current, previous)
end
