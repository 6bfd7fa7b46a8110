-- Usage counters: KEYS[first .. first + ARGV[5] - 1] are the usage hashes of the request's
-- periods; ARGV: 2 prompt, 3 completion, 4 user, 5 number of hashes, then one TTL each.
-- Then the ledger (proxy_app/ledger.py): KEYS[first + nu] the day's hash; ARGV after the
-- TTLs: the field of the key, model and end user, the hash's TTL, 1 if the request failed.
local prompt = tonumber(ARGV[2])
local completion = tonumber(ARGV[3])
local nu = tonumber(ARGV[5])
for i = 1, nu do
  local h = KEYS[first + i - 1]
  redis.call('HINCRBY', h, 'requests', 1)
  redis.call('HINCRBY', h, 'prompt_tokens', prompt)
  redis.call('HINCRBY', h, 'completion_tokens', completion)
  redis.call('HINCRBY', h, 'tokens', prompt + completion)
  redis.call('HSET', h, 'user', ARGV[4])
  local ttl = tonumber(ARGV[5 + i])
  if ttl > 0 then redis.call('EXPIRE', h, ttl) end
end
local lh, lf = KEYS[first + nu], ARGV[6 + nu]
redis.call('HINCRBY', lh, 'r' .. lf, 1)
if ARGV[8 + nu] == '1' then redis.call('HINCRBY', lh, 'e' .. lf, 1) end
if prompt > 0 then redis.call('HINCRBY', lh, 'p' .. lf, prompt) end
if completion > 0 then redis.call('HINCRBY', lh, 'c' .. lf, completion) end
redis.call('EXPIRE', lh, tonumber(ARGV[7 + nu]))
