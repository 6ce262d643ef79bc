-- Lifts one ban (ARGV[2] = 'key') or every ban about an account (ARGV[2] = 'account'), and
-- forgets the offences and counters of what it lifts. Mirrors MemoryStore::lift(_account).
-- KEYS: 1 bans (zset). ARGV: 1 key base, 2 mode, 3 ban key or account
-- Returns how many bans were in force.
local base, mode, value = ARGV[1], ARGV[2], ARGV[3]
local function lift(m)
  local existed = redis.call('DEL', base .. 'ban:' .. m)
  redis.call('DEL', base .. 'off:' .. m, base .. 'w:' .. m)
  if string.sub(m, 1, 3) == 'ip:' then redis.call('DEL', base .. 'spray:' .. string.sub(m, 4)) end
  redis.call('ZREM', KEYS[1], m)
  return existed
end
if mode == 'key' then return lift(value) end
local n = 0
local suffix = ' ' .. value
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local about = m == 'account:' .. value
    or (string.sub(m, 1, 11) == 'ip_account:' and string.sub(m, -#suffix) == suffix)
    or redis.call('HGET', base .. 'ban:' .. m, 'account') == value
  if about then n = n + lift(m) end
end
lift('account:' .. value)
return n
