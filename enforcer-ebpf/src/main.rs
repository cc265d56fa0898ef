//! Kernel side of enforcer: the TC ingress classifier `gate`.
//!
//! For TCP packets to a protected port (IPv4 or IPv6) the gate finds who is calling:
//!
//! - **L7**: a plaintext HTTP/1.x request line followed by the configured key header
//!   (case-insensitive name, optional value prefix such as `Bearer `) within the first
//!   `SCAN_WINDOW` bytes of the segment → key id ([`enforcer_common::key_id`]), and the price of
//!   that (method, path) from `PRICES`, else the default price; a path the daemon could spell
//!   differently in normal form (`%`, `\`, `//`, dot segments, too long) gets the ambiguous
//!   price instead, and a trailing slash is hashed away when the daemon strips it;
//! - **L4**: only for a request start without a key (its head read to the empty line) and a
//!   bare SYN (no ACK, RST or payload): the source address, if the daemon bound it to exactly
//!   one key; priced as that request, or at the cheapest price for the SYN. Pure ACKs, FINs,
//!   RSTs and body segments are never judged by a binding: they may carry a paid response.
//!
//! It rejects only what is *surely* unaffordable, and only while the daemon's heartbeat is
//! fresh: a snapshot of this config generation whose balance plus the refill since the
//! snapshot is below the price, or an operator block (the guarantee: `docs/kernel-gate.md`).
//! Everything else passes (`TC_ACT_PIPE`): unknown keys, stale or missing data, packets it cannot
//! parse, fragments, other protocols. With empty maps everything passes.
//!
//! Modules: [`headers`] (Ethernet/IPv4/IPv6/TCP), [`scan`] (the HTTP scan, with [`swar`]),
//! [`decision`] (identity, price, verdict), [`rst`] (the RST rewrite of `action = "reset"`),
//! [`maps`] (the maps and counters). This file is only the entry points.
#![no_std]
#![no_main]

mod decision;
mod headers;
mod maps;
mod rst;
mod scan;
mod swar;

use aya_ebpf::bindings::{TC_ACT_PIPE, TC_ACT_REDIRECT, TC_ACT_SHOT};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use decision::{Verdict, inspect};
use enforcer_common::{action, counter};
use maps::{CONFIG, bump, count_rejection};

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

/// The floor for benchmarks: a classifier that only passes (`cargo xtask bench kernel`).
#[classifier]
pub fn floor(_ctx: TcContext) -> i32 {
    TC_ACT_PIPE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
