-- Replay of spooled usage: KEYS[1] marks the row as counted (so a replay cut short and done
-- again counts it once), then the usage hashes and the ledger's day. ARGV[1]: the mark's TTL in seconds.
-- Runs record.lua (with its "first" set here), then returns 1.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
local first = 2
