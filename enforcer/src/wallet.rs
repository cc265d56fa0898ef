//! A key's wallet: grants that expire or carry a priority (`enforcer keys grant TOKENS
//! --expires 30d --priority N`), spent before the tier bucket, as billing systems burn down
//! promotional and prepaid credits.
//!
//! The rule (mirrored by `lua/debit.lua`, `lua/grant.lua` and `lua/inspect.lua`; the store
//! contract tests run it on every store):
//!
//! - **Spend order**: the highest `priority` first; among equal priorities the one that
//!   expires first (a grant that never expires comes after every expiring one); then the older
//!   grant. The tier bucket comes last.
//! - **Expiry**: a grant whose `expires_at` has passed (store time) vanishes with what was left
//!   of it, without touching the other grants or the bucket. The store notices it on the key's
//!   next debit, grant or settle and reports it, so the ledger writes a `grant_expiry` row with
//!   the tokens forfeited.
//! - **A debit** is allowed when the bucket (after refill) plus every live grant covers the
//!   cost; it takes from the grants in spend order, then from the bucket. Denied: nothing is
//!   taken anywhere. Each grant drawn from is reported, so the ledger writes one
//!   `grant_spend` row per grant per request.
//! - Refunds and settle credits go back to the tier bucket, capped at its capacity (as
//!   always); they do not revive a grant (it may have expired meanwhile).
//!
//! The stored form (a Redis string at `ptb:{<hash>}:w`, the same slot as the key's bucket) is
//! one line per grant, kept in spend order: `<priority> <expires_at or -> <granted_at> <left>
//! <grant id>`. Grant ids are printable ASCII without spaces ([`crate::key::RequestId`]), so
//! they never contain the separators.

/// Most grants a key's wallet holds at once: every debit of the key reads them all, so the
/// cost per decision stays bounded. A grant beyond it is refused (nothing changed).
pub const MAX_GRANTS: usize = 32;

/// One grant in a wallet.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WalletGrant {
    /// The grant's id (as given to `keys grant`, or generated).
    pub id: String,
    /// Tokens left in it.
    pub left: f64,
    /// When it expires (store time, seconds since the Unix epoch); `None`: never.
    pub expires_at: Option<f64>,
    /// Higher is spent first.
    pub priority: i64,
    /// When it was granted (store time): the tie-break, older first.
    pub granted_at: f64,
}

/// Tokens taken from, or forfeited by, one grant.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GrantMove {
    /// The grant's id.
    pub grant_id: String,
    /// Tokens.
    pub tokens: f64,
}

/// What a debit did to a wallet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrantMoves {
    /// Tokens spent from each grant, in spend order.
    pub spent: Vec<GrantMove>,
    /// Grants that expired with tokens left, and how many.
    pub expired: Vec<GrantMove>,
}

impl GrantMoves {
    /// Nothing spent, nothing expired.
    pub fn is_empty(&self) -> bool {
        self.spent.is_empty() && self.expired.is_empty()
    }
}

/// A key's grants, in spend order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wallet {
    grants: Vec<WalletGrant>,
}

/// A stored wallet that does not parse (written by a newer version, or damaged).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unreadable grant wallet line {line:?}")]
pub struct BadWallet {
    /// The line.
    pub line: String,
}

impl Wallet {
    /// The grants, in spend order.
    pub fn grants(&self) -> &[WalletGrant] {
        &self.grants
    }

    /// No grants.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Tokens left in all grants.
    pub fn total(&self) -> f64 {
        self.grants.iter().map(|g| g.left).sum()
    }

    /// Removes the grants expired at `now`; returns those that had tokens left.
    pub fn expire(&mut self, now: f64) -> Vec<GrantMove> {
        let mut gone = Vec::new();
        self.grants.retain(|g| {
            let live = g.expires_at.is_none_or(|at| at > now);
            if !live && g.left > 0.0 {
                gone.push(GrantMove {
                    grant_id: g.id.clone(),
                    tokens: g.left,
                });
            }
            live
        });
        gone
    }

    /// Takes up to `amount` from the grants in spend order (emptied grants are removed).
    /// Returns what each gave and the part of `amount` they could not cover.
    pub fn spend(&mut self, amount: f64) -> (Vec<GrantMove>, f64) {
        let mut rest = amount;
        let mut spent = Vec::new();
        for g in &mut self.grants {
            if rest <= 0.0 {
                break;
            }
            let take = g.left.min(rest);
            if take > 0.0 {
                g.left -= take;
                rest -= take;
                spent.push(GrantMove {
                    grant_id: g.id.clone(),
                    tokens: take,
                });
            }
        }
        self.grants.retain(|g| g.left > 0.0);
        (spent, rest)
    }

    /// Whether a grant with this id is in the wallet.
    pub fn contains(&self, id: &str) -> bool {
        self.grants.iter().any(|g| g.id == id)
    }

    /// Adds a grant in its place in the spend order. The caller checks [`MAX_GRANTS`].
    pub fn add(&mut self, grant: WalletGrant) {
        let at = self
            .grants
            .iter()
            .position(|g| spends_before(&grant, g))
            .unwrap_or(self.grants.len());
        self.grants.insert(at, grant);
    }

    /// The stored form (see the module header).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, g) in self.grants.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let expires = g.expires_at.map_or_else(|| "-".to_owned(), fmt);
            out.push_str(&format!(
                "{} {} {} {} {}",
                g.priority,
                expires,
                fmt(g.granted_at),
                fmt(g.left),
                g.id
            ));
        }
        out
    }

    /// Parses the stored form.
    pub fn decode(stored: &str) -> Result<Self, BadWallet> {
        let mut grants = Vec::new();
        for line in stored.split('\n').filter(|l| !l.is_empty()) {
            let bad = || BadWallet {
                line: line.to_owned(),
            };
            let mut f = line.split(' ');
            let mut next = || f.next().ok_or_else(bad);
            let priority = next()?.parse::<i64>().map_err(|_| bad())?;
            let expires_at = match next()? {
                "-" => None,
                v => Some(v.parse::<f64>().map_err(|_| bad())?),
            };
            let granted_at = next()?.parse::<f64>().map_err(|_| bad())?;
            let left = next()?.parse::<f64>().map_err(|_| bad())?;
            let id = next()?.to_owned();
            grants.push(WalletGrant {
                id,
                left,
                expires_at,
                priority,
                granted_at,
            });
        }
        Ok(Self { grants })
    }
}

/// A store time (seconds since the Unix epoch) as RFC 3339 UTC, to the second.
pub fn rfc3339(at: f64) -> String {
    chrono::DateTime::from_timestamp(at.floor() as i64, 0).map_or_else(
        || format!("{at}"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// The spend order: higher priority, then the earlier expiry (never = last), then older.
fn spends_before(a: &WalletGrant, b: &WalletGrant) -> bool {
    if a.priority != b.priority {
        return a.priority > b.priority;
    }
    match (a.expires_at, b.expires_at) {
        (Some(x), Some(y)) if x != y => return x < y,
        (Some(_), None) => return true,
        (None, Some(_)) => return false,
        _ => {}
    }
    a.granted_at < b.granted_at
}

/// As the Lua scripts print numbers (`%.17g`), so both stores write the same text.
fn fmt(x: f64) -> String {
    // Rust's shortest round-trip form reads back to the same f64, as %.17g does.
    format!("{x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: &str, left: f64, expires_at: Option<f64>, priority: i64, at: f64) -> WalletGrant {
        WalletGrant {
            id: id.to_owned(),
            left,
            expires_at,
            priority,
            granted_at: at,
        }
    }

    #[test]
    fn spend_order_is_priority_then_expiry_then_age() {
        let mut w = Wallet::default();
        w.add(g("forever", 10.0, None, 0, 1.0));
        w.add(g("late", 10.0, Some(500.0), 0, 2.0));
        w.add(g("soon", 10.0, Some(100.0), 0, 3.0));
        w.add(g("vip", 10.0, None, 5, 4.0));
        w.add(g("soon-older", 10.0, Some(100.0), 0, 0.5));
        let ids: Vec<_> = w.grants().iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["vip", "soon-older", "soon", "late", "forever"]);
    }

    #[test]
    fn spending_takes_in_order_and_reports_what_it_could_not_cover() {
        let mut w = Wallet::default();
        w.add(g("a", 30.0, Some(100.0), 0, 1.0));
        w.add(g("b", 50.0, None, 0, 2.0));
        let (spent, rest) = w.spend(45.0);
        assert_eq!(
            spent,
            [
                GrantMove {
                    grant_id: "a".into(),
                    tokens: 30.0
                },
                GrantMove {
                    grant_id: "b".into(),
                    tokens: 15.0
                }
            ]
        );
        assert_eq!(rest, 0.0);
        assert_eq!(w.grants().len(), 1, "the emptied grant is gone");
        let (_, rest) = w.spend(100.0);
        assert_eq!(rest, 65.0);
        assert!(w.is_empty());
    }

    #[test]
    fn expiry_removes_only_the_expired_and_reports_their_tokens() {
        let mut w = Wallet::default();
        w.add(g("a", 30.0, Some(100.0), 0, 1.0));
        w.add(g("b", 50.0, Some(200.0), 0, 2.0));
        assert!(w.expire(99.9).is_empty());
        assert_eq!(
            w.expire(100.0),
            [GrantMove {
                grant_id: "a".into(),
                tokens: 30.0
            }]
        );
        assert_eq!(w.total(), 50.0);
    }

    #[test]
    fn the_stored_form_round_trips_and_refuses_garbage() {
        let mut w = Wallet::default();
        w.add(g(
            "promo:2026-12",
            12.5,
            Some(1_800_000_000.25),
            -3,
            1_700_000_000.5,
        ));
        w.add(g("x", 1e15, None, 7, 1.0));
        assert_eq!(Wallet::decode(&w.encode()), Ok(w.clone()));
        assert_eq!(Wallet::decode(""), Ok(Wallet::default()));
        assert!(Wallet::decode("1 - 2").is_err());
        assert!(Wallet::decode("p - 2 3 id").is_err());
    }
}
