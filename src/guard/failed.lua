-- One rejected login, counted atomically. Mirrors policy::on_failure (Rust); the contract tests
-- in tests/guard.rs hold the two to the same behaviour.
--
-- KEYS: 1 rep:<pair> (list of wrong-password tags, newest first)
--       2..5 w:<ip|net|account|ip_account key> (hash of two-bucket counters, per period)
--       6 spray:<ip> (zset account tag -> last failure ms)
--       7 nat:ip:<ip>, 8 nat:net:<net> (zset account tag -> last success ms)
--       9..12 ban:<key>, 13..16 off:<key> (in kind order ip, net, account, ip_account)
--       17 bans (zset ban key -> until ms)
-- ARGV: 1 password tag, 2 repeat keep, 3 repeat ttl ms, 4 account tag,
--       5 spray window ms, 6 spray max users, 7 spray cap,
--       8 nat window ms, 9 nat successes, 10 nat factor,
--       11 ban initial ms, 12 ban factor, 13 ban max ms, 14 jitter multiplier, 15 ban decay ms,
--       16 window ttl ms, 17 account, 18 protocol, 19..22 ban keys (kind order),
--       23 window count, then (kind 1..4, period ms, max) per window
-- Returns {repeat, bans started, now ms, then per ban: kind, offences, duration ms, reason}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = ARGV

local keep = tonumber(a[2])
if keep > 0 then
  if redis.call('LPOS', KEYS[1], a[1]) then
    redis.call('PEXPIRE', KEYS[1], a[3])
    return {1, 0, now}
  end
  redis.call('LPUSH', KEYS[1], a[1])
  redis.call('LTRIM', KEYS[1], 0, keep - 1)
  redis.call('PEXPIRE', KEYS[1], a[3])
end

local natwin = tonumber(a[8])
local natmin = tonumber(a[9])
local natf = tonumber(a[10])
local function nat(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - natwin)
  if redis.call('ZCARD', key) >= natmin then return natf end
  return 1
end
local factor = {nat(KEYS[7]), nat(KEYS[8]), 1, 1}
local label = {'ip', 'net', 'account', 'ip_account'}

local tripped = {}
local wttl = a[16]
for i = 0, tonumber(a[23]) - 1 do
  local k = tonumber(a[24 + 3 * i])
  local period = tonumber(a[25 + 3 * i])
  local max = tonumber(a[26 + 3 * i])
  local key = KEYS[1 + k]
  local fi, fc, fp = period .. ':i', period .. ':c', period .. ':p'
  local v = redis.call('HMGET', key, fi, fc, fp)
  local idx = math.floor(now / period)
  local bi, c, p = tonumber(v[1]) or idx, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if c == 0 and p == 0 then
    bi = idx
  elseif idx == bi + 1 then
    p = c; c = 0; bi = idx
  elseif idx > bi + 1 then
    p = 0; c = 0; bi = idx
  end
  c = c + 1
  redis.call('HSET', key, fi, bi, fc, c, fp, p)
  redis.call('PEXPIRE', key, wttl)
  local weight = 1
  if bi == idx then weight = 1 - (now % period) / period end
  if p * weight + c > math.floor(max * factor[k]) and not tripped[k] then
    tripped[k] = 'window:' .. label[k] .. ':' .. period .. ':' .. max
  end
end

local sw = tonumber(a[5])
local cap = tonumber(a[7])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - sw)
redis.call('ZADD', KEYS[6], now, a[4])
local users = redis.call('ZCARD', KEYS[6])
if users > cap then
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, users - cap - 1)
  users = cap
end
redis.call('PEXPIRE', KEYS[6], sw)
if users > math.floor(tonumber(a[6]) * factor[1]) and not tripped[1] then
  tripped[1] = 'spray:' .. sw .. ':' .. a[6]
end

local initial, bfactor, bmax = tonumber(a[11]), tonumber(a[12]), tonumber(a[13])
local jit, decay = tonumber(a[14]), tonumber(a[15])
local out = {0, 0, now}
for k = 1, 4 do
  if tripped[k] and redis.call('EXISTS', KEYS[8 + k]) == 0 then
    local off = redis.call('INCR', KEYS[12 + k])
    local base = math.min(initial * bfactor ^ (off - 1), bmax)
    local d = math.floor(math.min(base * jit, bmax))
    if d < 1 then d = 1 end
    redis.call('PEXPIRE', KEYS[12 + k], math.max(decay, d))
    local account = a[17]
    if k == 2 or string.sub(tripped[k], 1, 6) == 'spray:' then account = '' end
    redis.call('HSET', KEYS[8 + k], 'account', account, 'reason', tripped[k], 'offences', off,
      'since', now, 'until', now + d, 'protocol', a[18])
    redis.call('PEXPIRE', KEYS[8 + k], d)
    redis.call('ZADD', KEYS[17], now + d, a[18 + k])
    redis.call('DEL', KEYS[1 + k])
    if k == 1 then redis.call('DEL', KEYS[6]) end
    out[2] = out[2] + 1
    table.insert(out, k)
    table.insert(out, off)
    table.insert(out, d)
    table.insert(out, tripped[k])
  end
end
if out[2] > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[17], '-inf', now) end
return out
