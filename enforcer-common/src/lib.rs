//! Types and constants shared by the userspace daemon (`enforcer`) and the kernel programs
//! (`enforcer-ebpf`).
//!
//! Everything here is `no_std`, and every type that crosses the kernel boundary is `#[repr(C)]`
//! without implicit padding (explicit `_pad` fields, no `bool`), so both sides agree on its
//! layout byte for byte. The key-id hash is defined here once and used by both sides.
#![no_std]

/// The toolchain that builds the kernel programs (`enforcer/build.rs` through aya-build, and
/// `cargo xtask setup`, which installs exactly this one with `rust-src`).
///
/// Pinned to a dated nightly because bpf-linker reads the LLVM bitcode rustc writes: its LLVM
/// major must equal rustc's ([`EBPF_LLVM_MAJOR`]). A plain `nightly` drifts to newer LLVMs
/// (2026-10-29 brought LLVM 23 and the link failed with `Invalid record`).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// The LLVM major of [`EBPF_TOOLCHAIN`], which bpf-linker must be built against.
pub const EBPF_LLVM_MAJOR: u32 = 22;

mod milli;
pub use milli::Milli;

/// Names of the kernel objects, so the loader and the program cannot drift apart.
pub mod names {
    /// The TC ingress classifier.
    pub const GATE_PROGRAM: &str = "gate";
    /// Per-CPU array of `u64` counters, indexed by [`crate::counter`].
    pub const COUNTERS_MAP: &str = "COUNTERS";
    /// `Array<GateConfig>` with one entry.
    pub const CONFIG_MAP: &str = "CONFIG";
    /// `HashMap<u16, u32>`: protected destination ports (host byte order) → 1.
    pub const PORTS_MAP: &str = "PORTS";
    /// `LruHashMap<u64, Budget>`: budget snapshots by key id.
    pub const BUDGETS_MAP: &str = "BUDGETS";
    /// `HashMap<PriceKey, u64>`: price in milli-tokens by (method, path) hash.
    pub const PRICES_MAP: &str = "PRICES";
    /// `LruHashMap<[u8; 16], Binding>`: client address (IPv6 or IPv4-mapped) → key id.
    pub const BINDINGS_MAP: &str = "BINDINGS";
    /// `LruHashMap<u64, u64>`: operator blocks, key id → end (`CLOCK_MONOTONIC` ns).
    pub const BLOCKS_MAP: &str = "BLOCKS";
    /// `LruPerCpuHashMap<u64, KeyRejects>`: rejections per key id and reason (audit rollups).
    pub const KEY_REJECTS_MAP: &str = "KEY_REJECTS";
    /// Where the daemon pins its maps so a restarted daemon adopts them.
    pub const PIN_DIR: &str = "/sys/fs/bpf/enforcer";
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Packets the gate let through to the normal path.
    pub const PASSED: u32 = 0;
    /// Packets to a protected port that the gate could not parse (they pass too).
    pub const PARSE_FAILED: u32 = 1;
    /// Rejected: an HTTP request whose key cannot pay its price.
    pub const REJECTED_L7: u32 = 2;
    /// Rejected: a packet from an address bound to a key that cannot pay the cheapest price.
    pub const REJECTED_L4: u32 = 3;
    /// Rejected: the key is blocked by an operator.
    pub const REJECTED_BLOCKED: u32 = 4;
    /// Passed because the key's snapshot was older than `max_staleness` or of another generation.
    pub const STALE: u32 = 5;
    /// Number of slots in the array; indexes above are reserved for later counters.
    pub const SLOTS: u32 = 16;
}

/// Bytes of TCP payload the gate scans for the request line and the key header.
pub const SCAN_WINDOW: usize = 512;
/// Longest key value hashed; a longer value is not identified (the packet passes).
pub const MAX_KEY_LEN: usize = 128;
/// Longest header-name pattern (lower-case name + `":"`) the config can hold.
pub const MAX_PATTERN: usize = 48;
/// Longest value prefix (e.g. `"bearer "`) the config can hold.
pub const MAX_PREFIX: usize = 16;

/// Capacities of the bounded maps.
pub mod capacity {
    /// Budget snapshots.
    pub const BUDGETS: u32 = 131_072;
    /// Prices.
    pub const PRICES: u32 = 16_384;
    /// Address bindings.
    pub const BINDINGS: u32 = 65_536;
    /// Per-key rejection counters.
    pub const KEY_REJECTS: u32 = 65_536;
    /// Protected ports.
    pub const PORTS: u32 = 64;
    /// Operator blocks.
    pub const BLOCKS: u32 = 4096;
}

/// What the gate does with a packet it rejects.
pub mod action {
    /// Drop it (`TC_ACT_SHOT`).
    pub const DROP: u32 = 0;
    /// Turn it into a TCP RST back to the client (falls back to a drop when it cannot).
    pub const RESET: u32 = 1;
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes` (used for config fingerprints, not in the packet path).
pub const fn fnv(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

const HASH_SEED: u64 = 0x243f_6a88_85a3_08d3;
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Initial state of the word hash of a `len`-byte string (the length is mixed in first, so
/// strings that differ only by trailing zero bytes differ).
#[inline(always)]
pub const fn hash_start(len: u64) -> u64 {
    HASH_SEED ^ len
}

/// One step of the word hash: the next 8 bytes of the string as a little-endian `u64` (the last
/// word zero-padded). The kernel hashes a token eight bytes per step, with a 64-bit multiply and
/// a shift, instead of one step per byte; sharing this step is what makes both sides agree.
#[inline(always)]
pub const fn hash_step(hash: u64, word: u64) -> u64 {
    let x = (hash ^ word).wrapping_mul(HASH_MUL);
    x ^ (x >> 29)
}

/// The word hash of `bytes`: [`hash_start`], then [`hash_step`] over 8-byte little-endian words.
pub const fn word_hash(bytes: &[u8]) -> u64 {
    let mut h = hash_start(bytes.len() as u64);
    let mut i = 0;
    while i < bytes.len() {
        let mut w = 0u64;
        let mut j = 0;
        while j < 8 && i + j < bytes.len() {
            w |= (bytes[i + j] as u64) << (8 * j);
            j += 1;
        }
        h = hash_step(h, w);
        i += 8;
    }
    h
}

/// 64-bit id of an API key. Not a secret (the kernel sees raw keys in the packets anyway); the
/// SHA-256 used in Redis and the ledger is what leaves the node.
pub const fn key_id(key: &[u8]) -> u64 {
    word_hash(key)
}

/// Longest request path the kernel hashes for the price map; a longer path gets the kernel's
/// default price (and the daemon prices longer configured paths as it prices wildcards).
pub const MAX_PATH_LEN: usize = 256;

/// Hash of a request path (up to `?` or `#`, in normal form) for the price map.
pub const fn path_hash(path: &[u8]) -> u64 {
    word_hash(path)
}

/// Whether the gate takes a request path (up to `?` or `#`, as in the request line) as possibly
/// not in the daemon's normal form, and prices it at `ambiguous_price_milli` instead of looking
/// it up. (A single trailing slash is not ambiguous: the gate strips it before hashing when
/// `strip_trailing_slash` is set, as the daemon does; `/a//` is ambiguous either way.)
///
/// Normalising in the kernel would cost a scan per byte; instead the gate spots every path the
/// daemon could spell differently: one with a `%` (an escape that may decode), a `\` (a
/// separator to the daemon), `//`, or a segment starting with `.` (`/./`, `/../`, `/.`, `/..`,
/// and, conservatively, names such as `/.well-known`), or one longer than [`MAX_PATH_LEN`] (not
/// scanned). Anything else is the daemon's normal form, except raw characters the daemon
/// percent-encodes (space, `"<>^`{|}`, non-ASCII): such a path matches no configured path in
/// either spelling, so the gate's default price, which the daemon keeps at or below the price of
/// every configured path containing a `%`, applies. This is the reference the kernel's
/// word-at-a-time check is tested against.
pub const fn path_is_ambiguous(path: &[u8]) -> bool {
    if path.len() > MAX_PATH_LEN {
        return true;
    }
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' || b == b'\\' {
            return true;
        }
        if b == b'/' && i + 1 < path.len() && (path[i + 1] == b'/' || path[i + 1] == b'.') {
            return true;
        }
        i += 1;
    }
    false
}

/// Hash of a request method for the price map (0: any method).
pub const fn method_hash(method: &[u8]) -> u64 {
    word_hash(method)
}

/// The oldest budget snapshot the kernel takes into account, nanoseconds (a minute).
///
/// A snapshot holds while the daemon's heartbeat ([`GateConfig::heartbeat_ns`]) is fresh, not
/// only while it is young: the daemon writes a snapshot when its key's balance changes and
/// lifts it at half this age, instead of re-stamping every key at every tick. The bound keeps
/// the kernel's refill projection in range (microseconds ≤ 2^26 times a rate ≤ 2^37 cannot
/// overflow 64 bits) and caps how long a snapshot of a daemon that stopped lifting it (while
/// still heartbeating) can count.
pub const SNAPSHOT_MAX_AGE_NS: u64 = 60_000_000_000;

/// A key's budget as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Balance at `synced_ns`, in milli-tokens (may be negative after rounding; never trusted
    /// to be higher than it was).
    pub balance_milli: i64,
    /// Refill rate, milli-tokens per second.
    pub refill_milli_per_sec: u64,
    /// `CLOCK_MONOTONIC` nanoseconds (the kernel's `bpf_ktime_get_ns`) of the snapshot.
    pub synced_ns: u64,
    /// Config generation the snapshot belongs to.
    pub generation: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Price map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PriceKey {
    /// [`method_hash`] of the method, or 0 for any method.
    pub method: u64,
    /// [`path_hash`] of the path.
    pub path: u64,
}

/// A client address bound to one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The key id.
    pub key_id: u64,
    /// When the daemon bound the address (`CLOCK_MONOTONIC` ns; informational: a binding
    /// holds while the daemon's heartbeat is fresh and its generation is current).
    pub synced_ns: u64,
    /// Config generation.
    pub generation: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Rejections of one key by reason (a per-CPU value of `KEY_REJECTS`), running totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyRejects {
    /// [`counter::REJECTED_L7`].
    pub l7: u64,
    /// [`counter::REJECTED_L4`].
    pub l4: u64,
    /// [`counter::REJECTED_BLOCKED`].
    pub blocked: u64,
}

/// The gate's configuration (one entry of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Entries of another generation are ignored (bumped on every config change).
    pub generation: u32,
    /// [`action`] for rejected packets.
    pub action: u32,
    /// How long the gate keeps enforcing after the daemon's last heartbeat, nanoseconds.
    pub max_staleness_ns: u64,
    /// When the daemon last wrote this config (`CLOCK_MONOTONIC` ns). Snapshots, bindings and
    /// operator blocks hold only while it is fresh (no older than `max_staleness_ns`): with the
    /// daemon gone, everything passes once it is stale.
    pub heartbeat_ns: u64,
    /// Price of a request whose (method, path) is not in `PRICES`, milli-tokens.
    pub default_price_milli: u64,
    /// Cheapest price of any request, milli-tokens (what an L4-identified packet is compared to).
    pub min_price_milli: u64,
    /// Price of a request whose path is not in normal form (see [`path_is_ambiguous`]):
    /// the least userspace charges for anything, 0 when an operational endpoint exists.
    pub ambiguous_price_milli: u64,
    /// 1: a trailing slash is priced like the path without it (`pricing.trailing_slash =
    /// "strip"`), so the gate hashes `/a/` as `/a`; 0: as it is.
    pub strip_trailing_slash: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Length of `pattern`.
    pub pattern_len: u32,
    /// Length of `prefix`.
    pub prefix_len: u32,
    /// Lower-case header name + `":"`, e.g. `"x-api-key:"`, zero-padded.
    pub pattern: [u8; MAX_PATTERN],
    /// `0x20` where `pattern` has a letter, else 0: OR-ing it into the packet's bytes folds
    /// their case before the comparison (exactly: only `A-Z` become `a-z`).
    pub pattern_fold: [u8; MAX_PATTERN],
    /// Lower-case value prefix to skip, e.g. `"bearer "` for `Authorization: Bearer …`.
    pub prefix: [u8; MAX_PREFIX],
    /// Case fold of `prefix`, as `pattern_fold`.
    pub prefix_fold: [u8; MAX_PREFIX],
}

impl GateConfig {
    /// A config for `header` (and an optional value prefix); `None` if either is too long.
    pub fn new(header: &str, prefix: &str) -> Option<Self> {
        let name = header.as_bytes();
        let value_prefix = prefix.as_bytes();
        if name.is_empty() || name.len() + 1 > MAX_PATTERN || value_prefix.len() > MAX_PREFIX {
            return None;
        }
        let mut pattern = [0u8; MAX_PATTERN];
        let mut pattern_fold = [0u8; MAX_PATTERN];
        let mut i = 0;
        while i < name.len() {
            pattern[i] = name[i].to_ascii_lowercase();
            pattern_fold[i] = fold(name[i]);
            i += 1;
        }
        pattern[name.len()] = b':';
        let mut p = [0u8; MAX_PREFIX];
        let mut p_fold = [0u8; MAX_PREFIX];
        let mut j = 0;
        while j < value_prefix.len() {
            p[j] = value_prefix[j].to_ascii_lowercase();
            p_fold[j] = fold(value_prefix[j]);
            j += 1;
        }
        Some(Self {
            generation: 1,
            action: action::DROP,
            max_staleness_ns: 2_000_000_000,
            heartbeat_ns: 0,
            default_price_milli: 1000,
            min_price_milli: 1000,
            ambiguous_price_milli: 0,
            strip_trailing_slash: 1,
            _pad: 0,
            pattern_len: (name.len() + 1) as u32,
            prefix_len: value_prefix.len() as u32,
            pattern,
            pattern_fold,
            prefix: p,
            prefix_fold: p_fold,
        })
    }
}

// The kernel reads these arrays a word at a time with aligned loads.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GateConfig, pattern) % 8 == 0);
    assert!(offset_of!(GateConfig, pattern_fold) % 8 == 0);
    assert!(offset_of!(GateConfig, prefix) % 8 == 0);
    assert!(offset_of!(GateConfig, prefix_fold) % 8 == 0);
    assert!(MAX_PATTERN.is_multiple_of(8) && MAX_PREFIX.is_multiple_of(8));
};

const fn fold(b: u8) -> u8 {
    if b.is_ascii_alphabetic() { 0x20 } else { 0 }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all five): `#[repr(C)]` plain-old-data structs of integers and byte arrays with
    // explicit padding fields, so every bit pattern is valid and there are no hidden bytes.
    unsafe impl aya::Pod for super::Budget {}
    unsafe impl aya::Pod for super::PriceKey {}
    unsafe impl aya::Pod for super::Binding {}
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::KeyRejects {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_test_vectors() {
        // Published FNV-1a 64 vectors.
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Pinned vectors of the word hash: changing them changes every key id, and the kernel
    /// tests (which reject keys whose ids userspace computed) prove the kernel agrees.
    #[test]
    fn word_hash_vectors() {
        assert_eq!(word_hash(b""), HASH_SEED);
        assert_eq!(word_hash(b"a"), hash_step(HASH_SEED ^ 1, 0x61));
        assert_eq!(
            word_hash(b"abcdefghi"),
            hash_step(
                hash_step(HASH_SEED ^ 9, u64::from_le_bytes(*b"abcdefgh")),
                0x69
            )
        );
        // The length is mixed in: a trailing zero byte makes another hash.
        assert_ne!(word_hash(b"ab"), word_hash(b"ab\0"));
        assert_ne!(word_hash(b"key-1"), word_hash(b"key-2"));
        assert_ne!(word_hash(b"01234567a"), word_hash(b"01234567b"));
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<Budget>(), 32);
        assert_eq!(core::mem::size_of::<PriceKey>(), 16);
        assert_eq!(core::mem::size_of::<Binding>(), 24);
        assert_eq!(
            core::mem::size_of::<GateConfig>(),
            4 + 4 + 8 + 8 + 8 + 8 + 8 + 4 + 4 + 4 + 4 + 2 * (MAX_PATTERN + MAX_PREFIX)
        );
    }

    #[test]
    fn paths_the_daemon_could_spell_otherwise_are_ambiguous() {
        for p in [
            "/%67enerate-report",
            "/a%2Fb",
            "//generate-report",
            "/generate-report//",
            "/./generate-report",
            "/x/../generate-report",
            "/generate-report/.",
            "/generate-report/..",
            "/x\\..\\generate-report",
            "/.well-known",
        ] {
            assert!(path_is_ambiguous(p.as_bytes()), "{p}");
        }
        assert!(path_is_ambiguous(b"/health//"), "stripped once, still //");
        for p in [
            "/",
            "/generate-report",
            "/a/b.c/d",
            "/a./b",
            "/a/b/",
            "/~x_y-z",
        ] {
            assert!(!path_is_ambiguous(p.as_bytes()), "{p}");
        }
        let long = [b'a'; MAX_PATH_LEN + 1];
        assert!(path_is_ambiguous(&long));
        assert!(!path_is_ambiguous(&long[..MAX_PATH_LEN]));
    }

    #[test]
    fn pattern_is_lower_case_with_colon_and_fold_marks_letters() {
        let c = GateConfig::new("X-Api-Key", "").expect("fits");
        assert_eq!(&c.pattern[..c.pattern_len as usize], b"x-api-key:");
        assert_eq!(
            &c.pattern_fold[..c.pattern_len as usize],
            &[0x20, 0, 0x20, 0x20, 0x20, 0, 0x20, 0x20, 0x20, 0]
        );
        let b = GateConfig::new("Authorization", "Bearer ").expect("fits");
        assert_eq!(&b.prefix[..b.prefix_len as usize], b"bearer ");
    }
}
