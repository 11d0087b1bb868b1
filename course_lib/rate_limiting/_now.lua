-- Put before every limiter script by course_lib.rate_limiting.redis_base.script: `now` in
-- microseconds, read once per script call, from ARGV[1] when the caller injected a clock,
-- else from the Redis server's own clock, so application servers whose clocks disagree
-- still share one "now".
-- `injected`: expiry runs on server time, so with an injected clock keys are kept longer.
local now
local injected = ARGV[1] ~= ''
if injected then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
