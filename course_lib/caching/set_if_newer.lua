-- Cache a committed row unless the cache already holds the same or a newer version.
-- Two writers can commit in one order and reach the cache in the other; comparing the
-- row's version keeps the cache from going backwards.
-- Versions are compared as decimal strings, not numbers: Lua numbers are doubles, which
-- cannot tell apart integers above 2^53 (write-behind versions are ~2^60). Without leading
-- zeros, a longer string is a larger integer, and equal lengths compare digit by digit,
-- so the comparison is exact for integers of any size.
-- KEYS[1] value key, KEYS[2] its version key; ARGV[1] payload (JSON of the row),
-- ARGV[2] its version (a non-negative integer, in decimal), ARGV[3] TTL in ms.
-- Returns 1 if stored, 0 if the cache was newer.
local function not_older(a, b)
    if #a ~= #b then
        return #a > #b
    end
    return a >= b
end
local current = redis.call('GET', KEYS[2])
if current and redis.call('EXISTS', KEYS[1]) == 1 and not_older(current, ARGV[2]) then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
