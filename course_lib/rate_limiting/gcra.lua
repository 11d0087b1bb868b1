-- GCRA (generic cell rate algorithm, as in redis-cell): one integer per key, the
-- theoretical arrival time (TAT) of the next request if traffic were perfectly smooth.
-- A request of `cost` is allowed when TAT + cost * interval - burst * interval <= now.
-- key      string: TAT in us
-- ARGV     now_us ('' = Redis server TIME), nonce (unused), interval_us (1 / rate), burst,
--          then the costs (see _batch.lua, which calls `decide` once per key)
-- decide   allowed 0/1, remaining, retry_after_us, reset_after_us
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local span = burst * interval

local function save(key, tat)
  local ttl = math.ceil((tat - now) / 1000)
  if injected and ttl < 60000 then
    ttl = 60000
  end
  redis.call('SET', key, string.format('%.0f', tat), 'PX', ttl)
end

local function decide(key, cost)
  -- A missing key is a full bucket: TAT = now (not 0, which is "ahead of now" for a clock
  -- that reads below 0 and would look like a clock step back).
  local tat = tonumber(redis.call('GET', key) or now)
  local capped = false
  if tat < now then
    tat = now
  elseif tat > now + span then
    -- Further ahead than an empty bucket can be: the clock stepped back. Treat the bucket
    -- as empty now (no extra quota, and the next unit is one interval away, not the step).
    tat = now + span
    capped = true
  end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - span

  if now < allow_at then
    if capped then
      save(key, tat)
    end
    local remaining = math.max(0, math.floor((now - (tat - span)) / interval))
    return 0, remaining, allow_at - now, tat - now
  end

  if new_tat > now then
    save(key, new_tat)
  end
  return 1, math.max(0, math.floor((now - allow_at) / interval)), 0, new_tat - now
end
