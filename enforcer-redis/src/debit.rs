//! The debit rule of `lua/debit.lua`, line for line, as a pure function: the values of the
//! keys and the server time in, the writes and the reply out. `lib.rs` reads the keys, calls
//! [`debit`] and applies what it returns; nothing here touches Redis, so every refusal happens
//! before anything is written (the script checks its arguments before its first write too).
//!
//! The script's comments are the specification (keys, arguments, reply); this file follows its
//! blocks in order and names the Lua it reproduces where the translation is not obvious.
//! `tests/tests/redis_module.rs` runs the same calls through both and compares every reply
//! and every stored value.
use crate::lua::{ceil_int, fields, fmt, fmt_owned, split, tonumber};
use std::borrow::Cow;

/// One field of the reply: Lua strings become bulk strings, Lua numbers integers. A bulk
/// string borrows from the call's arguments or stored values where it can: each copy is an
/// allocation inside Redis's one thread.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    Bulk(Cow<'a, [u8]>),
    Int(i64),
}

/// A write, in the script's order: `SET` of `value` (with `PX px` when given) or `DEL`.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Index into KEYS (0-based).
    pub key: usize,
    /// `None`: `DEL`.
    pub value: Option<Vec<u8>>,
    /// Milliseconds to live; `None`: no expiry (a `SET` without `PX` clears one).
    pub px: Option<i64>,
}

/// What a debit does: its writes, then its reply.
#[derive(Debug, Default)]
pub struct Effects<'a> {
    pub writes: Vec<Write>,
    pub reply: Vec<Field<'a>>,
}

/// Redis `TIME`: seconds and microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Time {
    pub secs: i64,
    pub micros: i64,
}

/// A refusal: the text after `ERR enforcer: `.
pub type Refusal = String;

fn fail<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(msg.into())
}

/// `number(s, what, min)` of the script: a finite number >= `min`.
fn number(s: Option<&[u8]>, what: &str, min: f64) -> Result<f64, Refusal> {
    match s.and_then(tonumber) {
        // The script's `v - v ~= 0`: NaN and both infinities.
        Some(v) if v.is_finite() => {
            if v < min {
                fail(format!("{what} must be >= {}", lua_int(min)))
            } else {
                Ok(v)
            }
        }
        _ => fail(format!("{what} must be a finite number")),
    }
}

/// A Lua number concatenated into text (`%.14g`) where the script only ever has integers.
fn lua_int(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// `refilled(raw, now, window, initial, max_tokens, idle_cap, rate)` of the script.
fn refilled(raw: Option<&[u8]>, now: f64, window: f64, b: &Bucket) -> f64 {
    let parsed = raw
        .and_then(fields::<2>)
        .and_then(|[b, u]| Some((tonumber(b)?, tonumber(u)?)));
    let Some((mut balance, updated)) = parsed else {
        return b.initial;
    };
    let elapsed = lua_max(0.0, now - updated);
    let ceiling = if elapsed > window {
        b.max_tokens * b.idle_cap
    } else {
        b.max_tokens
    };
    if balance < ceiling {
        balance = lua_min(ceiling, balance + elapsed * b.rate);
    }
    balance
}

/// Lua 5.1's `math.max(a, b)`: `b` when `b > a`, else `a` (NaN keeps `a`).
fn lua_max(a: f64, b: f64) -> f64 {
    if b > a { b } else { a }
}

/// Lua 5.1's `math.min(a, b)`: `b` when `b < a`, else `a`.
fn lua_min(a: f64, b: f64) -> f64 {
    if b < a { b } else { a }
}

/// A bucket's numbers (a tier's, or the candidate tier's).
struct Bucket {
    max_tokens: f64,
    rate: f64,
    idle_cap: f64,
    initial: f64,
}

/// The bucket's write: with `PX` while refill would bring it back to its idle ceiling.
fn bucket_write(key: usize, balance: f64, now_s: &[u8], window: f64, b: &Bucket) -> Write {
    let mut value = Vec::with_capacity(24 + 1 + now_s.len());
    fmt(balance, &mut value);
    value.push(b' ');
    value.extend_from_slice(now_s);
    let px = (b.rate > 0.0 && balance <= b.max_tokens * b.idle_cap).then(|| {
        ceil_int((window + (b.max_tokens - lua_min(0.0, balance)) / b.rate) * 1000.0).max(1)
    });
    Write {
        key,
        value: Some(value),
        px,
    }
}

/// ARGV[i] (1-based, as in the script) for a Lua number index: a fraction or an index past
/// the end is `nil`.
fn argv<'a>(args: &[&'a [u8]], i: f64) -> Option<&'a [u8]> {
    if i.fract() != 0.0 || i < 1.0 || i > args.len() as f64 {
        return None;
    }
    Some(args[i as usize - 1])
}

fn bulk(s: &[u8]) -> Field<'_> {
    Field::Bulk(Cow::Borrowed(s))
}

fn owned(s: Vec<u8>) -> Field<'static> {
    Field::Bulk(Cow::Owned(s))
}

/// A reply of Lua values: the script's table ends at its first `nil`.
fn until_nil<const N: usize>(fields: [Option<Field<'_>>; N]) -> Vec<Field<'_>> {
    fields.into_iter().map_while(|f| f).collect()
}

/// `lua/debit.lua` on `nkeys` keys whose values (`values[i]`: KEYS[i + 1] as `MGET` read it,
/// `None` for a missing key or one that is not a string) are given, with `args` (ARGV) at
/// server time `now`.
pub fn debit<'a>(
    nkeys: usize,
    values: &[Option<&'a [u8]>],
    args: &[&'a [u8]],
    now: Time,
) -> Result<Effects<'a>, Refusal> {
    let a = |i: usize| args.get(i - 1).copied();
    let cost = number(a(1), "cost", 0.0)?;
    if cost <= 0.0 || cost > 1e15 {
        return fail("cost must be > 0 and <= 1e15");
    }
    let ttl = number(a(2), "record ttl", 0.0)?;
    let remember = ttl > 0.0;
    // The script hands its ttl to `SET … PX`, which takes integers only (a fraction would fail
    // there, after the bucket was written); refused here, before anything is.
    if remember && (ttl.fract() != 0.0 || ttl > 9.0e15) {
        return fail("record ttl must be an integer number of milliseconds");
    }
    let fingerprint = match a(3) {
        Some(f) if !f.is_empty() && f.iter().all(u8::is_ascii_hexdigit) => f,
        _ => return fail("fingerprint must be hex digits"),
    };
    let active_window = number(a(4), "active window", 0.0)?;
    let default_tier = a(5);
    let kind = match a(6) {
        Some(k @ (b"m" | b"o" | b"M" | b"O")) => k[0],
        _ => return fail("bucket kind must be m, o, M or O"),
    };
    let forced = kind.is_ascii_uppercase();
    let tiers = match a(7) {
        Some(t) if t.first() == Some(&b'\n') => t,
        _ => return fail("tiers must be lines each after a \"\\n\""),
    };
    let units = number(a(8), "units", 0.0)?;
    if units <= 0.0 {
        return fail("units must be > 0");
    }
    let max_cost = a(9);
    if max_cost != Some(b"-") {
        let m = number(max_cost, "max_cost", 0.0)?;
        if m <= 0.0 {
            return fail("max_cost must be > 0 or -");
        }
    }
    let max_cost = max_cost.unwrap_or_default();

    let main = kind == b'm' || kind == b'M';
    let quota_count = if main {
        number(a(10), "quota tier count", 0.0)?
    } else {
        0.0
    };
    let lbase = 11.0 + 6.0 * quota_count;
    if main && argv(args, lbase - 1.0).is_none() {
        return fail("missing quota parameters");
    }
    if main && argv(args, lbase).is_none() {
        return fail("missing key limit arguments");
    }
    let limited = main && argv(args, lbase) != Some(b"-");

    // Which keys were given (0-based here).
    let mut n = 2;
    let (mut k_wallet, mut k_record, mut k_quota, mut k_limit) = (None, None, None, None);
    if main {
        k_wallet = Some(n);
        n += 1;
    }
    if remember {
        k_record = Some(n);
        n += 1;
    }
    if quota_count > 0.0 {
        k_quota = Some(n);
        n += 1;
    }
    if limited {
        k_limit = Some(n);
        n += 1;
    }
    let k_candidate = if nkeys == n + 1 {
        Some(n)
    } else if nkeys != n {
        return fail(format!(
            "expected {n} keys for these arguments ({} with a candidate), got {nkeys}",
            n + 1
        ));
    } else {
        None
    };
    let got = |k: Option<usize>| k.and_then(|k| values.get(k).copied().flatten());
    let assigned = got(Some(1));
    let bucket = got(Some(0));
    let record = got(k_record);
    let stored_wallet = got(k_wallet);

    if let Some(record) = record {
        let f: Vec<&[u8]> = split(record, b'|').collect();
        let field = |i: usize| f.get(i - 1).copied();
        if let Some(bound) = field(9)
            && bound != fingerprint
        {
            return Ok(Effects {
                writes: vec![],
                reply: until_nil([
                    Some(bulk(b"conflict")),
                    Some(Field::Int(0)),
                    field(3).map(bulk),
                    Some(Field::Int(-1)),
                    field(5).map(bulk),
                    field(6).map(bulk),
                    Some(Field::Int(0)),
                ]),
            });
        }
        if field(8) != Some(b"1") {
            return Ok(Effects {
                writes: vec![],
                reply: until_nil([
                    Some(bulk(b"ok")),
                    field(2).and_then(tonumber).map(|v| Field::Int(v as i64)),
                    field(3).map(bulk),
                    Some(Field::Int(0)),
                    field(5).map(bulk),
                    field(6).map(bulk),
                    Some(Field::Int(1)),
                ]),
            });
        }
    }

    // The key's tier: its assignment when the config has that tier, else the default tier.
    let tier_line = |name: Option<&[u8]>| -> Result<Option<[&[u8]; 6]>, Refusal> {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        // The first "\n<name> " in the lines (the script's `string.find`, plain).
        let Some(at) = (0..tiers.len()).find(|&i| {
            tiers[i] == b'\n'
                && tiers[i + 1..].starts_with(name)
                && tiers.get(i + 1 + name.len()) == Some(&b' ')
        }) else {
            return Ok(None);
        };
        // '^\n([^ \n]+) ([^ \n]+) … ' six times from `at`, no end anchor.
        let mut rest = &tiers[at + 1..];
        let mut out: [&[u8]; 6] = [&[]; 6];
        for (i, slot) in out.iter_mut().enumerate() {
            let len = rest
                .iter()
                .position(|&b| b == b' ' || b == b'\n')
                .unwrap_or(rest.len());
            if len == 0 {
                return fail("unreadable tier line");
            }
            *slot = &rest[..len];
            rest = &rest[len..];
            if i < 5 {
                if rest.first() != Some(&b' ') {
                    return fail("unreadable tier line");
                }
                rest = &rest[1..];
            }
        }
        // Exactly this name (an assignment with a space in it must not match a longer line).
        Ok((out[0] == name).then_some(out))
    };
    let line = match tier_line(assigned)? {
        Some(line) => Some(line),
        None => tier_line(default_tier)?,
    };
    let Some(
        [
            tier_name,
            tier_index,
            tier_max,
            tier_rate,
            tier_idle,
            tier_initial,
        ],
    ) = line
    else {
        return Ok(Effects {
            writes: vec![],
            reply: vec![
                bulk(b"unknown_key"),
                Field::Int(0),
                bulk(b"0"),
                Field::Int(-1),
                bulk(b""),
                bulk(a(1).unwrap_or_default()),
                Field::Int(0),
            ],
        });
    };
    let tier = Bucket {
        max_tokens: number(Some(tier_max), "max_tokens", 0.0)?,
        rate: number(Some(tier_rate), "refill_per_sec", 0.0)?,
        idle_cap: number(Some(tier_idle), "idle_cap", 0.0)?,
        initial: number(Some(tier_initial), "initial_tokens", 0.0)?,
    };

    // Server time, never the caller's clock; the text is the script's `now_s`.
    let now_s = time_text(now);
    let now_f = tonumber(&now_s).unwrap_or(0.0);

    let mut balance = refilled(bucket, now_f, active_window, &tier);

    // WALLET: expired grants dropped (reported), the rest held in spend order.
    struct Grant<'a> {
        p: &'a [u8],
        e: &'a [u8],
        g: &'a [u8],
        left: f64,
        id: &'a [u8],
    }
    let mut grants: Vec<Grant<'_>> = Vec::new();
    let mut held = 0.0;
    let mut moves: Vec<Vec<u8>> = Vec::new();
    if let Some(wallet) = stored_wallet {
        for line in split(wallet, b'\n') {
            let Some([p, e, g, l, id]) = fields::<5>(line) else {
                return fail("unreadable wallet line");
            };
            let Some(left) = tonumber(l) else {
                return fail("unreadable wallet line");
            };
            let expired = if e == b"-" {
                false
            } else {
                match tonumber(e) {
                    Some(at) => at <= now_f,
                    None => return fail("unreadable wallet line"),
                }
            };
            if expired {
                if left > 0.0 {
                    moves.push([&b"x "[..], l, b" ", id].concat());
                }
            } else {
                grants.push(Grant { p, e, g, left, id });
                held += left;
            }
        }
    }

    let bucket_ok = balance + held >= cost || forced;

    // QUOTA: the tier's calendar quota, decided before anything is written.
    let mut quota_ok = true;
    let (mut q_amount, mut q_start, mut q_end, mut q_used) = (None, None, None, None);
    if main {
        let mut j = 0.0;
        while j <= quota_count - 1.0 {
            let b = 11.0 + 6.0 * j;
            let Some(name) = argv(args, b) else {
                return fail("missing quota parameters");
            };
            if name == tier_name {
                let amount = number(argv(args, b + 1.0), "quota amount", 0.0)?;
                q_amount = Some(amount);
                for i in 0..3 {
                    let i = f64::from(i);
                    let lo = number(argv(args, b + 2.0 + i), "quota boundary", 0.0)?;
                    let hi = number(argv(args, b + 3.0 + i), "quota boundary", 0.0)?;
                    if lo <= now_f && now_f < hi {
                        q_start = Some(lo);
                        q_end = Some(hi);
                    }
                }
                let Some(start) = q_start else {
                    return fail(format!(
                        "Redis TIME {} is outside the quota periods passed ({} .. {}): daemon and \
                         Redis clocks disagree by more than a period",
                        String::from_utf8_lossy(&now_s),
                        String::from_utf8_lossy(argv(args, b + 2.0).unwrap_or_default()),
                        String::from_utf8_lossy(argv(args, b + 5.0).unwrap_or_default()),
                    ));
                };
                let mut used = 0.0;
                if let Some(usage) = got(k_quota)
                    && let Some([s, u]) = fields::<2>(usage)
                    && tonumber(s) == Some(start)
                    && let Some(u) = tonumber(u)
                {
                    used = u;
                }
                q_used = Some(used);
                quota_ok = forced || used + cost <= amount;
            }
            j += 1.0;
        }
    }

    // KEY LIMIT: a shared budget member's own bucket (no idle cap), beside the budget.
    let mut limit_ok = true;
    let mut limit = None;
    if limited {
        let l_max = number(argv(args, lbase), "key limit max_tokens", 0.0)?;
        let l_rate = number(argv(args, lbase + 1.0), "key limit refill_per_sec", 0.0)?;
        if l_max <= 0.0 || l_rate <= 0.0 {
            return fail("key limit must be > 0");
        }
        let mut l_balance = l_max;
        if let Some(stored) = got(k_limit)
            && let Some([b, u]) = fields::<2>(stored)
            && let (Some(b), Some(u)) = (tonumber(b), tonumber(u))
        {
            l_balance = lua_min(l_max, b + lua_max(0.0, now_f - u) * l_rate);
        }
        limit_ok = forced || l_balance >= cost;
        limit = Some((l_balance, l_max, l_rate));
    }

    // CANDIDATE: its arguments, checked before anything is written.
    let mut candidate = None;
    if let Some(k) = k_candidate {
        if kind != b'm' {
            return fail("a candidate is evaluated for unforced main-bucket debits only");
        }
        let cbase = lbase + 2.0;
        let c_cost = number(argv(args, cbase), "candidate cost", 0.0)?;
        if c_cost <= 0.0 || c_cost > 1e15 {
            return fail("candidate cost must be > 0 and <= 1e15");
        }
        let ci = cbase + 1.0 + 4.0 * number(Some(tier_index), "tier index", 0.0)?;
        let c = Bucket {
            max_tokens: number(argv(args, ci), "candidate max_tokens", 0.0)?,
            rate: number(argv(args, ci + 1.0), "candidate refill_per_sec", 0.0)?,
            idle_cap: number(argv(args, ci + 2.0), "candidate idle_cap", 0.0)?,
            initial: number(argv(args, ci + 3.0), "candidate initial_tokens", 0.0)?,
        };
        candidate = Some((k, c_cost, c));
    }

    let mut writes = Vec::with_capacity(4);
    let mut allowed = 0;
    let mut retry = -1;
    let mut denied_by: &[u8] = b"";
    if bucket_ok && quota_ok && limit_ok {
        // WALLET: grants first, in spend order; the rest from the bucket.
        let mut rest = cost;
        for gr in &mut grants {
            if rest <= 0.0 {
                break;
            }
            let take = lua_min(gr.left, rest);
            if take > 0.0 {
                gr.left -= take;
                rest -= take;
                held -= take;
                let mut m = b"s ".to_vec();
                fmt(take, &mut m);
                m.push(b' ');
                m.extend_from_slice(gr.id);
                moves.push(m);
            }
        }
        balance -= rest;
        allowed = 1;
        retry = 0;
        // QUOTA: charged with the bucket; kept until its period is over.
        if let (Some(start), Some(end), Some(used)) = (q_start, q_end, q_used) {
            let used = used + cost;
            q_used = Some(used);
            let mut value = fmt_owned(start);
            value.push(b' ');
            fmt(used, &mut value);
            writes.push(Write {
                key: k_quota.unwrap_or(0),
                value: Some(value),
                px: Some(ceil_int((end - now_f) * 1000.0).max(1)),
            });
        }
        // KEY LIMIT: charged with the budget; forgotten once it has refilled.
        if let Some((l_balance, l_max, l_rate)) = &mut limit {
            *l_balance -= cost;
            let mut value = fmt_owned(*l_balance);
            value.push(b' ');
            value.extend_from_slice(&now_s);
            writes.push(Write {
                key: k_limit.unwrap_or(0),
                value: Some(value),
                px: Some(ceil_int((*l_max - *l_balance) / *l_rate * 1000.0) + 1000),
            });
        }
    } else if bucket_ok && quota_ok {
        // KEY LIMIT: only the member's own limit refuses; it refills at its own rate.
        denied_by = b"key_limit";
        if let Some((l_balance, l_max, l_rate)) = limit
            && cost <= l_max
        {
            retry = ceil_int((cost - l_balance) / l_rate * 1000.0);
        }
    } else {
        if !bucket_ok && tier.rate > 0.0 && cost - held <= tier.max_tokens {
            retry = ceil_int((cost - held - balance) / tier.rate * 1000.0);
        }
        denied_by = if bucket_ok {
            b"quota"
        } else if quota_ok {
            b"bucket"
        } else {
            b"both"
        };
        // QUOTA: the reset; never (-1) for a cost above the allowance, or when the bucket
        // never will. Both refusing: the later of the two.
        if !quota_ok {
            let mut at_reset = -1;
            if let (Some(amount), Some(end)) = (q_amount, q_end)
                && cost <= amount
            {
                at_reset = ceil_int((end - now_f) * 1000.0);
            }
            retry = if bucket_ok {
                at_reset
            } else if retry >= 0 && at_reset >= 0 {
                retry.max(at_reset)
            } else {
                -1
            };
        }
    }

    // WALLET: written back only when a grant was spent or found expired.
    if stored_wallet.is_some() && !moves.is_empty() {
        let mut lines: Vec<u8> = Vec::new();
        for gr in grants.iter().filter(|gr| gr.left > 0.0) {
            if !lines.is_empty() {
                lines.push(b'\n');
            }
            for part in [gr.p, b" ", gr.e, b" ", gr.g, b" "] {
                lines.extend_from_slice(part);
            }
            fmt(gr.left, &mut lines);
            lines.push(b' ');
            lines.extend_from_slice(gr.id);
        }
        writes.push(Write {
            key: k_wallet.unwrap_or(0),
            value: (!lines.is_empty()).then_some(lines),
            px: None,
        });
    }

    let bucket = bucket_write(0, balance, &now_s, active_window, &tier);
    let remaining = if held != 0.0 {
        fmt_owned(balance + held)
    } else {
        // The script's `bucket_left`: the bucket's value up to its space (formatted once).
        let text = bucket.value.as_deref().unwrap_or_default();
        text.split(|&b| b == b' ')
            .next()
            .unwrap_or_default()
            .to_vec()
    };
    writes.push(bucket);
    if allowed == 1
        && remember
        && let Some(k) = k_record
    {
        // kind|allowed|remaining|quota start|tier|cost|max_tokens|refunded|fingerprint|units|max_cost
        let mut value = Vec::with_capacity(128);
        value.extend_from_slice(&[kind, b'|', b'1', b'|']);
        value.extend_from_slice(&remaining);
        value.push(b'|');
        match q_start {
            Some(q) => fmt(q, &mut value),
            None => value.push(b'0'),
        }
        for part in [
            b"|",
            tier_name,
            b"|",
            a(1).unwrap_or_default(),
            b"|",
            tier_max,
            b"|0|",
            fingerprint,
            b"|",
            a(8).unwrap_or_default(),
            b"|",
            max_cost,
        ] {
            value.extend_from_slice(part);
        }
        writes.push(Write {
            key: k,
            value: Some(value),
            px: Some(ttl as i64),
        });
    }

    let mut reply = Vec::with_capacity(15);
    reply.extend([
        bulk(b"ok"),
        Field::Int(allowed),
        owned(remaining),
        Field::Int(retry),
        bulk(tier_name),
        bulk(a(1).unwrap_or_default()),
        Field::Int(0),
        // `now_s`, moved in at the end (the candidate's write below still reads it).
        Field::Int(0),
        bulk(denied_by),
    ]);
    if q_start.is_some() || !moves.is_empty() || candidate.is_some() {
        match (q_used, q_amount, q_end) {
            (Some(used), Some(amount), Some(end)) if q_start.is_some() => {
                reply.push(owned(fmt_owned(used)));
                reply.push(owned(fmt_owned(amount)));
                reply.push(owned(fmt_owned(end)));
            }
            _ => reply.extend([bulk(b""), bulk(b""), bulk(b"")]),
        }
        reply.push(owned(moves.join(&b'\n')));
    }

    // CANDIDATE: the same rule as the main bucket above.
    if let Some((k, c_cost, c)) = candidate {
        let mut c_balance = refilled(got(Some(k)), now_f, active_window, &c);
        let mut c_allowed: &[u8] = b"0";
        if c_balance >= c_cost {
            c_balance -= c_cost;
            c_allowed = b"1";
        }
        writes.push(bucket_write(k, c_balance, &now_s, active_window, &c));
        reply.push(bulk(c_allowed));
        reply.push(owned(fmt_owned(c_balance)));
    }
    reply[7] = owned(now_s);
    Ok(Effects { writes, reply })
}

/// The script's `now_s`: `TIME`'s seconds, a dot and its microseconds in six digits.
fn time_text(now: Time) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    fmt(now.secs as f64, &mut out);
    out.push(b'.');
    let micros = now.micros.clamp(0, 999_999);
    for div in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(b'0' + (micros / div % 10) as u8);
    }
    out
}
