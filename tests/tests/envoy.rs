//! Envoy's rate-limit service API (RLS v3, gRPC), black-box: a tonic client built from the
//! `envoy-types` crate sends what Envoy's `envoy.filters.http.ratelimit` filter sends, to a
//! daemon on the real Redis store (and, for outages, to a Redis that is gone).
use enforcer::config::Config;
use enforcer_tests::descriptor;
use enforcer_tests::{TestDaemon, http, redis_url, unique};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A tier that never refills, so balances move only by debits and refunds, exactly, however
/// slow the machine: 10 tokens. `/v1/x` costs 3 per hit, `/v1/cheap` 1, `/health` is
/// operational; the domain `premium` prices `/v1/x` at 5.
fn config(store: &str, extra: &str) -> Config {
    Config::parse(&format!(
        r#"
[store]
redis_url = "{store}"
timeout_ms = 200
[budget]
default_tier = "metered"
[tiers.metered]
max_tokens = 10
refill_per_sec = 0
initial_tokens = 10
[pricing]
default_cost = 1
[[pricing.endpoints]]
path = "/v1/x"
base_cost = 3
[[pricing.endpoints]]
path = "/v1/cheap"
base_cost = 1
[[pricing.endpoints]]
path = "/health"
operational = true
[[pricing.domains.premium.endpoints]]
path = "/v1/x"
base_cost = 5
{extra}
"#
    ))
    .expect("test config parses")
}

async fn daemon(extra: &str) -> TestDaemon {
    TestDaemon::start(config(&redis_url(), extra)).await
}

async fn client(addr: SocketAddr) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connects")
}

/// What Envoy's route actions `request_headers x-api-key → api_key`, `:path → path` and
/// `:method → method` produce for one request.
fn keyed(key: &str, path: &str) -> RateLimitDescriptor {
    descriptor(&[("api_key", key), ("path", path), ("method", "GET")])
}

async fn ask(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend,
    })
    .await
    .expect("ShouldRateLimit answers (never a gRPC error)")
    .into_inner()
}

fn header<'r>(r: &'r RateLimitResponse, name: &str) -> Option<&'r str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

fn over(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::OverLimit as i32
}

fn ok(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::Ok as i32
}

/// The key's balance, read by a 1-token probe on `/v1/cheap` (which it then pays).
async fn remaining(c: &mut RateLimitServiceClient<Channel>, key: &str) -> u32 {
    let r = ask(c, "", vec![keyed(key, "/v1/cheap")], 0).await;
    assert!(ok(&r), "the probe is affordable: {r:?}");
    r.statuses[0].limit_remaining
}

#[tokio::test]
async fn a_key_drains_to_over_limit_with_statuses_and_headers() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("drain");
    for want in [7, 4, 1] {
        let r = ask(&mut c, "envoy", vec![keyed(&key, "/v1/x")], 0).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(r.statuses.len(), 1);
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        assert_eq!(s.limit_remaining, want);
        let limit = s.current_limit.as_ref().expect("current_limit");
        assert_eq!(limit.name, "metered");
        // No refill: Envoy's "requests per unit" is the capacity, unit unknown.
        assert_eq!(limit.requests_per_unit, 10);
        assert_eq!(limit.unit, Unit::Unknown as i32);
        assert_eq!(header(&r, "ratelimit-policy"), Some("\"metered\";q=10"));
        // No refill: no time at which more quota comes (no `t`, no duration until reset).
        assert_eq!(
            header(&r, "ratelimit"),
            Some(format!("\"metered\";r={want}").as_str())
        );
        assert_eq!(s.duration_until_reset, None);
        assert_eq!(header(&r, "x-envoy-ratelimited"), None);
        assert_eq!(header(&r, "retry-after"), None);
    }
    let r = ask(&mut c, "envoy", vec![keyed(&key, "/v1/x")], 0).await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 1);
    assert_eq!(header(&r, "x-envoy-ratelimited"), Some("true"));
    // Refill never covers it: "not soon", as the HTTP API says, and no reset time that would
    // contradict it.
    assert_eq!(header(&r, "retry-after"), Some("3600"));
    assert_eq!(header(&r, "ratelimit"), Some("\"metered\";r=1"));
    assert_eq!(r.statuses[0].duration_until_reset, None);
    // Every decision is a ledger row: three allowed, one denied (plus none for nothing else).
    let rows = rows_of(&d, &key, 4).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r["allowed"] == true).count(), 3);
    assert!(
        rows.iter()
            .all(|r| r["endpoint"] == "/v1/x" && r["cost"] == 3.0)
    );
    d.stop().await;
}

/// The decision rows of the ledger file for `key` (by its hash), once `want` are there.
async fn rows_of(d: &TestDaemon, key: &str, want: usize) -> Vec<serde_json::Value> {
    let hash = enforcer::key::ApiKey::parse(key)
        .expect("key")
        .hash()
        .to_hex();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&d.ledger_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["t"] == "decision" && r["key_hash"] == hash.as_str())
            .collect();
        if rows.len() >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn hits_addend_becomes_units_and_zero_means_one() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("hits");
    // Request-level hits_addend 0 (what Envoy sends when unset): 1 unit of 1 token.
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/cheap")], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 9);
    // Request-level 3.
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/cheap")], 3).await;
    assert_eq!(r.statuses[0].limit_remaining, 6);
    // The descriptor's own hits_addend overrides the request's.
    let mut with_own = keyed(&key, "/v1/cheap");
    with_own.hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut c, "", vec![with_own], 3).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    // A descriptor hits_addend of 0 means the request's (here 1).
    let mut zero = keyed(&key, "/v1/cheap");
    zero.hits_addend = Some(UInt64Value { value: 0 });
    let r = ask(&mut c, "", vec![zero], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // More hits than the budget: denied, nothing charged.
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/cheap")], 2).await;
    assert!(over(&r));
    assert_eq!(remaining(&mut c, &key).await, 0);
    // Absurd hits (beyond budget.max_units) are bad input, refused, never a debit.
    let key2 = unique("hits-huge");
    let mut huge = keyed(&key2, "/v1/cheap");
    huge.hits_addend = Some(UInt64Value { value: u64::MAX });
    let r = ask(&mut c, "", vec![huge], 0).await;
    assert!(over(&r));
    assert_eq!(header(&r, "x-enforcer-error"), Some("bad_units"));
    assert_eq!(remaining(&mut c, &key2).await, 9);
    d.stop().await;
}

#[tokio::test]
async fn several_descriptors_of_one_key_are_charged_together_all_or_nothing() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("multi");
    // Two of the key's descriptors for one request: /v1/x (3) and a generic one, which takes
    // the request's path from the other descriptor (3 more), 4 hits of its own (12): 15 > 10.
    let mut tokens = descriptor(&[("api_key", &key), ("generic_key", "llm-tokens")]);
    tokens.hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/x"), tokens.clone()], 0).await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses.len(), 2);
    assert!(r.statuses.iter().all(|s| s.code == Code::OverLimit as i32));
    // All or nothing: the first alone would have fitted, and nothing was charged.
    assert_eq!(remaining(&mut c, &key).await, 9);
    // 3 + 3×1: fits, one debit, the same balance in both statuses.
    tokens.hits_addend = Some(UInt64Value { value: 1 });
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/x"), tokens], 0).await;
    assert!(ok(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 3);
    assert_eq!(r.statuses[1].limit_remaining, 3);
    // Both descriptors are one decision: one ledger row with their summed units and cost.
    let rows = rows_of(&d, &key, 3).await;
    let multi: Vec<_> = rows.iter().filter(|r| r["cost"] == 6.0).collect();
    assert_eq!(multi.len(), 1, "{rows:?}");
    assert_eq!(multi[0]["units"], 2.0);
    d.stop().await;
}

#[tokio::test]
async fn a_denied_key_gives_back_what_the_other_keys_of_the_request_paid() {
    // Also when the daemon keeps no record of the ids it generates: the refund needs one.
    for remember in [true, false] {
        let mut config = config(&redis_url(), "");
        config.store.remember_generated_ids = remember;
        gives_back(TestDaemon::start(config).await).await;
    }
}

async fn gives_back(d: TestDaemon) {
    let mut c = client(d.grpc.expect("grpc on")).await;
    let rich = unique("rich");
    let poor = unique("poor");
    // Drain `poor` to 1 token.
    for _ in 0..3 {
        assert!(ok(&ask(&mut c, "", vec![keyed(&poor, "/v1/x")], 0).await));
    }
    let r = ask(
        &mut c,
        "",
        vec![keyed(&rich, "/v1/x"), keyed(&poor, "/v1/x")],
        0,
    )
    .await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
    assert_eq!(header(&r, "x-envoy-ratelimited"), Some("true"));
    // Envoy rejects the request: `rich` paid nothing in the end.
    assert_eq!(remaining(&mut c, &rich).await, 9);
    d.stop().await;
}

#[tokio::test]
async fn unknown_entries_are_ignored_and_keyless_descriptors_are_not_ours() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("extra");
    let r = ask(
        &mut c,
        "",
        vec![
            descriptor(&[
                ("destination_cluster", "backend"),
                ("api_key", &key),
                ("header_match", "beta"),
                ("path", "/v1/x"),
                ("method", "get"),
            ]),
            // Another limit's descriptor (Envoy's remote_address action alone): no key.
            descriptor(&[("remote_address", "10.1.2.3")]),
        ],
        0,
    )
    .await;
    assert!(ok(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 7, "priced as /v1/x only");
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert!(r.statuses[1].current_limit.is_none(), "no limit of ours");
    d.stop().await;
}

#[tokio::test]
async fn a_request_without_a_key_is_denied_by_default_or_allowed_if_configured() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let r = ask(
        &mut c,
        "",
        vec![descriptor(&[("path", "/v1/x"), ("generic_key", "x")])],
        0,
    )
    .await;
    assert!(over(&r), "{r:?}");
    assert_eq!(header(&r, "x-enforcer-error"), Some("missing_key"));
    d.stop().await;

    let d = daemon("[envoy]\nmissing_key = \"allow\"\n").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let r = ask(&mut c, "", vec![descriptor(&[("path", "/v1/x")])], 0).await;
    assert!(ok(&r), "{r:?}");
    // The key can also come from an entry the config names (a header_match's descriptor).
    d.stop().await;
    let d = daemon("[envoy]\nkey_entries = [\"api_key\", \"tenant_key\"]\n").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("tenant");
    let r = ask(
        &mut c,
        "",
        vec![descriptor(&[("tenant_key", &key), ("path", "/v1/x")])],
        0,
    )
    .await;
    assert!(ok(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 7);
    d.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_charges_nothing() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("bad");
    for (descriptors, reason) in [
        (vec![keyed(&key, "/v1/x\0/admin")], "bad_endpoint"),
        (vec![keyed(&key, "no-slash")], "bad_endpoint"),
        (
            vec![descriptor(&[
                ("api_key", &key),
                ("path", "/v1/x"),
                ("method", "G T"),
            ])],
            "bad_method",
        ),
        (
            vec![descriptor(&[("api_key", &key), ("method", "GET")])],
            "bad_endpoint",
        ),
        (
            vec![descriptor(&[("api_key", ""), ("path", "/v1/x")])],
            "bad_key",
        ),
        (
            vec![descriptor(&[
                ("api_key", &key),
                ("path", "/v1/x"),
                ("request_id", "bad\u{7f}id"),
            ])],
            "bad_request_id",
        ),
        // A flood of descriptors: the work per call stays bounded.
        (
            (0..65).map(|_| keyed(&key, "/v1/cheap")).collect(),
            "too_many_descriptors",
        ),
        // One request cannot charge the operational bucket and the budget at once.
        (
            vec![keyed(&key, "/health"), keyed(&key, "/v1/x")],
            "mixed_buckets",
        ),
    ] {
        let r = ask(&mut c, "", descriptors, 0).await;
        assert!(over(&r), "{reason}: {r:?}");
        assert_eq!(header(&r, "x-enforcer-error"), Some(reason), "{r:?}");
    }
    assert_eq!(remaining(&mut c, &key).await, 9, "nothing was charged");
    d.stop().await;
}

#[tokio::test]
async fn paths_are_priced_in_normal_form_and_domains_pick_their_cost_table() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("norm");
    // `//v1/./x/` and `/v1/%78?q=1` are `/v1/x` (3 tokens), not the default (1).
    let r = ask(&mut c, "", vec![keyed(&key, "//v1/./x/")], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 7);
    let r = ask(&mut c, "", vec![keyed(&key, "/v1/%78?q=1")], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 4);
    // The `premium` domain prices /v1/x at 5; an unknown domain uses the global table.
    let key = unique("domain");
    let r = ask(&mut c, "premium", vec![keyed(&key, "/v1/x")], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 5);
    let r = ask(&mut c, "other", vec![keyed(&key, "/v1/x")], 0).await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    d.stop().await;
}

#[tokio::test]
async fn a_request_id_entry_makes_retries_free_and_reuse_a_conflict() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("idem");
    let id = unique("req");
    let with_id = |path: &str| {
        descriptor(&[
            ("api_key", &key),
            ("path", path),
            ("method", "POST"),
            ("request_id", &id),
        ])
    };
    let first = ask(&mut c, "", vec![with_id("/v1/x")], 0).await;
    assert!(ok(&first));
    assert_eq!(first.statuses[0].limit_remaining, 7);
    // The same request again (an Envoy retry of the call): answered, not charged.
    let retry = ask(&mut c, "", vec![with_id("/v1/x")], 0).await;
    assert!(ok(&retry));
    assert_eq!(remaining(&mut c, &key).await, 6);
    // The same id for another request: refused, nothing charged.
    let reuse = ask(&mut c, "", vec![with_id("/v1/cheap")], 0).await;
    assert!(over(&reuse), "{reuse:?}");
    assert_eq!(
        header(&reuse, "x-enforcer-error"),
        Some("request_id_conflict")
    );
    assert_eq!(remaining(&mut c, &key).await, 5);
    // The ledger has the first decision, the replay and the conflict under the id.
    let rows = d.ledger_rows(&id, 3).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_store_outage_answers_by_policy_within_the_timeout() {
    // A Redis that is gone: a port nothing listens on.
    let gone = format!("redis://127.0.0.1:{}", enforcer_tests::free_port());
    for (policy, want_ok) in [("fail-open", true), ("fail-closed", false)] {
        let mut config = config(&gone, "");
        config.store.on_store_failure = if want_ok {
            enforcer::config::OnStoreFailure::FailOpen
        } else {
            enforcer::config::OnStoreFailure::FailClosed
        };
        let d = TestDaemon::start(config).await;
        let mut c = client(d.grpc.expect("grpc on")).await;
        for _ in 0..3 {
            let started = Instant::now();
            let r = ask(&mut c, "", vec![keyed(&unique("outage"), "/v1/x")], 0).await;
            // Never hangs: answered by the policy (a generous bound for a busy machine; the
            // store timeout is 200 ms).
            assert!(started.elapsed() < Duration::from_secs(5), "{policy}");
            assert_eq!(ok(&r), want_ok, "{policy}: {r:?}");
            assert_eq!(
                header(&r, "x-enforcer-mode"),
                Some(policy),
                "{policy}: {r:?}"
            );
        }
        d.stop().await;
    }
}

#[tokio::test]
async fn concurrent_calls_never_spend_a_token_twice() {
    let d = daemon("").await;
    let addr = d.grpc.expect("grpc on");
    let key = unique("race");
    // 40 concurrent calls of 1 token each, on several connections, against 10 tokens.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            ok(&ask(&mut c, "", vec![keyed(&key, "/v1/cheap")], 0).await)
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task") {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10);
    d.stop().await;
}

#[tokio::test]
async fn grpc_health_says_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let d = daemon("").await;
    let addr = d.grpc.expect("grpc on");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut h = HealthClient::new(channel);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health answers")
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    // An unknown service is NOT_FOUND, as the protocol says.
    let err = h
        .check(HealthCheckRequest {
            service: "nope".to_owned(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // The HTTP API is unaffected by gRPC beside it.
    assert_eq!(http(d.addr, "GET", "/healthz", &[], "").await.status, 200);
    d.stop().await;
}

#[tokio::test]
async fn an_address_from_an_untrusted_peer_is_not_taken() {
    let d = daemon("").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("addr");
    let r = ask(
        &mut c,
        "",
        vec![descriptor(&[
            ("api_key", &key),
            ("path", "/v1/x"),
            ("remote_address", "203.0.113.9"),
        ])],
        0,
    )
    .await;
    assert!(ok(&r));
    let text = String::from_utf8(http(d.addr, "GET", "/metrics", &[], "").await.body.to_vec())
        .expect("utf-8");
    assert!(
        enforcer_tests::parse_metric(
            &text,
            "enforcer_client_addresses_total{outcome=\"untrusted_peer\"}"
        ) >= 1.0,
        "no trusted_proxies: Envoy's remote_address is not taken"
    );
    let rows = rows_of(&d, &key, 1).await;
    assert_eq!(rows[0]["client_ip"], serde_json::Value::Null, "{rows:?}");
    d.stop().await;

    // Envoy on loopback is trusted: its remote_address is the client's, in the audit row.
    let d = daemon("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
    let mut c = client(d.grpc.expect("grpc on")).await;
    let key = unique("addr-trusted");
    let r = ask(
        &mut c,
        "",
        vec![descriptor(&[
            ("api_key", &key),
            ("path", "/v1/x"),
            ("remote_address", "203.0.113.9"),
        ])],
        0,
    )
    .await;
    assert!(ok(&r));
    let rows = rows_of(&d, &key, 1).await;
    assert_eq!(rows[0]["client_ip"], "203.0.113.9", "{rows:?}");
    d.stop().await;
}
