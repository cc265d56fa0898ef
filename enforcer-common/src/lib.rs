//! Types and constants shared by the userspace daemon (`enforcer`) and the kernel programs
//! (`enforcer-ebpf`).
//!
//! Everything here is `no_std`, and every type that crosses the kernel boundary is `#[repr(C)]`
//! without implicit padding (explicit `_pad` fields, no `bool`), so both sides agree on its
//! layout byte for byte. The key-id hash is defined here once and used by both sides.
#![no_std]

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
    /// `LruPerCpuHashMap<u64, u64>`: rejections per key id (for the audit rollups).
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
/// Longest header-name pattern (`"\n" + name + ":"`) the config can hold.
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

/// FNV-1a 64 initial state.
#[inline(always)]
pub const fn fnv_start() -> u64 {
    FNV_OFFSET
}

/// One FNV-1a 64 step. The kernel calls it byte by byte as it scans; [`key_id`] and
/// [`path_hash`] fold it over a slice. Sharing the step is what makes both sides agree.
#[inline(always)]
pub const fn fnv_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(FNV_PRIME)
}

/// Folds [`fnv_step`] over `bytes`.
pub const fn fnv(bytes: &[u8]) -> u64 {
    let mut h = fnv_start();
    let mut i = 0;
    while i < bytes.len() {
        h = fnv_step(h, bytes[i]);
        i += 1;
    }
    h
}

/// 64-bit id of an API key: FNV-1a of its bytes. Not a secret (the kernel sees raw keys in the
/// packets anyway); the SHA-256 used in Redis and the ledger is what leaves the node.
pub const fn key_id(key: &[u8]) -> u64 {
    fnv(key)
}

/// Hash of a request path (up to `?`) for the price map.
pub const fn path_hash(path: &[u8]) -> u64 {
    fnv(path)
}

/// Hash of a request method for the price map (0: any method).
pub const fn method_hash(method: &[u8]) -> u64 {
    fnv(method)
}

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
    /// When the binding was last confirmed (`CLOCK_MONOTONIC` ns).
    pub synced_ns: u64,
    /// Config generation.
    pub generation: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// The gate's configuration (one entry of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Entries of another generation are ignored (bumped on every config change).
    pub generation: u32,
    /// [`action`] for rejected packets.
    pub action: u32,
    /// Snapshots and bindings older than this are ignored, nanoseconds.
    pub max_staleness_ns: u64,
    /// When the daemon last wrote this config (`CLOCK_MONOTONIC` ns). Operator blocks hold only
    /// while it is fresh: with the daemon gone, everything passes once it is stale.
    pub heartbeat_ns: u64,
    /// Price of a request whose (method, path) is not in `PRICES`, milli-tokens.
    pub default_price_milli: u64,
    /// Cheapest price of any request, milli-tokens (what an L4-identified packet is compared to).
    pub min_price_milli: u64,
    /// Length of `pattern`.
    pub pattern_len: u32,
    /// Length of `prefix`.
    pub prefix_len: u32,
    /// `"\n" + lower-case header name + ":"`, e.g. `"\nx-api-key:"`.
    pub pattern: [u8; MAX_PATTERN],
    /// Lower-case value prefix to skip, e.g. `"bearer "` for `Authorization: Bearer …`.
    pub prefix: [u8; MAX_PREFIX],
}

impl GateConfig {
    /// A config for `header` (and an optional value prefix); `None` if either is too long.
    pub fn new(header: &str, prefix: &str) -> Option<Self> {
        let name = header.as_bytes();
        let value_prefix = prefix.as_bytes();
        if name.is_empty() || name.len() + 2 > MAX_PATTERN || value_prefix.len() > MAX_PREFIX {
            return None;
        }
        let mut pattern = [0u8; MAX_PATTERN];
        pattern[0] = b'\n';
        let mut i = 0;
        while i < name.len() {
            pattern[1 + i] = name[i].to_ascii_lowercase();
            i += 1;
        }
        pattern[1 + name.len()] = b':';
        let mut p = [0u8; MAX_PREFIX];
        let mut j = 0;
        while j < value_prefix.len() {
            p[j] = value_prefix[j].to_ascii_lowercase();
            j += 1;
        }
        Some(Self {
            generation: 1,
            action: action::DROP,
            max_staleness_ns: 2_000_000_000,
            heartbeat_ns: 0,
            default_price_milli: 1000,
            min_price_milli: 1000,
            pattern_len: (name.len() + 2) as u32,
            prefix_len: value_prefix.len() as u32,
            pattern,
            prefix: p,
        })
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all four): `#[repr(C)]` plain-old-data structs of integers and byte arrays with
    // explicit padding fields, so every bit pattern is valid and there are no hidden bytes.
    unsafe impl aya::Pod for super::Budget {}
    unsafe impl aya::Pod for super::PriceKey {}
    unsafe impl aya::Pod for super::Binding {}
    unsafe impl aya::Pod for super::GateConfig {}
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

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<Budget>(), 32);
        assert_eq!(core::mem::size_of::<PriceKey>(), 16);
        assert_eq!(core::mem::size_of::<Binding>(), 24);
        assert_eq!(
            core::mem::size_of::<GateConfig>(),
            4 + 4 + 8 + 8 + 8 + 8 + 4 + 4 + MAX_PATTERN + MAX_PREFIX
        );
    }

    #[test]
    fn pattern_is_lower_case_with_newline_and_colon() {
        let c = GateConfig::new("X-Api-Key", "").expect("fits");
        assert_eq!(&c.pattern[..c.pattern_len as usize], b"\nx-api-key:");
        let b = GateConfig::new("Authorization", "Bearer ").expect("fits");
        assert_eq!(&b.prefix[..b.prefix_len as usize], b"bearer ");
    }
}
