//! A decision's trace ([`crate::trace`] exports it): the `decision` span, with what was decided,
//! and its children `price` and `store` (the script called, the store's clock it answered
//! with); the ledger adds `ledger.enqueue` ([`crate::trace::ledger_enqueue`]).
//!
//! Without traces every function here costs one cached check. A key is named by its hash
//! prefix only.
use super::{CallError, CheckError, Decision};
use crate::key::KeyHash;
use crate::store::{DebitOutcome, RefundOutcome, SettleOutcome};
use crate::trace::{TARGET, on};
use std::future::Future;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

/// Decides under a `decision` span (the gateway's span's child when it sent a `traceparent`:
/// [`crate::trace::within`]) and records the outcome on it.
pub(super) async fn decision(
    checks: usize,
    decide: impl Future<Output = Result<Decision, CheckError>>,
) -> Result<Decision, CheckError> {
    if !on() {
        return decide.await;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "decision",
        otel.kind = "server",
        enforcer.checks = checks,
        enforcer.key_hash = Empty,
        enforcer.endpoint = Empty,
        enforcer.tier = Empty,
        enforcer.cost = Empty,
        enforcer.allowed = Empty,
        enforcer.mode = Empty,
        enforcer.denial = Empty,
        enforcer.remaining = Empty,
        enforcer.replayed = Empty,
        enforcer.decision_id = Empty,
        enforcer.error = Empty,
    );
    let result = decide.instrument(span.clone()).await;
    match &result {
        Ok(d) => {
            span.record("enforcer.endpoint", d.endpoint.as_str());
            if let Some(tier) = &d.tier {
                span.record("enforcer.tier", tier.as_str());
            }
            span.record("enforcer.cost", d.cost);
            span.record("enforcer.allowed", d.allowed);
            span.record("enforcer.mode", d.mode.as_str());
            if let Some(denial) = d.denial {
                span.record("enforcer.denial", denial.as_str());
            }
            if let Some(remaining) = d.remaining {
                span.record("enforcer.remaining", remaining);
            }
            span.record("enforcer.replayed", d.replayed);
            span.record(
                "enforcer.decision_id",
                tracing::field::display(d.decision_id),
            );
        }
        // Bad input: refused before the store, nothing charged.
        Err(e) => {
            span.record("enforcer.error", e.reason());
        }
    }
    result
}

/// The `price` span of a decision; entered while the checks are priced.
pub(super) fn price() -> Span {
    if !on() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "price",
        enforcer.endpoint = Empty,
        enforcer.multiplier = Empty,
        enforcer.cost = Empty,
    )
}

/// Records the price on its span, and the key (by its hash prefix) on the operation's span,
/// which is current again.
pub(super) fn priced(span: &Span, endpoint: &str, multiplier: f64, cost: f64, key: &KeyHash) {
    if span.is_disabled() {
        return;
    }
    span.record("enforcer.endpoint", endpoint);
    span.record("enforcer.multiplier", multiplier);
    span.record("enforcer.cost", cost);
    self::key(key);
}

/// Names the key of the operation now traced (a decision, refund or settle) by its hash
/// prefix.
pub(super) fn key(key: &KeyHash) {
    if on() {
        Span::current().record("enforcer.key_hash", crate::trace::key_prefix(key).as_str());
    }
}

/// What a store call's span says of its answer.
pub(super) trait Answer {
    /// A short outcome.
    fn outcome(&self) -> &'static str;
    /// The store's clock of the answer (Redis `TIME`), seconds since the epoch.
    fn store_time(&self) -> Option<f64>;
}

impl Answer for DebitOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            DebitOutcome::Settled(s) if s.replayed => "replayed",
            DebitOutcome::Settled(s) if s.allowed => "allowed",
            DebitOutcome::Settled(_) => "denied",
            DebitOutcome::UnknownKey => "unknown_key",
            DebitOutcome::Conflict => "conflict",
        }
    }

    fn store_time(&self) -> Option<f64> {
        match self {
            DebitOutcome::Settled(s) => s.at,
            _ => None,
        }
    }
}

impl Answer for RefundOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            RefundOutcome::Refunded { .. } => "refunded",
            RefundOutcome::UnknownRequest => "unknown_request",
            RefundOutcome::AlreadyRefunded => "already_refunded",
            RefundOutcome::NotRefundable => "not_refundable",
        }
    }

    fn store_time(&self) -> Option<f64> {
        match self {
            RefundOutcome::Refunded { now, .. } => Some(*now),
            _ => None,
        }
    }
}

impl Answer for SettleOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            SettleOutcome::Settled { replayed: true, .. } => "replayed",
            SettleOutcome::Settled { .. } => "settled",
            SettleOutcome::Conflict { .. } => "conflict",
            SettleOutcome::UnknownRequest => "unknown_request",
            SettleOutcome::AlreadyRefunded => "already_refunded",
            SettleOutcome::NotSettleable => "not_settleable",
            SettleOutcome::UnitsUnknown => "units_unknown",
            SettleOutcome::UnknownKey => "unknown_key",
        }
    }

    fn store_time(&self) -> Option<f64> {
        match self {
            SettleOutcome::Settled { at, .. } => *at,
            _ => None,
        }
    }
}

/// A store call (through the breaker, with the timeout) as a `store` span: the backend, the
/// script (`debit`, `refund`, `settle`), the outcome and the store's clock of the answer.
pub(super) async fn store<T: Answer>(
    script: &'static str,
    backend: &'static str,
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    if !on() {
        return call.await;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "store",
        otel.kind = "client",
        otel.status_code = Empty,
        db.system.name = backend,
        enforcer.script = script,
        enforcer.outcome = Empty,
        enforcer.store_time = Empty,
    );
    let result = call.instrument(span.clone()).await;
    match &result {
        Ok(answer) => {
            span.record("enforcer.outcome", answer.outcome());
            if let Some(at) = answer.store_time() {
                span.record("enforcer.store_time", at);
            }
        }
        Err(e) => {
            span.record(
                "enforcer.outcome",
                match e {
                    CallError::BreakerOpen => "breaker_open",
                    CallError::Timeout => "timeout",
                    CallError::Store(_) => "error",
                },
            );
            span.record("otel.status_code", "ERROR");
        }
    }
    result
}
