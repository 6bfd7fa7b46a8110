-- Admission. KEYS: three per check (padded with the first for checks that need one); ARGV:
-- lease id, lease ttl (ms), then per check its kind (q, c, t: tokens per minute, u: quota),
-- limit and the tokens it reserves. Returns {0, 0, 0, quota used} when admitted, else {index
-- of the first refusing check (1-based), remaining, reset (ms), used, reserved}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = (#ARGV - 2) / 3
local win = math.floor(now / 60000)
local quota_used = -1
for i = 1, n do
  local kind = ARGV[3 * i]
  local limit = tonumber(ARGV[3 * i + 1])
  local k1, k2, k3 = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if kind == 'q' then
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now - 1000)
    if redis.call('ZCARD', k1) >= limit then
      local first = redis.call('ZRANGE', k1, 0, 0, 'WITHSCORES')
      return {i, 0, tonumber(first[2]) + 1000 - now, 0, 0}
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', k1, '-inf', now)
    if redis.call('ZCARD', k1) >= limit then
      return {i, 0, 1000, 0, 0}
    end
  else
    local used = 0
    if kind == 't' then
      local h = redis.call('HMGET', k1, 'w', 'used')
      if tonumber(h[1]) == win then used = tonumber(h[2]) or 0 end
    else
      used = tonumber(redis.call('HGET', k1, 'tokens') or '0')
      quota_used = used
    end
    local old = redis.call('ZRANGEBYSCORE', k2, '-inf', now)
    if #old > 0 then
      local gone = 0
      for _, m in ipairs(old) do
        gone = gone + tonumber(string.match(m, ':(%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', k2, '-inf', now)
      redis.call('DECRBY', k3, gone)
    end
    local reserved = math.max(0, tonumber(redis.call('GET', k3) or '0'))
    if used + reserved + tonumber(ARGV[3 * i + 2]) > limit then
      local reset = 1000
      if kind == 't' then reset = 60000 - now % 60000 end
      return {i, limit - used - reserved, reset, used, reserved}
    end
  end
end
for i = 1, n do
  local kind = ARGV[3 * i]
  local k1, k2, k3 = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if kind == 'q' then
    redis.call('ZADD', k1, now, lease)
    redis.call('PEXPIRE', k1, 2000)
  elseif kind == 'c' then
    redis.call('ZADD', k1, now + ttl, lease)
    redis.call('PEXPIRE', k1, ttl)
  else
    local amount = ARGV[3 * i + 2]
    redis.call('ZADD', k2, now + ttl, lease .. ':' .. amount)
    redis.call('INCRBY', k3, amount)
    redis.call('PEXPIRE', k2, ttl)
    redis.call('PEXPIRE', k3, ttl)
  end
end
return {0, 0, 0, quota_used, 0}
