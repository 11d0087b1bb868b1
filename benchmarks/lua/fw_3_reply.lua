-- 2 + a refused request is not counted, and the reply carries allowed, remaining,
-- retry_after and reset_after (the RateLimit headers), as course_lib's scripts do.
local cost = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local reset = window - now % window
local count = redis.call('INCRBY', KEYS[1], cost)
if count == cost then
  redis.call('PEXPIRE', KEYS[1], math.ceil(reset / 1000))
end
if count > limit then
  redis.call('DECRBY', KEYS[1], cost)
  return {0, math.max(0, limit - count + cost), reset, reset}
end
return {1, limit - count, 0, reset}
