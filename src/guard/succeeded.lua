-- One accepted login. Mirrors MemoryStore::succeeded.
-- KEYS: 1 nat:ip:<ip>, 2 nat:net:<net>, 3 known:<pair>, 4 w:ip_account:<pair>, 5 rep:<pair>
-- ARGV: 1 account tag, 2 nat window ms, 3 cap (nat successes), 4 known-for ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - win)
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  local n = redis.call('ZCARD', KEYS[i])
  if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[i], 0, n - cap - 1) end
  redis.call('PEXPIRE', KEYS[i], win)
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
redis.call('DEL', KEYS[4], KEYS[5])
return 1
