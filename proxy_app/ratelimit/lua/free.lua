-- Giving back what an admission holds, for settlement and release: reservations (n pairs of
-- keys from KEYS[zfirst]: a set and its sum; the tokens of each from ARGV[afirst]) and
-- concurrency slots (n sets from KEYS[first]), each by the request's lease id.
local function free_reservations(lease, zfirst, afirst, n)
  for j = 1, n do
    local amount = ARGV[afirst + j - 1]
    local z, s = KEYS[zfirst + 2 * j - 2], KEYS[zfirst + 2 * j - 1]
    if redis.call('ZREM', z, lease .. ':' .. amount) == 1 then
      redis.call('DECRBY', s, amount)
    end
  end
end
local function free_slots(lease, first, n)
  for i = first, first + n - 1 do
    redis.call('ZREM', KEYS[i], lease)
  end
end
