//! Types and constants shared by the userspace daemon (`enforcer`) and the kernel programs
//! (`enforcer-ebpf`).
//!
//! Everything here is `no_std`, and every type that crosses the kernel boundary is `#[repr(C)]`
//! without implicit padding, so both sides agree on its layout byte for byte.
#![no_std]
#![forbid(unsafe_code)]

/// Names of the kernel objects, so the loader and the program cannot drift apart.
pub mod names {
    /// The TC ingress classifier.
    pub const GATE_PROGRAM: &str = "gate";
    /// Per-CPU array of `u64` counters, indexed by [`crate::counter`].
    pub const COUNTERS_MAP: &str = "COUNTERS";
    /// Where the daemon pins its maps so a restarted daemon adopts them.
    pub const PIN_DIR: &str = "/sys/fs/bpf/enforcer";
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Packets the gate let through to the normal path.
    pub const PASSED: u32 = 0;
    /// Packets the gate could not parse (they pass too).
    pub const PARSE_FAILED: u32 = 1;
    /// Number of slots in the array; indexes above are reserved for later counters.
    pub const SLOTS: u32 = 16;
}
