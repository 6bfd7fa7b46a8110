-- Settlement: the usage and its ledger row (record.lua, from KEYS[1]), then the reservations
-- freed (pairs of keys: set and sum; ARGV after record.lua's: their count, then the tokens of
-- each), then the concurrency slots given back (sets; ARGV next: their count), then the
-- tokens charged to the tpm counters (the remaining KEYS). ARGV[1]: the lease id. Slots go back here, not in a
-- release after the answer: one round trip to Redis per request saved.
-- Run after free.lua, "local first = 1" and record.lua.
local lease = ARGV[1]
local nr = tonumber(ARGV[9 + nu])
free_reservations(lease, nu + 2, 10 + nu, nr)
local nc = tonumber(ARGV[10 + nu + nr])
free_slots(lease, nu + 2 * nr + 2, nc)
local total = prompt + completion
if total > 0 then
  local t = redis.call('TIME')
  local win = math.floor(tonumber(t[1]) / 60)
  for k = nu + 2 * nr + nc + 2, #KEYS do
    if tonumber(redis.call('HGET', KEYS[k], 'w')) == win then
      redis.call('HINCRBY', KEYS[k], 'used', total)
    else
      redis.call('HSET', KEYS[k], 'w', win, 'used', total)
    end
    redis.call('PEXPIRE', KEYS[k], 120000)
  end
end
return 1
