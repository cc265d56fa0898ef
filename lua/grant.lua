-- grant.lua: an operator's grant of tokens to one key's main bucket (`enforcer keys grant`),
-- atomic with the key's debits. Mirrors enforcer/src/debit.rs `grant` (the in-process store).
--
-- KEYS[1]  main bucket        ptb:{<sha256 of key>}:b      "<balance> <updated_at seconds>"
-- KEYS[2]  tier assignment    ptb:{<sha256 of key>}:tier
-- KEYS[3]  grant record       ptb:{<sha256 of key>}:g:<grant id>
-- KEYS[4]  wallet             ptb:{<sha256 of key>}:w   (format: lua/debit.lua)
-- ARGV[1]  tokens             finite, > 0, <= 1e15
-- ARGV[2]  record ttl         milliseconds, integer > 0
-- ARGV[3]  active window      seconds, >= 0
-- ARGV[4]  default tier       name, or "" (keys without an assignment cannot be granted to)
-- ARGV[5]  n                  number of tiers that follow
-- ARGV[6+6i .. 11+6i]         name, max_tokens, refill_per_sec, idle_cap, initial_tokens,
--                             grant_ceiling
-- ARGV[6+6n]               expires in   seconds (> 0), or "-": never
-- ARGV[7+6n]               priority     integer, or "-"
-- ARGV[8+6n]               max grants   how many grants a wallet may hold
-- ARGV[9+6n]               grant id     as in KEYS[3] (printable ASCII, no spaces)
--
-- With neither an expiry nor a priority, the tokens top up the bucket (spent last, kept for
-- ever). With either, the grant goes to the wallet, in its place in the spend order (higher
-- priority, then earlier expiry, never-expiring last, then older), spent before the bucket by
-- debit.lua. The ceiling counts the bucket and the wallet's live grants.
--
-- Refill is applied first (the grant comes on top of what the key earned), then the tokens are
-- added whole; a grant that would lift the balance above the tier's grant_ceiling is refused
-- whole, nothing written. The grant id makes a retried grant a replay, never a second credit.
--
-- Returns {status, balance, tier, at, ceiling, expires_at, expired}: status "ok", "replay"
-- (this grant id was applied before: balance is the balance it left), "unknown_key",
-- "over_ceiling" (balance: the balance now) or "too_many_grants"; numbers as strings; at: Redis
-- TIME; balance counts bucket and wallet; expires_at: the wallet grant's, or "-"; expired:
-- "x <tokens> <grant id>" lines of wallet grants found expired (dropped, only when "ok").
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
  if v < min then fail(what .. ' must be >= ' .. min) end
  return v
end

local function fmt(x)
  return string.format('%.17g', x)
end

if #KEYS ~= 4 then fail('expected 4 keys') end
local tokens = number(1, 'tokens', 0)
if tokens <= 0 or tokens > 1e15 then fail('tokens must be > 0 and <= 1e15') end
local ttl = number(2, 'record ttl', 1)
local active_window = number(3, 'active window', 0)
local default_tier = ARGV[4]
local n = number(5, 'tier count', 1)
local expires_in = ARGV[6 + 6 * n]
if expires_in ~= '-' then
  expires_in = number(6 + 6 * n, 'expires in', 0)
  if expires_in <= 0 then fail('expires in must be > 0 or -') end
end
local priority = ARGV[7 + 6 * n]
if priority ~= '-' then
  priority = number(7 + 6 * n, 'priority', -1e15)
  if priority ~= math.floor(priority) or priority > 1e15 then
    fail('priority must be an integer')
  end
end
local max_grants = number(8 + 6 * n, 'max grants', 1)
local in_wallet = expires_in ~= '-' or priority ~= '-'
local grant_id = ARGV[9 + 6 * n]
if grant_id == nil or not string.match(grant_id, '^[!-~]+$') then
  fail('grant id must be printable ASCII without spaces')
end

local got = redis.call('MGET', KEYS[3], KEYS[2], KEYS[1], KEYS[4])
local record, assigned, bucket, stored_wallet = got[1], got[2], got[3], got[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if record then
  local b, tier_name, c, e = string.match(record, '^(%S+) (%S+) (%S+) ?(%S*)$')
  if e == nil or e == '' then e = '-' end
  return {'replay', b, tier_name, fmt(now), c, e, ''}
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
if tier == nil then return {'unknown_key', '0', '', fmt(now), '0', '-', ''} end
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

-- The wallet's live grants (expired ones dropped and reported if the grant is made).
local grants, held, expired = {}, 0, {}
local duplicate = false
if stored_wallet then
  for line in string.gmatch(stored_wallet, '[^\n]+') do
    local p, e, g, l, id = string.match(line, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    local left = tonumber(l)
    if left == nil then fail('unreadable wallet line') end
    if e ~= '-' and tonumber(e) <= now then
      if left > 0 then expired[#expired + 1] = 'x ' .. l .. ' ' .. id end
    else
      grants[#grants + 1] = {tonumber(p), e, tonumber(g), left, id, line}
      held = held + left
      if id == grant_id then duplicate = true end
    end
  end
end

-- Its record expired, but the grant is still held: a late retry, not a second grant.
if in_wallet and duplicate then
  return {'replay', fmt(balance + held), tier_name, fmt(now), fmt(ceiling), '-', ''}
end
if balance + held + tokens > ceiling then
  return {'over_ceiling', fmt(balance + held), tier_name, fmt(now), fmt(ceiling), '-', ''}
end
local expires_at = '-'
if in_wallet then
  if #grants >= max_grants then
    return {'too_many_grants', fmt(balance + held), tier_name, fmt(now), fmt(ceiling), '-', ''}
  end
  local p = priority
  if p == '-' then p = 0 end
  local e = math.huge
  if expires_in ~= '-' then
    e = now + expires_in
    expires_at = fmt(e)
  end
  -- Its place in the spend order: before the first grant it spends before.
  local at = #grants + 1
  for i, gr in ipairs(grants) do
    local ge = math.huge
    if gr[2] ~= '-' then ge = tonumber(gr[2]) end
    if p > gr[1] or (p == gr[1] and (e < ge or (e == ge and now < gr[3]))) then
      at = i
      break
    end
  end
  table.insert(grants, at, {p, expires_at, now, tokens, grant_id})
  local lines = {}
  for _, gr in ipairs(grants) do
    if gr[6] then
      lines[#lines + 1] = gr[6]
    else
      lines[#lines + 1] = string.format('%d', gr[1]) .. ' ' .. gr[2] .. ' ' .. fmt(gr[3]) ..
        ' ' .. fmt(gr[4]) .. ' ' .. gr[5]
    end
  end
  redis.call('SET', KEYS[4], table.concat(lines, '\n'))
  held = held + tokens
else
  balance = balance + tokens
  if rate > 0 and balance <= max_tokens * idle_cap then
    redis.call('SET', KEYS[1], fmt(balance) .. ' ' .. fmt(now),
      'PX', math.ceil((active_window + (max_tokens - math.min(0, balance)) / rate) * 1000))
  else
    redis.call('SET', KEYS[1], fmt(balance) .. ' ' .. fmt(now))
  end
  if #expired > 0 then
    local lines = {}
    for _, gr in ipairs(grants) do lines[#lines + 1] = gr[6] end
    if #lines > 0 then
      redis.call('SET', KEYS[4], table.concat(lines, '\n'))
    else
      redis.call('DEL', KEYS[4])
    end
  end
end
local after = fmt(balance + held)
redis.call('SET', KEYS[3], after .. ' ' .. tier_name .. ' ' .. fmt(ceiling) .. ' ' .. expires_at,
  'PX', ttl)
return {'ok', after, tier_name, fmt(now), fmt(ceiling), expires_at, table.concat(expired, '\n')}
