-- limits' fixed window: INCRBY, and an expiry when the key is new. Window from the first hit.
-- KEYS[1] counter; ARGV now_us, cost, limit, window_us. Returns the count.
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) / 1000))
end
return count
