//! The rate-limit fields of a decision, as the gateway passes them to the client: `RateLimit`
//! and `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers) and `Retry-After`. One
//! computation for the HTTP API and Envoy's rate-limit API, so both answer alike.
//!
//! `RateLimit`'s `t` is, as the draft defines it, the seconds until more quota is made
//! available: refill is what does that. A bucket without refill (a prepaid tier) gets more only
//! from an operator's grant, at no time anyone can name, so its `RateLimit` has no `t` (the
//! parameter is optional; `t=0` would say "available now") and Envoy gets no
//! `duration_until_reset`. `Retry-After` is never earlier than `t` (the draft's rule).
use crate::decision::{Decision, Denial};
use std::fmt::Write as _;

/// Bytes reserved for one field's value: a tier name and a few numbers, twice with a quota.
const FIELD_CAPACITY: usize = 96;

/// `Retry-After` when refill never covers the cost (a prepaid key, a cost above capacity): the
/// client should not retry soon, and an operator grant is what helps. (When the bucket takes
/// longer than this to fill, the time until full: never earlier than `RateLimit`'s `t`.)
pub const RETRY_AFTER_NEVER_SECS: u64 = 3600;

/// The fields of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitFields {
    /// `RateLimit-Policy`: `"tier";q=<capacity>[;w=<seconds to refill from empty>]`.
    pub policy: Option<String>,
    /// `RateLimit`: `"tier";r=<remaining>[;t=<seconds until reset>]`.
    pub limit: Option<String>,
    /// Seconds until the bucket is full again, or (denied) until the cost is affordable:
    /// `t` of `RateLimit` (Envoy's `duration_until_reset`); `None` without refill, when only
    /// a grant adds tokens.
    pub reset_secs: Option<u64>,
    /// `Retry-After` in seconds, on a denial the client can retry (not an unknown key).
    pub retry_after: Option<u64>,
}

/// Seconds for a header: whole seconds, rounded up, at least 1.
pub fn header_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

impl RateLimitFields {
    /// The fields of `d`.
    pub fn of(d: &Decision) -> Self {
        let tier = d.tier.as_deref().unwrap_or("unknown");
        let mut fields = Self {
            policy: None,
            limit: None,
            reset_secs: None,
            retry_after: None,
        };
        if let (Some(bucket), Some(remaining)) = (d.bucket, d.remaining) {
            // Written into buffers sized for them (a `format!` per part allocated each anew);
            // writing into a `String` cannot fail.
            let mut policy = String::with_capacity(FIELD_CAPACITY);
            let _ = write!(policy, "\"{tier}\";q={}", bucket.max_tokens.floor() as u64);
            if let Some(w) = bucket.window_secs() {
                let _ = write!(policy, ";w={w}");
            }
            let reset = match d.retry_after_ms {
                Some(ms) if !d.allowed => Some(header_secs(ms)),
                _ if bucket.refill_per_sec > 0.0 => Some(
                    ((bucket.max_tokens - remaining).max(0.0) / bucket.refill_per_sec).ceil()
                        as u64,
                ),
                // No refill: no time at which more quota comes, only a grant.
                _ => None,
            };
            let mut limit = String::with_capacity(FIELD_CAPACITY);
            let _ = write!(limit, "\"{tier}\";r={}", remaining.max(0.0).floor() as u64);
            if let Some(t) = reset {
                let _ = write!(limit, ";t={t}");
            }
            // A calendar quota is a second policy of the same key: `"<tier>-quota";q=<amount>`
            // and `"<tier>-quota";r=<left>;t=<seconds until the period resets>`.
            if let Some(q) = d.quota {
                let _ = write!(policy, ", \"{tier}-quota\";q={}", q.amount.floor() as u64);
                let _ = write!(
                    limit,
                    ", \"{tier}-quota\";r={};t={}",
                    (q.amount - q.used).max(0.0).floor() as u64,
                    header_secs(q.resets_in_ms)
                );
            }
            fields.limit = Some(limit);
            fields.policy = Some(policy);
            fields.reset_secs = reset;
        }
        if !d.allowed && d.denial != Some(Denial::UnknownKey) {
            fields.retry_after = Some(match d.retry_after_ms {
                Some(ms) => header_secs(ms),
                None => RETRY_AFTER_NEVER_SECS.max(fields.reset_secs.unwrap_or(0)),
            });
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BucketParams;
    use crate::decision::Mode;
    use crate::key::RequestId;

    fn bucket(max_tokens: f64, refill_per_sec: f64) -> BucketParams {
        BucketParams {
            max_tokens,
            refill_per_sec,
            idle_cap: 1.0,
            initial_tokens: max_tokens,
        }
    }

    fn decision(
        allowed: bool,
        remaining: f64,
        retry_after_ms: Option<u64>,
        b: BucketParams,
    ) -> Decision {
        Decision {
            allowed,
            denial: (!allowed).then_some(Denial::Exhausted),
            cost: 10.0,
            remaining: Some(remaining),
            retry_after_ms,
            tier: Some("t".to_owned()),
            bucket: Some(b),
            mode: Mode::Enforce,
            request_id: RequestId::generate(),
            replayed: false,
            decision_id: uuid::Uuid::now_v7(),
            endpoint: "/x".to_owned(),
            reserved: false,
            quota: None,
            candidate: None,
        }
    }

    #[test]
    fn a_quota_denial_names_the_reset_in_every_header() {
        // The bucket could pay; the monthly quota cannot until it resets in 10 days.
        let reset_ms = 10 * 86_400_000 + 1;
        let mut d = decision(false, 60.0, Some(reset_ms), bucket(100.0, 1.0));
        d.denial = Some(Denial::QuotaExhausted);
        d.quota = Some(crate::store::QuotaUse {
            used: 995.0,
            amount: 1000.0,
            resets_at: 0.0,
            resets_in_ms: reset_ms,
        });
        let f = RateLimitFields::of(&d);
        let secs = header_secs(reset_ms);
        assert_eq!(f.retry_after, Some(secs));
        assert_eq!(f.reset_secs, Some(secs));
        assert_eq!(
            f.limit.as_deref(),
            Some(format!("\"t\";r=60;t={secs}, \"t-quota\";r=5;t={secs}").as_str())
        );
        assert_eq!(
            f.policy.as_deref(),
            Some("\"t\";q=100;w=100, \"t-quota\";q=1000")
        );
    }

    #[test]
    fn a_denial_refill_pays_says_the_same_time_in_both_headers() {
        let f = RateLimitFields::of(&decision(false, 6.0, Some(3500), bucket(100.0, 1.0)));
        assert_eq!(f.limit.as_deref(), Some("\"t\";r=6;t=4"));
        assert_eq!(f.reset_secs, Some(4));
        assert_eq!(f.retry_after, Some(4));
        assert_eq!(f.policy.as_deref(), Some("\"t\";q=100;w=100"));
    }

    #[test]
    fn without_refill_there_is_no_reset_time_and_retry_after_says_not_soon() {
        // A prepaid key with no credit: nothing but an operator grant makes quota available,
        // so `RateLimit` names no time (the draft's `t` is optional) rather than claiming 0,
        // and `Retry-After` asks the client to stay away, never earlier than a reset.
        let drained = RateLimitFields::of(&decision(false, 0.0, None, bucket(10.0, 0.0)));
        assert_eq!(drained.limit.as_deref(), Some("\"t\";r=0"));
        assert_eq!(drained.reset_secs, None);
        assert_eq!(drained.retry_after, Some(RETRY_AFTER_NEVER_SECS));
        assert_eq!(drained.policy.as_deref(), Some("\"t\";q=10"));
        // Allowed: the same, no time at which more comes.
        let allowed = RateLimitFields::of(&decision(true, 4.0, Some(0), bucket(10.0, 0.0)));
        assert_eq!(allowed.limit.as_deref(), Some("\"t\";r=4"));
        assert_eq!(allowed.reset_secs, None);
        assert_eq!(allowed.retry_after, None);
    }

    #[test]
    fn a_cost_above_capacity_never_retries_before_the_reset() {
        // Refill comes back (full in 50 s), but never enough for this cost.
        let f = RateLimitFields::of(&decision(false, 50.0, None, bucket(100.0, 1.0)));
        assert_eq!(f.limit.as_deref(), Some("\"t\";r=50;t=50"));
        assert_eq!(f.retry_after, Some(RETRY_AFTER_NEVER_SECS));
        // A bucket that takes longer than an hour to fill: Retry-After is not earlier than t.
        let slow = RateLimitFields::of(&decision(false, 0.0, None, bucket(10_000.0, 1.0)));
        assert_eq!(slow.reset_secs, Some(10_000));
        assert_eq!(slow.retry_after, Some(10_000));
    }

    #[test]
    fn an_allowed_request_names_the_time_until_full() {
        let f = RateLimitFields::of(&decision(true, 40.0, Some(0), bucket(100.0, 2.0)));
        assert_eq!(f.limit.as_deref(), Some("\"t\";r=40;t=30"));
        assert_eq!(f.retry_after, None);
    }
}
