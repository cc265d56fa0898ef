//! Envoy's global rate-limit service API (RLS v3) over gRPC: where an Envoy (Istio, Contour,
//! Envoy Gateway, Emissary) asks "may this request pass?", as it would ask envoyproxy/ratelimit
//! or limitador. Served beside `grpc.health.v1.Health` on `[server] grpc_listen`.
//!
//! A `ShouldRateLimit` call carries descriptors: lists of `key=value` entries that Envoy's route
//! `rate_limits` actions produce. The `[envoy]` config names the entries read
//! ([`crate::config::EnvoyConfig`]): the API key, the path, the method, the client address and
//! the request id. Other entries are ignored.
//!
//! - A descriptor with a key entry is one priced item of that key: its path (or the request's,
//!   from another descriptor: they all describe one HTTP request) at `hits_addend` units (the
//!   descriptor's, else the request's; 0 or absent means 1), priced from the cost table of the
//!   request's `domain` ([`crate::price::PriceBook::for_domain`]).
//! - A key's items are decided together by [`Decider::check_all`]: one sum, one script call,
//!   all or nothing, one audit row. Several keys in one request are decided concurrently, each
//!   on its own; if any is denied, the others' charges are refunded (audited as refunds), so
//!   the request costs nothing when Envoy rejects it.
//! - A keyed descriptor carrying the `[envoy] settle_marker` entry (Envoy's stream-done call,
//!   `apply_on_stream_done`) is a **settle**, not a check: the request id's reservation is
//!   charged its true cost, `hits_addend` units ([`Decider::settle`], as `POST /v1/settle`:
//!   once per request id, capped by `max_cost`, a `settle` ledger row). A keyed
//!   `is_negative_hits` descriptor (units given back) settles the request at its checked units
//!   less `hits_addend`, floored at 0 ([`TrueCost::UnitsReturned`]). Either needs a request id
//!   and a `hits_addend` (else bad input); a call may not mix settles and checks (bad input).
//!   A settle call answers `OK` whatever the settle's outcome (Envoy ignores the answer of a
//!   stream-done call; giving tokens back never denies a request), the outcome in an
//!   `x-enforcer-settle` header per settle.
//! - A descriptor without a key entry is not ours: `OK`, no limit, as envoyproxy/ratelimit
//!   answers a descriptor that no limit matches. A request with no keyed descriptor at all
//!   answers `[envoy] missing_key` (deny by default, as a missing key header on `/v1/auth`).
//! - Bad input (a key, path, method or request id that the HTTP API would refuse with a 400)
//!   is `OVER_LIMIT` with an `x-enforcer-error` header, and nothing is charged. Never a gRPC
//!   error: Envoy's `failure_mode_deny` defaults to letting errors through, and a malformed
//!   path must not be a free pass.
//! - Store failures answer per `on_store_failure` within `store.timeout_ms` (the decider's
//!   bound), so Envoy's own failure mode applies only to a daemon that is gone.
use crate::api::App;
use crate::config::{EnvoyConfig, MissingKeyPolicy};
use crate::decision::{Check, CheckError, Decision, Denial, SettleError};
use crate::headers::RateLimitFields;
use crate::key::{ApiKey, RequestId};
use crate::store::{SettleOutcome, TrueCost};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::Instrument as _;

/// Most descriptors one call may carry (Envoy sends one per matching `rate_limits` entry:
/// a handful). More is refused as bad input: the work per call stays small whatever a peer
/// sends.
pub const MAX_DESCRIPTORS: usize = 64;

/// The `envoy.service.ratelimit.v3.RateLimitService` implementation.
#[derive(Debug, Clone)]
pub struct RateLimitApi {
    app: Arc<App>,
    mapping: Arc<EnvoyConfig>,
}

impl RateLimitApi {
    /// The service over the daemon's shared state, reading descriptors as `mapping` says.
    pub fn new(app: Arc<App>, mapping: EnvoyConfig) -> Self {
        Self {
            app,
            mapping: Arc::new(mapping),
        }
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }

    /// Answers one request; `peer` is the gRPC peer (Envoy), whose `remote_address` entry is
    /// taken only when it is a trusted proxy.
    pub async fn decide(
        &self,
        request: RateLimitRequest,
        peer: Option<SocketAddr>,
    ) -> RateLimitResponse {
        let response = match self.plan(&request, peer) {
            Ok(plan) if !plan.settles.is_empty() => {
                self.settle_all(&plan, request.descriptors.len()).await
            }
            Ok(plan) => {
                self.run(&request.domain, plan, request.descriptors.len())
                    .await
            }
            Err(refused) => {
                self.app
                    .metrics
                    .bad_requests
                    .with_label_values(&[refused.reason])
                    .inc();
                tracing::debug!(reason = refused.reason, message = %refused.message, "envoy rate-limit request refused");
                refused.response(request.descriptors.len())
            }
        };
        let code = if response.overall_code == Code::OverLimit as i32 {
            "over_limit"
        } else {
            "ok"
        };
        self.app
            .metrics
            .rls_requests
            .with_label_values(&[code])
            .inc();
        response
    }

    /// Reads the descriptors into one group of checks per key, refusing bad input before
    /// anything is charged.
    fn plan(&self, request: &RateLimitRequest, peer: Option<SocketAddr>) -> Result<Plan, Refusal> {
        let m = &*self.mapping;
        if request.descriptors.len() > MAX_DESCRIPTORS {
            return Err(Refusal::new(
                "too_many_descriptors",
                format!("at most {MAX_DESCRIPTORS} descriptors per call"),
            ));
        }
        let first = |name: &str| request.descriptors.iter().find_map(|d| entry(d, name));
        // One HTTP request: its path, method, address and id may come from any descriptor.
        let path = first(&m.path_entry);
        let method = first(&m.method_entry).map(str::to_ascii_uppercase);
        let request_id = first(&m.request_id_entry)
            .map(RequestId::parse)
            .transpose()
            .map_err(|e| Refusal::new("bad_request_id", e.to_string()))?;
        // Malformed or untrusted addresses are ignored, never refused (as on /v1/auth): the
        // decision does not depend on them, only what the kernel gate may bind.
        let offered = first(&m.address_entry).and_then(|a| a.parse::<IpAddr>().ok());
        let client_ip =
            crate::api::client_ip(&self.app, self.app.trusted_proxies.from_body(peer, offered));
        let request_hits = u64::from(request.hits_addend.max(1));

        let marker = m.settle_marker();
        let mut saw_key = false;
        let mut plan = Plan {
            groups: Vec::new(),
            slots: Vec::with_capacity(request.descriptors.len()),
            settles: Vec::new(),
        };
        for (slot, d) in request.descriptors.iter().enumerate() {
            let key = m.key_entries.iter().find_map(|k| entry(d, k));
            let marked = marker.is_some_and(|(name, value)| entry(d, name) == Some(value));
            saw_key |= key.is_some();
            let kind = match key {
                None => "keyless",
                Some(_) if d.is_negative_hits => "negative_hits",
                Some(_) if marked => "settle",
                Some(_) => "keyed",
            };
            self.app
                .metrics
                .rls_descriptors
                .with_label_values(&[kind])
                .inc();
            let Some(raw_key) = key else {
                if marked {
                    // The operator's stream-done entry lacks its key action: say so rather
                    // than let the reservation keep its estimate silently.
                    return Err(Refusal::new(
                        "missing_key",
                        "a settle descriptor (the settle marker) needs a key entry".to_owned(),
                    ));
                }
                // Not ours.
                plan.slots.push(None);
                continue;
            };
            let key = ApiKey::parse(raw_key).map_err(|e| Refusal::new("bad_key", e.to_string()))?;
            if marked || d.is_negative_hits {
                plan.settles
                    .push(self.settle_of(d, key, request_id.as_ref(), request, slot)?);
                plan.slots.push(None);
                continue;
            }
            // The descriptor's own path and method, else the request's.
            let Some(path) = entry(d, &m.path_entry).or(path) else {
                return Err(Refusal::new(
                    "bad_endpoint",
                    format!(
                        "no descriptor has a `{}` entry: add a request_headers action for :path",
                        m.path_entry
                    ),
                ));
            };
            let hits = d
                .hits_addend
                .map(|h| h.value)
                .filter(|&h| h > 0)
                .unwrap_or(request_hits);
            let check = Check {
                key,
                endpoint: path.to_owned(),
                method: entry(d, &m.method_entry)
                    .map(str::to_ascii_uppercase)
                    .or_else(|| method.clone()),
                client_ip,
                units: hits as f64,
                request_id: request_id.clone(),
                // The gRPC API has no reserve field: endpoints with `settle = "after"` reserve
                // (and a check with a request id can be settled within the idempotency ttl).
                reserve: false,
            };
            let group = match plan.groups.iter().position(|g| g[0].key == check.key) {
                Some(i) => i,
                None => {
                    plan.groups.push(Vec::new());
                    plan.groups.len() - 1
                }
            };
            plan.groups[group].push(check);
            plan.slots.push(Some(group));
        }
        if !plan.settles.is_empty() && !plan.groups.is_empty() {
            // Envoy sends stream-done entries in a call of their own: a call mixing both is a
            // stream-done entry without the marker (it would be charged as a new request), or
            // a negative-hits entry on the request path. Neither is done by halves.
            return Err(Refusal::new(
                "mixed_settle",
                "a call may not mix settles (settle marker, is_negative_hits) and checks: \
                 put the settle marker on every apply_on_stream_done entry"
                    .to_owned(),
            ));
        }
        // Several keys: a refusal gives back the others' charges under their request id, so
        // without a client's id the daemon makes one it remembers (`store.remember_generated_ids`
        // may keep no record of the ids it makes up for a single key).
        if plan.groups.len() > 1 && request_id.is_none() {
            let id = RequestId::generate_remembered();
            for group in &mut plan.groups {
                group[0].request_id = Some(id.clone());
            }
        }
        if !saw_key {
            if m.missing_key == MissingKeyPolicy::Allow {
                return Ok(plan);
            }
            return Err(Refusal::new(
                "missing_key",
                format!(
                    "no descriptor has a key entry ({})",
                    m.key_entries.join(", ")
                ),
            ));
        }
        Ok(plan)
    }

    /// A settle descriptor's key, request id (its own entry, else the request's) and true
    /// units; bad input refuses the call before anything is settled.
    fn settle_of(
        &self,
        d: &RateLimitDescriptor,
        key: ApiKey,
        request_id: Option<&RequestId>,
        request: &RateLimitRequest,
        slot: usize,
    ) -> Result<SettleItem, Refusal> {
        let m = &*self.mapping;
        let own = entry(d, &m.request_id_entry)
            .map(RequestId::parse)
            .transpose()
            .map_err(|e| Refusal::new("bad_request_id", e.to_string()))?;
        let Some(request_id) = own.or_else(|| request_id.cloned()) else {
            return Err(Refusal::new(
                "bad_request_id",
                format!(
                    "a settle needs the request id of the check it settles (a `{}` entry)",
                    m.request_id_entry
                ),
            ));
        };
        // The descriptor's hits_addend (0 included: nothing used, or nothing given back), else
        // the request's. Absent, the true units are unknown: Envoy's "absent means 1" would
        // settle a guess.
        let units = match d.hits_addend {
            Some(h) => h.value,
            None if request.hits_addend > 0 => u64::from(request.hits_addend),
            None => {
                return Err(Refusal::new(
                    "bad_settle",
                    "a settle needs hits_addend: the true units (settle marker) or the units \
                     given back (is_negative_hits)"
                        .to_owned(),
                ));
            }
        } as f64;
        let amount = if d.is_negative_hits {
            TrueCost::UnitsReturned(units)
        } else {
            TrueCost::Units(units)
        };
        amount
            .check()
            .map_err(|e| Refusal::new("bad_settle", e.to_string()))?;
        Ok(SettleItem {
            key,
            request_id,
            amount,
            slot,
        })
    }

    /// Settles each settle descriptor in order (so a repeated one is a replay), as
    /// `POST /v1/settle` does. Always `OK`: the outcome of each is an `x-enforcer-settle`
    /// header, and a settled one's balance its status's `limit_remaining`.
    async fn settle_all(&self, plan: &Plan, descriptors: usize) -> RateLimitResponse {
        let mut response = RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                };
                descriptors
            ],
            ..Default::default()
        };
        for s in &plan.settles {
            let outcome = self
                .app
                .decider
                .settle(&s.key, &s.request_id, s.amount)
                .instrument(crate::trace::settle())
                .await;
            // The HTTP API's names for the same outcomes (docs/http-api.md).
            let label = match &outcome {
                Ok(SettleOutcome::Settled {
                    replayed, balance, ..
                }) => {
                    response.statuses[s.slot].limit_remaining =
                        balance.max(0.0).min(f64::from(u32::MAX)).floor() as u32;
                    if *replayed { "replayed" } else { "settled" }
                }
                Ok(SettleOutcome::Conflict { .. }) => "settle_conflict",
                Ok(SettleOutcome::UnknownRequest) => "unknown_request",
                Ok(SettleOutcome::AlreadyRefunded) => "already_refunded",
                Ok(SettleOutcome::NotSettleable) => "not_settleable",
                Ok(SettleOutcome::UnitsUnknown) => "units_unknown",
                Ok(SettleOutcome::UnknownKey) => "unknown_key",
                Err(SettleError::BadAmount { .. }) => "bad_settle",
                Err(SettleError::Unavailable(_)) => "store_unavailable",
            };
            tracing::debug!(outcome = label, "envoy settle");
            response
                .response_headers_to_add
                .push(header("x-enforcer-settle", label.to_owned()));
        }
        response
    }

    async fn run(&self, domain: &str, mut plan: Plan, descriptors: usize) -> RateLimitResponse {
        let decider = &self.app.decider;
        let results = futures_util::future::join_all(
            plan.groups
                .iter_mut()
                .map(|checks| decider.check_all(domain, checks)),
        )
        .await;
        // Bad input in any group refuses the request: give back what the other groups charged.
        let mut decisions = Vec::with_capacity(results.len());
        let mut error: Option<CheckError> = None;
        for r in results {
            match r {
                Ok(d) => decisions.push(d),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = error {
            self.refund_charged(&plan, &decisions, None).await;
            return Refusal::new(e.reason(), e.to_string()).response(descriptors);
        }
        let denied = decisions.iter().position(|d| !d.allowed);
        if let Some(i) = denied {
            self.refund_charged(&plan, &decisions, Some(i)).await;
        }
        let conflict = decisions
            .iter()
            .any(|d| d.denial == Some(Denial::RequestIdConflict));
        let mut response = RateLimitResponse {
            overall_code: if denied.is_some() {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            statuses: plan
                .slots
                .iter()
                .map(|slot| match slot {
                    Some(g) => status(&decisions[*g]),
                    None => DescriptorStatus {
                        code: Code::Ok as i32,
                        ..Default::default()
                    },
                })
                .collect(),
            ..Default::default()
        };
        // The headers of the decision that decided: the denied one, else the first key's.
        if let Some(d) = denied
            .or((!decisions.is_empty()).then_some(0))
            .map(|i| &decisions[i])
        {
            let fields = RateLimitFields::of(d);
            let mut add = |name: &str, value: String| {
                response.response_headers_to_add.push(header(name, value));
            };
            if let Some(v) = fields.policy {
                add("ratelimit-policy", v);
            }
            if let Some(v) = fields.limit {
                add("ratelimit", v);
            }
            if let Some(v) = fields.retry_after {
                add("retry-after", v.to_string());
            }
            if !d.allowed {
                add("x-envoy-ratelimited", "true".to_owned());
            }
            if conflict {
                add("x-enforcer-error", "request_id_conflict".to_owned());
            }
            add("x-enforcer-mode", d.mode.as_str().to_owned());
        }
        response
    }

    /// Refunds the groups that were charged when the request as a whole is refused (group
    /// `except` is the one refused). A replay is not refunded: its charge belongs to the
    /// first request with that id.
    async fn refund_charged(&self, plan: &Plan, decisions: &[Decision], except: Option<usize>) {
        for (i, d) in decisions.iter().enumerate() {
            // Only what was charged: not a denial (shadow mode allows those), not a decision
            // the store never made, not a replay. Not a local (fail-soft) decision either: the
            // store does not know its id; its cost stays in the local spending debited back.
            let charged = d.allowed
                && d.denial.is_none()
                && d.remaining.is_some()
                && !d.replayed
                && d.mode != crate::decision::Mode::Local;
            if Some(i) == except || !charged {
                continue;
            }
            let key = &plan.groups[i][0].key;
            let refund = self.app.decider.refund(key, &d.request_id);
            if let Err(e) = refund.instrument(crate::trace::refund()).await {
                tracing::warn!(error = %e, "could not give back the charge of a key of a refused envoy request");
            }
        }
    }
}

/// The checks of one request: one group per key, and for each descriptor the group it
/// belongs to (`None`: not ours, or a settle); or its settles (never both).
#[derive(Debug)]
struct Plan {
    groups: Vec<Vec<Check>>,
    slots: Vec<Option<usize>>,
    settles: Vec<SettleItem>,
}

/// One settle descriptor: the request to settle and its true cost.
#[derive(Debug)]
struct SettleItem {
    key: ApiKey,
    request_id: RequestId,
    amount: TrueCost,
    /// The descriptor's place in the call (its status).
    slot: usize,
}

/// A request refused as bad input: `OVER_LIMIT`, nothing charged, the reason in a header.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }

    fn response(&self, descriptors: usize) -> RateLimitResponse {
        RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::OverLimit as i32,
                    ..Default::default()
                };
                descriptors
            ],
            response_headers_to_add: vec![header("x-enforcer-error", self.reason.to_owned())],
            ..Default::default()
        }
    }
}

fn header(name: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: name.to_owned(),
        value,
        ..Default::default()
    }
}

/// The value of a descriptor's entry `name`.
fn entry<'d>(d: &'d RateLimitDescriptor, name: &str) -> Option<&'d str> {
    d.entries
        .iter()
        .find(|e| e.key == name)
        .map(|e| e.value.as_str())
}

/// A descriptor's status from its key's decision.
fn status(d: &Decision) -> DescriptorStatus {
    let fields = RateLimitFields::of(d);
    DescriptorStatus {
        code: if d.allowed { Code::Ok } else { Code::OverLimit } as i32,
        current_limit: d.bucket.map(|b| {
            let (requests_per_unit, unit) = per_unit(b.refill_per_sec, b.max_tokens);
            RateLimit {
                name: d.tier.clone().unwrap_or_default(),
                requests_per_unit,
                unit: unit as i32,
            }
        }),
        limit_remaining: d
            .remaining
            .map_or(0, |r| r.max(0.0).min(f64::from(u32::MAX)).floor() as u32),
        duration_until_reset: fields.reset_secs.map(|s| PbDuration {
            seconds: i64::try_from(s).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A refill rate (tokens/s) as Envoy's "requests per unit": the smallest unit in which at
/// least one token refills, rounded. No refill (a prepaid tier): the capacity, unit unknown.
fn per_unit(refill_per_sec: f64, max_tokens: f64) -> (u32, Unit) {
    let clamp = |v: f64| v.round().clamp(0.0, f64::from(u32::MAX)) as u32;
    if refill_per_sec > 0.0 {
        for (secs, unit) in [
            (1.0, Unit::Second),
            (60.0, Unit::Minute),
            (3600.0, Unit::Hour),
            (86_400.0, Unit::Day),
        ] {
            if refill_per_sec * secs >= 1.0 {
                return (clamp(refill_per_sec * secs), unit);
            }
        }
        return (clamp(refill_per_sec * 86_400.0), Unit::Day);
    }
    (clamp(max_tokens), Unit::Unknown)
}

#[tonic::async_trait]
impl RateLimitService for RateLimitApi {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let peer = request.remote_addr();
        // Envoy's `traceparent` (gRPC metadata): the decisions are its span's children.
        let parent = crate::trace::grpc_parent(request.metadata());
        Ok(tonic::Response::new(
            crate::trace::within(parent, self.decide(request.into_inner(), peer)).await,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_rates_read_as_requests_per_unit() {
        assert_eq!(per_unit(10.0, 1000.0), (10, Unit::Second));
        assert_eq!(per_unit(0.5, 1000.0), (30, Unit::Minute));
        assert_eq!(per_unit(0.001, 1000.0), (4, Unit::Hour));
        assert_eq!(per_unit(0.0, 250.0), (250, Unit::Unknown));
    }
}
