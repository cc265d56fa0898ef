//! Kernel side of enforcer: the TC ingress classifier `gate`.
//!
//! For TCP packets to a protected port (IPv4 or IPv6) the gate finds who is calling:
//!
//! - **L7**: a plaintext HTTP/1.x request line followed by the configured key header
//!   (case-insensitive name, optional value prefix such as `Bearer `) within the first
//!   [`SCAN_WINDOW`] bytes of the segment → key id ([`enforcer_common::key_id`]), and the price of
//!   that (method, path) from `PRICES`, else the default price;
//! - **L4**: otherwise, the source address, if the daemon bound it to exactly one key; compared
//!   with the cheapest price.
//!
//! It rejects only what is *surely* unaffordable: a fresh snapshot of this config generation
//! whose balance plus the refill since the snapshot is below the price, or an operator block
//! while the daemon's heartbeat is fresh.
//! Everything else passes (`TC_ACT_PIPE`): unknown keys, stale or missing data, packets it cannot
//! parse, fragments, other protocols. With empty maps everything passes.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{TC_ACT_PIPE, TC_ACT_REDIRECT, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use enforcer_common::{
    Binding, Budget, GateConfig, MAX_KEY_LEN, MAX_PATTERN, MAX_PREFIX, PriceKey, SCAN_WINDOW,
    action, capacity, counter, fnv_start, fnv_step,
};

/// Per-CPU packet counters, indexed by `enforcer_common::counter`; userspace sums the CPUs.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// The gate's configuration; generation 0 (all zero, before the daemon writes it) disables it.
#[map]
static CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// Protected destination ports (host byte order).
#[map]
static PORTS: HashMap<u16, u32> = HashMap::with_max_entries(capacity::PORTS, 0);

/// Budget snapshots by key id; LRU so a full map evicts instead of refusing new keys.
#[map]
static BUDGETS: LruHashMap<u64, Budget> = LruHashMap::with_max_entries(capacity::BUDGETS, 0);

/// Prices (milli-tokens) by method and path hash; method 0 matches any method.
#[map]
static PRICES: HashMap<PriceKey, u64> = HashMap::with_max_entries(capacity::PRICES, 0);

/// Client address (IPv6, or IPv4-mapped) → the one key it is bound to.
#[map]
static BINDINGS: LruHashMap<[u8; 16], Binding> =
    LruHashMap::with_max_entries(capacity::BINDINGS, 0);

/// Operator blocks: key id → end of the block (`CLOCK_MONOTONIC` ns).
#[map]
static BLOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(capacity::BLOCKS, 0);

/// Rejections per key id, per CPU (read into the audit ledger's rollups).
#[map]
static KEY_REJECTS: LruPerCpuHashMap<u64, u64> =
    LruPerCpuHashMap::with_max_entries(capacity::KEY_REJECTS, 0);

/// Per-CPU scan state: the payload copy (too big for the 512-byte BPF stack) and the parser's
/// variables, shared by the `bpf_loop` callback's iterations.
#[map]
static SCRATCH: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scan {
    buf: [u8; SCAN_WINDOW],
    phase: u64,
    method_len: u64,
    method: u64,
    path: u64,
    path_len: u64,
    version: u64,
    line_len: u64,
    matched: u64,
    key: u64,
    key_trimmed: u64,
    key_len: u64,
    /// The parser's answer once a byte decided it (an `http::*` code), else `u64::MAX`.
    outcome: u64,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;

/// TC ingress entry point. `TC_ACT_PIPE` hands the packet on to the next program or the stack,
/// so the gate composes with other TC programs on the same interface.
#[classifier]
pub fn gate(ctx: TcContext) -> i32 {
    match inspect(&ctx) {
        Verdict::Pass => {
            bump(counter::PASSED);
            TC_ACT_PIPE
        }
        Verdict::ParseFailed => {
            bump(counter::PARSE_FAILED);
            bump(counter::PASSED);
            TC_ACT_PIPE
        }
        Verdict::Stale => {
            bump(counter::STALE);
            bump(counter::PASSED);
            TC_ACT_PIPE
        }
        Verdict::Reject { reason, key_id } => {
            bump(reason);
            count_rejection(key_id);
            let reset = CONFIG.get(0).is_some_and(|c| c.action == action::RESET);
            if reset && rst::answer(&ctx) {
                TC_ACT_REDIRECT
            } else {
                TC_ACT_SHOT
            }
        }
    }
}

enum Verdict {
    Pass,
    ParseFailed,
    Stale,
    Reject { reason: u32, key_id: u64 },
}

/// What the L7 parser found (the key id and price key are left in the scratch slot).
mod http {
    /// A complete key header: `key_trimmed`, `method` and `path` of the scratch slot are set.
    pub const IDENTIFIED: u32 = 0;
    /// Not an HTTP request start (another protocol, a continuation segment).
    pub const NOT_HTTP: u32 = 1;
    /// An HTTP request whose headers ended without the key header.
    pub const NO_KEY: u32 = 2;
    /// HTTP, but cut off before the key could be read (split segment, beyond the window,
    /// too long), or no scratch space: identity unknown.
    pub const UNSURE: u32 = 3;
}

#[inline(always)]
fn inspect(ctx: &TcContext) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if cfg.generation == 0 {
        return Verdict::Pass;
    }
    // Direct packet access: one bounds check per header, then plain loads (no helper calls).
    let Some(eth) = window(ctx, 0, ETH_HLEN) else {
        return Verdict::Pass;
    };
    let mut src = [0u8; 16];
    let l4: usize;
    // SAFETY (all reads below): each pointer comes from `window`, which checked that the bytes
    // read through it are inside the packet.
    match unsafe { u16::from_be_bytes([*eth.add(12), *eth.add(13)]) } {
        ETH_P_IP => {
            let Some(ip) = window(ctx, ETH_HLEN, 20) else {
                return Verdict::ParseFailed;
            };
            let (vihl, frag, proto) = unsafe {
                (
                    *ip,
                    u16::from_be_bytes([*ip.add(6), *ip.add(7)]),
                    *ip.add(9),
                )
            };
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Verdict::ParseFailed;
            }
            // Fragments (more-fragments flag or an offset) carry no reliable TCP header: pass.
            if proto != IPPROTO_TCP || frag & 0x3fff != 0 {
                return Verdict::Pass;
            }
            src[10] = 0xff;
            src[11] = 0xff;
            unsafe {
                src[12] = *ip.add(12);
                src[13] = *ip.add(13);
                src[14] = *ip.add(14);
                src[15] = *ip.add(15);
            }
            l4 = ETH_HLEN + ihl;
        }
        ETH_P_IPV6 => {
            let Some(ip) = window(ctx, ETH_HLEN, 40) else {
                return Verdict::ParseFailed;
            };
            // Extension headers are not followed: such packets pass.
            if unsafe { *ip.add(6) } != IPPROTO_TCP {
                return Verdict::Pass;
            }
            let mut k = 0;
            while k < 16 {
                src[k] = unsafe { *ip.add(8 + k) };
                k += 1;
            }
            l4 = ETH_HLEN + 40;
        }
        _ => return Verdict::Pass,
    }
    let Some(tcp) = window(ctx, l4, 20) else {
        return Verdict::ParseFailed;
    };
    let (dport, doff) = unsafe { (u16::from_be_bytes([*tcp.add(2), *tcp.add(3)]), *tcp.add(12)) };
    if PORTS.get_ptr(dport).is_none() {
        return Verdict::Pass;
    }
    let tcp_len = ((doff >> 4) as usize) * 4;
    if tcp_len < 20 {
        return Verdict::ParseFailed;
    }
    let payload = l4 + tcp_len;
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    if parse_http(ctx, cfg, payload) == http::IDENTIFIED
        && let Some(scan) = SCRATCH.get_ptr(0)
    {
        // SAFETY: this CPU's scratch slot, just written by the parser.
        let (key_id, price) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*scan).key_trimmed),
                PriceKey {
                    method: core::ptr::read_volatile(&raw const (*scan).method),
                    path: core::ptr::read_volatile(&raw const (*scan).path),
                },
            )
        };
        return decide(
            key_id,
            price_of(&price, cfg),
            now,
            cfg,
            counter::REJECTED_L7,
        );
    }
    // No L7 identity: the source address, if it is bound to one key.
    // SAFETY: read-only use of a map value the kernel keeps alive for this program run.
    let Some(binding) = (unsafe { BINDINGS.get(src) }) else {
        return Verdict::Pass;
    };
    if binding.generation != cfg.generation
        || now.saturating_sub(binding.synced_ns) > cfg.max_staleness_ns
    {
        return Verdict::Stale;
    }
    decide(
        binding.key_id,
        cfg.min_price_milli,
        now,
        cfg,
        counter::REJECTED_L4,
    )
}

/// A pointer to `len` bytes at `offset` of the packet (direct packet access), or `None` when
/// the packet's linear part is shorter (the gate then passes the packet).
#[inline(always)]
fn window(ctx: &TcContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const u8)
}

#[inline(always)]
fn price_of(key: &PriceKey, cfg: &GateConfig) -> u64 {
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
        && now.saturating_sub(cfg.heartbeat_ns) <= cfg.max_staleness_ns
    {
        return Verdict::Reject {
            reason: counter::REJECTED_BLOCKED,
            key_id,
        };
    }
    // SAFETY: read-only use of a map value for the duration of this program run.
    let Some(b) = (unsafe { BUDGETS.get(key_id) }) else {
        return Verdict::Pass;
    };
    if b.generation != cfg.generation {
        return Verdict::Stale;
    }
    let elapsed = now.saturating_sub(b.synced_ns);
    if elapsed > cfg.max_staleness_ns {
        return Verdict::Stale;
    }
    // Microseconds (≤ 2^26: staleness is at most a minute) times a rate clamped to 2^37
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

/// Scans the start of the payload: request line, then headers for the key header.
///
/// The per-byte state machine runs under `bpf_loop`, so the verifier checks its body once
/// instead of once per byte (a plain 512-iteration loop exceeds the verifier's budget).
#[inline(always)]
fn parse_http(ctx: &TcContext, cfg: &GateConfig, payload: usize) -> u32 {
    let len = ctx.len() as usize;
    if payload >= len {
        return http::NOT_HTTP;
    }
    let avail = len - payload;
    // 1..=SCAN_WINDOW, in a form the verifier can bound.
    let n = ((avail.min(SCAN_WINDOW) - 1) & (SCAN_WINDOW - 1)) + 1;
    let Some(scan) = SCRATCH.get_ptr_mut(0) else {
        return http::UNSURE;
    };
    // SAFETY: `scan` is this CPU's scratch slot, which nothing else touches while the program
    // runs; `n` ≤ SCAN_WINDOW = the buffer's size.
    unsafe {
        if aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            payload as u32,
            (*scan).buf.as_mut_ptr().cast(),
            n as u32,
        ) != 0
        {
            return http::UNSURE;
        }
        (*scan).phase = PHASE_METHOD;
        (*scan).method_len = 0;
        (*scan).method = fnv_start();
        (*scan).path = fnv_start();
        (*scan).path_len = 0;
        (*scan).version = 0;
        (*scan).line_len = 0;
        (*scan).matched = 0;
        (*scan).key = fnv_start();
        (*scan).key_trimmed = fnv_start();
        (*scan).key_len = 0;
        (*scan).outcome = u64::MAX;
        let mut state = LoopState {
            scan,
            cfg: core::ptr::from_ref(cfg),
        };
        aya_ebpf::helpers::bpf_loop(
            n as u32,
            scan_byte as *mut core::ffi::c_void,
            (&raw mut state).cast(),
            0,
        );
        match (*scan).outcome {
            o if o <= http::UNSURE as u64 => o as u32,
            // The segment (or the window) ended first: a split request line, header or value.
            _ if (*scan).phase == PHASE_METHOD && (*scan).method_len == 0 => http::NOT_HTTP,
            _ => http::UNSURE,
        }
    }
}

/// What the `bpf_loop` callback works on, passed through its context pointer (so it does not
/// look the maps up again at every byte).
#[repr(C)]
struct LoopState {
    scan: *mut Scan,
    cfg: *const GateConfig,
}

/// One byte of the scan (a `bpf_loop` callback): 0 to go on, 1 when the outcome is decided.
#[inline(never)]
extern "C" fn scan_byte(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `LoopState` on `parse_http`'s stack, alive for the whole loop; its
    // pointers are this CPU's scratch slot and the config map value.
    let (s, cfg) = unsafe {
        let state = &*ctx.cast::<LoopState>();
        (&mut *state.scan, &*state.cfg)
    };
    let b = s.buf[(index as usize) & (SCAN_WINDOW - 1)];
    let decided = |s: &mut Scan, outcome: u32| {
        s.outcome = outcome as u64;
        1
    };
    match s.phase {
        PHASE_METHOD => {
            if b == b' ' && s.method_len >= 3 {
                s.phase = PHASE_PATH;
            } else if b.is_ascii_uppercase() && s.method_len < 10 {
                s.method = fnv_step(s.method, b);
                s.method_len += 1;
            } else {
                return decided(s, http::NOT_HTTP);
            }
        }
        PHASE_PATH => {
            if s.path_len == 0 && b != b'/' {
                return decided(s, http::NOT_HTTP);
            }
            if b == b' ' {
                s.phase = PHASE_VERSION;
            } else if b == b'?' || b == b'#' {
                s.phase = PHASE_QUERY;
            } else if b < 0x21 || b == 0x7f {
                return decided(s, http::NOT_HTTP);
            } else {
                s.path = fnv_step(s.path, b);
                s.path_len += 1;
            }
        }
        PHASE_QUERY => {
            if b == b' ' {
                s.phase = PHASE_VERSION;
            } else if b < 0x21 {
                return decided(s, http::NOT_HTTP);
            }
        }
        PHASE_VERSION => {
            if b != HTTP1[(s.version & 7) as usize] {
                return decided(s, http::NOT_HTTP);
            }
            s.version += 1;
            if s.version >= HTTP1_LEN {
                s.phase = PHASE_REQUEST_LINE;
            }
        }
        PHASE_REQUEST_LINE => {
            if b == b'\n' {
                // The '\n' just read is the first byte of the pattern "\n<name>:".
                s.phase = PHASE_HEADERS;
                s.matched = 1;
                s.line_len = 0;
            }
        }
        PHASE_HEADERS => {
            if b == b'\n' {
                if s.line_len == 0 {
                    // An empty line: the headers ended without the key.
                    return decided(s, http::NO_KEY);
                }
                s.matched = 1;
                s.line_len = 0;
                return 0;
            }
            if b != b'\r' {
                s.line_len += 1;
            }
            let m = s.matched;
            let pattern_len = (cfg.pattern_len as u64).min(MAX_PATTERN as u64);
            if m > 0 && b.to_ascii_lowercase() == cfg.pattern[(m as usize) & (MAX_PATTERN - 1)] {
                if m + 1 >= pattern_len {
                    s.phase = PHASE_VALUE;
                    s.matched = 0;
                } else {
                    s.matched = m + 1;
                }
            } else {
                s.matched = 0;
            }
        }
        _ => {
            // PHASE_VALUE: leading whitespace, then the prefix (if any), then the key.
            if b == b'\r' || b == b'\n' {
                let outcome = if s.key_len == 0 {
                    http::NO_KEY
                } else {
                    http::IDENTIFIED
                };
                return decided(s, outcome);
            }
            if s.key_len == 0 && s.matched == 0 && (b == b' ' || b == b'\t') {
                return 0;
            }
            let prefix_len = (cfg.prefix_len as u64).min(MAX_PREFIX as u64);
            if s.matched < prefix_len {
                if b.to_ascii_lowercase() != cfg.prefix[(s.matched as usize) & (MAX_PREFIX - 1)] {
                    return decided(s, http::NO_KEY);
                }
                s.matched += 1;
                return 0;
            }
            if s.key_len >= MAX_KEY_LEN as u64 {
                return decided(s, http::UNSURE);
            }
            s.key = fnv_step(s.key, b);
            s.key_len += 1;
            if b != b' ' && b != b'\t' {
                s.key_trimmed = s.key;
            }
        }
    }
    0
}

const HTTP1: [u8; 8] = *b"HTTP/1.\0";
/// Length of `HTTP/1.` (the array is padded to 8 for a masked index).
const HTTP1_LEN: u64 = 7;

const PHASE_METHOD: u64 = 0;
const PHASE_PATH: u64 = 1;
const PHASE_QUERY: u64 = 2;
const PHASE_VERSION: u64 = 3;
const PHASE_REQUEST_LINE: u64 = 4;
const PHASE_HEADERS: u64 = 5;
const PHASE_VALUE: u64 = 6;

/// The floor for benchmarks: a classifier that only passes (`cargo xtask bench kernel`).
#[classifier]
pub fn floor(_ctx: TcContext) -> i32 {
    TC_ACT_PIPE
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a per-CPU array slot owned by this CPU for the
        // duration of the program; no other writer can race with it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_rejection(key_id: u64) {
    match KEY_REJECTS.get_ptr_mut(key_id) {
        // SAFETY: a per-CPU value of this CPU.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = KEY_REJECTS.insert(key_id, 1, 0);
        }
    }
}

/// `action = "reset"`: the rejected segment is rewritten, in place, into a TCP RST from the
/// server to the client (addresses and ports swapped, no payload, checksums recomputed) and sent
/// back out of the interface it came in on. Anything unusual (IP options, IPv6 extension
/// headers, a failed resize) falls back to a plain drop.
mod rst {
    use super::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, window};
    use aya_ebpf::helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes};
    use aya_ebpf::programs::TcContext;

    const TCP_LEN: usize = 20;
    const MAX: usize = ETH_HLEN + 40 + TCP_LEN;

    /// One's-complement sum of big-endian 16-bit words.
    #[inline(always)]
    fn sum(bytes: &[u8], mut acc: u32) -> u32 {
        let mut i = 0;
        while i + 1 < bytes.len() {
            acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
            i += 2;
        }
        acc
    }

    #[inline(always)]
    fn fold(mut acc: u32) -> u16 {
        acc = (acc & 0xffff) + (acc >> 16);
        acc = (acc & 0xffff) + (acc >> 16);
        !(acc as u16)
    }

    /// Rewrites the packet into the RST and redirects it; false when it could not.
    #[inline(always)]
    pub fn answer(ctx: &TcContext) -> bool {
        let mut out = [0u8; MAX];
        let Some(eth) = window(ctx, 0, ETH_HLEN) else {
            return false;
        };
        // SAFETY (all packet reads): within the windows checked by `window`.
        let ether_type = unsafe { u16::from_be_bytes([*eth.add(12), *eth.add(13)]) };
        for i in 0..6 {
            unsafe {
                out[i] = *eth.add(6 + i);
                out[6 + i] = *eth.add(i);
            }
        }
        out[12..14].copy_from_slice(&ether_type.to_be_bytes());
        let (ip_len, l4, payload) = match ether_type {
            ETH_P_IP => {
                let Some(ip) = window(ctx, ETH_HLEN, 20) else {
                    return false;
                };
                let (vihl, total) = unsafe { (*ip, u16::from_be_bytes([*ip.add(2), *ip.add(3)])) };
                if vihl != 0x45 {
                    return false; // IP options: not rewritten
                }
                let o = ETH_HLEN;
                out[o] = 0x45;
                out[o + 2..o + 4].copy_from_slice(&40u16.to_be_bytes());
                out[o + 6] = 0x40; // don't fragment
                out[o + 8] = 64;
                out[o + 9] = IPPROTO_TCP;
                for i in 0..4 {
                    unsafe {
                        out[o + 12 + i] = *ip.add(16 + i);
                        out[o + 16 + i] = *ip.add(12 + i);
                    }
                }
                let check = fold(sum(&out[o..o + 20], 0));
                out[o + 10..o + 12].copy_from_slice(&check.to_be_bytes());
                (
                    20usize,
                    ETH_HLEN + 20,
                    usize::from(total).saturating_sub(20),
                )
            }
            ETH_P_IPV6 => {
                let Some(ip) = window(ctx, ETH_HLEN, 40) else {
                    return false;
                };
                let (next, plen) =
                    unsafe { (*ip.add(6), u16::from_be_bytes([*ip.add(4), *ip.add(5)])) };
                if next != IPPROTO_TCP {
                    return false;
                }
                let o = ETH_HLEN;
                out[o] = 0x60;
                out[o + 4..o + 6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
                out[o + 6] = IPPROTO_TCP;
                out[o + 7] = 64;
                for i in 0..16 {
                    unsafe {
                        out[o + 8 + i] = *ip.add(24 + i);
                        out[o + 24 + i] = *ip.add(8 + i);
                    }
                }
                (40usize, ETH_HLEN + 40, usize::from(plen))
            }
            _ => return false,
        };
        let Some(tcp) = window(ctx, l4, TCP_LEN) else {
            return false;
        };
        let (sport, dport, seq, ack, doff, flags) = unsafe {
            (
                [*tcp, *tcp.add(1)],
                [*tcp.add(2), *tcp.add(3)],
                u32::from_be_bytes([*tcp.add(4), *tcp.add(5), *tcp.add(6), *tcp.add(7)]),
                u32::from_be_bytes([*tcp.add(8), *tcp.add(9), *tcp.add(10), *tcp.add(11)]),
                usize::from(*tcp.add(12) >> 4) * 4,
                *tcp.add(13),
            )
        };
        // Sequence space the segment used: its payload, plus one for SYN and for FIN.
        let seg_len = payload.saturating_sub(doff) as u32
            + u32::from(flags & 0x02 != 0)
            + u32::from(flags & 0x01 != 0);
        let t = l4;
        out[t..t + 2].copy_from_slice(&dport);
        out[t + 2..t + 4].copy_from_slice(&sport);
        // RFC 9293: with an ACK in the segment, the RST takes its sequence number from it.
        let our_seq = if flags & 0x10 != 0 { ack } else { 0 };
        out[t + 4..t + 8].copy_from_slice(&our_seq.to_be_bytes());
        out[t + 8..t + 12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
        out[t + 12] = 5 << 4;
        out[t + 13] = 0x14; // RST, ACK
        // Checksum over the pseudo-header and the header.
        let mut acc = sum(&out[t..t + TCP_LEN], 0);
        if ip_len == 20 {
            acc = sum(&out[ETH_HLEN + 12..ETH_HLEN + 20], acc);
        } else {
            acc = sum(&out[ETH_HLEN + 8..ETH_HLEN + 40], acc);
        }
        acc += u32::from(IPPROTO_TCP) + TCP_LEN as u32;
        out[t + 16..t + 18].copy_from_slice(&fold(acc).to_be_bytes());

        let len = ETH_HLEN + ip_len + TCP_LEN;
        // SAFETY: helpers on this program's own skb; `out` holds `len` ≤ MAX bytes.
        unsafe {
            if bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) != 0 {
                return false;
            }
            if bpf_skb_store_bytes(ctx.skb.skb, 0, out.as_ptr().cast(), len as u32, 0) != 0 {
                return false;
            }
            bpf_redirect((*ctx.skb.skb).ifindex, 0);
        }
        true
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
