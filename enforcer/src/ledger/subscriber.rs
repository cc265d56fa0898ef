//! The audit ledger as a subscriber of the decider's events ([`crate::decision::event`]):
//! every decision becomes one row; what a row holds is decided here, not on the decision path.
use super::{AuditRow, Entry, Ledger};
use crate::decision::event::{Decided, Event, Subscriber};

impl Subscriber for Ledger {
    fn publish(&self, event: &Event<'_>) {
        match event {
            Event::Debit(d) | Event::Replay(d) => self.record(Entry::Decision(self.row(d))),
            // Refunds are not rows yet.
            Event::Refund(_) => {}
        }
    }
}

impl Ledger {
    /// The audit row of a decision.
    fn row(&self, d: &Decided<'_>) -> AuditRow {
        let decision = d.decision;
        AuditRow {
            id: decision.decision_id,
            at_us: super::now_us(),
            key_hash: d.key_hash.to_hex(),
            tier: decision.tier.clone(),
            // The path as priced (normal form, without the query string, which may carry
            // secrets and would split usage).
            endpoint: decision.endpoint.clone(),
            method: d.check.method.clone().unwrap_or_else(|| "*".to_owned()),
            units: d.check.units,
            cost: decision.cost,
            multiplier: d.multiplier,
            allowed: decision.allowed,
            remaining: decision.remaining,
            decided_by: d.decided_by.to_owned(),
            denial: decision.denial.map(|x| x.as_str().to_owned()),
            request_id: Some(decision.request_id.as_str().to_owned()),
            node: self.node().to_owned(),
        }
    }
}
