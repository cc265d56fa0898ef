//! Reservations and their expiry in the audit ledger, against a real daemon, Redis and
//! PostgreSQL: a reservation's debit row says it is one (`settle_by`), the daemon's expiry job
//! writes one `reservation_expiry` row for each reservation neither settled nor refunded in
//! its `settle_ttl` (and none for the others), several runs at once never write one twice,
//! and `enforcer audit usage` for a key with reservations, settles, a refund, an expiry, a
//! plain debit and a grant adds up to a hand computation, in total and per endpoint.
use enforcer::config::{Config, EndpointConfig, SettleWhen, TierConfig};
use enforcer::key::ApiKey;
use enforcer::ledger::postgres::{self, ExpiryWindow};
use enforcer_tests::{
    TestDaemon, check, enforcer_cli, example_config, http, metric, redis_url, unique,
};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The example config on the test Redis, `/v1/generate` priced at 1 token per unit and reserved
/// by itself, every key in a tier without refill (balances move only by what the test does),
/// reservations kept 2 s, and the expiry job every 200 ms without grace (one daemon: its
/// own settle rows are in PostgreSQL before the job runs).
fn config(database_url: &str) -> Config {
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
        max_cost: None,
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
    config.store.settle_ttl_secs = Some(2);
    config.ledger.database_url = database_url.to_owned();
    config.ledger.migrate = !database_url.is_empty();
    config.ledger.expiry_interval_ms = 200;
    config.ledger.expiry_grace_ms = 0;
    config
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let r = http(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    (r.status, r.json())
}

/// A reservation of `units` tokens of `/v1/generate` under request id `id`; its answer.
async fn reserve(addr: SocketAddr, key: &str, id: &str, units: f64) -> Value {
    let r = check(
        addr,
        json!({"key": key, "endpoint": "/v1/generate", "method": "POST", "units": units,
               "request_id": id}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["reserved"], true, "{body}");
    assert_eq!(body["cost"], units, "{body}");
    body
}

/// `enforcer audit usage` of `hash` (optionally `--by endpoint`): its lines, split in fields,
/// header left out.
fn usage(url: &str, hash: &str, by: Option<&str>) -> Vec<Vec<String>> {
    let mut args = vec!["audit", "usage", "--key-hash", hash, "--database-url", url];
    if let Some(by) = by {
        args.extend(["--by", by]);
    }
    let (code, out, err) = tokio::task::block_in_place(|| enforcer_cli(&args, None));
    assert_eq!(code, 0, "{err}");
    out.lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// The key's rows of `kind`, once there are `want` of them in PostgreSQL (or the deadline
/// passed): (request_id, cost, recorded_at = settle_by?, note).
async fn rows_of_kind(
    sql: &sqlx::PgPool,
    hash: &str,
    kind: &str,
    want: usize,
) -> Vec<(String, f64, bool, Option<String>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<(String, f64, bool, Option<String>)> = sqlx::query_as(
            "SELECT e.request_id, e.cost, \
                    e.recorded_at = (SELECT r.settle_by FROM token_transactions r \
                                     WHERE r.id::text = e.note), \
                    e.note \
             FROM token_transactions e WHERE e.key_hash = $1 AND e.kind = $2 \
             ORDER BY e.request_id",
        )
        .bind(hash)
        .bind(kind)
        .fetch_all(sql)
        .await
        .expect("query");
        if rows.len() >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_usage_adds_up_for_reservations_settles_a_refund_an_expiry_a_debit_and_a_grant() {
    let url = enforcer_tests::pg::fresh_database().await;
    let d = TestDaemon::start(config(&url)).await;
    // A second daemon on the same database runs the expiry job too, at the same time: the
    // rows are still written once.
    let other = TestDaemon::start(config(&url)).await;
    let key = unique("usage-res");
    let hash = ApiKey::parse(&key).expect("key").hash().to_hex();
    let sql = sqlx::PgPool::connect(&url).await.expect("pg");

    // A grant over the admin socket: +250.
    let socket = d
        .admin_socket
        .as_ref()
        .expect("admin socket")
        .display()
        .to_string();
    let (code, out, err) = tokio::task::block_in_place(|| {
        enforcer_cli(
            &[
                "keys", "grant", "250", "--note", "top-up", "--socket", &socket,
            ],
            Some(&format!("{key}\n")),
        )
    });
    assert_eq!(code, 0, "{out}{err}");

    // Reserve 100, settle up at 130 (+30).
    reserve(d.addr, &key, "up", 100.0).await;
    let (status, body) = post(
        d.addr,
        "/v1/settle",
        json!({"key": key, "request_id": "up", "units": 130}),
    )
    .await;
    assert_eq!((status, &body["charged"]), (200, &json!(30.0)), "{body}");
    // Reserve 200, settle down at 50 (−150).
    reserve(d.addr, &key, "down", 200.0).await;
    let (status, body) = post(
        d.addr,
        "/v1/settle",
        json!({"key": key, "request_id": "down", "units": 50}),
    )
    .await;
    assert_eq!((status, &body["charged"]), (200, &json!(-150.0)), "{body}");
    // Reserve 80, refund it (−80).
    reserve(d.addr, &key, "ref", 80.0).await;
    let (status, body) = post(
        d.addr,
        "/v1/refund",
        json!({"key": key, "request_id": "ref"}),
    )
    .await;
    assert_eq!((status, &body["credited"]), (200, &json!(80.0)), "{body}");
    // Reserve 60 and never settle it: it expires keeping its 60.
    reserve(d.addr, &key, "exp", 60.0).await;
    // A plain debit: 5 units of /search at the default cost of 1. The balance agrees with
    // the settled total below: 1000 + 250 granted − 245 settled − 5.
    let plain = check(
        d.addr,
        json!({"key": key, "endpoint": "/search", "units": 5, "request_id": "plain"}),
    )
    .await
    .json();
    assert_eq!(
        (&plain["cost"], &plain["reserved"]),
        (&json!(5.0), &json!(false))
    );
    assert_eq!(plain["remaining"], 1005.0, "{plain}");

    // The expiry job writes the row once the 2 s pass: the estimate, under the request id,
    // at the reservation's settle_by, naming its debit row. None for the others.
    let expired = rows_of_kind(&sql, &hash, "reservation_expiry", 1).await;
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(
        (expired[0].0.as_str(), expired[0].1, expired[0].2),
        ("exp", 60.0, true),
        "{expired:?}"
    );
    // The reservations' debit rows say they are reservations; the plain one does not.
    let marked: Vec<(String, bool)> = sqlx::query_as(
        "SELECT request_id, settle_by IS NOT NULL FROM token_transactions \
         WHERE key_hash = $1 AND kind = 'debit' ORDER BY request_id",
    )
    .bind(&hash)
    .fetch_all(&sql)
    .await
    .expect("query");
    let want: Vec<(String, bool)> = [
        ("down", true),
        ("exp", true),
        ("plain", false),
        ("ref", true),
        ("up", true),
    ]
    .into_iter()
    .map(|(id, r)| (id.to_owned(), r))
    .collect();
    assert_eq!(marked, want);
    // Several more runs, after the reservations settled, refunded or plain are long past
    // their settle_by: nothing more is written.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // One of the two daemons wrote it, and neither failed.
    let mut written = 0.0;
    for addr in [d.addr, other.addr] {
        written += metric(addr, "enforcer_ledger_reservation_expiries_total").await;
        let metrics = http(addr, "GET", "/metrics", &[], String::new()).await;
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(
            !metrics.contains(r#"enforcer_ledger_errors_total{op="expire"}"#),
            "{metrics}"
        );
    }
    assert_eq!(written, 1.0);
    d.stop().await;
    other.stop().await;
    let expiries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM token_transactions WHERE key_hash = $1 \
         AND kind = 'reservation_expiry'",
    )
    .bind(&hash)
    .fetch_one(&sql)
    .await
    .expect("count");
    assert_eq!(expiries, 1);

    // The hand computation. Charged at the checks: 100 + 200 + 80 + 60 + 5 = 445, less the
    // 80 refunded = 365. Settled: 365 + 30 − 150 = 245 (the expired reservation keeps its 60).
    // Granted 250. Decisions 5 (all allowed), refunds 1, reservations 4, unsettled 1.
    // Columns: group, decisions, allowed, refunds, tokens charged, tokens granted, tokens
    // settled, paid by grants, grants expired, reservations, unsettled.
    let line = |fields: &[&str]| fields.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        usage(&url, &hash, None),
        [line(&[
            "total", "5", "5", "1", "365.000", "250.000", "245.000", "0.000", "0.000", "4", "1"
        ])]
    );
    // Per endpoint: /v1/generate 100 + 200 + 80 + 60 − 80 = 360 charged, 360 + 30 − 150 = 240
    // settled; /search 5; the grant on a line of its own.
    assert_eq!(
        usage(&url, &hash, Some("endpoint")),
        [
            line(&[
                "(grants)", "0", "0", "0", "0.000", "250.000", "0.000", "0.000", "0.000", "0", "0"
            ]),
            line(&[
                "/search", "1", "1", "0", "5.000", "0.000", "5.000", "0.000", "0.000", "0", "0"
            ]),
            line(&[
                "/v1/generate",
                "4",
                "4",
                "1",
                "360.000",
                "0.000",
                "240.000",
                "0.000",
                "0.000",
                "4",
                "1"
            ]),
        ]
    );
}

/// Reservations recorded by a daemon without a database (the embedded file ledger, which runs
/// no expiry job) carry `settle_by` in the file; `audit import` loads it, and then four expiry
/// runs at once, each bounded to 3 rows, repeated until none has work left, write exactly one
/// row per unsettled reservation: never two, none missed, the settled one left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bounded_expiry_runs_write_each_expiry_once_from_an_imported_file() {
    // A file of the test's own: the daemon's temporary one goes away when it stops.
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = config("");
    config.ledger.file = dir.path().join("ledger.jsonl").display().to_string();
    let d = TestDaemon::start(config).await;
    let key = unique("import-res");
    let hash = ApiKey::parse(&key).expect("key").hash().to_hex();
    let ids: Vec<String> = (0..10).map(|i| format!("res-{i}")).collect();
    for id in &ids {
        reserve(d.addr, &key, id, 10.0).await;
    }
    let (status, body) = post(
        d.addr,
        "/v1/settle",
        json!({"key": key, "request_id": "res-0", "units": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows = d.ledger_rows("res-1", 1).await;
    assert!(rows[0]["settle_by_us"].as_i64().is_some(), "{rows:?}");
    let ledger_file = d.ledger_file.display().to_string();
    // Wait until the file has all 11 rows (the writer appends in the background).
    let _ = d.ledger_rows("res-9", 1).await;
    let _ = d.ledger_rows("res-0", 2).await;
    d.stop().await;

    let url = enforcer_tests::pg::fresh_database().await;
    let (code, out, err) =
        tokio::task::block_in_place(|| enforcer_cli(&["migrate", "--database-url", &url], None));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = tokio::task::block_in_place(|| {
        enforcer_cli(
            &["audit", "import", &ledger_file, "--database-url", &url],
            None,
        )
    });
    assert_eq!(code, 0, "{out}{err}");
    let sql = sqlx::PgPool::connect(&url).await.expect("pg");
    let reservations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM token_transactions \
         WHERE key_hash = $1 AND kind = 'debit' AND settle_by IS NOT NULL",
    )
    .bind(&hash)
    .fetch_one(&sql)
    .await
    .expect("count");
    assert_eq!(reservations, 10);

    // Before their settle_by has passed by the grace, nothing is due.
    let early = ExpiryWindow {
        grace: Duration::from_secs(3600),
        lookback: Duration::from_secs(86_400),
        limit: 100,
    };
    assert_eq!(
        postgres::expire_reservations(&sql, &early)
            .await
            .expect("run"),
        0
    );
    // Past the 2 s settle ttl.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let window = ExpiryWindow {
        grace: Duration::ZERO,
        lookback: Duration::from_secs(86_400),
        limit: 3,
    };
    let mut written = 0;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 20, "the runs never ran out of work");
        let runs = futures_util::future::join_all(
            (0..4).map(|_| postgres::expire_reservations(&sql, &window)),
        )
        .await;
        let n: u64 = runs.into_iter().map(|r| r.expect("run")).sum();
        assert!(n <= 12, "each run writes at most its limit: {n}");
        if n == 0 {
            break;
        }
        written += n;
    }
    assert_eq!(written, 9, "one per unsettled reservation");
    let expired: Vec<String> = sqlx::query_scalar(
        "SELECT request_id FROM token_transactions \
         WHERE key_hash = $1 AND kind = 'reservation_expiry' ORDER BY request_id",
    )
    .bind(&hash)
    .fetch_all(&sql)
    .await
    .expect("rows");
    assert_eq!(expired, ids[1..].to_vec());
}
