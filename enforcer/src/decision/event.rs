//! The decider's one outbound port: every decision and every other change of a key's balance
//! becomes one [`Event`], handed to each [`Subscriber`] of an [`Outbox`].
//!
//! The decider knows nothing about what happens next. Two subscribers are wired by
//! `server.rs`: the audit ledger (a row per event, `ledger::subscriber`) and the kernel gate's
//! sync (snapshots and bindings, `kernel::sync`). They own their logic: the kernel subscriber
//! decides which keys get a snapshot (tiers, shadow mode, kernel ids), the ledger what a row
//! holds.
//!
//! Events are published synchronously, on the decision path, after the store answered and
//! before the caller gets its answer: a subscriber must never wait (the ledger and the kernel
//! sync each push onto a bounded queue of their own).
use crate::decision::{Check, Decision};
use crate::key::{ApiKey, KeyHash, RequestId};
use crate::store::BucketKind;
use crate::wallet::{GrantMove, GrantMoves};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// One change, as the decider saw it. Borrowed: a subscriber copies what it keeps.
#[derive(Debug)]
pub enum Event<'a> {
    /// A check decided anew: charged, denied (nothing charged), refused as unknown or as a
    /// request-id conflict, or decided without the store by the failure policy. Every decision
    /// that is not a replay is one `Debit`.
    Debit(Decided<'a>),
    /// A retry answered from the first decision under its request id: nothing charged, and its
    /// `remaining` is the first decision's, not the balance now.
    Replay(Decided<'a>),
    /// An allowed request's cost given back (`POST /v1/refund`).
    Refund(Refunded<'a>),
    /// A request's true cost charged in place of its estimate (`POST /v1/settle`): the
    /// difference debited, or credited back.
    Settle(SettledCost<'a>),
    /// Tokens spent by fail-soft local decisions while the store was unreachable, charged
    /// back into the key's shared bucket once it answered (`crate::decision::local`).
    DebitBack(DebitedBack<'a>),
    /// Tokens an operator granted to a key (`enforcer keys grant`, [`crate::admin`]).
    Grant(Granted<'a>),
    /// An operator assigned a key to a tier, or removed its assignment: the key's balance
    /// now follows other rules, so what the kernel holds for it is void.
    TierChanged(TierChanged<'a>),
}

/// An operator's grant, applied by the store.
#[derive(Debug)]
pub struct Granted<'a> {
    /// The key, when the operator gave it (stdin, `--key-file`); `None` with `--key-hash`
    /// (the kernel gate, which identifies keys by the raw key, then lifts instead).
    pub key: Option<&'a ApiKey>,
    /// Its SHA-256.
    pub key_hash: &'a KeyHash,
    /// The grant's id (a retried grant with it is a replay, never published again).
    pub grant_id: &'a RequestId,
    /// Tokens granted.
    pub tokens: f64,
    /// The balance afterwards.
    pub balance: f64,
    /// The key's tier.
    pub tier: &'a str,
    /// When the store settled the balance.
    pub settled: Settled,
    /// Why (the operator's note).
    pub note: &'a str,
    /// Who: `uid:<n>` of the admin socket's peer.
    pub operator: &'a str,
    /// A wallet grant's expiry (store time); `None`: never, or a bucket grant.
    pub expires_at: Option<f64>,
    /// A wallet grant's priority; `None`: a bucket grant.
    pub priority: Option<i64>,
    /// Wallet grants the store found expired while granting (their tokens forfeited).
    pub expired: &'a [GrantMove],
    /// Id of the grant's audit row (UUIDv7).
    pub id: uuid::Uuid,
    /// The store that made it (`redis`, `memory`).
    pub store: &'static str,
}

/// An operator's tier change.
#[derive(Debug)]
pub struct TierChanged<'a> {
    /// The key, when the operator gave it; `None` with `--key-hash`.
    pub key: Option<&'a ApiKey>,
    /// Its SHA-256.
    pub key_hash: &'a KeyHash,
    /// The new assignment; `None`: removed.
    pub tier: Option<&'a str>,
}

/// Local spending debited back into a shared bucket.
#[derive(Debug)]
pub struct DebitedBack<'a> {
    /// The key's SHA-256 (the raw key is not kept for this).
    pub key_hash: &'a KeyHash,
    /// The bucket charged.
    pub bucket: BucketKind,
    /// The debit-back's own request id (unique to node, process, key and bucket): a retry
    /// under it is a replay, never a second charge.
    pub request_id: &'a RequestId,
    /// Tokens charged: what the local decisions allowed.
    pub amount: f64,
    /// The shared balance afterwards (may be below zero); `None` when the store answered a
    /// replay of an earlier attempt whose answer was lost.
    pub balance: Option<f64>,
    /// The tier the store charged it under.
    pub tier: &'a str,
    /// What it took from the key's wallet grants, and the grants found expired.
    pub grants: &'a GrantMoves,
    /// Id of this debit-back's audit row (UUIDv7).
    pub id: uuid::Uuid,
    /// The store that took it (`redis`, `memory`).
    pub store: &'static str,
}

/// A decision and what it was made from.
#[derive(Debug)]
pub struct Decided<'a> {
    /// The caller's key (in memory only: subscribers derive hashes and ids from it).
    pub key: &'a ApiKey,
    /// Its SHA-256, as the store and the ledger know it.
    pub key_hash: &'a KeyHash,
    /// The check as asked.
    pub check: &'a Check,
    /// The answer.
    pub decision: &'a Decision,
    /// The price multiplier the cost was computed with (for a replay, the first decision's).
    pub multiplier: f64,
    /// Who decided: the store's backend (`redis`, `memory`), `shadow`, `fail-open`,
    /// `fail-closed` or `replay`.
    pub decided_by: &'static str,
    /// The bucket charged.
    pub bucket: BucketKind,
    /// When the store settled the balance, if it did (not for replays and store failures).
    pub settled: Option<Settled>,
    /// What the debit took from the key's wallet grants and the grants it found expired
    /// ([`crate::wallet`]); empty for most keys.
    pub grants: &'a GrantMoves,
}

/// When a balance was settled in the store.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// The store's clock when the balance was settled (Redis `TIME`), seconds since the Unix
    /// epoch: orders a key's events whatever order they are handled in.
    pub at: f64,
    /// The store's clock when it answered; `now − at` is how old the balance already was then
    /// (0 for a debit; a refund keeps the bucket's older refill clock).
    pub now: f64,
    /// This host's monotonic clock just before the store call: the store settled the balance
    /// after it, so `sent − (now − at)` dates the balance never later than it was.
    pub sent: Instant,
}

/// A refund.
#[derive(Debug)]
pub struct Refunded<'a> {
    /// The caller's key.
    pub key: &'a ApiKey,
    /// Its SHA-256.
    pub key_hash: &'a KeyHash,
    /// The refunded request.
    pub request_id: &'a RequestId,
    /// Tokens credited (may be less than the cost near capacity).
    pub credited: f64,
    /// The balance afterwards; `None` when the store no longer had the bucket (forgotten after
    /// a long idle period: its balance is unknown, at least the cost).
    pub balance: Option<f64>,
    /// The tier the request was charged under.
    pub tier: &'a str,
    /// When `balance` holds for (the bucket's refill clock, which a refund keeps); without a
    /// balance, `at` is the store's clock at the refund.
    pub settled: Settled,
    /// Id of this refund (UUIDv7), for its audit row.
    pub id: uuid::Uuid,
    /// The store that made it (`redis`, `memory`).
    pub store: &'static str,
}

/// A settle: a request's true cost charged in place of its estimate.
#[derive(Debug)]
pub struct SettledCost<'a> {
    /// The caller's key.
    pub key: &'a ApiKey,
    /// Its SHA-256.
    pub key_hash: &'a KeyHash,
    /// The settled request.
    pub request_id: &'a RequestId,
    /// The true cost charged in all (after the endpoint's `max_cost`).
    pub cost: f64,
    /// The estimate charged at the check.
    pub estimate: f64,
    /// Tokens charged now; negative: credited back (the credit may be cut at capacity).
    pub charged: f64,
    /// The true cost asked for was above `max_cost`.
    pub capped: bool,
    /// The balance afterwards (may be below zero).
    pub balance: f64,
    /// The tier the bucket was charged under.
    pub tier: &'a str,
    /// When the store settled the balance.
    pub settled: Settled,
    /// Id of this settle's audit row (UUIDv7).
    pub id: uuid::Uuid,
    /// The store that made it (`redis`, `memory`).
    pub store: &'static str,
}

/// Takes events. Called on the decision path: must return at once (queue, never wait).
pub trait Subscriber: Send + Sync + fmt::Debug {
    /// One event.
    fn publish(&self, event: &Event<'_>);
}

/// The subscribers of a decider, called in the order they were added.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    subscribers: Vec<Arc<dyn Subscriber>>,
}

impl Outbox {
    /// No subscribers: events go nowhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subscriber.
    #[must_use]
    pub fn with(mut self, subscriber: Arc<dyn Subscriber>) -> Self {
        self.subscribers.push(subscriber);
        self
    }

    /// Hands `event` to every subscriber.
    pub fn publish(&self, event: &Event<'_>) {
        for s in &self.subscribers {
            s.publish(event);
        }
    }
}
