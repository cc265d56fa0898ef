//! Reserve → settle through Envoy's rate-limit API (RLS v3, gRPC), black-box against a daemon
//! on the real Redis store: a tonic client sends what Envoy's `envoy.filters.http.ratelimit`
//! filter sends on the request path (the reservation) and on stream done (a separate call
//! whose descriptor carries the `[envoy] settle_marker` entry and `hits_addend` from
//! `%RESP(x-llm-tokens)%`), and `is_negative_hits` descriptors (units given back). Balances are
//! checked exactly (a tier without refill), and every settle is a ledger row of kind `settle`.
use enforcer::config::Config;
use enforcer_tests::{TestDaemon, http, parse_metric, redis_url, unique};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// `/v1/generate` costs 1 token per generated token, every check of it is a reservation, and
/// no request costs more than 2000; `/v1/cheap` costs 1 (the balance probe). The tier never
/// refills, so balances move only by what the test does: 1000 tokens to start.
fn config(extra: &str) -> Config {
    config_on(&redis_url(), extra)
}

fn config_on(store: &str, extra: &str) -> Config {
    Config::parse(&format!(
        r#"
[store]
redis_url = "{store}"
timeout_ms = 200
[budget]
default_tier = "metered"
max_units = 100000
[tiers.metered]
max_tokens = 5000
refill_per_sec = 0
initial_tokens = 1000
[[pricing.endpoints]]
method = "POST"
path = "/v1/generate"
base_cost = 1
settle = "after"
max_cost = 2000
[[pricing.endpoints]]
path = "/v1/cheap"
base_cost = 1
{extra}
"#
    ))
    .expect("test config parses")
}

async fn client(d: &TestDaemon) -> RateLimitServiceClient<Channel> {
    let addr: SocketAddr = d.grpc.expect("grpc on");
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connects")
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>, negative: bool) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        is_negative_hits: negative,
        ..Default::default()
    }
}

/// The request-path descriptor of `POST /v1/generate` (x-api-key, :path, :method and
/// x-request-id through `request_headers` actions), `hits` units reserved.
fn reserve(key: &str, id: &str, hits: u64) -> RateLimitDescriptor {
    descriptor(
        &[
            ("api_key", key),
            ("path", "/v1/generate"),
            ("method", "POST"),
            ("request_id", id),
        ],
        Some(hits),
        false,
    )
}

/// The stream-done descriptor: `generic_key {descriptor_key: enforcer_phase,
/// descriptor_value: done}`, the key and request id, `hits` from the response header.
fn done(key: &str, id: &str, hits: u64) -> RateLimitDescriptor {
    descriptor(
        &[
            ("enforcer_phase", "done"),
            ("api_key", key),
            ("request_id", id),
        ],
        Some(hits),
        false,
    )
}

/// A descriptor giving `hits` units of request `id` back.
fn give_back(key: &str, id: &str, hits: u64) -> RateLimitDescriptor {
    descriptor(&[("api_key", key), ("request_id", id)], Some(hits), true)
}

async fn ask(
    c: &mut RateLimitServiceClient<Channel>,
    descriptors: Vec<RateLimitDescriptor>,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest {
        domain: "envoy".to_owned(),
        descriptors,
        hits_addend: 0,
    })
    .await
    .expect("ShouldRateLimit answers (never a gRPC error)")
    .into_inner()
}

fn headers<'r>(r: &'r RateLimitResponse, name: &str) -> Vec<&'r str> {
    r.response_headers_to_add
        .iter()
        .filter(|h| h.key == name)
        .map(|h| h.value.as_str())
        .collect()
}

fn ok(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::Ok as i32
}

/// The key's balance, read by a 1-token probe on `/v1/cheap` (which it then pays).
async fn balance(c: &mut RateLimitServiceClient<Channel>, key: &str) -> u32 {
    let probe = descriptor(
        &[("api_key", key), ("path", "/v1/cheap"), ("method", "GET")],
        None,
        false,
    );
    let r = ask(c, vec![probe]).await;
    assert!(ok(&r), "the probe is affordable: {r:?}");
    r.statuses[0].limit_remaining + 1
}

/// One settle call: OK, with exactly one `x-enforcer-settle` outcome, which it returns.
async fn settle(c: &mut RateLimitServiceClient<Channel>, d: RateLimitDescriptor) -> (String, u32) {
    let r = ask(c, vec![d]).await;
    assert!(ok(&r), "a settle call always answers OK: {r:?}");
    let outcome = headers(&r, "x-enforcer-settle");
    assert_eq!(outcome.len(), 1, "{r:?}");
    (outcome[0].to_owned(), r.statuses[0].limit_remaining)
}

async fn metric(d: &TestDaemon, name: &str) -> f64 {
    let text = http(d.addr, "GET", "/metrics", &[], String::new()).await;
    parse_metric(&String::from_utf8_lossy(&text.body), name)
}

#[tokio::test]
async fn a_stream_done_call_charges_the_difference_once() {
    let d = TestDaemon::start(config("")).await;
    let mut c = client(&d).await;
    let key = unique("envoy-llm");
    let (gen1, gen2) = (unique("gen"), unique("gen"));

    // The request path: 500 units reserved.
    let r = ask(&mut c, vec![reserve(&key, &gen1, 500)]).await;
    assert!(ok(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 500);
    // Stream done, 812 tokens generated: 312 more charged.
    assert_eq!(
        settle(&mut c, done(&key, &gen1, 812)).await,
        ("settled".to_owned(), 188)
    );
    assert_eq!(balance(&mut c, &key).await, 188);
    // Envoy (or a retry) sends it again: a replay, nothing charged (the first settle's answer).
    assert_eq!(
        settle(&mut c, done(&key, &gen1, 812)).await,
        ("replayed".to_owned(), 188)
    );
    // Another count for a request already settled: refused, nothing changed.
    assert_eq!(
        settle(&mut c, done(&key, &gen1, 900)).await.0,
        "settle_conflict"
    );
    assert_eq!(balance(&mut c, &key).await, 187);

    // A shorter answer than reserved: 100 reserved, 40 used, 60 credited back.
    assert!(ok(&ask(&mut c, vec![reserve(&key, &gen2, 100)]).await));
    assert_eq!(
        settle(&mut c, done(&key, &gen2, 40)).await,
        ("settled".to_owned(), 146)
    );
    assert_eq!(balance(&mut c, &key).await, 146);

    // Counted and audited as /v1/settle: two settles, one replay, one conflict; ledger rows
    // of kind settle with the difference and the true cost (replays and conflicts write none).
    let rows = d.ledger_rows(&gen2, 2).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let rows = d.ledger_rows(&gen1, 2).await;
    let kinds: Vec<&str> = rows
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or("debit"))
        .collect();
    assert_eq!(kinds, ["debit", "settle"], "{rows:?}");
    assert_eq!(
        (
            &rows[1]["cost"],
            &rows[1]["true_cost"],
            &rows[1]["remaining"]
        ),
        (&json!(312.0), &json!(812.0), &json!(188.0))
    );
    for (outcome, want) in [("settled", 2.0), ("replayed", 1.0), ("conflict", 1.0)] {
        let name = format!("enforcer_settles_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&d, &name).await, want, "{name}");
    }
    assert_eq!(
        metric(&d, "enforcer_rls_descriptors_total{kind=\"settle\"}").await,
        4.0
    );
    d.stop().await;
}

#[tokio::test]
async fn negative_hits_give_units_back_down_to_a_refund() {
    let d = TestDaemon::start(config("")).await;
    let mut c = client(&d).await;
    let key = unique("envoy-back");
    let (a, b) = (unique("gen"), unique("gen"));

    assert!(ok(&ask(&mut c, vec![reserve(&key, &a, 500)]).await));
    assert_eq!(balance(&mut c, &key).await, 500);
    // 200 of the 500 units given back: settled at 300, 200 credited (the probe paid 1).
    assert_eq!(
        settle(&mut c, give_back(&key, &a, 200)).await,
        ("settled".to_owned(), 699)
    );
    // The same again: a replay, nothing more given back.
    assert_eq!(settle(&mut c, give_back(&key, &a, 200)).await.0, "replayed");
    assert_eq!(balance(&mut c, &key).await, 699);

    // More given back than was reserved: floored at 0, the whole reservation comes back.
    assert!(ok(&ask(&mut c, vec![reserve(&key, &b, 100)]).await));
    assert_eq!(
        settle(&mut c, give_back(&key, &b, 250)).await,
        ("settled".to_owned(), 698)
    );
    let rows = d.ledger_rows(&b, 2).await;
    assert_eq!(
        (&rows[1]["kind"], &rows[1]["cost"], &rows[1]["true_cost"]),
        (&json!("settle"), &json!(-100.0), &json!(0.0)),
        "{rows:?}"
    );
    // A negative-hits descriptor with the marker too (a stream-done entry giving back) is
    // the same thing.
    let marked = descriptor(
        &[
            ("enforcer_phase", "done"),
            ("api_key", &key),
            ("request_id", &b),
        ],
        Some(250),
        true,
    );
    assert_eq!(settle(&mut c, marked).await.0, "replayed");
    assert_eq!(balance(&mut c, &key).await, 698);
    d.stop().await;
}

#[tokio::test]
async fn bad_settles_are_refused_or_capped_and_hostile_ones_charge_nothing() {
    let d = TestDaemon::start(config("")).await;
    let mut c = client(&d).await;
    let key = unique("envoy-bad");
    let other = unique("envoy-other");
    let id = unique("gen");
    assert!(ok(&ask(&mut c, vec![reserve(&key, &id, 100)]).await));
    assert_eq!(balance(&mut c, &key).await, 900);

    // Bad input: OVER_LIMIT with a reason, nothing settled.
    let no_id_done = descriptor(
        &[("enforcer_phase", "done"), ("api_key", &key)],
        Some(5),
        false,
    );
    let no_id_back = descriptor(&[("api_key", &key)], Some(5), true);
    let no_hits = descriptor(
        &[
            ("enforcer_phase", "done"),
            ("api_key", &key),
            ("request_id", &id),
        ],
        None,
        false,
    );
    let no_key = descriptor(
        &[("enforcer_phase", "done"), ("request_id", &id)],
        Some(5),
        false,
    );
    let bad_id = descriptor(
        &[
            ("enforcer_phase", "done"),
            ("api_key", &key),
            ("request_id", "bad id\n"),
        ],
        Some(5),
        false,
    );
    for (descriptors, reason) in [
        (vec![no_id_done], "bad_request_id"),
        (vec![no_id_back], "bad_request_id"),
        (vec![no_hits], "bad_settle"),
        (vec![no_key], "missing_key"),
        (vec![bad_id], "bad_request_id"),
        // A stream-done entry without the marker beside one with it: refused, not charged
        // as a new request.
        (
            vec![done(&key, &id, 5), reserve(&key, &unique("gen"), 5)],
            "mixed_settle",
        ),
    ] {
        let r = ask(&mut c, descriptors).await;
        assert!(!ok(&r), "{reason}: {r:?}");
        assert_eq!(headers(&r, "x-enforcer-error"), [reason], "{r:?}");
        assert!(headers(&r, "x-enforcer-settle").is_empty());
    }
    assert_eq!(balance(&mut c, &key).await, 899);

    // Hostile: a stream-done call for a request never reserved, or another key's request:
    // nothing charged to anyone.
    assert_eq!(
        settle(&mut c, done(&key, &unique("never"), 4000)).await.0,
        "unknown_request"
    );
    assert_eq!(
        settle(&mut c, done(&other, &id, 4000)).await.0,
        "unknown_request"
    );
    assert_eq!(
        settle(&mut c, give_back(&other, &id, 100)).await.0,
        "unknown_request"
    );
    assert_eq!(balance(&mut c, &key).await, 898);

    // A runaway count: charged max_cost (2000), the ledger row says capped.
    assert_eq!(
        settle(&mut c, done(&key, &id, 90_000)).await,
        ("settled".to_owned(), 0)
    );
    let rows = d.ledger_rows(&id, 2).await;
    assert_eq!(
        (&rows[1]["true_cost"], &rows[1]["cost"], &rows[1]["note"]),
        (&json!(2000.0), &json!(1900.0), &json!("capped at max_cost")),
        "{rows:?}"
    );
    // 898 − 1900: in debt, the key is refused until a grant.
    let probe = descriptor(
        &[("api_key", &key), ("path", "/v1/cheap"), ("method", "GET")],
        None,
        false,
    );
    assert!(!ok(&ask(&mut c, vec![probe]).await));
    d.stop().await;
}

#[tokio::test]
async fn the_settle_marker_is_configurable_and_can_be_turned_off() {
    let d = TestDaemon::start(config("[envoy]\nsettle_marker = \"phase=after\"")).await;
    let mut c = client(&d).await;
    let key = unique("envoy-marker");
    let id = unique("gen");
    assert!(ok(&ask(&mut c, vec![reserve(&key, &id, 100)]).await));
    // The default marker means nothing here: a plain (keyed, pathless) check is refused for
    // want of a path, nothing settled.
    let r = ask(&mut c, vec![done(&key, &id, 50)]).await;
    assert!(headers(&r, "x-enforcer-settle").is_empty(), "{r:?}");
    assert_eq!(headers(&r, "x-enforcer-error"), ["bad_endpoint"], "{r:?}");
    let marked = descriptor(
        &[("phase", "after"), ("api_key", &key), ("request_id", &id)],
        Some(50),
        false,
    );
    assert_eq!(settle(&mut c, marked).await, ("settled".to_owned(), 950));
    d.stop().await;

    let d = TestDaemon::start(config("[envoy]\nsettle_marker = \"\"")).await;
    let mut c = client(&d).await;
    let id = unique("gen");
    assert!(ok(&ask(&mut c, vec![reserve(&key, &id, 10)]).await));
    let r = ask(&mut c, vec![done(&key, &id, 5)]).await;
    assert!(headers(&r, "x-enforcer-settle").is_empty(), "{r:?}");
    assert_eq!(headers(&r, "x-enforcer-error"), ["bad_endpoint"], "{r:?}");
    assert_eq!(balance(&mut c, &key).await, 940);
    d.stop().await;
}

#[tokio::test]
async fn a_settle_without_the_store_answers_ok_at_once_and_settles_nothing() {
    // A Redis that is gone: a port nothing listens on.
    let gone = format!("redis://127.0.0.1:{}", enforcer_tests::free_port());
    let d = TestDaemon::start(config_on(&gone, "")).await;
    let mut c = client(&d).await;
    for _ in 0..3 {
        let started = Instant::now();
        let (outcome, _) = settle(&mut c, done(&unique("outage"), &unique("gen"), 10)).await;
        // Never hangs (a generous bound for a busy machine; the store timeout is 200 ms).
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(outcome, "store_unavailable");
    }
    assert_eq!(
        metric(&d, "enforcer_settles_total{outcome=\"unavailable\"}").await,
        3.0
    );
    d.stop().await;
}
