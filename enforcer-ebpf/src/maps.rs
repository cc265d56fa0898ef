//! The gate's maps (names as in `enforcer_common::names`; the daemon pins and writes them) and
//! the counters the program bumps.
use crate::scan::Scan;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray};
use enforcer_common::{Binding, Budget, GateConfig, KeyRejects, PriceKey, capacity, counter};

/// Per-CPU packet counters, indexed by `enforcer_common::counter`; userspace sums the CPUs.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// The gate's configuration; generation 0 (all zero, before the daemon writes it) disables it.
#[map]
pub static CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// Protected destination ports (host byte order).
#[map]
pub static PORTS: HashMap<u16, u32> = HashMap::with_max_entries(capacity::PORTS, 0);

/// Budget snapshots by key id; LRU so a full map evicts instead of refusing new keys.
#[map]
pub static BUDGETS: LruHashMap<u64, Budget> = LruHashMap::with_max_entries(capacity::BUDGETS, 0);

/// Prices (milli-tokens) by method and path hash; method 0 matches any method.
#[map]
pub static PRICES: HashMap<PriceKey, u64> = HashMap::with_max_entries(capacity::PRICES, 0);

/// Client address (IPv6, or IPv4-mapped) → the one key it is bound to.
#[map]
pub static BINDINGS: LruHashMap<[u8; 16], Binding> =
    LruHashMap::with_max_entries(capacity::BINDINGS, 0);

/// Operator blocks: key id → end of the block (`CLOCK_MONOTONIC` ns).
#[map]
pub static BLOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(capacity::BLOCKS, 0);

/// Rejections per key id and reason, per CPU (read into the audit ledger's rollups).
#[map]
pub static KEY_REJECTS: LruPerCpuHashMap<u64, KeyRejects> =
    LruPerCpuHashMap::with_max_entries(capacity::KEY_REJECTS, 0);

/// Per-CPU scan state: the payload copy (too big for the 512-byte BPF stack) and the parser's
/// variables, shared by the `bpf_loop` callback's steps.
#[map]
pub static SCRATCH: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to the per-CPU packet counter `index` (`enforcer_common::counter`).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a per-CPU array slot owned by this CPU for the
        // duration of the program; no other writer can race with it.
        unsafe { *slot += 1 };
    }
}

/// Adds one to `key_id`'s per-CPU rejection count for `reason` (`counter::REJECTED_*`).
#[inline(always)]
pub fn count_rejection(key_id: u64, reason: u32) {
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
