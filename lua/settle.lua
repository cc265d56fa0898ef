-- settle.lua: charges the true cost of an allowed request in place of the estimate it was
-- debited at (lua/debit.lua), once. Mirrors the in-process store's settle (the arithmetic is
-- enforcer/src/debit.rs `adjust`; the policy is documented in docs/credits.md).
--
-- KEYS[1]  main bucket        ptb:{<sha256 of key>}:b   "<balance> <updated_at seconds>"
-- KEYS[2]  tier assignment    ptb:{<sha256 of key>}:tier
-- KEYS[3]  request record     ptb:{<sha256 of key>}:r:<request id>  (written by debit.lua)
-- KEYS[4]  quota usage        ptb:{<sha256 of key>}:q  "<period start> <used>": charged the
--                             difference too (credited when negative, never below 0), only
--                             while it is the usage of the period the request was charged in
-- ARGV[1]  mode               "c": ARGV[2] is the true cost in tokens; "u": in units, charged
--                             at the price per unit the request was charged at (cost / units);
--                             "r": units given back (Envoy's is_negative_hits): the true units
--                             are the units checked with less ARGV[2], floored at 0, as "u"
-- ARGV[2]  amount             finite, >= 0, <= 1e15 (0 settles to nothing: a refund)
-- ARGV[3]  active window      seconds, >= 0        } as debit.lua's ARGV[4..]: the bucket is
-- ARGV[4]  default tier       name, or ""          } refilled by the tier the key is charged
-- ARGV[5]  bucket kind        "m"                  } under now (else the request's tier)
-- ARGV[6]  n                  number of tiers
-- ARGV[7+5i .. 11+5i]         name, max_tokens, refill_per_sec, idle_cap, initial_tokens
--
-- The request record (debit.lua): kind|allowed|remaining|retry|tier|cost|max_tokens|refunded|
-- fingerprint|units|max_cost; a settle sets cost (field 6) to the true cost charged (so a
-- refund afterwards gives back what was really charged, and a retry of the check answers it)
-- and appends requested|estimate|moved|balance|capped (fields 12-16).
--
-- Returns {status, cost, estimate, moved, balance, tier, at, capped}, numbers as strings:
--   "ok"       settled now: moved = tokens charged (negative: credited); at = Redis TIME
--   "replay"   settled before at the same true cost: the first settle's answer, at = ""
--   "conflict" settled before at another true cost (cost: the true cost charged then)
--   "unknown_request", "already_refunded", "not_settleable" (operational or forced),
--   "units_unknown" (a record written before units were kept), "unknown_key"
-- Nothing is written unless the status is "ok". The difference is charged whatever the
-- balance (the work is done: it may go below zero); a credit is capped at the tier's capacity
-- and never lowers a balance above it.
-- Bad arguments are an error reply starting with "ERR enforcer:"; nothing is written then.

local function fail(msg)
  error({err = 'ERR enforcer: ' .. msg})
end

local function number(i, what, min)
  local v = tonumber(ARGV[i])
  -- NaN and both infinities, in one operation (x - x is 0 for every finite x).
  if v == nil or v - v ~= 0 then
    fail(what .. ' must be a finite number')
  end
  if v < min then
    fail(what .. ' must be >= ' .. min)
  end
  return v
end

local function fmt(x)
  return string.format('%.17g', x)
end

if #KEYS ~= 4 then fail('expected 4 keys') end
local mode = ARGV[1]
if mode ~= 'c' and mode ~= 'u' and mode ~= 'r' then fail('mode must be c, u or r') end
local amount = number(2, 'amount', 0)
if amount > 1e15 then fail('amount must be <= 1e15') end
local active_window = number(3, 'active window', 0)
local default_tier = ARGV[4]
if ARGV[5] ~= 'm' then fail('bucket kind must be m') end
local n = number(6, 'tier count', 1)

local got = redis.call('MGET', KEYS[3], KEYS[2], KEYS[1])
local record, assigned, bucket = got[1], got[2], got[3]
if not record then return {'unknown_request', '', '', '', '', '', '', '0'} end
local f = {}
for part in string.gmatch(record, '[^|]+') do f[#f + 1] = part end
if f[1] ~= 'm' then return {'not_settleable', '', '', '', '', '', '', '0'} end
if f[8] == '1' then return {'already_refunded', '', '', '', '', '', '', '0'} end

local estimate = tonumber(f[13] or f[6])
local requested
if mode == 'c' then
  requested = amount
else
  local units = tonumber(f[10] or '')
  if units == nil or units <= 0 then return {'units_unknown', '', '', '', '', '', '', '0'} end
  if mode == 'r' then
    requested = estimate / units * math.max(0, units - amount)
  else
    requested = estimate / units * amount
  end
end

if f[12] ~= nil then
  if f[12] ~= fmt(requested) then
    return {'conflict', f[6], fmt(estimate), '', '', f[5], '', '0'}
  end
  return {'replay', f[6], f[13], f[14], f[15], f[5], '', f[16]}
end

local tier, fallback, own
for i = 0, n - 1 do
  local base = 7 + 5 * i
  local name = ARGV[base]
  if name == nil then fail('missing tier parameters') end
  if name == assigned then tier = base end
  if name == default_tier then fallback = base end
  if name == f[5] then own = base end
end
tier = tier or fallback or own
if tier == nil then return {'unknown_key', '', '', '', '', '', '', '0'} end
local tier_name = ARGV[tier]
local max_tokens = number(tier + 1, 'max_tokens', 0)
local rate = number(tier + 2, 'refill_per_sec', 0)
local idle_cap = number(tier + 3, 'idle_cap', 0)
local initial = number(tier + 4, 'initial_tokens', 0)

local charged_cost, capped = requested, '0'
local max_cost = tonumber(f[11] or '-')
if max_cost ~= nil and requested > max_cost then
  charged_cost, capped = max_cost, '1'
end
local difference = charged_cost - estimate

-- Server time, never the caller's clock; refill as debit.lua does it.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local balance, updated
if bucket then
  local b, u = string.match(bucket, '^(%S+) (%S+)$')
  balance, updated = tonumber(b), tonumber(u)
end
if balance == nil or updated == nil then
  balance = initial
else
  local elapsed = math.max(0, now - updated)
  local ceiling = max_tokens
  if elapsed > active_window then ceiling = max_tokens * idle_cap end
  if balance < ceiling then
    balance = math.min(ceiling, balance + elapsed * rate)
  end
end
local before = balance
if difference >= 0 then
  balance = balance - difference
elseif balance < max_tokens then
  balance = math.min(max_tokens, balance - difference)
end
local moved = before - balance

local remaining = fmt(balance)
-- Expiry as debit.lua: a debt is kept until refill has paid it too; a balance above what
-- refill reaches (a grant) is never forgotten.
if rate > 0 and balance <= max_tokens * idle_cap then
  redis.call('SET', KEYS[1], remaining .. ' ' .. fmt(now),
    'PX', math.ceil((active_window + (max_tokens - math.min(0, balance)) / rate) * 1000))
else
  redis.call('SET', KEYS[1], remaining .. ' ' .. fmt(now))
end
-- >>> QUOTA: the calendar quota of the period charged (record field 4) moves by the same
-- difference of true cost and estimate; another period's usage is left alone.
if f[4] ~= nil and f[4] ~= '0' then
  local q = redis.call('GET', KEYS[4])
  if q then
    local s, u = string.match(q, '^(%S+) (%S+)$')
    if s == f[4] and tonumber(u) ~= nil then
      redis.call('SET', KEYS[4], s .. ' ' .. fmt(math.max(0, tonumber(u) + difference)), 'KEEPTTL')
    end
  end
end
-- <<< QUOTA
-- A record from before a field existed: the gaps filled, so the fields keep their places.
for i = 9, 11 do
  if f[i] == nil then f[i] = '-' end
end
f[6] = fmt(charged_cost)
f[12] = fmt(requested)
f[13] = fmt(estimate)
f[14] = fmt(moved)
f[15] = remaining
f[16] = capped
redis.call('SET', KEYS[3], table.concat(f, '|'), 'KEEPTTL')
return {'ok', f[6], f[13], f[14], remaining, tier_name, fmt(now), capped}
