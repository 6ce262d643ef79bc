-- Whether a login attempt may reach the authenticator. Mirrors MemoryStore::check.
-- KEYS: 1 ban:ip:<ip>, 2 ban:net:<net>, 3 ban:ip_account:<pair>, 4 ban:account:<account>,
--       5 known:<pair>
-- Returns 0 (allow), 1 address banned, 2 network banned, 3 pair banned, 4 account protected.
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 3 end
if redis.call('EXISTS', KEYS[4]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then return 4 end
return 0
