//! The audit ledger: every decision as a row, for billing and disputes, and none lost.
//!
//! The decision path only hands a row to [`Ledger::record`] (a non-blocking queue push). A
//! writer thread of its own batches the rows and writes them:
//!
//! - with a database ([`postgres`]): binary `COPY` into the partitioned `token_transactions`;
//!   when PostgreSQL is down or slower than `write_timeout_ms`, the batch goes to the local
//!   append-only file instead ([`file`], the *spill file*), and once PostgreSQL answers again the
//!   file is replayed in order, idempotently (the row id is the key), then truncated. While a
//!   backlog exists new rows are appended behind it, so the order is kept.
//! - without one (the embedded default): the same rows go to the same file, which *is* the
//!   ledger; `enforcer audit import FILE` loads it into PostgreSQL later.
//!
//! Nothing here can slow a decision: a full queue drops the row and counts it in
//! `enforcer_ledger_dropped_total` (which a healthy deployment keeps at 0: the queue holds
//! seconds of traffic and the spill file takes what PostgreSQL cannot).
pub mod file;
pub mod postgres;
mod subscriber;

use crate::config::LedgerConfig;
use crate::metrics::LedgerMetrics;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL refused or could not be reached.
    #[error("PostgreSQL: {0}")]
    Postgres(sqlx::Error),
    /// Applying the migrations failed.
    #[error("applying the migrations: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// The ledger or spill file could not be read or written.
    #[error("ledger file {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A write took longer than `write_timeout_ms`.
    #[error("timed out")]
    Timeout,
    /// Bad input to a query (a duration, a format).
    #[error("{0}")]
    Input(String),
}

// The causes are part of the messages (logged with `%e`), not `source`s, so an error chain
// prints each of them once.
impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Postgres(e)
    }
}

impl From<sqlx::migrate::MigrateError> for LedgerError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

/// One decision, as recorded. Field names are the JSON-lines file format (stable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// The decision id (UUIDv7: time-ordered, so the primary-key index stays append-mostly).
    pub id: Uuid,
    /// When it was decided: microseconds since the Unix epoch (UTC).
    pub at_us: i64,
    /// SHA-256 of the key, lower-case hex.
    pub key_hash: String,
    /// The tier charged, when known.
    pub tier: Option<String>,
    /// The request path (query stripped).
    pub endpoint: String,
    /// The method, or `*` when the gateway gave none.
    pub method: String,
    /// Units of work.
    pub units: f64,
    /// Tokens charged (or that would have been).
    pub cost: f64,
    /// The price multiplier applied to the base cost (1 with static prices).
    pub multiplier: f64,
    /// Whether the request was allowed.
    pub allowed: bool,
    /// Balance after the decision, when the store answered.
    pub remaining: Option<f64>,
    /// Who decided: `redis`, `memory`, `shadow`, `fail-open`, `fail-closed`, `replay`.
    pub decided_by: String,
    /// Why it was denied (`exhausted`, `unknown_key`, `store_unavailable`), if it was.
    pub denial: Option<String>,
    /// The caller's request id (idempotency token), if any.
    pub request_id: Option<String>,
    /// The node that decided.
    pub node: String,
}

/// Rejections of one key by the kernel gate over one interval (a rollup row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRejections {
    /// Row id (replays are idempotent).
    pub id: Uuid,
    /// Start of the minute the counts were read in, microseconds since the Unix epoch.
    pub minute_us: i64,
    /// The node whose gate rejected.
    pub node: String,
    /// The kernel key id (`enforcer_common::key_id`), as the signed 64-bit PostgreSQL stores.
    pub key_id: i64,
    /// `l7`, `l4` or `blocked`.
    pub reason: String,
    /// Rejections since the previous read.
    pub count: i64,
}

/// What the ledger records; one JSON object per line in the file, tagged by `t`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Entry {
    /// A decision.
    Decision(AuditRow),
    /// A kernel rejection rollup.
    Kernel(KernelRejections),
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The node name for audit rows: the configured one, else `$NODE_NAME` (Kubernetes downward
/// API), else the host name.
pub fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The decision path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Entry>,
    metrics: LedgerMetrics,
    node: String,
}

impl Ledger {
    /// Queues an entry for the writer. Never waits: with the queue full the entry is dropped
    /// and counted.
    pub fn record(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(_) => {
                let n = self.metrics.dropped.get();
                self.metrics.dropped.inc();
                // Every 1000th, so a flood of drops cannot flood the log too.
                if n.is_multiple_of(1000) {
                    tracing::error!(dropped = n + 1, "audit ledger queue full: rows dropped");
                }
            }
        }
    }

    /// This node's name, for rows.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// The writer thread; [`Writer::shutdown`] drains the queue and waits for it.
#[derive(Debug)]
pub struct Writer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Stops taking new work, writes (or spills) everything queued, and waits for the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Opens the ledger file (repairing a torn last line) and, with a database, connects and
/// optionally migrates; then starts the writer thread.
pub async fn start(
    config: &LedgerConfig,
    metrics: LedgerMetrics,
) -> Result<(Ledger, Writer), LedgerError> {
    let node = node_name(&config.node);
    let file = file::LedgerFile::open(PathBuf::from(&config.file), config.fsync)?;
    let sink = if config.database_url.is_empty() {
        None
    } else {
        // A database that is down at start is not fatal: rows spill until it answers.
        let pool = postgres::pool(&config.database_url)?;
        if config.migrate {
            postgres::migrate(&pool).await?;
        }
        Some(postgres::PgSink::new(pool).with_parallel(config.connections))
    };
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let mut task = WriterTask {
        rx,
        stop: stop_rx,
        sink,
        file,
        metrics: metrics.clone(),
        batch_rows: config.batch_rows,
        flush: Duration::from_millis(config.flush_ms),
        write_timeout: Duration::from_millis(config.write_timeout_ms),
        retry: Duration::from_millis(config.retry_ms),
        next_try: Instant::now(),
        next_maintenance: Instant::now(),
        partitions_ahead: config.partitions_ahead,
        retention_months: config.retention_months,
    };
    let thread = std::thread::Builder::new()
        .name("ledger".into())
        .spawn(move || {
            // A runtime of its own: file writes and fsyncs never stall the decision workers.
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task.run()),
                Err(e) => tracing::error!(error = %e, "ledger writer runtime failed"),
            }
        })
        .map_err(|source| LedgerError::File {
            path: PathBuf::from(&config.file),
            error: source,
        })?;
    Ok((
        Ledger { tx, metrics, node },
        Writer {
            stop: Some(stop_tx),
            thread: Some(thread),
        },
    ))
}

/// Rows replayed from the spill file per PostgreSQL transaction.
const REPLAY_CHUNK: usize = 10_000;
/// Partition maintenance (create ahead, retention) interval.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);

struct WriterTask {
    rx: mpsc::Receiver<Entry>,
    stop: tokio::sync::oneshot::Receiver<()>,
    sink: Option<postgres::PgSink>,
    file: file::LedgerFile,
    metrics: LedgerMetrics,
    batch_rows: usize,
    flush: Duration,
    write_timeout: Duration,
    retry: Duration,
    /// PostgreSQL is not tried again (for writes or replay) before this.
    next_try: Instant,
    next_maintenance: Instant,
    partitions_ahead: u32,
    retention_months: u32,
}

impl WriterTask {
    async fn run(&mut self) {
        let mut stopping = false;
        loop {
            let batch = self.collect(&mut stopping).await;
            if !batch.is_empty() {
                self.metrics.queue_depth.sub(batch.len() as i64);
                self.write(&batch).await;
            }
            if self.sink.is_some() {
                self.replay().await;
                self.maintain().await;
            }
            if stopping && self.rx.is_empty() {
                break;
            }
        }
        // A last replay attempt so a clean shutdown leaves as little backlog as it can.
        if self.sink.is_some() {
            self.replay().await;
        }
    }

    /// Up to `batch_rows` entries: what is queued now, and if that is less than a batch, what
    /// arrives within `flush`. It sleeps instead of waiting on the queue, so the decision path
    /// never wakes this thread row by row (a wake-up per row cost more CPU than writing it).
    async fn collect(&mut self, stopping: &mut bool) -> Vec<Entry> {
        let mut batch = Vec::new();
        self.drain_into(&mut batch);
        if batch.len() < self.batch_rows && !*stopping {
            tokio::select! {
                _ = &mut self.stop => { *stopping = true; self.rx.close(); }
                () = tokio::time::sleep(self.flush) => {}
            }
            self.drain_into(&mut batch);
        }
        if self.rx.is_closed() {
            *stopping = true;
        }
        batch
    }

    fn drain_into(&mut self, batch: &mut Vec<Entry>) {
        while batch.len() < self.batch_rows {
            match self.rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
    }

    async fn write(&mut self, batch: &[Entry]) {
        let started = Instant::now();
        // Straight to PostgreSQL unless a backlog must be replayed first or it failed recently.
        let direct = self.file.is_empty() && Instant::now() >= self.next_try;
        if direct && let Some(sink) = self.sink.as_mut() {
            match tokio::time::timeout(self.write_timeout, sink.write(batch)).await {
                Ok(Ok(())) => {
                    self.metrics.written.inc_by(batch.len() as u64);
                    self.metrics
                        .batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return;
                }
                Ok(Err(e)) => {
                    self.metrics.errors.with_label_values(&["write"]).inc();
                    tracing::warn!(error = %e, rows = batch.len(), "ledger write failed: spilling");
                }
                Err(_) => {
                    self.metrics.errors.with_label_values(&["write"]).inc();
                    tracing::warn!(rows = batch.len(), "ledger write timed out: spilling");
                }
            }
            self.next_try = Instant::now() + self.retry;
        }
        // No database (the file is the ledger), a backlog to stay behind, or a failed write.
        match self.file.append(batch) {
            Ok(()) => {
                if self.sink.is_some() {
                    self.metrics.spilled.inc_by(batch.len() as u64);
                } else {
                    self.metrics.written.inc_by(batch.len() as u64);
                    self.metrics
                        .batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&["spill"]).inc();
                self.metrics.dropped.inc_by(batch.len() as u64);
                tracing::error!(error = %e, rows = batch.len(), "ledger file write failed: rows lost");
            }
        }
        self.metrics.backlog_bytes.set(self.backlog_bytes());
    }

    fn backlog_bytes(&self) -> i64 {
        if self.sink.is_some() {
            i64::try_from(self.file.backlog()).unwrap_or(i64::MAX)
        } else {
            0
        }
    }

    /// Replays the spill file into PostgreSQL, chunk by chunk, while it answers.
    async fn replay(&mut self) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        while !self.file.is_empty() && Instant::now() >= self.next_try {
            let chunk = match self.file.read_chunk(REPLAY_CHUNK) {
                Ok(c) => c,
                Err(e) => {
                    self.metrics.errors.with_label_values(&["replay"]).inc();
                    tracing::error!(error = %e, "reading the spill file failed");
                    self.next_try = Instant::now() + self.retry;
                    return;
                }
            };
            if chunk.corrupt > 0 {
                self.metrics
                    .errors
                    .with_label_values(&["replay"])
                    .inc_by(chunk.corrupt as u64);
                tracing::error!(
                    lines = chunk.corrupt,
                    "unreadable lines in the spill file skipped"
                );
            }
            let result = if chunk.entries.is_empty() {
                Ok(Ok(()))
            } else {
                tokio::time::timeout(self.write_timeout, sink.write_idempotent(&chunk.entries))
                    .await
            };
            match result {
                Ok(Ok(())) => {
                    if let Err(e) = self.file.advance(chunk.next_offset) {
                        // The rows are in PostgreSQL; replaying them again is harmless.
                        tracing::warn!(error = %e, "recording replay progress failed");
                    }
                    self.metrics.replayed.inc_by(chunk.entries.len() as u64);
                }
                Ok(Err(e)) => {
                    self.metrics.errors.with_label_values(&["replay"]).inc();
                    tracing::warn!(error = %e, "replaying the spill file failed; will retry");
                    self.next_try = Instant::now() + self.retry;
                }
                Err(_) => {
                    self.metrics.errors.with_label_values(&["replay"]).inc();
                    self.next_try = Instant::now() + self.retry;
                }
            }
            self.metrics
                .backlog_bytes
                .set(i64::try_from(self.file.backlog()).unwrap_or(i64::MAX));
            // Keep draining the queue between chunks: the loop comes back here.
            if !self.rx.is_empty() {
                return;
            }
        }
    }

    async fn maintain(&mut self) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        if Instant::now() < self.next_maintenance || Instant::now() < self.next_try {
            return;
        }
        let work = async {
            postgres::ensure_partitions(sink.pool(), self.partitions_ahead).await?;
            postgres::apply_retention(sink.pool(), self.retention_months).await
        };
        match tokio::time::timeout(Duration::from_secs(30), work).await {
            Ok(Ok(dropped)) => {
                if !dropped.is_empty() {
                    tracing::info!(partitions = ?dropped, "retention: dropped old partitions");
                }
                self.next_maintenance = Instant::now() + MAINTENANCE_EVERY;
            }
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&["maintain"]).inc();
                tracing::warn!(error = %e, "partition maintenance failed; will retry");
                self.next_maintenance = Instant::now() + self.retry * 10;
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&["maintain"]).inc();
                self.next_maintenance = Instant::now() + self.retry * 10;
            }
        }
    }
}
