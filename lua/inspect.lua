-- inspect.lua: a key's state now, for `enforcer keys show`. Reads only: nothing is written,
-- refill is computed as debit.lua would, as of Redis TIME.
--
-- KEYS[1]  main bucket        ptb:{<sha256 of key>}:b
-- KEYS[2]  operational bucket ptb:{<sha256 of key>}:ops
-- KEYS[3]  tier assignment    ptb:{<sha256 of key>}:tier
-- KEYS[4]  quota usage        ptb:{<sha256 of key>}:q  (returned raw: the daemon knows the
--                             calendar, and reads it against the period containing `now`)
-- KEYS[5]  wallet             ptb:{<sha256 of key>}:w   (returned as stored: the daemon
--                             parses it and leaves out what expired by now)
-- ARGV     as debit.lua's ARGV[4..]: active window, default tier, kind (ignored), n, tiers
--          (5 per tier), then the operational bucket's max_tokens and refill_per_sec.
--
-- Returns {assigned, tier, main balance, main stored, ops balance, ops stored, now, quota}: assigned
-- the raw assignment ("" none); tier the tier charged ("" unknown key); balances as strings;
-- "stored" "1" when the bucket exists in Redis, "0" when a first request would start it fresh.
-- Then the wallet as stored ("" none): {…, now, quota, wallet}.

local function fmt(x)
  return string.format('%.17g', x)
end

local window = tonumber(ARGV[1])
local default_tier = ARGV[2]
local n = tonumber(ARGV[4])
local got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local main, ops, assigned = got[1], got[2], got[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function refilled(stored, max_tokens, rate, idle_cap, initial)
  if not stored then return initial, '0' end
  local b, u = string.match(stored, '^(%S+) (%S+)$')
  local balance, updated = tonumber(b), tonumber(u)
  if balance == nil or updated == nil then return initial, '0' end
  local elapsed = math.max(0, now - updated)
  local cap = max_tokens
  if elapsed > window then cap = max_tokens * idle_cap end
  if balance < cap then balance = math.min(cap, balance + elapsed * rate) end
  return balance, '1'
end

local tier, fallback
for i = 0, n - 1 do
  local base = 5 + 5 * i
  if ARGV[base] == assigned then tier = base end
  if ARGV[base] == default_tier then fallback = base end
end
tier = tier or fallback
local main_balance, main_stored = '0', main and '1' or '0'
local tier_name = ''
if tier then
  tier_name = ARGV[tier]
  local b, s = refilled(main, tonumber(ARGV[tier + 1]), tonumber(ARGV[tier + 2]),
    tonumber(ARGV[tier + 3]), tonumber(ARGV[tier + 4]))
  main_balance, main_stored = fmt(b), s
end
local ops_max = tonumber(ARGV[5 + 5 * n])
local ops_rate = tonumber(ARGV[6 + 5 * n])
local ob, os = refilled(ops, ops_max, ops_rate, 1, ops_max)
return {assigned or '', tier_name, main_balance, main_stored, fmt(ob), os, fmt(now), got[4] or '',
  got[5] or ''}
