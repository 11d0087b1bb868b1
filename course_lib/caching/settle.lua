-- Write-behind, after the worker is done with a key's latest entry: give the cached record
-- back its TTL (ARGV[1] 'expire'), or drop it (ARGV[1] 'drop') when that entry went to the
-- dead-letter stream, so reads fall back to the database instead of a value it never got.
-- A record written again meanwhile names a newer entry and is left alone.
-- KEYS[i] record hash; ARGV[2] TTL in ms; ARGV[2 + i] the entry id done for KEYS[i].
-- Returns how many records were settled.
local settled = 0
for i, key in ipairs(KEYS) do
    if redis.call('HGET', key, '__entry') == ARGV[2 + i] then
        if ARGV[1] == 'drop' then
            redis.call('DEL', key)
        else
            redis.call('PEXPIRE', key, ARGV[2])
        end
        settled = settled + 1
    end
end
return settled
