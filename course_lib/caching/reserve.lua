-- First half of a miss: the cached value, if any, and the server time the load begins at.
-- That time (microseconds, as a decimal string) is the ticket fill.lua checks against
-- invalidations. A time never repeats the way a counter restarted after expiry would.
-- KEYS[1] value key. Returns {value or nil, now in microseconds}.
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]), t[1] .. string.format('%06d', tonumber(t[2]))}
