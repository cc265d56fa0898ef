//! The audit ledger against the real PostgreSQL that `cargo xtask test` starts: every decision
//! recorded exactly once, through a PostgreSQL outage and a daemon killed with rows in its spill
//! file; monthly partitions, the default partition and its maintenance, retention; UTC whatever
//! the time zones; the embedded file, `enforcer audit import|usage|export`.
use enforcer::config::Config;
use enforcer::ledger::postgres::{self, PgSink};
use enforcer::ledger::{AuditRow, Entry};
use enforcer_tests::{Process, TestDaemon, check, enforcer_bin, free_port, metric, pg};
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
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = TestDaemon::start(config(Some(&url), dir.path())).await;
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
    assert_eq!(metric(addr, "enforcer_ledger_backlog_bytes").await, 0.0);
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
        id: uuid::Uuid::now_v7(),
        at_us,
        key_hash: "ab".repeat(32),
        tier: Some("free".into()),
        endpoint: "/x".into(),
        method: "GET".into(),
        units: 1.0,
        cost: 2.5,
        multiplier: 1.0,
        allowed: true,
        remaining: Some(10.0),
        decided_by: "memory".into(),
        denial: None,
        request_id: Some("r-1".into()),
        node: "test-node".into(),
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
    // The CLI, in Tokyo (UTC+9), prints the same instant in UTC.
    let out = Command::new(enforcer_bin())
        .args(["audit", "export", "--since", "1d", "--format", "jsonl"])
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
        "--key",
        "k-file-secret",
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
        "--key",
        "k-file-secret",
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
