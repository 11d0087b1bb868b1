-- Write-behind: merge the changed fields into the cached record and queue the whole merged
-- record for the database, in one atomic step, so a crash can never leave a cached value
-- whose write was not queued (or the reverse), and two writers of different fields of one
-- row both keep their change.
-- The record is a hash of column -> JSON text: merging field by field in Redis keeps every
-- value exactly as the client encoded it (Lua never converts a number).
-- While a write of the record is queued it has no TTL (field __entry names its latest
-- entry; settle.lua restores the TTL once that entry is in the database), so it cannot
-- expire and be rebuilt from a database that still lacks a queued write.
-- KEYS[1] record hash, KEYS[2] stream; ARGV[1] entity key, ARGV[2] number n of changed
-- fields, ARGV[3] '1' if the row loaded from the database follows the changes, else '0',
-- ARGV[4 .. 3+2n] changed field/JSON pairs, then the loaded row's field/JSON pairs.
-- Returns the stream entry id (it orders the writes), or false if the record is not cached
-- and no row was given: the caller then loads the row and calls again.
local first_row = 4 + 2 * tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
    if ARGV[3] ~= '1' then
        return false
    end
    for i = first_row, #ARGV, 2 do
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
end
for i = 4, first_row - 1, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local entry = {'key', ARGV[1]}
local record = redis.call('HGETALL', KEYS[1])
for i = 1, #record, 2 do
    if record[i] ~= '__entry' then
        entry[#entry + 1] = 'c:' .. record[i]
        entry[#entry + 1] = record[i + 1]
    end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(entry))
redis.call('HSET', KEYS[1], '__entry', id)
redis.call('PERSIST', KEYS[1])
return id
