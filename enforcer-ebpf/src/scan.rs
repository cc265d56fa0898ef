//! The HTTP scan: finds the request line (method, path) and the configured key header in the
//! first [`SCAN_WINDOW`] bytes of a TCP segment's payload.
//!
//! The payload is copied into this CPU's scratch slot ([`SCRATCH`]) and scanned in steps under
//! `bpf_loop`: each step reads one token or one header line, eight bytes at a time
//! ([`crate::swar`]), and leaves its state in the slot. What the scan cannot read for sure (a
//! header cut by the segment's end or the window, a malformed request line) is never taken for
//! an identity: the outcome then says so ([`http::UNSURE`], [`http::NOT_HTTP`]).
use crate::maps::SCRATCH;
use crate::swar::{HIGH, ONES, eq_bytes, first_byte, low_bytes, lt_bytes};
use aya_ebpf::programs::TcContext;
use enforcer_common::{
    GateConfig, MAX_KEY_LEN, MAX_PATH_LEN, MAX_PATTERN, MAX_PREFIX, PriceKey, SCAN_WINDOW,
    hash_start, hash_step,
};

/// Slack after the window so an 8-byte load at any offset inside it stays in the buffer.
const SLACK: usize = 8;

#[repr(C)]
pub struct Scan {
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

/// What the L7 parser found (the key id and price key are left in the scratch slot).
pub mod http {
    /// The first key header holds exactly a key: a complete value, whose line ends with
    /// "\r\n" or "\n" and is not continued (obs-fold); `key`, `method` and `path` of the
    /// scratch slot are set.
    pub const IDENTIFIED: u32 = 0;
    /// Not an HTTP request start (another protocol, a continuation segment).
    pub const NOT_HTTP: u32 = 1;
    /// An HTTP request that has no key: its head ended (the empty line) without the key
    /// header, or its first key header holds none (an empty value, or one without the value
    /// prefix, e.g. another auth scheme).
    pub const NO_KEY: u32 = 2;
    /// HTTP, but cut off before the key could be read (split segment, beyond the window,
    /// too long), a value that may not be the whole key (a bare '\r', a folded line), a
    /// malformed line end, or no scratch space: identity unknown.
    pub const UNSURE: u32 = 3;
}

/// What the scan left in the scratch slot for the decision. Meaningless when the outcome was
/// [`http::NOT_HTTP`]: a segment without payload leaves the slot as an earlier packet left it.
pub struct Found {
    /// The key id (set when the outcome is [`http::IDENTIFIED`]).
    pub key_id: u64,
    /// 1 when the path may not be in the daemon's normal form.
    pub ambiguous: u64,
    /// The (method, path) hashes of the request line (set from [`http::NO_KEY`] and
    /// [`http::IDENTIFIED`] on: the request line was read).
    pub request: PriceKey,
}

/// Reads what [`parse_http`] left in this CPU's scratch slot; `None` without a slot.
#[inline(always)]
pub fn found() -> Option<Found> {
    let scan = SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's scratch slot, just written by the parser.
    unsafe {
        Some(Found {
            key_id: core::ptr::read_volatile(&raw const (*scan).key),
            ambiguous: core::ptr::read_volatile(&raw const (*scan).ambiguous),
            request: PriceKey {
                method: core::ptr::read_volatile(&raw const (*scan).method),
                path: core::ptr::read_volatile(&raw const (*scan).path),
            },
        })
    }
}

/// Scans the start of the payload (`payload..len` of the frame): request line, then headers
/// for the key header.
///
/// The scan runs as steps under `bpf_loop`: each step reads one token or one header line, eight
/// bytes at a time (SWAR: word-wide byte comparisons), and leaves its state in the scratch slot.
/// The verifier checks the step function once instead of every path through the packet, and
/// reloading the state from the map value at each step keeps its view of offsets simple.
#[inline(always)]
pub fn parse_http(ctx: &TcContext, cfg: &GateConfig, payload: usize, len: usize) -> u32 {
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

// A step ends where the verifier would otherwise walk one search's every exit into the next
// loop (after a path's or a key's end is found); where one way leads on, the next search runs
// in the same step (each step costs its entry and state reload: 12 steps for the bench's
// request before, 8 now).
const STEP_METHOD: u64 = 0;
const STEP_PATH_HASH: u64 = 1;
const STEP_QUERY: u64 = 2;
const STEP_VERSION: u64 = 3;
const STEP_HEADER: u64 = 4;
const STEP_KEY_HASH: u64 = 5;

/// `HTTP/1.` as a little-endian word (7 bytes).
const HTTP1: u64 = 0x002e_312f_5054_5448;

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
            // The path's end in the same step: one way leads here, so the verifier walks the
            // search once more, and the request saves a step.
            let Some(end) = find(s, len + 1, Stop::PathEnd) else {
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
            // The rest of the request line in the same step.
            let Some(end) = find(s, pos + 7, Stop::LineEnd) else {
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
            let w = word(s, pos);
            let first = w as u8;
            if first == b'\n' {
                // The empty line: the headers ended without the key.
                return decided(s, http::NO_KEY);
            }
            if first == b'\r' {
                // "\r\n" is the empty line; a bare '\r' is no line end to an HTTP parser.
                if pos + 1 < n && (w >> 8) as u8 == b'\n' {
                    return decided(s, http::NO_KEY);
                }
                return decided(s, http::UNSURE);
            }
            let plen = (cfg.pattern_len as u64).min(MAX_PATTERN as u64);
            if pos + plen > n {
                return decided(s, http::UNSURE);
            }
            if !matches(s, pos, &cfg.pattern, &cfg.pattern_fold, plen) {
                let Some(end) = find(s, pos, Stop::LineEnd) else {
                    return decided(s, http::UNSURE);
                };
                s.pos = end + 1;
                return 0;
            }
            // The key header. Its value in the same step: leading blanks, then the prefix (if
            // any), then the value's end.
            if pos + plen >= n {
                return decided(s, http::UNSURE);
            }
            // Below n ≤ SCAN_WINDOW: the mask changes nothing but bounds it for the verifier.
            let value = (pos + plen) & (SCAN_WINDOW as u64 - 1);
            let w = word(s, value);
            let blanks = !(eq_bytes(w, b' ') | eq_bytes(w, b'\t')) & HIGH;
            if blanks == 0 {
                return decided(s, http::UNSURE);
            }
            let start = value + first_byte(blanks);
            let plen = (cfg.prefix_len as u64).min(MAX_PREFIX as u64);
            if start + plen > n {
                return decided(s, http::UNSURE);
            }
            if !matches(s, start, &cfg.prefix, &cfg.prefix_fold, plen) {
                return decided(s, http::NO_KEY);
            }
            s.mark = start + plen;
            let Some(end) = find(s, start + plen, Stop::ValueEnd) else {
                return decided(s, http::UNSURE);
            };
            s.pos = end;
            s.step = STEP_KEY_HASH;
        }
        _ => {
            // STEP_KEY_HASH. The value is exactly the key only if its line ends there ("\r\n"
            // or "\n", not a bare '\r') and the next line does not continue it (obs-fold: a
            // line starting with a blank): that takes one byte of the next line.
            let w = word(s, pos);
            let cr = (w as u8 == b'\r') as u64;
            if pos + 2 + cr > n
                || (cr == 1 && (w >> 8) as u8 != b'\n')
                || matches!((w >> (8 * (1 + cr))) as u8, b' ' | b'\t')
            {
                return decided(s, http::UNSURE);
            }
            // Trailing blanks trimmed, then the key id.
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
