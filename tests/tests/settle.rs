//! Reserve → settle over the HTTP API, against a real Redis: an LLM endpoint reserved at an
//! estimate (`settle = "after"`, or `reserve: true`) and settled at the tokens generated
//! (`POST /v1/settle`), once; bad input changes nothing; an unsettled reservation expires after
//! `settle_ttl_secs` keeping its estimate; every settle is a ledger row of kind `settle`.
use enforcer::config::{Config, EndpointConfig, SettleWhen, TierConfig};
use enforcer_tests::{TestDaemon, check, example_config, http, redis_url, unique};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

/// The example config on the test Redis, with `/v1/generate` priced at 1 token per generated
/// token, reserved by itself and capped at 2000, and every key in a tier without refill (so
/// balances move only by what the test does).
fn config() -> Config {
    let mut config = example_config(&redis_url());
    config.pricing.endpoints.push(EndpointConfig {
        method: "POST".into(),
        path: "/v1/generate".into(),
        base_cost: 1.0,
        operational: false,
        calibration_query: String::new(),
        cpu_query: String::new(),
        cpu_reference: 1.0,
        memory_query: String::new(),
        memory_reference: 1e9,
        max_cost: Some(2000.0),
        settle: SettleWhen::After,
    });
    config.tiers.insert(
        "metered".into(),
        TierConfig {
            max_tokens: 5000.0,
            refill_per_sec: 0.0,
            idle_cap: 1.0,
            initial_tokens: Some(1000.0),
            shadow: false,
            grant_ceiling: None,
            low_balance: Vec::new(),
            quota: None,
        },
    );
    config.budget.default_tier = "metered".into();
    config.budget.max_units = 100_000.0;
    config
}

async fn settle(addr: SocketAddr, body: Value) -> (u16, Value) {
    let r = http(
        addr,
        "POST",
        "/v1/settle",
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    let status = r.status;
    (status, r.json())
}

/// `POST /v1/check` of the LLM endpoint for `units` tokens; the JSON answer.
async fn generate(addr: SocketAddr, key: &str, id: &str, units: f64) -> Value {
    let r = check(
        addr,
        json!({"key": key, "endpoint": "/v1/generate", "method": "POST", "units": units,
               "request_id": id}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[tokio::test]
async fn an_llm_request_reserved_at_500_is_settled_at_the_tokens_generated_once() {
    let d = TestDaemon::start(config()).await;
    let key = unique("llm");
    let first = generate(d.addr, &key, "gen-1", 500.0).await;
    assert_eq!(first["reserved"], true, "{first}");
    assert_eq!(first["cost"], 500.0);
    assert_eq!(first["remaining"], 500.0);

    // 812 tokens generated: 312 more are charged.
    let (status, body) = settle(
        d.addr,
        json!({"key": key, "request_id": "gen-1", "units": 812}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["cost"],
            &body["estimate"],
            &body["charged"],
            &body["balance"]
        ),
        (&json!(812.0), &json!(500.0), &json!(312.0), &json!(188.0))
    );
    assert_eq!(
        (&body["replayed"], &body["capped"]),
        (&json!(false), &json!(false))
    );
    // The same settle again (say, a retried webhook): a replay, nothing charged.
    let (status, again) = settle(
        d.addr,
        json!({"key": key, "request_id": "gen-1", "cost": 812.0}),
    )
    .await;
    assert_eq!((status, &again["replayed"]), (200, &json!(true)), "{again}");
    // Another true cost: refused.
    let (status, conflict) = settle(
        d.addr,
        json!({"key": key, "request_id": "gen-1", "cost": 900}),
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "settle_conflict");

    // A short answer credits back; a runaway one is charged max_cost and says so.
    generate(d.addr, &key, "gen-2", 100.0).await;
    let (_, short) = settle(
        d.addr,
        json!({"key": key, "request_id": "gen-2", "units": 40}),
    )
    .await;
    assert_eq!(
        (&short["charged"], &short["balance"]),
        (&json!(-60.0), &json!(148.0))
    );
    generate(d.addr, &key, "gen-3", 100.0).await;
    let (_, runaway) = settle(
        d.addr,
        json!({"key": key, "request_id": "gen-3", "units": 90000}),
    )
    .await;
    assert_eq!(
        (&runaway["cost"], &runaway["capped"], &runaway["balance"]),
        (&json!(2000.0), &json!(true), &json!(-1852.0)),
        "charged max_cost; the work is done, so the balance goes below zero"
    );
    // Through /v1/auth (no body) the reservation is told in headers.
    let other = unique("llm-auth");
    let auth = http(
        d.addr,
        "GET",
        "/v1/auth",
        &[
            ("x-api-key", other.as_str()),
            ("x-original-uri", "/v1/generate"),
            ("x-original-method", "POST"),
            ("x-request-id", "auth-1"),
        ],
        String::new(),
    )
    .await;
    assert_eq!(auth.status, 200);
    assert_eq!(auth.header("x-enforcer-reserved"), Some("true"));
    assert_eq!(auth.header("x-enforcer-request-id"), Some("auth-1"));
    let (status, body) = settle(
        d.addr,
        json!({"key": other, "request_id": "auth-1", "units": 3}),
    )
    .await;
    assert_eq!((status, &body["charged"]), (200, &json!(2.0)), "{body}");
    let plain = http(
        d.addr,
        "GET",
        "/v1/auth",
        &[("x-api-key", other.as_str()), ("x-original-uri", "/search")],
        String::new(),
    )
    .await;
    assert_eq!(plain.header("x-enforcer-reserved"), None);

    // In debt, the key waits (no refill in this tier: for a grant).
    let denied = check(
        d.addr,
        json!({"key": key, "endpoint": "/v1/generate", "method": "POST", "units": 1}),
    )
    .await;
    assert_eq!(denied.status, 429);

    // The ledger: the reservation's debit row and one settle row (the replay and the conflict
    // changed nothing and wrote none).
    let rows = d.ledger_rows("gen-1", 2).await;
    let kinds: Vec<&str> = rows
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or("debit"))
        .collect();
    assert_eq!(kinds, ["debit", "settle"], "{rows:?}");
    assert_eq!(
        (&rows[1]["cost"], &rows[1]["true_cost"]),
        (&json!(312.0), &json!(812.0))
    );
    assert_eq!(rows[1]["remaining"], 188.0);
    let rows = d.ledger_rows("gen-3", 2).await;
    assert_eq!(rows[1]["note"], "capped at max_cost", "{rows:?}");
    d.stop().await;
}

#[tokio::test]
async fn reserve_true_makes_any_check_a_reservation_and_bad_settles_change_nothing() {
    let d = TestDaemon::start(config()).await;
    let key = unique("reserve");
    let plain = check(
        d.addr,
        json!({"key": key, "endpoint": "/search", "request_id": "plain"}),
    )
    .await
    .json();
    assert_eq!(plain["reserved"], false, "{plain}");
    let reserved = check(
        d.addr,
        json!({"key": key, "endpoint": "/search", "request_id": "r-1", "reserve": true,
               "units": 10}),
    )
    .await
    .json();
    assert_eq!(reserved["reserved"], true, "{reserved}");
    let estimate = reserved["cost"].as_f64().expect("cost");
    let before = reserved["remaining"].as_f64().expect("remaining");

    for (body, code) in [
        (json!({"key": key, "request_id": "r-1"}), "bad_settle"),
        (
            json!({"key": key, "request_id": "r-1", "cost": 1, "units": 1}),
            "bad_settle",
        ),
        (
            json!({"key": key, "request_id": "r-1", "cost": -1}),
            "bad_settle",
        ),
        (
            json!({"key": key, "request_id": "r-1", "units": 1e16}),
            "bad_settle",
        ),
        (
            json!({"key": key, "request_id": "r-1", "cost": "1"}),
            "bad_json",
        ),
        (
            json!({"key": key, "request_id": "r-1", "cost": 1, "x": 1}),
            "bad_json",
        ),
        (
            json!({"key": "", "request_id": "r-1", "cost": 1}),
            "bad_key",
        ),
        (
            json!({"key": key, "request_id": "a b", "cost": 1}),
            "bad_request_id",
        ),
    ] {
        let (status, answer) = settle(d.addr, body.clone()).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!(code)),
            "{body}"
        );
    }
    let (status, unknown) = settle(
        d.addr,
        json!({"key": key, "request_id": "never", "cost": 1}),
    )
    .await;
    assert_eq!(
        (status, &unknown["error"]["code"]),
        (404, &json!("unknown_request"))
    );

    // Nothing was changed by the refusals: settling to the estimate moves nothing.
    let (status, same) = settle(
        d.addr,
        json!({"key": key, "request_id": "r-1", "cost": estimate}),
    )
    .await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(
        (&same["charged"], &same["balance"]),
        (&json!(0.0), &json!(before))
    );
    // A refund after a settle gives back the true cost; then nothing is left to settle.
    let refund = http(
        d.addr,
        "POST",
        "/v1/refund",
        &[],
        json!({"key": key, "request_id": "r-1"}).to_string(),
    )
    .await
    .json();
    assert_eq!(refund["credited"], estimate, "{refund}");
    let (status, refunded) =
        settle(d.addr, json!({"key": key, "request_id": "r-1", "cost": 1})).await;
    assert_eq!(
        (status, &refunded["error"]["code"]),
        (409, &json!("already_refunded"))
    );
    d.stop().await;
}

#[tokio::test]
async fn an_unsettled_reservation_expires_after_settle_ttl_and_keeps_its_estimate() {
    let mut config = config();
    config.store.settle_ttl_secs = Some(1);
    let d = TestDaemon::start(config).await;
    let key = unique("expire");
    let reserved = generate(d.addr, &key, "late", 300.0).await;
    assert_eq!(reserved["remaining"], 700.0);
    // A plain request of the same key, remembered for the idempotency ttl (600 s).
    let plain = check(
        d.addr,
        json!({"key": key, "endpoint": "/search", "request_id": "plain"}),
    )
    .await
    .json();
    // Redis expires a key on access at its PX exactly: past it, the record is gone.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let expired = settle(
        d.addr,
        json!({"key": key, "request_id": "late", "cost": 300}),
    )
    .await;
    assert_eq!(expired.0, 404, "{}", expired.1);
    // The estimate stayed charged: the next check starts from 700 less the plain request.
    let next = check(
        d.addr,
        json!({"key": key, "endpoint": "/search", "method": "GET"}),
    )
    .await
    .json();
    let plain_cost = plain["cost"].as_f64().expect("cost");
    let next_cost = next["cost"].as_f64().expect("cost");
    assert_eq!(next["remaining"], 700.0 - plain_cost - next_cost, "{next}");
    // The plain request's record outlives the reservation's.
    let (status, body) = settle(
        d.addr,
        json!({"key": key, "request_id": "plain", "cost": plain_cost}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}
