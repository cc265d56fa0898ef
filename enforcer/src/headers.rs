//! The rate-limit fields of a decision, as the gateway passes them to the client: `RateLimit`
//! and `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers) and `Retry-After`. One
//! computation for the HTTP API and Envoy's rate-limit API, so both answer alike.
use crate::decision::{Decision, Denial};

/// `Retry-After` when refill never covers the cost (a prepaid key, a cost above capacity): the
/// client should not retry soon, and an operator grant is what helps.
pub const RETRY_AFTER_NEVER_SECS: u64 = 3600;

/// The fields of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitFields {
    /// `RateLimit-Policy`: `"tier";q=<capacity>[;w=<seconds to refill from empty>]`.
    pub policy: Option<String>,
    /// `RateLimit`: `"tier";r=<remaining>;t=<seconds until reset>`.
    pub limit: Option<String>,
    /// Seconds until the bucket is full again, or (denied) until the cost is affordable:
    /// `t` of `RateLimit` (Envoy's `duration_until_reset`).
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
            let mut policy = format!("\"{tier}\";q={}", bucket.max_tokens.floor() as u64);
            if let Some(w) = bucket.window_secs() {
                policy.push_str(&format!(";w={w}"));
            }
            let reset = if d.allowed || d.retry_after_ms.is_none() {
                if bucket.refill_per_sec > 0.0 {
                    ((bucket.max_tokens - remaining).max(0.0) / bucket.refill_per_sec).ceil() as u64
                } else {
                    0
                }
            } else {
                d.retry_after_ms.map(header_secs).unwrap_or(0)
            };
            fields.limit = Some(format!(
                "\"{tier}\";r={};t={reset}",
                remaining.max(0.0).floor() as u64
            ));
            fields.policy = Some(policy);
            fields.reset_secs = Some(reset);
        }
        if !d.allowed && d.denial != Some(Denial::UnknownKey) {
            fields.retry_after = Some(
                d.retry_after_ms
                    .map(header_secs)
                    .unwrap_or(RETRY_AFTER_NEVER_SECS),
            );
        }
        fields
    }
}
