//! One decision: "may key K call endpoint E now?".
//!
//! [`Decider::check`] validates the input (bad input is refused before anything is debited),
//! prices the request ([`crate::price`]), debits the key's bucket in the token store through
//! the circuit breaker with a bounded wait, and applies shadow mode and the store-failure
//! policy. It never panics on input and never waits on the store longer than the timeout.
use crate::breaker::Breaker;
use crate::budget::{BucketParams, BudgetPolicy};
use crate::config::{Config, OnStoreFailure};
use crate::kernel::GateLink;
use crate::key::{ApiKey, KeyHash, RequestId};
use crate::ledger::{AuditRow, Entry, Ledger};
use crate::metrics::Metrics;
use crate::price::{PriceBook, PriceError};
use crate::store::{
    BucketKind, Debit, DebitOutcome, Fingerprint, RefundOutcome, Settled, StoreError, TokenStore,
};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

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
}

impl Mode {
    /// Name used in responses and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::FailOpen => "fail-open",
            Mode::FailClosed => "fail-closed",
        }
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The key's bucket cannot pay the cost.
    Exhausted,
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
}

/// Bad input: refused before anything is debited.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The endpoint or method cannot be priced (no normal form, not a method).
    #[error(transparent)]
    Endpoint(#[from] PriceError),
    /// `units` is not a positive finite number within `budget.max_units`.
    #[error("units must be a finite number > 0 and <= {max}")]
    Units {
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

/// Decides checks. Shared by every request handler.
#[derive(Debug)]
pub struct Decider {
    store: Arc<dyn TokenStore>,
    prices: PriceBook,
    policy: BudgetPolicy,
    breaker: Breaker,
    timeout: Duration,
    on_failure: OnStoreFailure,
    shadow: bool,
    max_units: f64,
    metrics: Metrics,
    /// `enforcer_debit_duration_seconds{backend=…}`, looked up once instead of per decision.
    debit_duration: prometheus::Histogram,
    gate: Option<GateLink>,
    ledger: Option<Ledger>,
}

/// Why a store call produced no answer.
enum CallError {
    BreakerOpen,
    Timeout,
    Store(StoreError),
}

impl Decider {
    /// A decider over `store` with the policy, prices and failure rules of `config`; with
    /// `gate`, settled decisions are reported to the kernel gate's sync task; with `ledger`,
    /// every decision is recorded.
    pub fn new(
        config: &Config,
        store: Arc<dyn TokenStore>,
        metrics: Metrics,
        gate: Option<GateLink>,
        ledger: Option<Ledger>,
    ) -> Self {
        let debit_duration = metrics.debit_duration.with_label_values(&[store.backend()]);
        Self {
            store,
            prices: PriceBook::new(&config.pricing),
            policy: config.budget_policy(),
            breaker: Breaker::new(
                config.store.breaker_failures,
                Duration::from_millis(config.store.breaker_open_ms),
            ),
            timeout: Duration::from_millis(config.store.timeout_ms),
            on_failure: config.store.on_store_failure,
            shadow: config.budget.shadow,
            max_units: config.budget.max_units,
            debit_duration,
            metrics,
            gate,
            ledger,
        }
    }

    /// The price book (the pricing engine moves its multipliers).
    pub fn prices(&self) -> &PriceBook {
        &self.prices
    }

    /// The token store (for readiness probes).
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// Decides one check.
    pub async fn check(&self, mut check: Check) -> Result<Decision, CheckError> {
        // Priced, answered and recorded in normal form (`//a/./b/` is `/a/b`), as the upstream
        // router sees it: another spelling of a path must not change its price.
        let endpoint = self
            .prices
            .endpoint(&check.endpoint)
            .map_err(PriceError::from)?;
        let price = self.prices.price(check.method.as_deref(), &endpoint)?;
        let endpoint = String::from(endpoint);
        if !(check.units.is_finite() && check.units > 0.0 && check.units <= self.max_units) {
            return Err(CheckError::Units {
                max: self.max_units,
            });
        }
        // One read of the engine's multiplier, so the cost and the audit row agree.
        let multiplier = price.multiplier();
        let base = price.base_cost * check.units;
        let cost = base * multiplier;
        if !(cost.is_finite() && cost > 0.0 && cost <= MAX_COST) {
            return Err(CheckError::Cost { cost });
        }
        let bucket = if price.operational {
            BucketKind::Operational
        } else {
            BucketKind::Main
        };
        let kernel_id = self.gate.as_ref().map(|_| check.key.kernel_id());
        let request_id = check.request_id.take().unwrap_or_else(RequestId::generate);
        let debit = Debit {
            key: check.key.hash(),
            bucket,
            cost,
            fingerprint: Fingerprint::of(bucket, check.method.as_deref(), &endpoint, check.units),
            request_id,
        };

        let started = std::time::Instant::now();
        let result = self.call(self.store.debit(&debit)).await;
        self.debit_duration.observe(started.elapsed().as_secs_f64());

        if let (Some(gate), Some(kernel_id)) = (&self.gate, kernel_id) {
            // Shadow mode must not reject either: shadowed keys never reach the kernel's map.
            if let Ok(DebitOutcome::Settled(s)) = &result
                && bucket == BucketKind::Main
                && let Some(tier) = self.policy.tier(&s.tier)
                && !(self.shadow || tier.shadow)
            {
                gate.settled(
                    kernel_id,
                    s.remaining,
                    tier.bucket.refill_per_sec,
                    tier.bucket.max_tokens,
                );
            }
            if let Some(ip) = check.client_ip {
                gate.client(kernel_id, ip);
            }
        }
        let decision = match result {
            Ok(DebitOutcome::Settled(settled)) => {
                self.settled(settled, bucket, debit.request_id, &endpoint)
            }
            // Shadow mode allows unknown keys too, and records what it would have denied.
            Ok(DebitOutcome::UnknownKey) => Decision {
                allowed: self.shadow,
                denial: Some(Denial::UnknownKey),
                cost,
                remaining: None,
                retry_after_ms: None,
                tier: None,
                bucket: None,
                mode: if self.shadow {
                    Mode::Shadow
                } else {
                    Mode::Enforce
                },
                request_id: debit.request_id,
                replayed: false,
                decision_id: uuid::Uuid::now_v7(),
                endpoint: endpoint.clone(),
            },
            // A reused request id is a client error, not a budget decision: refused in every
            // mode, so shadow mode cannot hide a client bug that enforcement would refuse.
            Ok(DebitOutcome::Conflict) => Decision {
                allowed: false,
                denial: Some(Denial::RequestIdConflict),
                cost,
                remaining: None,
                retry_after_ms: None,
                tier: None,
                bucket: None,
                mode: Mode::Enforce,
                request_id: debit.request_id,
                replayed: false,
                decision_id: uuid::Uuid::now_v7(),
                endpoint: endpoint.clone(),
            },
            Err(_) => self.without_store(cost, debit.request_id, &endpoint),
        };
        if let Some(ledger) = &self.ledger {
            ledger.record(Entry::Decision(self.audit_row(
                &check,
                &endpoint,
                &debit.key,
                &decision,
                // A replay answers with the first decision's cost: its own multiplier.
                if decision.replayed && base > 0.0 {
                    decision.cost / base
                } else {
                    multiplier
                },
                ledger,
            )));
        }
        let outcome = match (decision.allowed, decision.denial) {
            (false, Some(Denial::UnknownKey)) => "rejected_unknown_key",
            (false, Some(Denial::RequestIdConflict)) => "request_id_conflict",
            (true, _) => "allowed",
            (false, _) => "denied",
        };
        self.metrics
            .decisions
            .with_label_values(&[
                outcome,
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
        s: Settled,
        bucket: BucketKind,
        request_id: RequestId,
        endpoint: &str,
    ) -> Decision {
        let tier = self.policy.tier(&s.tier);
        let shadow = self.shadow || tier.is_some_and(|t| t.shadow);
        let params = match bucket {
            BucketKind::Main => tier.map(|t| t.bucket),
            BucketKind::Operational => Some(self.policy.operational),
        };
        Decision {
            allowed: s.allowed || shadow,
            denial: (!s.allowed).then_some(Denial::Exhausted),
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
        }
    }

    /// The audit row of a decision.
    fn audit_row(
        &self,
        check: &Check,
        endpoint: &str,
        key: &KeyHash,
        d: &Decision,
        multiplier: f64,
        ledger: &Ledger,
    ) -> AuditRow {
        let decided_by = if d.replayed {
            "replay"
        } else {
            match d.mode {
                Mode::Enforce => self.store.backend(),
                other => other.as_str(),
            }
        };
        AuditRow {
            id: d.decision_id,
            at_us: crate::ledger::now_us(),
            key_hash: key.to_hex(),
            tier: d.tier.clone(),
            // The path as priced (normal form, without the query string, which may carry
            // secrets and would split usage).
            endpoint: endpoint.to_owned(),
            method: check.method.clone().unwrap_or_else(|| "*".to_owned()),
            units: check.units,
            cost: d.cost,
            multiplier,
            allowed: d.allowed,
            remaining: d.remaining,
            decided_by: decided_by.to_owned(),
            denial: d.denial.map(|x| x.as_str().to_owned()),
            request_id: Some(d.request_id.as_str().to_owned()),
            node: ledger.node().to_owned(),
        }
    }

    fn without_store(&self, cost: f64, request_id: RequestId, endpoint: &str) -> Decision {
        let (allowed, mode, policy) = match self.on_failure {
            OnStoreFailure::FailOpen => (true, Mode::FailOpen, "fail-open"),
            // Shadow mode never denies: it records that fail-closed would have.
            OnStoreFailure::FailClosed if self.shadow => (true, Mode::Shadow, "fail-closed"),
            OnStoreFailure::FailClosed => (false, Mode::FailClosed, "fail-closed"),
        };
        self.metrics
            .store_failure_decisions
            .with_label_values(&[policy])
            .inc();
        let would_deny = self.on_failure == OnStoreFailure::FailClosed;
        Decision {
            allowed,
            denial: would_deny.then_some(Denial::StoreUnavailable),
            cost,
            remaining: None,
            retry_after_ms: (!allowed).then(|| {
                self.breaker
                    .open_for()
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX)
            }),
            tier: None,
            bucket: None,
            mode,
            request_id,
            replayed: false,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: endpoint.to_owned(),
        }
    }

    /// Gives back the cost of an allowed request.
    pub async fn refund(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, RefundError> {
        let outcome = self
            .call(self.store.refund(key, request_id))
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
        outcome
    }

    /// Runs a store call through the breaker with the timeout, and keeps the metrics.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, CallError> {
        if !self.breaker.admit() {
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
        self.breaker.record(healthy);
        self.metrics.breaker_state.set(self.breaker.state() as i64);
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

    async fn settled_events(shadow: bool) -> usize {
        let mut config = Config::default();
        config.budget.shadow = shadow;
        let metrics = Metrics::new();
        let store = Arc::new(MemoryStore::new(
            config.budget_policy(),
            Arc::new(ManualClock::at(1000.0)),
        ));
        let (link, mut rx) = crate::kernel::sync::test_link(&metrics);
        let decider = Decider::new(&config, store, metrics, Some(link), None);
        let check = Check {
            key: ApiKey::parse("kernel-bound").expect("key"),
            endpoint: "/x".into(),
            method: None,
            client_ip: None,
            units: 900.0,
            request_id: None,
        };
        let d = decider.check(check).await.expect("valid check");
        assert_eq!(d.denial, Some(Denial::Exhausted));
        let mut n = 0;
        while let Ok(event) = rx.try_recv() {
            if matches!(event, crate::kernel::sync::Event::Settled { .. }) {
                n += 1;
            }
        }
        n
    }

    #[tokio::test]
    async fn exhausted_keys_reach_the_kernel_gate_unless_shadowed() {
        assert_eq!(settled_events(false).await, 1);
        assert_eq!(
            settled_events(true).await,
            0,
            "shadow mode never rejects, not even in the kernel"
        );
    }
}
