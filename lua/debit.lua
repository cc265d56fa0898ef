-- debit.lua: the PTB-CWD debit, atomic in Redis. Mirrors enforcer/src/debit.rs (the rule is
-- documented there and in docs/architecture.md). O(1): a fixed number of single-key commands.
--
-- KEYS: the bucket and the tier assignment, then, in this order, only the keys this debit uses
-- (each key given costs Redis ~2.4 k instructions, used or not):
-- KEYS[1]  bucket             ptb:{<sha256 of key>}:b  (or :ops)   "<balance> <updated_at seconds>"
-- KEYS[2]  tier assignment    ptb:{<sha256 of key>}:tier           (string, set by operators)
--          wallet             main bucket only (kind m or M): ptb:{<sha256 of key>}:w, grants
--                             that expire or have a priority, one line each in spend order:
--                             "<priority> <expires_at|-> <granted_at> <left> <grant id>"
--                             (enforcer/src/wallet.rs)
--          request record     record ttl > 0 only: ptb:{<sha256 of key>}:r:<request id>
--          quota usage        main bucket with a quota tier count > 0 only:
--                             ptb:{<sha256 of key>}:q  "<period start> <used>" (calendar quotas)
--          key limit          main bucket with a key limit in ARGV only: a shared budget
--                             member's own bucket, ptb:{budget:<name>}:k:<sha256>
--                             "<balance> <updated_at>"
--          candidate bucket   optional, last: the shadow candidate policy's bucket (enforcer/src/
--                             shadow.rs), ptc:{<sha256 of key>}:b (ptc:{budget:<name>}:b for a
--                             shared budget), "<balance> <updated_at>"; given only for a main
--                             bucket's unforced debit when a candidate is configured
--
-- For a member of a shared budget (enforcer/src/budget.rs) the daemon names the budget's keys
-- instead of the key's own: ptb:{budget:<name>}:b, :tier, :w, :q, and the request record
-- ptb:{budget:<name>}:r:<sha256 of key>:<request id> (request ids stay per key), and passes the
-- budget's tier as the default tier.
-- ARGV[1]  cost               tokens, finite, > 0
-- ARGV[2]  record ttl         milliseconds, integer >= 0; 0: no request record (a request id
--                             the daemon generated and does not remember, store::Debit::
--                             remembered): no record key is given
-- ARGV[3]  fingerprint        hex digits: what the request id is bound to (bucket, method,
--                             endpoint, units; see store::Fingerprint)
-- ARGV[4]  active window      seconds, >= 0
-- ARGV[5]  default tier       name, or "" to refuse keys without an assignment
-- ARGV[6]  bucket kind        "m" (main) or "o" (operational), kept in the request record;
--                             "M" / "O": the same bucket, FORCED: charged even when the balance
--                             cannot pay (it may go below zero), for spending that already
--                             happened (fail-soft local decisions debited back, enforcer/src/
--                             decision/local.rs). A forced debit is remembered like any allowed one (a
--                             retry under its id is a free replay) and is not refundable.
-- ARGV[7]  tiers              every tier in one argument, a line each, each line preceded
--                             by "\n": "\n<name> <index> <max_tokens> <refill_per_sec>
--                             <idle_cap> <initial_tokens>", index 0, 1, ... in order (tier
--                             names are [a-z0-9_-], enforcer/src/config.rs). One argument: Redis
--                             spends about as much on each argument as on a tier's lookup here.
-- ARGV[8]                  units        the units the cost was computed for (> 0), kept in the
--                                       request record for a settle in units (lua/settle.lua)
-- ARGV[9]                  max_cost     the endpoint's cap on a settle, tokens, or "-" (none)
-- ARGV[10]                 m            number of tiers with a calendar quota that follow
-- ARGV[11+6j .. 16+6j]                  name, amount, b0, b1, b2, b3: four consecutive period
--                                       starts the daemon computed around its clock (Lua has
--                                       no time zones); the period containing Redis TIME counts
-- ARGV[11+6m], ARGV[12+6m]              key limit: max_tokens and refill_per_sec of the key limit key, or
--                                       "-" "-": none
-- With a candidate key only (the CANDIDATE block below), c = 13+6m:
-- ARGV[c]                  candidate cost         tokens, finite, > 0
-- ARGV[c+1+4i .. c+4+4i]   candidate tier i       max_tokens, refill_per_sec, idle_cap,
--                                                 initial_tokens of the candidate bucket of
--                                                 the tier of index i above
--
-- Returns {status, allowed, remaining, retry_after_ms, tier, cost, replayed, at,
--          denied_by, quota_used, quota_amount, quota_resets_at, grant_moves}, and with a
--          candidate key,
--          when the key's debit was decided (status ok, not a replay), two more:
--          candidate_allowed ("1" or "0") and candidate_remaining (a string). Trailing empty
--          fields are left out: a replay, a conflict or an unknown key answers the first 7,
--          a decision without quota, grant moves or candidate the first 9 (the reader takes a
--          missing field as "")
--   status "ok", "unknown_key" or "conflict" (the request id was used for another request);
--   remaining and cost as strings (Redis truncates Lua numbers to integers); retry_after_ms -1
--   when refill can never cover the cost; at: the Redis TIME of the debit (what remaining is
--   as of: the kernel gate's snapshots are stamped and ordered with it), "" when nothing was
--   debited (a replay, an unknown key, a conflict). denied_by: "bucket", "quota", "both" or
--   "" (allowed); the quota fields "" when the tier has no quota (or a main bucket was not
--   debited). remaining counts the wallet's grants. grant_moves: one line per wallet grant
--   touched, "s <tokens> <grant id>" for what it paid, "x <tokens> <grant id>" for one found
--   expired (its tokens forfeited); "" when none.
--
-- Wallet (the WALLET blocks): expired grants are dropped first; the bucket's part of the
-- decision is "bucket plus live grants cover the cost"; an allowed cost is taken from the
-- grants in their stored (spend) order, the rest from the bucket; a denial takes nothing.
--
-- Calendar quota (the QUOTA block below): the bucket and the quota must both allow, and a
-- denial charges neither (the bucket is still written with its refill, as any denial). Usage
-- stored for another period start is over: the period starts at 0. A forced debit counts
-- against the quota too. Redis TIME in none of the periods passed: an error, nothing written.
-- The request record keeps the period start charged (field 4) so a refund or a settle moves
-- the usage of that period only.
--
-- Candidate (the CANDIDATE blocks): a plain PTB-CWD bucket of its own (refill, idle cap,
-- initial tokens, expiry as the main bucket's, with the candidate tier's numbers), charged the
-- candidate cost when it can pay it. It reads nothing the real decision wrote and the real
-- decision reads nothing of it: it never changes the real outcome. Wallet grants, quotas and
-- key limits do not apply to it. Replays, conflicts and unknown keys return before it, so a
-- retried request id never debits it twice.
--
-- Request ids follow payment APIs' idempotency keys: an allowed request is remembered with its
-- fingerprint for the record ttl. The same id with the same fingerprint is a retry: answered
-- with the first outcome, charged nothing. With another fingerprint it is a conflict: refused,
-- charged nothing, the record kept. Once refunded, the same request is a new attempt and is
-- charged again. A denied request is not remembered (it charged nothing).
-- Bad arguments are an error reply starting with "ERR enforcer:"; nothing is written then.

local function fail(msg)
  error({err = 'ERR enforcer: ' .. msg})
end

-- `s` as a finite number >= min, else an error naming `what` (an argument, or a field of one).
local function number(s, what, min)
  local v = tonumber(s)
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

-- A bucket's balance now, from its stored "<balance> <updated_at>" (or `initial` when it has
-- none): refilled at `rate` since `updated`, up to `max_tokens`, or to `max_tokens * idle_cap`
-- once it has been idle longer than `window`; a balance above that (credits) is kept.
local function refilled(raw, now, window, initial, max_tokens, idle_cap, rate)
  local balance, updated
  if raw then
    local b, u = string.match(raw, '^(%S+) (%S+)$')
    balance, updated = tonumber(b), tonumber(u)
  end
  if balance == nil or updated == nil then
    return initial
  end
  local elapsed = math.max(0, now - updated)
  local ceiling = max_tokens
  if elapsed > window then ceiling = max_tokens * idle_cap end
  if balance < ceiling then
    balance = math.min(ceiling, balance + elapsed * rate)
  end
  return balance
end

local cost = number(ARGV[1], 'cost', 0)
if cost <= 0 or cost > 1e15 then fail('cost must be > 0 and <= 1e15') end
local ttl = number(ARGV[2], 'record ttl', 0)
local remember = ttl > 0
local fingerprint = ARGV[3]
if fingerprint == nil or not string.match(fingerprint, '^%x+$') then
  fail('fingerprint must be hex digits')
end
local active_window = number(ARGV[4], 'active window', 0)
local default_tier = ARGV[5]
local kind = ARGV[6]
if kind ~= 'm' and kind ~= 'o' and kind ~= 'M' and kind ~= 'O' then
  fail('bucket kind must be m, o, M or O')
end
local forced = kind == 'M' or kind == 'O'
local tiers = ARGV[7]
if tiers == nil or string.byte(tiers, 1) ~= 10 then fail('tiers must be lines each after a "\\n"') end
local units = number(ARGV[8], 'units', 0)
if units <= 0 then fail('units must be > 0') end
local max_cost = ARGV[9]
if max_cost ~= '-' then
  local m = number(ARGV[9], 'max_cost', 0)
  if m <= 0 then fail('max_cost must be > 0 or -') end
end

local main = kind == 'm' or kind == 'M'
-- Calendar quotas and key limits are a main bucket's only.
local quota_count = 0
if main then quota_count = number(ARGV[10], 'quota tier count', 0) end
local lbase = 11 + 6 * quota_count
if main and ARGV[lbase - 1] == nil then fail('missing quota parameters') end
if main and ARGV[lbase] == nil then fail('missing key limit arguments') end
local limited = main and ARGV[lbase] ~= '-'

-- Which keys were given (see KEYS above), and one read (same hash tag, so the same cluster
-- slot) of all of them but the bucket's: k_* is a key's place in KEYS and in the read.
local n = 2
local k_wallet, k_record, k_quota, k_limit, k_candidate
if main then n = n + 1; k_wallet = n end
if remember then n = n + 1; k_record = n end
if quota_count > 0 then n = n + 1; k_quota = n end
if limited then n = n + 1; k_limit = n end
if #KEYS == n + 1 then
  k_candidate = n + 1
elseif #KEYS ~= n then
  fail('expected ' .. n .. ' keys for these arguments (' .. (n + 1) .. ' with a candidate), got ' ..
    #KEYS)
end
-- KEYS[2] first: got[1] is the tier assignment, got[2] the bucket, then as in KEYS.
local got = redis.call('MGET', KEYS[2], KEYS[1], unpack(KEYS, 3))
local assigned, bucket = got[1], got[2]
local record = k_record and got[k_record]
local stored_wallet = k_wallet and got[k_wallet]

if record then
  local f = {}
  for part in string.gmatch(record, '[^|]+') do f[#f + 1] = part end
  -- Bound to another request (a record without a fingerprint predates them: a retry).
  if f[9] ~= nil and f[9] ~= fingerprint then
    return {'conflict', 0, f[3], -1, f[5], f[6], 0}
  end
  -- An idempotent retry returns the recorded outcome and charges nothing; after a refund the
  -- request is charged again, as a new attempt.
  if f[8] ~= '1' then
    return {'ok', tonumber(f[2]), f[3], 0, f[5], f[6], 1}
  end
end

-- The key's tier: its assignment when the config has that tier, else the default tier.
local function tier_line(name)
  if not name or name == '' then return nil end
  local at = string.find(tiers, '\n' .. name .. ' ', 1, true)
  if at == nil then return nil end
  local t_name, t_index, t_max, t_rate, t_idle, t_initial = string.match(tiers,
    '^\n([^ \n]+) ([^ \n]+) ([^ \n]+) ([^ \n]+) ([^ \n]+) ([^ \n]+)', at)
  if t_name == nil then fail('unreadable tier line') end
  -- Exactly this name (an assignment with a space in it must not match a longer line).
  if t_name ~= name then return nil end
  return t_name, t_index, t_max, t_rate, t_idle, t_initial
end
local tier_name, tier_index, tier_max, tier_rate, tier_idle, tier_initial = tier_line(assigned)
if tier_name == nil then
  tier_name, tier_index, tier_max, tier_rate, tier_idle, tier_initial = tier_line(default_tier)
end
if tier_name == nil then
  return {'unknown_key', 0, '0', -1, '', ARGV[1], 0}
end
local max_tokens = number(tier_max, 'max_tokens', 0)
local rate = number(tier_rate, 'refill_per_sec', 0)
local idle_cap = number(tier_idle, 'idle_cap', 0)
local initial = number(tier_initial, 'initial_tokens', 0)

-- Server time, never the caller's clock (skewed nodes would double-spend).
local t = redis.call('TIME')
-- Written as text without string.format (the costliest step of a short script), and read
-- back, so that the number and the text stored and answered are the same value.
local us = t[2]
local now_s = t[1] .. (#us == 6 and '.' or string.sub('.00000', 1, 7 - #us)) .. us
local now = now_s + 0

local balance = refilled(bucket, now, active_window, initial, max_tokens, idle_cap, rate)

-- >>> WALLET: expired grants dropped (reported), the rest held in spend order.
local grants, held, moves = {}, 0, {}
if stored_wallet then
  for line in string.gmatch(stored_wallet, '[^\n]+') do
    local p, e, g, l, id = string.match(line, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    local left = tonumber(l)
    if left == nil then fail('unreadable wallet line') end
    if e ~= '-' and tonumber(e) <= now then
      if left > 0 then moves[#moves + 1] = 'x ' .. l .. ' ' .. id end
    else
      grants[#grants + 1] = {p, e, g, left, id}
      held = held + left
    end
  end
end
-- <<< WALLET

local bucket_ok = balance + held >= cost or forced

-- >>> QUOTA: calendar quota of the tier (enforcer/src/quota.rs `decide` is the same rule).
-- Decided before anything is written, so a bad period argument writes nothing.
local quota_ok, q_amount, q_start, q_end, q_used = true, nil, nil, nil, nil
if main then
  local qbase = 10
  for j = 0, quota_count - 1 do
    local b = qbase + 1 + 6 * j
    if ARGV[b] == nil then fail('missing quota parameters') end
    if ARGV[b] == tier_name then
      q_amount = number(ARGV[b + 1], 'quota amount', 0)
      for i = 0, 2 do
        local lo = number(ARGV[b + 2 + i], 'quota boundary', 0)
        local hi = number(ARGV[b + 3 + i], 'quota boundary', 0)
        if lo <= now and now < hi then q_start, q_end = lo, hi end
      end
      if q_start == nil then
        fail('Redis TIME ' .. now_s .. ' is outside the quota periods passed (' .. ARGV[b + 2] ..
          ' .. ' .. ARGV[b + 5] .. '): daemon and Redis clocks disagree by more than a period')
      end
      q_used = 0
      local usage = got[k_quota]
      if usage then
        local s, u = string.match(usage, '^(%S+) (%S+)$')
        if tonumber(s) == q_start and tonumber(u) ~= nil then q_used = tonumber(u) end
      end
      quota_ok = forced or q_used + cost <= q_amount
    end
  end
end
-- <<< QUOTA

-- >>> KEY LIMIT: a shared budget member's own bucket (no idle cap), beside the budget.
local limit_ok, l_balance, l_max, l_rate = true, nil, nil, nil
if limited then
  l_max = number(ARGV[lbase], 'key limit max_tokens', 0)
  l_rate = number(ARGV[lbase + 1], 'key limit refill_per_sec', 0)
  if l_max <= 0 or l_rate <= 0 then fail('key limit must be > 0') end
  l_balance = l_max
  local stored = got[k_limit]
  if stored then
    local b, u = string.match(stored, '^(%S+) (%S+)$')
    if tonumber(b) ~= nil and tonumber(u) ~= nil then
      l_balance = math.min(l_max, tonumber(b) + math.max(0, now - tonumber(u)) * l_rate)
    end
  end
  limit_ok = forced or l_balance >= cost
end
-- <<< KEY LIMIT

-- >>> CANDIDATE: its arguments, checked before anything is written.
local c_cost, c_max, c_rate, c_idle, c_initial
if k_candidate then
  if kind ~= 'm' then fail('a candidate is evaluated for unforced main-bucket debits only') end
  local cbase = lbase + 2
  c_cost = number(ARGV[cbase], 'candidate cost', 0)
  if c_cost <= 0 or c_cost > 1e15 then fail('candidate cost must be > 0 and <= 1e15') end
  local ci = cbase + 1 + 4 * number(tier_index, 'tier index', 0)
  c_max = number(ARGV[ci], 'candidate max_tokens', 0)
  c_rate = number(ARGV[ci + 1], 'candidate refill_per_sec', 0)
  c_idle = number(ARGV[ci + 2], 'candidate idle_cap', 0)
  c_initial = number(ARGV[ci + 3], 'candidate initial_tokens', 0)
end
-- <<< CANDIDATE

local allowed = 0
local retry = -1
local denied_by = ''
if bucket_ok and quota_ok and limit_ok then
  -- >>> WALLET: grants first, in spend order; the rest from the bucket.
  local rest = cost
  for _, gr in ipairs(grants) do
    if rest <= 0 then break end
    local take = math.min(gr[4], rest)
    if take > 0 then
      gr[4] = gr[4] - take
      rest = rest - take
      held = held - take
      moves[#moves + 1] = 's ' .. fmt(take) .. ' ' .. gr[5]
    end
  end
  -- <<< WALLET
  balance = balance - rest
  allowed = 1
  retry = 0
  -- >>> QUOTA: charged with the bucket; kept until its period is over.
  if q_start ~= nil then
    q_used = q_used + cost
    redis.call('SET', KEYS[k_quota], fmt(q_start) .. ' ' .. fmt(q_used),
      'PX', math.max(1, math.ceil((q_end - now) * 1000)))
  end
  -- <<< QUOTA
  -- >>> KEY LIMIT: charged with the budget; forgotten once it has refilled.
  if l_balance ~= nil then
    l_balance = l_balance - cost
    redis.call('SET', KEYS[k_limit], fmt(l_balance) .. ' ' .. now_s,
      'PX', math.ceil((l_max - l_balance) / l_rate * 1000) + 1000)
  end
  -- <<< KEY LIMIT
elseif bucket_ok and quota_ok then
  -- >>> KEY LIMIT: only the member's own limit refuses; it refills at its own rate.
  denied_by = 'key_limit'
  if cost <= l_max then retry = math.ceil((cost - l_balance) / l_rate * 1000) end
  -- <<< KEY LIMIT
else
  if not bucket_ok and rate > 0 and cost - held <= max_tokens then
    retry = math.ceil((cost - held - balance) / rate * 1000)
  end
  if bucket_ok then denied_by = 'quota' elseif quota_ok then denied_by = 'bucket' else denied_by = 'both' end
  -- >>> QUOTA: the reset; never (-1) for a cost above the allowance, or when the bucket never
  -- will. Both refusing: the later of the two.
  if not quota_ok then
    local at_reset = -1
    if cost <= q_amount then at_reset = math.ceil((q_end - now) * 1000) end
    if bucket_ok then
      retry = at_reset
    elseif retry >= 0 and at_reset >= 0 then
      retry = math.max(retry, at_reset)
    else
      retry = -1
    end
  end
  -- <<< QUOTA
end

-- >>> WALLET: written back only when a grant was spent or found expired.
if stored_wallet and #moves > 0 then
  local lines = {}
  for _, gr in ipairs(grants) do
    if gr[4] > 0 then
      lines[#lines + 1] = gr[1] .. ' ' .. gr[2] .. ' ' .. gr[3] .. ' ' .. fmt(gr[4]) .. ' ' .. gr[5]
    end
  end
  if #lines > 0 then
    redis.call('SET', KEYS[k_wallet], table.concat(lines, '\n'))
  else
    redis.call('DEL', KEYS[k_wallet])
  end
end
-- <<< WALLET

local bucket_left = fmt(balance)
local remaining = bucket_left
if held ~= 0 then remaining = fmt(balance + held) end
-- A balance above what refill reaches (an operator's grant) is kept: forgetting restarts at
-- initial_tokens and would take the granted credits away.
if rate > 0 and balance <= max_tokens * idle_cap then
  -- Forgotten once refill alone would have brought it to the idle ceiling (from below zero,
  -- after a forced debit, that takes longer: forgetting earlier would forgive the debt).
  redis.call('SET', KEYS[1], bucket_left .. ' ' .. now_s,
    'PX', math.ceil((active_window + (max_tokens - math.min(0, balance)) / rate) * 1000))
else
  redis.call('SET', KEYS[1], bucket_left .. ' ' .. now_s)
end
if allowed == 1 and remember then
  -- kind|allowed|remaining|quota start|tier|cost|max_tokens|refunded|fingerprint|units|max_cost
  -- (lua/settle.lua appends what a settle did, and sets cost to the true cost; field 4 was the
  -- retry time, always '0' for an allowed request, and '0' still means no quota charged)
  redis.call('SET', KEYS[k_record],
    kind .. '|1|' .. remaining .. '|' .. (q_start and fmt(q_start) or '0') .. '|' .. tier_name ..
      '|' .. ARGV[1] .. '|' .. tier_max .. '|0|' .. fingerprint .. '|' .. ARGV[8] ..
      '|' .. max_cost,
    'PX', ttl)
end
-- The quota and grant fields only when there is something in them (each field of a reply
-- costs Redis about as much as an argument).
local reply = {'ok', allowed, remaining, retry, tier_name, ARGV[1], 0, now_s, denied_by}
if q_start ~= nil or #moves > 0 or c_cost ~= nil then
  if q_start ~= nil then
    reply[10], reply[11], reply[12] = fmt(q_used), fmt(q_amount), fmt(q_end)
  else
    reply[10], reply[11], reply[12] = '', '', ''
  end
  reply[13] = table.concat(moves, '\n')
end

-- >>> CANDIDATE: the same rule as the main bucket above (enforcer/src/debit.rs `settle`).
if c_cost ~= nil then
  local c_balance = refilled(got[k_candidate], now, active_window, c_initial, c_max, c_idle, c_rate)
  local c_allowed = '0'
  if c_balance >= c_cost then
    c_balance = c_balance - c_cost
    c_allowed = '1'
  end
  if c_rate > 0 and c_balance <= c_max * c_idle then
    redis.call('SET', KEYS[k_candidate], fmt(c_balance) .. ' ' .. now_s,
      'PX', math.ceil((active_window + (c_max - math.min(0, c_balance)) / c_rate) * 1000))
  else
    redis.call('SET', KEYS[k_candidate], fmt(c_balance) .. ' ' .. now_s)
  end
  reply[14] = c_allowed
  reply[15] = fmt(c_balance)
end
-- <<< CANDIDATE
return reply
