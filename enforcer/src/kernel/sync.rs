//! The daemon's side of the kernel gate at run time: what it writes into the gate's maps and
//! when.
//!
//! - At start: attach ([`crate::kernel::loader`]), then the settings and the price table
//!   ([`crate::kernel::plan`]). The config generation is a fingerprint of both, so a restart
//!   with the same config keeps the pinned snapshots valid, and any change invalidates them at
//!   once.
//! - On every decision (event-driven, through a bounded queue the decision path never waits on):
//!   a key left below the most expensive price gets its snapshot pushed; a key above it again is
//!   removed; a client address seen with one key is bound to it, an address seen with several
//!   keys is unbound for good.
//! - Every `max_staleness / 3`: snapshots of tracked keys are re-stamped with their balance
//!   projected by refill (never more than a fresh read would give: other nodes only lower it),
//!   and dropped once refill makes them able to pay everything. The work is proportional to the
//!   keys that are low, not to all keys; kernel counters go to the metrics; every
//!   [`ROLLUP_EVERY`] the per-key rejection counts go to the ledger ([`crate::kernel::rollup`]).
use crate::config::Config;
use crate::kernel::loader::{Counters, Gate, InterfaceState, KernelError, monotonic_ns};
use crate::kernel::plan::{KernelPlan, plan};
use crate::kernel::rollup::{ROLLUP_EVERY, Rollup};
use crate::ledger::{Entry, Ledger};
use crate::metrics::Metrics;
use enforcer_common::Budget;
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the kernel gate is doing, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// Whether the gate is attached.
    pub attached: bool,
    /// Interfaces, or why it is not attached.
    pub detail: String,
}

/// Events the decision path sends to the sync task.
#[derive(Debug)]
pub(crate) enum Event {
    /// A main-bucket decision settled in the store.
    Settled {
        key_id: u64,
        remaining: f64,
        refill_per_sec: f64,
        max_tokens: f64,
        at: Instant,
    },
    /// A decision carried the client's address.
    Client { key_id: u64, ip: IpAddr },
    /// New exact-path prices from the pricing engine: `(method, path, price)`.
    Prices(Vec<(Option<String>, String, f64)>),
}

/// Most events queued before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
/// Most client addresses remembered for binding decisions.
const MAX_ADDRESSES: usize = 65_536;

/// The decision path's handle on the sync task.
#[derive(Debug, Clone)]
pub struct GateLink {
    tx: mpsc::Sender<Event>,
    metrics: Metrics,
}

impl GateLink {
    /// Reports a settled main-bucket decision (never blocks).
    pub fn settled(&self, key_id: u64, remaining: f64, refill_per_sec: f64, max_tokens: f64) {
        self.send(Event::Settled {
            key_id,
            remaining,
            refill_per_sec,
            max_tokens,
            at: Instant::now(),
        });
    }

    /// Reports the client address a key called from (never blocks).
    pub fn client(&self, key_id: u64, ip: IpAddr) {
        self.send(Event::Client { key_id, ip });
    }

    /// The pricing engine's prices for the kernel's price map; false when the queue was full
    /// (the engine sends them again).
    pub fn prices(&self, prices: Vec<(Option<String>, String, f64)>) -> bool {
        let queued = self.tx.try_send(Event::Prices(prices)).is_ok();
        if !queued {
            self.metrics.kernel_sync_dropped.inc();
        }
        queued
    }

    fn send(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.metrics.kernel_sync_dropped.inc();
        }
    }
}

/// A link whose events a test reads itself.
#[cfg(test)]
pub(crate) fn test_link(metrics: &Metrics) -> (GateLink, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel(16);
    (
        GateLink {
            tx,
            metrics: metrics.clone(),
        },
        rx,
    )
}

/// What the kernel gate is doing now: set by the sync task, which follows the operator's switch
/// (`enforcer kernel detach|attach`) and notices links that ended at every heartbeat; read by
/// `/readyz`.
#[derive(Debug, Clone)]
pub struct KernelStatus(Arc<parking_lot::RwLock<KernelReport>>);

impl KernelStatus {
    /// A status that says `report` until it is set again.
    pub fn new(report: KernelReport) -> Self {
        Self(Arc::new(parking_lot::RwLock::new(report)))
    }

    /// The report now.
    pub fn get(&self) -> KernelReport {
        self.0.read().clone()
    }

    fn set(&self, report: KernelReport) {
        *self.0.write() = report;
    }
}

/// The report for the configured interfaces' states (and the metric that agrees with it).
fn report(states: &[(String, InterfaceState)], ports: &[u16]) -> KernelReport {
    let with = |wanted: fn(&InterfaceState) -> bool| -> Vec<&str> {
        states
            .iter()
            .filter(|(_, s)| wanted(s))
            .map(|(i, _)| i.as_str())
            .collect()
    };
    let attached = with(|s| *s == InterfaceState::Attached);
    let by_operator = with(|s| *s == InterfaceState::DetachedByOperator);
    let mut parts = Vec::new();
    if !attached.is_empty() {
        parts.push(format!(
            "attached to {} protecting ports {ports:?}",
            attached.join(", ")
        ));
    }
    if !by_operator.is_empty() {
        parts.push(format!(
            "detached by an operator from {} (`enforcer kernel attach` attaches it again)",
            by_operator.join(", ")
        ));
    }
    for (iface, state) in states {
        if let InterfaceState::Lost(why) = state {
            parts.push(format!(
                "not attached to {iface}: {why} (a restart attaches it again)"
            ));
        }
    }
    KernelReport {
        attached: !attached.is_empty(),
        detail: parts.join("; "),
    }
}

/// Attaches and configures the gate when `[kernel] interfaces` asks for it, and starts the sync
/// task. Without interfaces, or when the kernel refuses, the daemon runs userspace-only.
///
/// With `ledger`, the kernel's per-key rejection counts are read every [`ROLLUP_EVERY`] and
/// recorded as `kernel_rejections` rollup rows.
pub fn start(
    config: &Config,
    metrics: &Metrics,
    ledger: Option<Ledger>,
) -> (Option<GateLink>, KernelStatus) {
    let interfaces = &config.kernel.interfaces;
    if interfaces.is_empty() {
        metrics.kernel_attached.set(0);
        return (
            None,
            KernelStatus::new(KernelReport {
                attached: false,
                detail: "userspace-only: no [kernel] interfaces configured".to_owned(),
            }),
        );
    }
    let plan = plan(config);
    let setup = || -> Result<Gate, KernelError> {
        let mut gate = Gate::attach(interfaces, Some(Path::new(&config.kernel.pin_dir)))?;
        let adopted = gate.generation() == plan.settings.generation;
        gate.configure(&plan.settings)?;
        for (method, path, price) in &plan.prices {
            gate.set_price(method.as_deref(), path, *price)?;
        }
        tracing::info!(
            interfaces = ?interfaces,
            ports = ?plan.settings.ports,
            generation = plan.settings.generation,
            adopted,
            "kernel gate attached"
        );
        Ok(gate)
    };
    match setup() {
        Ok(mut gate) => {
            let report = report(&gate.reconcile(interfaces), &plan.settings.ports);
            metrics.kernel_attached.set(i64::from(report.attached));
            let status = KernelStatus::new(report);
            let (tx, rx) = mpsc::channel(QUEUE);
            let watch = Watch {
                interfaces: interfaces.clone(),
                status: status.clone(),
            };
            tokio::spawn(sync(gate, rx, plan, metrics.clone(), ledger, watch));
            (
                Some(GateLink {
                    tx,
                    metrics: metrics.clone(),
                }),
                status,
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "kernel gate not attached: running userspace-only");
            metrics.kernel_attached.set(0);
            (
                None,
                KernelStatus::new(KernelReport {
                    attached: false,
                    detail: format!("userspace-only: {e}"),
                }),
            )
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    balance: f64,
    refill_per_sec: f64,
    max_tokens: f64,
    at: Instant,
}

impl Tracked {
    fn projected(&self, now: Instant) -> f64 {
        let refill = now.duration_since(self.at).as_secs_f64() * self.refill_per_sec;
        self.max_tokens.min(self.balance + refill).max(self.balance)
    }
}

fn snapshot(balance: f64, refill_per_sec: f64) -> Budget {
    Budget {
        balance_milli: crate::kernel::loader::milli(balance),
        refill_milli_per_sec: (refill_per_sec * 1000.0).floor().max(0.0) as u64,
        synced_ns: monotonic_ns(),
        ..Budget::default()
    }
}
/// What the sync task keeps an eye on at every heartbeat: where the gate runs.
#[derive(Debug)]
struct Watch {
    /// The configured interfaces.
    interfaces: Vec<String>,
    /// Where the state goes (`/readyz`; the metric is set beside it).
    status: KernelStatus,
}

/// The sync task: owns the gate (dropping it detaches the program; pinned maps stay).
async fn sync(
    mut gate: Gate,
    mut rx: mpsc::Receiver<Event>,
    plan: KernelPlan,
    metrics: Metrics,
    ledger: Option<Ledger>,
    watch: Watch,
) {
    let mut tracked = adopt(&gate, &plan);
    let mut addresses: HashMap<IpAddr, Option<u64>> = HashMap::new();
    let mut tick = tokio::time::interval(plan.settings.max_staleness / 3);
    let mut rollup_tick = tokio::time::interval(ROLLUP_EVERY);
    let mut rollup = Rollup::default();
    let mut last = Counters::default();
    loop {
        tokio::select! {
            _ = rollup_tick.tick(), if ledger.is_some() => {
                if let Some(ledger) = &ledger {
                    match gate.key_rejections() {
                        Ok(totals) => {
                            let minute = crate::ledger::now_us() / 60_000_000 * 60_000_000;
                            for row in rollup.rows(totals, ledger.node(), minute) {
                                ledger.record(Entry::Kernel(row));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "reading kernel rejection counts failed"),
                    }
                }
            }
            event = rx.recv() => {
                let Some(event) = event else { break };
                let result = match event {
                    Event::Settled { key_id, remaining, refill_per_sec, max_tokens, at } => {
                        let r = if remaining < plan.max_price {
                            tracked.insert(key_id, Tracked { balance: remaining, refill_per_sec, max_tokens, at });
                            gate.put_budget(key_id, snapshot(remaining, refill_per_sec))
                        } else if tracked.remove(&key_id).is_some() {
                            gate.remove_budget(key_id)
                        } else {
                            Ok(())
                        };
                        metrics.kernel_sync_lag.observe(at.elapsed().as_secs_f64());
                        r
                    }
                    Event::Client { key_id, ip } => match addresses.get(&ip).copied() {
                        None => {
                            if addresses.len() >= MAX_ADDRESSES {
                                addresses.clear();
                            }
                            addresses.insert(ip, Some(key_id));
                            gate.bind(ip, key_id)
                        }
                        Some(Some(bound)) if bound != key_id => {
                            // Several keys behind one address (NAT, a proxy): never bind it.
                            addresses.insert(ip, None);
                            gate.unbind(ip)
                        }
                        Some(_) => Ok(()),
                    },
                    Event::Prices(prices) => prices
                        .iter()
                        .try_for_each(|(method, path, price)| gate.set_price(method.as_deref(), path, *price)),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "kernel map update failed");
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                tracked.retain(|key_id, t| {
                    let balance = t.projected(now);
                    if balance >= plan.max_price {
                        let _ = gate.remove_budget(*key_id);
                        return false;
                    }
                    if let Err(e) = gate.put_budget(*key_id, snapshot(balance, t.refill_per_sec)) {
                        tracing::warn!(error = %e, "kernel snapshot refresh failed");
                    }
                    t.balance = balance;
                    t.at = now;
                    true
                });
                for (ip, key_id) in &addresses {
                    if let Some(k) = key_id
                        && tracked.contains_key(k)
                    {
                        let _ = gate.bind(*ip, *k);
                    }
                }
                metrics.kernel_tracked_keys.set(tracked.len() as i64);
                // The operator's switch and links that ended: /readyz and the metric follow.
                let report = report(&gate.reconcile(&watch.interfaces), &plan.settings.ports);
                metrics.kernel_attached.set(i64::from(report.attached));
                watch.status.set(report);
                if let Err(e) = gate.heartbeat() {
                    tracing::warn!(error = %e, "kernel heartbeat failed");
                }
                match gate.counters() {
                    Ok(now) => {
                        export(&metrics, &last, &now);
                        last = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "reading kernel counters failed"),
                }
            }
        }
    }
}

/// Snapshots a previous daemon left in the pinned map (same generation): keep refreshing them,
/// so a restart does not lift what the budget arithmetic still justifies.
fn adopt(gate: &Gate, plan: &KernelPlan) -> HashMap<u64, Tracked> {
    let now_ns = monotonic_ns();
    let now = Instant::now();
    let mut tracked = HashMap::new();
    for (key_id, b) in gate.budgets().unwrap_or_default() {
        let age = Duration::from_nanos(now_ns.saturating_sub(b.synced_ns));
        if b.generation != plan.settings.generation || age > plan.settings.max_staleness {
            continue;
        }
        tracked.insert(
            key_id,
            Tracked {
                balance: b.balance_milli as f64 / 1000.0,
                refill_per_sec: b.refill_milli_per_sec as f64 / 1000.0,
                max_tokens: f64::INFINITY,
                at: now.checked_sub(age).unwrap_or(now),
            },
        );
    }
    if !tracked.is_empty() {
        tracing::info!(
            keys = tracked.len(),
            "adopted kernel snapshots of the previous daemon"
        );
    }
    tracked
}

fn export(metrics: &Metrics, last: &Counters, now: &Counters) {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    metrics.kernel_passed.inc_by(delta(last.passed, now.passed));
    for (reason, a, b) in [
        ("l7", last.rejected_l7, now.rejected_l7),
        ("l4", last.rejected_l4, now.rejected_l4),
        ("blocked", last.rejected_blocked, now.rejected_blocked),
    ] {
        metrics
            .kernel_rejected
            .with_label_values(&[reason])
            .inc_by(delta(a, b));
    }
    for (reason, a, b) in [
        ("parse_failed", last.parse_failed, now.parse_failed),
        ("stale", last.stale, now.stale),
    ] {
        metrics
            .kernel_ignored
            .with_label_values(&[reason])
            .inc_by(delta(a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_where_the_gate_judges_and_why_not_elsewhere() {
        let states = |list: &[(&str, InterfaceState)]| -> Vec<(String, InterfaceState)> {
            list.iter()
                .map(|(i, s)| ((*i).to_owned(), s.clone()))
                .collect()
        };
        let r = report(
            &states(&[
                ("eth0", InterfaceState::Attached),
                ("eth1", InterfaceState::DetachedByOperator),
                ("eth2", InterfaceState::Lost("the interface is gone".into())),
            ]),
            &[80],
        );
        assert!(r.attached);
        assert_eq!(
            r.detail,
            "attached to eth0 protecting ports [80]; detached by an operator from eth1 \
             (`enforcer kernel attach` attaches it again); not attached to eth2: the interface \
             is gone (a restart attaches it again)"
        );
        let off = report(
            &states(&[("eth0", InterfaceState::DetachedByOperator)]),
            &[80],
        );
        assert!(!off.attached, "detached everywhere: not attached");
        let status = KernelStatus::new(r);
        status.set(off);
        assert!(
            !status.get().attached,
            "/readyz reads what the sync task set"
        );
    }
}
