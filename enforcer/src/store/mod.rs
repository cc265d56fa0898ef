//! The token store boundary: where a key's buckets live and where a debit is made atomic.
//!
//! [`RedisStore`] (production: one `EVALSHA lua/debit.lua` per decision, Redis server time) and
//! [`MemoryStore`] (the embedded single-node default, same semantics through `debit.rs`) both
//! implement [`TokenStore`]; the integration tests run one contract against both.
mod memory;
mod redis;
pub mod redis_watch;

pub use memory::MemoryStore;
pub use redis::{
    CLUSTER_SHARDS, DEBIT_LUA, GRANT_LUA, HEARTBEAT_LUA, INSPECT_LUA, REFUND_LUA, RedisStore,
    RedisStoreConfig, SETTLE_LUA, slot_of,
};

use crate::key::{KeyHash, RequestId};
use async_trait::async_trait;

/// Which of a key's buckets a debit draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKind {
    /// The key's token budget.
    Main,
    /// The strict bucket of operational endpoints (`/health`, …), outside the token economy.
    Operational,
}

/// One debit to make.
#[derive(Debug, Clone)]
pub struct Debit {
    /// Whose budget.
    pub key: KeyHash,
    /// Which bucket.
    pub bucket: BucketKind,
    /// Tokens to charge: positive and finite (checked before it gets here, and again by the
    /// store: a bad cost is an error, never a debit).
    pub cost: f64,
    /// Idempotency token: a retry with the same id is not charged twice.
    pub request_id: RequestId,
    /// What the request id is bound to (see [`Fingerprint`]): the same id with another
    /// fingerprint is a [`DebitOutcome::Conflict`], never a free replay.
    pub fingerprint: Fingerprint,
    /// A forced debit: charged even when the balance cannot pay (it may go below zero), for
    /// spending that already happened (fail-soft local decisions debited back,
    /// [`crate::decision::local`]). Remembered under its request id like any allowed debit (a retry is a
    /// free replay); not refundable. `lua/debit.lua` gets it as bucket kind `M` / `O`.
    pub force: bool,
    /// What a later settle of this request may use ([`TokenStore::settle`]), kept in its
    /// request record.
    pub terms: SettleTerms,
    /// The shadow candidate policy's cost of this request ([`crate::shadow`]): debited from the
    /// key's candidate bucket in the same call, when the store's policy has a candidate, the
    /// bucket is the main one and the debit is not forced. It never changes the real outcome.
    /// `None`: no candidate is evaluated.
    pub candidate: Option<f64>,
}

impl Debit {
    /// Whether an allowed debit leaves a request record (for retries, refunds and settles).
    /// A request id the daemon generated cannot be retried by a client, so its record matters
    /// only for a refund or a settle under the returned id: without
    /// [`crate::budget::BudgetPolicy::remember_generated_ids`] it is written for reservations only, which
    /// saves one write (and a key that lives `idempotency_ttl`) per decision.
    pub fn remembered(&self, policy: &crate::budget::BudgetPolicy) -> bool {
        !self.request_id.is_generated() || self.terms.reserve || policy.remember_generated_ids
    }
}

/// What the shadow candidate policy would have decided ([`crate::shadow`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateOutcome {
    /// Whether the candidate bucket could pay the candidate cost (it was charged then).
    pub allowed: bool,
    /// The candidate bucket's balance afterwards.
    pub remaining: f64,
}

/// What a request's record keeps for its settle: the units it was priced for (a settle in
/// units charges the same price per unit), the endpoint's `max_cost`, and whether it is a
/// reservation (remembered for `settle_ttl` instead of the idempotency ttl).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SettleTerms {
    /// Units the cost was computed for (> 0).
    pub units: f64,
    /// The most a settle may charge for this request; `None`: no cap.
    pub max_cost: Option<f64>,
    /// A reservation: the record lives for the policy's `settle_ttl`.
    pub reserve: bool,
}

impl Default for SettleTerms {
    /// One unit, no cap, not a reservation.
    fn default() -> Self {
        Self {
            units: 1.0,
            max_cost: None,
            reserve: false,
        }
    }
}

/// The true cost of a request, as the settle gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrueCost {
    /// Tokens, >= 0.
    Tokens(f64),
    /// Units, >= 0: charged at the price per unit the request was charged at (its cost / its
    /// units).
    Units(f64),
    /// Units given back, >= 0 (Envoy's `is_negative_hits`): the true units are the units the
    /// request was checked with less these, floored at 0, charged as [`TrueCost::Units`].
    UnitsReturned(f64),
}

impl TrueCost {
    /// Rejects amounts no settle may charge: NaN, infinite, negative, above 10^15.
    pub fn check(self) -> Result<(), StoreError> {
        let (what, v) = match self {
            TrueCost::Tokens(v) => ("cost", v),
            TrueCost::Units(v) | TrueCost::UnitsReturned(v) => ("units", v),
        };
        if v.is_finite() && (0.0..=1e15).contains(&v) {
            Ok(())
        } else {
            Err(StoreError::Rejected(format!(
                "settle {what} must be finite, >= 0 and <= 1e15, got {v}"
            )))
        }
    }
}

/// What a settle did.
#[derive(Debug, Clone, PartialEq)]
pub enum SettleOutcome {
    /// The difference between the true cost and the estimate was charged (or credited).
    Settled {
        /// The true cost charged in all (after the `max_cost` cap).
        cost: f64,
        /// The estimate the request was charged at first.
        estimate: f64,
        /// Tokens charged now: `cost − estimate` when positive; when negative, the tokens
        /// credited back (as a negative number), which the cap at capacity may make smaller.
        charged: f64,
        /// True when the true cost asked for was above `max_cost` and `max_cost` was charged.
        capped: bool,
        /// The balance afterwards (may be below zero); for a replay, the first settle's.
        balance: f64,
        /// The tier the bucket was charged under.
        tier: String,
        /// The store's clock when the balance was settled; `None` for a replay.
        at: Option<f64>,
        /// True when this request was settled before at the same true cost: nothing charged
        /// now.
        replayed: bool,
    },
    /// No allowed request with this id is remembered for this key (never seen, denied, or
    /// expired: an unsettled reservation keeps its estimate).
    UnknownRequest,
    /// The request was settled before at another true cost: nothing changed.
    Conflict {
        /// The true cost it was settled at.
        cost: f64,
    },
    /// The request was refunded: there is nothing left to settle.
    AlreadyRefunded,
    /// Operational requests and forced debits are outside settlement.
    NotSettleable,
    /// A settle in units of a request whose record predates units: nothing changed.
    UnitsUnknown,
    /// The key has no tier now (its assignment was removed and unknown keys are refused).
    UnknownKey,
}

/// The parameters a request id is bound to, as payment APIs bind an idempotency key to its
/// request: bucket, method, (normalised) endpoint and units. With the key (the request record
/// lives under the key's hash) they determine the price; the record also keeps the cost
/// charged, and a retry is answered with it even when the pricing engine moved the price since.
///
/// 16 hex digits of SHA-256 over the fields: short enough for every request record, long enough
/// that a different request cannot pass for a retry by chance (2^-64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a request; `method` is `None` when the check named none.
    pub fn of(bucket: BucketKind, method: Option<&str>, endpoint: &str, units: f64) -> Self {
        Self::of_all(bucket, [(method, endpoint, units)])
    }

    /// The fingerprint of several requests decided together (Envoy's descriptors), in order;
    /// for one request it is [`Fingerprint::of`] that request.
    pub fn of_all<'a>(
        bucket: BucketKind,
        requests: impl IntoIterator<Item = (Option<&'a str>, &'a str, f64)>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(match bucket {
            BucketKind::Main => b"m\0".as_slice(),
            BucketKind::Operational => b"o\0".as_slice(),
        });
        for (i, (method, endpoint, units)) in requests.into_iter().enumerate() {
            if i > 0 {
                // A separator no method or endpoint contains (both are printable ASCII).
                h.update(b"\x1e");
            }
            h.update(method.unwrap_or("*").as_bytes());
            h.update(b"\0");
            h.update(endpoint.as_bytes());
            h.update(b"\0");
            h.update(units.to_bits().to_be_bytes());
        }
        Self(crate::key::lower_hex(&h.finalize()[..8]))
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the store decided.
#[derive(Debug, Clone, PartialEq)]
pub enum DebitOutcome {
    /// The key was charged (or would have been, but could not pay).
    Settled(Settled),
    /// The key has no tier assignment and unknown keys are refused.
    UnknownKey,
    /// The request id was used before by this key for a different request (another bucket,
    /// method, endpoint or units): refused, nothing charged.
    Conflict,
}

/// A settled debit.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    /// Whether the cost was charged.
    pub allowed: bool,
    /// Balance after the decision.
    pub remaining: f64,
    /// When denied: milliseconds until the cost is affordable, `None` if refill never covers it.
    pub retry_after_ms: Option<u64>,
    /// The tier the key was charged under.
    pub tier: String,
    /// The cost charged (for a replay: the cost recorded the first time).
    pub cost: f64,
    /// True when this is an idempotent replay of an earlier allowed request.
    pub replayed: bool,
    /// The store's clock (Redis `TIME`; the in-process store's clock) when the balance was
    /// settled, seconds since the Unix epoch: what `remaining` is as of. `None` for a replay
    /// (its `remaining` is the first decision's, not the balance now).
    pub at: Option<f64>,
    /// What the debit took from the key's wallet grants, and the grants it found expired
    /// ([`crate::wallet`]); empty for a replay and for keys without grants. `remaining` counts
    /// the grants left.
    pub grants: crate::wallet::GrantMoves,
    /// The tier's calendar quota as this debit left it; `None` when the tier has none, for
    /// the operational bucket, and for a replay.
    pub quota: Option<QuotaUse>,
    /// When denied: which limit refused (a denial charges neither).
    pub denied_by: Option<DeniedBy>,
    /// The shadow candidate's decision of the same request, when one was evaluated (never for
    /// a replay).
    pub candidate: Option<CandidateOutcome>,
}

/// A calendar quota after a debit ([`crate::quota`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct QuotaUse {
    /// Tokens used in the current period (after the debit when it was allowed).
    pub used: f64,
    /// The allowance per period.
    pub amount: f64,
    /// When the period ends and usage starts again at 0, seconds since the Unix epoch.
    pub resets_at: f64,
    /// Milliseconds from the store's clock at the debit to `resets_at`.
    pub resets_in_ms: u64,
}

/// Which limit refused a debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeniedBy {
    /// The token bucket cannot pay the cost.
    Bucket,
    /// The calendar quota cannot pay it.
    Quota,
    /// Neither can.
    Both,
    /// The budget and its quota could pay; the shared budget member's own `key_limit`
    /// cannot.
    KeyLimit,
}

impl DeniedBy {
    /// `lua/debit.lua`'s name of it.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bucket" => Some(Self::Bucket),
            "quota" => Some(Self::Quota),
            "both" => Some(Self::Both),
            "key_limit" => Some(Self::KeyLimit),
            _ => None,
        }
    }

    /// Whether the quota is among the refusers.
    pub fn quota(self) -> bool {
        matches!(self, Self::Quota | Self::Both)
    }
}

/// The period boundaries of every tier with a calendar quota, computed by the daemon at one
/// moment of its clock ([`crate::quota::Quota::boundaries`]). The store picks the period that
/// contains its own clock (Redis `TIME`), so the daemon's skew cannot pick a wrong one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaPeriods {
    /// (tier, amount, four consecutive period starts)
    pub tiers: Vec<(String, f64, [f64; 4])>,
}

impl QuotaPeriods {
    /// The boundaries around `now` (seconds since the Unix epoch) of every quota in `policy`.
    pub fn around(policy: &crate::budget::BudgetPolicy, now: f64) -> Self {
        Self {
            tiers: policy
                .tiers
                .iter()
                .filter_map(|t| {
                    t.quota
                        .map(|q| (t.name.clone(), q.amount, q.boundaries(now)))
                })
                .collect(),
        }
    }

    /// The amount and boundaries of `tier`'s quota, if it has one.
    pub fn of(&self, tier: &str) -> Option<(f64, [f64; 4])> {
        self.tiers
            .iter()
            .find(|(name, _, _)| name == tier)
            .map(|(_, amount, b)| (*amount, *b))
    }
}

/// What a refund did.
#[derive(Debug, Clone, PartialEq)]
pub enum RefundOutcome {
    /// Tokens given back (may be less than the cost when the bucket is near capacity).
    Refunded {
        /// Tokens credited.
        credited: f64,
        /// Balance afterwards, as of `as_of` (a refund keeps the bucket's refill clock).
        balance: f64,
        /// The tier the refunded request was charged under.
        tier: String,
        /// The store time `balance` holds for (the bucket's last update), seconds since the
        /// Unix epoch; `None` when the bucket was forgotten (it refilled past the cost: the
        /// balance is unknown, not 0).
        as_of: Option<f64>,
        /// The store's clock when the refund was made (Redis `TIME`).
        now: f64,
    },
    /// No allowed request with this id is remembered for this key (never seen, or expired).
    UnknownRequest,
    /// This request was refunded before.
    AlreadyRefunded,
    /// Operational requests are outside the token economy and are not refunded.
    NotRefundable,
}

/// How a grant is held: in the tier bucket (no expiry, no priority: spent last, kept for
/// ever), or in the key's wallet ([`crate::wallet`]) when it expires or has a priority.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrantTerms {
    /// Seconds from the store's clock at the grant until it expires.
    pub expires_in: Option<f64>,
    /// Spend priority (higher first); `None` with an expiry means 0.
    pub priority: Option<i64>,
}

impl GrantTerms {
    /// Whether the grant goes to the wallet (else it tops up the tier bucket).
    pub fn in_wallet(&self) -> bool {
        self.expires_in.is_some() || self.priority.is_some()
    }

    /// Rejects expiries no store may keep: not finite, not positive, above ten years.
    pub fn check(&self) -> Result<(), StoreError> {
        match self.expires_in {
            Some(s) if !(s.is_finite() && s > 0.0 && s <= 10.0 * 365.25 * 86_400.0) => {
                Err(StoreError::Rejected(format!(
                    "a grant's expiry must be > 0 s and at most 10 years, got {s} s"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// What an operator's grant did.
#[derive(Debug, Clone, PartialEq)]
pub enum GrantOutcome {
    /// The tokens were added to the key's main bucket.
    Granted {
        /// The balance afterwards.
        balance: f64,
        /// The tier the key is in.
        tier: String,
        /// The store's clock when the balance was settled (Redis `TIME`).
        at: f64,
        /// True when this grant id was applied before: nothing added now, `balance` is what
        /// the first application left.
        replayed: bool,
        /// When a wallet grant expires (store time); `None`: never, or a bucket grant.
        expires_at: Option<f64>,
        /// Wallet grants found expired while granting (their tokens are forfeited).
        expired: Vec<crate::wallet::GrantMove>,
    },
    /// The key's wallet holds [`crate::wallet::MAX_GRANTS`] grants already: nothing added.
    TooManyGrants,
    /// The key has no tier and unknown keys are refused: there is no budget to grant to.
    UnknownKey,
    /// The balance (bucket and wallet) would pass the tier's `grant_ceiling`: nothing added.
    OverCeiling {
        /// The balance now (bucket and wallet).
        balance: f64,
        /// The ceiling.
        ceiling: f64,
        /// The tier.
        tier: String,
    },
}

/// A key's state now, as `enforcer keys show` reports it. Reading it changes nothing.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyState {
    /// The tier assignment stored for the key, if any (it may name a tier the config no
    /// longer has).
    pub assigned: Option<String>,
    /// The tier the key is charged under now; `None`: an unknown key that is refused.
    pub tier: Option<String>,
    /// The main bucket's balance now (refill applied), or what a first request would start at.
    pub balance: Option<f64>,
    /// The key's live wallet grants, in spend order (spent before the bucket).
    pub grants: Vec<crate::wallet::WalletGrant>,
    /// Whether the main bucket exists in the store (false: never used, or forgotten).
    pub stored: bool,
    /// The operational bucket's balance now.
    pub operational: f64,
    /// The shared budget the key spends from (its balance, grants and quota are the
    /// budget's), if it is a member of one.
    pub shared_budget: Option<String>,
    /// The store's clock at the reading, seconds since the Unix epoch.
    pub at: f64,
    /// The tier's calendar quota now; `None` when the tier has none.
    pub quota: Option<QuotaState>,
}

/// A key's calendar quota now, as `enforcer keys show` reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct QuotaState {
    /// Tokens used in the current period.
    pub used: f64,
    /// Tokens left in it (never below 0; a settle or a forced debit may overrun the amount).
    pub left: f64,
    /// The allowance per period.
    pub amount: f64,
    /// When the current period started, seconds since the Unix epoch.
    pub period_start: f64,
    /// When it ends and usage starts again at 0.
    pub resets_at: f64,
}

impl QuotaState {
    /// The quota of `tier` in `policy` at the store's `now`, from the usage kept (`(period
    /// start, used)`; usage of another period counts as 0). `None` when the tier has none.
    pub fn of(
        policy: &crate::budget::BudgetPolicy,
        tier: &str,
        stored: Option<(f64, f64)>,
        now: f64,
    ) -> Option<Self> {
        let quota = policy.tier(tier)?.quota?;
        let d = crate::quota::decide(&quota.boundaries(now), stored, now, quota.amount, 0.0, true)
            .ok()?;
        Some(Self {
            used: d.used,
            left: (quota.amount - d.used).max(0.0),
            amount: quota.amount,
            period_start: d.start,
            resets_at: d.end,
        })
    }

    /// Parses the quota usage key's value (`"<period start> <used>"`).
    pub fn parse_stored(value: &str) -> Option<(f64, f64)> {
        let (start, used) = value.split_once(' ')?;
        Some((start.parse().ok()?, used.parse().ok()?))
    }
}

/// Errors of a token store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the arguments (a bug or bad input that slipped through).
    #[error("token store refused the request: {0}")]
    Rejected(String),
    /// The backend answered something this version does not understand.
    #[error("unexpected answer from the token store: {0}")]
    Protocol(String),
}

/// A place where buckets live and debits are atomic.
#[async_trait]
pub trait TokenStore: Send + Sync + std::fmt::Debug {
    /// Debits one request, atomically: concurrent debits of one key never spend a token twice.
    /// Calendar quotas are decided with the periods around the daemon's clock now.
    async fn debit(&self, debit: &Debit) -> Result<DebitOutcome, StoreError>;
    /// [`TokenStore::debit`] with the quota periods given (the lower-level call: tests pass
    /// periods computed for a clock near a boundary). When the store's clock is in none of a
    /// quota's periods, an error and nothing written.
    /// A store without quotas (a test double) refuses.
    async fn debit_in_periods(
        &self,
        debit: &Debit,
        periods: &QuotaPeriods,
    ) -> Result<DebitOutcome, StoreError> {
        let _ = (debit, periods);
        Err(StoreError::Rejected(format!(
            "the {} store does not take quota periods",
            self.backend()
        )))
    }
    /// Gives back the cost of an allowed request (by its id), at most once.
    async fn refund(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, StoreError>;
    /// Charges the true cost of an allowed request (by its id) in place of its estimate: the
    /// difference is debited (the balance may go below zero) or credited (capped like a
    /// refund), once; a second settle at the same true cost is a replay, at another a conflict.
    async fn settle(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
        cost: TrueCost,
    ) -> Result<SettleOutcome, StoreError>;
    /// Assigns a key to a tier (or removes the assignment with `None`).
    async fn assign_tier(&self, key: &KeyHash, tier: Option<&str>) -> Result<(), StoreError>;
    /// Adds an operator's grant of `tokens` to the key's main bucket, atomically with its
    /// debits, at most up to its tier's `grant_ceiling` (else nothing). `grant_id` makes a
    /// retried grant a replay.
    async fn grant(
        &self,
        key: &KeyHash,
        tokens: f64,
        grant_id: &RequestId,
    ) -> Result<GrantOutcome, StoreError> {
        self.grant_with(key, tokens, grant_id, GrantTerms::default())
            .await
    }
    /// [`TokenStore::grant`] with terms: a grant that expires or has a priority goes to the
    /// key's wallet ([`crate::wallet`]), spent before the bucket; the ceiling counts both.
    async fn grant_with(
        &self,
        key: &KeyHash,
        tokens: f64,
        grant_id: &RequestId,
        terms: GrantTerms,
    ) -> Result<GrantOutcome, StoreError>;
    /// The key's tier and balances now; writes nothing.
    async fn inspect(&self, key: &KeyHash) -> Result<KeyState, StoreError>;
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Says that the daemon `node` is alive for `ttl`, and answers how many daemons are
    /// (fail-soft local buckets split a key's budget by that count, [`crate::decision::local`]). A
    /// store only this process uses answers 1.
    async fn heartbeat(&self, node: &str, ttl: std::time::Duration) -> Result<u32, StoreError> {
        let _ = (node, ttl);
        Ok(1)
    }
    /// A short name for logs and `/readyz` ("redis", "redis-cluster", "memory").
    fn backend(&self) -> &'static str;
    /// Request records dropped before their time because the store's cap on them was reached
    /// (the in-process store's `store.memory_max_records`; Redis evicts by its own policy):
    /// a retry of such a request is charged again. Counted since start.
    fn records_evicted(&self) -> u64 {
        0
    }
    /// How many independent failure domains the store has: each gets its own circuit breaker
    /// (a cluster's slot groups; 1 for one Redis or the in-process store).
    fn shards(&self) -> usize {
        1
    }
    /// The failure domain of `key`, below [`TokenStore::shards`].
    fn shard(&self, _key: &KeyHash) -> usize {
        0
    }
    /// What `/readyz` shows about the backend beyond reachability (a cluster's state).
    async fn describe(&self) -> Option<serde_json::Value> {
        None
    }
    /// Applies a new budget policy (tiers, unknown keys, windows) from the next debit on: a
    /// config reload ([`crate::reload`]). Debits in flight finish under the policy they
    /// started with; buckets and tier assignments are kept. A store that cannot refuses.
    fn set_policy(&self, policy: &crate::budget::BudgetPolicy) -> Result<(), StoreError> {
        let _ = policy;
        Err(StoreError::Rejected(format!(
            "the {} store cannot change its budget policy while running",
            self.backend()
        )))
    }
}

/// Rejects costs no store may charge: NaN, infinite, zero or negative, absurdly large.
pub(crate) fn check_cost(cost: f64) -> Result<(), StoreError> {
    if cost.is_finite() && cost > 0.0 && cost <= 1e15 {
        Ok(())
    } else {
        Err(StoreError::Rejected(format!(
            "cost must be finite, > 0 and <= 1e15, got {cost}"
        )))
    }
}
