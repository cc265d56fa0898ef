//! One decision: "may key K call endpoint E now?".
//!
//! [`Decider::check`] validates the input (bad input is refused before anything is debited),
//! prices the request ([`crate::price`]), debits the key's bucket in the token store through
//! the circuit breaker with a bounded wait, and applies shadow mode and the store-failure
//! policy. It never panics on input and never waits on the store longer than the timeout.
//!
//! What a decision (or a refund) changes leaves through one port, [`event::Outbox`]: the audit
//! ledger and the kernel gate subscribe to it. This module imports neither.
pub mod event;
pub mod local;
mod trace;

use crate::breaker::{Breaker, BreakerState};
use crate::budget::{BucketParams, BudgetPolicy};
use crate::config::{Config, OnStoreFailure};
use crate::key::{ApiKey, RequestId};
use crate::metrics::Metrics;
use crate::price::{PriceBook, PriceError};
use crate::store::{
    BucketKind, Debit, DebitOutcome, Fingerprint, RefundOutcome, SettleOutcome, SettleTerms,
    Settled, StoreError, TokenStore, TrueCost,
};
use event::{Decided, Event, Outbox, Refunded, SettledCost};
use local::{LocalBudget, LocalOutcome};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A check as the gateway asks it.
#[derive(Debug, Clone)]
pub struct Check {
    /// The caller's API key.
    pub key: ApiKey,
    /// Request target as the gateway saw it; priced in normal form ([`crate::endpoint`]), a
    /// query string ignored.
    pub endpoint: String,
    /// HTTP method, upper case; `None` matches any configured method.
    pub method: Option<String>,
    /// Client address, when the gateway knows it (kernel bindings use it later).
    pub client_ip: Option<IpAddr>,
    /// Units of work (cost = price × units); 1 by default.
    pub units: f64,
    /// Idempotency token; one is generated when absent.
    pub request_id: Option<RequestId>,
    /// A reservation: the cost is an estimate, settled later at the true cost
    /// ([`Decider::settle`]); also when the endpoint says `settle = "after"`.
    pub reserve: bool,
}

/// How a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By the budget.
    Enforce,
    /// By the budget, but always allowed (global or tier shadow mode).
    Shadow,
    /// Without the store, allowed by `on_store_failure = "fail-open"`.
    FailOpen,
    /// Without the store, denied by `on_store_failure = "fail-closed"`.
    FailClosed,
    /// Without the store, by this node's local bucket (`on_store_failure = "local"`,
    /// [`crate::decision::local`]).
    Local,
}

impl Mode {
    /// Name used in responses and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::FailOpen => "fail-open",
            Mode::FailClosed => "fail-closed",
            Mode::Local => "local",
        }
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The key's bucket cannot pay the cost.
    Exhausted,
    /// The tier's calendar quota cannot pay it (until the period resets).
    QuotaExhausted,
    /// The key's shared budget could pay, its own `key_limit` cannot (until it refills).
    KeyLimit,
    /// The key has no tier and unknown keys are refused.
    UnknownKey,
    /// The store is unreachable and the policy is fail-closed.
    StoreUnavailable,
    /// The request id was used before by this key for a different request: refused (409),
    /// nothing charged, whatever the mode.
    RequestIdConflict,
}

impl Denial {
    /// Name used in responses and audit rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Exhausted => "exhausted",
            Denial::QuotaExhausted => "quota_exhausted",
            Denial::KeyLimit => "key_limit",
            Denial::UnknownKey => "unknown_key",
            Denial::StoreUnavailable => "store_unavailable",
            Denial::RequestIdConflict => "request_id_conflict",
        }
    }
}

/// The answer.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why not, when not allowed (also set in shadow mode for what *would* have been denied).
    pub denial: Option<Denial>,
    /// Tokens this request cost (or would have cost).
    pub cost: f64,
    /// Balance after the decision; `None` when the store was not reached.
    pub remaining: Option<f64>,
    /// When denied: milliseconds until a retry can succeed; `None` when refill never covers it.
    pub retry_after_ms: Option<u64>,
    /// The tier charged; `None` when unknown.
    pub tier: Option<String>,
    /// The bucket the request was charged to, for the `RateLimit-Policy` header.
    pub bucket: Option<BucketParams>,
    /// How it was decided.
    pub mode: Mode,
    /// The request id (the caller's, or a generated one to use for refunds).
    pub request_id: RequestId,
    /// True when answered from an earlier decision with the same request id.
    pub replayed: bool,
    /// This decision's id: the primary key of its audit row (UUIDv7), for disputes.
    pub decision_id: uuid::Uuid,
    /// The endpoint as priced: the request path in normal form.
    pub endpoint: String,
    /// An allowed reservation, settled by the store: its request id waits for a settle
    /// (`settle_ttl`) and keeps its estimate if none comes.
    pub reserved: bool,
    /// The tier's calendar quota after the decision (`RateLimit` names it beside the bucket).
    pub quota: Option<crate::store::QuotaUse>,
    /// What the shadow candidate policy would have decided ([`crate::shadow`]); recorded in
    /// the ledger, never answered. `None` when none was evaluated.
    pub candidate: Option<CandidateDecision>,
}

/// The shadow candidate policy's would-be decision of a request ([`crate::shadow`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateDecision {
    /// Whether the candidate would have allowed it.
    pub allowed: bool,
    /// What the candidate prices it at (charged to its bucket when allowed).
    pub cost: f64,
}

impl Decision {
    /// A decision the store gave no balance for (unknown key, request-id conflict, store not
    /// reached): no tier, bucket, balance or retry time; `denial` is what was (or, allowed,
    /// would have been) refused.
    fn without_balance(
        allowed: bool,
        denial: Denial,
        mode: Mode,
        cost: f64,
        request_id: RequestId,
        endpoint: &str,
    ) -> Self {
        Self {
            allowed,
            denial: Some(denial),
            cost,
            remaining: None,
            retry_after_ms: None,
            tier: None,
            bucket: None,
            mode,
            request_id,
            replayed: false,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: endpoint.to_owned(),
            reserved: false,
            quota: None,
            candidate: None,
        }
    }
}

/// The `outcome` label of `enforcer_decisions_total`. Shadow mode allows what it would have
/// denied: that is `would_deny`, not `allowed`, so a denial-ratio alert sees it before shadow
/// mode is switched off.
fn outcome_label(d: &Decision) -> &'static str {
    match (d.allowed, d.denial) {
        (false, Some(Denial::UnknownKey)) => "rejected_unknown_key",
        (false, Some(Denial::RequestIdConflict)) => "request_id_conflict",
        (true, Some(_)) if d.mode == Mode::Shadow => "would_deny",
        (true, _) => "allowed",
        (false, _) => "denied",
    }
}

/// Bad input: refused before anything is debited.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The endpoint or method cannot be priced (no normal form, not a method).
    #[error(transparent)]
    Endpoint(#[from] PriceError),
    /// `units` is not a finite number within `budget.min_units` and `budget.max_units`.
    #[error("units must be a finite number >= {min} and <= {max}")]
    Units {
        /// The configured minimum.
        min: f64,
        /// The configured maximum.
        max: f64,
    },
    /// The cost (`price × multiplier × units`) is not a finite number within what a store may
    /// charge: refused as bad input, never sent to the store (where it would be a store
    /// failure that fail-open admits).
    #[error("cost {cost} is out of range: it must be finite and <= {MAX_COST}")]
    Cost {
        /// The cost computed.
        cost: f64,
    },
    /// Nothing to decide.
    #[error("no check to decide")]
    Empty,
    /// Checks decided together name more than one key.
    #[error("checks decided together must name one key")]
    MixedKeys,
    /// Checks decided together are priced to the main and the operational bucket: one debit
    /// cannot charge both.
    #[error("an operational endpoint and a token-priced endpoint cannot be charged in one request")]
    MixedBuckets,
}

impl CheckError {
    /// A short reason for responses and the `enforcer_bad_requests_total{reason}` label.
    pub fn reason(&self) -> &'static str {
        match self {
            CheckError::Endpoint(PriceError::BadMethod) => "bad_method",
            CheckError::Endpoint(PriceError::BadEndpoint(_)) => "bad_endpoint",
            CheckError::Units { .. } => "bad_units",
            CheckError::Cost { .. } => "bad_cost",
            CheckError::Empty => "no_check",
            CheckError::MixedKeys => "mixed_keys",
            CheckError::MixedBuckets => "mixed_buckets",
        }
    }
}

/// The largest cost a single decision may charge (also enforced by the stores and the script).
pub const MAX_COST: f64 = 1e15;

/// Refund failures.
#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    /// The store could not be reached in time.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

/// Settle failures (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The true cost is not a finite number >= 0 and <= 10^15.
    #[error("{what} must be a finite number >= 0 and <= 1e15")]
    BadAmount {
        /// `cost` or `units`.
        what: &'static str,
    },
    /// The store could not be reached in time.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

/// What a config reload may change about decisions ([`crate::reload`]): the prices, the
/// budget policy, shadow mode and the bounds of `units`. A decision reads them once (one
/// atomic load), so it is priced and judged by one config from start to end.
#[derive(Debug)]
pub struct Rules {
    /// The cost matrix (its multipliers are shared with the pricing engine).
    pub prices: PriceBook,
    /// Tiers, unknown keys, the operational bucket.
    pub policy: BudgetPolicy,
    /// Global shadow mode (`budget.shadow`).
    pub shadow: bool,
    /// `budget.max_units`.
    pub max_units: f64,
    /// `budget.min_units`.
    pub min_units: f64,
    /// The shadow candidate's prices (`[shadow]`); its buckets are in `policy.candidate`.
    pub candidate: Option<crate::shadow::CandidatePrices>,
}

impl Rules {
    /// The rules of `config`, with a fresh price book (every multiplier 1).
    pub fn new(config: &Config) -> Self {
        Self::with_prices(config, PriceBook::new(&config.pricing))
    }

    /// The rules of `config` with this price book (built from `config.pricing`).
    pub fn with_prices(config: &Config, prices: PriceBook) -> Self {
        Self {
            prices,
            policy: config.budget_policy(),
            shadow: config.budget.shadow,
            max_units: config.budget.max_units,
            min_units: config.budget.min_units,
            candidate: crate::shadow::CandidatePrices::of(config),
        }
    }
}

/// Decides checks. Shared by every request handler.
#[derive(Debug)]
pub struct Decider {
    store: Arc<dyn TokenStore>,
    /// Swapped whole by a config reload ([`crate::reload`]).
    rules: Arc<arc_swap::ArcSwap<Rules>>,
    /// One circuit breaker per failure domain of the store ([`TokenStore::shards`]): a cluster
    /// primary that is down opens the breakers of its slots only.
    breakers: Vec<Breaker>,
    timeout: Duration,
    on_failure: OnStoreFailure,
    metrics: Metrics,
    /// `enforcer_debit_duration_seconds{backend=…}`, looked up once instead of per decision.
    debit_duration: prometheus::Histogram,
    /// Where every decision and refund goes (the ledger, the kernel gate).
    events: Outbox,
    /// With `on_store_failure = "local"`: the local buckets that decide without the store.
    local: Option<Arc<LocalBudget>>,
}

/// Why a store call produced no answer.
enum CallError {
    BreakerOpen,
    Timeout,
    Store(StoreError),
}

impl Decider {
    /// A decider over `store` with the policy, prices and failure rules of `config`; every
    /// decision and refund is published to `events`.
    pub fn new(
        config: &Config,
        store: Arc<dyn TokenStore>,
        metrics: Metrics,
        events: Outbox,
    ) -> Self {
        let debit_duration = metrics.debit_duration.with_label_values(&[store.backend()]);
        let shards = store.shards().max(1);
        let local = (config.store.on_store_failure == OnStoreFailure::Local).then(|| {
            Arc::new(LocalBudget::new(
                config.budget_policy(),
                Arc::new(crate::clock::SystemClock),
                config.store.local_nodes,
                config.store.local_max_keys,
                &crate::decision::local::node_id(&config.ledger.node, config.server.listen),
                metrics.clone(),
            ))
        });
        Self {
            store,
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(Rules::new(config))),
            breakers: (0..shards)
                .map(|_| {
                    Breaker::new(
                        config.store.breaker_failures,
                        Duration::from_millis(config.store.breaker_open_ms),
                    )
                })
                .collect(),
            timeout: Duration::from_millis(config.store.timeout_ms),
            on_failure: config.store.on_store_failure,
            debit_duration,
            metrics,
            events,
            local,
        }
    }

    /// The local buckets, with `on_store_failure = "local"` (their reconciler is a lifecycle
    /// worker).
    pub fn local(&self) -> Option<&Arc<LocalBudget>> {
        self.local.as_ref()
    }

    /// Where decisions go (the reconciler publishes its debit-backs there too).
    pub fn events(&self) -> &Outbox {
        &self.events
    }

    /// The price book now (a clone sharing the multipliers, which the pricing engine moves).
    pub fn prices(&self) -> PriceBook {
        self.rules.load().prices.clone()
    }

    /// The rules decisions follow now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Decisions from now on follow `rules`; decisions in flight finish under the rules they
    /// started with.
    pub fn set_rules(&self, rules: Rules) {
        self.rules.store(Arc::new(rules));
    }

    /// The switch a config reload swaps the rules with ([`crate::reload::Parts`]).
    pub fn rules_switch(&self) -> Arc<arc_swap::ArcSwap<Rules>> {
        Arc::clone(&self.rules)
    }

    /// The names of the tiers decisions are made with, in config order.
    pub fn tier_names(&self) -> Vec<String> {
        self.rules
            .load()
            .policy
            .tiers
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// The token store (for readiness probes).
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// Decides one check.
    pub async fn check(&self, mut check: Check) -> Result<Decision, CheckError> {
        trace::decision(1, self.decide(None, std::slice::from_mut(&mut check))).await
    }

    /// Decides several checks of one key together (Envoy's descriptors of one request): each
    /// is priced from `domain`'s cost table ([`PriceBook::for_domain`]), and their sum is
    /// debited in one store call, all or nothing: one decision, one audit row. The request id
    /// is the first one given. Checks of another key than the first's, or that mix the main
    /// and the operational bucket, are refused as bad input.
    pub async fn check_all(
        &self,
        domain: &str,
        checks: &mut [Check],
    ) -> Result<Decision, CheckError> {
        trace::decision(checks.len(), self.decide(Some(domain), checks)).await
    }

    async fn decide(
        &self,
        domain: Option<&str>,
        checks: &mut [Check],
    ) -> Result<Decision, CheckError> {
        let Some(first) = checks.first() else {
            return Err(CheckError::Empty);
        };
        // One config for the whole decision, even if a reload lands meanwhile.
        let rules = self.rules.load_full();
        let book = match domain {
            Some(domain) => rules.prices.for_domain(domain),
            None => &rules.prices,
        };
        let mut base = 0.0;
        let mut cost = 0.0;
        // The shadow candidate's price of the same checks (its factor on each enforced price).
        let mut candidate_cost = 0.0;
        let mut units = 0.0;
        let mut bucket = None;
        // One read of each engine multiplier, so the cost and the audit row agree.
        let mut multiplier = 1.0;
        let mut endpoints = Vec::with_capacity(checks.len());
        // A settle of checks decided together may charge at most the sum of their caps (no
        // cap when one has none).
        let mut max_cost = Some(0.0);
        let mut reserve = false;
        let price_span = trace::price();
        let pricing = price_span.enter();
        for check in checks.iter() {
            if check.key != first.key {
                return Err(CheckError::MixedKeys);
            }
            // Priced, answered and recorded in normal form (`//a/./b/` is `/a/b`), as the
            // upstream router sees it: another spelling of a path must not change its price.
            let endpoint = book.endpoint(&check.endpoint).map_err(PriceError::from)?;
            let price = book.price(check.method.as_deref(), &endpoint)?;
            if !(check.units.is_finite()
                && check.units > 0.0
                && check.units >= rules.min_units
                && check.units <= rules.max_units)
            {
                return Err(CheckError::Units {
                    min: rules.min_units,
                    max: rules.max_units,
                });
            }
            multiplier = price.multiplier();
            max_cost = max_cost.zip(price.max_cost).map(|(a, b)| a + b);
            reserve |= check.reserve || price.settle_after;
            base += price.base_cost * check.units;
            cost += price.base_cost * check.units * multiplier;
            if let Some(c) = &rules.candidate {
                candidate_cost += price.base_cost * c.ratio(price) * check.units * multiplier;
            }
            units += check.units;
            let kind = if price.operational {
                BucketKind::Operational
            } else {
                BucketKind::Main
            };
            if bucket.is_some_and(|b| b != kind) {
                return Err(CheckError::MixedBuckets);
            }
            bucket = Some(kind);
            endpoints.push(String::from(endpoint));
        }
        if units > rules.max_units {
            return Err(CheckError::Units {
                min: rules.min_units,
                max: rules.max_units,
            });
        }
        if !(cost.is_finite() && cost > 0.0 && cost <= MAX_COST) {
            return Err(CheckError::Cost { cost });
        }
        let bucket = bucket.unwrap_or(BucketKind::Main);
        if checks.len() > 1 {
            multiplier = cost / base;
        }
        let fingerprint = Fingerprint::of_all(
            bucket,
            checks
                .iter()
                .zip(&endpoints)
                .map(|(c, e)| (c.method.as_deref(), e.as_str(), c.units)),
        );
        let request_id = checks
            .iter_mut()
            .find_map(|c| c.request_id.take())
            .unwrap_or_else(RequestId::generate);
        // What the audit row and the kernel gate see: the first check, with the units summed
        // (and no method when they disagree) when there are several.
        let mut combined;
        let check: &Check = if checks.len() == 1 {
            &checks[0]
        } else {
            combined = checks[0].clone();
            combined.units = units;
            if checks.iter().any(|c| c.method != combined.method) {
                combined.method = None;
            }
            &combined
        };
        let endpoint = endpoints.swap_remove(0);
        let debit = Debit {
            key: check.key.hash(),
            bucket,
            cost,
            fingerprint,
            request_id,
            force: false,
            // The candidate is evaluated for the main bucket only, and never refuses a request
            // of its own: a candidate price out of range is left unevaluated.
            candidate: (rules.candidate.is_some()
                && bucket == BucketKind::Main
                && candidate_cost.is_finite()
                && candidate_cost > 0.0
                && candidate_cost <= MAX_COST)
                .then_some(candidate_cost),
            // Operational requests are outside the token economy: never a reservation.
            terms: SettleTerms {
                units,
                max_cost,
                reserve: reserve && bucket == BucketKind::Main,
            },
        };
        drop(pricing);
        trace::priced(&price_span, &endpoint, multiplier, cost, &debit.key);

        let sent = Instant::now();
        let mut result = trace::store(
            "debit",
            self.store.backend(),
            self.call(self.store.shard(&debit.key), self.store.debit(&debit)),
        )
        .await;
        self.debit_duration.observe(sent.elapsed().as_secs_f64());
        let grants = match &mut result {
            Ok(DebitOutcome::Settled(s)) => std::mem::take(&mut s.grants),
            _ => crate::wallet::GrantMoves::default(),
        };

        let settled_at = match &result {
            Ok(DebitOutcome::Settled(s)) => s.at.map(|at| event::Settled { at, now: at, sent }),
            _ => None,
        };
        let decision = match result {
            Ok(DebitOutcome::Settled(settled)) => {
                if let Some(local) = &self.local {
                    local.seen(&debit.key, &settled.tier);
                }
                let candidate = settled.candidate;
                let mut decision =
                    self.settled(&rules, settled, bucket, debit.request_id, &endpoint);
                decision.candidate = candidate.zip(debit.candidate).map(|(c, cost)| {
                    self.metrics
                        .shadow_candidate_decisions
                        .with_label_values(&[if c.allowed { "allow" } else { "deny" }])
                        .inc();
                    CandidateDecision {
                        allowed: c.allowed,
                        cost,
                    }
                });
                // Only what the store charged and remembered waits for a settle: a denial
                // charged nothing, a replay answers the first decision (whose record the
                // reservation is, if it was one).
                decision.reserved = debit.terms.reserve
                    && decision.allowed
                    && decision.denial.is_none()
                    && !decision.replayed;
                decision
            }
            // Shadow mode allows unknown keys too, and records what it would have denied.
            Ok(DebitOutcome::UnknownKey) => Decision::without_balance(
                rules.shadow,
                Denial::UnknownKey,
                if rules.shadow {
                    Mode::Shadow
                } else {
                    Mode::Enforce
                },
                cost,
                debit.request_id,
                &endpoint,
            ),
            // A reused request id is a client error, not a budget decision: refused in every
            // mode, so shadow mode cannot hide a client bug that enforcement would refuse.
            Ok(DebitOutcome::Conflict) => Decision::without_balance(
                false,
                Denial::RequestIdConflict,
                Mode::Enforce,
                cost,
                debit.request_id,
                &endpoint,
            ),
            // A call that was sent may still land (a frozen store runs it when it runs again).
            Err(e) => self.without_store(
                &rules,
                &debit,
                &endpoint,
                !matches!(e, CallError::BreakerOpen),
            ),
        };
        let decided = Decided {
            key: &check.key,
            key_hash: &debit.key,
            check,
            decision: &decision,
            // A replay answers with the first decision's cost: its own multiplier.
            multiplier: if decision.replayed && base > 0.0 {
                decision.cost / base
            } else {
                multiplier
            },
            decided_by: self.decided_by(&decision),
            bucket,
            settled: settled_at,
            grants: &grants,
        };
        self.events.publish(&if decision.replayed {
            Event::Replay(decided)
        } else {
            Event::Debit(decided)
        });
        self.metrics
            .decisions
            .with_label_values(&[
                outcome_label(&decision),
                decision.tier.as_deref().unwrap_or("unknown"),
                decision.mode.as_str(),
            ])
            .inc();
        if decision.replayed {
            self.metrics.replays.inc();
        }
        Ok(decision)
    }

    fn settled(
        &self,
        rules: &Rules,
        s: Settled,
        bucket: BucketKind,
        request_id: RequestId,
        endpoint: &str,
    ) -> Decision {
        let tier = rules.policy.tier(&s.tier);
        let shadow = rules.shadow || tier.is_some_and(|t| t.shadow);
        let params = match bucket {
            BucketKind::Main => tier.map(|t| t.bucket),
            BucketKind::Operational => Some(rules.policy.operational),
        };
        Decision {
            allowed: s.allowed || shadow,
            denial: (!s.allowed).then_some(match s.denied_by {
                Some(d) if d.quota() => Denial::QuotaExhausted,
                Some(crate::store::DeniedBy::KeyLimit) => Denial::KeyLimit,
                _ => Denial::Exhausted,
            }),
            quota: s.quota,
            cost: s.cost,
            remaining: Some(s.remaining),
            retry_after_ms: if s.allowed { Some(0) } else { s.retry_after_ms },
            tier: Some(s.tier),
            bucket: params,
            mode: if shadow { Mode::Shadow } else { Mode::Enforce },
            request_id,
            replayed: s.replayed,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: endpoint.to_owned(),
            reserved: false,
            candidate: None,
        }
    }

    /// Who decided, for the audit row: the store, or the mode that overrode it.
    fn decided_by(&self, d: &Decision) -> &'static str {
        if d.replayed {
            "replay"
        } else {
            match d.mode {
                Mode::Enforce => self.store.backend(),
                other => other.as_str(),
            }
        }
    }

    fn without_store(&self, rules: &Rules, debit: &Debit, endpoint: &str, sent: bool) -> Decision {
        let (cost, request_id) = (debit.cost, debit.request_id.clone());
        if let Some(local) = &self.local {
            self.metrics
                .store_failure_decisions
                .with_label_values(&["local"])
                .inc();
            return self.locally(rules, local.decide(debit, sent), debit, endpoint);
        }
        let (allowed, mode, policy) = match self.on_failure {
            OnStoreFailure::FailOpen => (true, Mode::FailOpen, "fail-open"),
            // Shadow mode never denies: it records that fail-closed would have.
            OnStoreFailure::FailClosed if rules.shadow => (true, Mode::Shadow, "fail-closed"),
            // `local` always has local buckets (above); fail closed if it ever had none.
            OnStoreFailure::FailClosed | OnStoreFailure::Local => {
                (false, Mode::FailClosed, "fail-closed")
            }
        };
        self.metrics
            .store_failure_decisions
            .with_label_values(&[policy])
            .inc();
        let mut decision = Decision::without_balance(
            allowed,
            Denial::StoreUnavailable,
            mode,
            cost,
            request_id,
            endpoint,
        );
        // Fail-open records nothing would have been denied; fail-closed (also in shadow mode)
        // records the denial.
        if self.on_failure == OnStoreFailure::FailOpen {
            decision.denial = None;
        }
        if !allowed {
            decision.retry_after_ms = Some(self.breaker_retry_ms());
        }
        decision
    }

    /// A decision by a local bucket (`on_store_failure = "local"`); shadow mode (global or the
    /// tier's) allows what the local bucket denies, and records it.
    fn locally(
        &self,
        rules: &Rules,
        outcome: LocalOutcome,
        debit: &Debit,
        endpoint: &str,
    ) -> Decision {
        let d = match outcome {
            LocalOutcome::Decided(d) => d,
            LocalOutcome::Unknown | LocalOutcome::Untracked => {
                let mut decision = Decision::without_balance(
                    rules.shadow,
                    Denial::StoreUnavailable,
                    if rules.shadow {
                        Mode::Shadow
                    } else {
                        Mode::Local
                    },
                    debit.cost,
                    debit.request_id.clone(),
                    endpoint,
                );
                decision.retry_after_ms = Some(self.breaker_retry_ms());
                return decision;
            }
        };
        let shadow = rules.shadow || rules.policy.tier(&d.tier).is_some_and(|t| t.shadow);
        Decision {
            allowed: d.allowed || shadow,
            denial: (!d.allowed).then_some(Denial::Exhausted),
            quota: None,
            cost: debit.cost,
            remaining: Some(d.remaining),
            retry_after_ms: if d.allowed { Some(0) } else { d.retry_after_ms },
            tier: Some(d.tier),
            bucket: Some(d.share),
            mode: if shadow { Mode::Shadow } else { Mode::Local },
            request_id: debit.request_id.clone(),
            replayed: false,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: endpoint.to_owned(),
            reserved: false,
            candidate: None,
        }
    }

    /// Gives back the cost of an allowed request, and publishes the new balance.
    pub async fn refund(
        &self,
        key: &ApiKey,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, RefundError> {
        let key_hash = key.hash();
        trace::key(&key_hash);
        let sent = Instant::now();
        let outcome = trace::store(
            "refund",
            self.store.backend(),
            self.call(
                self.store.shard(&key_hash),
                self.store.refund(&key_hash, request_id),
            ),
        )
        .await
        .map_err(|e| {
            RefundError::Unavailable(match e {
                CallError::BreakerOpen => "circuit breaker open".to_owned(),
                CallError::Timeout => "timed out".to_owned(),
                CallError::Store(e) => e.to_string(),
            })
        });
        let label = match &outcome {
            Ok(RefundOutcome::Refunded { .. }) => "refunded",
            Ok(RefundOutcome::UnknownRequest) => "unknown_request",
            Ok(RefundOutcome::AlreadyRefunded) => "already_refunded",
            Ok(RefundOutcome::NotRefundable) => "not_refundable",
            Err(_) => "unavailable",
        };
        self.metrics.refunds.with_label_values(&[label]).inc();
        if let Ok(RefundOutcome::Refunded {
            credited,
            balance,
            tier,
            as_of,
            now,
        }) = &outcome
        {
            self.events.publish(&Event::Refund(Refunded {
                key,
                key_hash: &key_hash,
                request_id,
                credited: *credited,
                balance: as_of.map(|_| *balance),
                tier,
                settled: event::Settled {
                    at: as_of.unwrap_or(*now),
                    now: *now,
                    sent,
                },
                id: uuid::Uuid::now_v7(),
                store: self.store.backend(),
            }));
        }
        outcome
    }

    /// Charges the true cost of an allowed request in place of its estimate, and publishes
    /// the new balance (a settle is never decided without the store: there is no estimate to
    /// correct locally).
    pub async fn settle(
        &self,
        key: &ApiKey,
        request_id: &RequestId,
        cost: TrueCost,
    ) -> Result<SettleOutcome, SettleError> {
        if cost.check().is_err() {
            return Err(SettleError::BadAmount {
                what: match cost {
                    TrueCost::Tokens(_) => "cost",
                    TrueCost::Units(_) | TrueCost::UnitsReturned(_) => "units",
                },
            });
        }
        let key_hash = key.hash();
        trace::key(&key_hash);
        let sent = Instant::now();
        let outcome = trace::store(
            "settle",
            self.store.backend(),
            self.call(
                self.store.shard(&key_hash),
                self.store.settle(&key_hash, request_id, cost),
            ),
        )
        .await
        .map_err(|e| {
            SettleError::Unavailable(match e {
                CallError::BreakerOpen => "circuit breaker open".to_owned(),
                CallError::Timeout => "timed out".to_owned(),
                CallError::Store(e) => e.to_string(),
            })
        });
        let label = match &outcome {
            Ok(SettleOutcome::Settled {
                replayed: false, ..
            }) => "settled",
            Ok(SettleOutcome::Settled { replayed: true, .. }) => "replayed",
            Ok(SettleOutcome::Conflict { .. }) => "conflict",
            Ok(SettleOutcome::UnknownRequest) => "unknown_request",
            Ok(SettleOutcome::AlreadyRefunded) => "already_refunded",
            Ok(SettleOutcome::NotSettleable | SettleOutcome::UnitsUnknown) => "not_settleable",
            Ok(SettleOutcome::UnknownKey) => "unknown_key",
            Err(_) => "unavailable",
        };
        self.metrics.settles.with_label_values(&[label]).inc();
        if let Ok(SettleOutcome::Settled {
            cost,
            estimate,
            charged,
            capped,
            balance,
            tier,
            at: Some(at),
            replayed: false,
        }) = &outcome
        {
            self.events.publish(&Event::Settle(SettledCost {
                key,
                key_hash: &key_hash,
                request_id,
                cost: *cost,
                estimate: *estimate,
                charged: *charged,
                capped: *capped,
                balance: *balance,
                tier,
                settled: event::Settled {
                    at: *at,
                    now: *at,
                    sent,
                },
                id: uuid::Uuid::now_v7(),
                store: self.store.backend(),
            }));
        }
        outcome
    }

    /// How long a caller refused without the store should wait: until its breaker may probe.
    fn breaker_retry_ms(&self) -> u64 {
        self.breakers[0]
            .open_for()
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX)
    }

    /// The breakers' position for the `enforcer_store_breaker_state` and
    /// `enforcer_store_breakers_open` gauges: the worst one (open, else half-open, else closed),
    /// and how many are not closed. Read when metrics are scraped, not per decision.
    pub fn breaker_summary(&self) -> (BreakerState, usize) {
        let states: Vec<BreakerState> = self.breakers.iter().map(Breaker::state).collect();
        let worst = if states.contains(&BreakerState::Open) {
            BreakerState::Open
        } else if states.contains(&BreakerState::HalfOpen) {
            BreakerState::HalfOpen
        } else {
            BreakerState::Closed
        };
        let open = states
            .iter()
            .filter(|s| **s != BreakerState::Closed)
            .count();
        (worst, open)
    }

    /// Runs a store call through the breaker of `shard` with the timeout, and keeps the
    /// metrics.
    async fn call<T>(
        &self,
        shard: usize,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, CallError> {
        let breaker = &self.breakers[shard.min(self.breakers.len() - 1)];
        if !breaker.admit() {
            self.metrics
                .store_errors
                .with_label_values(&["breaker_open"])
                .inc();
            return Err(CallError::BreakerOpen);
        }
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Store(e)),
            Err(_) => Err(CallError::Timeout),
        };
        // A refused argument is our bug or bad input, not an unhealthy store.
        let healthy = !matches!(
            result,
            Err(CallError::Timeout) | Err(CallError::Store(StoreError::Unavailable(_)))
        );
        breaker.record(healthy);
        if let Err(e) = &result {
            let kind = match e {
                CallError::BreakerOpen => "breaker_open",
                CallError::Timeout => "timeout",
                CallError::Store(StoreError::Unavailable(_)) => "unavailable",
                CallError::Store(StoreError::Rejected(_)) => "rejected",
                CallError::Store(StoreError::Protocol(_)) => "protocol",
            };
            if let CallError::Store(err) = e {
                tracing::warn!(error = %err, "token store call failed");
            }
            self.metrics.store_errors.with_label_values(&[kind]).inc();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::key::ApiKey;
    use crate::store::MemoryStore;
    use parking_lot::Mutex;

    /// What a subscriber saw of one event.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Debit {
            allowed: bool,
            remaining: Option<f64>,
            at: Option<f64>,
        },
        Replay {
            remaining: Option<f64>,
        },
        Refund {
            balance: Option<f64>,
            at: f64,
            tier: String,
        },
        DebitBack {
            amount: f64,
        },
        Settle {
            charged: f64,
            balance: f64,
            at: f64,
        },
    }

    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl event::Subscriber for Recorder {
        fn publish(&self, event: &Event<'_>) {
            self.0.lock().push(match event {
                Event::Debit(d) => Seen::Debit {
                    allowed: d.decision.allowed,
                    remaining: d.decision.remaining,
                    at: d.settled.map(|s| s.at),
                },
                Event::Replay(d) => Seen::Replay {
                    remaining: d.decision.remaining,
                },
                Event::Refund(r) => Seen::Refund {
                    balance: r.balance,
                    at: r.settled.at,
                    tier: r.tier.to_owned(),
                },
                Event::DebitBack(b) => Seen::DebitBack { amount: b.amount },
                Event::Settle(st) => Seen::Settle {
                    charged: st.charged,
                    balance: st.balance,
                    at: st.settled.at,
                },
                Event::Grant(_) | Event::TierChanged(_) => return,
            });
        }
    }

    fn check(units: f64, request_id: &str) -> Check {
        Check {
            key: ApiKey::parse("stream-key").expect("key"),
            endpoint: "/x".into(),
            method: None,
            client_ip: None,
            units,
            request_id: Some(RequestId::parse(request_id).expect("id")),
            reserve: false,
        }
    }

    #[tokio::test]
    async fn every_decision_and_refund_is_one_event_with_the_store_time() {
        let config = Config::default();
        let clock = ManualClock::at(1000.0);
        let store = Arc::new(MemoryStore::new(
            config.budget_policy(),
            Arc::new(clock.clone()),
        ));
        let recorder = Arc::new(Recorder::default());
        let events = Outbox::new().with(recorder.clone());
        let decider = Decider::new(&config, store, Metrics::new(), events);
        // The default free tier: a new key starts at 800 (idle cap), 10 tokens/s.
        assert!(
            decider
                .check(check(700.0, "a"))
                .await
                .expect("valid")
                .allowed
        );
        clock.advance(0.5);
        let denied = decider.check(check(900.0, "b")).await.expect("valid");
        assert_eq!(denied.denial, Some(Denial::Exhausted));
        let replay = decider.check(check(700.0, "a")).await.expect("valid");
        assert!(replay.replayed);
        clock.advance(0.5);
        let key = ApiKey::parse("stream-key").expect("key");
        let refund = decider
            .refund(&key, &RequestId::parse("a").expect("id"))
            .await
            .expect("store answers");
        assert!(matches!(refund, RefundOutcome::Refunded { .. }));
        assert_eq!(
            *recorder.0.lock(),
            [
                Seen::Debit {
                    allowed: true,
                    remaining: Some(100.0),
                    at: Some(1000.0)
                },
                Seen::Debit {
                    allowed: false,
                    remaining: Some(105.0),
                    at: Some(1000.5)
                },
                Seen::Replay {
                    remaining: Some(100.0)
                },
                // The balance as of the bucket's clock, which a refund keeps.
                Seen::Refund {
                    balance: Some(805.0),
                    at: 1000.5,
                    tier: "free".into()
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_reservation_is_settled_once_and_only_the_settle_is_an_event() {
        let mut config = Config::default();
        config
            .pricing
            .endpoints
            .push(crate::config::EndpointConfig {
                method: "*".into(),
                path: "/llm".into(),
                base_cost: 1.0,
                operational: false,
                calibration_query: String::new(),
                cpu_query: String::new(),
                cpu_reference: 1.0,
                memory_query: String::new(),
                memory_reference: 1e9,
                max_cost: Some(700.0),
                settle: crate::config::SettleWhen::After,
            });
        config.budget.max_units = 10_000.0;
        let clock = ManualClock::at(1000.0);
        let store = Arc::new(MemoryStore::new(
            config.budget_policy(),
            Arc::new(clock.clone()),
        ));
        let recorder = Arc::new(Recorder::default());
        let decider = Decider::new(
            &config,
            store,
            Metrics::new(),
            Outbox::new().with(recorder.clone()),
        );
        // The endpoint reserves by itself (`settle = "after"`); `/x` only when asked.
        let mut ask = check(500.0, "llm-1");
        ask.endpoint = "/llm".into();
        let d = decider.check(ask).await.expect("valid");
        assert!(d.allowed && d.reserved, "{d:?}");
        assert!(
            !decider
                .check(check(1.0, "x-1"))
                .await
                .expect("valid")
                .reserved
        );
        let mut asked = check(1.0, "x-2");
        asked.reserve = true;
        assert!(decider.check(asked).await.expect("valid").reserved);
        // 800 - 500 - 1 - 1 = 298; 900 tokens used, capped at 700: 200 more.
        let key = ApiKey::parse("stream-key").expect("key");
        let id = RequestId::parse("llm-1").expect("id");
        clock.advance(1.0);
        let out = decider
            .settle(&key, &id, TrueCost::Units(900.0))
            .await
            .expect("store answers");
        assert!(
            matches!(out, SettleOutcome::Settled { cost, charged, capped: true, .. } if cost == 700.0 && charged == 200.0),
            "{out:?}"
        );
        let again = decider
            .settle(&key, &id, TrueCost::Units(900.0))
            .await
            .expect("store answers");
        assert!(matches!(
            again,
            SettleOutcome::Settled { replayed: true, .. }
        ));
        assert!(matches!(
            decider.settle(&key, &id, TrueCost::Tokens(-1.0)).await,
            Err(SettleError::BadAmount { what: "cost" })
        ));
        let settles: Vec<Seen> = recorder
            .0
            .lock()
            .iter()
            .filter(|s| matches!(s, Seen::Settle { .. }))
            .cloned()
            .collect();
        // The refill of the second that passed (10 tokens) comes first.
        assert_eq!(
            settles,
            [Seen::Settle {
                charged: 200.0,
                balance: 108.0,
                at: 1001.0
            }]
        );
    }

    #[tokio::test]
    async fn units_below_the_minimum_are_refused() {
        let mut config = Config::default();
        let store = Arc::new(MemoryStore::new(
            config.budget_policy(),
            Arc::new(ManualClock::at(1000.0)),
        ));
        let decider = Decider::new(&config, store.clone(), Metrics::new(), Outbox::new());
        assert!(matches!(
            decider.check(check(0.5, "c")).await,
            Err(CheckError::Units { min, .. }) if min == 1.0
        ));
        config.budget.min_units = 0.25;
        let decider = Decider::new(&config, store, Metrics::new(), Outbox::new());
        assert!(decider.check(check(0.5, "d")).await.is_ok());
    }

    /// A store of two failure domains whose first is down.
    #[derive(Debug)]
    struct HalfDown(MemoryStore);

    #[async_trait::async_trait]
    impl TokenStore for HalfDown {
        async fn debit(&self, d: &Debit) -> Result<DebitOutcome, StoreError> {
            if self.shard(&d.key) == 0 {
                return Err(StoreError::Unavailable("primary down".into()));
            }
            self.0.debit(d).await
        }
        async fn refund(
            &self,
            key: &crate::key::KeyHash,
            id: &RequestId,
        ) -> Result<RefundOutcome, StoreError> {
            self.0.refund(key, id).await
        }
        async fn settle(
            &self,
            key: &crate::key::KeyHash,
            id: &RequestId,
            cost: TrueCost,
        ) -> Result<SettleOutcome, StoreError> {
            self.0.settle(key, id, cost).await
        }
        async fn assign_tier(
            &self,
            key: &crate::key::KeyHash,
            tier: Option<&str>,
        ) -> Result<(), StoreError> {
            self.0.assign_tier(key, tier).await
        }
        async fn grant_with(
            &self,
            key: &crate::key::KeyHash,
            tokens: f64,
            id: &RequestId,
            terms: crate::store::GrantTerms,
        ) -> Result<crate::store::GrantOutcome, StoreError> {
            self.0.grant_with(key, tokens, id, terms).await
        }
        async fn inspect(
            &self,
            key: &crate::key::KeyHash,
        ) -> Result<crate::store::KeyState, StoreError> {
            self.0.inspect(key).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn backend(&self) -> &'static str {
            "half-down"
        }
        fn shards(&self) -> usize {
            2
        }
        fn shard(&self, key: &crate::key::KeyHash) -> usize {
            usize::from(key.to_hex().as_bytes()[0] % 2)
        }
    }

    #[tokio::test]
    async fn a_failure_domain_that_is_down_opens_its_own_breaker_only() {
        let mut config = Config::default();
        config.store.on_store_failure = OnStoreFailure::FailClosed;
        let inner = MemoryStore::new(config.budget_policy(), Arc::new(ManualClock::at(1000.0)));
        let store = Arc::new(HalfDown(inner));
        let decider = Decider::new(&config, store.clone(), Metrics::new(), Outbox::new());
        let key_in = |shard: usize| {
            (0..)
                .map(|i| format!("key-{i}"))
                .find(|k| store.shard(&ApiKey::parse(k).expect("key").hash()) == shard)
                .expect("a key in each shard")
        };
        let (down, up) = (key_in(0), key_in(1));
        let ask = |key: &str, id: String| Check {
            key: ApiKey::parse(key).expect("key"),
            endpoint: "/x".into(),
            method: None,
            client_ip: None,
            units: 1.0,
            request_id: Some(RequestId::parse(&id).expect("id")),
            reserve: false,
        };
        for i in 0..(config.store.breaker_failures + 3) {
            let d = decider
                .check(ask(&down, format!("d{i}")))
                .await
                .expect("valid");
            assert_eq!(d.mode, Mode::FailClosed);
            // The healthy domain keeps deciding by its budget, between the failures.
            let d = decider
                .check(ask(&up, format!("u{i}")))
                .await
                .expect("valid");
            assert_eq!(d.mode, Mode::Enforce, "healthy shard decided by the store");
            assert!(d.allowed);
        }
        let (worst, open) = decider.breaker_summary();
        assert_eq!((worst, open), (BreakerState::Open, 1));
    }
}
