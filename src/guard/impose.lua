-- Sets a ban decided elsewhere (a ban started locally while Redis was unreachable), unless a
-- longer one is in force. Mirrors MemoryStore::impose.
-- KEYS: 1 ban:<key>, 2 bans (zset)
-- ARGV: 1 ban key, 2 account, 3 reason, 4 offences, 5 since ms, 6 remaining ms, 7 protocol
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local remaining = tonumber(ARGV[6])
local untilms = now + remaining
local cur = tonumber(redis.call('HGET', KEYS[1], 'until'))
if cur and cur >= untilms then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'account', ARGV[2], 'reason', ARGV[3], 'offences', ARGV[4],
  'since', ARGV[5], 'until', untilms, 'protocol', ARGV[7])
redis.call('PEXPIRE', KEYS[1], remaining)
redis.call('ZADD', KEYS[2], untilms, ARGV[1])
return 1
