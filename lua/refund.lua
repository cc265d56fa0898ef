-- refund.lua: gives back the cost of a request the upstream failed. Mirrors the in-process
-- store's refund. Each request id is refunded at most once.
--
-- KEYS[1]  main bucket        ptb:{<sha256 of key>}:b   "<balance> <updated_at>"
-- KEYS[2]  request record     ptb:{<sha256 of key>}:r:<request id>  (written by debit.lua)
-- KEYS[3]  quota usage        ptb:{<sha256 of key>}:q  "<period start> <used>": the cost is
--                             given back to the calendar quota too, only while the usage kept
--                             is that of the period the request was charged in (record field 4)
--
-- Returns {status, credited, balance, as_of, tier, now}: status "ok", "unknown_request",
-- "already_refunded" or "not_refundable" (operational requests); credited and balance as
-- strings; as_of: the time balance holds for (the bucket's refill clock, which a refund keeps),
-- "" when the bucket was forgotten (its balance is unknown); tier: the tier the request was
-- charged under; now: Redis TIME. The daemon tells its kernel gate the new balance with them.

if #KEYS ~= 3 then error({err = 'ERR enforcer: expected 3 keys'}) end

local record = redis.call('GET', KEYS[2])
if not record then return {'unknown_request', '0', '0', '', '', '0'} end
local f = {}
for part in string.gmatch(record, '[^|]+') do f[#f + 1] = part end
if f[1] ~= 'm' then return {'not_refundable', '0', '0', '', '', '0'} end
if f[8] == '1' then return {'already_refunded', '0', '0', '', '', '0'} end

local cost = tonumber(f[6])
local max_tokens = tonumber(f[7])
local credited = 0
local bucket = redis.call('GET', KEYS[1])
local balance, updated
if bucket then
  local b, u = string.match(bucket, '^(%S+) (%S+)$')
  balance, updated = tonumber(b), u
end
if balance ~= nil and updated ~= nil then
  -- Capped at capacity; a balance already above it (a grant) is left alone. The refill clock
  -- (updated) and the expiry are kept.
  if balance < max_tokens then
    local after = math.min(max_tokens, balance + cost)
    credited = after - balance
    balance = after
    redis.call('SET', KEYS[1], string.format('%.17g', balance) .. ' ' .. updated, 'KEEPTTL')
  end
else
  -- The bucket was forgotten after a long idle period: it already refilled past the cost.
  balance = 0
  updated = ''
end
-- >>> QUOTA: the usage of the period charged gets the cost back (never below 0).
if f[4] ~= nil and f[4] ~= '0' then
  local q = redis.call('GET', KEYS[3])
  if q then
    local s, u = string.match(q, '^(%S+) (%S+)$')
    if s == f[4] and tonumber(u) ~= nil then
      redis.call('SET', KEYS[3], s .. ' ' .. string.format('%.17g', math.max(0, tonumber(u) - cost)),
        'KEEPTTL')
    end
  end
end
-- <<< QUOTA
f[8] = '1'
redis.call('SET', KEYS[2], table.concat(f, '|'), 'KEEPTTL')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return {'ok', string.format('%.17g', credited), string.format('%.17g', balance), updated, f[5],
  string.format('%.17g', now)}
