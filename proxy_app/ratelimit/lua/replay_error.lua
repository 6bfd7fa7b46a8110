-- Replay of a spooled request that failed before it was charged: KEYS[1] marks the row as
-- counted (as replay.lua), KEYS[2] is the ledger's day. ARGV: the mark's TTL, the field of
-- the key, model and end user, the day's TTL. One request and one error, no token.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'r' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[2], 'e' .. ARGV[2], 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
