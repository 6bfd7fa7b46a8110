-- Release: KEYS: ARGV[2] concurrency sets, then pairs (set, sum) of reservations not
-- settled, whose tokens follow in ARGV.
-- Run after free.lua.
local lease = ARGV[1]
local nc = tonumber(ARGV[2])
free_slots(lease, 1, nc)
free_reservations(lease, nc + 1, 3, (#KEYS - nc) / 2)
return 1
