//! The kernel gate's subscriber and sync task: what the daemon writes into the gate's maps,
//! and when.
//!
//! - At start: attach ([`crate::kernel::loader`]), then the settings and the price table
//!   ([`crate::kernel::plan`]), rebuilt to exactly the plan's. The config generation is a
//!   fingerprint of the settings, the prices, the tiers' refill rates and shadow modes, so a
//!   restart with the same config keeps the pinned snapshots valid, and any change invalidates
//!   them at once.
//! - [`GateLink`] subscribes to the decider's events ([`crate::decision::event`]) and owns what
//!   they mean for the kernel: which tier a key is in and its refill rate, shadow mode (a
//!   shadowed key never gets a snapshot), the key's kernel id. It turns every change of a
//!   key's balance (a debit, a refund) into an update on a bounded queue the decision path
//!   never waits on; replays change nothing (their balance is the first decision's).
//! - The sync task applies them: a key left below the most expensive price gets its snapshot
//!   (balance, refill rate, and the store's time of that balance, so the kernel projects refill
//!   from when the balance was true, not from when the task got to it); a key above it again is
//!   removed. Updates of one key are ordered by the store's clock (Redis `TIME`): one older than
//!   what the map holds is dropped, so a debit handled after a later refund cannot undo it.
//!   A client address seen with one key `bind_after` times is bound to it, an address seen
//!   with several keys is unbound for good ([`crate::kernel::binding`]).
//! - Every `max_staleness / 3`: the heartbeat. The kernel takes snapshots, bindings and blocks
//!   into account only while it is fresh, so a snapshot needs no re-stamping while its own data
//!   holds: one map write per tick keeps them all alive, instead of one per tracked key. Tracked
//!   keys are dropped once refill makes them able to pay everything, and once their snapshot
//!   is [`LIFT_AFTER`] old: this daemon knows only its own changes, and a refund or a grant made
//!   through another node may have raised the balance since. The key then passes until its next
//!   decision, which reads Redis and writes a true snapshot. Kernel counters go to the metrics;
//!   every [`ROLLUP_EVERY`] the per-key rejection counts go to the ledger
//!   ([`crate::kernel::rollup`]).
//! - At shutdown ([`crate::lifecycle`]) the task applies what is still queued, records a last
//!   rollup, and leaves the pinned maps enforcing.
use crate::config::Config;
use crate::decision::Denial;
use crate::decision::event::{self, Event, Subscriber};
use crate::kernel::binding::{Bindings, Change};
use crate::kernel::loader::{Counters, Gate, InterfaceState, KernelError, monotonic_ns};
use crate::kernel::plan::{KernelPlan, plan};
use crate::kernel::rollup::{ROLLUP_EVERY, Rollup};
use crate::key::KeyHash;
use crate::ledger::{Entry, Ledger};
use crate::lifecycle::{Shutdown, Workers};
use crate::metrics::Metrics;
use crate::store::BucketKind;
use enforcer_common::{Budget, Milli, SNAPSHOT_MAX_AGE_NS};
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the kernel gate is doing, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// Whether the gate is attached.
    pub attached: bool,
    /// Interfaces, or why it is not attached.
    pub detail: String,
}

/// A key's balance as the store settled it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Balance {
    pub key_id: u64,
    /// The key's SHA-256: what an operator with only the hash names it by.
    pub key_hash: KeyHash,
    /// Tokens, as of `at`.
    pub balance: f64,
    /// The store's clock when `balance` was true (orders a key's updates).
    pub at: f64,
    /// The same moment on this host's monotonic clock (never later than it was).
    pub stamp: Instant,
    pub refill_per_sec: f64,
    pub max_tokens: f64,
    /// A refund (or a grant): it may raise the balance beyond what refill explains, so it wins
    /// over a debit settled at the same store time (the refund saw it).
    pub raises: bool,
}

/// What the subscriber and the pricing engine send to the sync task.
#[derive(Debug)]
pub(crate) enum Update {
    /// A key's balance changed.
    Balance(Balance),
    /// A key's balance is no longer known (a refund of a forgotten bucket, an unknown key):
    /// remove its snapshot, so it passes until its next decision. `at`: the store's clock then.
    Lift { key_id: u64, at: Option<f64> },
    /// An operator changed a key known only by its SHA-256 (`--key-hash`): lift its
    /// snapshot, or, when the hash is not known here, every snapshot this daemon cannot
    /// attribute to a hash (adopted from the pinned map at start).
    LiftHash(KeyHash),
    /// A decision carried the client's address.
    Client { key_id: u64, ip: IpAddr },
    /// New exact-path prices from the pricing engine: `(method, path, price)`; `applied` is
    /// told once they are in the map. With `replace`, the map is rebuilt to exactly the plan's
    /// prices with these instead of the plan's where they name the same entry (after a
    /// reload: no push of the engine before it can survive).
    Prices {
        prices: Vec<(Option<String>, String, f64)>,
        applied: Option<oneshot::Sender<()>>,
        replace: bool,
    },
    /// A config reload's plan ([`GateLink::apply_plan`]): `applied` is told the generation
    /// in force, or why the plan could not be written (the previous one is then back).
    Plan {
        plan: Arc<KernelPlan>,
        applied: oneshot::Sender<Result<u32, String>>,
    },
}

/// Most updates queued before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
/// How long the store time of a raise (a refund) is remembered for a key without a snapshot,
/// to drop debits settled before it but handled after it. Far longer than an update waits in
/// the queue.
const RAISE_MEMORY: Duration = Duration::from_secs(30);
/// Most raises remembered (beyond, the oldest half is forgotten).
const MAX_RAISES: usize = 262_144;
/// A snapshot this old is lifted: a raise through another node is seen within it (the kernel
/// ignores a snapshot at [`SNAPSHOT_MAX_AGE_NS`]; a tick is at most 20 s, a third of the
/// longest `max_staleness`).
const LIFT_AFTER: Duration = Duration::from_nanos(SNAPSHOT_MAX_AGE_NS / 2);

/// The kernel gate's subscriber to the decider's events, and the pricing engine's way to the
/// price map. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct GateLink {
    tx: mpsc::Sender<Update>,
    /// The plan in force, shared by every clone; a reload swaps it once the kernel has it.
    plan: Arc<arc_swap::ArcSwap<KernelPlan>>,
    metrics: Metrics,
}

/// Why a reload's plan did not reach the kernel.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The sync task did not take it in time (its queue was full, or it stopped).
    #[error("the kernel sync task did not take the new plan within {0:?}")]
    Timeout(Duration),
    /// The sync task has stopped.
    #[error("the kernel sync task has stopped")]
    Stopped,
    /// The kernel refused a write; the previous plan was written back.
    #[error("the kernel gate refused the new plan (the previous one stays): {0}")]
    Refused(String),
}

impl GateLink {
    fn new(tx: mpsc::Sender<Update>, plan: Arc<KernelPlan>, metrics: Metrics) -> Self {
        Self {
            tx,
            plan: Arc::new(arc_swap::ArcSwap::new(plan)),
            metrics,
        }
    }

    /// The plan in force.
    pub fn plan(&self) -> Arc<KernelPlan> {
        self.plan.load_full()
    }

    /// Hands the sync task a new plan (a config reload) and waits, at most `wait`, until the
    /// kernel has it: the new generation first (every snapshot of the old one stops counting
    /// at once), then the price map rebuilt to exactly the plan's. Only then do the decisions'
    /// updates follow the new plan's tiers and shadow modes. Answers the generation in force.
    pub async fn apply_plan(&self, plan: KernelPlan, wait: Duration) -> Result<u32, PlanError> {
        let plan = Arc::new(plan);
        let (tx, rx) = oneshot::channel();
        let update = Update::Plan {
            plan: plan.clone(),
            applied: tx,
        };
        // Waits for room in the queue (bounded): a reload is rare and must not be dropped.
        let answer = tokio::time::timeout(wait, async {
            self.tx.send(update).await.map_err(|_| PlanError::Stopped)?;
            rx.await.map_err(|_| PlanError::Stopped)
        })
        .await
        .map_err(|_| PlanError::Timeout(wait))??;
        let generation = answer.map_err(PlanError::Refused)?;
        self.plan.store(plan);
        Ok(generation)
    }

    /// The pricing engine's prices for the kernel's price map; false when the queue was full
    /// (the engine sends them again).
    pub fn prices(&self, prices: Vec<(Option<String>, String, f64)>) -> bool {
        self.try_send(Update::Prices {
            prices,
            applied: None,
            replace: false,
        })
    }

    /// The same, waiting (at most `wait`) until the prices are in the kernel's map: a price
    /// that falls must be lower in the kernel before userspace charges it. False when they
    /// were not applied in time.
    pub async fn prices_applied(
        &self,
        prices: Vec<(Option<String>, String, f64)>,
        wait: Duration,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        if !self.try_send(Update::Prices {
            prices,
            applied: Some(tx),
            replace: false,
        }) {
            return false;
        }
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
    }

    /// After a reload, the pricing engine's prices for a price map rebuilt to exactly the
    /// plan's with these in place of the plan's: a price the engine pushed for the old config
    /// (after the plan was written, before the engine was rebuilt) cannot survive. Waits (at
    /// most `wait`); false when not applied in time.
    pub async fn prices_replaced(
        &self,
        prices: Vec<(Option<String>, String, f64)>,
        wait: Duration,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let update = Update::Prices {
            prices,
            applied: Some(tx),
            replace: true,
        };
        let sent = tokio::time::timeout(wait, async {
            self.tx.send(update).await.is_ok() && rx.await.is_ok()
        })
        .await;
        matches!(sent, Ok(true))
    }

    fn try_send(&self, update: Update) -> bool {
        let queued = self.tx.try_send(update).is_ok();
        if !queued {
            self.metrics.kernel_sync_dropped.inc();
        }
        queued
    }

    /// A balance for the kernel, if the key's tier is enforced there.
    fn balance(
        &self,
        key_id: u64,
        key_hash: &KeyHash,
        tier: &str,
        balance: f64,
        settled: &event::Settled,
        raises: bool,
    ) -> Option<Update> {
        let plan = self.plan.load();
        if plan.shared_members.contains(key_hash) {
            // Never judged in the kernel (see `KernelPlan::shared_members`): whatever the map
            // holds for it goes.
            return Some(Update::Lift {
                key_id,
                at: Some(settled.at),
            });
        }
        let rule = plan.enforced_tier(tier)?;
        let age = settled.now - settled.at;
        let (balance, stamp) = match Duration::try_from_secs_f64(age.max(0.0))
            .ok()
            .and_then(|age| settled.sent.checked_sub(age))
        {
            Some(stamp) => (balance, stamp),
            // Older than this host's monotonic clock reaches: project it to the call instead.
            None => (
                rule.max_tokens
                    .min(balance + age * rule.refill_per_sec)
                    .max(balance),
                settled.sent,
            ),
        };
        Some(Update::Balance(Balance {
            key_id,
            key_hash: *key_hash,
            balance,
            at: settled.at,
            stamp,
            refill_per_sec: rule.refill_per_sec,
            max_tokens: rule.max_tokens,
            raises,
        }))
    }
}

impl Subscriber for GateLink {
    fn publish(&self, event: &Event<'_>) {
        match event {
            Event::Debit(d) => {
                let key_id = d.key.kernel_id();
                if d.bucket == BucketKind::Main {
                    let update = match (
                        d.decision.denial,
                        &d.settled,
                        d.decision.remaining,
                        d.decision.tier.as_deref(),
                    ) {
                        // No budget any more: nothing for the kernel to judge it by.
                        (Some(Denial::UnknownKey), ..) => Some(Update::Lift { key_id, at: None }),
                        (_, Some(s), Some(remaining), Some(tier)) => {
                            self.balance(key_id, d.key_hash, tier, remaining, s, false)
                        }
                        _ => None,
                    };
                    if let Some(u) = update {
                        self.try_send(u);
                    }
                }
                if let Some(ip) = d.check.client_ip {
                    self.try_send(Update::Client { key_id, ip });
                }
            }
            // Nothing charged, and its balance is the first decision's: no news for the map.
            Event::Replay(d) => {
                if let Some(ip) = d.check.client_ip {
                    self.try_send(Update::Client {
                        key_id: d.key.kernel_id(),
                        ip,
                    });
                }
            }
            Event::Refund(r) => {
                let key_id = r.key.kernel_id();
                let update = match r.balance {
                    Some(balance) => {
                        self.balance(key_id, r.key_hash, r.tier, balance, &r.settled, true)
                    }
                    None => Some(Update::Lift {
                        key_id,
                        at: Some(r.settled.at),
                    }),
                };
                if let Some(u) = update {
                    self.try_send(u);
                }
            }
            // A settle moves the balance like a debit (the store applied refill and stamped
            // it now); one that credited tokens back raises it, as a refund does.
            Event::Settle(st) => {
                if let Some(u) = self.balance(
                    st.key.kernel_id(),
                    st.key_hash,
                    st.tier,
                    st.balance,
                    &st.settled,
                    st.charged < 0.0,
                ) {
                    self.try_send(u);
                }
            }
            // Only the key's hash is known here, not its kernel id: the key's next decision
            // brings the map its balance after the debit-back.
            Event::DebitBack(_) => {}
            // A grant raises the balance: the kernel learns it at once (with the raw key);
            // with only the key's hash the gate cannot find the key's entry, so every entry it
            // cannot attribute is lifted (it passes until its next decision writes it again).
            Event::Grant(g) => {
                let update = match g.key {
                    Some(key) => self
                        .balance(
                            key.kernel_id(),
                            g.key_hash,
                            g.tier,
                            g.balance,
                            &g.settled,
                            true,
                        )
                        .or(Some(Update::Lift {
                            key_id: key.kernel_id(),
                            at: Some(g.settled.at),
                        })),
                    None => Some(Update::LiftHash(*g.key_hash)),
                };
                if let Some(u) = update {
                    self.try_send(u);
                }
            }
            // Another tier: another refill rate and budget; the next decision writes a
            // snapshot under it.
            Event::TierChanged(t) => {
                self.try_send(match t.key {
                    Some(key) => Update::Lift {
                        key_id: key.kernel_id(),
                        at: None,
                    },
                    None => Update::LiftHash(*t.key_hash),
                });
            }
        }
    }
}

/// A link whose updates a test reads itself.
#[cfg(test)]
pub(crate) fn test_link(config: &Config, metrics: &Metrics) -> (GateLink, mpsc::Receiver<Update>) {
    let (tx, rx) = mpsc::channel(16);
    (
        GateLink::new(tx, Arc::new(plan(config)), metrics.clone()),
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
/// task among `workers`. Without interfaces, or when the kernel refuses, the daemon runs
/// userspace-only.
///
/// With `ledger`, the kernel's per-key rejection counts are read every [`ROLLUP_EVERY`] and
/// recorded as `kernel_rejections` rollup rows.
pub fn start(
    config: &Config,
    metrics: &Metrics,
    ledger: Option<Ledger>,
    workers: &mut Workers,
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
        // Before the first heartbeat: the previous daemon's bindings, which this one does not
        // remember and so could not unbind, never count again.
        gate.clear_bindings()?;
        // The new generation first: snapshots of the old one stop counting at once, so nothing
        // is judged while the price map is rebuilt.
        gate.configure(&plan.settings)?;
        gate.replace_prices(&plan.prices)?;
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
            let plan = Arc::new(plan);
            let watch = Watch {
                interfaces: interfaces.clone(),
                status: status.clone(),
            };
            workers.spawn(
                "kernel sync",
                sync(
                    gate,
                    rx,
                    plan.clone(),
                    metrics.clone(),
                    ledger,
                    watch,
                    workers.shutdown(),
                ),
            );
            (Some(GateLink::new(tx, plan, metrics.clone())), status)
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

/// What the sync task keeps an eye on at every heartbeat: where the gate runs.
#[derive(Debug)]
struct Watch {
    /// The configured interfaces.
    interfaces: Vec<String>,
    /// Where the state goes (`/readyz`; the metric is set beside it).
    status: KernelStatus,
}

/// A key with a snapshot in the kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tracked {
    balance: f64,
    refill_per_sec: f64,
    max_tokens: f64,
    /// When `balance` was true, on this host's monotonic clock.
    stamp: Instant,
    /// The same moment on the store's clock: the newest update applied.
    at: f64,
}

impl Tracked {
    fn projected(&self, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(self.stamp).as_secs_f64() * self.refill_per_sec;
        self.max_tokens.min(self.balance + refill).max(self.balance)
    }
}

/// A write into the snapshot map.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Write {
    /// Write (or overwrite) a snapshot.
    Put(u64, Budget),
    /// Remove a snapshot.
    Remove(u64),
}

/// The snapshot of `balance`, true at `stamp`, for the kernel: the balance rounded up, the
/// refill rate up, so the kernel never believes a key has less than it has.
fn snapshot(balance: f64, refill_per_sec: f64, stamp: Instant) -> Budget {
    Budget {
        balance_milli: Milli::balance(balance).get(),
        refill_milli_per_sec: Milli::rate(refill_per_sec),
        synced_ns: monotonic_ns()
            .saturating_sub(u64::try_from(stamp.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        ..Budget::default()
    }
}

/// The keys with snapshots, and the rules that keep them true. No I/O: it says what to write.
#[derive(Debug)]
struct Snapshots {
    /// A key below it might be unable to pay for something.
    max_price: f64,
    tracked: HashMap<u64, Tracked>,
    /// Store time of the last raise of keys (which may have no snapshot), and when it came.
    raised: HashMap<u64, (f64, Instant)>,
    /// The kernel id of tracked keys by SHA-256 (entries of keys no longer tracked are
    /// dropped at the next refresh).
    ids: HashMap<KeyHash, u64>,
}

impl Snapshots {
    fn new(plan: &KernelPlan, tracked: HashMap<u64, Tracked>) -> Self {
        Self {
            max_price: plan.max_price,
            tracked,
            raised: HashMap::new(),
            ids: HashMap::new(),
        }
    }

    /// A new plan (another generation): its prices from now on; the keys tracked so far lose
    /// their snapshots (returned, to remove from the map).
    fn replan(&mut self, plan: &KernelPlan) -> Vec<u64> {
        self.max_price = plan.max_price;
        self.tracked.drain().map(|(key_id, _)| key_id).collect()
    }

    /// The newest store time applied for a key.
    fn last_at(&self, key_id: u64) -> f64 {
        let tracked = self
            .tracked
            .get(&key_id)
            .map_or(f64::NEG_INFINITY, |t| t.at);
        let raised = self.raised.get(&key_id).map_or(f64::NEG_INFINITY, |r| r.0);
        tracked.max(raised)
    }

    fn remember_raise(&mut self, key_id: u64, at: f64, now: Instant) {
        if self.raised.len() >= MAX_RAISES {
            self.forget_raises(now, RAISE_MEMORY / 2);
        }
        self.raised.insert(key_id, (at, now));
    }

    fn forget_raises(&mut self, now: Instant, older_than: Duration) {
        self.raised
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) <= older_than);
    }

    /// A key's balance changed.
    fn balance(&mut self, b: Balance, now: Instant) -> Option<Write> {
        let last = self.last_at(b.key_id);
        // Stale: the map already reflects a later change. A debit settled at the same store
        // time as a refund is the one the refund saw (it keeps the bucket's clock).
        let newer = if b.raises { b.at >= last } else { b.at > last };
        if !newer {
            return None;
        }
        if b.raises {
            self.remember_raise(b.key_id, b.at, now);
        }
        if b.balance >= self.max_price {
            return self
                .tracked
                .remove(&b.key_id)
                .map(|_| Write::Remove(b.key_id));
        }
        let mut t = Tracked {
            balance: b.balance,
            refill_per_sec: b.refill_per_sec,
            max_tokens: b.max_tokens,
            stamp: b.stamp,
            at: b.at,
        };
        // Old already (a refund keeps an old refill clock): the next refresh would lift it,
        // so project it to now (the balance is the store's, as of now).
        if now.saturating_duration_since(t.stamp) > LIFT_AFTER {
            t.balance = t.projected(now);
            t.stamp = now;
            if t.balance >= self.max_price {
                return self
                    .tracked
                    .remove(&b.key_id)
                    .map(|_| Write::Remove(b.key_id));
            }
        }
        self.tracked.insert(b.key_id, t);
        self.ids.insert(b.key_hash, b.key_id);
        Some(Write::Put(
            b.key_id,
            snapshot(t.balance, t.refill_per_sec, t.stamp),
        ))
    }

    /// A key's balance is unknown now: no snapshot.
    fn lift(&mut self, key_id: u64, at: Option<f64>, now: Instant) -> Option<Write> {
        if let Some(at) = at {
            if at < self.last_at(key_id) {
                return None;
            }
            self.remember_raise(key_id, at, now);
        }
        self.tracked.remove(&key_id);
        Some(Write::Remove(key_id))
    }

    /// An operator changed the key with this hash: its snapshot goes; unknown here (a key
    /// adopted at start, whose hash the map does not hold), every snapshot whose hash is
    /// unknown goes (lifting lets traffic pass to the daemon, which decides exactly).
    fn lift_hash(&mut self, key_hash: &KeyHash) -> Vec<Write> {
        if let Some(key_id) = self.ids.remove(key_hash) {
            return self
                .tracked
                .remove(&key_id)
                .map(|_| Write::Remove(key_id))
                .into_iter()
                .collect();
        }
        let known: std::collections::HashSet<u64> = self.ids.values().copied().collect();
        let unknown: Vec<u64> = self
            .tracked
            .keys()
            .filter(|id| !known.contains(id))
            .copied()
            .collect();
        unknown
            .into_iter()
            .map(|key_id| {
                self.tracked.remove(&key_id);
                Write::Remove(key_id)
            })
            .collect()
    }

    /// Every `max_staleness / 3`: lift what refill made able to pay everything, and what is
    /// [`LIFT_AFTER`] old (it may miss a raise through another node). Nothing is written for
    /// the others: the heartbeat keeps them valid.
    fn refresh(&mut self, now: Instant) -> Vec<Write> {
        self.forget_raises(now, RAISE_MEMORY);
        let tracked = &self.tracked;
        self.ids.retain(|_, id| tracked.contains_key(id));
        let max_price = self.max_price;
        let mut writes = Vec::new();
        self.tracked.retain(|key_id, t| {
            let lift = t.projected(now) >= max_price
                || now.saturating_duration_since(t.stamp) >= LIFT_AFTER;
            if lift {
                writes.push(Write::Remove(*key_id));
            }
            !lift
        });
        writes
    }
}

/// Applies a write to the map; what went wrong is logged.
fn apply(gate: &mut Gate, write: Write) {
    let result = match write {
        Write::Put(key_id, budget) => gate.put_budget(key_id, budget),
        Write::Remove(key_id) => gate.remove_budget(key_id),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "kernel snapshot update failed");
    }
}

/// Client addresses and which of them stand for one key ([`Bindings`]: bound after
/// `[kernel] bind_after` decisions of one key, never once another key used them).
#[derive(Debug)]
struct Addresses(Bindings);

impl Addresses {
    /// A binding holds in the kernel while the heartbeat is fresh and its generation is
    /// current, so every binding this memory forgets is removed from the map at once.
    fn client(&mut self, gate: &mut Gate, key_id: u64, ip: IpAddr) -> Result<(), KernelError> {
        let change = self.0.seen(ip, key_id);
        // Both writes are made even when the first fails (the first error is reported): this
        // sighting's own change must not wait for the next one.
        let evicted = self
            .0
            .take_evicted()
            .map_or(Ok(()), |gone| gate.unbind(gone));
        let own = match change {
            Change::Bind(ip, key_id) => gate.bind(ip, key_id),
            Change::Unbind(ip) => gate.unbind(ip),
            Change::None => Ok(()),
        };
        evicted.and(own)
    }

    /// A new generation: the bindings are written again in it.
    fn rebind(&self, gate: &mut Gate) {
        for (ip, key_id) in self.0.bound() {
            if let Err(e) = gate.bind(ip, key_id) {
                tracing::warn!(error = %e, "kernel binding update failed");
            }
        }
    }
}

/// The sync task: owns the gate (dropping it detaches the program where the link is not
/// pinned; pinned maps and links stay and keep enforcing).
async fn sync(
    mut gate: Gate,
    mut rx: mpsc::Receiver<Update>,
    plan: Arc<KernelPlan>,
    metrics: Metrics,
    ledger: Option<Ledger>,
    watch: Watch,
    mut shutdown: Shutdown,
) {
    let mut plan = plan;
    let mut snapshots = Snapshots::new(&plan, adopt(&gate, &plan));
    let mut addresses = Addresses(Bindings::new(plan.bind_after));
    let mut tick = tokio::time::interval(plan.settings.max_staleness / 3);
    let mut rollup_tick = tokio::time::interval(ROLLUP_EVERY);
    let mut rollup = Rollup::default();
    let mut last = Counters::default();
    let record_rollups = |gate: &Gate, rollup: &mut Rollup| {
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
    };
    loop {
        tokio::select! {
            () = shutdown.requested() => {
                // What the decisions before the shutdown changed still reaches the map.
                while let Ok(update) = rx.try_recv() {
                    handle(&mut gate, &mut snapshots, &mut addresses, &mut plan, &metrics, update);
                }
                record_rollups(&gate, &mut rollup);
                break;
            }
            _ = rollup_tick.tick(), if ledger.is_some() => record_rollups(&gate, &mut rollup),
            update = rx.recv() => {
                let Some(update) = update else { break };
                let staleness = plan.settings.max_staleness;
                handle(&mut gate, &mut snapshots, &mut addresses, &mut plan, &metrics, update);
                if plan.settings.max_staleness != staleness {
                    tick = tokio::time::interval(plan.settings.max_staleness / 3);
                }
            }
            _ = tick.tick() => {
                for write in snapshots.refresh(Instant::now()) {
                    apply(&mut gate, write);
                }
                metrics.kernel_tracked_keys.set(snapshots.tracked.len() as i64);
                if let Err(e) = gate.heartbeat() {
                    tracing::warn!(error = %e, "kernel heartbeat failed");
                }
                // The operator's switch and links that ended: /readyz and the metric follow.
                let report = report(&gate.reconcile(&watch.interfaces), &plan.settings.ports);
                metrics.kernel_attached.set(i64::from(report.attached));
                watch.status.set(report);
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
    tracing::info!(
        tracked = snapshots.tracked.len(),
        "kernel sync stopped; the pinned maps keep enforcing"
    );
}

/// One update.
fn handle(
    gate: &mut Gate,
    snapshots: &mut Snapshots,
    addresses: &mut Addresses,
    plan: &mut Arc<KernelPlan>,
    metrics: &Metrics,
    update: Update,
) {
    let now = Instant::now();
    let write = match update {
        Update::Balance(b) => {
            metrics
                .kernel_sync_lag
                .observe(now.saturating_duration_since(b.stamp).as_secs_f64());
            snapshots.balance(b, now)
        }
        Update::Lift { key_id, at } => snapshots.lift(key_id, at, now),
        Update::LiftHash(key_hash) => {
            for write in snapshots.lift_hash(&key_hash) {
                apply(gate, write);
            }
            None
        }
        Update::Client { key_id, ip } => {
            if let Err(e) = addresses.client(gate, key_id, ip) {
                tracing::warn!(error = %e, "kernel binding update failed");
            }
            None
        }
        Update::Prices {
            prices,
            applied,
            replace,
        } => {
            let result = if replace {
                gate.replace_prices(&merged_prices(plan, prices))
            } else {
                prices.iter().try_for_each(|(method, path, price)| {
                    gate.set_price(method.as_deref(), path, *price)
                })
            };
            match result {
                Ok(()) => {
                    if let Some(applied) = applied {
                        let _ = applied.send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "kernel price update failed"),
            }
            None
        }
        Update::Plan { plan: new, applied } => {
            let result = replan(gate, snapshots, addresses, plan, new);
            let _ = applied.send(result.map_err(|e| e.to_string()));
            None
        }
    };
    if let Some(write) = write {
        apply(gate, write);
    }
}

/// The price map after a reload with the pricing engine: the plan's prices, with the engine's
/// in place of the plan's where they name the same entry (and any the plan lacks).
fn merged_prices(
    plan: &KernelPlan,
    engine: Vec<(Option<String>, String, f64)>,
) -> Vec<(Option<String>, String, f64)> {
    let mut merged = plan.prices.clone();
    for (method, path, price) in engine {
        match merged
            .iter_mut()
            .find(|(m, p, _)| *m == method && *p == path)
        {
            Some(entry) => entry.2 = price,
            None => merged.push((method, path, price)),
        }
    }
    merged
}

/// Writes a reload's plan into the gate. A new generation goes first (every snapshot and
/// binding of the old one stops counting at once, so nothing is judged by a half-written price
/// map), then the price map is rebuilt to exactly the plan's, and the snapshots of the old
/// generation are dropped: each key gets a new one at its next decision. On a refused write
/// the previous plan is written back (best effort) and the error returned.
fn replan(
    gate: &mut Gate,
    snapshots: &mut Snapshots,
    addresses: &mut Addresses,
    current: &mut Arc<KernelPlan>,
    new: Arc<KernelPlan>,
) -> Result<u32, KernelError> {
    if new.settings.generation != gate.generation() {
        let written = gate
            .configure(&new.settings)
            .and_then(|()| gate.replace_prices(&new.prices));
        if let Err(e) = written {
            let restored = gate
                .configure(&current.settings)
                .and_then(|()| gate.replace_prices(&current.prices));
            if let Err(again) = restored {
                tracing::error!(error = %again, "restoring the previous kernel plan failed");
            }
            return Err(e);
        }
        for key_id in snapshots.replan(&new) {
            let _ = gate.remove_budget(key_id);
        }
        addresses.rebind(gate);
        tracing::info!(
            from = current.settings.generation,
            to = new.settings.generation,
            "kernel gate: new config generation"
        );
    }
    addresses.0.set_bind_after(new.bind_after);
    *current = new;
    Ok(gate.generation())
}

/// Snapshots a previous daemon left in the pinned map (same generation): keep refreshing them,
/// so a restart does not lift what the budget arithmetic still justifies.
fn adopt(gate: &Gate, plan: &KernelPlan) -> HashMap<u64, Tracked> {
    let now_ns = monotonic_ns();
    let now = Instant::now();
    let mut tracked = HashMap::new();
    for (key_id, b) in gate.budgets().unwrap_or_default() {
        let age = Duration::from_nanos(now_ns.saturating_sub(b.synced_ns));
        if b.generation != plan.settings.generation
            || age.as_nanos() > u128::from(SNAPSHOT_MAX_AGE_NS)
        {
            continue;
        }
        tracked.insert(
            key_id,
            Tracked {
                balance: Milli(b.balance_milli).tokens(),
                refill_per_sec: Milli(i64::try_from(b.refill_milli_per_sec).unwrap_or(i64::MAX))
                    .tokens(),
                max_tokens: f64::INFINITY,
                stamp: now.checked_sub(age).unwrap_or(now),
                // Unknown: any update of the key is newer.
                at: f64::NEG_INFINITY,
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

/// The sync task's map work for `keys` tracked keys that stay low (balance 0, no refill),
/// driven over `span` of simulated ticks of `max_staleness / 3` against a real gate: what
/// `cargo xtask bench kernel` reports as the cost of keeping snapshots alive. The keys' last
/// changes are spread over the [`LIFT_AFTER`] before the start, as decisions spread them; a
/// lifted key's next decision (it still cannot pay) writes its snapshot again at once.
/// Returns the time spent (refresh, writes, heartbeat) and the map writes made.
#[doc(hidden)]
pub fn bench_refresh(
    gate: &mut Gate,
    keys: u64,
    max_staleness: Duration,
    span: Duration,
) -> (Duration, u64) {
    let start = Instant::now() + LIFT_AFTER;
    let mut tracked = HashMap::with_capacity(keys as usize);
    for k in 0..keys {
        let stamp = start - LIFT_AFTER.mul_f64(k as f64 / keys as f64);
        tracked.insert(
            k + 1,
            Tracked {
                balance: 0.0,
                refill_per_sec: 0.0,
                max_tokens: 1000.0,
                stamp,
                at: 0.0,
            },
        );
        let _ = gate.put_budget(k + 1, snapshot(0.0, 0.0, Instant::now()));
    }
    let mut snapshots = Snapshots {
        max_price: 120.0,
        tracked,
        raised: HashMap::new(),
        ids: HashMap::new(),
    };
    let tick = max_staleness / 3;
    let mut busy = Duration::ZERO;
    let mut written = 0u64;
    let mut now = start;
    while now < start + span {
        let began = Instant::now();
        for write in snapshots.refresh(now) {
            written += 1;
            let lifted = match write {
                Write::Remove(key_id) => Some(key_id),
                Write::Put(..) => None,
            };
            apply(gate, write);
            let decided = lifted.and_then(|key_id| {
                snapshots.balance(
                    Balance {
                        key_id,
                        key_hash: KeyHash([0; 32]),
                        balance: 0.0,
                        at: 0.0,
                        stamp: now,
                        refill_per_sec: 0.0,
                        max_tokens: 1000.0,
                        raises: false,
                    },
                    now,
                )
            });
            if let Some(put) = decided {
                written += 1;
                apply(gate, put);
            }
        }
        let _ = gate.heartbeat();
        busy += began.elapsed();
        now += tick;
    }
    (busy, written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::event::{Decided, Refunded, Settled, SettledCost};
    use crate::decision::{Check, Decision, Mode};
    use crate::key::{ApiKey, RequestId};

    fn snapshots(max_price: f64) -> Snapshots {
        let mut config = Config::default();
        config.pricing.default_cost = max_price;
        Snapshots::new(&plan(&config), HashMap::new())
    }

    fn balance(balance: f64, at: f64, raises: bool, stamp: Instant) -> Balance {
        Balance {
            key_id: 7,
            key_hash: KeyHash([7; 32]),
            balance,
            at,
            stamp,
            refill_per_sec: 0.0,
            max_tokens: 1000.0,
            raises,
        }
    }

    fn put_balance(w: Option<Write>) -> Option<i64> {
        match w {
            Some(Write::Put(7, b)) => Some(b.balance_milli),
            _ => None,
        }
    }

    #[test]
    fn a_refund_reaches_the_map_and_a_debit_handled_after_it_cannot_undo_it() {
        let now = Instant::now();
        let mut s = snapshots(120.0);
        // Drained to 0.5 at store time 10, then refunded 100 (the refund keeps the bucket's
        // clock: its balance is as of 10 too).
        assert_eq!(
            put_balance(s.balance(balance(0.5, 10.0, false, now), now)),
            Some(500)
        );
        assert_eq!(
            put_balance(s.balance(balance(100.5, 10.0, true, now), now)),
            Some(100_500)
        );
        assert_eq!(
            s.balance(balance(0.5, 10.0, false, now), now),
            None,
            "the debit the refund saw, handled late"
        );
        assert_eq!(
            put_balance(s.balance(balance(0.25, 11.0, false, now), now)),
            Some(250)
        );

        // The other order: the refund first, then the debit it saw.
        let mut s = snapshots(120.0);
        assert_eq!(
            put_balance(s.balance(balance(100.5, 10.0, true, now), now)),
            Some(100_500)
        );
        assert_eq!(s.balance(balance(0.5, 10.0, false, now), now), None);

        // A refund that makes the key able to pay everything removes its snapshot, and the
        // late debit does not bring it back.
        let mut s = snapshots(120.0);
        assert!(put_balance(s.balance(balance(0.5, 10.0, false, now), now)).is_some());
        assert_eq!(
            s.balance(balance(500.5, 10.0, true, now), now),
            Some(Write::Remove(7))
        );
        assert_eq!(s.balance(balance(0.5, 10.0, false, now), now), None);
        assert!(s.tracked.is_empty());
    }

    #[test]
    fn an_older_debit_never_replaces_a_newer_one_and_lifts_are_ordered_too() {
        let now = Instant::now();
        let mut s = snapshots(120.0);
        assert!(put_balance(s.balance(balance(5.0, 11.0, false, now), now)).is_some());
        assert_eq!(s.balance(balance(50.0, 10.0, false, now), now), None);
        // A refund of a forgotten bucket: the balance is unknown, the snapshot goes.
        assert_eq!(s.lift(7, Some(12.0), now), Some(Write::Remove(7)));
        assert_eq!(s.balance(balance(5.0, 11.5, false, now), now), None);
        assert!(put_balance(s.balance(balance(3.0, 12.5, false, now), now)).is_some());
        assert_eq!(
            s.lift(7, Some(12.2), now),
            None,
            "older than what the map holds"
        );
    }

    #[test]
    fn snapshots_carry_the_store_time_of_their_balance_rounded_up() {
        let now = Instant::now();
        let mut s = snapshots(120.0);
        let debited = now.checked_sub(Duration::from_millis(300)).unwrap_or(now);
        let mut b = balance(0.0004, 10.0, false, debited);
        b.refill_per_sec = 0.0001;
        let Some(Write::Put(_, budget)) = s.balance(b, now) else {
            panic!("a snapshot")
        };
        assert_eq!(budget.balance_milli, 1, "rounded up, never down");
        assert_eq!(budget.refill_milli_per_sec, 1);
        let age = monotonic_ns().saturating_sub(budget.synced_ns);
        assert!(
            age >= 300_000_000,
            "stamped when the store settled it, not when it was handled: {age} ns"
        );
        // A balance older than LIFT_AFTER is projected to now instead.
        let old = now.checked_sub(Duration::from_secs(40)).unwrap_or(now);
        let mut b = balance(10.0, 11.0, false, old);
        b.refill_per_sec = 2.0;
        let Some(Write::Put(_, budget)) = s.balance(b, now) else {
            panic!("a snapshot")
        };
        assert_eq!(budget.balance_milli, 90_000);
    }

    #[test]
    fn refresh_lifts_keys_refill_made_able_to_pay_and_old_snapshots_only() {
        let now = Instant::now();
        let mut s = snapshots(120.0);
        let mut b = balance(100.0, 10.0, false, now);
        b.refill_per_sec = 10.0;
        s.balance(b, now);
        let mut c = balance(0.0, 10.0, false, now);
        c.key_id = 8;
        s.balance(c, now);
        let later = now + Duration::from_secs(3);
        assert_eq!(
            s.refresh(later),
            [Write::Remove(7)],
            "100 + 3 s × 10/s ≥ 120; key 8 is young: the heartbeat keeps it valid, no write"
        );
        for tick in 1..=40 {
            assert!(
                s.refresh(later + Duration::from_millis(667) * tick)
                    .is_empty(),
                "tick {tick}: nothing to write before LIFT_AFTER"
            );
        }
        // Still low, but a raise through another node may be missing from it by now: lifted,
        // so the key's next decision writes a true snapshot.
        let old = now + LIFT_AFTER + Duration::from_millis(1);
        assert_eq!(s.refresh(old), [Write::Remove(8)]);
        assert!(s.tracked.is_empty());
        assert!(
            s.refresh(old + LIFT_AFTER * 2).is_empty(),
            "a lifted snapshot is not brought back by a refresh"
        );
        // Its next decision writes one again.
        let mut again = balance(0.0, 20.0, false, old);
        again.key_id = 8;
        assert!(matches!(s.balance(again, old), Some(Write::Put(8, _))));
    }

    fn decision(remaining: f64, denial: Option<Denial>) -> Decision {
        Decision {
            allowed: denial.is_none(),
            denial,
            cost: 120.0,
            remaining: Some(remaining),
            retry_after_ms: None,
            tier: Some("free".into()),
            bucket: None,
            mode: Mode::Enforce,
            request_id: RequestId::generate(),
            replayed: false,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: "/generate-report".into(),
            reserved: false,
            quota: None,
            candidate: None,
        }
    }

    fn updates(config: &Config, publish: impl FnOnce(&GateLink)) -> Vec<Update> {
        let (link, mut rx) = test_link(config, &Metrics::new());
        publish(&link);
        let mut out = Vec::new();
        while let Ok(u) = rx.try_recv() {
            out.push(u);
        }
        out
    }

    #[test]
    fn the_subscriber_owns_tiers_shadow_mode_and_kernel_ids() {
        let key = ApiKey::parse("sub-key").expect("key");
        let hash = key.hash();
        let check = Check {
            key: key.clone(),
            endpoint: "/generate-report".into(),
            method: Some("POST".into()),
            client_ip: Some("10.0.0.9".parse().expect("ip")),
            units: 1.0,
            request_id: None,
            reserve: false,
        };
        let sent = Instant::now();
        let settled = Settled {
            at: 100.0,
            now: 100.0,
            sent,
        };
        let d = decision(0.5, Some(Denial::Exhausted));
        let debit = |link: &GateLink| {
            link.publish(&Event::Debit(Decided {
                key: &key,
                key_hash: &hash,
                check: &check,
                decision: &d,
                multiplier: 1.0,
                decided_by: "memory",
                bucket: BucketKind::Main,
                settled: Some(settled),
                grants: &Default::default(),
            }))
        };
        let got = updates(&Config::default(), debit);
        assert_eq!(got.len(), 2, "{got:?}");
        let Update::Balance(b) = &got[0] else {
            panic!("a balance first: {got:?}")
        };
        assert_eq!(
            (b.key_id, b.balance, b.at, b.refill_per_sec, b.raises),
            (key.kernel_id(), 0.5, 100.0, 10.0, false)
        );
        assert_eq!(b.stamp, sent);
        assert!(matches!(got[1], Update::Client { key_id, .. } if key_id == key.kernel_id()));

        // A member of a shared budget: its balance moves with the other members', so the
        // kernel never judges it by a snapshot: whatever it holds is lifted.
        let mut shared = Config::default();
        shared.shared_budgets.insert(
            "acme".into(),
            crate::config::SharedBudgetConfig {
                tier: "free".into(),
                keys: vec![hash.to_hex()],
                key_limit: None,
            },
        );
        let got = updates(&shared, debit);
        assert!(
            matches!(got[0], Update::Lift { key_id, at: Some(_) } if key_id == key.kernel_id()),
            "{got:?}"
        );
        assert!(
            !got.iter().any(|u| matches!(u, Update::Balance(_))),
            "{got:?}"
        );

        let mut shadow = Config::default();
        shadow.budget.shadow = true;
        let got = updates(&shadow, debit);
        assert!(
            got.iter().all(|u| matches!(u, Update::Client { .. })),
            "shadow mode never rejects, not even in the kernel: {got:?}"
        );

        let replay = |link: &GateLink| {
            link.publish(&Event::Replay(Decided {
                key: &key,
                key_hash: &hash,
                check: &check,
                decision: &d,
                multiplier: 1.0,
                decided_by: "replay",
                bucket: BucketKind::Main,
                settled: None,
                grants: &Default::default(),
            }))
        };
        let got = updates(&Config::default(), replay);
        assert!(
            got.iter().all(|u| matches!(u, Update::Client { .. })),
            "a replay's balance is the first decision's: {got:?}"
        );

        let request_id = RequestId::generate();
        let refund = |link: &GateLink, balance: Option<f64>| {
            link.publish(&Event::Refund(Refunded {
                key: &key,
                key_hash: &hash,
                request_id: &request_id,
                credited: 100.0,
                balance,
                tier: "free",
                settled: Settled {
                    at: 90.0,
                    now: 100.0,
                    sent,
                },
                id: uuid::Uuid::now_v7(),
                store: "memory",
            }))
        };
        let got = updates(&Config::default(), |link| refund(link, Some(100.5)));
        let [Update::Balance(b)] = got.as_slice() else {
            panic!("one balance: {got:?}")
        };
        assert!(b.raises && b.balance == 100.5 && b.at == 90.0);
        assert_eq!(
            sent.duration_since(b.stamp),
            Duration::from_secs(10),
            "as of the bucket's clock: 10 s before the refund"
        );
        let got = updates(&Config::default(), |link| refund(link, None));
        assert!(
            matches!(got.as_slice(), [Update::Lift { at: Some(at), .. }] if *at == 90.0),
            "{got:?}"
        );

        // A settle's balance reaches the map as of its store time; one that credited tokens
        // back raises it (as a refund), one that charged more does not.
        let settle = |link: &GateLink, charged: f64| {
            link.publish(&Event::Settle(SettledCost {
                key: &key,
                key_hash: &hash,
                request_id: &request_id,
                cost: 500.0 + charged,
                estimate: 500.0,
                charged,
                capped: false,
                balance: 40.0 - charged,
                tier: "free",
                settled: Settled {
                    at: 95.0,
                    now: 95.0,
                    sent,
                },
                id: uuid::Uuid::now_v7(),
                store: "memory",
            }))
        };
        for (charged, raises) in [(-30.0, true), (30.0, false)] {
            let got = updates(&Config::default(), |link| settle(link, charged));
            let [Update::Balance(b)] = got.as_slice() else {
                panic!("one balance: {got:?}")
            };
            assert_eq!(
                (b.balance, b.at, b.raises, b.stamp),
                (40.0 - charged, 95.0, raises, sent),
                "{charged}"
            );
        }

        let unknown = decision(0.0, Some(Denial::UnknownKey));
        let got = updates(&Config::default(), |link| {
            link.publish(&Event::Debit(Decided {
                key: &key,
                key_hash: &hash,
                check: &check,
                decision: &unknown,
                multiplier: 1.0,
                decided_by: "memory",
                bucket: BucketKind::Main,
                settled: None,
                grants: &Default::default(),
            }))
        });
        assert!(matches!(got[0], Update::Lift { at: None, .. }), "{got:?}");
    }

    #[tokio::test]
    async fn a_reloaded_plan_is_followed_only_once_the_kernel_has_it() {
        let base =
            Config::parse("[tiers.free]\nmax_tokens = 1000\nrefill_per_sec = 10\n").expect("valid");
        let (link, mut rx) = test_link(&base, &Metrics::new());
        let old = link.plan().settings.generation;
        let mut faster = base.clone();
        if let Some(t) = faster.tiers.get_mut("free") {
            t.refill_per_sec = 50.0;
        }
        let new = plan(&faster);
        let generation = new.settings.generation;
        assert_ne!(
            generation, old,
            "a tier's refill rate is part of the generation"
        );
        let refill = |link: &GateLink| {
            let settled = Settled {
                at: 1.0,
                now: 1.0,
                sent: Instant::now(),
            };
            match link.balance(7, &KeyHash([7; 32]), "free", 0.5, &settled, false) {
                Some(Update::Balance(b)) => b.refill_per_sec,
                other => panic!("a balance: {other:?}"),
            }
        };
        // The sync task's side: until it answers, the decisions' updates follow the old plan.
        let kernel = async {
            let Some(Update::Plan { plan, applied }) = rx.recv().await else {
                panic!("the plan goes to the sync task")
            };
            assert_eq!(refill(&link), 10.0, "not before the kernel has it");
            let _ = applied.send(Ok(plan.settings.generation));
        };
        let (applied, ()) =
            tokio::join!(link.apply_plan(new.clone(), Duration::from_secs(5)), kernel);
        assert_eq!(applied.expect("applied"), generation);
        assert_eq!(
            link.clone().plan().settings.generation,
            generation,
            "every clone"
        );
        assert_eq!(refill(&link), 50.0);

        // Refused by the kernel: the plan in force stays.
        let kernel = async {
            let Some(Update::Plan { applied, .. }) = rx.recv().await else {
                panic!("the plan goes to the sync task")
            };
            let _ = applied.send(Err("map full".into()));
        };
        let (refused, ()) =
            tokio::join!(link.apply_plan(plan(&base), Duration::from_secs(5)), kernel);
        assert!(matches!(refused, Err(PlanError::Refused(m)) if m == "map full"));
        assert_eq!(link.plan().settings.generation, generation);
        // Nobody answers: a timeout, nothing changed.
        tokio::time::pause();
        let silent = link.apply_plan(plan(&base), Duration::from_secs(5)).await;
        assert!(matches!(silent, Err(PlanError::Timeout(_))), "{silent:?}");
        assert_eq!(link.plan().settings.generation, generation);
    }

    #[test]
    fn a_rebuilt_price_map_is_the_plans_with_the_engines_prices() {
        let config = Config::parse(
            r#"
            [pricing]
            dynamic = true
            floor = 0.5
            [[pricing.endpoints]]
            method = "POST"
            path = "/a"
            base_cost = 100
            [[pricing.endpoints]]
            path = "/b"
            base_cost = 10
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        let merged = merged_prices(&p, vec![(Some("POST".into()), "/a".into(), 80.0)]);
        assert_eq!(
            merged,
            [
                (Some("POST".into()), "/a".into(), 80.0),
                (None, "/b".into(), 5.0)
            ],
            "the engine's price for /a, the plan's (floor x base) for /b, nothing else"
        );
        assert_eq!(merged_prices(&p, Vec::new()), p.prices);
    }

    #[test]
    fn a_new_plan_drops_the_old_generations_snapshots() {
        let now = Instant::now();
        let mut s = snapshots(120.0);
        assert!(put_balance(s.balance(balance(0.5, 10.0, false, now), now)).is_some());
        let mut config = Config::default();
        config.pricing.default_cost = 500.0;
        let p = plan(&config);
        assert_eq!(s.replan(&p), [7], "its snapshot is removed from the map");
        assert!(s.tracked.is_empty());
        assert_eq!(s.max_price, 500.0);
        // The key's next decision writes a snapshot of the new generation.
        assert!(put_balance(s.balance(balance(0.25, 11.0, false, now), now)).is_some());
    }

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
