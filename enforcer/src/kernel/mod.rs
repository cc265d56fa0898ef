//! The userspace side of the kernel gate (the TC eBPF program `gate` in `enforcer-ebpf`).
//!
//! - [`loader`]: loads the embedded object, attaches it (TCX, else clsact), pins, and reads and
//!   writes its maps, one map operation per method. Knows nothing about budgets.
//! - [`plan`]: what the kernel enforces, derived from the config (settings, prices, the config
//!   generation), so that it never over-prices.
//! - [`sync`]: the task that keeps the maps in step with the decisions (snapshots, bindings,
//!   heartbeat, counters) and [`KernelReport`], what `/readyz` says about it.
//! - [`rollup`]: per-key rejection counts into the audit ledger's rollups.
//! - [`binding`]: which client addresses may stand for one key (L4 identity).
//! - [`attachment`]: where the gate runs, asked of the kernel (live links, stale pins), and the
//!   operator's switch (`enforcer kernel detach|attach`) that the daemon follows.
//!
//! Data flows one way: these modules import the config, the ledger and the metrics, never the
//! HTTP API or the decider.
pub mod attachment;
pub mod binding;
pub mod loader;
pub mod plan;
pub mod rollup;
pub mod sync;

pub use loader::{
    Counters, Gate, GateSettings, InterfaceState, KernelError, OBJECT, address_key, monotonic_ns,
    pinned_interfaces, price_key,
};
pub use plan::{KernelPlan, TierRule, plan};
pub use rollup::{ROLLUP_EVERY, Rollup};
pub use sync::{GateLink, KernelReport, KernelStatus, PlanError, start};
