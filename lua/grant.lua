-- grant.lua: an operator's grant of tokens to one key's main bucket (`enforcer keys grant`),
-- atomic with the key's debits. Mirrors enforcer/src/debit.rs `grant` (the in-process store).
--
-- KEYS[1]  main bucket        ptb:{<sha256 of key>}:b      "<balance> <updated_at seconds>"
-- KEYS[2]  tier assignment    ptb:{<sha256 of key>}:tier
-- KEYS[3]  grant record       ptb:{<sha256 of key>}:g:<grant id>
-- ARGV[1]  tokens             finite, > 0, <= 1e15
-- ARGV[2]  record ttl         milliseconds, integer > 0
-- ARGV[3]  active window      seconds, >= 0
-- ARGV[4]  default tier       name, or "" (keys without an assignment cannot be granted to)
-- ARGV[5]  n                  number of tiers that follow
-- ARGV[6+6i .. 11+6i]         name, max_tokens, refill_per_sec, idle_cap, initial_tokens,
--                             grant_ceiling
--
-- Refill is applied first (the grant comes on top of what the key earned), then the tokens are
-- added whole; a grant that would lift the balance above the tier's grant_ceiling is refused
-- whole, nothing written. The grant id makes a retried grant a replay, never a second credit.
--
-- Returns {status, balance, tier, at, ceiling}: status "ok", "replay" (this grant id was
-- applied before: balance is the balance it left), "unknown_key" or "over_ceiling" (balance:
-- the balance now); numbers as strings; at: Redis TIME.
-- Bad arguments are an error reply starting with "ERR enforcer:"; nothing is written then.

local function fail(msg)
  error({err = 'ERR enforcer: ' .. msg})
end

local function number(i, what, min)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= v or v == math.huge or v == -math.huge then
    fail(what .. ' must be a finite number')
  end
  if v < min then fail(what .. ' must be >= ' .. min) end
  return v
end

local function fmt(x)
  return string.format('%.17g', x)
end

if #KEYS ~= 3 then fail('expected 3 keys') end
local tokens = number(1, 'tokens', 0)
if tokens <= 0 or tokens > 1e15 then fail('tokens must be > 0 and <= 1e15') end
local ttl = number(2, 'record ttl', 1)
local active_window = number(3, 'active window', 0)
local default_tier = ARGV[4]
local n = number(5, 'tier count', 1)

local got = redis.call('MGET', KEYS[3], KEYS[2], KEYS[1])
local record, assigned, bucket = got[1], got[2], got[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if record then
  local b, tier_name, c = string.match(record, '^(%S+) (%S+) (%S+)$')
  return {'replay', b, tier_name, fmt(now), c}
end

local tier, fallback
for i = 0, n - 1 do
  local base = 6 + 6 * i
  local name = ARGV[base]
  if name == nil then fail('missing tier parameters') end
  if name == assigned then tier = base end
  if name == default_tier then fallback = base end
end
tier = tier or fallback
if tier == nil then return {'unknown_key', '0', '', fmt(now), '0'} end
local tier_name = ARGV[tier]
local max_tokens = number(tier + 1, 'max_tokens', 0)
local rate = number(tier + 2, 'refill_per_sec', 0)
local idle_cap = number(tier + 3, 'idle_cap', 0)
local initial = number(tier + 4, 'initial_tokens', 0)
local ceiling = number(tier + 5, 'grant_ceiling', 0)

local balance, updated
if bucket then
  local b, u = string.match(bucket, '^(%S+) (%S+)$')
  balance, updated = tonumber(b), tonumber(u)
end
if balance == nil or updated == nil then
  balance = initial
else
  local elapsed = math.max(0, now - updated)
  local cap = max_tokens
  if elapsed > active_window then cap = max_tokens * idle_cap end
  if balance < cap then balance = math.min(cap, balance + elapsed * rate) end
end

if balance + tokens > ceiling then
  return {'over_ceiling', fmt(balance), tier_name, fmt(now), fmt(ceiling)}
end
balance = balance + tokens
if rate > 0 and balance <= max_tokens * idle_cap then
  redis.call('SET', KEYS[1], fmt(balance) .. ' ' .. fmt(now),
    'PX', math.ceil((active_window + (max_tokens - math.min(0, balance)) / rate) * 1000))
else
  redis.call('SET', KEYS[1], fmt(balance) .. ' ' .. fmt(now))
end
redis.call('SET', KEYS[3], fmt(balance) .. ' ' .. tier_name .. ' ' .. fmt(ceiling), 'PX', ttl)
return {'ok', fmt(balance), tier_name, fmt(now), fmt(ceiling)}
