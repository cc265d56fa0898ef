//! The audit ledger as a subscriber of the decider's events ([`crate::decision::event`]):
//! every decision becomes one row, and so does every refund (`kind = refund`); what a row holds
//! is decided here, not on the decision path.
use super::{AuditRow, Entry, Ledger, RowKind};
use crate::decision::event::{
    DebitedBack, Decided, Event, Granted, Refunded, SettledCost, Subscriber,
};
use crate::store::BucketKind;
use crate::wallet::GrantMove;

impl Subscriber for Ledger {
    fn publish(&self, event: &Event<'_>) {
        let _span = crate::trace::ledger_enqueue().entered();
        self.count_tokens(event);
        let row = match event {
            Event::Debit(d) | Event::Replay(d) => self.decision_row(d),
            Event::Refund(r) => self.refund_row(r),
            Event::DebitBack(b) => self.debit_back_row(b),
            Event::Grant(g) => self.grant_row(g),
            Event::Settle(st) => self.settle_row(st),
            // Not a change of tokens: the admin API logs and counts it.
            Event::TierChanged(_) => return,
        };
        // What wallet grants paid, and what they forfeited, each its own row after the
        // charge's (a key without grants: none).
        let (spent, expired): (&[GrantMove], &[GrantMove]) = match event {
            Event::Debit(d) => (&d.grants.spent, &d.grants.expired),
            Event::DebitBack(b) => (&b.grants.spent, &b.grants.expired),
            Event::Grant(g) => (&[], g.expired),
            _ => (&[], &[]),
        };
        let extra: Vec<AuditRow> = spent
            .iter()
            .map(|m| self.grant_spend_row(&row, m))
            .chain(expired.iter().map(|m| self.grant_expiry_row(&row, m)))
            .collect();
        self.record(Entry::Decision(row));
        for row in extra {
            self.record(Entry::Decision(row));
        }
    }
}

impl Ledger {
    /// `enforcer_tokens_charged_total` and `enforcer_tokens_refunded_total`: what the rows
    /// below say moved in main buckets. A debit counts only when the store settled it and
    /// allowed it (a denial, shadow mode's would-be denial, a fail-open or fail-closed answer
    /// charge nothing, a replay charged the first time); a fail-soft decision is charged when
    /// its debit-back reaches the store, so it is not counted twice.
    fn count_tokens(&self, event: &Event<'_>) {
        let (counter, tier, tokens) = match event {
            Event::Debit(d)
                if d.bucket == BucketKind::Main
                    && d.settled.is_some()
                    && d.decision.allowed
                    && d.decision.denial.is_none() =>
            {
                let Some(tier) = d.decision.tier.as_deref() else {
                    return;
                };
                (&self.metrics.tokens_charged, tier, d.decision.cost)
            }
            Event::DebitBack(b) if b.bucket == BucketKind::Main => {
                (&self.metrics.tokens_charged, b.tier, b.amount)
            }
            Event::Refund(r) => (&self.metrics.tokens_refunded, r.tier, r.credited),
            // A settle charges the difference, or credits it back (as a refund does).
            Event::Settle(st) if st.charged >= 0.0 => {
                (&self.metrics.tokens_charged, st.tier, st.charged)
            }
            Event::Settle(st) => (&self.metrics.tokens_refunded, st.tier, -st.charged),
            _ => return,
        };
        // A counter only grows (the prometheus crate asserts it in debug builds): an amount
        // that is not a positive number is left out, never a panic.
        if tokens.is_finite() && tokens > 0.0 {
            counter.with_label_values(&[tier]).inc_by(tokens);
        }
    }

    /// The audit row of a decision.
    fn decision_row(&self, d: &Decided<'_>) -> AuditRow {
        let decision = d.decision;
        let at_us = super::now_us();
        AuditRow {
            id: decision.decision_id,
            at_us,
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
            kind: RowKind::Debit,
            // Whose request it was, for a dispute: only ever an address a trusted proxy named.
            client_ip: d.check.client_ip,
            note: None,
            operator: None,
            true_cost: None,
            // A reservation says so, and when it expires unsettled (the expiry job's input).
            settle_by_us: if decision.reserved {
                self.settle_by_us(at_us)
            } else {
                None
            },
            // The shadow candidate's would-be decision beside the real one.
            candidate_allowed: decision.candidate.map(|c| c.allowed),
            candidate_cost: decision.candidate.map(|c| c.cost),
        }
    }

    /// The audit row of a refund: the tokens credited back, under the refunded request's id
    /// (its debit row names the endpoint; `enforcer audit usage` attributes the refund to it).
    fn refund_row(&self, r: &Refunded<'_>) -> AuditRow {
        AuditRow {
            id: r.id,
            at_us: super::now_us(),
            key_hash: r.key_hash.to_hex(),
            tier: Some(r.tier.to_owned()),
            endpoint: String::new(),
            method: "*".to_owned(),
            units: 0.0,
            cost: r.credited,
            multiplier: 1.0,
            allowed: true,
            remaining: r.balance,
            decided_by: r.store.to_owned(),
            denial: None,
            request_id: Some(r.request_id.as_str().to_owned()),
            node: self.node().to_owned(),
            kind: RowKind::Refund,
            client_ip: None,
            note: None,
            operator: None,
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
        }
    }

    /// The audit row of a debit-back: the tokens local (fail-soft) decisions spent, charged to
    /// the shared bucket; `decided_by = "debit-back"`, under the debit-back's own request id
    /// (the local decisions' rows, `decided_by = "local"`, name the endpoints).
    fn debit_back_row(&self, b: &DebitedBack<'_>) -> AuditRow {
        AuditRow {
            id: b.id,
            at_us: super::now_us(),
            key_hash: b.key_hash.to_hex(),
            tier: Some(b.tier.to_owned()),
            endpoint: String::new(),
            method: "*".to_owned(),
            units: 0.0,
            cost: b.amount,
            multiplier: 1.0,
            allowed: true,
            remaining: b.balance,
            decided_by: "debit-back".to_owned(),
            denial: None,
            request_id: Some(b.request_id.as_str().to_owned()),
            node: self.node().to_owned(),
            kind: RowKind::Debit,
            client_ip: None,
            note: None,
            operator: None,
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
        }
    }

    /// The audit row of an operator's grant: the tokens granted, the balance after, the grant
    /// id as `request_id`, and the operator's note and uid.
    fn grant_row(&self, g: &Granted<'_>) -> AuditRow {
        AuditRow {
            id: g.id,
            at_us: super::now_us(),
            key_hash: g.key_hash.to_hex(),
            tier: Some(g.tier.to_owned()),
            endpoint: String::new(),
            method: "*".to_owned(),
            units: 0.0,
            cost: g.tokens,
            multiplier: 1.0,
            allowed: true,
            remaining: Some(g.balance),
            decided_by: g.store.to_owned(),
            denial: None,
            request_id: Some(g.grant_id.as_str().to_owned()),
            node: self.node().to_owned(),
            kind: RowKind::Grant,
            client_ip: None,
            // A wallet grant's terms follow the operator's reason.
            note: Some(match (g.expires_at, g.priority) {
                (None, None) => g.note.to_owned(),
                (Some(at), p) => format!(
                    "{} [expires {}, priority {}]",
                    g.note,
                    crate::wallet::rfc3339(at),
                    p.unwrap_or(0)
                ),
                (None, Some(p)) => format!("{} [never expires, priority {p}]", g.note),
            }),
            operator: Some(g.operator.to_owned()),
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
        }
    }

    /// The row of the part of `charge`'s cost that a wallet grant paid: under the request's
    /// id and endpoint, the grant id in `note`.
    fn grant_spend_row(&self, charge: &AuditRow, m: &GrantMove) -> AuditRow {
        AuditRow {
            id: uuid::Uuid::now_v7(),
            kind: RowKind::GrantSpend,
            cost: m.tokens,
            units: 0.0,
            multiplier: 1.0,
            allowed: true,
            denial: None,
            note: Some(m.grant_id.clone()),
            operator: None,
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
            ..charge.clone()
        }
    }

    /// The row of a wallet grant found expired (by a debit or grant: `noticed`): the tokens
    /// forfeited, under the grant's id.
    fn grant_expiry_row(&self, noticed: &AuditRow, m: &GrantMove) -> AuditRow {
        AuditRow {
            id: uuid::Uuid::now_v7(),
            kind: RowKind::GrantExpiry,
            cost: m.tokens,
            units: 0.0,
            multiplier: 1.0,
            allowed: true,
            denial: None,
            endpoint: String::new(),
            method: "*".to_owned(),
            request_id: Some(m.grant_id.clone()),
            client_ip: None,
            note: Some("expired".to_owned()),
            operator: None,
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
            ..noticed.clone()
        }
    }

    /// The audit row of a settle: the difference charged now (negative: credited back) as
    /// `cost`, the true cost in all as `true_cost`, under the settled request's id (its debit
    /// row, the estimate, names the endpoint; `enforcer audit usage` attributes the settle to
    /// it). A cost cut to the endpoint's `max_cost` says so in `note`.
    fn settle_row(&self, st: &SettledCost<'_>) -> AuditRow {
        AuditRow {
            id: st.id,
            at_us: super::now_us(),
            key_hash: st.key_hash.to_hex(),
            tier: Some(st.tier.to_owned()),
            endpoint: String::new(),
            method: "*".to_owned(),
            units: 0.0,
            cost: st.charged,
            multiplier: 1.0,
            allowed: true,
            remaining: Some(st.balance),
            decided_by: st.store.to_owned(),
            denial: None,
            request_id: Some(st.request_id.as_str().to_owned()),
            node: self.node().to_owned(),
            kind: RowKind::Settle,
            client_ip: None,
            note: st.capped.then(|| "capped at max_cost".to_owned()),
            operator: None,
            true_cost: Some(st.cost),
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
        }
    }
}
