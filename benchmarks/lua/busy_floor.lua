-- The busy floor: payload_floor.lua plus a plain Lua loop of ITERATIONS turns, a number the
-- benchmark sets so the script spends about as long on the server as the limiter it stands
-- for. Same bytes each way and the same server time as that limiter, and no other work:
-- what a decision costs on this machine before any client code of course_lib.
for _ = 1, ITERATIONS do
end
return {1, 999999999, 0, 59999999}
