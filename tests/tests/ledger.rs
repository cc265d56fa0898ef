//! The audit ledger against the real PostgreSQL that `cargo xtask test` starts: every decision
//! recorded exactly once, through a PostgreSQL outage and a daemon killed with rows in its spill
//! file; monthly partitions, the default partition and its maintenance, retention; UTC whatever
//! the time zones; the embedded file, `enforcer audit import|usage|export`.
use enforcer::config::Config;
use enforcer::ledger::postgres::{self, PgSink};
use enforcer::ledger::{AuditRow, Entry};
use enforcer_tests::{
    Process, TestDaemon, check, enforcer_bin, free_port, metric, parse_metric, pg,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Embedded token store, a small budget (so some decisions are denials), the ledger on `url`
/// (or on the file only, without one).
fn config(url: Option<&str>, dir: &Path) -> Config {
    let mut c = Config::parse(
        r#"
        [tiers.free]
        max_tokens = 40
        refill_per_sec = 1
        "#,
    )
    .expect("valid");
    if let Some(url) = url {
        c.ledger.database_url = url.to_owned();
        c.ledger.migrate = true;
    }
    c.ledger.file = dir.join("ledger.jsonl").display().to_string();
    c.ledger.flush_ms = 20;
    c.ledger.write_timeout_ms = 1000;
    c.ledger.retry_ms = 200;
    c.ledger.node = "test-node".into();
    c
}

/// `tasks` concurrent clients making `each` checks; returns the decision ids answered.
async fn traffic(addr: SocketAddr, tasks: usize, each: usize, pause: Duration) -> Vec<String> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..each {
                let r = check(
                    addr,
                    json!({"key": format!("key-{t}"), "endpoint": "/x", "method": "GET"}),
                )
                .await;
                assert!(r.status == 200 || r.status == 429, "status {}", r.status);
                let id = r.json()["decision_id"]
                    .as_str()
                    .expect("decision_id in every answer")
                    .to_owned();
                ids.push(id);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("client task"));
    }
    all
}

async fn ids_in_db(url: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let ids: Vec<String> = sqlx::query_scalar("SELECT id::text FROM token_transactions")
        .fetch_all(&pool)
        .await
        .expect("select");
    pool.close().await;
    ids
}

/// Waits until the table holds `n` rows (or fails after `limit`).
async fn wait_rows(url: &str, n: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let have = ids_in_db(url).await.len();
        if have >= n {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "only {have} of {n} rows after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every answered decision has exactly one row, and there is no other row.
async fn assert_exactly_once(url: &str, answered: &[String]) {
    let rows = ids_in_db(url).await;
    let distinct: BTreeSet<&String> = rows.iter().collect();
    assert_eq!(distinct.len(), rows.len(), "a row was written twice");
    let expected: BTreeSet<&String> = answered.iter().collect();
    assert_eq!(expected.len(), answered.len(), "decision ids are unique");
    assert_eq!(
        distinct, expected,
        "the rows are exactly the decisions answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_of_a_concurrent_run_is_recorded_exactly_once() {
    concurrent_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_of_a_concurrent_run_is_recorded_exactly_once_without_the_journal() {
    concurrent_run(false).await;
}

async fn concurrent_run(journal: bool) {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = config(Some(&url), dir.path());
    config.ledger.journal = journal;
    let daemon = TestDaemon::start(config).await;
    let addr = daemon.addr;
    // Bad input is refused and recorded nowhere.
    let bad = check(addr, json!({"key": "key-0", "endpoint": "/x", "units": -1})).await;
    assert_eq!(bad.status, 400);
    let ids = traffic(addr, 16, 60, Duration::ZERO).await;
    assert_eq!(ids.len(), 960);
    wait_rows(&url, ids.len(), Duration::from_secs(20)).await;
    assert_eq!(metric(addr, "enforcer_ledger_dropped_total").await, 0.0);
    assert_eq!(metric(addr, "enforcer_ledger_spilled_total").await, 0.0);
    daemon.stop().await;
    assert_exactly_once(&url, &ids).await;
    // Denials are rows too: 16 keys × 60 checks against 40-token buckets.
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let denied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM token_transactions WHERE NOT allowed")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert!(denied > 0, "some decisions were denials");
    let raw: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM token_transactions WHERE key_hash LIKE 'key-%' OR length(key_hash) <> 64",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(raw, 0, "only key hashes are stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_loses_and_doubles_nothing() {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = TestDaemon::start(config(Some(&url), dir.path())).await;
    let addr = daemon.addr;
    // ~8 s of traffic from 4 clients; PostgreSQL is down from 1.5 s to 5.5 s.
    let clients = tokio::spawn(traffic(addr, 4, 400, Duration::from_millis(20)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage = tokio::task::spawn_blocking(pg::Outage::begin)
        .await
        .expect("stop");
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::spawn_blocking(move || outage.end())
        .await
        .expect("start");
    let ids = clients.await.expect("clients");
    wait_rows(&url, ids.len(), Duration::from_secs(30)).await;
    assert!(
        metric(addr, "enforcer_ledger_spilled_total").await > 0.0,
        "rows went to the spill file during the outage"
    );
    assert!(metric(addr, "enforcer_ledger_replayed_total").await > 0.0);
    assert_eq!(metric(addr, "enforcer_ledger_dropped_total").await, 0.0);
    // The gauge follows the commit that made the rows visible (the offset written, the file
    // truncated) within moments.
    let start = Instant::now();
    while metric(addr, "enforcer_ledger_backlog_bytes").await != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the backlog did not return to 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A server that is gone is not the rows' fault: nothing is quarantined.
    assert_eq!(metric(addr, "enforcer_ledger_quarantined_total").await, 0.0);
    daemon.stop().await;
    assert_exactly_once(&url, &ids).await;
}

fn spawn_daemon(port: u16, url: &str, file: &Path) -> Process {
    let child = Command::new(enforcer_bin())
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", url, "--migrate"])
        .arg("--ledger-file")
        .arg(file)
        .env_remove("ENFORCER_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn enforcer");
    Process(child)
}

async fn wait_up(addr: SocketAddr) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_rows_in_its_spill_file_replays_them_after_restart() {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("spill.jsonl");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let daemon = spawn_daemon(port, &url, &file);
    wait_up(addr).await;
    let outage = tokio::task::spawn_blocking(pg::Outage::begin)
        .await
        .expect("stop");
    let ids = traffic(addr, 4, 50, Duration::ZERO).await;
    let start = Instant::now();
    while metric(addr, "enforcer_ledger_spilled_total").await < ids.len() as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "rows did not reach the spill file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(daemon); // SIGKILL: no shutdown, no flush.
    let spilled = std::fs::read_to_string(&file).expect("spill file");
    assert_eq!(spilled.lines().count(), ids.len());
    tokio::task::spawn_blocking(move || outage.end())
        .await
        .expect("start");
    let daemon = spawn_daemon(port, &url, &file);
    wait_up(addr).await;
    wait_rows(&url, ids.len(), Duration::from_secs(30)).await;
    // The writer counts a replayed chunk just after PostgreSQL committed it (and it recorded
    // its progress in the file): the count may trail the rows by a moment.
    let start = Instant::now();
    while metric(addr, "enforcer_ledger_replayed_total").await < ids.len() as f64
        && start.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(addr, "enforcer_ledger_replayed_total").await,
        ids.len() as f64
    );
    drop(daemon);
    assert_exactly_once(&url, &ids).await;
    assert_eq!(
        std::fs::metadata(&file).expect("file").len(),
        0,
        "a replayed spill file is truncated"
    );
}

fn row(at_us: i64) -> Entry {
    Entry::Decision(AuditRow {
        cost: 2.5,
        remaining: Some(10.0),
        request_id: Some("r-1".into()),
        node: "test-node".into(),
        ..AuditRow::sample(at_us, "ab".repeat(32))
    })
}

fn id_of(e: &Entry) -> String {
    match e {
        Entry::Decision(r) => r.id.to_string(),
        Entry::Kernel(k) => k.id.to_string(),
    }
}

async fn partition_of(pool: &sqlx::PgPool, id: &str) -> String {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM token_transactions WHERE id = $1::uuid",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .expect("row")
}

/// `client_ip` is binary-encoded by hand for `COPY` (PostgreSQL's own `inet` format): both
/// families and `NULL` land as the addresses they were, by the direct `COPY` and by the
/// idempotent replay (staging table), and `audit export` prints them without a prefix length.
#[tokio::test]
async fn client_addresses_land_as_inet_through_copy_and_replay() {
    let url = pg::fresh_database().await;
    let pool = postgres::pool(&url).expect("pool");
    postgres::migrate(&pool).await.expect("migrate");
    let with_ip = |ip: Option<&str>| {
        let mut e = row(enforcer::ledger::now_us());
        if let Entry::Decision(r) = &mut e {
            r.client_ip = ip.map(|ip| ip.parse().expect("ip"));
        }
        e
    };
    let direct = [
        with_ip(Some("127.0.0.2")),
        with_ip(Some("2001:db8::7")),
        with_ip(None),
    ];
    let replayed = [
        with_ip(Some("192.0.2.200")),
        with_ip(Some("::ffff:192.0.2.1")),
    ];
    let mut sink = PgSink::new(pool.clone());
    sink.write(&direct).await.expect("copy");
    sink.write_idempotent(&replayed).await.expect("replay");
    for (e, want) in direct.iter().chain(&replayed).zip([
        Some("127.0.0.2/32"),
        Some("2001:db8::7/128"),
        None,
        Some("192.0.2.200/32"),
        Some("::ffff:192.0.2.1/128"),
    ]) {
        let got: Option<String> = sqlx::query_scalar(
            "SELECT client_ip::text FROM token_transactions WHERE id = $1::uuid",
        )
        .bind(id_of(e))
        .fetch_one(&pool)
        .await
        .expect("row");
        assert_eq!(got.as_deref(), want);
    }
    let csv = cli(&["audit", "export", "--since", "1h", "--database-url", &url]);
    let header: Vec<&str> = csv.lines().next().expect("header").split(',').collect();
    let column = header
        .iter()
        .position(|c| *c == "client_ip")
        .unwrap_or_else(|| panic!("no client_ip column: {header:?}"));
    let mut exported: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(column).expect("field"))
        .collect();
    exported.sort_unstable();
    assert_eq!(
        exported,
        [
            "",
            "127.0.0.2",
            "192.0.2.200",
            "2001:db8::7",
            "::ffff:192.0.2.1"
        ]
    );
}

// 2026-11-30T23:59:59.999999Z, 2026-12-01T00:00:00Z, 2030-05-15T12:00:00Z, 2025-01-10T00:00Z.
const LAST_US_OF_NOVEMBER: i64 = 1_796_083_199_999_999;
const FIRST_US_OF_DECEMBER: i64 = 1_796_083_200_000_000;
const MAY_2030: i64 = 1_905_076_800_000_000;
const JANUARY_2025: i64 = 1_736_467_200_000_000;

#[tokio::test]
async fn months_partitions_the_default_partition_and_retention() {
    let url = pg::fresh_database().await;
    let pool = postgres::pool(&url).expect("pool");
    postgres::migrate(&pool).await.expect("migrate");
    let created = postgres::ensure_partitions(&pool, 2).await.expect("ensure");
    assert_eq!(
        created.len(),
        4,
        "last, this and two next months: {created:?}"
    );
    let mut sink = PgSink::new(pool.clone());
    let rows = [
        row(LAST_US_OF_NOVEMBER),
        row(FIRST_US_OF_DECEMBER),
        row(MAY_2030),
        row(JANUARY_2025),
    ];
    sink.write(&rows).await.expect("copy");
    assert_eq!(
        partition_of(&pool, &id_of(&rows[0])).await,
        "token_transactions_p202611"
    );
    assert_eq!(
        partition_of(&pool, &id_of(&rows[1])).await,
        "token_transactions_p202612",
        "the month boundary is at 00:00 UTC"
    );
    for r in &rows[2..] {
        assert_eq!(
            partition_of(&pool, &id_of(r)).await,
            "token_transactions_default",
            "no partition for that month: the default one takes it"
        );
    }
    let created = postgres::ensure_partitions(&pool, 2).await.expect("ensure");
    assert_eq!(
        created,
        vec![
            "token_transactions_p202501".to_owned(),
            "token_transactions_p203005".to_owned()
        ]
    );
    assert_eq!(
        partition_of(&pool, &id_of(&rows[2])).await,
        "token_transactions_p203005",
        "maintenance moved the row out of the default partition"
    );
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM token_transactions_default")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(in_default, 0);
    // A replay of rows that are there already adds nothing.
    sink.write_idempotent(&rows).await.expect("replay");
    assert_eq!(ids_in_db(&url).await.len(), 4);
    // Kernel rejection rollups, written and replayed: counted once.
    let kernel = Entry::Kernel(enforcer::ledger::KernelRejections {
        id: uuid::Uuid::now_v7(),
        minute_us: FIRST_US_OF_DECEMBER,
        node: "test-node".into(),
        key_id: -42,
        reason: "l7".into(),
        count: 7,
    });
    sink.write(std::slice::from_ref(&kernel))
        .await
        .expect("rollup");
    sink.write_idempotent(std::slice::from_ref(&kernel))
        .await
        .expect("rollup replay");
    let (n, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(count)::int8 FROM kernel_rejections \
         WHERE key_id = -42 AND reason = 'l7' AND minute = '2026-12-01 00:00:00+00'",
    )
    .fetch_one(&pool)
    .await
    .expect("rollups");
    assert_eq!((n, total), (1, 7));
    // Retention of 12 months drops January 2025 (and its row), keeps the rest.
    let dropped = postgres::apply_retention(&pool, 12)
        .await
        .expect("retention");
    assert_eq!(dropped, vec!["token_transactions_p202501".to_owned()]);
    assert_eq!(ids_in_db(&url).await.len(), 3);
}

#[tokio::test]
async fn times_are_utc_whatever_the_server_and_client_time_zones() {
    let url = pg::fresh_database().await;
    let name = url.rsplit('/').next().expect("db name").to_owned();
    let admin = sqlx::PgPool::connect(&pg::admin_url())
        .await
        .expect("admin");
    // Honolulu is UTC−10: 2026-12-01T05:00Z is still 30 November there.
    sqlx::query(&format!(
        "ALTER DATABASE {name} SET timezone = 'Pacific/Honolulu'"
    ))
    .execute(&admin)
    .await
    .expect("set timezone");
    let pool = postgres::pool(&url).expect("pool");
    postgres::migrate(&pool).await.expect("migrate");
    postgres::ensure_partitions(&pool, 2).await.expect("ensure");
    let five_am_utc = FIRST_US_OF_DECEMBER + 5 * 3600 * 1_000_000;
    let r = row(five_am_utc);
    PgSink::new(pool.clone())
        .write(std::slice::from_ref(&r))
        .await
        .expect("copy");
    assert_eq!(
        partition_of(&pool, &id_of(&r)).await,
        "token_transactions_p202612"
    );
    // The CLI, in Tokyo (UTC+9), prints the same instant in UTC. The window reaches back to
    // the row whatever today's date is.
    let days = (enforcer::ledger::now_us() - five_am_utc).max(0) / 86_400_000_000 + 2;
    let since = format!("{days}d");
    let out = Command::new(enforcer_bin())
        .args(["audit", "export", "--since", &since, "--format", "jsonl"])
        .args(["--database-url", &url])
        .env("TZ", "Asia/Tokyo")
        .output()
        .expect("enforcer audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("one row")).expect("json");
    assert_eq!(line["recorded_at"], "2026-12-01T05:00:00.000000Z");
    assert_eq!(line["cost"], 2.5);
    assert_eq!(line["allowed"], true);
}

/// The SHA-256 of a key, as `audit usage --key-hash` takes it.
fn hash_of(key: &str) -> String {
    enforcer::key::ApiKey::parse(key)
        .expect("key")
        .hash()
        .to_hex()
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(enforcer_bin())
        .args(args)
        .output()
        .expect("run enforcer");
    assert!(
        out.status.success(),
        "enforcer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_file_imports_once_and_answers_usage_and_exports() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = TestDaemon::start(config(None, dir.path())).await;
    let addr = daemon.addr;
    let mut ids = Vec::new();
    for i in 0..50 {
        let endpoint = if i % 2 == 0 { "/x" } else { "/y" };
        let r = check(
            addr,
            json!({"key": "k-file-secret", "endpoint": endpoint, "method": "GET"}),
        )
        .await;
        ids.push(r.json()["decision_id"].as_str().expect("id").to_owned());
    }
    daemon.stop().await;
    let file = dir.path().join("ledger.jsonl");
    let content = std::fs::read_to_string(&file).expect("ledger file");
    assert_eq!(content.lines().count(), 50, "every decision in the file");
    assert!(
        !content.contains("k-file-secret"),
        "the raw key never reaches the file"
    );

    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    let file_arg = file.display().to_string();
    cli(&["audit", "import", &file_arg, "--database-url", &url]);
    cli(&["audit", "import", &file_arg, "--database-url", &url]);
    assert_exactly_once(&url, &ids).await;

    let total = cli(&[
        "audit",
        "usage",
        "--key-hash",
        &hash_of("k-file-secret"),
        "--since",
        "1h",
        "--database-url",
        &url,
    ]);
    let numbers: Vec<&str> = total
        .lines()
        .nth(1)
        .expect("a total line")
        .split_whitespace()
        .collect();
    // total, decisions, allowed, tokens: a new key starts at idle_cap × max_tokens = 32 tokens
    // (cost 1 each; the refill of 1/s adds nothing within this quick loop's few milliseconds).
    assert_eq!(numbers[..3], ["total", "50", "32"], "{total}");
    let by_endpoint = cli(&[
        "audit",
        "usage",
        "--key-hash",
        &hash_of("k-file-secret"),
        "--since",
        "1h",
        "--by",
        "endpoint",
        "--database-url",
        &url,
    ]);
    assert!(
        by_endpoint.contains("/x") && by_endpoint.contains("/y"),
        "{by_endpoint}"
    );
    let csv = cli(&["audit", "export", "--since", "1h", "--database-url", &url]);
    assert_eq!(csv.lines().count(), 51, "a header and 50 rows");
    assert!(csv.starts_with("id,recorded_at,key_hash,"));
    assert!(!csv.contains("k-file-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_are_rows_and_usage_nets_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = TestDaemon::start(config(None, dir.path())).await;
    let addr = daemon.addr;
    let key = "k-refund-secret";
    for (i, endpoint) in ["/x", "/x", "/y"].iter().enumerate() {
        let r = check(
            addr,
            json!({"key": key, "endpoint": endpoint, "method": "GET", "units": 4,
                   "request_id": format!("req-{i}")}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let refund = enforcer_tests::http(
        addr,
        "POST",
        "/v1/refund",
        &[("content-type", "application/json")],
        json!({"key": key, "request_id": "req-1"}).to_string(),
    )
    .await;
    assert_eq!(refund.status, 200);
    assert_eq!(refund.json()["credited"], 4.0);
    daemon.stop().await;

    let file = dir.path().join("ledger.jsonl");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .expect("ledger file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(rows.len(), 4, "three decisions and a refund");
    let refunds: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "refund").collect();
    assert_eq!(refunds.len(), 1, "{rows:?}");
    assert_eq!(refunds[0]["request_id"], "req-1");
    assert_eq!(refunds[0]["cost"], 4.0, "the tokens credited back");
    assert_eq!(rows.iter().filter(|r| r["kind"] == "debit").count(), 3);

    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    cli(&[
        "audit",
        "import",
        &file.display().to_string(),
        "--database-url",
        &url,
    ]);
    let key_hash = hash_of(key);
    let usage = |by: Option<&str>| {
        let mut args = vec![
            "audit",
            "usage",
            "--key-hash",
            &key_hash,
            "--since",
            "1h",
            "--database-url",
            &url,
        ];
        if let Some(by) = by {
            args.extend(["--by", by]);
        }
        cli(&args)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    // group, decisions, allowed, refunds, tokens charged, tokens granted, tokens settled: 3 × 4
    // charged, 4 given back, nothing settled.
    assert_eq!(
        usage(None),
        [[
            "total", "3", "3", "1", "8.000", "0.000", "8.000", "0.000", "0.000", "0", "0"
        ]]
    );
    assert_eq!(
        usage(Some("endpoint")),
        [
            [
                "/x", "2", "2", "1", "4.000", "0.000", "4.000", "0.000", "0.000", "0", "0"
            ],
            [
                "/y", "1", "1", "0", "4.000", "0.000", "4.000", "0.000", "0.000", "0", "0"
            ]
        ],
        "the refund counts where the refunded request was"
    );
    let csv = cli(&["audit", "export", "--since", "1h", "--database-url", &url]);
    assert!(
        csv.lines().next().is_some_and(|h| h
            .ends_with(",kind,note,operator,true_cost,settle_by,candidate_allowed,candidate_cost")),
        "{csv}"
    );
    assert_eq!(
        csv.lines().filter(|l| l.ends_with(",refund,,,,,,")).count(),
        1
    );
}

/// Reservations settled above and below their estimates, one refunded, one left alone:
/// `audit usage` shows what the checks charged (the estimates, less the refund) beside what
/// was charged once settled, as computed by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_are_rows_and_usage_shows_estimated_and_settled_cost_side_by_side() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = TestDaemon::start(config(None, dir.path())).await;
    let addr = daemon.addr;
    let key = "k-settle-secret";
    for (i, endpoint) in ["/x", "/x", "/y", "/y"].iter().enumerate() {
        let r = check(
            addr,
            json!({"key": key, "endpoint": endpoint, "method": "GET", "units": 4,
                   "request_id": format!("req-{i}"), "reserve": true}),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["reserved"], true);
    }
    let post = |path: &'static str, body: serde_json::Value| async move {
        let r = enforcer_tests::http(
            addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    // req-0: 4 estimated, 10 true (+6); req-1: 1 unit of 4 used (-3); req-2 refunded (-4);
    // req-3 never settled (keeps its 4).
    let up = post(
        "/v1/settle",
        json!({"key": key, "request_id": "req-0", "cost": 10}),
    )
    .await;
    assert_eq!(up["charged"], 6.0);
    let down = post(
        "/v1/settle",
        json!({"key": key, "request_id": "req-1", "units": 1}),
    )
    .await;
    assert_eq!(down["charged"], -3.0);
    post("/v1/refund", json!({"key": key, "request_id": "req-2"})).await;
    daemon.stop().await;

    let file = dir.path().join("ledger.jsonl");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .expect("ledger file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let settles: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "settle").collect();
    assert_eq!(settles.len(), 2, "{rows:?}");
    assert_eq!(
        (
            &settles[0]["request_id"],
            &settles[0]["cost"],
            &settles[0]["true_cost"]
        ),
        (&json!("req-0"), &json!(6.0), &json!(10.0))
    );
    assert_eq!(
        (
            &settles[1]["request_id"],
            &settles[1]["cost"],
            &settles[1]["true_cost"]
        ),
        (&json!("req-1"), &json!(-3.0), &json!(1.0))
    );

    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    cli(&[
        "audit",
        "import",
        &file.display().to_string(),
        "--database-url",
        &url,
    ]);
    let key_hash = hash_of(key);
    let usage = |by: Option<&str>| {
        let mut args = vec![
            "audit",
            "usage",
            "--key-hash",
            &key_hash,
            "--since",
            "1h",
            "--database-url",
            &url,
        ];
        if let Some(by) = by {
            args.extend(["--by", by]);
        }
        cli(&args)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    // Charged at the checks: 4 × 4 − 4 refunded = 12; settled: 12 + 6 − 3 = 15. Four
    // reservations; none expired (a daemon without a database runs no expiry job, and the
    // import was the only one on this database).
    assert_eq!(
        usage(None),
        [[
            "total", "4", "4", "1", "12.000", "0.000", "15.000", "0.000", "0.000", "4", "0"
        ]]
    );
    // /x: 8 estimated, 10 + 1 true; /y: 8 estimated, 4 refunded, 4 kept unsettled.
    assert_eq!(
        usage(Some("endpoint")),
        [
            [
                "/x", "2", "2", "0", "8.000", "0.000", "11.000", "0.000", "0.000", "2", "0"
            ],
            [
                "/y", "2", "2", "1", "4.000", "0.000", "4.000", "0.000", "0.000", "2", "0"
            ]
        ],
        "a settle counts where the settled request was"
    );
    let csv = cli(&["audit", "export", "--since", "1h", "--database-url", &url]);
    assert_eq!(
        csv.lines()
            .filter(|l| l.ends_with(",settle,,,10,,,"))
            .count(),
        1,
        "{csv}"
    );
    assert_eq!(
        csv.lines()
            .filter(|l| l.ends_with(",settle,,,1,,,"))
            .count(),
        1,
        "{csv}"
    );
}

// ---------------------------------------------------------------------------------------------
// Rows PostgreSQL refuses (quarantine), and crash loss.

/// A decision row for the writer tests; `endpoint` may be poison.
fn decision(endpoint: &str) -> AuditRow {
    AuditRow {
        endpoint: endpoint.into(),
        remaining: Some(5.0),
        request_id: Some(uuid::Uuid::new_v4().to_string()),
        node: "test-node".into(),
        ..AuditRow::sample(enforcer::ledger::now_us(), "cd".repeat(32))
    }
}

/// `entries` as lines of the ledger / spill file format.
fn spill_lines(entries: &[Entry]) -> String {
    entries
        .iter()
        .map(|e| serde_json::to_string(e).expect("json") + "\n")
        .collect()
}

/// The JSON lines of a file (empty when there is no file).
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits until every id of `ids` is in the table (or fails after `limit`).
async fn wait_ids(url: &str, ids: &[String], limit: Duration) {
    let start = Instant::now();
    loop {
        let have: BTreeSet<String> = ids_in_db(url).await.into_iter().collect();
        let missing = ids.iter().filter(|id| !have.contains(*id)).count();
        if missing == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{missing} of {} rows still not in PostgreSQL after {limit:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_postgres_refuses_are_quarantined_and_every_other_row_lands() {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let spill = dir.path().join("spill.jsonl");
    let quarantine = dir.path().join("spill.quarantine.jsonl");
    // A spill file left by an earlier run: good rows around a decision whose endpoint holds a
    // NUL byte (PostgreSQL: 22021, not valid UTF-8 text for it) and a kernel rollup with a
    // count of 0 (23514, the table's CHECK), in the spill format.
    let mut spilled: Vec<Entry> = (0..20).map(|_| Entry::Decision(decision("/a"))).collect();
    let poison_spilled = decision("/a\u{0}b");
    spilled.push(Entry::Decision(poison_spilled.clone()));
    let poison_rollup = enforcer::ledger::KernelRejections {
        id: uuid::Uuid::now_v7(),
        minute_us: enforcer::ledger::now_us() / 60_000_000 * 60_000_000,
        node: "test-node".into(),
        key_id: 7,
        reason: "l7".into(),
        count: 0,
    };
    spilled.push(Entry::Kernel(poison_rollup.clone()));
    spilled.extend((0..20).map(|_| Entry::Decision(decision("/a"))));
    std::fs::write(&spill, spill_lines(&spilled)).expect("spill file");

    let config = enforcer::config::LedgerConfig {
        database_url: url.clone(),
        migrate: true,
        file: spill.display().to_string(),
        flush_ms: 20,
        write_timeout_ms: 2000,
        retry_ms: 200,
        node: "test-node".into(),
        ..Default::default()
    };
    let metrics = enforcer::metrics::Metrics::new();
    let (ledger, writer) = enforcer::ledger::start(&config, metrics.ledger.clone())
        .await
        .expect("ledger");
    // Rows handed to the writer directly (the API refuses such an endpoint with 400; the
    // writer must survive it anyway): good ones, a poison one, and the next 50.
    let mut direct: Vec<AuditRow> = (0..10).map(|_| decision("/b")).collect();
    let poison_direct = decision("/b\u{0}");
    direct.push(poison_direct.clone());
    direct.extend((0..50).map(|_| decision("/c")));
    for r in &direct {
        ledger.record(Entry::Decision(r.clone()));
        // Spread over a few batches.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let poison_ids = [poison_spilled.id.to_string(), poison_direct.id.to_string()];
    let good: Vec<String> = spilled
        .iter()
        .filter_map(|e| match e {
            Entry::Decision(r) => Some(r.id.to_string()),
            Entry::Kernel(_) => None,
        })
        .chain(direct.iter().map(|r| r.id.to_string()))
        .filter(|id| !poison_ids.contains(id))
        .collect();
    assert_eq!(good.len(), 40 + 60);
    wait_ids(&url, &good, Duration::from_secs(30)).await;
    let start = Instant::now();
    while parse_metric(&metrics.render(), "enforcer_ledger_quarantined_total") < 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "quarantined: {}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.shutdown();
    assert_exactly_once(&url, &good).await;
    assert_eq!(
        parse_metric(&metrics.render(), "enforcer_ledger_quarantined_total"),
        3.0
    );
    assert_eq!(
        parse_metric(&metrics.render(), "enforcer_ledger_dropped_total"),
        0.0
    );

    // The quarantine file, next to the spill file: the three rows in the same format, each
    // with PostgreSQL's error.
    let lines = json_lines(&quarantine);
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![
        poison_spilled.id.to_string(),
        poison_direct.id.to_string(),
        poison_rollup.id.to_string(),
    ];
    expected.sort();
    assert_eq!(ids, expected, "{lines:?}");
    for l in &lines {
        let error = l["error"].as_str().expect("error text");
        assert!(!error.is_empty());
        let row: Entry = serde_json::from_value(l.clone()).expect("the ledger's row format");
        match row {
            Entry::Decision(r) => {
                assert!(r.endpoint.contains('\0'), "the row as it was: {r:?}");
                assert_eq!(l["sqlstate"], "22021", "{l}");
            }
            Entry::Kernel(k) => {
                assert_eq!(k, poison_rollup);
                assert_eq!(l["sqlstate"], "23514", "{l}");
            }
        }
    }
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let rollups: i64 = sqlx::query_scalar("SELECT count(*) FROM kernel_rejections")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rollups, 0);
    assert_eq!(
        std::fs::metadata(&spill).expect("spill").len(),
        0,
        "the spill file is replayed and truncated"
    );
}

#[tokio::test]
async fn audit_import_quarantines_a_refused_line_and_imports_the_rest() {
    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("ledger.jsonl");
    let mut entries: Vec<Entry> = (0..30).map(|_| Entry::Decision(decision("/x"))).collect();
    let poison = decision("/x\u{0}");
    entries.push(Entry::Decision(poison.clone()));
    entries.extend((0..30).map(|_| Entry::Decision(decision("/y"))));
    std::fs::write(&file, spill_lines(&entries)).expect("file");
    let good: Vec<String> = entries
        .iter()
        .map(id_of)
        .filter(|id| *id != poison.id.to_string())
        .collect();

    let import = || {
        Command::new(enforcer_bin())
            .args(["audit", "import"])
            .arg(&file)
            .args(["--database-url", &url])
            .output()
            .expect("enforcer audit import")
    };
    let out = import();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a refused row is reported by the exit status: {stdout} {stderr}"
    );
    let quarantine = dir.path().join("ledger.quarantine.jsonl");
    assert!(
        stdout.contains("61 rows read: 60 inserted, 0 already present, 1 refused")
            && stderr.contains("1 row")
            && stderr.contains(&quarantine.display().to_string()),
        "{stdout} {stderr}"
    );
    assert_exactly_once(&url, &good).await;
    let lines = json_lines(&quarantine);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["id"], poison.id.to_string());
    assert_eq!(lines[0]["sqlstate"], "22021");
    assert!(lines[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    // Importing again adds nothing, and quarantines the row again (ids tell the copies apart
    // from other rows; see docs/ledger.md).
    let again = String::from_utf8_lossy(&import().stdout).into_owned();
    assert!(
        again.contains("61 rows read: 0 inserted, 60 already present, 1 refused"),
        "{again}"
    );
    assert_exactly_once(&url, &good).await;
}

/// `enforcer audit import` reports what PostgreSQL did, not what it read: rows inserted and
/// rows already there (its `INSERT … ON CONFLICT DO NOTHING` counts), kernel rollups included.
#[tokio::test]
async fn audit_import_reports_rows_inserted_and_rows_already_present() {
    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("ledger.jsonl");
    let file_arg = file.display().to_string();
    let mut entries: Vec<Entry> = (0..9).map(|_| Entry::Decision(decision("/x"))).collect();
    entries.push(Entry::Kernel(enforcer::ledger::KernelRejections {
        id: uuid::Uuid::now_v7(),
        minute_us: enforcer::ledger::now_us() / 60_000_000 * 60_000_000,
        node: "test-node".into(),
        key_id: -7,
        reason: "l7".into(),
        count: 3,
    }));
    std::fs::write(&file, spill_lines(&entries)).expect("file");
    let import = || cli(&["audit", "import", &file_arg, "--database-url", &url]);

    let out = import();
    assert!(
        out.contains("10 rows read: 10 inserted, 0 already present"),
        "{out}"
    );
    let out = import();
    assert!(
        out.contains("10 rows read: 0 inserted, 10 already present"),
        "importing twice adds nothing, and says so: {out}"
    );
    // The file grows (a spill file written on): only the new rows are inserted.
    let more: Vec<Entry> = (0..2).map(|_| Entry::Decision(decision("/y"))).collect();
    entries.extend(more);
    std::fs::write(&file, spill_lines(&entries)).expect("file");
    let out = import();
    assert!(
        out.contains("12 rows read: 2 inserted, 10 already present"),
        "{out}"
    );
    let decisions: Vec<String> = entries
        .iter()
        .filter(|e| matches!(e, Entry::Decision(_)))
        .map(id_of)
        .collect();
    assert_exactly_once(&url, &decisions).await;
}

/// `POST /v1/check` on a fresh connection that tolerates a daemon that is gone: the status and
/// the decision id, or `None` when there was no complete answer.
async fn try_check(addr: SocketAddr, key: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = json!({"key": key, "endpoint": "/x", "method": "GET"}).to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "POST /v1/check HTTP/1.1\r\nhost: enforcer\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text.split(' ').nth(1)?.parse().ok()?;
    let (_, json) = text.split_once("\r\n\r\n")?;
    let id = serde_json::from_str::<serde_json::Value>(json).ok()?["decision_id"]
        .as_str()?
        .to_owned();
    Some((status, id))
}

/// The ids of the decision rows of a ledger / spill file.
fn ids_in_file(path: &Path) -> BTreeSet<String> {
    json_lines(path)
        .iter()
        .filter(|l| l["t"] == "decision")
        .filter_map(|l| l["id"].as_str().map(str::to_owned))
        .collect()
}

/// What a daemon killed under load left behind.
struct Killed {
    /// Decision ids answered (200 or 429), with when the answer arrived.
    answered: Vec<(String, Instant)>,
    /// When the daemon was killed.
    killed_at: Instant,
    /// Answered ids in neither PostgreSQL nor the spill file after the kill.
    lost: BTreeSet<String>,
}

/// A daemon (with `journal` on or off) under load from 8 clients: 1 s of normal traffic, then
/// 2 s more with PostgreSQL stalled (a lock on the table holds every `COPY`, as a slow or hung
/// database would), then SIGKILL. Counts the answered decisions that survived in PostgreSQL
/// or the spill file, then restarts the daemon on the same file and checks that it replays
/// every surviving row exactly once.
async fn kill_under_load(journal: bool) -> Killed {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("spill.jsonl");
    let config = dir.path().join("enforcer.toml");
    std::fs::write(&config, format!("[ledger]\njournal = {journal}\n")).expect("config");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let spawn = || {
        Process(
            Command::new(enforcer_bin())
                .args(["run", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--config")
                .arg(&config)
                .args(["--database-url", &url, "--migrate"])
                .arg("--ledger-file")
                .arg(&file)
                .env_remove("ENFORCER_REDIS_URL")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn enforcer"),
        )
    };
    let daemon = spawn();
    wait_up(addr).await;
    // Clients that keep asking until the daemon is gone; every answer's decision id counts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stop, answered) = (stop.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                if let Some((status, id)) = try_check(addr, &format!("kill-{c}-{}", i % 4)).await {
                    assert!(status == 200 || status == 429, "status {status}");
                    answered.lock().expect("lock").push((id, Instant::now()));
                }
            }
        }));
    }
    let count = || answered.lock().expect("lock").len();
    let start = Instant::now();
    while count() < 200 || start.elapsed() < Duration::from_secs(1) {
        assert!(start.elapsed() < Duration::from_secs(60), "too few answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut stall = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE token_transactions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .expect("lock");
    let stalled = count();
    let start = Instant::now();
    while count() < stalled + 200 || start.elapsed() < Duration::from_secs(2) {
        assert!(start.elapsed() < Duration::from_secs(60), "too few answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL: no shutdown, no flush.
    let killed_at = Instant::now();
    drop(daemon);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    stall.rollback().await.expect("unlock");
    pool.close().await;
    let answered: Vec<(String, Instant)> = answered.lock().expect("lock").clone();
    // What survived the kill: rows in PostgreSQL plus rows in the spill file.
    let mut kept: BTreeSet<String> = ids_in_db(&url).await.into_iter().collect();
    let in_db = kept.len();
    let in_file = ids_in_file(&file);
    kept.extend(in_file.iter().cloned());
    let lost: BTreeSet<String> = answered
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !kept.contains(*id))
        .cloned()
        .collect();
    println!(
        "journal {journal}: answered {}, in PostgreSQL {in_db}, in the spill file {}, lost {}",
        answered.len(),
        in_file.len(),
        lost.len()
    );

    // Restarted on the same file, the daemon replays what was not in PostgreSQL yet.
    let daemon = spawn();
    wait_up(addr).await;
    let survived: Vec<String> = answered
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| !lost.contains(id))
        .collect();
    wait_ids(&url, &survived, Duration::from_secs(30)).await;
    drop(daemon);
    let rows = ids_in_db(&url).await;
    let distinct: BTreeSet<&String> = rows.iter().collect();
    assert_eq!(distinct.len(), rows.len(), "a row was written twice");
    // Timeouts while PostgreSQL was stalled are not the rows' fault.
    assert!(
        !dir.path().join("spill.quarantine.jsonl").exists(),
        "nothing is quarantined for a stalled server"
    );
    Killed {
        answered,
        killed_at,
        lost,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_under_load_loses_no_answered_decision() {
    let killed = kill_under_load(true).await;
    assert!(
        killed.lost.is_empty(),
        "{} of {} answered decisions lost by kill -9",
        killed.lost.len(),
        killed.answered.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_journal_a_kill_loses_at_most_the_last_flush_interval() {
    let killed = kill_under_load(false).await;
    // The rows of the last flush interval (100 ms) may be lost, not those of the 2 s that
    // PostgreSQL was stalled: every lost row was answered in the last second (10 intervals,
    // room for a busy machine) before the kill.
    let window = Duration::from_secs(1);
    let late: BTreeSet<&String> = killed
        .answered
        .iter()
        .filter(|(_, at)| killed.killed_at.saturating_duration_since(*at) <= window)
        .map(|(id, _)| id)
        .collect();
    let early = killed.lost.iter().filter(|id| !late.contains(id)).count();
    assert_eq!(
        early,
        0,
        "{} lost, {early} of them answered more than {window:?} before the kill ({} answered in that last second)",
        killed.lost.len(),
        late.len()
    );
}

/// Fail-soft: a local decision's row counts in `audit usage` (where it was made), its
/// debit-back row (the same tokens charged to the shared bucket afterwards) does not again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_decisions_count_in_usage_and_their_debit_backs_do_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = enforcer_tests::unique("k-local");
    let hash = enforcer::key::ApiKey::parse(&key)
        .expect("key")
        .hash()
        .to_hex();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    let row = |decided_by: &str, endpoint: &str, units: f64, request_id: &str| {
        json!({"t": "decision", "id": uuid::Uuid::now_v7(), "at_us": now_us, "key_hash": hash,
               "tier": "free", "endpoint": endpoint, "method": "GET", "units": units,
               "cost": 100.0, "multiplier": 1.0, "allowed": true, "remaining": 0.0,
               "decided_by": decided_by, "denial": null, "request_id": request_id,
               "node": "gw-1", "kind": "debit", "client_ip": null})
        .to_string()
    };
    let file = dir.path().join("ledger.jsonl");
    std::fs::write(
        &file,
        [
            row("local", "/x", 100.0, "r-1"),
            row("debit-back", "", 0.0, "lb-0000-1-m"),
        ]
        .join("\n")
            + "\n",
    )
    .expect("write ledger file");
    let url = pg::fresh_database().await;
    cli(&["migrate", "--database-url", &url]);
    cli(&[
        "audit",
        "import",
        &file.display().to_string(),
        "--database-url",
        &url,
    ]);
    let total = cli(&[
        "audit",
        "usage",
        "--key-hash",
        &hash_of(&key),
        "--since",
        "1h",
        "--database-url",
        &url,
    ]);
    let numbers: Vec<&str> = total
        .lines()
        .nth(1)
        .expect("a total line")
        .split_whitespace()
        .collect();
    // total, decisions, allowed, refunds, tokens charged, granted, settled: both rows are
    // decisions; the tokens once (without the debit-back's exclusion it would say 200).
    assert_eq!(
        numbers,
        [
            "total", "2", "2", "0", "100.000", "0.000", "100.000", "0.000", "0.000", "0", "0"
        ],
        "{total}"
    );
}
