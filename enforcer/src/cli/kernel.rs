//! `enforcer kernel status|detach|attach` and `enforcer keys block|unblock`: the operator's view
//! of this node's kernel gate, through the pinned maps and what the kernel says about its links.
//!
//! Output goes through a writer and its errors are returned, never panicked on: `enforcer kernel
//! status | head` ends quietly when `head` closes the pipe (see [`is_broken_pipe`]).
use crate::kernel::Gate;
use crate::kernel::attachment::{self, Detached};
use crate::key::ApiKey;
use anyhow::{Context as _, bail};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Whether an error is a write to a closed pipe (`… | head`): the command then ends quietly.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The gate pinned by a running (or earlier) daemon.
fn pinned_gate(pin_dir: &Path) -> anyhow::Result<Gate> {
    if !pin_dir.join(enforcer_common::names::CONFIG_MAP).exists() {
        bail!(
            "no kernel gate is pinned at {} (is a daemon running with [kernel] interfaces?)",
            pin_dir.display()
        );
    }
    Gate::load(Some(pin_dir)).context("opening the pinned gate (needs root)")
}

fn switch_line(d: &Detached) -> String {
    if d.all {
        "detached by an operator from every interface (`enforcer kernel attach` attaches it again)"
            .to_owned()
    } else if d.ifaces.is_empty() {
        "on".to_owned()
    } else {
        format!(
            "detached by an operator from {} (`enforcer kernel attach --iface …` attaches it again)",
            d.ifaces.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// `enforcer kernel status`: where the gate runs (asked of the kernel), stale pins, the
/// operator's switch, the config generation, the daemon's heartbeat, map fill and counters.
pub fn status(pin_dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let gate = pinned_gate(pin_dir)?;
    let status = attachment::status(pin_dir).context("asking the kernel where the gate runs")?;
    writeln!(out, "pin dir:     {}", pin_dir.display())?;
    if status.live.is_empty() {
        writeln!(out, "attached:    nowhere (no packet is judged)")?;
    }
    for (i, a) in status.live.iter().enumerate() {
        let label = if i == 0 { "attached:" } else { "" };
        writeln!(out, "{label:<12} {}", a.describe())?;
    }
    if !status.stale_pins.is_empty() {
        writeln!(
            out,
            "stale pins:  {} (their links run nothing: interface gone; `enforcer kernel detach` removes them)",
            status.stale_pins.join(", ")
        )?;
    }
    writeln!(out, "switch:      {}", switch_line(&status.detached))?;
    match gate.config()? {
        Some(c) => {
            let age = crate::kernel::monotonic_ns().saturating_sub(c.heartbeat_ns);
            let alive = if age <= c.max_staleness_ns {
                "daemon alive"
            } else {
                "stale: everything passes"
            };
            writeln!(out, "generation:  {}", c.generation)?;
            writeln!(out, "heartbeat:   {:.1} s ago ({alive})", age as f64 / 1e9)?;
        }
        None => writeln!(out, "generation:  none (not configured: everything passes)")?,
    }
    for (name, entries, capacity) in gate.fill()? {
        writeln!(out, "map {name:<9} {entries}/{capacity}")?;
    }
    let c = gate.counters()?;
    writeln!(
        out,
        "packets:     passed {}, rejected l7 {}, l4 {}, blocked {}; parse failures {}, stale {}",
        c.passed, c.rejected_l7, c.rejected_l4, c.rejected_blocked, c.parse_failed, c.stale
    )?;
    Ok(())
}

/// `enforcer kernel detach`: the gate off (on `iface`, or everywhere) until `kernel attach`.
pub fn detach(pin_dir: &Path, iface: Option<&str>, out: &mut impl Write) -> anyhow::Result<()> {
    let done = attachment::detach(pin_dir, iface).context("detaching the gate (needs root)")?;
    for a in &done.detached {
        writeln!(out, "detached from {}", a.describe())?;
    }
    for i in &done.stale_removed {
        writeln!(
            out,
            "removed the stale pinned link of {i} (its interface is gone)"
        )?;
    }
    if done.detached.is_empty() {
        match iface {
            Some(i) => writeln!(out, "the gate was not attached to {i}")?,
            None => writeln!(out, "the gate was not attached anywhere")?,
        }
    }
    let scope = iface.map_or_else(|| "any interface".to_owned(), |i| i.to_owned());
    writeln!(
        out,
        "no packet is judged on {scope} now; a running daemon reports it at its next heartbeat, and no daemon attaches there again until `enforcer kernel attach`"
    )?;
    Ok(())
}

/// `enforcer kernel attach`: lifts an operator's detach.
pub fn attach(pin_dir: &Path, iface: Option<&str>, out: &mut impl Write) -> anyhow::Result<()> {
    let removed = attachment::attach(pin_dir, iface)?;
    if removed.is_empty() {
        writeln!(
            out,
            "the gate was not detached by an operator{}: nothing to do",
            iface.map(|i| format!(" from {i}")).unwrap_or_default()
        )?;
    } else {
        writeln!(
            out,
            "detach lifted ({}): a running daemon attaches the gate again at its next heartbeat, a stopped one when it starts",
            removed.join(", ")
        )?;
    }
    Ok(())
}

/// `enforcer keys block KEY --for D`.
pub fn block(
    key: &ApiKey,
    duration: Duration,
    pin_dir: &Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    pinned_gate(pin_dir)?.block(key.kernel_id(), duration)?;
    writeln!(
        out,
        "key {} blocked in this node's kernel gate for {}",
        key.hash(),
        human_duration(duration)
    )?;
    Ok(())
}

/// After `enforcer keys set-tier`: removes the key's snapshot from this node's pinned gate, which
/// the running daemon's refresh never brings back (the key's next decision writes one under its
/// new tier). Without a pinned gate there is nothing to do; a failure to open it is a warning
/// (the assignment is made either way).
pub fn lift(pin_dir: &Path, key: &ApiKey, out: &mut impl Write) -> anyhow::Result<()> {
    if !pin_dir.join(enforcer_common::names::BUDGETS_MAP).exists() {
        return Ok(());
    }
    match Gate::load(Some(pin_dir)).and_then(|mut gate| gate.remove_budget(key.kernel_id())) {
        Ok(()) => writeln!(out, "its snapshot in this node's kernel gate is lifted")?,
        Err(e) => eprintln!(
            "warning: could not lift its snapshot in the kernel gate at {} ({e}): this node's \
             gate judges the key by its old tier until its next decision there",
            pin_dir.display()
        ),
    }
    Ok(())
}

/// `enforcer keys unblock KEY`; a key that was not blocked is said so, not an error.
pub fn unblock(key: &ApiKey, pin_dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    if pinned_gate(pin_dir)?.unblock(key.kernel_id())? {
        writeln!(out, "key {} unblocked", key.hash())?;
    } else {
        writeln!(
            out,
            "key {} was not blocked in this node's kernel gate",
            key.hash()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the status");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}

/// A duration as an operator wrote it: `500ms`, `30s`, `1.5s`, never a rounded-down `0s`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!(
            "{}s",
            format!("{:.3}", d.as_secs_f64()).trim_end_matches('0')
        )
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn block_durations_print_as_written() {
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human_duration(Duration::from_millis(1250)), "1.25s");
    }
}
