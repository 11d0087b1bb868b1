-- Write-behind: update the cache and queue the write for the database in one atomic step,
-- so a crash can never leave a cached value whose write was not queued (or the reverse).
-- KEYS[1] cache key, KEYS[2] stream; ARGV[1] entity key, ARGV[2] payload,
-- ARGV[3] cache TTL in ms. Returns the stream entry id, which orders the writes.
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return redis.call('XADD', KEYS[2], '*', 'key', ARGV[1], 'value', ARGV[2])
