-- Usage counters: KEYS[first .. first + ARGV[5] - 1] are the usage hashes of the request's
-- periods; ARGV: 2 prompt, 3 completion, 4 user, 5 number of hashes, then one TTL each.
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
