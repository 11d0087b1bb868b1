-- 3 with the window start stored beside the count ('<start>:<count>', GET + SET PX instead
-- of INCRBY + PEXPIRE): what lets a script see that a stored window starts after now (the
-- clock stepped back) and what keeps windows right under an injected clock, whose time
-- Redis's expiry cannot see. course_lib's fixed_window.lua is this plus those two branches.
local cost = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local start = now - (now % window)
local reset = start + window - now
local count = 0
local state = redis.call('GET', KEYS[1])
if state then
  local colon = string.find(state, ':', 1, true)
  if tonumber(string.sub(state, 1, colon - 1)) == start then
    count = tonumber(string.sub(state, colon + 1))
  end
end
if count + cost > limit then
  return {0, math.max(0, limit - count), reset, reset}
end
count = count + cost
redis.call('SET', KEYS[1], string.format('%.0f:%d', start, count), 'PX', math.ceil(reset / 1000))
return {1, limit - count, 0, reset}
