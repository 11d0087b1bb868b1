-- Cache a committed row unless the cache already holds the same or a newer version.
-- Two writers can commit in one order and reach the cache in the other; comparing the
-- row's version keeps the cache from going backwards.
-- KEYS[1] value key; ARGV[1] payload (JSON object with a numeric "version"),
-- ARGV[2] its version, ARGV[3] TTL in ms. Returns 1 if stored, 0 if the cache was newer.
local current = redis.call('GET', KEYS[1])
if current then
    local ok, row = pcall(cjson.decode, current)
    if ok and type(row) == 'table' and tonumber(row['version']) ~= nil
        and tonumber(row['version']) >= tonumber(ARGV[2]) then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
