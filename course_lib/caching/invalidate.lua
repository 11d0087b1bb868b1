-- Invalidate a key: bump its generation, then delete the value, atomically.
-- Any load that began before this call read the old generation, so its fill is refused.
-- KEYS[1] value key, KEYS[2] generation key; ARGV[1] TTL of the generation in ms.
-- Returns the new generation.
local generation = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return generation
