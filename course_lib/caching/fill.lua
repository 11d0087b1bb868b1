-- Store a value loaded on a miss, unless the key was invalidated since the load began.
-- The loader read the generation before reading the database; every invalidation bumps
-- it, so a mismatch means the loaded value may predate a write and must not be cached.
-- KEYS[1] value key, KEYS[2] generation key;
-- ARGV[1] generation seen before loading ('' if none), ARGV[2] payload, ARGV[3] TTL in ms.
-- Returns 1 if stored, 0 if rejected as possibly stale.
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
