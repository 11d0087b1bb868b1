-- Prepended to every limiter script (see redis_base.script_source): `now` in microseconds,
-- from ARGV[1] when the caller injected a clock, else from the Redis server's own clock,
-- so application servers whose clocks disagree still share one "now".
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
