-- 1 + the server clock (TIME, in the shared prelude): windows aligned on multiples of the
-- window, the counter expiring at the window's end.
local window = tonumber(ARGV[4])
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], math.ceil((window - now % window) / 1000))
end
return count
