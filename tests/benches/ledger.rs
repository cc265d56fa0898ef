//! `cargo xtask bench ledger`: sustained audit rows per second through the ledger writer into
//! PostgreSQL (`Ledger::record` → local file and queue → writer → binary COPY batches), with the
//! journal on and off, beside `psql \copy` of the same
//! rows in the same binary format (the ceiling) and single-row INSERTs, on one server (started
//! by xtask with fsync on). Each measurement gets a fresh database. Without a database: what
//! `Ledger::record` costs with the embedded file's rotation off and on (a tiny `file_max_bytes`),
//! and how much gzip shrinks the file (`cargo bench --bench ledger -- rotation` runs only that,
//! without PostgreSQL).
use enforcer::config::LedgerConfig;
use enforcer::ledger::postgres::{self, encode_rows};
use enforcer::ledger::{AuditRow, Entry, now_us};
use enforcer::metrics::Metrics;
use std::time::{Duration, Instant};

const ROWS: usize = 1_000_000;
const INSERT_ROWS: usize = 20_000;
const RECORD_ROWS: usize = 200_000;

fn rows(n: usize) -> Vec<Entry> {
    let start = now_us();
    (0..n)
        .map(|i| {
            Entry::Decision(AuditRow {
                tier: Some("pro".into()),
                endpoint: if i % 3 == 0 {
                    "/generate-report"
                } else {
                    "/items"
                }
                .into(),
                cost: 1.5,
                allowed: i % 10 != 0,
                remaining: Some(812.25),
                decided_by: "redis".into(),
                denial: (i % 10 == 0).then(|| "exhausted".to_owned()),
                request_id: Some(format!("req-{i}")),
                node: "bench-node".into(),
                ..AuditRow::sample(
                    start + i as i64,
                    format!("{:064x}", (i % 10_000) as u128 * 0x9e37_79b9_7f4a_7c15),
                )
            })
        })
        .collect()
}

async fn fresh(admin: &sqlx::PgPool, base: &str, name: &str) -> String {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(admin)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin)
        .await
        .expect("create");
    let url = format!("{}/{name}", base.rsplit_once('/').expect("url").0);
    let pool = postgres::pool(&url).expect("pool");
    postgres::migrate(&pool).await.expect("migrate");
    postgres::ensure_partitions(&pool, 2)
        .await
        .expect("partitions");
    pool.close().await;
    url
}

async fn count(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let n = sqlx::query_scalar("SELECT count(*) FROM token_transactions")
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

/// Rows per second through `Ledger::record`, the writer and binary COPY into a fresh database.
async fn writer(
    admin: &sqlx::PgPool,
    base: &str,
    data: &[Entry],
    journal: bool,
    dir: &std::path::Path,
) -> f64 {
    let url = fresh(admin, base, "bench_writer").await;
    let config = LedgerConfig {
        database_url: url.clone(),
        file: dir
            .join(format!("spill-{journal}.jsonl"))
            .display()
            .to_string(),
        journal,
        ..LedgerConfig::default()
    };
    let metrics = Metrics::new().ledger;
    let (ledger, writer) = enforcer::ledger::start(&config, metrics.clone())
        .await
        .expect("writer");
    let cap = (config.queue_capacity as i64) * 3 / 4;
    let started = Instant::now();
    for e in data.iter().cloned() {
        while metrics.queue_depth.get() > cap {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        ledger.record(e);
    }
    let queued = started.elapsed();
    // Straight from memory, or (rows the queue had no room for) replayed from the file.
    while metrics.written.get() + metrics.replayed.get() < ROWS as u64 {
        assert_eq!(metrics.dropped.get(), 0, "rows dropped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    writer.shutdown();
    assert_eq!(count(&url).await, ROWS as i64);
    let rate = ROWS as f64 / took.as_secs_f64();
    println!(
        "writer, journal {}: {:>9.0} rows/s ({:.2} s; recorded in {:.2} s; spilled {}, replayed {}, dropped {})",
        if journal { "on " } else { "off" },
        rate,
        took.as_secs_f64(),
        queued.as_secs_f64(),
        metrics.spilled.get(),
        metrics.replayed.get(),
        metrics.dropped.get()
    );
    rate
}

/// Seconds of CPU (user + system) this process has used, all threads (`/proc/self/stat`, in
/// USER_HZ ticks: 100 per second on Linux).
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let rest = stat.rsplit_once(')').expect("stat line").1;
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("ticks"))
        .collect();
    fields.iter().sum::<f64>() / 100.0
}

/// What `Ledger::record` costs the decision path, and what the ledger costs in CPU in all, per
/// row, without a database (the local file only): with the journal (a `write` per row in
/// `record`) and without (a queue push; the appender writes groups once per flush interval).
async fn record_cost(data: &[Entry], journal: bool, dir: &std::path::Path) -> (f64, f64) {
    let config = LedgerConfig {
        file: dir
            .join(format!("record-{journal}.jsonl"))
            .display()
            .to_string(),
        journal,
        queue_capacity: data.len(),
        ..LedgerConfig::default()
    };
    record_with(data, &config, false).await.0
}

/// `record_cost` for `config`; also the rotations it made and, with `tail`, the slowest calls
/// (each timed: a little more work per row).
async fn record_with(
    data: &[Entry],
    config: &LedgerConfig,
    tail: bool,
) -> ((f64, f64), u64, Option<Tail>) {
    let metrics = Metrics::new().ledger;
    let (ledger, writer) = enforcer::ledger::start(config, metrics.clone())
        .await
        .expect("writer");
    let rows: Vec<Entry> = data.to_vec();
    let cpu = process_cpu();
    let mut calls = Vec::with_capacity(if tail { rows.len() } else { 0 });
    let started = Instant::now();
    for e in rows {
        if tail {
            let t = Instant::now();
            ledger.record(e);
            calls.push(t.elapsed());
        } else {
            ledger.record(e);
        }
    }
    let caller = started.elapsed().as_secs_f64();
    writer.shutdown();
    let cpu = process_cpu() - cpu;
    assert_eq!(metrics.written.get(), data.len() as u64);
    assert_eq!(metrics.dropped.get(), 0);
    let n = data.len() as f64;
    let tail = tail.then(|| {
        calls.sort();
        let at = |q: f64| calls[((calls.len() as f64 * q) as usize).min(calls.len() - 1)];
        Tail {
            p999: at(0.999),
            max: calls[calls.len() - 1],
            over_1ms: calls.iter().filter(|d| d.as_millis() >= 1).count(),
        }
    });
    (
        (caller / n * 1e6, cpu / n * 1e6),
        metrics.file_rotations.get(),
        tail,
    )
}

/// The slowest `record()` calls of a run.
struct Tail {
    p999: Duration,
    max: Duration,
    over_1ms: usize,
}

/// The embedded ledger's decision path with rotation off and on (1 MiB files, checked every
/// 10 ms, so that it rotates dozens of times during the run; compression on its own thread
/// counts in the CPU, as the writer's shutdown waits for it), alternately three times; then
/// the gzip ratio of 100 000 rows.
async fn rotation(data: &[Entry]) {
    for _ in 0..3 {
        for max in [0, 1 << 20] {
            let dir = tempfile::tempdir().expect("tmp");
            let config = LedgerConfig {
                file: dir.path().join("ledger.jsonl").display().to_string(),
                queue_capacity: data.len(),
                flush_ms: 10,
                file_max_bytes: max,
                file_keep: 10_000,
                ..LedgerConfig::default()
            };
            let ((caller, cpu), rotations, tail) = record_with(data, &config, true).await;
            let tail = tail.expect("timed");
            println!(
                "record(), no database, journal on, rotation {}: {caller:>6.2} us per row in the caller, {cpu:>6.2} us of CPU per row in all ({} rows/s in the caller; {rotations} rotations; p99.9 {:.1} us, max {:.2} ms, {} calls >= 1 ms)",
                if max == 0 { "off      " } else { "at 1 MiB " },
                (1e6 / caller).round(),
                tail.p999.as_secs_f64() * 1e6,
                tail.max.as_secs_f64() * 1e3,
                tail.over_1ms,
            );
        }
    }
    // What the append lock is held for: `LedgerFile::rotate` (a rename and an open), timed
    // alone on a file of 1 MiB each time.
    let dir = tempfile::tempdir().expect("tmp");
    let live = dir.path().join("ledger.jsonl");
    let file = enforcer::ledger::file::LedgerFile::open(live.clone(), true).expect("open");
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut batch = Vec::new();
        while batch.len() * 400 < (1 << 20) {
            batch.push(data[batch.len()].clone());
        }
        file.append(batch, |_| ()).expect("append");
        let to = enforcer::ledger::rotate::rotated_path(&live, chrono::Utc::now()).expect("name");
        let t = Instant::now();
        file.rotate(&to).expect("rotate").expect("not empty");
        held.push(t.elapsed());
        std::fs::remove_file(&to).expect("remove");
    }
    held.sort();
    println!(
        "LedgerFile::rotate (rename + open under the append lock), 100 times: median {:.1} us, max {:.1} us",
        held[50].as_secs_f64() * 1e6,
        held[99].as_secs_f64() * 1e6
    );
    let path = dir.path().join("ledger.20261203T081500Z.jsonl");
    let mut text = Vec::new();
    for e in &data[..100_000] {
        serde_json::to_writer(&mut text, e).expect("json");
        text.push(b'\n');
    }
    std::fs::write(&path, &text).expect("write");
    let started = Instant::now();
    let (gz, size) = enforcer::ledger::rotate::compress(&path).expect("compress");
    let took = started.elapsed().as_secs_f64();
    assert!(gz.exists() && !path.exists());
    println!(
        "gzip level {} of 100000 rows: {} bytes -> {size} bytes ({:.1}x, {:.0} MB/s of input, {:.2} s)",
        enforcer::ledger::rotate::COMPRESSION_LEVEL,
        text.len(),
        text.len() as f64 / size as f64,
        text.len() as f64 / took / 1e6,
        took
    );
}

fn main() {
    if std::env::args().any(|a| a == "rotation") {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(rotation(&rows(RECORD_ROWS)));
        return;
    }
    let base = std::env::var("ENFORCER_TEST_DATABASE_URL")
        .expect("run through `cargo xtask bench ledger`, which starts PostgreSQL");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&base).await.expect("admin");
        let data = rows(ROWS);
        println!("ledger, {ROWS} rows (24 columns, ~200 bytes of data each), fsync on");

        // 0. What the journal costs per row, without a database, alternately three times.
        let dir = tempfile::tempdir().expect("tmp");
        let sample = &data[..RECORD_ROWS];
        for _ in 0..3 {
            for journal in [true, false] {
                let (caller, cpu) = record_cost(sample, journal, dir.path()).await;
                println!(
                    "record(), no database, journal {}: {caller:>6.2} us per row in the caller, {cpu:>6.2} us of CPU per row in all ({RECORD_ROWS} rows)",
                    if journal { "on " } else { "off" },
                );
            }
        }

        // 0b. Rotation of the embedded file off and on, and the gzip ratio.
        rotation(sample).await;

        // 1. The writer: rows pushed as fast as it takes them, with the journal (each row
        //    appended to the local file by `record`, the default) and without (the writer
        //    appends once per flush interval).
        let writer_rate = writer(&admin, &base, &data, true, dir.path()).await;
        let no_journal_rate = writer(&admin, &base, &data, false, dir.path()).await;

        // 2. The ceiling: psql \copy of the same rows, same binary format, one transaction.
        let url = fresh(&admin, &base, "bench_psql").await;
        let refs: Vec<&AuditRow> = data
            .iter()
            .filter_map(|e| match e {
                Entry::Decision(r) => Some(r),
                Entry::Kernel(_) => None,
            })
            .collect();
        let file = dir.path().join("rows.bin");
        std::fs::write(&file, encode_rows(&refs)).expect("write rows");
        let started = Instant::now();
        let status = std::process::Command::new("psql")
            .args([&url, "-q", "-c"])
            .arg(format!(
                "\\copy token_transactions ({}) FROM '{}' WITH (FORMAT binary)",
                postgres::COLUMNS,
                file.display()
            ))
            .status()
            .expect("psql");
        let took = started.elapsed();
        assert!(status.success(), "psql \\copy");
        assert_eq!(count(&url).await, ROWS as i64);
        let psql_rate = ROWS as f64 / took.as_secs_f64();
        println!(
            "psql \\copy (binary, one COPY):                {psql_rate:>9.0} rows/s ({:.2} s)",
            took.as_secs_f64()
        );

        // 3. Single-row INSERTs, one connection, autocommit (the seed's way).
        let url = fresh(&admin, &base, "bench_insert").await;
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        let started = Instant::now();
        for r in refs.iter().take(INSERT_ROWS) {
            sqlx::query(
                "INSERT INTO token_transactions (id, recorded_at, key_hash, key_prefix, tier, \
                 endpoint, method, units, cost, multiplier, allowed, remaining, decided_by, \
                 denial, request_id, node) VALUES ($1, to_timestamp($2 / 1e6), $3, $4, $5, $6, \
                 $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            )
            .bind(r.id)
            .bind(r.at_us as f64)
            .bind(&r.key_hash)
            .bind(postgres::key_prefix(&r.key_hash))
            .bind(&r.tier)
            .bind(&r.endpoint)
            .bind(&r.method)
            .bind(r.units)
            .bind(r.cost)
            .bind(r.multiplier)
            .bind(r.allowed)
            .bind(r.remaining)
            .bind(&r.decided_by)
            .bind(&r.denial)
            .bind(&r.request_id)
            .bind(&r.node)
            .execute(&pool)
            .await
            .expect("insert");
        }
        let took = started.elapsed();
        let insert_rate = INSERT_ROWS as f64 / took.as_secs_f64();
        println!(
            "single-row INSERTs ({INSERT_ROWS} rows, autocommit):  {insert_rate:>9.0} rows/s ({:.2} s)",
            took.as_secs_f64()
        );
        println!(
            "writer / psql \\copy: {:.2} (journal off: {:.2}); writer / INSERTs: {:.0}x",
            writer_rate / psql_rate,
            no_journal_rate / psql_rate,
            writer_rate / insert_rate
        );
        for db in ["bench_writer", "bench_psql", "bench_insert"] {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
                .execute(&admin)
                .await;
        }
    });
}
