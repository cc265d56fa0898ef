//! Kernel side of enforcer: the TC ingress classifier `gate`.
//!
//! Today the gate sees every packet on the interfaces it is attached to, counts it and lets it
//! through; the per-key rejection logic (issue "Kernel gate") builds on this skeleton. Whatever
//! the gate cannot decide for sure passes, so a gate that decides nothing is always safe.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use enforcer_common::counter;

/// Per-CPU packet counters, indexed by `enforcer_common::counter`; userspace sums the CPUs.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// TC ingress entry point. `TC_ACT_PIPE` hands the packet on to the next program or the
/// stack, so the gate composes with other TC programs on the same interface.
#[classifier]
pub fn gate(ctx: TcContext) -> i32 {
    let _ = ctx;
    bump(counter::PASSED);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
