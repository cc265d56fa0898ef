//! The HTTP decision API, black-box on 127.0.0.1:0, with the real Redis store.
use enforcer::config::{Config, OnStoreFailure};
use enforcer_tests::{PrivateRedis, TestDaemon, check, example_config, http, redis_url, unique};
use serde_json::json;
use std::time::{Duration, Instant};

async fn daemon() -> TestDaemon {
    TestDaemon::start(example_config(&redis_url())).await
}

/// A daemon whose default tier does not refill: balances move only by debits and refunds,
/// however slow the machine is, so tests can compare them exactly.
async fn no_refill_daemon() -> TestDaemon {
    let mut config = example_config(&redis_url());
    if let Some(free) = config.tiers.get_mut("free") {
        free.refill_per_sec = 0.0;
    }
    TestDaemon::start(config).await
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let r = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).expect("utf-8 metrics")
}

/// The value of a metric line that starts with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn allowed_then_exhausted_with_retry_after_and_ratelimit_headers() {
    let d = daemon().await;
    let key = unique("drain");
    let body = json!({"key": key, "endpoint": "/generate-report", "method": "POST"});
    // Refill runs at 10 tokens/s while the test does: bounds below allow for a slow machine.
    let started = Instant::now();
    let r = check(d.addr, body.clone()).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["allowed"], true);
    assert_eq!(j["cost"], 120.0);
    assert_eq!(j["tier"], "free");
    assert_eq!(j["mode"], "enforce");
    assert!((j["remaining"].as_f64().expect("remaining") - 680.0).abs() < 1.0);
    assert_eq!(r.header("ratelimit-policy"), Some("\"free\";q=1000;w=100"));
    assert!(
        r.header("ratelimit")
            .is_some_and(|v| v.starts_with("\"free\";r=680;t="))
    );
    assert!(r.header("x-enforcer-request-id").is_some());

    for _ in 0..5 {
        assert_eq!(check(d.addr, body.clone()).await.status, 200);
    }
    let r = check(d.addr, body.clone()).await;
    assert_eq!(r.status, 429);
    let j = r.json();
    assert_eq!(j["allowed"], false);
    assert_eq!(j["reason"], "exhausted");
    let retry_ms = j["retry_after_ms"].as_u64().expect("retry_after_ms");
    let refilled_ms = started.elapsed().as_millis() as u64 + 1;
    assert!(
        retry_ms <= 4_000 && retry_ms + refilled_ms >= 4_000,
        "(120 - 80) / 10 per s, less what refilled in {refilled_ms} ms: {retry_ms}"
    );
    let secs = retry_ms.div_ceil(1000).max(1);
    assert_eq!(r.header("retry-after"), Some(secs.to_string().as_str()));
    let remaining = j["remaining"].as_f64().expect("remaining").floor() as u64;
    assert!(
        r.header("ratelimit")
            .is_some_and(|v| v.contains(&format!(";r={remaining};t={secs}"))),
        "{:?}",
        r.header("ratelimit")
    );

    // A cheap endpoint still fits in the remaining 80 tokens.
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/items", "method": "GET"}),
    )
    .await;
    assert_eq!(r.status, 200);
    d.stop().await;
}

/// A prepaid key (a tier without refill) with no credit: `Retry-After` and `RateLimit` must
/// not contradict each other. No time brings more tokens (only an operator grant does), so
/// `RateLimit` names no `t` (a `t=0` would say "available now"), and `Retry-After` says "not
/// soon", on `/v1/check` and `/v1/auth` alike.
#[tokio::test]
async fn a_prepaid_key_without_credit_names_no_reset_and_asks_for_no_early_retry() {
    let mut config = example_config(&redis_url());
    config.budget.default_tier = "prepaid".to_owned();
    let d = TestDaemon::start(config).await;
    let key = unique("prepaid");
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    assert_eq!(r.status, 429, "{:?}", r.json());
    let j = r.json();
    assert_eq!(j["tier"], "prepaid");
    assert_eq!(j["reason"], "exhausted");
    assert_eq!(
        j["retry_after_ms"],
        serde_json::Value::Null,
        "never by refill"
    );
    assert_eq!(r.header("ratelimit"), Some("\"prepaid\";r=0"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"prepaid\";q=5000"));
    assert_eq!(r.header("retry-after"), Some("3600"));

    let auth = http(
        d.addr,
        "GET",
        "/v1/auth",
        &[
            ("x-api-key", &key),
            ("x-original-uri", "/generate-report"),
            ("x-original-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(auth.status, 429);
    assert_eq!(auth.header("ratelimit"), Some("\"prepaid\";r=0"));
    assert_eq!(auth.header("retry-after"), Some("3600"));
    d.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_debits_nothing() {
    let d = no_refill_daemon().await;
    let key = unique("bad");
    let before = check(d.addr, json!({"key": key, "endpoint": "/x"}))
        .await
        .json()["remaining"]
        .as_f64()
        .expect("remaining");
    let cases = [
        ("not json".to_owned(), "bad_json"),
        (json!({"endpoint": "/x"}).to_string(), "bad_json"),
        (json!({"key": key}).to_string(), "bad_json"),
        (json!({"key": "", "endpoint": "/x"}).to_string(), "bad_key"),
        (
            json!({"key": "has space", "endpoint": "/x"}).to_string(),
            "bad_key",
        ),
        (
            json!({"key": key, "endpoint": "x"}).to_string(),
            "bad_endpoint",
        ),
        (
            json!({"key": key, "endpoint": "/x", "method": "get"}).to_string(),
            "bad_method",
        ),
        (
            json!({"key": key, "endpoint": "/x", "units": 0}).to_string(),
            "bad_units",
        ),
        (
            json!({"key": key, "endpoint": "/x", "units": -3}).to_string(),
            "bad_units",
        ),
        (
            json!({"key": key, "endpoint": "/x", "units": 1e12}).to_string(),
            "bad_units",
        ),
        (
            r#"{"key":"k","endpoint":"/x","units":1e999}"#.to_owned(),
            "bad_json",
        ),
        (
            json!({"key": key, "endpoint": "/x", "units": "lots"}).to_string(),
            "bad_json",
        ),
        (
            json!({"key": key, "endpoint": "/x", "request_id": "a b"}).to_string(),
            "bad_request_id",
        ),
        (
            json!({"key": key, "endpoint": "/x", "client_ip": "nope"}).to_string(),
            "bad_json",
        ),
        (
            json!({"key": key, "endpoint": "/x", "surprise": 1}).to_string(),
            "bad_json",
        ),
    ];
    for (body, code) in cases {
        let r = http(d.addr, "POST", "/v1/check", &[], body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        let j = r.json();
        assert_eq!(j["error"]["code"], code, "{body}: {j}");
        assert!(
            !j["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{body}: message"
        );
    }
    let big = format!(
        r#"{{"key":"{key}","endpoint":"/x","pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let r = http(d.addr, "POST", "/v1/check", &[], big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "too_large");

    let after = check(d.addr, json!({"key": key, "endpoint": "/x"}))
        .await
        .json()["remaining"]
        .as_f64()
        .expect("remaining");
    assert_eq!(
        after,
        before - 1.0,
        "only the two good checks were charged: {before} → {after}"
    );
    let m = metrics(d.addr).await;
    assert!(
        metric(&m, "enforcer_bad_requests_total") >= 16.0,
        "bad requests counted"
    );
    d.stop().await;
}

#[tokio::test]
async fn units_multiply_the_price_and_request_ids_make_retries_free() {
    let d = daemon().await;
    let key = unique("units");
    let r = check(d.addr, json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 2, "request_id": "req-1"})).await;
    let j = r.json();
    assert_eq!(j["cost"], 240.0);
    assert_eq!(j["request_id"], "req-1");
    let again = check(d.addr, json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 2, "request_id": "req-1"})).await;
    let j2 = again.json();
    assert_eq!(j2["replayed"], true);
    assert_eq!(
        j2["remaining"], j["remaining"],
        "a retry is not charged again"
    );
    d.stop().await;
}

#[tokio::test]
async fn operational_endpoints_never_touch_the_main_budget() {
    // A refill slow enough that a busy machine's loop cannot earn a token back in between.
    let mut config = example_config(&redis_url());
    config.budget.operational.refill_per_sec = 0.01;
    let d = TestDaemon::start(config).await;
    let key = unique("health");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            check(
                d.addr,
                json!({"key": key, "endpoint": "/health", "method": "GET"}),
            )
            .await
            .status,
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "the strict bucket denies a burst: {statuses:?}"
    );
    let main = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    assert!((main.json()["remaining"].as_f64().expect("remaining") - 680.0).abs() < 1.0);
    d.stop().await;
}

#[tokio::test]
async fn auth_endpoint_for_nginx_and_traefik() {
    let d = daemon().await;
    let key = unique("auth");
    let ok = http(
        d.addr,
        "GET",
        "/v1/auth",
        &[
            ("x-api-key", &key),
            ("x-original-uri", "/generate-report?x=1"),
            ("x-original-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.header("ratelimit")
            .is_some_and(|v| v.starts_with("\"free\";r=680")),
        "{:?}",
        ok.header("ratelimit")
    );
    // Traefik's header names work too.
    let traefik_headers = [
        ("x-api-key", key.as_str()),
        ("x-forwarded-uri", "/generate-report"),
        ("x-forwarded-method", "POST"),
    ];
    let traefik = || http(d.addr, "GET", "/v1/auth", &traefik_headers, "");
    for _ in 0..5 {
        assert_eq!(traefik().await.status, 200);
    }
    let denied = traefik().await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("retry-after"), Some("4"));
    let missing = http(d.addr, "GET", "/v1/auth", &[("x-original-uri", "/x")], "").await;
    assert_eq!(missing.status, 401);
    let no_uri = http(d.addr, "GET", "/v1/auth", &[("x-api-key", &key)], "").await;
    assert_eq!(no_uri.status, 400);
    d.stop().await;
}

#[tokio::test]
async fn refund_gives_back_the_cost_once() {
    let d = daemon().await;
    let key = unique("refund");
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    let id = r.json()["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    let refund = |id: String| {
        let key = key.clone();
        async move {
            http(
                d.addr,
                "POST",
                "/v1/refund",
                &[],
                json!({"key": key, "request_id": id}).to_string(),
            )
            .await
        }
    };
    let first = refund(id.clone()).await;
    assert_eq!(first.status, 200);
    assert!((first.json()["credited"].as_f64().expect("credited") - 120.0).abs() < 0.5);
    assert_eq!(refund(id.clone()).await.status, 409);
    assert_eq!(refund("never-seen".into()).await.status, 404);
    let bad = http(
        d.addr,
        "POST",
        "/v1/refund",
        &[],
        json!({"key": key}).to_string(),
    )
    .await;
    assert_eq!(bad.status, 400);
    d.stop().await;
}

#[tokio::test]
async fn unknown_keys_can_be_refused() {
    let mut config = example_config(&redis_url());
    config.budget.unknown_keys = enforcer::config::UnknownKeyPolicy::Reject;
    let d = TestDaemon::start(config).await;
    let r = check(d.addr, json!({"key": unique("stranger"), "endpoint": "/x"})).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "unknown_key");
    d.stop().await;
}

/// In shadow mode an unknown key that `unknown_keys = "reject"` would refuse passes, and is
/// counted as a would-be denial, not as allowed.
#[tokio::test]
async fn shadow_mode_counts_an_unknown_key_as_would_deny() {
    let mut config = example_config(&redis_url());
    config.budget.unknown_keys = enforcer::config::UnknownKeyPolicy::Reject;
    config.budget.shadow = true;
    let d = TestDaemon::start(config).await;
    let r = check(d.addr, json!({"key": unique("stranger"), "endpoint": "/x"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["reason"], "unknown_key");
    let m = metrics(d.addr).await;
    assert_eq!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"shadow\",outcome=\"would_deny\",tier=\"unknown\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"shadow\",outcome=\"allowed\""
        ),
        0.0,
        "{m}"
    );
    d.stop().await;
}

/// Shadow mode allows everything, and counts what it would have denied as `would_deny`
/// (mode `shadow`), so a denial-ratio alert sees them; only what the budget paid is `allowed`.
#[tokio::test]
async fn shadow_mode_decides_but_always_allows() {
    let mut config = example_config(&redis_url());
    config.budget.shadow = true;
    // No refill: exactly 6 of 8 fit in the 800 tokens a new key starts with, however slow
    // the machine.
    if let Some(free) = config.tiers.get_mut("free") {
        free.refill_per_sec = 0.0;
    }
    let d = TestDaemon::start(config).await;
    let key = unique("shadow");
    let body = json!({"key": key, "endpoint": "/generate-report", "method": "POST"});
    let mut would_deny = 0;
    let mut last = None;
    for _ in 0..8 {
        let r = check(d.addr, body.clone()).await;
        assert_eq!(r.status, 200, "shadow mode never denies");
        if r.json()["reason"] == "exhausted" {
            would_deny += 1;
        }
        last = Some(r);
    }
    let r = last.expect("responses");
    let j = r.json();
    assert_eq!(j["mode"], "shadow");
    assert_eq!(j["reason"], "exhausted", "it would have been denied");
    assert_eq!(would_deny, 2, "800 tokens pay for 6 reports at 120");
    let m = metrics(d.addr).await;
    assert_eq!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"shadow\",outcome=\"would_deny\",tier=\"free\"}"
        ),
        f64::from(would_deny),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"shadow\",outcome=\"allowed\",tier=\"free\"}"
        ),
        f64::from(8 - would_deny),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"shadow\",outcome=\"denied\""
        ),
        0.0,
        "{m}"
    );
    d.stop().await;
}

#[tokio::test]
async fn probes_and_metrics_carry_no_keys() {
    let d = daemon().await;
    let key = unique("secret-in-metrics");
    check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    assert_eq!(http(d.addr, "GET", "/healthz", &[], "").await.status, 200);
    let ready = http(d.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200);
    let j = ready.json();
    assert_eq!(j["store"]["backend"], "redis");
    assert_eq!(j["kernel"]["attached"], false);
    let m = metrics(d.addr).await;
    assert!(!m.contains(&key), "metrics contain the raw key");
    let hash = enforcer::key::ApiKey::parse(&key)
        .expect("key")
        .hash()
        .to_hex();
    assert!(!m.contains(&hash[..16]), "metrics contain the key hash");
    assert!(
        metric(
            &m,
            "enforcer_decisions_total{mode=\"enforce\",outcome=\"allowed\",tier=\"free\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "enforcer_debit_duration_seconds_count{backend=\"redis\"}"
        ) >= 1.0
    );
    assert_eq!(http(d.addr, "GET", "/nope", &[], "").await.status, 404);
    d.stop().await;
}

fn failing_config(url: &str, policy: OnStoreFailure) -> Config {
    let mut config = example_config(url);
    config.store.on_store_failure = policy;
    config.store.breaker_failures = 3;
    config.store.breaker_open_ms = 500;
    config.store.connect_timeout_ms = 200;
    config
}

#[tokio::test]
async fn redis_down_fails_open_breaker_opens_and_closes_by_itself() {
    let mut redis = PrivateRedis::start();
    let d = TestDaemon::start(failing_config(&redis.url(), OnStoreFailure::FailOpen)).await;
    let key = unique("outage");
    let body = json!({"key": key, "endpoint": "/generate-report", "method": "POST"});
    assert_eq!(check(d.addr, body.clone()).await.json()["mode"], "enforce");

    redis.stop();
    for _ in 0..10 {
        let started = Instant::now();
        let r = check(d.addr, body.clone()).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a decision never waits on a dead store"
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["mode"], "fail-open");
    }
    let m = metrics(d.addr).await;
    assert_eq!(
        metric(&m, "enforcer_store_breaker_state"),
        1.0,
        "breaker open"
    );
    assert!(
        metric(
            &m,
            "enforcer_store_failure_decisions_total{policy=\"fail-open\"}"
        ) >= 10.0
    );
    assert!(metric(&m, "enforcer_store_errors_total{kind=\"breaker_open\"}") >= 1.0);
    assert_eq!(http(d.addr, "GET", "/readyz", &[], "").await.status, 503);

    redis.restart();
    // The breaker lets a probe through after 500 ms and closes on its success.
    let started = Instant::now();
    loop {
        let r = check(d.addr, body.clone()).await;
        if r.json()["mode"] == "enforce" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "breaker never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&metrics(d.addr).await, "enforcer_store_breaker_state"),
        0.0
    );
    d.stop().await;
}

#[tokio::test]
async fn a_hanging_store_is_cut_off_by_the_timeout_and_fails_closed() {
    // A server that accepts connections and never answers: only the timeout can save us.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let d = TestDaemon::start(failing_config(
        &format!("redis://127.0.0.1:{port}/"),
        OnStoreFailure::FailClosed,
    ))
    .await;
    let body = json!({"key": unique("hang"), "endpoint": "/x"});
    for _ in 0..5 {
        let started = Instant::now();
        let r = check(d.addr, body.clone()).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "bounded by store.timeout_ms"
        );
        assert_eq!(r.status, 429);
        let j = r.json();
        assert_eq!(j["mode"], "fail-closed");
        assert_eq!(j["reason"], "store_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let m = metrics(d.addr).await;
    assert!(
        metric(&m, "enforcer_store_errors_total{kind=\"timeout\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "enforcer_store_failure_decisions_total{policy=\"fail-closed\"}"
        ) >= 5.0
    );
    d.stop().await;
}

#[tokio::test]
async fn embedded_store_serves_without_redis() {
    let d = TestDaemon::start(example_config("")).await;
    let key = unique("embedded");
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["remaining"], 680.0);
    let ready = http(d.addr, "GET", "/readyz", &[], "").await.json();
    assert_eq!(ready["store"]["backend"], "memory");
    d.stop().await;
}

/// Request ids are idempotency keys bound to their request: a cheap call's id cannot make an
/// expensive call free (it used to: 20 of 20 allowed, nothing charged).
#[tokio::test]
async fn a_request_id_reused_for_another_request_is_refused_with_409_and_charges_nothing() {
    let d = no_refill_daemon().await;
    let key = unique("reuse");
    let cheap = json!({"key": key, "endpoint": "/cheap", "method": "GET", "request_id": "r-1"});
    let r = check(d.addr, cheap.clone()).await;
    assert_eq!(r.status, 200);
    let after_cheap = r.json()["remaining"].as_f64().expect("remaining");
    let expensive =
        json!({"key": key, "endpoint": "/generate-report", "method": "POST", "request_id": "r-1"});
    for _ in 0..20 {
        let r = check(d.addr, expensive.clone()).await;
        assert_eq!(r.status, 409, "{:?}", r.json());
        let j = r.json();
        assert_eq!(j["error"]["code"], "request_id_conflict");
        assert!(j["decision_id"].is_string());
        assert_eq!(
            r.header("retry-after"),
            None,
            "a conflict is not a rate limit"
        );
    }
    // Other parameters are bound too: units, and a method-less check.
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/cheap", "method": "GET", "units": 3, "request_id": "r-1"}),
    )
    .await;
    assert_eq!(r.status, 409);
    // The same on /v1/auth (nginx auth_request, Traefik forwardAuth).
    let r = http(
        d.addr,
        "GET",
        "/v1/auth",
        &[
            ("x-api-key", key.as_str()),
            ("x-original-uri", "/generate-report"),
            ("x-original-method", "POST"),
            ("x-request-id", "r-1"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 409);
    // The genuine retry replays, and a fresh id shows that nothing else was charged.
    let r = check(d.addr, cheap).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["replayed"], true);
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/cheap", "method": "GET", "request_id": "r-2"}),
    )
    .await;
    let left = r.json()["remaining"].as_f64().expect("remaining");
    assert_eq!(
        left,
        after_cheap - 1.0,
        "only the two cheap calls were charged: {after_cheap} then {left}"
    );
    // Every conflict is in the ledger as such, with nothing charged.
    let rows = d.ledger_rows("r-1", 24).await;
    let conflicts: Vec<_> = rows
        .iter()
        .filter(|r| r["denial"] == "request_id_conflict")
        .collect();
    assert_eq!(conflicts.len(), 22, "{rows:?}");
    assert!(conflicts.iter().all(|r| r["allowed"] == false));
    assert!(
        metric(
            &metrics(d.addr).await,
            "enforcer_decisions_total{mode=\"enforce\",outcome=\"request_id_conflict\""
        ) >= 22.0
    );
    d.stop().await;
}

/// A refund closes a request: sending it again is a new attempt, charged again.
#[tokio::test]
async fn a_retry_after_its_refund_is_charged_again() {
    let d = no_refill_daemon().await;
    let key = unique("refund-retry");
    let body = json!({"key": key, "endpoint": "/generate-report", "method": "POST", "request_id": "job-7"});
    let first = check(d.addr, body.clone()).await.json();
    assert_eq!(first["remaining"], 680.0);
    let r = http(
        d.addr,
        "POST",
        "/v1/refund",
        &[],
        json!({"key": key, "request_id": "job-7"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let again = check(d.addr, body).await.json();
    assert_eq!(again["replayed"], false);
    assert_eq!(again["remaining"], 680.0, "charged again after the refund");
    d.stop().await;
}

/// Shadow mode never refuses a request for budget reasons, not even an unknown key or a store
/// that is down under fail-closed; it records what it would have denied. A request-id conflict
/// (a client error) is refused in every mode.
#[tokio::test]
async fn shadow_mode_allows_unknown_keys_and_fail_closed_and_records_the_denial() {
    let mut config = example_config(&redis_url());
    config.budget.shadow = true;
    config.budget.unknown_keys = enforcer::config::UnknownKeyPolicy::Reject;
    let d = TestDaemon::start(config).await;
    let r = check(
        d.addr,
        json!({"key": unique("stranger"), "endpoint": "/x", "request_id": "s-1"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(
        (j["allowed"].clone(), j["mode"].clone()),
        (json!(true), json!("shadow"))
    );
    assert_eq!(j["reason"], "unknown_key");
    let rows = d.ledger_rows("s-1", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["denial"], "unknown_key");
    assert_eq!(rows[0]["allowed"], true);
    d.stop().await;

    let mut config = failing_config("redis://127.0.0.1:1/", OnStoreFailure::FailClosed);
    config.budget.shadow = true;
    let d = TestDaemon::start(config).await;
    let r = check(
        d.addr,
        json!({"key": unique("shadow-down"), "endpoint": "/x", "request_id": "s-2"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["reason"], "store_unavailable");
    assert_eq!(r.json()["mode"], "shadow");
    let rows = d.ledger_rows("s-2", 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["denial"], "store_unavailable");
    d.stop().await;
}

/// A cost no store may charge is bad input (400), never a store failure that fail-open admits.
#[tokio::test]
async fn a_cost_out_of_range_is_400_even_with_fail_open() {
    let mut config = example_config(&redis_url());
    config.store.on_store_failure = OnStoreFailure::FailOpen;
    config.budget.max_units = 1e6;
    config.pricing.endpoints[0].base_cost = 1e12;
    let d = TestDaemon::start(config).await;
    let key = unique("huge");
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 10000, "request_id": "h-1"}),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert_eq!(r.json()["error"]["code"], "bad_cost");
    // A cost in range goes to the store as usual (1e12 is beyond the free tier: a denial).
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 1}),
    )
    .await;
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert_eq!(r.json()["reason"], "exhausted");
    d.stop().await;
}
