//! Tiers and the budget policy: what a key may spend and how fast it earns it back.
//!
//! Built from the `[budget]` and `[tiers.*]` config sections (validated there); the token
//! stores receive one [`BudgetPolicy`] and apply it to every debit.
use std::time::Duration;

/// The parameters of one token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketParams {
    /// Capacity: refill never goes past it while the key is active.
    pub max_tokens: f64,
    /// Tokens earned back per second (0: credits that only a grant tops up).
    pub refill_per_sec: f64,
    /// Fraction of `max_tokens` that refill may reach after the key has been idle.
    pub idle_cap: f64,
    /// Balance of a key seen for the first time (or forgotten after a long idle period).
    pub initial_tokens: f64,
}

impl BucketParams {
    /// Seconds after which an idle bucket is forgotten (and then starts again at
    /// `initial_tokens`), or `None` when it must be kept (no refill: prepaid credits).
    ///
    /// After `active_window + max_tokens / refill_per_sec` seconds refill alone would have
    /// brought any balance to the idle ceiling, so forgetting grants nothing refill would not.
    pub fn forget_after(&self, active_window: f64) -> Option<f64> {
        (self.refill_per_sec > 0.0).then(|| active_window + self.max_tokens / self.refill_per_sec)
    }

    /// Seconds for an empty bucket to refill to capacity (the `w` of `RateLimit-Policy`).
    pub fn window_secs(&self) -> Option<u64> {
        (self.refill_per_sec > 0.0)
            .then(|| (self.max_tokens / self.refill_per_sec).ceil().max(1.0) as u64)
    }
}

/// A named tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Tier name (`[a-z0-9_-]+`, validated by the config).
    pub name: String,
    /// Its main bucket.
    pub bucket: BucketParams,
    /// Shadow mode for this tier: decide and record, but always allow.
    pub shadow: bool,
    /// Highest balance an operator's grant may bring a key to (at least `max_tokens`).
    pub grant_ceiling: f64,
    /// Low-balance alert thresholds, fractions of `max_tokens` ([`crate::alerts`]).
    pub low_balance: Vec<f64>,
    /// A calendar quota charged beside the bucket ([`crate::quota`]).
    pub quota: Option<crate::quota::Quota>,
}

/// What happens to keys that have no tier assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownKeys {
    /// They get this tier.
    DefaultTier(String),
    /// They are refused.
    Reject,
}

/// Everything a token store needs to decide a debit.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPolicy {
    /// The tiers, in config order.
    pub tiers: Vec<Tier>,
    /// Policy for keys without a tier assignment.
    pub unknown_keys: UnknownKeys,
    /// A key whose previous request is older than this is idle (idle cap applies).
    pub active_window: Duration,
    /// How long a request id is remembered (idempotent retries, refunds).
    pub idempotency_ttl: Duration,
    /// How long a reservation's request record is kept for its settle (`store.settle_ttl_secs`).
    pub settle_ttl: Duration,
    /// Remember requests whose id the daemon generated (`store.remember_generated_ids`), so
    /// that they can be refunded or settled under it; `false`: only client ids and
    /// reservations leave a request record ([`crate::store::Debit::remembered`]).
    pub remember_generated_ids: bool,
    /// The strict per-key bucket of operational endpoints (seed pitfall 5).
    pub operational: BucketParams,
    /// Budgets that several keys spend from (`[shared_budgets.*]`).
    pub shared: SharedBudgets,
    /// The shadow candidate policy's bucket of each tier, in the order of `tiers`
    /// (`[shadow]`, [`crate::shadow`]); `None`: no candidate is evaluated.
    pub candidate: Option<Vec<BucketParams>>,
}

/// One budget several keys are charged against (an organisation's, a project's).
///
/// Its state lives under its own Redis hash tag, `ptb:{budget:<name>}:…`, so one script call
/// touches the budget, the member's request record and its sub-limit in one slot. A member's
/// debits, refunds, settles and grants go to the budget; its request ids stay its own
/// (`ptb:{budget:<name>}:r:<key hash>:<request id>`). The budget's tier is fixed by the
/// config (a tier assignment of a member key does not apply while it is a member).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBudget {
    /// Its name (`[a-z0-9_-]+`, validated by the config).
    pub name: String,
    /// The tier whose bucket, quota and grant ceiling it has.
    pub tier: String,
    /// The member keys.
    pub keys: Vec<crate::key::KeyHash>,
    /// Each member's own bucket beside the budget, when set: a debit needs both.
    pub key_limit: Option<BucketParams>,
}

impl SharedBudget {
    /// The budget's account: the hash its state is kept under in the in-process store
    /// (never the hash of a real key: SHA-256 of a prefix no API key can start with).
    pub fn account(&self) -> crate::key::KeyHash {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"\0enforcer shared budget\0");
        h.update(self.name.as_bytes());
        crate::key::KeyHash(h.finalize().into())
    }
}

/// The shared budgets, and which budget each member key belongs to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedBudgets {
    budgets: Vec<std::sync::Arc<SharedBudget>>,
    members: std::collections::HashMap<crate::key::KeyHash, usize>,
}

impl SharedBudgets {
    /// Indexes `budgets` by member key (a key in two budgets: the config refuses it; the
    /// first wins here).
    pub fn new(budgets: Vec<SharedBudget>) -> Self {
        let mut members = std::collections::HashMap::new();
        for (i, b) in budgets.iter().enumerate() {
            for k in &b.keys {
                members.entry(*k).or_insert(i);
            }
        }
        Self {
            budgets: budgets.into_iter().map(std::sync::Arc::new).collect(),
            members,
        }
    }

    /// The budget `key` is charged against, if it is a member of one.
    pub fn of(&self, key: &crate::key::KeyHash) -> Option<&std::sync::Arc<SharedBudget>> {
        self.members.get(key).map(|&i| &self.budgets[i])
    }

    /// All of them, in config order.
    pub fn all(&self) -> &[std::sync::Arc<SharedBudget>] {
        &self.budgets
    }
}

impl BudgetPolicy {
    /// The tier called `name`.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// The candidate policy's bucket of tier `name`, when a candidate is configured.
    pub fn candidate_bucket(&self, name: &str) -> Option<BucketParams> {
        let i = self.tiers.iter().position(|t| t.name == name)?;
        self.candidate.as_ref()?.get(i).copied()
    }

    /// The tier a key with this assignment (or none) is charged under, or `None` when the key
    /// must be refused. An assignment naming a tier that the config no longer has falls back
    /// like an unassigned key.
    pub fn resolve(&self, assigned: Option<&str>) -> Option<&Tier> {
        if let Some(tier) = assigned.and_then(|name| self.tier(name)) {
            return Some(tier);
        }
        match &self.unknown_keys {
            UnknownKeys::DefaultTier(name) => self.tier(name),
            UnknownKeys::Reject => None,
        }
    }
}
