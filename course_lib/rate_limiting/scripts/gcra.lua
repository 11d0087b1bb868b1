-- GCRA (generic cell rate algorithm, as in redis-cell): one integer per key, the
-- theoretical arrival time (TAT) of the next request if traffic were perfectly smooth.
-- A request of `cost` is allowed when TAT + cost * interval - burst * interval <= now.
-- KEYS[1]  string: TAT in us
-- ARGV     now_us ('' = Redis server TIME), cost, interval_us (1 / rate), burst
-- Returns  {allowed 0/1, remaining, retry_after_us, reset_after_us}
local cost = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])

local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval

if now < allow_at then
  local remaining = math.floor((now - (tat - burst * interval)) / interval)
  return {0, remaining, allow_at - now, tat - now}
end

if new_tat > now then
  local ttl = math.ceil((new_tat - now) / 1000)
  if ARGV[1] ~= '' and ttl < 60000 then
    ttl = 60000
  end
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
end
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
