//! Rotation of the embedded ledger file, end to end: the real `enforcer` binary with a tiny
//! `file_max_bytes` serves decisions over HTTP and rotates its file into gzip files, keeping
//! `file_keep` of them; `enforcer audit import` loads the kept ones into the real PostgreSQL
//! that `cargo xtask test` starts, exactly once. With a database the spill file is never
//! rotated, however large it grows while PostgreSQL is stalled.
use enforcer_tests::{Process, check, enforcer_bin, free_port, metric, pg};
use serde_json::json;
use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `enforcer run` on `port` with the config file `config`, logging to `log`.
fn spawn(port: u16, config: &Path, log: &Path, extra: &[&str]) -> Process {
    let log = std::fs::File::create(log).expect("log file");
    Process(
        Command::new(enforcer_bin())
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(config)
            .args(extra)
            .env_remove("ENFORCER_REDIS_URL")
            .env_remove("ENFORCER_DATABASE_URL")
            .env_remove("ENFORCER_LEDGER_FILE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn enforcer"),
    )
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

/// SIGTERM, then waits for the daemon to exit (it finishes compressing what it rotated).
fn stop(mut daemon: Process) {
    let status = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let start = Instant::now();
    while daemon.0.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One decision of `key`; its decision id.
async fn decide(addr: SocketAddr, key: &str) -> String {
    let r = check(addr, json!({"key": key, "endpoint": "/x", "method": "GET"})).await;
    assert!(r.status == 200 || r.status == 429, "status {}", r.status);
    r.json()["decision_id"]
        .as_str()
        .expect("decision_id in every answer")
        .to_owned()
}

/// The decision ids in a ledger file, plain or gzip (told by its first bytes), in file order.
fn ids_in(path: &Path) -> Vec<String> {
    let raw = std::fs::read(path).expect("read");
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .expect("a whole gzip file");
        text
    } else {
        String::from_utf8(raw).expect("utf-8")
    };
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a whole row");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect()
}

/// The files in `dir`, by name.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn cli(args: &[String]) -> String {
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

async fn count_rows(url: &str) -> (i64, i64) {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let counts = sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM token_transactions")
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_file_rotates_keeps_file_keep_gz_files_and_they_import_exactly_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let live = dir.path().join("ledger.jsonl");
    let config = dir.path().join("enforcer.toml");
    // ~390 bytes a row: a rotation every ~10 rows, or every flush_ms when rows come slower.
    std::fs::write(
        &config,
        format!(
            "[ledger]\nfile = \"{}\"\nflush_ms = 20\nfile_max_bytes = 4096\nfile_keep = 3\n",
            live.display()
        ),
    )
    .expect("config");
    let logs = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let daemon = spawn(port, &config, &logs.path().join("daemon.log"), &[]);
    wait_up(addr).await;
    // One client, one request at a time: the file order is the answer order.
    let mut answered = Vec::new();
    for i in 0..600 {
        answered.push(decide(addr, &format!("rot-{}", i % 5)).await);
        if i % 100 == 99 {
            // Let a few flush intervals pass, so that rotations happen between bursts too.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let rotations = metric(addr, "enforcer_ledger_file_rotations_total").await;
    assert!(rotations >= 10.0, "{rotations} rotations");
    let live_bytes = metric(addr, "enforcer_ledger_file_bytes").await;
    assert!(
        live_bytes < 600.0 * 390.0,
        "{live_bytes} bytes in the live file"
    );
    assert_eq!(metric(addr, "enforcer_ledger_dropped_total").await, 0.0);
    stop(daemon);

    // At most file_keep rotated files, all compressed, and the live file: nothing else.
    let files = names(dir.path());
    let gz: Vec<PathBuf> = files
        .iter()
        .filter(|n| n.starts_with("ledger.2") && n.ends_with(".jsonl.gz"))
        .map(|n| dir.path().join(n))
        .collect();
    assert_eq!(gz.len(), 3, "{files:?}");
    assert_eq!(
        files.len(),
        gz.len() + 2,
        "the live file, the config and the .gz files only: {files:?}"
    );
    // They hold every row of the last decisions, once each, in order (names sort by time).
    let mut kept = Vec::new();
    for f in &gz {
        kept.extend(ids_in(f));
    }
    kept.extend(ids_in(&live));
    assert!(
        !kept.is_empty() && kept.len() < answered.len(),
        "{} rows kept",
        kept.len()
    );
    assert_eq!(
        kept,
        answered[answered.len() - kept.len()..],
        "the newest rows, each exactly once"
    );

    // `audit import` of all of them, rotated and live, into PostgreSQL: exactly those rows.
    let url = pg::fresh_database().await;
    cli(&["migrate".into(), "--database-url".into(), url.clone()]);
    let mut args: Vec<String> = vec!["audit".into(), "import".into()];
    args.extend(gz.iter().map(|p| p.display().to_string()));
    args.push(live.display().to_string());
    args.extend(["--database-url".into(), url.clone()]);
    let first = cli(&args);
    assert_eq!(first.lines().count(), gz.len() + 1, "{first}");
    let expected = i64::try_from(kept.len()).expect("count");
    assert_eq!(count_rows(&url).await, (expected, expected), "{first}");
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let in_db: BTreeSet<String> =
        sqlx::query_scalar::<_, String>("SELECT id::text FROM token_transactions")
            .fetch_all(&pool)
            .await
            .expect("ids")
            .into_iter()
            .collect();
    pool.close().await;
    assert_eq!(in_db, kept.iter().cloned().collect::<BTreeSet<_>>());
    // Importing again adds nothing.
    let again = cli(&args);
    assert!(
        again.lines().all(|l| l.contains(": 0 inserted,")),
        "{again}"
    );
    assert_eq!(count_rows(&url).await, (expected, expected));
    // No quarantine file: nothing was refused.
    assert_eq!(names(dir.path()).len(), files.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_database_the_spill_file_is_never_rotated_and_loses_nothing() {
    let url = pg::fresh_database().await;
    let dir = tempfile::tempdir().expect("tmp");
    let live = dir.path().join("spill.jsonl");
    let config = dir.path().join("enforcer.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\nfile = \"{}\"\nflush_ms = 20\nwrite_timeout_ms = 300\nretry_ms = 200\n\
             file_max_bytes = 4096\nfile_max_age_secs = 1\nfile_keep = 1\n",
            live.display()
        ),
    )
    .expect("config");
    let log = dir.path().join("daemon.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let daemon = spawn(port, &config, &log, &["--database-url", &url, "--migrate"]);
    wait_up(addr).await;
    let mut answered = Vec::new();
    // A few rows first (fewer than file_max_bytes holds): they reach PostgreSQL at once.
    for i in 0..5 {
        answered.push(decide(addr, &format!("db-{}", i % 5)).await);
    }
    // PostgreSQL stalled (a lock holds every COPY): the rows pile up in the spill file, far
    // past file_max_bytes and for longer than file_max_age_secs.
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut stall = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE token_transactions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .expect("lock");
    for i in 0..200 {
        answered.push(decide(addr, &format!("db-{}", i % 5)).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spilled = metric(addr, "enforcer_ledger_file_bytes").await;
    assert!(spilled > 4096.0 * 10.0, "{spilled} bytes in the spill file");
    assert_eq!(
        metric(addr, "enforcer_ledger_file_rotations_total").await,
        0.0
    );
    stall.rollback().await.expect("unlock");
    // Every row lands, and the file is truncated behind them instead.
    let start = Instant::now();
    loop {
        let (rows, _) = count_rows(&url).await;
        if rows >= i64::try_from(answered.len()).expect("count") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{rows} rows");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(daemon);
    pool.close().await;
    let n = i64::try_from(answered.len()).expect("count");
    assert_eq!(count_rows(&url).await, (n, n));
    let files = names(dir.path());
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("spill.2") && !f.ends_with(".gz")),
        "nothing rotated: {files:?}"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        text.matches("passed ledger.file_max_bytes").count(),
        1,
        "one warning for the one time it grew past: {text}"
    );
}
