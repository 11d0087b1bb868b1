-- Store a value loaded on a miss, unless the key was invalidated since the load began.
-- KEYS[1] value key, KEYS[2] invalidation record (server time of the last invalidation);
-- ARGV[1] ticket: server time (us) when the load began (reserve.lua), ARGV[2] payload,
-- ARGV[3] TTL in ms, ARGV[4] how long an invalidation record is kept, in ms.
-- Refused when an invalidation happened at or after the ticket, and when the load took so
-- long that an invalidation during it could already have expired from memory.
-- Returns 1 if stored, 0 if refused as possibly stale.
local started = tonumber(ARGV[1])
local invalidated = redis.call('GET', KEYS[2])
if invalidated then
    if tonumber(invalidated) >= started then
        return 0
    end
else
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    if now - started >= tonumber(ARGV[4]) * 1000 then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
