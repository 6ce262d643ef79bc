-- The bans in force. Ban keys are built from the index's members: every guard key shares one
-- hash tag, so they live in the index's slot (see redis.rs).
-- KEYS: 1 bans (zset ban key -> until ms). ARGV: 1 key base (prefix with hash tag)
-- Returns {now ms, then per ban: key, account, reason, offences, since, until, protocol}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {now}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HMGET', ARGV[1] .. 'ban:' .. m,
    'account', 'reason', 'offences', 'since', 'until', 'protocol')
  if h[5] then
    table.insert(out, m)
    for j = 1, 6 do table.insert(out, h[j] or '') end
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
