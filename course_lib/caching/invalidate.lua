-- Invalidate a key: record when (server time, microseconds), then delete the value,
-- atomically. A load that began at or before that time holds an older ticket, so fill.lua
-- refuses it. The record is kept ARGV[1] ms; fill.lua refuses loads older than that too,
-- since an invalidation during them could have been forgotten.
-- KEYS[1] value key, KEYS[2] invalidation record. Returns 1 if a cached value was deleted.
local t = redis.call('TIME')
redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])), 'PX', ARGV[1])
return redis.call('DEL', KEYS[1])
