-- heartbeat.lua: "this daemon is alive", and how many are. Fail-soft local buckets
-- (on_store_failure = "local", enforcer/src/decision/local.rs) split a key's budget by that count.
--
-- KEYS[1]  live daemons       ptb:{nodes}:live  (sorted set: member = node id, score = the
--                             Redis time in ms until which it counts as alive)
-- ARGV[1]  node id            this daemon's name and listen address (not secret)
-- ARGV[2]  ttl                milliseconds, integer > 0: how long this heartbeat counts
--
-- Returns the number of live daemons (this one included). Expired members are removed here,
-- so a daemon that stopped falls out after its ttl. Redis time, never the callers' clocks.

if #KEYS ~= 1 then error({err = 'ERR enforcer: expected 1 key'}) end
local node = ARGV[1]
if node == nil or node == '' then error({err = 'ERR enforcer: node id must not be empty'}) end
local ttl = tonumber(ARGV[2])
if ttl == nil or ttl ~= ttl or ttl < 1 or ttl > 86400000 then
  error({err = 'ERR enforcer: ttl must be a number of milliseconds between 1 and 86400000'})
end
ttl = math.floor(ttl)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + ttl, node)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
-- The set goes once the last daemon's heartbeat expired.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return redis.call('ZCARD', KEYS[1])
