//! Empty library target: it lets the daemon list this crate as a build-dependency so that cargo
//! rebuilds the daemon (and with it the embedded eBPF object) when the kernel code changes.
#![no_std]
