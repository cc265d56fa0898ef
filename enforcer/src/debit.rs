//! The PTB-CWD debit: refill, idle cap, charge. This is the reference arithmetic; the in-process
//! store calls it directly and `lua/debit.lua` mirrors it line by line (the store contract tests
//! run the same cases against both).
//!
//! The rule, with `elapsed` = seconds since the bucket was last touched:
//!
//! 1. `ceiling = max_tokens` if `elapsed <= active_window`, else `idle_cap × max_tokens`;
//! 2. if `balance < ceiling`: `balance = min(ceiling, balance + elapsed × refill_per_sec)`
//!    (refill never pushes past the ceiling, and never takes away what is already there, so
//!    granted or prepaid credits survive idleness);
//! 3. if `balance >= cost` the request is allowed and `balance -= cost`; otherwise it is denied,
//!    nothing is charged, and `retry_after = ceil((cost − balance) / refill_per_sec)` unless the
//!    cost can never be met by refill (cost above capacity, or no refill);
//! 4. the bucket is written back with `updated_at = now` either way.
//!
//! A **forced** debit ([`force`]) skips the test of step 3: it charges spending that already
//! happened (fail-soft decisions taken while the store was unreachable, `decision/local.rs`), so the
//! balance may go below zero; the key then waits for refill to pay the debt.

use crate::budget::BucketParams;

/// A bucket as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens available as of `updated_at`.
    pub balance: f64,
    /// Seconds since the Unix epoch (Redis `TIME` in production).
    pub updated_at: f64,
}

/// The result of one debit against one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settlement {
    /// Whether the cost was charged.
    pub allowed: bool,
    /// The bucket after the decision.
    pub state: BucketState,
    /// When denied: milliseconds until refill covers the cost; `None` if it never will.
    pub retry_after_ms: Option<u64>,
}

/// Applies one debit of `cost` at time `now` to `state` (`None`: a new key).
pub fn settle(
    state: Option<BucketState>,
    params: &BucketParams,
    active_window: f64,
    now: f64,
    cost: f64,
) -> Settlement {
    let balance = refilled(state, params, active_window, now);
    if balance >= cost {
        Settlement {
            allowed: true,
            state: BucketState {
                balance: balance - cost,
                updated_at: now,
            },
            retry_after_ms: Some(0),
        }
    } else {
        Settlement {
            allowed: false,
            state: BucketState {
                balance,
                updated_at: now,
            },
            retry_after_ms: retry_after_ms(balance, params, cost),
        }
    }
}

/// Applies a forced debit of `cost` at time `now`: charged whatever the balance (which may go
/// below zero).
pub fn force(
    state: Option<BucketState>,
    params: &BucketParams,
    active_window: f64,
    now: f64,
    cost: f64,
) -> Settlement {
    let balance = refilled(state, params, active_window, now);
    Settlement {
        allowed: true,
        state: BucketState {
            balance: balance - cost,
            updated_at: now,
        },
        retry_after_ms: Some(0),
    }
}

/// A debit of the main bucket together with the key's wallet ([`crate::wallet`]): grants
/// expired at `now` are dropped first; then the cost is allowed when the bucket (after refill)
/// plus the live grants cover it (or it is forced), and is taken from the grants in spend
/// order, the rest from the bucket. Denied: nothing is taken. `retry_after_ms` counts the
/// grants as they are now (one that expires meanwhile makes the retry early, never late by
/// more than the refill it then needs).
pub fn debit_with_wallet(
    state: Option<BucketState>,
    params: &BucketParams,
    active_window: f64,
    now: f64,
    cost: f64,
    forced: bool,
    wallet: &mut crate::wallet::Wallet,
) -> (Settlement, crate::wallet::GrantMoves) {
    let expired = wallet.expire(now);
    let held = wallet.total();
    let balance = refilled(state, params, active_window, now);
    if forced || balance + held >= cost {
        let (spent, rest) = wallet.spend(cost);
        (
            Settlement {
                allowed: true,
                state: BucketState {
                    balance: balance - rest,
                    updated_at: now,
                },
                retry_after_ms: Some(0),
            },
            crate::wallet::GrantMoves { spent, expired },
        )
    } else {
        (
            Settlement {
                allowed: false,
                state: BucketState {
                    balance,
                    updated_at: now,
                },
                retry_after_ms: retry_after_ms(balance, params, cost - held),
            },
            crate::wallet::GrantMoves {
                spent: Vec::new(),
                expired,
            },
        )
    }
}

/// Seconds after which a bucket holding `balance` may be forgotten (see
/// [`BucketParams::forget_after`]); a balance below zero (a forced debit) is kept until refill
/// has paid the debt too, so forgetting never forgives it.
///
/// A balance above what refill can reach (`idle_cap × max_tokens`: an operator's grant) is
/// never forgotten: a forgotten bucket starts again at `initial_tokens`, which would take the
/// granted credits away.
pub fn forget_after(params: &BucketParams, active_window: f64, balance: f64) -> Option<f64> {
    if balance > params.max_tokens * params.idle_cap {
        return None;
    }
    params
        .forget_after(active_window)
        .map(|secs| secs + (-balance).max(0.0) / params.refill_per_sec)
}

/// The balance at `now` after refill and the idle cap (steps 1 and 2).
pub fn refilled(
    state: Option<BucketState>,
    params: &BucketParams,
    active_window: f64,
    now: f64,
) -> f64 {
    let Some(state) = state else {
        return params.initial_tokens;
    };
    let elapsed = (now - state.updated_at).max(0.0);
    let ceiling = if elapsed <= active_window {
        params.max_tokens
    } else {
        params.max_tokens * params.idle_cap
    };
    if state.balance < ceiling {
        ceiling.min(state.balance + elapsed * params.refill_per_sec)
    } else {
        state.balance
    }
}

fn retry_after_ms(balance: f64, params: &BucketParams, cost: f64) -> Option<u64> {
    if params.refill_per_sec <= 0.0 || cost > params.max_tokens {
        return None;
    }
    Some(((cost - balance) / params.refill_per_sec * 1000.0).ceil() as u64)
}

/// Settles a request at its true cost at `now`: refill is applied first (as a debit does),
/// then `difference = true cost − estimate` is charged whatever the balance (the work is done:
/// the balance may go below zero), or, when negative, credited back capped like a refund
/// ([`credit`]). Returns the bucket afterwards and the tokens moved (negative: credited).
pub fn adjust(
    state: Option<BucketState>,
    params: &BucketParams,
    active_window: f64,
    now: f64,
    difference: f64,
) -> (BucketState, f64) {
    let balance = refilled(state, params, active_window, now);
    let after = if difference >= 0.0 {
        balance - difference
    } else {
        credit(balance, params.max_tokens, -difference)
    };
    (
        BucketState {
            balance: after,
            updated_at: now,
        },
        balance - after,
    )
}

/// Adds a refund to a balance: capped at capacity, but never lowering a balance above it.
pub fn credit(balance: f64, max_tokens: f64, amount: f64) -> f64 {
    if balance >= max_tokens {
        balance
    } else {
        max_tokens.min(balance + amount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: BucketParams = BucketParams {
        max_tokens: 1000.0,
        refill_per_sec: 10.0,
        idle_cap: 0.8,
        initial_tokens: 800.0,
    };

    #[test]
    fn new_key_starts_at_initial_tokens() {
        let s = settle(None, &FREE, 60.0, 100.0, 120.0);
        assert!(s.allowed);
        assert_eq!(s.state.balance, 680.0);
    }

    #[test]
    fn denial_charges_nothing_and_says_when() {
        let state = BucketState {
            balance: 20.0,
            updated_at: 100.0,
        };
        let s = settle(Some(state), &FREE, 60.0, 100.0, 120.0);
        assert!(!s.allowed);
        assert_eq!(s.state.balance, 20.0);
        assert_eq!(s.retry_after_ms, Some(10_000));
    }

    #[test]
    fn active_key_refills_to_capacity_idle_key_to_idle_cap() {
        let state = BucketState {
            balance: 900.0,
            updated_at: 0.0,
        };
        // 30 s later: active, refill up to 1000.
        assert_eq!(refilled(Some(state), &FREE, 60.0, 30.0), 1000.0);
        // 600 s later: idle, refill stops at 800; the 900 already there is kept.
        assert_eq!(refilled(Some(state), &FREE, 60.0, 600.0), 900.0);
        let low = BucketState {
            balance: 100.0,
            updated_at: 0.0,
        };
        assert_eq!(refilled(Some(low), &FREE, 60.0, 600.0), 800.0);
    }

    #[test]
    fn cost_above_capacity_or_no_refill_never_retries() {
        let state = BucketState {
            balance: 0.0,
            updated_at: 0.0,
        };
        assert_eq!(
            settle(Some(state), &FREE, 60.0, 0.0, 5000.0).retry_after_ms,
            None
        );
        let prepaid = BucketParams {
            refill_per_sec: 0.0,
            initial_tokens: 0.0,
            ..FREE
        };
        assert_eq!(settle(None, &prepaid, 60.0, 0.0, 1.0).retry_after_ms, None);
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let state = BucketState {
            balance: 10.0,
            updated_at: 100.0,
        };
        assert_eq!(refilled(Some(state), &FREE, 60.0, 50.0), 10.0);
    }

    #[test]
    fn forced_debit_goes_below_zero_and_is_kept_until_paid() {
        let state = BucketState {
            balance: 50.0,
            updated_at: 100.0,
        };
        let s = force(Some(state), &FREE, 60.0, 100.0, 120.0);
        assert!(s.allowed);
        assert_eq!(s.state.balance, -70.0);
        // 60 s window + 100 s to refill 1000 at 10/s, + 7 s to pay the 70 owed.
        assert_eq!(forget_after(&FREE, 60.0, -70.0), Some(167.0));
        assert_eq!(forget_after(&FREE, 60.0, 500.0), Some(160.0));
    }

    #[test]
    fn a_settle_charges_the_difference_below_zero_or_credits_it_capped() {
        let state = BucketState {
            balance: 100.0,
            updated_at: 100.0,
        };
        // Charged more than the balance holds: the work is done, the debt stays.
        assert_eq!(
            adjust(Some(state), &FREE, 60.0, 100.0, 250.0),
            (
                BucketState {
                    balance: -150.0,
                    updated_at: 100.0
                },
                250.0
            )
        );
        // Refill first (1 s at 10/s), then the credit, capped at capacity.
        let full = BucketState {
            balance: 950.0,
            updated_at: 99.0,
        };
        assert_eq!(
            adjust(Some(full), &FREE, 60.0, 100.0, -400.0).1,
            -40.0,
            "960 credited up to 1000"
        );
    }

    #[test]
    fn grants_pay_first_and_a_denial_takes_nothing() {
        use crate::wallet::{Wallet, WalletGrant};
        let mut w = Wallet::default();
        w.add(WalletGrant {
            id: "promo".into(),
            left: 50.0,
            expires_at: Some(200.0),
            priority: 0,
            granted_at: 0.0,
        });
        let state = BucketState {
            balance: 100.0,
            updated_at: 100.0,
        };
        // 120 = 50 from the grant + 70 from the bucket.
        let (s, moves) = debit_with_wallet(Some(state), &FREE, 60.0, 100.0, 120.0, false, &mut w);
        assert!(s.allowed);
        assert_eq!(s.state.balance, 30.0);
        assert_eq!(moves.spent.len(), 1);
        assert!(w.is_empty());
        // 200 > 30 + nothing: denied, and refill alone must bring 170 (17 s at 10/s).
        let (s, moves) = debit_with_wallet(Some(s.state), &FREE, 60.0, 100.0, 200.0, false, &mut w);
        assert!(!s.allowed);
        assert_eq!(s.state.balance, 30.0);
        assert!(moves.is_empty());
        assert_eq!(s.retry_after_ms, Some(17_000));
    }

    #[test]
    fn an_expired_grant_pays_nothing_and_is_reported() {
        use crate::wallet::{Wallet, WalletGrant};
        let mut w = Wallet::default();
        w.add(WalletGrant {
            id: "old".into(),
            left: 500.0,
            expires_at: Some(100.0),
            priority: 9,
            granted_at: 0.0,
        });
        let state = BucketState {
            balance: 10.0,
            updated_at: 100.0,
        };
        let (s, moves) = debit_with_wallet(Some(state), &FREE, 60.0, 100.0, 20.0, false, &mut w);
        assert!(!s.allowed);
        assert_eq!(moves.expired.len(), 1);
        assert_eq!(moves.expired[0].tokens, 500.0);
        assert!(w.is_empty());
    }

    #[test]
    fn credit_caps_at_capacity() {
        assert_eq!(credit(950.0, 1000.0, 120.0), 1000.0);
        assert_eq!(credit(1200.0, 1000.0, 120.0), 1200.0);
        assert_eq!(credit(100.0, 1000.0, 120.0), 220.0);
    }
}
