//! The in-process token store: the embedded single-node default, with the semantics of
//! `lua/debit.lua` (both call the arithmetic in `debit.rs`). Memory is bounded by forgetting
//! buckets and request records once they expire, like their Redis TTLs.
use super::{
    BucketKind, Debit, DebitOutcome, DeniedBy, GrantOutcome, GrantTerms, KeyState, QuotaPeriods,
    QuotaUse, RefundOutcome, SettleOutcome, Settled, StoreError, TokenStore, TrueCost,
};
use crate::budget::BudgetPolicy;
use crate::clock::Clock;
use crate::debit::{self, BucketState};
use crate::key::{KeyHash, RequestId};
use crate::wallet::{GrantMoves, Wallet, WalletGrant};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
struct Bucket {
    state: BucketState,
    /// `None`: kept forever (no refill).
    expires_at: Option<f64>,
}

#[derive(Debug, Clone)]
struct Record {
    bucket: BucketKind,
    remaining: f64,
    tier: String,
    cost: f64,
    max_tokens: f64,
    refunded: bool,
    /// A forced debit (not refundable).
    forced: bool,
    /// What the request id is bound to.
    fingerprint: super::Fingerprint,
    /// What a settle may use: the units, the endpoint's `max_cost`.
    terms: super::SettleTerms,
    /// Once settled: what it was settled at.
    settled: Option<SettledAt>,
    /// The start of the calendar-quota period it was charged in (`lua/debit.lua` field 4).
    quota_start: Option<f64>,
    expires_at: f64,
}

/// A settle, as its request record keeps it (`lua/settle.lua` fields 12-16).
#[derive(Debug, Clone, Copy)]
struct SettledAt {
    /// The true cost asked for (before the cap): a second settle at it is a replay.
    requested: f64,
    /// The estimate first charged.
    estimate: f64,
    /// Tokens moved (negative: credited).
    moved: f64,
    /// The balance afterwards.
    balance: f64,
    capped: bool,
}

/// A grant, as its record keeps it: (balance left, tier, record expiry, the grant's expiry).
type GrantRecord = (f64, String, f64, Option<f64>);

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<(KeyHash, u8), Bucket>,
    tiers: HashMap<KeyHash, String>,
    records: HashMap<(KeyHash, String), Record>,
    /// Applied grants by id, so a retried grant is a replay.
    grants: HashMap<(KeyHash, String), GrantRecord>,
    /// Keys' wallets of expiring or prioritised grants ([`crate::wallet`]); never empty.
    wallets: HashMap<KeyHash, Wallet>,
    /// Calendar-quota usage per key: (period start, used, expiry at the period's end).
    quotas: HashMap<KeyHash, (f64, f64, f64)>,
    /// Shared budget members' own buckets (`key_limit`), by member key.
    limits: HashMap<KeyHash, Bucket>,
    /// The shadow candidate policy's buckets ([`crate::shadow`]), by account (the key's, or
    /// its shared budget's): `lua/debit.lua`'s `ptc:{…}:b`.
    candidates: HashMap<KeyHash, Bucket>,
    ops_since_sweep: usize,
    /// Entries left by the previous sweep: the next one comes after as many operations, so a
    /// sweep's O(n) cost is spread over at least n operations.
    size_after_sweep: usize,
}

/// In-process [`TokenStore`].
#[derive(Debug)]
pub struct MemoryStore {
    /// Swapped whole by a config reload; read once per call.
    policy: ArcSwap<BudgetPolicy>,
    clock: Arc<dyn Clock>,
    /// The state, in [`SHARDS`] shards by account ([`MemoryStore::shard`]): a call locks
    /// one shard, so calls about other accounts do not wait, and a shard's map growth and
    /// expiry sweep stall only its own accounts' calls, for 1/[`SHARDS`] of the work.
    shards: Box<[Mutex<State>]>,
    /// Most request records one shard keeps (`store.memory_max_records` / [`SHARDS`]).
    max_records_per_shard: usize,
    /// Request records dropped for the cap ([`TokenStore::records_evicted`]).
    evicted: AtomicU64,
}

/// Records looked at to choose one to drop when a shard is full: the soonest to expire of
/// these goes (sampled, as Redis's own eviction: no O(n) scan under the lock).
const EVICTION_SAMPLE: usize = 8;

/// Shards of the embedded store's state (a power of two).
pub const SHARDS: usize = 64;

/// Whose state a call about one key touches: the key's own, or its shared budget's
/// ([`crate::budget::SharedBudget`]; its state is kept under the budget's account hash, a
/// member's request records under "<member hash>:<request id>").
struct Account {
    hash: KeyHash,
    shared: Option<Arc<crate::budget::SharedBudget>>,
}

impl Account {
    /// The account a call about `key` touches under `policy`: a member's main bucket is its
    /// budget's; its operational bucket its own, under the budget's tier.
    fn of(policy: &BudgetPolicy, key: &KeyHash, bucket: BucketKind) -> Self {
        match policy.shared.of(key) {
            Some(b) => Self {
                hash: match bucket {
                    BucketKind::Main => b.account(),
                    BucketKind::Operational => *key,
                },
                shared: Some(b.clone()),
            },
            None => Self {
                hash: *key,
                shared: None,
            },
        }
    }

    /// The request record's id: per key, also in a shared budget.
    fn record(&self, key: &KeyHash, request_id: &RequestId) -> (KeyHash, String) {
        match self.shared {
            Some(_) => (
                self.hash,
                format!("{}:{}", key.to_hex(), request_id.as_str()),
            ),
            None => (self.hash, request_id.as_str().to_owned()),
        }
    }

    /// The tier the account is charged under: a shared budget's own, else the key's.
    fn tier<'p>(
        &self,
        policy: &'p BudgetPolicy,
        tiers: &HashMap<KeyHash, String>,
    ) -> Option<&'p crate::budget::Tier> {
        match &self.shared {
            Some(b) => policy.tier(&b.tier),
            None => policy.resolve(tiers.get(&self.hash).map(String::as_str)),
        }
    }
}

/// Turns an allowed debit into a denial that charges nothing (another limit refused it): the
/// bucket keeps its refilled balance, as any denial, and the wallet loses only what expired.
/// Returns the wallet to write back.
fn refuse(
    s: &mut debit::Settlement,
    moves: &mut GrantMoves,
    stored_wallet: Option<Wallet>,
    refilled: f64,
    now: f64,
) -> Option<Wallet> {
    s.allowed = false;
    s.state = BucketState {
        balance: refilled,
        updated_at: now,
    };
    moves.spent.clear();
    stored_wallet.map(|mut w| {
        w.expire(now);
        w
    })
}

fn slot(kind: BucketKind) -> u8 {
    match kind {
        BucketKind::Main => 0,
        BucketKind::Operational => 1,
    }
}

impl MemoryStore {
    /// A store applying `policy`, reading time from `clock`.
    pub fn new(policy: BudgetPolicy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(State::default())).collect(),
            max_records_per_shard: 4_000_000 / SHARDS,
            evicted: AtomicU64::new(0),
        }
    }

    /// Quota usage of `key` in the period starting at `start`, `None` when none is kept for it.
    fn quota_used(st: &State, key: &KeyHash, now: f64) -> Option<(f64, f64)> {
        st.quotas.get(key).filter(|q| q.2 > now).map(|q| (q.0, q.1))
    }

    /// Moves the quota usage of the period a request was charged in by `delta` (a refund, a
    /// settle); usage of another period is left alone.
    fn adjust_quota(st: &mut State, key: &KeyHash, record: &Record, now: f64, delta: f64) {
        let Some(start) = record.quota_start else {
            return;
        };
        if let Some((s, used)) = crate::quota::adjust(Self::quota_used(st, key, now), start, delta)
            && let Some(q) = st.quotas.get_mut(key)
        {
            (q.0, q.1) = (s, used);
        }
    }

    /// At most `max` request records in all (at least one per shard): beyond it, one is
    /// dropped for each new one ([`TokenStore::records_evicted`] counts them).
    pub fn with_max_records(mut self, max: usize) -> Self {
        self.max_records_per_shard = (max / SHARDS).max(1);
        self
    }

    /// Number of request records held (for tests of the memory bound).
    pub fn record_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().records.len()).sum()
    }

    /// Number of buckets held (for tests of the memory bound).
    pub fn bucket_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().buckets.len()).sum()
    }

    /// The shard holding everything about `account` (its buckets, records, grants, wallet,
    /// quota, its members' key limits, its candidate bucket, its tier assignment): what one
    /// call touches is always in one shard. SHA-256 bytes are uniform, so the first one picks.
    fn shard(&self, account: &KeyHash) -> &Mutex<State> {
        &self.shards[usize::from(account.0[0]) % SHARDS]
    }
}

impl State {
    /// Drops expired entries, every so often (O(1) amortised per operation: after as many of
    /// the shard's own operations as it held entries; a shard is 1/SHARDS of the store, so a
    /// sweep holds up only its accounts, for a 64th of the work).
    fn sweep(&mut self, now: f64) {
        self.ops_since_sweep += 1;
        if self.ops_since_sweep < 16.max(self.size_after_sweep) {
            return;
        }
        self.ops_since_sweep = 0;
        self.buckets
            .retain(|_, b| b.expires_at.is_none_or(|at| at > now));
        self.records.retain(|_, r| r.expires_at > now);
        self.grants.retain(|_, g| g.2 > now);
        self.quotas.retain(|_, q| q.2 > now);
        self.limits
            .retain(|_, b| b.expires_at.is_none_or(|at| at > now));
        self.candidates
            .retain(|_, b| b.expires_at.is_none_or(|at| at > now));
        self.size_after_sweep = self.buckets.len()
            + self.records.len()
            + self.grants.len()
            + self.quotas.len()
            + self.candidates.len();
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn debit(&self, d: &Debit) -> Result<DebitOutcome, StoreError> {
        let periods = match d.bucket {
            BucketKind::Main => QuotaPeriods::around(&self.policy.load(), self.clock.now()),
            BucketKind::Operational => QuotaPeriods::default(),
        };
        self.debit_in_periods(d, &periods).await
    }

    async fn debit_in_periods(
        &self,
        d: &Debit,
        periods: &QuotaPeriods,
    ) -> Result<DebitOutcome, StoreError> {
        super::check_cost(d.cost)?;
        if let Some(c) = d.candidate {
            super::check_cost(c)?;
        }
        let now = self.clock.now();
        let policy = self.policy.load();
        let account = Account::of(&policy, &d.key, d.bucket);
        let mut st = self.shard(&account.hash).lock();
        st.sweep(now);
        let record_key = account.record(&d.key, &d.request_id);
        // The rules of `lua/debit.lua`: another request under this id is a conflict, a retry
        // is answered from the record, a refunded request is charged again.
        if let Some(r) = st.records.get(&record_key).filter(|r| r.expires_at > now) {
            if r.fingerprint != d.fingerprint {
                return Ok(DebitOutcome::Conflict);
            }
            if !r.refunded {
                return Ok(DebitOutcome::Settled(Settled {
                    allowed: true,
                    remaining: r.remaining,
                    retry_after_ms: Some(0),
                    tier: r.tier.clone(),
                    cost: r.cost,
                    replayed: true,
                    at: None,
                    grants: GrantMoves::default(),
                    quota: None,
                    denied_by: None,
                    candidate: None,
                }));
            }
        }
        let Some(tier) = account.tier(&policy, &st.tiers) else {
            return Ok(DebitOutcome::UnknownKey);
        };
        let params = match d.bucket {
            BucketKind::Main => tier.bucket,
            BucketKind::Operational => policy.operational,
        };
        let window = policy.active_window.as_secs_f64();
        let bucket_key = (account.hash, slot(d.bucket));
        let previous = st
            .buckets
            .get(&bucket_key)
            .filter(|b| b.expires_at.is_none_or(|at| at > now))
            .map(|b| b.state);
        // The main bucket pays after the key's wallet grants; the operational one alone.
        let stored_wallet = match d.bucket {
            BucketKind::Main => st.wallets.get(&account.hash).cloned(),
            BucketKind::Operational => None,
        };
        let mut wallet = stored_wallet.clone();
        let (mut s, mut moves) = match wallet.as_mut() {
            Some(w) => debit::debit_with_wallet(previous, &params, window, now, d.cost, d.force, w),
            None if d.force => (
                debit::force(previous, &params, window, now, d.cost),
                GrantMoves::default(),
            ),
            None => (
                debit::settle(previous, &params, window, now, d.cost),
                GrantMoves::default(),
            ),
        };
        let refilled = || debit::refilled(previous, &params, window, now);
        // QUOTA: the rule of `lua/debit.lua`'s quota block, decided before anything is written.
        let quota = match (d.bucket, periods.of(&tier.name)) {
            (BucketKind::Main, Some((amount, bounds))) => {
                let stored = Self::quota_used(&st, &account.hash, now);
                let q = crate::quota::decide(&bounds, stored, now, amount, d.cost, d.force)
                    .map_err(|e| StoreError::Rejected(e.to_string()))?;
                Some((q, amount))
            }
            _ => None,
        };
        let mut denied_by = (!s.allowed).then_some(DeniedBy::Bucket);
        if let Some((q, amount)) = quota
            && !q.allows
        {
            let at_reset = crate::quota::retry_after_ms(&q, now, amount, d.cost);
            (denied_by, s.retry_after_ms) = if s.allowed {
                (Some(DeniedBy::Quota), at_reset)
            } else {
                (
                    Some(DeniedBy::Both),
                    s.retry_after_ms.zip(at_reset).map(|(a, b)| a.max(b)),
                )
            };
            // Neither is charged.
            wallet = refuse(&mut s, &mut moves, stored_wallet.clone(), refilled(), now);
        }
        // KEY LIMIT: a shared budget member's own bucket (no idle cap), beside the budget.
        let limit = account
            .shared
            .as_ref()
            .and_then(|b| b.key_limit)
            .filter(|_| d.bucket == BucketKind::Main);
        let limit_balance = limit.map(|l| {
            let stored = st
                .limits
                .get(&d.key)
                .filter(|b| b.expires_at.is_none_or(|at| at > now));
            debit::refilled(stored.map(|b| b.state), &l, f64::INFINITY, now)
        });
        if let (Some(l), Some(lb)) = (limit, limit_balance)
            && s.allowed
            && !(d.force || lb >= d.cost)
        {
            denied_by = Some(DeniedBy::KeyLimit);
            s.retry_after_ms = (d.cost <= l.max_tokens)
                .then(|| ((d.cost - lb) / l.refill_per_sec * 1000.0).ceil() as u64);
            wallet = refuse(&mut s, &mut moves, stored_wallet, refilled(), now);
        }
        if let (Some(l), Some(lb)) = (limit, limit_balance)
            && s.allowed
        {
            let left = lb - d.cost;
            st.limits.insert(
                d.key,
                Bucket {
                    state: BucketState {
                        balance: left,
                        updated_at: now,
                    },
                    expires_at: Some(now + (l.max_tokens - left) / l.refill_per_sec + 1.0),
                },
            );
        }
        let quota_use = quota.map(|(q, amount)| {
            let used = if s.allowed { q.used + d.cost } else { q.used };
            QuotaUse {
                used,
                amount,
                resets_at: q.end,
                resets_in_ms: ((q.end - now) * 1000.0).ceil().max(0.0) as u64,
            }
        });
        if s.allowed
            && let Some((q, _)) = quota
        {
            st.quotas
                .insert(account.hash, (q.start, q.used + d.cost, q.end));
        }
        let held = wallet.as_ref().map_or(0.0, Wallet::total);
        match wallet {
            Some(w) if !w.is_empty() => {
                st.wallets.insert(account.hash, w);
            }
            Some(_) => {
                st.wallets.remove(&account.hash);
            }
            None => {}
        }
        st.buckets.insert(
            bucket_key,
            Bucket {
                state: s.state,
                expires_at: debit::forget_after(&params, window, s.state.balance)
                    .map(|secs| now + secs),
            },
        );
        if s.allowed && d.remembered(&policy) {
            if st.records.len() >= self.max_records_per_shard
                && !st.records.contains_key(&record_key)
            {
                // No sweep here: a full shard of live records would make every insert an
                // O(n) scan. Expired records go by the amortised sweep; a live one by sample.
                let victim = st
                    .records
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by(|a, b| a.1.expires_at.total_cmp(&b.1.expires_at))
                    .map(|(k, _)| k.clone());
                if let Some(victim) = victim {
                    st.records.remove(&victim);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
            st.records.insert(
                record_key,
                Record {
                    bucket: d.bucket,
                    remaining: s.state.balance + held,
                    tier: tier.name.clone(),
                    cost: d.cost,
                    max_tokens: params.max_tokens,
                    refunded: false,
                    forced: d.force,
                    fingerprint: d.fingerprint.clone(),
                    terms: d.terms,
                    settled: None,
                    quota_start: quota.map(|(q, _)| q.start),
                    expires_at: now
                        + if d.terms.reserve {
                            policy.settle_ttl
                        } else {
                            policy.idempotency_ttl
                        }
                        .as_secs_f64(),
                },
            );
        }
        // CANDIDATE: the shadow candidate's own plain bucket (`lua/debit.lua`'s CANDIDATE
        // block), decided beside the real debit, which it never changes.
        let candidate = match (d.candidate, d.bucket, d.force) {
            (Some(cost), BucketKind::Main, false) => {
                policy.candidate_bucket(&tier.name).map(|params| {
                    let previous = st
                        .candidates
                        .get(&account.hash)
                        .filter(|b| b.expires_at.is_none_or(|at| at > now))
                        .map(|b| b.state);
                    let c = debit::settle(previous, &params, window, now, cost);
                    st.candidates.insert(
                        account.hash,
                        Bucket {
                            state: c.state,
                            expires_at: debit::forget_after(&params, window, c.state.balance)
                                .map(|secs| now + secs),
                        },
                    );
                    super::CandidateOutcome {
                        allowed: c.allowed,
                        remaining: c.state.balance,
                    }
                })
            }
            _ => None,
        };
        Ok(DebitOutcome::Settled(Settled {
            allowed: s.allowed,
            remaining: s.state.balance + held,
            retry_after_ms: s.retry_after_ms,
            tier: tier.name.clone(),
            cost: d.cost,
            replayed: false,
            at: Some(now),
            grants: moves,
            quota: quota_use,
            denied_by,
            candidate,
        }))
    }

    async fn refund(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, StoreError> {
        let now = self.clock.now();
        let policy = self.policy.load();
        let account = Account::of(&policy, key, BucketKind::Main);
        let mut st = self.shard(&account.hash).lock();
        let record_key = account.record(key, request_id);
        let Some(record) = st
            .records
            .get(&record_key)
            .filter(|r| r.expires_at > now)
            .cloned()
        else {
            return Ok(RefundOutcome::UnknownRequest);
        };
        if record.bucket != BucketKind::Main || record.forced {
            return Ok(RefundOutcome::NotRefundable);
        }
        if record.refunded {
            return Ok(RefundOutcome::AlreadyRefunded);
        }
        let (credited, balance, as_of) = match st
            .buckets
            .get_mut(&(account.hash, slot(BucketKind::Main)))
            .filter(|b| b.expires_at.is_none_or(|at| at > now))
        {
            Some(bucket) => {
                let before = bucket.state.balance;
                bucket.state.balance = debit::credit(before, record.max_tokens, record.cost);
                (
                    bucket.state.balance - before,
                    bucket.state.balance,
                    Some(bucket.state.updated_at),
                )
            }
            None => (0.0, 0.0, None),
        };
        Self::adjust_quota(&mut st, &account.hash, &record, now, -record.cost);
        if let Some(r) = st.records.get_mut(&record_key) {
            r.refunded = true;
        }
        Ok(RefundOutcome::Refunded {
            credited,
            balance,
            tier: record.tier,
            as_of,
            now,
        })
    }

    async fn settle(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
        cost: TrueCost,
    ) -> Result<SettleOutcome, StoreError> {
        cost.check()?;
        let now = self.clock.now();
        let policy = self.policy.load();
        let account = Account::of(&policy, key, BucketKind::Main);
        let mut st = self.shard(&account.hash).lock();
        st.sweep(now);
        let record_key = account.record(key, request_id);
        // The rules of `lua/settle.lua`.
        let Some(record) = st
            .records
            .get(&record_key)
            .filter(|r| r.expires_at > now)
            .cloned()
        else {
            return Ok(SettleOutcome::UnknownRequest);
        };
        if record.bucket != BucketKind::Main || record.forced {
            return Ok(SettleOutcome::NotSettleable);
        }
        if record.refunded {
            return Ok(SettleOutcome::AlreadyRefunded);
        }
        let estimate = record.settled.map_or(record.cost, |s| s.estimate);
        let requested = match cost {
            TrueCost::Tokens(c) => c,
            TrueCost::Units(u) => estimate / record.terms.units * u,
            TrueCost::UnitsReturned(u) => {
                estimate / record.terms.units * (record.terms.units - u).max(0.0)
            }
        };
        if let Some(s) = record.settled {
            if s.requested != requested {
                return Ok(SettleOutcome::Conflict { cost: record.cost });
            }
            return Ok(SettleOutcome::Settled {
                cost: record.cost,
                estimate,
                charged: s.moved,
                capped: s.capped,
                balance: s.balance,
                tier: record.tier,
                at: None,
                replayed: true,
            });
        }
        let Some(tier) = account
            .tier(&policy, &st.tiers)
            .or_else(|| policy.tier(&record.tier))
            .cloned()
        else {
            return Ok(SettleOutcome::UnknownKey);
        };
        let (charged_cost, capped) = match record.terms.max_cost {
            Some(max) if requested > max => (max, true),
            _ => (requested, false),
        };
        let window = policy.active_window.as_secs_f64();
        let bucket_key = (account.hash, slot(BucketKind::Main));
        let previous = st
            .buckets
            .get(&bucket_key)
            .filter(|b| b.expires_at.is_none_or(|at| at > now))
            .map(|b| b.state);
        let (state, moved) =
            debit::adjust(previous, &tier.bucket, window, now, charged_cost - estimate);
        st.buckets.insert(
            bucket_key,
            Bucket {
                state,
                expires_at: debit::forget_after(&tier.bucket, window, state.balance)
                    .map(|secs| now + secs),
            },
        );
        Self::adjust_quota(
            &mut st,
            &account.hash,
            &record,
            now,
            charged_cost - estimate,
        );
        if let Some(r) = st.records.get_mut(&record_key) {
            r.cost = charged_cost;
            r.settled = Some(SettledAt {
                requested,
                estimate,
                moved,
                balance: state.balance,
                capped,
            });
        }
        Ok(SettleOutcome::Settled {
            cost: charged_cost,
            estimate,
            charged: moved,
            capped,
            balance: state.balance,
            tier: tier.name,
            at: Some(now),
            replayed: false,
        })
    }

    async fn assign_tier(&self, key: &KeyHash, tier: Option<&str>) -> Result<(), StoreError> {
        let mut st = self.shard(key).lock();
        match tier {
            Some(name) => st.tiers.insert(*key, name.to_owned()),
            None => st.tiers.remove(key),
        };
        Ok(())
    }

    async fn grant_with(
        &self,
        key: &KeyHash,
        tokens: f64,
        grant_id: &RequestId,
        terms: GrantTerms,
    ) -> Result<GrantOutcome, StoreError> {
        super::check_cost(tokens)?;
        terms.check()?;
        let now = self.clock.now();
        let policy = self.policy.load();
        // A grant to a member of a shared budget tops up the budget.
        let account = Account::of(&policy, key, BucketKind::Main);
        let mut st = self.shard(&account.hash).lock();
        st.sweep(now);
        let grant_key = (account.hash, grant_id.as_str().to_owned());
        if let Some(g) = st.grants.get(&grant_key).filter(|g| g.2 > now) {
            return Ok(GrantOutcome::Granted {
                balance: g.0,
                tier: g.1.clone(),
                at: now,
                replayed: true,
                expires_at: g.3,
                expired: Vec::new(),
            });
        }
        let Some(tier) = account.tier(&policy, &st.tiers).cloned() else {
            return Ok(GrantOutcome::UnknownKey);
        };
        let window = policy.active_window.as_secs_f64();
        let bucket_key = (account.hash, slot(BucketKind::Main));
        let previous = st
            .buckets
            .get(&bucket_key)
            .filter(|b| b.expires_at.is_none_or(|at| at > now))
            .map(|b| b.state);
        // The rules of `lua/grant.lua`: refused whole (nothing changed, expired grants
        // included) over the ceiling, which counts the bucket and the wallet.
        let mut wallet = st.wallets.get(&account.hash).cloned().unwrap_or_default();
        let expired = wallet.expire(now);
        let held = wallet.total();
        let balance = debit::refilled(previous, &tier.bucket, window, now);
        if balance + held + tokens > tier.grant_ceiling {
            return Ok(GrantOutcome::OverCeiling {
                balance: balance + held,
                ceiling: tier.grant_ceiling,
                tier: tier.name,
            });
        }
        let expires_at = terms.expires_in.map(|s| now + s);
        if terms.in_wallet() {
            if wallet.contains(grant_id.as_str()) {
                return Ok(GrantOutcome::Granted {
                    balance: balance + held,
                    tier: tier.name,
                    at: now,
                    replayed: true,
                    expires_at,
                    expired: Vec::new(),
                });
            }
            if wallet.grants().len() >= crate::wallet::MAX_GRANTS {
                return Ok(GrantOutcome::TooManyGrants);
            }
            wallet.add(WalletGrant {
                id: grant_id.as_str().to_owned(),
                left: tokens,
                expires_at,
                priority: terms.priority.unwrap_or(0),
                granted_at: now,
            });
        } else {
            let state = BucketState {
                balance: balance + tokens,
                updated_at: now,
            };
            st.buckets.insert(
                bucket_key,
                Bucket {
                    state,
                    expires_at: debit::forget_after(&tier.bucket, window, state.balance)
                        .map(|secs| now + secs),
                },
            );
        }
        let after = balance + tokens + held;
        if wallet.is_empty() {
            st.wallets.remove(&account.hash);
        } else {
            st.wallets.insert(account.hash, wallet);
        }
        st.grants.insert(
            grant_key,
            (
                after,
                tier.name.clone(),
                now + policy.idempotency_ttl.as_secs_f64(),
                expires_at,
            ),
        );
        Ok(GrantOutcome::Granted {
            balance: after,
            tier: tier.name,
            at: now,
            replayed: false,
            expires_at,
            expired,
        })
    }

    async fn inspect(&self, key: &KeyHash) -> Result<KeyState, StoreError> {
        let now = self.clock.now();
        let policy = self.policy.load();
        let window = policy.active_window.as_secs_f64();
        // A member's balance, grants and quota are its shared budget's; its operational
        // bucket its own (in the key's shard, read first: two shards are never held at once).
        let account = Account::of(&policy, key, BucketKind::Main);
        let operational = self
            .shard(key)
            .lock()
            .buckets
            .get(&(*key, slot(BucketKind::Operational)))
            .filter(|b| b.expires_at.is_none_or(|at| at > now))
            .map(|b| b.state);
        let st = self.shard(&account.hash).lock();
        let bucket = |owner: &KeyHash, kind| {
            st.buckets
                .get(&(*owner, slot(kind)))
                .filter(|b| b.expires_at.is_none_or(|at| at > now))
                .map(|b| b.state)
        };
        let assigned = st.tiers.get(&account.hash).cloned();
        let tier = account.tier(&policy, &st.tiers);
        let main = bucket(&account.hash, BucketKind::Main);
        let mut wallet = st.wallets.get(&account.hash).cloned().unwrap_or_default();
        wallet.expire(now);
        Ok(KeyState {
            grants: wallet.grants().to_vec(),
            quota: tier.and_then(|t| {
                super::QuotaState::of(
                    &policy,
                    &t.name,
                    Self::quota_used(&st, &account.hash, now),
                    now,
                )
            }),
            tier: tier.map(|t| t.name.clone()),
            balance: tier.map(|t| debit::refilled(main, &t.bucket, window, now)),
            stored: main.is_some(),
            operational: debit::refilled(operational, &policy.operational, window, now),
            shared_budget: account.shared.as_ref().map(|b| b.name.clone()),
            assigned,
            at: now,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn records_evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn set_policy(&self, policy: &BudgetPolicy) -> Result<(), StoreError> {
        self.policy.store(Arc::new(policy.clone()));
        Ok(())
    }
}
