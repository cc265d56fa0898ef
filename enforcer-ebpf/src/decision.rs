//! The decision: who is calling (L7 key header, else the L4 address binding), what the request
//! costs, and whether the key's budget snapshot proves it cannot pay.
//!
//! It rejects only what is *surely* unaffordable, and only while the daemon's heartbeat is
//! fresh: a snapshot of this config generation, at most [`SNAPSHOT_MAX_AGE_NS`] old, whose
//! balance plus the refill since the snapshot is below the price, or an operator block.
//! Everything else passes.
use crate::headers::{self, Headers, tcp};
use crate::maps::{BINDINGS, BLOCKS, BUDGETS, CONFIG, PORTS, PRICES};
use crate::scan::{self, http};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::programs::TcContext;
use enforcer_common::{GateConfig, PriceKey, SNAPSHOT_MAX_AGE_NS, counter};

/// What happens to a packet.
pub enum Verdict {
    /// It goes on.
    Pass,
    /// It goes on; the gate could not parse it.
    ParseFailed,
    /// It goes on; the identity's snapshot or binding was stale or of another generation.
    Stale,
    /// Rejected (`reason`: a `counter::REJECTED_*`).
    Reject { reason: u32, key_id: u64 },
}

/// The verdict on one packet.
#[inline(always)]
pub fn inspect(ctx: &TcContext) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if cfg.generation == 0 {
        return Verdict::Pass;
    }
    let seg = match headers::parse(ctx) {
        Headers::Tcp(seg) => seg,
        Headers::Other => return Verdict::Pass,
        Headers::Malformed => return Verdict::ParseFailed,
    };
    if PORTS.get_ptr(seg.dport).is_none() {
        return Verdict::Pass;
    }
    if seg.tcp_len < 20 {
        return Verdict::ParseFailed;
    }
    let payload = seg.l4 + seg.tcp_len;
    let end = seg.end(ctx);
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    let outcome = scan::parse_http(ctx, cfg, payload, end);
    let Some(found) = scan::found() else {
        return Verdict::Pass;
    };
    if outcome == http::IDENTIFIED {
        return decide(
            found.key_id,
            price_of(&found.request, found.ambiguous, cfg),
            now,
            cfg,
            counter::REJECTED_L7,
        );
    }
    // No L7 identity. The source address may stand for a key, but only where a connection or
    // a request starts: a SYN without ACK and without payload (priced at the cheapest price; a
    // SYN carrying data, TCP Fast Open, is judged by its data as any segment is), or a segment
    // whose request head was read to its end without a usable key header (`NO_KEY`: priced as
    // that request). Everything else passes without a look at the binding: pure ACKs, FINs
    // and RSTs, body and continuation segments (they may belong to a response the key already
    // paid for), and requests whose key header may still come (cut off: it may be another
    // key's).
    let price = if outcome == http::NO_KEY && seg.flags & tcp::RST == 0 {
        price_of(&found.request, found.ambiguous, cfg)
    } else if payload >= end && seg.flags & (tcp::SYN | tcp::ACK | tcp::RST) == tcp::SYN {
        cfg.min_price_milli
    } else {
        return Verdict::Pass;
    };
    // The source address, if the daemon bound it to one key.
    // SAFETY: two `u64`s are 16 plain bytes, in memory order (little-endian words).
    let src: [u8; 16] = unsafe { core::mem::transmute(seg.src) };
    // SAFETY: read-only use of a map value the kernel keeps alive for this program run.
    let Some(binding) = (unsafe { BINDINGS.get(src) }) else {
        return Verdict::Pass;
    };
    if binding.generation != cfg.generation || !alive(now, cfg) {
        return Verdict::Stale;
    }
    decide(binding.key_id, price, now, cfg, counter::REJECTED_L4)
}

/// The price of the request line's (method, path): a path that may not be in the daemon's
/// normal form gets the ambiguous price (the least the daemon charges for anything), since its
/// normal form could be any endpoint; others `PRICES`, else the default price.
#[inline(always)]
fn price_of(key: &PriceKey, ambiguous: u64, cfg: &GateConfig) -> u64 {
    if ambiguous != 0 {
        return cfg.ambiguous_price_milli;
    }
    // SAFETY: read-only use of map values for the duration of this program run.
    if let Some(p) = unsafe { PRICES.get(key) } {
        return *p;
    }
    let any = PriceKey {
        method: 0,
        path: key.path,
    };
    match unsafe { PRICES.get(any) } {
        Some(p) => *p,
        None => cfg.default_price_milli,
    }
}

/// Rejects only when the snapshot is fresh, of this generation, and the most the key can have
/// now (balance + refill since the snapshot, ignoring any cap) is below the price.
#[inline(always)]
fn decide(key_id: u64, price: u64, now: u64, cfg: &GateConfig, reason: u32) -> Verdict {
    // SAFETY: read-only use of a map value for the duration of this program run.
    if let Some(until) = unsafe { BLOCKS.get(key_id) }
        && *until > now
        && alive(now, cfg)
    {
        return Verdict::Reject {
            reason: counter::REJECTED_BLOCKED,
            key_id,
        };
    }
    // Price 0 (operational endpoints): never rejected, whatever the balance.
    if price == 0 {
        return Verdict::Pass;
    }
    // SAFETY: read-only use of a map value for the duration of this program run.
    let Some(b) = (unsafe { BUDGETS.get(key_id) }) else {
        return Verdict::Pass;
    };
    if b.generation != cfg.generation {
        return Verdict::Stale;
    }
    let elapsed = now.saturating_sub(b.synced_ns);
    if elapsed > SNAPSHOT_MAX_AGE_NS || !alive(now, cfg) {
        return Verdict::Stale;
    }
    // Microseconds (≤ 2^26: a snapshot is at most a minute old) times a rate clamped to 2^37
    // milli-tokens/s cannot overflow; BPF has no 128-bit multiply for an overflow check.
    let micros = (elapsed / 1000).min(1 << 26);
    let refill = micros * b.refill_milli_per_sec.min(1 << 37) / 1_000_000;
    let most = b
        .balance_milli
        .saturating_add(refill.min(i64::MAX as u64) as i64);
    if most < 0 || (most as u64) < price {
        Verdict::Reject { reason, key_id }
    } else {
        Verdict::Pass
    }
}

/// The daemon's heartbeat is fresh: what it wrote into the maps still holds.
#[inline(always)]
fn alive(now: u64, cfg: &GateConfig) -> bool {
    now.saturating_sub(cfg.heartbeat_ns) <= cfg.max_staleness_ns
}
