//! Kernel side of enforcer: the TC ingress classifier `gate`.
//!
//! For TCP packets to a protected port (IPv4 or IPv6) the gate finds who is calling:
//!
//! - **L7**: a plaintext HTTP/1.x request line followed by the configured key header
//!   (case-insensitive name, optional value prefix such as `Bearer `) within the first
//!   [`SCAN_WINDOW`] bytes of the segment → key id ([`enforcer_common::key_id`]), and the price of
//!   that (method, path) from `PRICES`, else the default price; a path the daemon could spell
//!   differently in normal form (`%`, `\`, `//`, dot segments, too long) gets the ambiguous
//!   price instead, and a trailing slash is hashed away when the daemon strips it;
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
    Binding, Budget, GateConfig, KeyRejects, MAX_KEY_LEN, MAX_PATH_LEN, MAX_PATTERN, MAX_PREFIX,
    PriceKey, SCAN_WINDOW, action, capacity, counter, hash_start, hash_step,
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

/// Rejections per key id and reason, per CPU (read into the audit ledger's rollups).
#[map]
static KEY_REJECTS: LruPerCpuHashMap<u64, KeyRejects> =
    LruPerCpuHashMap::with_max_entries(capacity::KEY_REJECTS, 0);

/// Per-CPU scan state: the payload copy (too big for the 512-byte BPF stack) and the parser's
/// variables, shared by the `bpf_loop` callback's steps.
#[map]
static SCRATCH: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// Slack after the window so an 8-byte load at any offset inside it stays in the buffer.
const SLACK: usize = 8;

#[repr(C)]
struct Scan {
    buf: [u8; SCAN_WINDOW + SLACK],
    /// Valid bytes in `buf` (what follows is left over from an earlier packet).
    n: u64,
    /// What the next step does (`STEP_*`).
    step: u64,
    /// Where the next step starts reading.
    pos: u64,
    /// Start of the token being read (the path, the key).
    mark: u64,
    method: u64,
    path: u64,
    /// 1 when the path may not be in the daemon's normal form
    /// (`enforcer_common::path_is_ambiguous`): priced at `ambiguous_price_milli`.
    ambiguous: u64,
    key: u64,
    /// The parser's answer once a step decided it (an `http::*` code), else `u64::MAX`.
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
            count_rejection(key_id, reason);
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
    /// A complete key header: `key`, `method` and `path` of the scratch slot are set.
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
    // Source address as two words (IPv4-mapped for IPv4): no zero-fill of a byte array, which
    // BPF code generation turns into a call to a byte-wise memset.
    let (src_hi, src_lo): (u64, u64);
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
            src_hi = 0;
            src_lo = unsafe {
                u64::from_le_bytes([
                    0,
                    0,
                    0xff,
                    0xff,
                    *ip.add(12),
                    *ip.add(13),
                    *ip.add(14),
                    *ip.add(15),
                ])
            };
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
            // Memory order, as the IPv4 case builds it (the loads are bounded by `window`).
            (src_hi, src_lo) = unsafe {
                (
                    core::ptr::read_unaligned(ip.add(8).cast::<u64>()),
                    core::ptr::read_unaligned(ip.add(16).cast::<u64>()),
                )
            };
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

    let outcome = parse_http(ctx, cfg, payload);
    // The price of the request when its request line was read, else the cheapest price.
    let mut price = cfg.min_price_milli;
    if let Some(scan) = SCRATCH.get_ptr(0) {
        // SAFETY: this CPU's scratch slot, just written by the parser.
        let (key_id, step, ambiguous, request) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*scan).key),
                core::ptr::read_volatile(&raw const (*scan).step),
                core::ptr::read_volatile(&raw const (*scan).ambiguous),
                PriceKey {
                    method: core::ptr::read_volatile(&raw const (*scan).method),
                    path: core::ptr::read_volatile(&raw const (*scan).path),
                },
            )
        };
        if outcome == http::IDENTIFIED {
            return decide(
                key_id,
                price_of(&request, ambiguous, cfg),
                now,
                cfg,
                counter::REJECTED_L7,
            );
        }
        if outcome != http::NOT_HTTP && step >= STEP_HEADER {
            price = price_of(&request, ambiguous, cfg);
        }
    }
    // No L7 identity: the source address, if it is bound to one key.
    // SAFETY: read-only use of a map value the kernel keeps alive for this program run.
    // SAFETY: two `u64`s are 16 plain bytes, in memory order (little-endian words).
    let src: [u8; 16] = unsafe { core::mem::transmute([src_hi, src_lo]) };
    let Some(binding) = (unsafe { BINDINGS.get(src) }) else {
        return Verdict::Pass;
    };
    if binding.generation != cfg.generation
        || now.saturating_sub(binding.synced_ns) > cfg.max_staleness_ns
    {
        return Verdict::Stale;
    }
    decide(binding.key_id, price, now, cfg, counter::REJECTED_L4)
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
        && now.saturating_sub(cfg.heartbeat_ns) <= cfg.max_staleness_ns
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
/// The scan runs as steps under `bpf_loop`: each step reads one token or one header line, eight
/// bytes at a time (SWAR: word-wide byte comparisons), and leaves its state in the scratch slot.
/// The verifier checks the step function once instead of every path through the packet, and
/// reloading the state from the map value at each step keeps its view of offsets simple.
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
    // runs; `n` ≤ SCAN_WINDOW < the buffer's size.
    unsafe {
        // Reset first: the caller reads `step` to know whether the request line was read.
        (*scan).step = STEP_METHOD;
        if aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            payload as u32,
            (*scan).buf.as_mut_ptr().cast(),
            n as u32,
        ) != 0
        {
            return http::UNSURE;
        }
        // Volatile: separate stores, not a call to a byte-wise memset.
        core::ptr::write_volatile(&raw mut (*scan).n, n as u64);
        core::ptr::write_volatile(&raw mut (*scan).pos, 0);
        core::ptr::write_volatile(&raw mut (*scan).mark, 0);
        core::ptr::write_volatile(&raw mut (*scan).method, 0);
        core::ptr::write_volatile(&raw mut (*scan).path, 0);
        core::ptr::write_volatile(&raw mut (*scan).ambiguous, 0);
        core::ptr::write_volatile(&raw mut (*scan).key, 0);
        core::ptr::write_volatile(&raw mut (*scan).outcome, u64::MAX);
        let mut state = LoopState {
            scan,
            cfg: core::ptr::from_ref(cfg),
        };
        aya_ebpf::helpers::bpf_loop(
            MAX_STEPS,
            scan_step as *mut core::ffi::c_void,
            (&raw mut state).cast(),
            0,
        );
        match (*scan).outcome {
            o if o <= http::UNSURE as u64 => o as u32,
            // Out of steps: more header lines than the window can hold is not a real request.
            _ => http::UNSURE,
        }
    }
}

/// Upper bound on scan steps: the request line takes at most five, each header line one, and a
/// line is at least two bytes.
const MAX_STEPS: u32 = 8 + (SCAN_WINDOW / 2) as u32;

/// What the `bpf_loop` callback works on, passed through its context pointer (so it does not
/// look the maps up again at every step).
#[repr(C)]
struct LoopState {
    scan: *mut Scan,
    cfg: *const GateConfig,
}

const STEP_METHOD: u64 = 0;
const STEP_PATH_END: u64 = 1;
const STEP_PATH_HASH: u64 = 2;
const STEP_QUERY: u64 = 3;
const STEP_VERSION: u64 = 4;
const STEP_LINE_END: u64 = 5;
const STEP_HEADER: u64 = 6;
const STEP_VALUE: u64 = 7;
const STEP_KEY_END: u64 = 8;
const STEP_KEY_HASH: u64 = 9;

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;
/// `HTTP/1.` as a little-endian word (7 bytes).
const HTTP1: u64 = 0x002e_312f_5054_5448;

/// The high bit of every byte of `w` that is zero (exact: no false positives).
#[inline(always)]
fn zero_bytes(w: u64) -> u64 {
    !(((w & LOW7).wrapping_add(LOW7)) | w | LOW7)
}

/// The high bit of every byte of `w` equal to `c`.
#[inline(always)]
fn eq_bytes(w: u64, c: u8) -> u64 {
    zero_bytes(w ^ (ONES * c as u64))
}

/// The high bit of every byte of `w` below `c` (`c` ≤ 0x80; exact).
#[inline(always)]
fn lt_bytes(w: u64, c: u8) -> u64 {
    !(((w & LOW7).wrapping_add(ONES * (0x80 - c as u64))) | w) & HIGH
}

/// Index (0..8) of the lowest byte whose high bit is set in `m`, which is not zero.
#[inline(always)]
fn first_byte(mut m: u64) -> u64 {
    let mut i = 0;
    if m & 0xffff_ffff == 0 {
        i += 4;
        m >>= 32;
    }
    if m & 0xffff == 0 {
        i += 2;
        m >>= 16;
    }
    if m & 0xff == 0 {
        i += 1;
    }
    i
}

/// Bytes 0..`len` of a word (all of it from 8 up).
#[inline(always)]
fn low_bytes(len: u64) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << ((len & 7) * 8)) - 1
    }
}

/// The 8 bytes at `off` of the buffer (little-endian).
///
/// Made of the two aligned words around it: BPF code generation turns an unaligned `u64` read
/// into eight byte loads, two aligned loads and shifts are a third of that.
#[inline(always)]
fn word(s: &Scan, off: u64) -> u64 {
    let base = (off as usize) & (SCAN_WINDOW - 8);
    let shift = ((off & 7) * 8) as u32;
    // SAFETY: `base` is a multiple of 8 below SCAN_WINDOW, the buffer starts the (8-aligned)
    // map value and has SLACK = 8 bytes more, so both loads are aligned and inside it.
    let (lo, hi) = unsafe {
        let p = s.buf.as_ptr().add(base).cast::<u64>();
        (p.read(), p.add(1).read())
    };
    // `hi << (64 - shift)`, as two shifts so that `shift` = 0 gives 0 (BPF masks shift counts).
    lo.wrapping_shr(shift) | (hi << 1).wrapping_shl(63 - shift)
}

/// Word `i` of a config byte array (which starts 8-aligned in the map value).
#[inline(always)]
fn config_word<const N: usize>(bytes: &[u8; N], i: usize) -> u64 {
    // SAFETY: callers pass `i * 8 + 8` ≤ N; the arrays sit at multiples of 8 in `GateConfig`,
    // whose map value is 8-aligned, so the load is aligned.
    unsafe { bytes.as_ptr().add(i * 8).cast::<u64>().read() }
}

/// What a search stops at.
#[derive(Clone, Copy)]
enum Stop {
    /// `\n`.
    LineEnd,
    /// The end of a path: a control byte, space, `?`, `#` or DEL.
    PathEnd,
    /// A control byte or space (the end of a query).
    Blank,
    /// `\r` or `\n` (the end of a header value).
    ValueEnd,
}

/// The first byte at or after `from` (within the valid bytes) that `stop` stops at, one aligned
/// word per iteration; `None` if the valid bytes end first (a cut segment or window).
#[inline(always)]
fn find(s: &Scan, from: u64, stop: Stop) -> Option<u64> {
    let mut base = from & !7;
    // Bytes of the first word before `from` do not count.
    let mut skip = !low_bytes(from & 7);
    let mut i = 0;
    while i < SCAN_WINDOW / 8 {
        if base >= s.n {
            return None;
        }
        let w = aligned_word(s, base);
        let m = match stop {
            Stop::LineEnd => eq_bytes(w, b'\n'),
            Stop::PathEnd => {
                lt_bytes(w, 0x21) | eq_bytes(w, b'?') | eq_bytes(w, b'#') | eq_bytes(w, 0x7f)
            }
            Stop::Blank => lt_bytes(w, 0x21),
            Stop::ValueEnd => eq_bytes(w, b'\r') | eq_bytes(w, b'\n'),
        } & skip;
        if m != 0 {
            let at = base + first_byte(m);
            return (at < s.n).then_some(at);
        }
        skip = u64::MAX;
        base += 8;
        i += 1;
    }
    None
}

/// The aligned word of the buffer at `base` (a multiple of 8).
#[inline(always)]
fn aligned_word(s: &Scan, base: u64) -> u64 {
    // SAFETY: masked to a multiple of 8 below SCAN_WINDOW: an aligned load inside the buffer.
    unsafe {
        s.buf
            .as_ptr()
            .add((base as usize) & (SCAN_WINDOW - 8))
            .cast::<u64>()
            .read()
    }
}

/// The word hash (`enforcer_common::word_hash`) of `len` bytes at `from`, `len` ≤ `max`.
#[inline(always)]
fn hash(s: &Scan, from: u64, len: u64, max: usize) -> u64 {
    let mut h = hash_start(len);
    let mut done = 0;
    let mut i = 0;
    while i < max / 8 {
        if done >= len {
            break;
        }
        let w = word(s, from + done) & low_bytes(len - done);
        h = hash_step(h, w);
        done += 8;
        i += 1;
    }
    h
}

/// The word hash of the `len` path bytes at `from` (`len` ≤ `MAX_PATH_LEN`), and whether the
/// path is ambiguous ([`enforcer_common::path_is_ambiguous`]: a `%`, a `\`, or a `/` followed by
/// `/` or `.`), checked on the words the hash reads anyway, without a branch (each one would
/// double the states the verifier explores).
///
/// Each byte is checked with the byte after it, even the last: after the path comes its
/// terminator (' ', '?' or '#'), never '/' or '.', or the trailing slash that was stripped,
/// which makes a `//` before it ambiguous, as it should.
#[inline(always)]
fn path_hash(s: &Scan, from: u64, len: u64) -> (u64, bool) {
    let mut h = hash_start(len);
    let mut odd = 0;
    let mut done = 0;
    let mut i = 0;
    while i < MAX_PATH_LEN / 8 {
        if done >= len {
            break;
        }
        let keep = low_bytes(len - done);
        let w = word(s, from + done);
        h = hash_step(h, w & keep);
        // The successors, one byte further on. '.' is 0x2e and '/' 0x2f: OR-ing in 1 finds
        // both with one comparison.
        let next = word(s, from + done + 1) | ONES;
        let seg = eq_bytes(w, b'/') & eq_bytes(next, b'/');
        odd |= (eq_bytes(w, b'%') | eq_bytes(w, b'\\') | seg) & keep;
        done += 8;
        i += 1;
    }
    (h, odd != 0)
}

/// Whether the `len` bytes at `at` equal `pattern` once `fold` is OR-ed into them (case folding
/// of letters), `len` ≤ `N`.
#[inline(always)]
fn matches<const N: usize>(s: &Scan, at: u64, pattern: &[u8; N], fold: &[u8; N], len: u64) -> bool {
    let mut i = 0;
    while i < N / 8 {
        let done = (i * 8) as u64;
        if done >= len {
            break;
        }
        let (p, f) = (config_word(pattern, i), config_word(fold, i));
        let mask = low_bytes(len - done);
        if ((word(s, at + done) | f) ^ p) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// One step of the scan (a `bpf_loop` callback): 0 to go on, 1 when the outcome is decided.
#[inline(never)]
extern "C" fn scan_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `LoopState` on `parse_http`'s stack, alive for the whole loop; its
    // pointers are this CPU's scratch slot and the config map value.
    let (s, cfg) = unsafe {
        let state = &*ctx.cast::<LoopState>();
        (&mut *state.scan, &*state.cfg)
    };
    let decided = |s: &mut Scan, outcome: u32| {
        s.outcome = outcome as u64;
        1
    };
    // Offsets are re-read from the map value and bounded here, so every step starts from the
    // same verifier state whatever the previous step found.
    let n = s.n;
    if s.pos >= n {
        // The segment (or the window) ends where the next step would read: cut off.
        return decided(s, http::UNSURE);
    }
    let pos = s.pos & (SCAN_WINDOW as u64 - 1);
    match s.step {
        STEP_METHOD => {
            // 3 to 10 upper-case letters, then a space and a '/'.
            let (w0, w1) = (word(s, 0), word(s, 8));
            let spaces = eq_bytes(w0, b' ');
            let len = if spaces != 0 {
                first_byte(spaces)
            } else {
                let more = eq_bytes(w1, b' ') & 0x00ff_ffff;
                if more == 0 {
                    return decided(s, http::NOT_HTTP);
                }
                8 + first_byte(more)
            };
            // Upper-case: not below 'A' and below 'Z' + 1, in every byte before the space.
            let upper0 = !lt_bytes(w0, b'A') & lt_bytes(w0, b'Z' + 1) & HIGH;
            let upper1 = !lt_bytes(w1, b'A') & lt_bytes(w1, b'Z' + 1) & HIGH;
            let need0 = HIGH & low_bytes(len);
            let need1 = HIGH & low_bytes(len.saturating_sub(8));
            if len < 3 || len + 2 > n || upper0 & need0 != need0 || upper1 & need1 != need1 {
                return decided(
                    s,
                    if len + 2 > n {
                        http::UNSURE
                    } else {
                        http::NOT_HTTP
                    },
                );
            }
            if word(s, len + 1) & 0xff != b'/' as u64 {
                return decided(s, http::NOT_HTTP);
            }
            s.method = hash_step(hash_start(len), w0 & low_bytes(len));
            if len > 8 {
                s.method = hash_step(s.method, w1 & low_bytes(len - 8));
            }
            s.mark = len + 1;
            s.pos = len + 1;
            s.step = STEP_PATH_END;
        }
        STEP_PATH_END => {
            let Some(end) = find(s, pos, Stop::PathEnd) else {
                return decided(s, http::UNSURE);
            };
            s.pos = end;
            s.step = STEP_PATH_HASH;
        }
        STEP_PATH_HASH => {
            let mark = s.mark & (SCAN_WINDOW as u64 - 1);
            let len = pos.saturating_sub(mark);
            if len <= MAX_PATH_LEN as u64 {
                // A trailing slash (not the root's) is hashed away when the daemon strips it.
                let strip = cfg.strip_trailing_slash != 0
                    && len > 1
                    && word(s, pos.saturating_sub(1)) as u8 == b'/';
                let (path, ambiguous) = path_hash(s, mark, len - strip as u64);
                s.path = path;
                s.ambiguous = ambiguous as u64;
            } else {
                // Too long to check: its normal form could be anything.
                s.ambiguous = 1;
            }
            match word(s, pos) as u8 {
                b' ' => {
                    s.pos = pos + 1;
                    s.step = STEP_VERSION;
                }
                b'?' | b'#' => {
                    s.pos = pos + 1;
                    s.step = STEP_QUERY;
                }
                _ => return decided(s, http::NOT_HTTP),
            }
        }
        STEP_QUERY => {
            let Some(end) = find(s, pos, Stop::Blank) else {
                return decided(s, http::UNSURE);
            };
            if word(s, end) as u8 != b' ' {
                return decided(s, http::NOT_HTTP);
            }
            s.pos = end + 1;
            s.step = STEP_VERSION;
        }
        STEP_VERSION => {
            if pos + 8 > n {
                return decided(s, http::UNSURE);
            }
            if word(s, pos) & low_bytes(7) != HTTP1 {
                return decided(s, http::NOT_HTTP);
            }
            s.pos = pos + 7;
            s.step = STEP_LINE_END;
        }
        STEP_LINE_END => {
            let Some(end) = find(s, pos, Stop::LineEnd) else {
                return decided(s, http::UNSURE);
            };
            s.pos = end + 1;
            s.step = STEP_HEADER;
        }
        STEP_HEADER => {
            // At the start of a header line.
            if pos >= n {
                return decided(s, http::UNSURE);
            }
            let first = word(s, pos) as u8;
            if first == b'\r' || first == b'\n' {
                // The empty line: the headers ended without the key.
                return decided(s, http::NO_KEY);
            }
            let plen = (cfg.pattern_len as u64).min(MAX_PATTERN as u64);
            if pos + plen > n {
                return decided(s, http::UNSURE);
            }
            if matches(s, pos, &cfg.pattern, &cfg.pattern_fold, plen) {
                s.pos = pos + plen;
                s.step = STEP_VALUE;
                return 0;
            }
            let Some(end) = find(s, pos, Stop::LineEnd) else {
                return decided(s, http::UNSURE);
            };
            s.pos = end + 1;
        }
        STEP_VALUE => {
            // Leading blanks, then the prefix (if any).
            let w = word(s, pos);
            let blanks = !(eq_bytes(w, b' ') | eq_bytes(w, b'\t')) & HIGH;
            if blanks == 0 {
                return decided(s, http::UNSURE);
            }
            let start = pos + first_byte(blanks);
            let plen = (cfg.prefix_len as u64).min(MAX_PREFIX as u64);
            if start + plen > n {
                return decided(s, http::UNSURE);
            }
            if !matches(s, start, &cfg.prefix, &cfg.prefix_fold, plen) {
                return decided(s, http::NO_KEY);
            }
            s.mark = start + plen;
            s.pos = start + plen;
            s.step = STEP_KEY_END;
        }
        STEP_KEY_END => {
            let Some(end) = find(s, pos, Stop::ValueEnd) else {
                return decided(s, http::UNSURE);
            };
            s.pos = end;
            s.step = STEP_KEY_HASH;
        }
        _ => {
            // STEP_KEY_HASH: trailing blanks trimmed, then the key id.
            let mark = s.mark & (SCAN_WINDOW as u64 - 1);
            let mut end = pos;
            let mut i = 0;
            while i < 8 && end > mark {
                let last = word(s, end - 1) as u8;
                if last != b' ' && last != b'\t' {
                    break;
                }
                end -= 1;
                i += 1;
            }
            let len = end.saturating_sub(mark);
            if len == 0 {
                return decided(s, http::NO_KEY);
            }
            if len > MAX_KEY_LEN as u64 || (i == 8 && end > mark) {
                return decided(s, http::UNSURE);
            }
            s.key = hash(s, mark, len, MAX_KEY_LEN);
            return decided(s, http::IDENTIFIED);
        }
    }
    0
}

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
fn count_rejection(key_id: u64, reason: u32) {
    let Some(counts) = KEY_REJECTS.get_ptr_mut(key_id) else {
        let mut first = KeyRejects::default();
        match reason {
            counter::REJECTED_L7 => first.l7 = 1,
            counter::REJECTED_L4 => first.l4 = 1,
            _ => first.blocked = 1,
        }
        let _ = KEY_REJECTS.insert(key_id, first, 0);
        return;
    };
    // SAFETY: a per-CPU value of this CPU.
    unsafe {
        match reason {
            counter::REJECTED_L7 => (*counts).l7 += 1,
            counter::REJECTED_L4 => (*counts).l4 += 1,
            _ => (*counts).blocked += 1,
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
