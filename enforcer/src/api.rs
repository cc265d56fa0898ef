//! The HTTP decision API.
//!
//! - `POST /v1/check`: JSON check → 200 allowed, 429 denied, 403 unknown key (when refused);
//! - `GET /v1/auth`: the same for nginx `auth_request` and Traefik `forwardAuth` (headers in);
//! - `POST /v1/refund`: give back the cost of a request the upstream failed;
//! - `POST /v1/settle`: charge the true cost of a reserved request (docs/credits.md);
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! Every decision carries `RateLimit` and `RateLimit-Policy` headers (IETF httpapi draft) and
//! every 429 a `Retry-After`. Bad input gets a JSON error and debits nothing.
//!
//! A decision carries a client address (which the kernel gate may bind to the key) only when a
//! trusted proxy named it: `X-Forwarded-For` / `X-Real-IP` and `client_ip` from any other peer
//! are ignored ([`crate::client_addr`]; the peer comes from the listener as [`ConnectInfo`]).
use crate::client_addr::{ClientAddr, TrustedProxies};
use crate::decision::{Check, CheckError, Decider, Decision, Denial, RefundError, SettleError};
use crate::kernel::KernelStatus;
use crate::key::{ApiKey, RequestId};
use crate::metrics::Metrics;
use crate::store::{RefundOutcome, SettleOutcome, TrueCost};
use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

pub use crate::headers::RETRY_AFTER_NEVER_SECS;

/// Shared state of the handlers.
#[derive(Debug)]
pub struct App {
    /// Makes the decisions.
    pub decider: Decider,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Header carrying the key on `/v1/auth`.
    pub key_header: HeaderName,
    /// Status of a denial on `/v1/auth`.
    pub auth_deny_status: StatusCode,
    /// Kernel gate state (it changes when an operator detaches or attaches the gate).
    pub kernel: KernelStatus,
    /// The current prices (`GET /v1/costs`).
    pub costs: crate::pricing::CostTable,
    /// `[server] trusted_proxies`: whose word on the client's address is taken.
    pub trusted_proxies: TrustedProxies,
    /// Config reloads and shadow switches (the admin socket, SIGHUP).
    pub reloader: Arc<crate::reload::Reloader>,
}

/// The HTTP peer of a request, as the listener recorded it (absent: never trusted).
type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

fn peer_addr(peer: Peer) -> Option<SocketAddr> {
    peer.map(|Extension(ConnectInfo(addr))| addr)
}

/// The client address a decision may carry, counted by outcome.
pub(crate) fn client_ip(app: &App, addr: ClientAddr) -> Option<IpAddr> {
    if let Some(outcome) = addr.outcome() {
        app.metrics
            .client_addresses
            .with_label_values(&[outcome])
            .inc();
    }
    addr.ip()
}

/// The router, with the body limit applied.
pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    let router = Router::new()
        .route("/v1/check", post(check))
        .route("/v1/auth", get(auth))
        .route("/v1/refund", post(refund))
        .route("/v1/settle", post(settle))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/costs", get(costs))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") });
    // With traces on, a gateway's `traceparent` makes its request's spans children of its own.
    let router = if crate::trace::on() {
        router.layer(axum::middleware::from_fn(crate::trace::http_parent))
    } else {
        router
    };
    router
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

fn bad_request(app: &App, reason: &str, message: &str) -> Response {
    app.metrics.bad_requests.with_label_values(&[reason]).inc();
    error(StatusCode::BAD_REQUEST, reason, message)
}

/// Reads a JSON body: 413 over the limit, 400 for anything that is not the expected object.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, built once per bad request"
)]
fn json_body<T: for<'de> Deserialize<'de>>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Response> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            app.metrics
                .bad_requests
                .with_label_values(&["too_large"])
                .inc();
            error(status, "too_large", "request body is too large")
        } else {
            bad_request(app, "bad_body", &rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(app, "bad_json", &e.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    key: String,
    endpoint: String,
    method: Option<String>,
    client_ip: Option<IpAddr>,
    units: Option<f64>,
    request_id: Option<String>,
    /// A reservation: the cost is an estimate, settled later with `POST /v1/settle`.
    #[serde(default)]
    reserve: bool,
}

async fn check(
    State(app): State<Arc<App>>,
    peer: Peer,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body: CheckBody = match json_body(&app, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key = match ApiKey::parse(&body.key) {
        Ok(k) => k,
        Err(e) => return bad_request(&app, "bad_key", &e.to_string()),
    };
    let request_id = match body.request_id.as_deref().map(RequestId::parse).transpose() {
        Ok(r) => r,
        Err(e) => return bad_request(&app, "bad_request_id", &e.to_string()),
    };
    let check = Check {
        key,
        endpoint: body.endpoint,
        method: body.method,
        // The gateway's word on its client, taken only from a trusted proxy: anyone else could
        // name a victim's address and have it bound to a drained key.
        client_ip: client_ip(
            &app,
            app.trusted_proxies
                .from_body(peer_addr(peer), body.client_ip),
        ),
        units: body.units.unwrap_or(1.0),
        request_id,
        reserve: body.reserve,
    };
    match app.decider.check(check).await {
        Ok(d) if d.denial == Some(Denial::RequestIdConflict) => conflict(&d),
        Ok(d) => decision_response(&d, status_of(&d, StatusCode::TOO_MANY_REQUESTS), true),
        Err(e) => check_error(&app, &e),
    }
}

/// `409 request_id_conflict`: the request id was used before by this key for a different
/// request. Nothing was charged; the decision is in the ledger under `decision_id`.
fn conflict(d: &Decision) -> Response {
    let mut response = (
        StatusCode::CONFLICT,
        axum::Json(json!({
            "error": {
                "code": "request_id_conflict",
                "message": "this request id was already used by this key for a different \
                            request (bucket, method, endpoint or units); use a new id",
            },
            "request_id": d.request_id.as_str(),
            "decision_id": d.decision_id,
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(d.request_id.as_str()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-enforcer-request-id"), v);
    }
    response
}

fn check_error(app: &App, e: &CheckError) -> Response {
    bad_request(app, e.reason(), &e.to_string())
}

fn status_of(d: &Decision, deny: StatusCode) -> StatusCode {
    match (d.allowed, d.denial) {
        (true, _) => StatusCode::OK,
        (false, Some(Denial::UnknownKey)) => StatusCode::FORBIDDEN,
        (false, _) => deny,
    }
}

fn decision_response(d: &Decision, status: StatusCode, with_body: bool) -> Response {
    let mut headers = HeaderMap::new();
    let fields = crate::headers::RateLimitFields::of(d);
    for (name, value) in [
        ("ratelimit-policy", fields.policy),
        ("ratelimit", fields.limit),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    if let Some(secs) = fields.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Ok(v) = HeaderValue::from_str(d.request_id.as_str()) {
        headers.insert(HeaderName::from_static("x-enforcer-request-id"), v);
    }
    headers.insert(
        HeaderName::from_static("x-enforcer-mode"),
        HeaderValue::from_static(d.mode.as_str()),
    );
    // `/v1/auth` has no body: a gateway learns from this header that the request is a
    // reservation to settle under `X-Enforcer-Request-Id` (an endpoint's `settle = "after"`).
    if d.reserved {
        headers.insert(
            HeaderName::from_static("x-enforcer-reserved"),
            HeaderValue::from_static("true"),
        );
    }
    if !with_body {
        return (status, headers).into_response();
    }
    let body = DecisionBody {
        allowed: d.allowed,
        cost: d.cost,
        remaining: d.remaining,
        retry_after_ms: if d.allowed { Some(0) } else { d.retry_after_ms },
        tier: d.tier.as_deref(),
        mode: d.mode.as_str(),
        request_id: d.request_id.as_str(),
        replayed: d.replayed,
        reason: d.denial.map(Denial::as_str),
        decision_id: d.decision_id,
        endpoint: &d.endpoint,
        reserved: d.reserved,
        quota: d.quota,
    };
    // Serialized into a buffer sized for the body at once (axum's `Json` starts at 128 bytes
    // and reallocates its way up to the ~350 of a decision).
    let mut json = Vec::with_capacity(BODY_CAPACITY);
    body.write(&mut json);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (status, headers, json).into_response()
}

/// Bytes reserved for a decision's JSON body (~350 with a quota).
const BODY_CAPACITY: usize = 512;

/// The JSON body of a decision.
#[derive(Debug, Serialize)]
struct DecisionBody<'a> {
    allowed: bool,
    cost: f64,
    remaining: Option<f64>,
    retry_after_ms: Option<u64>,
    tier: Option<&'a str>,
    mode: &'static str,
    request_id: &'a str,
    replayed: bool,
    reason: Option<&'static str>,
    /// The id of this decision's audit row.
    decision_id: uuid::Uuid,
    /// The endpoint as priced (normal form).
    endpoint: &'a str,
    /// A reservation: settle it with `POST /v1/settle` under `request_id`.
    reserved: bool,
    /// The tier's calendar quota after the decision; left out when the tier has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<crate::store::QuotaUse>,
}

impl DecisionBody<'_> {
    /// The body as `serde_json` writes it (the derive above is the reference the tests compare
    /// with), by hand ([`crate::json`]): a tenth of the work.
    fn write(&self, out: &mut Vec<u8>) {
        use crate::json::{boolean, int, number, opt_number, opt_string, string, uuid};
        // Every field named: a field added without its line here does not compile.
        let Self {
            allowed,
            cost,
            remaining,
            retry_after_ms,
            tier,
            mode,
            request_id,
            replayed,
            reason,
            decision_id,
            endpoint,
            reserved,
            quota,
        } = self;
        out.extend_from_slice(br#"{"allowed":"#);
        boolean(*allowed, out);
        out.extend_from_slice(br#","cost":"#);
        number(*cost, out);
        out.extend_from_slice(br#","remaining":"#);
        opt_number(*remaining, out);
        out.extend_from_slice(br#","retry_after_ms":"#);
        match retry_after_ms {
            Some(ms) => int(ms, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","tier":"#);
        opt_string(*tier, out);
        out.extend_from_slice(br#","mode":"#);
        string(mode, out);
        out.extend_from_slice(br#","request_id":"#);
        string(request_id, out);
        out.extend_from_slice(br#","replayed":"#);
        boolean(*replayed, out);
        out.extend_from_slice(br#","reason":"#);
        opt_string(*reason, out);
        out.extend_from_slice(br#","decision_id":"#);
        uuid(decision_id, out);
        out.extend_from_slice(br#","endpoint":"#);
        string(endpoint, out);
        out.extend_from_slice(br#","reserved":"#);
        boolean(*reserved, out);
        if let Some(crate::store::QuotaUse {
            used,
            amount,
            resets_at,
            resets_in_ms,
        }) = quota
        {
            out.extend_from_slice(br#","quota":{"used":"#);
            number(*used, out);
            out.extend_from_slice(br#","amount":"#);
            number(*amount, out);
            out.extend_from_slice(br#","resets_at":"#);
            number(*resets_at, out);
            out.extend_from_slice(br#","resets_in_ms":"#);
            int(resets_in_ms, out);
            out.push(b'}');
        }
        out.push(b'}');
    }
}

/// The first of `names` that is present, as text; `Err` when its value is not (non-ASCII
/// bytes): refused, never skipped for the next name or ignored. Control characters other than
/// a tab never get here (the HTTP parser refuses them); a tab is refused by the parsers of the
/// endpoint, the method and the request id.
fn header_text<'h>(headers: &'h HeaderMap, names: &[&str]) -> Result<Option<&'h str>, ()> {
    match names.iter().find_map(|n| headers.get(*n)) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ()),
    }
}

async fn auth(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap) -> Response {
    let Some(raw_key) = headers.get(&app.key_header).and_then(|v| v.to_str().ok()) else {
        app.metrics
            .bad_requests
            .with_label_values(&["missing_key"])
            .inc();
        return error(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            &format!("the {} header is missing", app.key_header),
        );
    };
    let key = match ApiKey::parse(raw_key) {
        Ok(k) => k,
        Err(e) => return bad_request(&app, "bad_key", &e.to_string()),
    };
    let uri = match header_text(&headers, &["x-original-uri", "x-forwarded-uri"]) {
        Ok(Some(uri)) => uri,
        Ok(None) => {
            return bad_request(
                &app,
                "bad_endpoint",
                "X-Original-URI or X-Forwarded-Uri is required",
            );
        }
        Err(()) => {
            return bad_request(
                &app,
                "bad_endpoint",
                "the endpoint header must be ASCII: percent-encode other bytes",
            );
        }
    };
    let method = match header_text(&headers, &["x-original-method", "x-forwarded-method"]) {
        Ok(m) => m.unwrap_or("GET").to_ascii_uppercase(),
        Err(()) => return bad_request(&app, "bad_method", "the method header must be ASCII"),
    };
    let request_id = match header_text(&headers, &["x-request-id"]) {
        Ok(raw) => match raw.map(RequestId::parse).transpose() {
            Ok(r) => r,
            Err(e) => return bad_request(&app, "bad_request_id", &e.to_string()),
        },
        Err(()) => {
            return bad_request(
                &app,
                "bad_request_id",
                "X-Request-Id must be printable ASCII",
            );
        }
    };
    // Malformed or untrusted address headers are ignored, never a 400: the decision does not
    // depend on them, only what the kernel may bind.
    let client_ip = client_ip(
        &app,
        app.trusted_proxies.from_headers(peer_addr(peer), &headers),
    );
    let check = Check {
        key,
        endpoint: uri.to_owned(),
        method: Some(method),
        client_ip,
        units: 1.0,
        request_id,
        reserve: false,
    };
    match app.decider.check(check).await {
        Ok(d) if d.denial == Some(Denial::RequestIdConflict) => conflict(&d),
        Ok(d) => decision_response(&d, status_of(&d, app.auth_deny_status), false),
        Err(e) => check_error(&app, &e),
    }
}

/// The key and request id of a refund or a settle; a 400 for either that is not valid.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, built once per bad request"
)]
fn key_and_request_id(
    app: &App,
    key: &str,
    request_id: &str,
) -> Result<(ApiKey, RequestId), Response> {
    let key = ApiKey::parse(key).map_err(|e| bad_request(app, "bad_key", &e.to_string()))?;
    let request_id = RequestId::parse(request_id)
        .map_err(|e| bad_request(app, "bad_request_id", &e.to_string()))?;
    Ok((key, request_id))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    key: String,
    request_id: String,
}

async fn refund(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body: RefundBody = match json_body(&app, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (key, request_id) = match key_and_request_id(&app, &body.key, &body.request_id) {
        Ok(parsed) => parsed,
        Err(r) => return r,
    };
    match app
        .decider
        .refund(&key, &request_id)
        .instrument(crate::trace::refund())
        .await
    {
        Ok(RefundOutcome::Refunded {
            credited, balance, ..
        }) => (
            StatusCode::OK,
            axum::Json(json!({ "refunded": true, "credited": credited, "balance": balance })),
        )
            .into_response(),
        Ok(RefundOutcome::UnknownRequest) => error(
            StatusCode::NOT_FOUND,
            "unknown_request",
            "no allowed request with this id is remembered for this key",
        ),
        Ok(RefundOutcome::AlreadyRefunded) => error(
            StatusCode::CONFLICT,
            "already_refunded",
            "this request was already refunded",
        ),
        Ok(RefundOutcome::NotRefundable) => error(
            StatusCode::CONFLICT,
            "not_refundable",
            "operational requests are not refundable",
        ),
        Err(RefundError::Unavailable(m)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &m)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    key: String,
    request_id: String,
    cost: Option<f64>,
    units: Option<f64>,
}

async fn settle(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body: SettleBody = match json_body(&app, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (key, request_id) = match key_and_request_id(&app, &body.key, &body.request_id) {
        Ok(parsed) => parsed,
        Err(r) => return r,
    };
    let cost = match (body.cost, body.units) {
        (Some(c), None) => TrueCost::Tokens(c),
        (None, Some(u)) => TrueCost::Units(u),
        _ => {
            return bad_request(
                &app,
                "bad_settle",
                "give exactly one of cost (tokens) and units",
            );
        }
    };
    match app
        .decider
        .settle(&key, &request_id, cost)
        .instrument(crate::trace::settle())
        .await
    {
        Ok(SettleOutcome::Settled {
            cost,
            estimate,
            charged,
            capped,
            balance,
            tier,
            replayed,
            ..
        }) => (
            StatusCode::OK,
            axum::Json(json!({
                "settled": true,
                "cost": cost,
                "estimate": estimate,
                "charged": charged,
                "capped": capped,
                "balance": balance,
                "tier": tier,
                "replayed": replayed,
                "request_id": request_id.as_str(),
            })),
        )
            .into_response(),
        Ok(SettleOutcome::UnknownRequest) => error(
            StatusCode::NOT_FOUND,
            "unknown_request",
            "no allowed request with this id is remembered for this key (never seen, denied, \
             or its reservation expired and kept its estimate)",
        ),
        Ok(SettleOutcome::Conflict { cost }) => error(
            StatusCode::CONFLICT,
            "settle_conflict",
            &format!("this request was already settled at another true cost ({cost} tokens)"),
        ),
        Ok(SettleOutcome::AlreadyRefunded) => error(
            StatusCode::CONFLICT,
            "already_refunded",
            "this request was refunded: there is nothing to settle",
        ),
        Ok(SettleOutcome::NotSettleable) => error(
            StatusCode::CONFLICT,
            "not_settleable",
            "operational requests and fail-soft debit-backs are not settled",
        ),
        Ok(SettleOutcome::UnitsUnknown) => error(
            StatusCode::CONFLICT,
            "units_unknown",
            "this request's record does not keep its units: settle it with cost",
        ),
        Ok(SettleOutcome::UnknownKey) => error(
            StatusCode::FORBIDDEN,
            "unknown_key",
            "the key has no tier and unknown keys are refused",
        ),
        Err(e @ SettleError::BadAmount { .. }) => bad_request(&app, "bad_settle", &e.to_string()),
        Err(SettleError::Unavailable(m)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &m)
        }
    }
}

/// `GET /v1/costs`: every configured endpoint's base cost, multiplier and price now.
async fn costs(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.costs.get()).into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let store = app.decider.store();
    let ping = tokio::time::timeout(Duration::from_millis(500), store.ping()).await;
    let (mut ready, detail) = match ping {
        Ok(Ok(())) => (true, "reachable".to_owned()),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, "ping timed out".to_owned()),
    };
    let described = tokio::time::timeout(Duration::from_millis(500), store.describe())
        .await
        .ok()
        .flatten();
    // A cluster that says it is not ok (slots uncovered) is not ready, though a node answers.
    if let Some(state) = described
        .as_ref()
        .and_then(|d| d.get("cluster")?.get("state")?.as_str())
    {
        ready &= state == "ok";
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "store": { "backend": store.backend(), "detail": detail, "state": described },
        "kernel": app.kernel.get(),
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let (worst, open) = app.decider.breaker_summary();
    app.metrics.breaker_state.set(worst as i64);
    app.metrics.breakers_open.set(open as i64);
    // The store counts its evictions itself; the counter catches up at each scrape.
    let evicted = app.decider.store().records_evicted();
    let counted = app.metrics.store_records_evicted.get();
    if evicted > counted {
        app.metrics.store_records_evicted.inc_by(evicted - counted);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_decisions_body_is_the_bytes_serde_writes() {
        let quota = crate::store::QuotaUse {
            used: 0.1 + 0.2,
            amount: 1e12,
            resets_at: 1_733_011_200.0,
            resets_in_ms: u64::MAX,
        };
        let endpoints = ["/v1/items", "/a\"b", "/back\\slash", "/tab\t", "/é\u{7f}"];
        for (i, endpoint) in endpoints.iter().enumerate() {
            for variant in 0..4 {
                let body = DecisionBody {
                    allowed: variant % 2 == 0,
                    cost: [1.0, 0.5, f64::NAN, -0.0][variant],
                    remaining: (variant != 1).then_some(99.25 * i as f64),
                    retry_after_ms: (variant != 2).then_some(variant as u64 * 1000),
                    tier: (variant != 3).then_some(["free", "a\"b", "\u{1}", ""][variant]),
                    mode: ["enforce", "shadow"][variant % 2],
                    request_id: ["0190b3c4-aaaa-7bbb-8ccc-123456789abc", "id \"x\""][i % 2],
                    replayed: variant == 3,
                    reason: (variant == 1).then_some("exhausted"),
                    decision_id: uuid::Uuid::now_v7(),
                    endpoint,
                    reserved: variant == 2,
                    quota: (variant >= 2).then_some(quota),
                };
                let mut ours = Vec::new();
                body.write(&mut ours);
                let theirs = serde_json::to_vec(&body).expect("serde");
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }
    use crate::config::Config;
    use crate::store::MemoryStore;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A daemon's API on `127.0.0.1:0` behind the real listener (so the peer is real), whose
    /// decisions report to a kernel-gate link the test reads.
    struct Api {
        addr: SocketAddr,
        app: Arc<App>,
        events: tokio::sync::mpsc::Receiver<crate::kernel::sync::Update>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    impl Api {
        async fn start(trusted: &[&str]) -> Self {
            let mut config = Config::default();
            config.server.trusted_proxies =
                trusted.iter().map(|c| c.parse().expect("cidr")).collect();
            let metrics = Metrics::new();
            let store = Arc::new(MemoryStore::new(
                config.budget_policy(),
                Arc::new(ManualClock::at(1000.0)),
            ));
            let (link, events) = crate::kernel::sync::test_link(&config, &metrics);
            let decider = Decider::new(
                &config,
                store,
                metrics.clone(),
                crate::decision::event::Outbox::new().with(Arc::new(link)),
            );
            let costs = crate::pricing::static_costs(&decider.prices());
            let reloader = Arc::new(crate::reload::Reloader::new(
                None,
                &config,
                crate::reload::Parts {
                    rules: decider.rules_switch(),
                    store: decider.store().clone(),
                    local: None,
                    pricing: None,
                    costs: costs.clone(),
                    gate: None,
                    ledger: None,
                    metrics: metrics.clone(),
                },
            ));
            let app = Arc::new(App {
                costs,
                reloader,
                decider,
                metrics: metrics.clone(),
                key_header: HeaderName::from_static("x-api-key"),
                auth_deny_status: StatusCode::TOO_MANY_REQUESTS,
                kernel: KernelStatus::new(crate::kernel::KernelReport {
                    attached: false,
                    detail: "test".into(),
                }),
                trusted_proxies: TrustedProxies::new(config.server.trusted_proxies.clone()),
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let limits = crate::listener::Limits {
                header_read_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(30),
                max_connections: 16,
            };
            tokio::spawn(crate::listener::serve(
                listener,
                router(Arc::clone(&app), 65536),
                limits,
                metrics.http.clone(),
                async {
                    let _ = stopped.await;
                },
            ));
            Self {
                addr,
                app,
                events,
                _stop: stop,
            }
        }

        /// One request on a fresh connection from 127.0.0.1; the status.
        async fn send(&self, head: &str, body: &str) -> u16 {
            let mut s = tokio::net::TcpStream::connect(self.addr)
                .await
                .expect("connect");
            let request = format!(
                "{head}\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(request.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read");
            let text = String::from_utf8_lossy(&out);
            text.split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no status in {text:?}"))
        }

        /// `/v1/auth` for `key` with these extra header lines.
        async fn auth(&self, key: &str, extra: &[&str]) -> u16 {
            let mut head = format!(
                "GET /v1/auth HTTP/1.1\r\nx-api-key: {key}\r\nx-original-uri: /x\r\n\
                 x-original-method: GET"
            );
            for line in extra {
                head.push_str("\r\n");
                head.push_str(line);
            }
            self.send(&head, "").await
        }

        /// `/v1/check` for `key` naming `client_ip`.
        async fn check(&self, key: &str, client_ip: &str) -> u16 {
            let body = format!(r#"{{"key":"{key}","endpoint":"/x","client_ip":"{client_ip}"}}"#);
            self.send("POST /v1/check HTTP/1.1", &body).await
        }

        /// The client addresses the decisions so far reported to the kernel gate (what it
        /// binds), in order.
        fn bound(&mut self) -> Vec<IpAddr> {
            let mut ips = Vec::new();
            while let Ok(event) = self.events.try_recv() {
                if let crate::kernel::sync::Update::Client { ip, .. } = event {
                    ips.push(ip);
                }
            }
            ips
        }

        fn outcomes(&self, outcome: &str) -> u64 {
            self.app
                .metrics
                .client_addresses
                .with_label_values(&[outcome])
                .get()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn forged_addresses_from_an_untrusted_peer_never_reach_the_gate() {
        let mut api = Api::start(&[]).await;
        let forged = ["x-forwarded-for: 10.77.0.2", "x-real-ip: 10.77.0.2"];
        assert_eq!(api.auth("drained", &forged).await, 200);
        assert_eq!(api.auth("drained", &forged[..1]).await, 200);
        assert_eq!(api.auth("drained", &forged[1..]).await, 200);
        assert_eq!(api.check("drained", "10.77.0.2").await, 200);
        assert_eq!(api.bound(), Vec::<IpAddr>::new());
        assert_eq!(api.outcomes("untrusted_peer"), 4);
        assert_eq!(api.outcomes("used"), 0);

        // Trusting another network does not make 127.0.0.1 trusted.
        let mut api = Api::start(&["10.0.0.0/8"]).await;
        assert_eq!(api.auth("drained", &forged).await, 200);
        assert_eq!(api.check("drained", "10.77.0.2").await, 200);
        assert_eq!(api.bound(), Vec::<IpAddr>::new());
    }

    #[tokio::test]
    async fn a_trusted_proxy_names_the_rightmost_untrusted_hop_and_garbage_is_ignored() {
        let mut api = Api::start(&["127.0.0.1/32", "10.0.0.0/8"]).await;
        // A forged left part, the client the proxy appended, then a trusted load balancer.
        assert_eq!(
            api.auth(
                "k",
                &[
                    "x-forwarded-for: 192.0.2.66, 203.0.113.9",
                    "x-forwarded-for: 10.0.0.3"
                ]
            )
            .await,
            200
        );
        assert_eq!(api.check("k", "198.51.100.7").await, 200);
        assert_eq!(api.bound(), [ip("203.0.113.9"), ip("198.51.100.7")]);

        // Malformed headers are ignored, not a 500: the decision is made without an address.
        for extra in [
            "x-forwarded-for: nope",
            "x-forwarded-for: 203.0.113.9,,",
            "x-real-ip: [::1",
            "x-forwarded-for: 203.0.113.9\r\nx-real-ip: 192.0.2.66",
            "x-forwarded-for: 10.0.0.1, 127.0.0.1",
        ] {
            assert_eq!(api.auth("k", &[extra]).await, 200, "{extra}");
        }
        assert_eq!(api.bound(), Vec::<IpAddr>::new());
        assert_eq!(api.outcomes("unusable"), 5);
        // A proxy's own address is never a client.
        assert_eq!(api.check("k", "10.1.2.3").await, 200);
        assert_eq!(api.bound(), Vec::<IpAddr>::new());
        // A client_ip that is no address is still bad input (400), trusted peer or not.
        let body = r#"{"key":"k","endpoint":"/x","client_ip":"nope"}"#;
        assert_eq!(api.send("POST /v1/check HTTP/1.1", body).await, 400);
    }
}
