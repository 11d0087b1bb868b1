-- Release a lock only if we still own it: compare the token, then delete.
-- GET and DEL in one script so no other client can take the lock in between
-- (a plain DEL would delete a lock that expired and was taken by someone else).
-- KEYS[1] lock key; ARGV[1] our token. Returns 1 if released, 0 if not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
