//! Fail-soft decisions (`on_store_failure = "local"`): while the token store is unreachable,
//! each daemon keeps enforcing with **local buckets** holding its share of every key's budget,
//! and once the store answers again it **debits back** what it let through, once.
//!
//! - A key's local bucket has the key's tier parameters (`max_tokens`, `refill_per_sec`,
//!   `initial_tokens`) divided by the node count, the idle cap as is, and follows the PTB
//!   arithmetic of [`crate::debit`] on this daemon's clock. The count is `store.local_nodes`,
//!   or the heartbeat set the daemons keep in Redis (`lua/heartbeat.lua`): the last count
//!   read is kept through an outage.
//! - The decider does not know a key's tier without the store: the tier of the key's last
//!   store decision is remembered (bounded), else the default tier applies.
//! - Every cost a local bucket allows is added to the key's **pending** spending. The
//!   reconciler ([`LocalBudget::run`], a lifecycle worker) charges it to the shared bucket as a
//!   forced debit ([`Debit::force`]: charged even below zero, the spending already happened)
//!   under a request id unique to this node, this process, the key and the bucket, frozen with
//!   its amount until the store answers: a retry after a lost answer is a replay, never a second
//!   charge.
//! - Local buckets are kept across outages (and forgotten like store buckets once refill would
//!   have filled them), so a flapping store does not hand out a fresh share each time.
//!
//! At worst, while the store is unreachable a key may spend its local share on every node:
//! with the right count, the fleet admits about one capacity (`initial_tokens`, then up to
//! `max_tokens`) plus the refill over the outage; with a count `k` lower than the real `n`
//! nodes, `n / k` times that. That is on top of what the shared bucket held: the debit-back
//! makes the key pay it afterwards (its balance goes below zero), it cannot undo the admission.
use crate::budget::{BucketParams, BudgetPolicy, UnknownKeys};
use crate::clock::Clock;
use crate::debit::{self, BucketState};
use crate::decision::event::{DebitedBack, Event, Outbox};
use crate::key::{KeyHash, RequestId};
use crate::lifecycle::Shutdown;
use crate::metrics::Metrics;
use crate::store::{
    BucketKind, Debit, DebitOutcome, Fingerprint, RefundOutcome, StoreError, TokenStore,
};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// What a local bucket decided.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalOutcome {
    /// Decided by the key's local bucket.
    Decided(LocalDecision),
    /// Unknown keys are refused, and this key's tier was not seen recently: it cannot be
    /// decided without the store.
    Unknown,
    /// `store.local_max_keys` keys are tracked already: denied.
    Untracked,
}

/// A decision by a local bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDecision {
    /// Whether the local bucket paid the cost.
    pub allowed: bool,
    /// The local bucket's balance afterwards.
    pub remaining: f64,
    /// When denied: milliseconds until the local share's refill covers the cost.
    pub retry_after_ms: Option<u64>,
    /// The tier the share was taken from.
    pub tier: String,
    /// The local bucket's parameters (the tier's, divided by the node count).
    pub share: BucketParams,
}

/// Errors of the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The store did not answer a debit-back (it is retried, under the same id, later).
    #[error("debit-back not settled: {0}")]
    Store(#[from] StoreError),
    /// The store did not answer a debit-back in time.
    #[error("debit-back timed out")]
    Timeout,
}

/// A key's local bucket.
#[derive(Debug)]
struct Bucket {
    state: BucketState,
    share: BucketParams,
    tier: String,
    /// Allowed locally, not yet handed to a debit-back.
    pending: f64,
}

/// Debit-backs (and refunds) sent together; a round where the store does not answer stops
/// after one such batch, so it waits one timeout, not one per key.
const IN_FLIGHT: usize = 64;

/// What a debit-back settles.
#[derive(Debug, Clone, Copy)]
enum Owing {
    /// One admission whose own call may have landed ([`State::uncertain`]).
    Request,
    /// The summed spending of a key's bucket ([`State::owed`]).
    Sum((KeyHash, BucketKind)),
}

/// A debit-back sent (or about to be), frozen until the store answers it.
#[derive(Debug, Clone)]
struct Owed {
    request_id: RequestId,
    amount: f64,
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<(KeyHash, BucketKind), Bucket>,
    owed: HashMap<(KeyHash, BucketKind), Owed>,
    /// Local admissions whose own store call was sent and not answered (it timed out): Redis
    /// may still execute it (a frozen or partitioned server runs what it received once it
    /// runs again). Each is debited back under its own request id and fingerprint, so that
    /// if it did land the debit-back is a replay, not a second charge. Bounded by
    /// `max_keys`; beyond, admissions join `pending` (and may then be charged twice).
    uncertain: Vec<Debit>,
    /// Local denials whose store call was sent and not answered: if it landed and was allowed
    /// there, the key was charged for a request it was refused; refunded afterwards. Bounded
    /// by `max_keys`.
    unpaid: Vec<(KeyHash, RequestId)>,
    /// Inserts since the last sweep of forgotten buckets (a full table is swept at most once
    /// per so many inserts, so a flood of new keys does not make every decision O(n)).
    inserts_since_sweep: usize,
}

/// Tiers of keys seen in store decisions: two generations of at most half the cap each; the
/// older is dropped when the newer fills up (bounded memory, recent keys kept).
#[derive(Debug, Default)]
struct Tiers {
    recent: HashMap<KeyHash, String>,
    older: HashMap<KeyHash, String>,
}

/// The local buckets, the tiers seen and the spending owed to the shared buckets.
#[derive(Debug)]
pub struct LocalBudget {
    /// Swapped whole by a config reload.
    policy: arc_swap::ArcSwap<BudgetPolicy>,
    clock: Arc<dyn Clock>,
    /// The node count in use (>= 1).
    nodes: AtomicU32,
    max_keys: usize,
    state: Mutex<State>,
    tiers: Mutex<Tiers>,
    /// Something is pending or owed (read on every store decision: an atomic, no lock).
    owing: AtomicBool,
    /// Wakes the reconciler (the store answered while something is owed).
    wake: Notify,
    /// `lb-<node>-<process>`: the start of every debit-back id of this process.
    id_prefix: String,
    seq: AtomicU64,
    metrics: Metrics,
}

impl LocalBudget {
    /// Local buckets for `policy`, split by `nodes` until a heartbeat says otherwise, at most
    /// `max_keys` buckets; `node` names this daemon (its debit-back ids are unique to it).
    pub fn new(
        policy: BudgetPolicy,
        clock: Arc<dyn Clock>,
        nodes: u32,
        max_keys: usize,
        node: &str,
        metrics: Metrics,
    ) -> Self {
        use sha2::{Digest, Sha256};
        let node_tag = hex::encode(&Sha256::digest(node.as_bytes())[..4]);
        // Unique to this process: a restarted daemon must not reuse an earlier run's ids.
        let process = uuid::Uuid::new_v4().simple().to_string();
        let nodes = nodes.max(1);
        metrics.local_nodes.set(i64::from(nodes));
        Self {
            policy: arc_swap::ArcSwap::from_pointee(policy),
            clock,
            nodes: AtomicU32::new(nodes),
            max_keys: max_keys.max(1),
            state: Mutex::new(State::default()),
            tiers: Mutex::new(Tiers::default()),
            owing: AtomicBool::new(false),
            wake: Notify::new(),
            id_prefix: format!("lb-{node_tag}-{}", &process[..12]),
            seq: AtomicU64::new(0),
            metrics,
        }
    }

    /// Applies a new budget policy (a config reload): buckets made from now on use it; local
    /// buckets already made keep their parameters until they are reconciled and dropped.
    pub fn set_policy(&self, policy: &BudgetPolicy) {
        self.policy.store(Arc::new(policy.clone()));
    }

    /// The node count in use.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed)
    }

    /// Sets the node count (from the heartbeat set); at least 1.
    pub fn set_nodes(&self, nodes: u32) {
        let nodes = nodes.max(1);
        self.nodes.store(nodes, Ordering::Relaxed);
        self.metrics.local_nodes.set(i64::from(nodes));
    }

    /// Remembers the tier the store charged a key under (called on every store decision), and
    /// wakes the reconciler when local spending is owed: the store answers again.
    pub fn seen(&self, key: &KeyHash, tier: &str) {
        {
            let mut tiers = self.tiers.lock();
            if tiers.recent.get(key).is_none_or(|t| t != tier) {
                if tiers.recent.len() >= (self.max_keys / 2).max(1) {
                    tiers.older = std::mem::take(&mut tiers.recent);
                }
                tiers.recent.insert(*key, tier.to_owned());
            }
        }
        if self.owing.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    fn tier_of(&self, key: &KeyHash) -> Option<String> {
        let tiers = self.tiers.lock();
        tiers
            .recent
            .get(key)
            .or_else(|| tiers.older.get(key))
            .cloned()
    }

    /// The parameters of a key's local bucket: its tier's (or the operational bucket's),
    /// divided by the node count.
    fn share(&self, key: &KeyHash, kind: BucketKind) -> Option<(String, BucketParams)> {
        let remembered = self.tier_of(key);
        let policy = self.policy.load();
        let tier = policy.resolve(remembered.as_deref())?;
        if remembered.is_none() && policy.unknown_keys == UnknownKeys::Reject {
            // Not seen recently and unknown keys are refused: an unassigned key must not get
            // in while the store (which knows the assignments) is away.
            return None;
        }
        let full = match kind {
            BucketKind::Main => tier.bucket,
            BucketKind::Operational => policy.operational,
        };
        let n = f64::from(self.nodes());
        Some((
            tier.name.clone(),
            BucketParams {
                max_tokens: full.max_tokens / n,
                refill_per_sec: full.refill_per_sec / n,
                idle_cap: full.idle_cap,
                initial_tokens: full.initial_tokens / n,
            },
        ))
    }

    /// Decides one debit by the key's local bucket, and owes what it allows to the shared
    /// bucket. `sent`: the debit's own store call was sent and not answered (it may still
    /// land), rather than not sent at all (breaker open).
    pub fn decide(&self, debit: &Debit, sent: bool) -> LocalOutcome {
        let (key, kind, cost) = (&debit.key, debit.bucket, debit.cost);
        let now = self.clock.now();
        let window = self.policy.load().active_window.as_secs_f64();
        let mut st = self.state.lock();
        let slot = (*key, kind);
        if !st.buckets.contains_key(&slot) {
            let Some((tier, share)) = self.share(key, kind) else {
                self.metrics
                    .local_decisions
                    .with_label_values(&["denied"])
                    .inc();
                return LocalOutcome::Unknown;
            };
            if st.buckets.len() >= self.max_keys {
                st.sweep(now, window, self.max_keys);
            }
            if st.buckets.len() >= self.max_keys {
                self.metrics
                    .local_decisions
                    .with_label_values(&["untracked"])
                    .inc();
                return LocalOutcome::Untracked;
            }
            st.inserts_since_sweep += 1;
            st.buckets.insert(
                slot,
                Bucket {
                    state: BucketState {
                        balance: share.initial_tokens,
                        updated_at: now,
                    },
                    share,
                    tier,
                    pending: 0.0,
                },
            );
        }
        let max_keys = self.max_keys;
        let State {
            buckets,
            uncertain,
            unpaid,
            ..
        } = &mut *st;
        let Some(bucket) = buckets.get_mut(&slot) else {
            return LocalOutcome::Untracked;
        };
        let s = debit::settle(Some(bucket.state), &bucket.share, window, now, cost);
        bucket.state = s.state;
        if s.allowed {
            if sent && uncertain.len() < max_keys {
                uncertain.push(debit.clone());
            } else {
                bucket.pending += cost;
            }
            self.owing.store(true, Ordering::Relaxed);
            self.metrics.local_pending_tokens.add(cost);
        } else if sent && kind == BucketKind::Main && unpaid.len() < max_keys {
            unpaid.push((*key, debit.request_id.clone()));
            self.owing.store(true, Ordering::Relaxed);
        }
        self.metrics
            .local_decisions
            .with_label_values(&[if s.allowed { "allowed" } else { "denied" }])
            .inc();
        LocalOutcome::Decided(LocalDecision {
            allowed: s.allowed,
            remaining: s.state.balance,
            retry_after_ms: s.retry_after_ms,
            tier: bucket.tier.clone(),
            share: bucket.share,
        })
    }

    /// Tokens spent locally and not yet settled in the shared buckets.
    pub fn pending(&self) -> f64 {
        let st = self.state.lock();
        st.buckets.values().map(|b| b.pending).sum::<f64>()
            + st.owed.values().map(|o| o.amount).sum::<f64>()
            + st.uncertain.iter().map(|d| d.cost).sum::<f64>()
    }

    /// Local buckets held (for tests of the bound).
    pub fn tracked(&self) -> usize {
        self.state.lock().buckets.len()
    }

    /// Charges everything owed to the shared buckets, and refunds what the store may have
    /// charged for local denials; stops after the first batch of calls the store does not
    /// answer (what is left is retried later, under the same ids). Returns the tokens debited
    /// back.
    pub async fn reconcile(
        &self,
        store: &dyn TokenStore,
        events: &Outbox,
        timeout: Duration,
    ) -> Result<f64, LocalError> {
        let mut total = 0.0;
        let mut result = self
            .debit_back_all(store, events, timeout, &mut total)
            .await;
        if result.is_ok() {
            result = self.refund_unpaid(store, timeout).await;
        }
        self.update_owing();
        result.map(|()| total)
    }

    /// One store call of the reconciler, bounded by `timeout`.
    async fn call<T>(
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, LocalError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LocalError::Store(e)),
            Err(_) => Err(LocalError::Timeout),
        }
    }

    /// Sends every debit-back, [`IN_FLIGHT`] at a time (the store pipelines them): the
    /// admissions whose own call may have landed, each under its own id and fingerprint,
    /// forced (a replay when the original did land); the summed spending of admissions never
    /// sent, under a debit-back id frozen with its amount until answered.
    async fn debit_back_all(
        &self,
        store: &dyn TokenStore,
        events: &Outbox,
        timeout: Duration,
        total: &mut f64,
    ) -> Result<(), LocalError> {
        let debits: Vec<(Owing, Debit)> = {
            let mut st = self.state.lock();
            let State {
                buckets,
                owed,
                uncertain,
                ..
            } = &mut *st;
            for (slot, bucket) in buckets.iter_mut() {
                // A debit-back already sent keeps its id and amount until answered; what was
                // spent since waits for the next one.
                if bucket.pending > 0.0 && !owed.contains_key(slot) {
                    owed.insert(
                        *slot,
                        Owed {
                            request_id: self.next_id(slot.1),
                            amount: bucket.pending,
                        },
                    );
                    bucket.pending = 0.0;
                }
            }
            let requests = uncertain.iter().map(|d| {
                (
                    Owing::Request,
                    Debit {
                        force: true,
                        ..d.clone()
                    },
                )
            });
            let sums = owed.iter().map(|(slot, o)| {
                (
                    Owing::Sum(*slot),
                    debit_back(slot.0, slot.1, o.request_id.clone(), o.amount),
                )
            });
            requests.chain(sums).collect()
        };
        let mut answered = HashSet::new();
        let mut result = Ok(());
        for batch in debits.chunks(IN_FLIGHT) {
            let answers = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|(_, d)| Self::call(timeout, store.debit(d))),
            )
            .await;
            for ((owing, d), answer) in batch.iter().zip(answers) {
                let outcome = match answer {
                    Ok(outcome) => Some(outcome),
                    Err(LocalError::Store(StoreError::Rejected(e))) => {
                        // It will never be taken: keeping it would only leak.
                        tracing::error!(error = %e, "the store refused a debit-back: dropped");
                        None
                    }
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(e);
                        }
                        continue;
                    }
                };
                match owing {
                    Owing::Request => {
                        answered.insert((d.key, d.request_id.clone()));
                    }
                    Owing::Sum(slot) => {
                        self.state.lock().owed.remove(slot);
                    }
                }
                self.metrics.local_pending_tokens.sub(d.cost);
                if let Some(outcome) = outcome {
                    *total += self.debited_back(store, events, d, outcome);
                }
            }
            if result.is_err() {
                break;
            }
        }
        if !answered.is_empty() {
            self.state
                .lock()
                .uncertain
                .retain(|u| !answered.contains(&(u.key, u.request_id.clone())));
        }
        result
    }

    /// Refunds local denials that the store may have charged (their call landed late),
    /// [`IN_FLIGHT`] at a time.
    async fn refund_unpaid(
        &self,
        store: &dyn TokenStore,
        timeout: Duration,
    ) -> Result<(), LocalError> {
        let unpaid = self.state.lock().unpaid.clone();
        let mut answered = HashSet::new();
        let mut result = Ok(());
        for batch in unpaid.chunks(IN_FLIGHT) {
            let answers = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|(key, id)| Self::call(timeout, store.refund(key, id))),
            )
            .await;
            for (entry, answer) in batch.iter().zip(answers) {
                match answer {
                    Ok(RefundOutcome::Refunded { credited, .. }) => tracing::info!(
                        credited,
                        "refunded a locally denied request the store charged late"
                    ),
                    Ok(_) | Err(LocalError::Store(StoreError::Rejected(_))) => {}
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(e);
                        }
                        continue;
                    }
                }
                answered.insert(entry.clone());
            }
            if result.is_err() {
                break;
            }
        }
        if !answered.is_empty() {
            self.state
                .lock()
                .unpaid
                .retain(|entry| !answered.contains(entry));
        }
        result
    }

    /// Counts and publishes one answered debit-back; returns the tokens it settled.
    fn debited_back(
        &self,
        store: &dyn TokenStore,
        events: &Outbox,
        d: &Debit,
        outcome: DebitOutcome,
    ) -> f64 {
        match outcome {
            DebitOutcome::Settled(s) => {
                self.metrics.local_debited_back.inc_by(d.cost);
                events.publish(&Event::DebitBack(DebitedBack {
                    key_hash: &d.key,
                    bucket: d.bucket,
                    request_id: &d.request_id,
                    amount: d.cost,
                    balance: (!s.replayed).then_some(s.remaining),
                    tier: &s.tier,
                    grants: &s.grants,
                    id: uuid::Uuid::now_v7(),
                    store: store.backend(),
                }));
                d.cost
            }
            // The key lost its tier (unknown keys refused), or the id was taken by another
            // request: nothing to charge it to.
            other => {
                tracing::warn!(outcome = ?other, "debit-back not charged: dropped");
                0.0
            }
        }
    }

    /// Recomputes whether anything is owed.
    fn update_owing(&self) {
        let st = self.state.lock();
        let owing = !st.owed.is_empty()
            || !st.uncertain.is_empty()
            || !st.unpaid.is_empty()
            || st.buckets.values().any(|b| b.pending > 0.0);
        self.owing.store(owing, Ordering::Relaxed);
        if !owing {
            // Float sums drift: nothing owed is exactly 0.
            self.metrics.local_pending_tokens.set(0.0);
        }
    }

    fn next_id(&self, kind: BucketKind) -> RequestId {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let k = match kind {
            BucketKind::Main => 'm',
            BucketKind::Operational => 'o',
        };
        RequestId::parse(&format!("{}-{seq}-{k}", self.id_prefix))
            .unwrap_or_else(|_| RequestId::generate())
    }

    /// Whether local spending is owed to the shared buckets.
    pub fn owing(&self) -> bool {
        self.owing.load(Ordering::Relaxed)
    }

    /// The reconciler (and the heartbeat, with `wiring.heartbeat`): every tick, and whenever
    /// a store decision succeeds while something is owed, debits back what is owed; with the
    /// heartbeat, says this daemon is alive and takes the node count from the answer. At
    /// shutdown, one last debit-back is tried.
    pub async fn run(self: Arc<Self>, wiring: Reconciler, mut shutdown: Shutdown) {
        let Reconciler {
            store,
            events,
            node,
            heartbeat,
            tick,
            timeout,
        } = wiring;
        loop {
            if heartbeat {
                // A node that misses two beats is no longer counted.
                match tokio::time::timeout(timeout.max(tick), store.heartbeat(&node, tick * 3))
                    .await
                {
                    Ok(Ok(n)) => self.set_nodes(n),
                    Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat failed"),
                    Err(_) => tracing::debug!("heartbeat timed out"),
                }
            }
            if self.owing() {
                match self.reconcile(store.as_ref(), &events, timeout).await {
                    Ok(tokens) if tokens > 0.0 => {
                        tracing::info!(tokens, "local spending debited back");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "debit-back deferred"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.wake.notified() => {}
                () = shutdown.requested() => break,
            }
        }
        if self.owing() {
            match self.reconcile(store.as_ref(), &events, timeout).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    tokens = self.pending(),
                    "stopping with local spending not debited back"
                ),
            }
        }
    }
}

/// What the reconciler works with.
#[derive(Debug)]
pub struct Reconciler {
    /// The shared buckets.
    pub store: Arc<dyn TokenStore>,
    /// Where the debit-backs are published (the audit ledger).
    pub events: Outbox,
    /// This daemon's name in the heartbeat set ([`node_id`]).
    pub node: String,
    /// Keep the heartbeat (the node count is not fixed by `store.local_nodes`).
    pub heartbeat: bool,
    /// `store.heartbeat_ms`.
    pub tick: Duration,
    /// Bound on one store call.
    pub timeout: Duration,
}

impl State {
    /// Drops buckets refill alone would have filled (as the stores forget theirs) and that owe
    /// nothing, at most once per `max_keys / 8` inserts.
    fn sweep(&mut self, now: f64, window: f64, max_keys: usize) {
        if self.inserts_since_sweep < (max_keys / 8).max(1) && self.inserts_since_sweep != 0 {
            return;
        }
        self.inserts_since_sweep = 0;
        let owed = &self.owed;
        self.buckets.retain(|slot, b| {
            b.pending > 0.0
                || owed.contains_key(slot)
                || debit::forget_after(&b.share, window, b.state.balance)
                    .is_none_or(|secs| b.state.updated_at + secs > now)
        });
    }
}

/// This daemon's name in the heartbeat set: the audit ledger's node name (`[ledger] node`,
/// else `$NODE_NAME`, else the host name) and the listen address, so that two daemons on one
/// host count as two.
pub fn node_id(configured: &str, listen: std::net::SocketAddr) -> String {
    format!("{} {listen}", crate::ledger::node_name(configured))
}

/// The forced debit that charges `amount` of local spending to a key's shared bucket, under
/// its debit-back id. The same id and amount give the same debit (so a retry is a replay).
pub fn debit_back(key: KeyHash, bucket: BucketKind, request_id: RequestId, amount: f64) -> Debit {
    Debit {
        key,
        bucket,
        cost: amount,
        // No endpoint: bound to the amount, under a method no request has.
        fingerprint: Fingerprint::of(bucket, Some("DEBIT-BACK"), "", amount),
        request_id,
        force: true,
        terms: crate::store::SettleTerms::default(),
        candidate: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Config;
    use crate::key::ApiKey;
    use crate::store::MemoryStore;

    fn budget(nodes: u32, max_keys: usize) -> (LocalBudget, ManualClock, Metrics) {
        let clock = ManualClock::at(1000.0);
        let metrics = Metrics::new();
        let local = LocalBudget::new(
            Config::default().budget_policy(),
            Arc::new(clock.clone()),
            nodes,
            max_keys,
            "node-a 127.0.0.1:8080",
            metrics.clone(),
        );
        (local, clock, metrics)
    }

    /// A local decision of a debit that was never sent to the store.
    fn ask(local: &LocalBudget, key: &KeyHash, bucket: BucketKind, cost: f64) -> LocalOutcome {
        local.decide(
            &request(*key, bucket, cost, &uuid::Uuid::new_v4().to_string()),
            false,
        )
    }

    fn request(key: KeyHash, bucket: BucketKind, cost: f64, id: &str) -> Debit {
        Debit {
            key,
            bucket,
            cost,
            request_id: RequestId::parse(id).expect("id"),
            fingerprint: Fingerprint::of(bucket, Some("GET"), "/x", cost),
            force: false,
            terms: crate::store::SettleTerms::default(),
            candidate: None,
        }
    }

    fn key(name: &str) -> KeyHash {
        ApiKey::parse(name).expect("key").hash()
    }

    fn decided(o: LocalOutcome) -> LocalDecision {
        match o {
            LocalOutcome::Decided(d) => d,
            other => panic!("not decided: {other:?}"),
        }
    }

    #[test]
    fn a_share_is_the_tier_divided_by_the_node_count() {
        // The default free tier: 1000 max, 10/s, starts at 800; 4 nodes: 250, 2.5/s, 200.
        let (local, clock, _) = budget(4, 100);
        let k = key("share");
        let first = decided(ask(&local, &k, BucketKind::Main, 150.0));
        assert!(first.allowed);
        assert_eq!(first.share.max_tokens, 250.0);
        assert_eq!(first.share.refill_per_sec, 2.5);
        assert_eq!(first.remaining, 50.0);
        let denied = decided(ask(&local, &k, BucketKind::Main, 60.0));
        assert!(!denied.allowed);
        // 10 tokens short at 2.5/s.
        assert_eq!(denied.retry_after_ms, Some(4000));
        clock.advance(4.0);
        assert!(decided(ask(&local, &k, BucketKind::Main, 60.0)).allowed);
        assert_eq!(local.pending(), 210.0);
        // Operational: 10 / 4.
        let ops = decided(ask(&local, &k, BucketKind::Operational, 1.0));
        assert_eq!(ops.share.max_tokens, 2.5);
    }

    #[test]
    fn a_remembered_tier_is_used_and_unknown_keys_stay_out_when_refused() {
        let mut config = Config::default();
        config.tiers.insert(
            "pro".into(),
            crate::config::TierConfig {
                max_tokens: 10_000.0,
                refill_per_sec: 100.0,
                idle_cap: 0.8,
                initial_tokens: None,
                shadow: false,
                grant_ceiling: None,
                low_balance: Vec::new(),
                quota: None,
            },
        );
        let local = LocalBudget::new(
            config.budget_policy(),
            Arc::new(ManualClock::at(0.0)),
            2,
            100,
            "n",
            Metrics::new(),
        );
        let k = key("pro-key");
        local.seen(&k, "pro");
        // Pro: 10000 max, starts at 8000 (idle cap 0.8); half of it here.
        let d = decided(ask(&local, &k, BucketKind::Main, 1.0));
        assert_eq!(d.tier, "pro");
        assert_eq!(d.share.initial_tokens, 4000.0);

        let mut config = Config::default();
        config.budget.unknown_keys = crate::config::UnknownKeyPolicy::Reject;
        let strict = LocalBudget::new(
            config.budget_policy(),
            Arc::new(ManualClock::at(0.0)),
            2,
            100,
            "n",
            Metrics::new(),
        );
        assert_eq!(
            ask(&strict, &key("never-seen"), BucketKind::Main, 1.0),
            LocalOutcome::Unknown
        );
    }

    #[test]
    fn the_key_cap_bites_and_forgotten_buckets_make_room() {
        let (local, clock, metrics) = budget(1, 2);
        assert!(decided(ask(&local, &key("a"), BucketKind::Main, 1.0)).allowed);
        assert!(decided(ask(&local, &key("b"), BucketKind::Main, 1.0)).allowed);
        assert_eq!(
            ask(&local, &key("c"), BucketKind::Main, 1.0),
            LocalOutcome::Untracked
        );
        assert_eq!(local.tracked(), 2);
        assert_eq!(
            metrics
                .local_decisions
                .with_label_values(&["untracked"])
                .get(),
            1
        );
        // Both owe their spending: even long after, they are kept until debited back.
        clock.advance(10_000.0);
        assert_eq!(
            ask(&local, &key("c"), BucketKind::Main, 1.0),
            LocalOutcome::Untracked
        );
        // Debited back, and refilled long ago: forgotten, which makes room.
        let store = MemoryStore::new(Config::default().budget_policy(), Arc::new(clock.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(local.reconcile(&store, &Outbox::new(), Duration::from_secs(1)))
            .expect("store answers");
        assert!(decided(ask(&local, &key("c"), BucketKind::Main, 1.0)).allowed);
        assert_eq!(local.tracked(), 1);
    }

    #[test]
    fn tier_memory_is_bounded() {
        let (local, _, _) = budget(1, 4);
        for i in 0..10 {
            local.seen(&key(&format!("k{i}")), "pro");
        }
        let tiers = local.tiers.lock();
        assert!(tiers.recent.len() + tiers.older.len() <= 4);
        assert!(tiers.recent.contains_key(&key("k9")));
    }

    #[tokio::test]
    async fn spending_is_debited_back_once_even_below_zero() {
        let config = Config::default();
        let clock = ManualClock::at(1000.0);
        let store = MemoryStore::new(config.budget_policy(), Arc::new(clock.clone()));
        let (local, _, metrics) = budget(2, 100);
        let k = key("owed");
        // The shared bucket: 800 at first, 700 spent through the store.
        let spent = debit_back(
            k,
            BucketKind::Main,
            RequestId::parse("x").expect("id"),
            700.0,
        );
        store
            .debit(&Debit {
                force: false,
                ..spent
            })
            .await
            .expect("debit");
        // Locally: 400 (half of 800) in two requests.
        for _ in 0..2 {
            assert!(decided(ask(&local, &k, BucketKind::Main, 200.0)).allowed);
        }
        assert!(local.owing());
        let total = local
            .reconcile(&store, &Outbox::new(), Duration::from_secs(1))
            .await
            .expect("store answers");
        assert_eq!(total, 400.0);
        assert!(!local.owing());
        assert_eq!(metrics.local_debited_back.get(), 400.0);
        assert_eq!(metrics.local_pending_tokens.get(), 0.0);
        // Nothing left: a second round charges nothing.
        assert_eq!(
            local
                .reconcile(&store, &Outbox::new(), Duration::from_secs(1))
                .await
                .expect("store answers"),
            0.0
        );
        // 800 - 700 - 400 = -300: the key waits for refill.
        let probe = Debit {
            force: false,
            request_id: RequestId::parse("probe").expect("id"),
            ..debit_back(k, BucketKind::Main, RequestId::parse("p").expect("id"), 1.0)
        };
        match store.debit(&probe).await.expect("debit") {
            DebitOutcome::Settled(s) => {
                assert!(!s.allowed);
                assert_eq!(s.remaining, -300.0);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A store call that timed out may still land (a frozen Redis runs it once it runs
    /// again): the debit-back of its local admission is then a replay, and a local denial
    /// the store charged is refunded.
    #[tokio::test]
    async fn a_request_whose_call_landed_late_is_charged_once() {
        let config = Config::default();
        let clock = ManualClock::at(1000.0);
        let store = MemoryStore::new(config.budget_policy(), Arc::new(clock.clone()));
        let (local, _, metrics) = budget(2, 100);
        let k = key("late");
        let landed = request(k, BucketKind::Main, 100.0, "landed");
        let never = request(k, BucketKind::Main, 50.0, "never");
        let denied = request(k, BucketKind::Main, 500.0, "denied");
        // Locally: 400 to spend; the first two admitted, the third denied.
        for (d, allowed) in [(&landed, true), (&never, true), (&denied, false)] {
            assert_eq!(decided(local.decide(d, true)).allowed, allowed);
        }
        // The store ran two of the calls late: 800 - 100 - 500 = 200.
        for d in [&landed, &denied] {
            store.debit(d).await.expect("debit");
        }
        let total = local
            .reconcile(&store, &Outbox::new(), Duration::from_secs(1))
            .await
            .expect("store answers");
        assert_eq!(total, 150.0);
        assert_eq!(metrics.local_debited_back.get(), 150.0);
        assert!(!local.owing());
        // 800 - 100 (landed, once) - 50 (never, debited back); the denial refunded.
        let probe = request(k, BucketKind::Main, 1.0, "probe");
        match store.debit(&probe).await.expect("debit") {
            DebitOutcome::Settled(s) => assert_eq!(s.remaining, 649.0),
            other => panic!("{other:?}"),
        }
    }

    /// More keys than one batch of calls: every one is debited back, in one round.
    #[tokio::test]
    async fn many_keys_are_debited_back_in_batches() {
        let config = Config::default();
        let store = MemoryStore::new(config.budget_policy(), Arc::new(ManualClock::at(1000.0)));
        let (local, _, metrics) = budget(2, 10_000);
        let n = 3 * IN_FLIGHT + 5;
        for i in 0..n {
            let k = key(&format!("many-{i}"));
            assert!(decided(ask(&local, &k, BucketKind::Main, 10.0)).allowed);
            // And one whose call was sent and timed out.
            let sent = request(k, BucketKind::Main, 5.0, &format!("sent-{i}"));
            assert!(decided(local.decide(&sent, true)).allowed);
        }
        let total = local
            .reconcile(&store, &Outbox::new(), Duration::from_secs(1))
            .await
            .expect("store answers");
        assert_eq!(total, n as f64 * 15.0);
        assert!(!local.owing());
        assert_eq!(local.pending(), 0.0);
        assert_eq!(metrics.local_pending_tokens.get(), 0.0);
    }
}
