//! The audit ledger: every decision as a row, for billing and disputes, and none lost.
//!
//! The decision path hands a row to [`Ledger::record`] and never waits for PostgreSQL:
//!
//! - With `journal = true` (the default), `record` appends the row to the local file
//!   ([`file`]) with one `write` before it returns, that is before the decision is answered:
//!   a daemon killed after answering has every answered row on disk. The writer fsyncs the
//!   file once per `flush_ms`.
//! - With `journal = false`, `record` pushes the row onto a queue, and the appender thread
//!   appends what is queued to the file once per `flush_ms` (one write and one fsync per
//!   group): a kill loses at most the rows of the last flush interval.
//!
//! Either way every row is in the file before PostgreSQL sees it, and the file is the spill
//! file: with a database ([`postgres`]) the shipper task writes the rows with binary `COPY`,
//! straight from memory when it is caught up with the file, else by replaying the file in
//! order, idempotently (the row id is the key). What is committed is recorded in
//! `<file>.offset`, and the file is truncated (or compacted) behind it. Without a database
//! (the embedded default) the file *is* the ledger, rotated by size and age and compressed
//! ([`rotate`]); `enforcer audit import FILE...` loads it into PostgreSQL later.
//!
//! Rows PostgreSQL refuses for their data (SQLSTATE classes 22 and 23) are isolated by
//! splitting the batch and moved to the [`quarantine`] file; the rest land. A failure to
//! reach PostgreSQL is not the rows' fault: they stay in the file and are replayed later.
//!
//! Nothing here waits on PostgreSQL or on an fsync in the decision path. A row that cannot be
//! queued (`journal = false` and the queue full) or appended is dropped and counted in
//! `enforcer_ledger_dropped_total`, which a healthy deployment keeps at 0.
pub mod file;
pub mod json;
pub mod postgres;
pub mod quarantine;
pub mod rotate;
pub mod shadow;
mod subscriber;

use crate::config::LedgerConfig;
use crate::metrics::LedgerMetrics;
use file::{LedgerFile, Logged};
use quarantine::{Quarantine, Refused};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

impl LedgerError {
    /// PostgreSQL refused the rows for what they contain: SQLSTATE class 22 (data exception:
    /// `22021` a NUL byte or a byte sequence invalid in the encoding, `22P05`, a value out of
    /// range, …) or 23 (integrity constraint violation: `CHECK`, `NOT NULL`, …). Sending the
    /// same rows again fails again, on any connection, unlike a connection or availability
    /// error, after which the same rows succeed later.
    pub fn is_data_error(&self) -> bool {
        match self {
            Self::Postgres(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }
}

impl From<rotate::RotateError> for LedgerError {
    fn from(e: rotate::RotateError) -> Self {
        match e {
            rotate::RotateError::File { path, error } => Self::File { path, error },
        }
    }
}

impl From<sqlx::migrate::MigrateError> for LedgerError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

/// What a row records: a change of a key's balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    /// A decision: charged, denied, or answered without charging (replays, failure policy).
    #[default]
    Debit,
    /// Tokens given back for a request the upstream failed (`POST /v1/refund`): `cost` is the
    /// tokens credited, `request_id` the refunded request's.
    Refund,
    /// Tokens granted by an operator (`enforcer keys grant`): `cost` is the tokens granted,
    /// `remaining` the balance after, `request_id` the grant id, `note` and `operator` say why
    /// and who.
    Grant,
    /// A low-balance alert ([`crate::alerts`]): `cost` is the threshold in tokens,
    /// `remaining` the balance that crossed it, `note` the threshold as a fraction.
    Alert,
    /// A request's true cost charged in place of its estimate (`POST /v1/settle`): `cost` is
    /// the difference charged now (negative: credited back), `true_cost` the true cost,
    /// `request_id` the settled request's.
    Settle,
    /// Part of a charge paid by a wallet grant ([`crate::wallet`]), beside its `debit` row:
    /// `cost` the tokens taken from the grant, `note` the grant id, `request_id` and
    /// `endpoint` the request's. Not a second charge: the debit row's cost includes it.
    GrantSpend,
    /// A wallet grant that expired with tokens left: `cost` the tokens forfeited, `request_id`
    /// the grant id, `note` when it expired. Written when the store first notices it (the
    /// key's next debit or grant).
    GrantExpiry,
    /// A reservation that was neither settled nor refunded by its `settle_by`: `cost` the
    /// estimate it kept, `request_id`, `endpoint`, `tier` the reservation's, `note` the id of
    /// its debit row. Written by the expiry job from the ledger in PostgreSQL
    /// ([`postgres::expire_reservations`]), never by the decision path. Not a charge: the
    /// debit row counts the estimate already.
    ReservationExpiry,
}

impl RowKind {
    /// The name in the `kind` column and the file.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Debit => "debit",
            RowKind::Refund => "refund",
            RowKind::Grant => "grant",
            RowKind::Alert => "alert",
            RowKind::Settle => "settle",
            RowKind::GrantSpend => "grant_spend",
            RowKind::GrantExpiry => "grant_expiry",
            RowKind::ReservationExpiry => "reservation_expiry",
        }
    }
}

/// One decision (or refund), as recorded. Field names are the JSON-lines file format (stable;
/// `kind` and `client_ip` are absent from lines written before they existed: debits, without
/// an address).
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
    /// A debit, a refund or a grant.
    #[serde(default)]
    pub kind: RowKind,
    /// The client's address as the daemon took it from a trusted proxy (`X-Forwarded-For`,
    /// `X-Real-IP`, `client_ip`; docs/http-api.md#client-addresses); `None` when no trusted
    /// peer named one, for refunds, and in lines written before the field existed.
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
    /// An operator's note (grants): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Who made an operator's change (grants): `uid:<n>` of the admin socket's peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Settles: the true cost charged in all (`cost` is the difference charged by the settle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cost: Option<f64>,
    /// A reservation's debit row: when its request record expires unsettled (`at_us` plus
    /// `store.settle_ttl_secs`), microseconds since the Unix epoch; `None` on every other row.
    /// What marks the row as a reservation, and what the expiry job reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_by_us: Option<i64>,
    /// A decision's shadow candidate ([`crate::shadow`]): whether the candidate policy would
    /// have allowed it; `None` when no candidate was evaluated, on every other row, and in
    /// lines written before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_allowed: Option<bool>,
    /// The candidate policy's price of the decision (charged to its own bucket when it
    /// allowed); `None` with `candidate_allowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_cost: Option<f64>,
}

impl AuditRow {
    /// An allowed debit of 1 token on `GET /x` by key `key_hash` (free tier, 9 left, node
    /// `n`): the row tests and benches start from, changing what they are about.
    #[doc(hidden)]
    pub fn sample(at_us: i64, key_hash: String) -> Self {
        Self {
            id: Uuid::now_v7(),
            at_us,
            key_hash,
            tier: Some("free".into()),
            endpoint: "/x".into(),
            method: "GET".into(),
            units: 1.0,
            cost: 1.0,
            multiplier: 1.0,
            allowed: true,
            remaining: Some(9.0),
            decided_by: "memory".into(),
            denial: None,
            request_id: None,
            node: "n".into(),
            kind: RowKind::Debit,
            client_ip: None,
            note: None,
            operator: None,
            true_cost: None,
            settle_by_us: None,
            candidate_allowed: None,
            candidate_cost: None,
        }
    }
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
#[expect(
    clippy::large_enum_variant,
    reason = "decisions are nearly every entry: boxing them would allocate once more per row"
)]
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

/// Bytes reserved for one row's line: a decision's row is ~400 bytes of JSON.
const LINE_CAPACITY: usize = 512;

/// The decision path's handle: cheap to clone, never waits for PostgreSQL.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Rows for the appender: every row without `journal`, else only those whose own append
    /// failed.
    tx: mpsc::Sender<Entry>,
    /// Rows in the file, for the shipper to write straight from memory (with a database).
    ship: Option<mpsc::Sender<Logged>>,
    file: Arc<LedgerFile>,
    journal: bool,
    metrics: LedgerMetrics,
    node: String,
    /// What a reload may change; the writer threads read it at every turn.
    tuning: Arc<Tuning>,
}

/// The ledger settings a config reload may change while rows flow: the writer threads read
/// them at every turn (a sleep or a PostgreSQL call already started finishes with the old
/// value). The file, the journal, fsync, the queue, the database and its pool, the node name
/// are set up once: they need a restart.
#[derive(Debug)]
struct Tuning {
    batch_rows: AtomicUsize,
    flush_ms: AtomicU64,
    write_timeout_ms: AtomicU64,
    retry_ms: AtomicU64,
    partitions_ahead: AtomicU32,
    retention_months: AtomicU32,
    expiry_interval_ms: AtomicU64,
    expiry_grace_ms: AtomicU64,
    expiry_lookback_secs: AtomicU64,
    expiry_batch: AtomicU32,
    /// `store.settle_ttl_secs` in milliseconds (0 until the daemon sets it): a reservation's
    /// row says when it expires.
    settle_ttl_ms: AtomicU64,
    file_max_bytes: AtomicU64,
    file_max_age_secs: AtomicU64,
    file_keep: AtomicU32,
}

impl Tuning {
    fn new(config: &LedgerConfig) -> Self {
        let t = Self {
            batch_rows: AtomicUsize::new(0),
            flush_ms: AtomicU64::new(0),
            write_timeout_ms: AtomicU64::new(0),
            retry_ms: AtomicU64::new(0),
            partitions_ahead: AtomicU32::new(0),
            retention_months: AtomicU32::new(0),
            expiry_interval_ms: AtomicU64::new(0),
            expiry_grace_ms: AtomicU64::new(0),
            expiry_lookback_secs: AtomicU64::new(0),
            expiry_batch: AtomicU32::new(0),
            settle_ttl_ms: AtomicU64::new(0),
            file_max_bytes: AtomicU64::new(0),
            file_max_age_secs: AtomicU64::new(0),
            file_keep: AtomicU32::new(0),
        };
        t.set(config);
        t
    }

    fn set(&self, c: &LedgerConfig) {
        self.batch_rows
            .store(c.batch_rows.max(1), Ordering::Relaxed);
        self.flush_ms.store(c.flush_ms, Ordering::Relaxed);
        self.write_timeout_ms
            .store(c.write_timeout_ms, Ordering::Relaxed);
        self.retry_ms.store(c.retry_ms, Ordering::Relaxed);
        self.partitions_ahead
            .store(c.partitions_ahead, Ordering::Relaxed);
        self.retention_months
            .store(c.retention_months, Ordering::Relaxed);
        self.expiry_interval_ms
            .store(c.expiry_interval_ms, Ordering::Relaxed);
        self.expiry_grace_ms
            .store(c.expiry_grace_ms, Ordering::Relaxed);
        self.expiry_lookback_secs
            .store(c.expiry_lookback_secs, Ordering::Relaxed);
        self.expiry_batch
            .store(c.expiry_batch.max(1), Ordering::Relaxed);
        self.file_max_bytes
            .store(c.file_max_bytes, Ordering::Relaxed);
        self.file_max_age_secs
            .store(c.file_max_age_secs, Ordering::Relaxed);
        self.file_keep.store(c.file_keep.max(1), Ordering::Relaxed);
    }

    fn file_max_bytes(&self) -> u64 {
        self.file_max_bytes.load(Ordering::Relaxed)
    }

    fn file_max_age_us(&self) -> u64 {
        self.file_max_age_secs
            .load(Ordering::Relaxed)
            .saturating_mul(1_000_000)
    }

    fn file_keep(&self) -> usize {
        self.file_keep.load(Ordering::Relaxed) as usize
    }

    fn batch_rows(&self) -> usize {
        self.batch_rows.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Duration {
        Duration::from_millis(self.flush_ms.load(Ordering::Relaxed))
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms.load(Ordering::Relaxed))
    }

    fn retry(&self) -> Duration {
        Duration::from_millis(self.retry_ms.load(Ordering::Relaxed))
    }

    fn partitions_ahead(&self) -> u32 {
        self.partitions_ahead.load(Ordering::Relaxed)
    }

    fn retention_months(&self) -> u32 {
        self.retention_months.load(Ordering::Relaxed)
    }

    /// `None`: the expiry job is off.
    fn expiry_interval(&self) -> Option<Duration> {
        match self.expiry_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn expiry(&self) -> postgres::ExpiryWindow {
        postgres::ExpiryWindow {
            grace: Duration::from_millis(self.expiry_grace_ms.load(Ordering::Relaxed)),
            lookback: Duration::from_secs(self.expiry_lookback_secs.load(Ordering::Relaxed)),
            limit: self.expiry_batch.load(Ordering::Relaxed),
        }
    }
}

impl Ledger {
    /// Applies a reload's `batch_rows`, `flush_ms`, `write_timeout_ms`, `retry_ms`,
    /// `partitions_ahead` and `retention_months` from the writers' next turn (a new `flush_ms`
    /// after the current interval, at most the old `flush_ms`; partitions and retention at the
    /// next maintenance; the file's rotation limits at the appender's next round, `file_keep`
    /// at the next rotation). Nothing queued or in the file is touched.
    pub fn retune(&self, config: &LedgerConfig) {
        self.tuning.set(config);
    }

    /// How long a reservation waits for its settle (`store.settle_ttl_secs`): the rows of the
    /// reservations recorded from now on say so (`settle_by`).
    pub fn set_settle_ttl(&self, ttl: Duration) {
        self.tuning.settle_ttl_ms.store(
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The `settle_by` of a reservation recorded at `at_us`; `None` before the daemon set the
    /// settle ttl (a reservation's row then carries no deadline, and no expiry row follows).
    pub(crate) fn settle_by_us(&self, at_us: i64) -> Option<i64> {
        match self.tuning.settle_ttl_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                at_us.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX).saturating_mul(1000)),
            ),
        }
    }

    /// Records an entry. With `journal` it is in the file when this returns (one `write`;
    /// the fsync follows within `flush_ms`); without, it is queued for the appender. Never
    /// waits for PostgreSQL.
    pub fn record(&self, entry: Entry) {
        if !self.journal {
            return self.queue(entry);
        }
        // Sized for a decision's row (~400 bytes) at once: `to_vec` starts empty and
        // reallocates its way up, copying the row each time.
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        match json::write(&entry, &mut line) {
            Ok(()) => line.push(b'\n'),
            // Plain data always serializes; were it not to, the appender reports it.
            Err(_) => return self.queue(entry),
        }
        let mut entry = Some(entry);
        let appended = self.file.append_line(&line, |start, end| {
            if let (Some(ship), Some(entry)) = (&self.ship, entry.take()) {
                forward(ship, &self.metrics, Logged { start, end, entry });
            }
        });
        match appended {
            Ok(()) => {
                if self.ship.is_none() {
                    self.metrics.written.inc();
                }
            }
            Err(e) => {
                let n = self.metrics.errors.with_label_values(&["spill"]).get();
                self.metrics.errors.with_label_values(&["spill"]).inc();
                if n.is_multiple_of(1000) {
                    tracing::error!(error = %e, "appending to the ledger file failed: queued for the writer");
                }
                if let Some(entry) = entry.take() {
                    self.queue(entry);
                }
            }
        }
    }

    /// Onto the appender's queue; with the queue full the entry is dropped and counted.
    fn queue(&self, entry: Entry) {
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

/// Hands a row that is in the file to the shipper. With its queue full the row stays only in
/// the file, and the shipper replays it from there: nothing is lost.
fn forward(ship: &mpsc::Sender<Logged>, metrics: &LedgerMetrics, row: Logged) {
    match ship.try_send(row) {
        Ok(()) => metrics.queue_depth.inc(),
        Err(_) => metrics.spilled.inc(),
    }
}

/// The writer's threads; [`Writer::shutdown`] appends everything queued, writes what it can
/// to PostgreSQL, and waits for them.
#[derive(Debug)]
pub struct Writer {
    append_stop: Option<std::sync::mpsc::Sender<()>>,
    appender: Option<std::thread::JoinHandle<()>>,
    ship_stop: Option<tokio::sync::oneshot::Sender<()>>,
    shipper: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Stops taking new work, appends everything queued, writes what it can to PostgreSQL,
    /// and waits for the threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // The appender first: what it appends last is handed to the shipper.
        if let Some(stop) = self.append_stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.appender.take() {
            let _ = t.join();
        }
        if let Some(stop) = self.ship_stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.shipper.take() {
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
/// optionally migrates; then starts the appender thread and, with a database, the shipper.
pub async fn start(
    config: &LedgerConfig,
    metrics: LedgerMetrics,
) -> Result<(Ledger, Writer), LedgerError> {
    let node = node_name(&config.node);
    let path = PathBuf::from(&config.file);
    let file = Arc::new(LedgerFile::open(path.clone(), config.fsync)?);
    let sink = if config.database_url.is_empty() {
        None
    } else {
        // A database that is down at start is not fatal: rows wait in the file until it answers.
        let pool = postgres::pool(&config.database_url)?;
        if config.migrate {
            postgres::migrate(&pool).await?;
        }
        Some(postgres::PgSink::new(pool).with_parallel(config.connections))
    };
    let spawn_err = |error| LedgerError::File {
        path: path.clone(),
        error,
    };
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let tuning = Arc::new(Tuning::new(config));
    let (ship_tx, shipper, ship_stop) = match sink {
        None => (None, None, None),
        Some(sink) => {
            let (ship_tx, ship_rx) = mpsc::channel(config.queue_capacity);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let task = Shipper {
                rx: ship_rx,
                stop: stop_rx,
                sink,
                committed: file.opened_committed(),
                file: file.clone(),
                quarantine: Quarantine::new(quarantine::path_for(&path), config.fsync),
                metrics: metrics.clone(),
                tuning: tuning.clone(),
                next_try: Instant::now(),
                next_maintenance: Instant::now(),
                next_expiry: Instant::now(),
                expiry_done_at: None,
                next_expiry_sweep: Instant::now(),
            };
            let thread = std::thread::Builder::new()
                .name("ledger".into())
                .spawn(move || {
                    // A runtime of its own: COPYs and replays never stall the decision workers.
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(task.run()),
                        Err(e) => tracing::error!(error = %e, "ledger writer runtime failed"),
                    }
                })
                .map_err(spawn_err)?;
            (Some(ship_tx), Some(thread), Some(stop_tx))
        }
    };
    // Rotated files a crash left uncompressed are compressed in the background, in either
    // mode (a database may have been added since); old ones are pruned only without one.
    let rotator =
        rotate::Rotator::start(path.clone(), metrics.errors.with_label_values(&["rotate"]))
            .map_err(spawn_err)?;
    rotator.recover(ship_tx.is_none().then(|| tuning.file_keep()));
    let (append_stop, append_stop_rx) = std::sync::mpsc::channel();
    let appender = Appender {
        rx,
        stop: append_stop_rx,
        file: file.clone(),
        ship: ship_tx.clone(),
        metrics: metrics.clone(),
        tuning: tuning.clone(),
        fsync: config.fsync,
        rotator,
        next_rotation: Instant::now(),
        warned_large: false,
    };
    let appender = std::thread::Builder::new()
        .name("ledger-append".into())
        .spawn(move || appender.run())
        .map_err(spawn_err)?;
    Ok((
        Ledger {
            tx,
            ship: ship_tx,
            file,
            journal: config.journal,
            metrics,
            node,
            tuning,
        },
        Writer {
            append_stop: Some(append_stop),
            appender: Some(appender),
            ship_stop,
            shipper,
        },
    ))
}

/// Rows replayed from the file per PostgreSQL transaction.
const REPLAY_CHUNK: usize = 10_000;
/// How often the expiry job looks back its whole `expiry_lookback_secs` (between, it looks
/// back to a little before its last finished run).
const EXPIRY_SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// How much before its last finished run the expiry job looks back: rows that reach
/// PostgreSQL at most this late are looked at by the next run, later ones by the hourly sweep.
const EXPIRY_SLACK: Duration = Duration::from_secs(600);
/// Partition maintenance (create ahead, retention) interval.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);

/// Once per `flush_ms`: appends the queued rows to the file (one write per group of up to
/// `batch_rows`), fsyncs what was appended since the last time (by it or, with `journal`, by
/// the decision path), and hands the rows to the shipper. A plain thread: it only sleeps and
/// does file I/O, and PostgreSQL being slow never delays it.
struct Appender {
    rx: mpsc::Receiver<Entry>,
    stop: std::sync::mpsc::Receiver<()>,
    file: Arc<LedgerFile>,
    ship: Option<mpsc::Sender<Logged>>,
    metrics: LedgerMetrics,
    tuning: Arc<Tuning>,
    fsync: bool,
    /// Compresses rotated files and prunes old ones; dropped (finishing its queue) when the
    /// appender returns.
    rotator: rotate::Rotator,
    /// No rotation is tried before this (after a failed one).
    next_rotation: Instant,
    /// With a database: the spill file's size passed `file_max_bytes` and was logged.
    warned_large: bool,
}

impl Appender {
    fn run(mut self) {
        loop {
            // Sleeping instead of waiting on the queue: the decision path never wakes this
            // thread row by row (a wake-up per row cost more CPU than writing the row).
            let stopping = !matches!(
                self.stop.recv_timeout(self.tuning.flush()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if stopping {
                self.rx.close();
            }
            self.append_queued();
            if self.fsync
                && let Err(e) = self.file.sync()
            {
                self.metrics.errors.with_label_values(&["spill"]).inc();
                tracing::error!(error = %e, "syncing the ledger file failed");
            }
            self.watch_size();
            if stopping {
                return;
            }
        }
    }

    /// Once per round, after the sync: exports the file's size and, without a database,
    /// rotates it when it is due. With a database the file is never rotated (its rows not yet
    /// in PostgreSQL must stay in it; the committed part is truncated or compacted); a spill
    /// file that grows past `file_max_bytes` (PostgreSQL down for long) is logged once.
    fn watch_size(&mut self) {
        let len = self.file.len();
        self.metrics
            .file_bytes
            .set(i64::try_from(len).unwrap_or(i64::MAX));
        let max_bytes = self.tuning.file_max_bytes();
        if self.ship.is_some() {
            let large = max_bytes > 0 && len >= max_bytes;
            if large && !self.warned_large {
                tracing::warn!(
                    bytes = len,
                    file_max_bytes = max_bytes,
                    file = %self.file.path().display(),
                    "the spill file passed ledger.file_max_bytes: PostgreSQL is down or behind; \
                     with a database the file is not rotated (its rows are not in PostgreSQL yet)"
                );
            }
            self.warned_large = large;
            return;
        }
        if Instant::now() < self.next_rotation
            || !self
                .file
                .rotation_due(max_bytes, self.tuning.file_max_age_us(), now_us())
        {
            return;
        }
        if let Err(e) = self.rotate() {
            self.metrics.errors.with_label_values(&["rotate"]).inc();
            tracing::error!(error = %e, "rotating the ledger file failed; appending goes on, retried later");
            self.next_rotation = Instant::now() + self.tuning.retry() * 10;
        }
    }

    /// Renames the file away and opens a fresh one (briefly under the append lock), makes the
    /// old one and the rename durable here, and hands it to the rotation thread to compress.
    fn rotate(&mut self) -> Result<(), LedgerError> {
        let to = rotate::rotated_path(self.file.path(), chrono::Utc::now())?;
        let Some(rotated) = self.file.rotate(&to)? else {
            return Ok(());
        };
        self.metrics.file_rotations.inc();
        self.metrics
            .file_bytes
            .set(i64::try_from(self.file.len()).unwrap_or(i64::MAX));
        tracing::info!(file = %to.display(), bytes = rotated.bytes, "ledger file rotated");
        if self.fsync {
            // What the decision path appended since the last round is not synced yet; the
            // compression fsyncs its output, but a power loss before it must not lose rows.
            let synced = rotated
                .file
                .sync_data()
                .map_err(|error| LedgerError::File {
                    path: to.clone(),
                    error,
                })
                .and_then(|()| Ok(rotate::sync_dir(&to)?));
            if let Err(e) = synced {
                self.metrics.errors.with_label_values(&["rotate"]).inc();
                tracing::error!(error = %e, "syncing the rotated ledger file failed");
            }
        }
        drop(rotated.file);
        self.rotator.compress(to, Some(self.tuning.file_keep()));
        Ok(())
    }

    fn append_queued(&mut self) {
        loop {
            let mut batch = Vec::new();
            while batch.len() < self.tuning.batch_rows() {
                match self.rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let n = batch.len();
            if n == 0 {
                return;
            }
            self.metrics.queue_depth.sub(n as i64);
            let started = Instant::now();
            let (ship, metrics) = (&self.ship, &self.metrics);
            // The fsync follows once for the whole tick.
            let appended = self.file.append(batch, |rows| {
                if let Some(ship) = ship {
                    for row in rows {
                        forward(ship, metrics, row);
                    }
                }
            });
            match appended {
                Ok(()) => {
                    if self.ship.is_none() {
                        self.metrics.written.inc_by(n as u64);
                        self.metrics
                            .batch_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    self.metrics.errors.with_label_values(&["spill"]).inc();
                    self.metrics.dropped.inc_by(n as u64);
                    tracing::error!(error = %e, rows = n, "ledger file write failed: rows lost");
                }
            }
            if n < self.tuning.batch_rows() {
                return;
            }
        }
    }
}

/// Writes what is in the file to PostgreSQL, in file order: batches straight from memory when
/// the first row handed over is where PostgreSQL's part of the file ends, else chunks read
/// back from the file (a backlog after an outage or a restart, or rows the queue had no room
/// for).
struct Shipper {
    rx: mpsc::Receiver<Logged>,
    stop: tokio::sync::oneshot::Receiver<()>,
    sink: postgres::PgSink,
    file: Arc<LedgerFile>,
    quarantine: Quarantine,
    /// Everything in the file before this logical position is in PostgreSQL.
    committed: u64,
    metrics: LedgerMetrics,
    tuning: Arc<Tuning>,
    /// PostgreSQL is not tried again (for writes or replay) before this.
    next_try: Instant,
    next_maintenance: Instant,
    /// The reservation expiry job's next run.
    next_expiry: Instant,
    /// When the last run that finished everything due began (it wrote fewer rows than its
    /// limit): the next runs need look back only a little before it.
    expiry_done_at: Option<Instant>,
    /// The next run over the whole lookback.
    next_expiry_sweep: Instant,
}

impl Shipper {
    async fn run(mut self) {
        let mut stopping = false;
        while !stopping {
            let (end, batch) = self.collect(&mut stopping).await;
            self.ship(end, batch).await;
            self.maintain().await;
            self.expire_reservations().await;
        }
        // The appender has stopped: whatever is left (handed over or only in the file) is
        // written now, as far as PostgreSQL answers, so a clean shutdown leaves as little
        // backlog as it can.
        loop {
            let end = self.file.end();
            let mut batch = Vec::new();
            self.drain_into(&mut batch, self.tuning.batch_rows());
            if self.committed >= end || Instant::now() < self.next_try {
                break;
            }
            self.ship(end, batch).await;
        }
    }

    /// The end of the file, then the rows handed over: up to `batch_rows` of them; with fewer,
    /// and nothing to replay, it sleeps `flush` first (no wake-up per row).
    async fn collect(&mut self, stopping: &mut bool) -> (u64, Vec<Logged>) {
        let mut batch = Vec::new();
        // The end before draining: every row before it was handed over (or found no room)
        // before it, as rows are handed over under the file's lock.
        let mut end = self.file.end();
        self.drain_into(&mut batch, self.tuning.batch_rows());
        let behind = end > self.committed
            && batch.first().is_none_or(|r| r.start > self.committed)
            && Instant::now() >= self.next_try;
        if batch.len() < self.tuning.batch_rows() && !behind {
            tokio::select! {
                _ = &mut self.stop => *stopping = true,
                () = tokio::time::sleep(self.tuning.flush()) => {}
            }
            end = self.file.end();
            self.drain_into(&mut batch, self.tuning.batch_rows());
        }
        (end, batch)
    }

    fn drain_into(&mut self, batch: &mut Vec<Logged>, max: usize) {
        let before = batch.len();
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        self.metrics.queue_depth.sub((batch.len() - before) as i64);
    }

    /// One step: a batch straight from memory, or a chunk of the file.
    async fn ship(&mut self, end: u64, mut batch: Vec<Logged>) {
        // Rows already replayed from the file (while they waited here) are done.
        let before = batch.len();
        batch.retain(|r| r.end > self.committed);
        self.set_aside(before - batch.len());
        if Instant::now() < self.next_try {
            // PostgreSQL failed recently: the rows wait in the file.
            self.set_aside(batch.len());
        } else if batch.first().is_some_and(|r| r.start == self.committed) {
            let contiguous = 1 + batch
                .windows(2)
                .take_while(|w| w[0].end == w[1].start)
                .count();
            // After a gap (rows the queue had no room for) the rest is replayed from the file.
            let rest = batch.split_off(contiguous);
            self.set_aside(rest.len());
            self.direct(batch).await;
        } else {
            self.set_aside(batch.len());
            if end > self.committed {
                self.replay_chunk().await;
            }
        }
        self.set_backlog();
    }

    fn set_backlog(&self) {
        self.metrics
            .backlog_bytes
            .set(i64::try_from(self.file.end().saturating_sub(self.committed)).unwrap_or(i64::MAX));
    }

    /// Rows dropped from memory that reach PostgreSQL by replay of the file instead.
    fn set_aside(&self, rows: usize) {
        self.metrics.spilled.inc_by(rows as u64);
    }

    /// A failed write: the rows wait in the file; PostgreSQL is left alone for `retry`.
    fn failed(&mut self, rows: usize) {
        self.set_aside(rows);
        self.next_try = Instant::now() + self.tuning.retry();
    }

    async fn direct(&mut self, batch: Vec<Logged>) {
        let Some(end) = batch.last().map(|r| r.end) else {
            return;
        };
        let entries: Vec<Entry> = batch.into_iter().map(|r| r.entry).collect();
        let n = entries.len();
        let started = Instant::now();
        match tokio::time::timeout(self.tuning.write_timeout(), self.sink.write(&entries)).await {
            Ok(Ok(())) => {
                // Recorded before counted: whoever sees the count sees the file caught up.
                self.commit(end);
                self.metrics.written.inc_by(n as u64);
                self.metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Ok(Err(e)) if e.is_data_error() => {
                self.metrics.errors.with_label_values(&["write"]).inc();
                tracing::warn!(error = %e, rows = n, "PostgreSQL refused rows of a batch for their data: isolating them");
                // Idempotent: parts of the batch may be committed (parallel COPYs).
                match self
                    .sink
                    .write_isolating(&entries, self.tuning.write_timeout())
                    .await
                {
                    Ok(refused) => {
                        if self.quarantine(&refused) {
                            self.commit(end);
                            self.metrics.written.inc_by((n - refused.len()) as u64);
                        } else {
                            self.failed(n);
                        }
                    }
                    Err(e) => {
                        self.metrics.errors.with_label_values(&["write"]).inc();
                        tracing::warn!(error = %e, rows = n, "ledger write failed: the rows wait in the spill file");
                        self.failed(n);
                    }
                }
            }
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&["write"]).inc();
                tracing::warn!(error = %e, rows = n, "ledger write failed: the rows wait in the spill file");
                self.failed(n);
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&["write"]).inc();
                tracing::warn!(
                    rows = n,
                    "ledger write timed out: the rows wait in the spill file"
                );
                self.failed(n);
            }
        }
    }

    /// Replays one chunk of the file from the committed position.
    async fn replay_chunk(&mut self) {
        let chunk = match self.file.read_chunk(self.committed, REPLAY_CHUNK) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.errors.with_label_values(&["replay"]).inc();
                tracing::error!(error = %e, "reading the spill file failed");
                self.next_try = Instant::now() + self.tuning.retry();
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
        if chunk.next_offset <= self.committed {
            // Nothing complete to read: cannot happen (appends are whole lines); do not spin.
            self.next_try = Instant::now() + self.tuning.retry();
            return;
        }
        if chunk.entries.is_empty() {
            self.commit(chunk.next_offset);
            return;
        }
        match self
            .sink
            .write_isolating(&chunk.entries, self.tuning.write_timeout())
            .await
        {
            Ok(refused) => {
                if self.quarantine(&refused) {
                    self.commit(chunk.next_offset);
                    self.metrics
                        .replayed
                        .inc_by((chunk.entries.len() - refused.len()) as u64);
                } else {
                    self.next_try = Instant::now() + self.tuning.retry();
                }
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&["replay"]).inc();
                tracing::warn!(error = %e, "replaying the spill file failed; will retry");
                self.next_try = Instant::now() + self.tuning.retry();
            }
        }
    }

    /// Moves refused rows to the quarantine file; `false` when that failed (then the rows
    /// are not dealt with, and their part of the file is written again later).
    fn quarantine(&mut self, refused: &[Refused]) -> bool {
        if refused.is_empty() {
            return true;
        }
        match self.quarantine.append(refused) {
            Ok(()) => {
                self.metrics.quarantined.inc_by(refused.len() as u64);
                tracing::error!(
                    rows = refused.len(),
                    first_id = %entry_id(&refused[0].entry),
                    sqlstate = %refused[0].sqlstate,
                    error = %refused[0].error,
                    file = %self.quarantine.path().display(),
                    "PostgreSQL refused audit rows for their data: quarantined"
                );
                true
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&["quarantine"]).inc();
                tracing::error!(error = %e, rows = refused.len(), "writing the quarantine file failed; will retry");
                false
            }
        }
    }

    /// Everything before `upto` is in PostgreSQL.
    fn commit(&mut self, upto: u64) {
        self.committed = upto;
        if let Err(e) = self.file.commit(upto) {
            // The rows are in PostgreSQL; replaying them again after a restart is harmless.
            tracing::warn!(error = %e, "recording replay progress failed");
        }
        self.set_backlog();
    }

    async fn maintain(&mut self) {
        if Instant::now() < self.next_maintenance || Instant::now() < self.next_try {
            return;
        }
        let pool = self.sink.pool();
        let work = async {
            postgres::ensure_partitions(pool, self.tuning.partitions_ahead()).await?;
            postgres::apply_retention(pool, self.tuning.retention_months()).await
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
                self.next_maintenance = Instant::now() + self.tuning.retry() * 10;
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&["maintain"]).inc();
                self.next_maintenance = Instant::now() + self.tuning.retry() * 10;
            }
        }
    }
}

impl Shipper {
    /// The reservation expiry job: once per `expiry_interval_ms`, one idempotent statement
    /// inserts the `reservation_expiry` rows of reservations past their `settle_by` (and the
    /// grace) with no settle or refund ([`postgres::expire_reservations`]). It runs only when
    /// this daemon's own rows are all in PostgreSQL (a settle of ours still in the spill file
    /// would otherwise look missing) and PostgreSQL is not failing; a failed or timed-out run
    /// is retried at the next interval, and what it did commit is not written again.
    async fn expire_reservations(&mut self) {
        let Some(interval) = self.tuning.expiry_interval() else {
            return;
        };
        let now = Instant::now();
        if now < self.next_expiry || now < self.next_try || self.committed < self.file.end() {
            return;
        }
        self.next_expiry = now + interval;
        let mut window = self.tuning.expiry();
        // Most runs look back only to a little before the last run that finished everything
        // due (what was due then was looked at then); once per EXPIRY_SWEEP_EVERY, and until a
        // run finishes, a run looks back the whole lookback, for the rows that reached
        // PostgreSQL later than EXPIRY_SLACK (another daemon's spill file after an outage).
        let sweep = now >= self.next_expiry_sweep;
        if !sweep && let Some(done) = self.expiry_done_at {
            let since = now.duration_since(done) + window.grace + EXPIRY_SLACK;
            window.lookback = window.lookback.min(since);
        }
        let run = postgres::expire_reservations(self.sink.pool(), &window);
        match tokio::time::timeout(
            self.tuning.write_timeout().max(Duration::from_secs(30)),
            run,
        )
        .await
        {
            Ok(Ok(n)) => {
                self.metrics.reservation_expiries.inc_by(n);
                if n < u64::from(window.limit) {
                    self.expiry_done_at = Some(now);
                    if sweep {
                        self.next_expiry_sweep = now + EXPIRY_SWEEP_EVERY;
                    }
                }
                if n > 0 {
                    tracing::debug!(rows = n, "reservation expiry rows written");
                }
            }
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&["expire"]).inc();
                tracing::warn!(error = %e, "reservation expiry job failed; will retry");
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&["expire"]).inc();
                tracing::warn!("reservation expiry job timed out; will retry");
            }
        }
    }
}

/// An entry's id (for logs: never a key, an endpoint or other row content).
fn entry_id(e: &Entry) -> Uuid {
    match e {
        Entry::Decision(r) => r.id,
        Entry::Kernel(k) => k.id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    #[test]
    fn expiry_settings_out_of_range_are_refused_by_name() {
        for (text, field) in [
            ("expiry_lookback_secs = 0", "ledger.expiry_lookback_secs"),
            (
                "expiry_lookback_secs = 99999999",
                "ledger.expiry_lookback_secs",
            ),
            ("expiry_batch = 0", "ledger.expiry_batch"),
            ("expiry_batch = 2000000", "ledger.expiry_batch"),
        ] {
            let Err(ConfigError::Invalid(errors)) = Config::parse(&format!("[ledger]\n{text}\n"))
            else {
                panic!("{text} should be invalid");
            };
            assert!(errors.iter().any(|e| e.path == field), "{text}: {errors:?}");
        }
        let ok = Config::parse("[ledger]\nexpiry_interval_ms = 0\nexpiry_grace_ms = 0\n")
            .expect("0 turns the job off, and no grace is allowed");
        assert!(Tuning::new(&ok.ledger).expiry_interval().is_none());
        let window = Tuning::new(&Config::default().ledger).expiry();
        assert_eq!(
            (window.grace, window.lookback, window.limit),
            (
                Duration::from_secs(60),
                Duration::from_secs(7 * 86_400),
                10_000
            )
        );
    }

    #[test]
    fn rotation_settings_out_of_range_are_refused_by_name() {
        for (text, field) in [
            ("file_max_bytes = 1", "ledger.file_max_bytes"),
            ("file_max_bytes = 1023", "ledger.file_max_bytes"),
            ("file_max_age_secs = 31622401", "ledger.file_max_age_secs"),
            ("file_keep = 0", "ledger.file_keep"),
            ("file_keep = 10001", "ledger.file_keep"),
        ] {
            let Err(ConfigError::Invalid(errors)) = Config::parse(&format!("[ledger]\n{text}\n"))
            else {
                panic!("{text} should be invalid");
            };
            assert!(errors.iter().any(|e| e.path == field), "{text}: {errors:?}");
        }
        let off = Config::parse("[ledger]\nfile_max_bytes = 0\nfile_max_age_secs = 0\n")
            .expect("0 turns rotation by size and by age off");
        let t = Tuning::new(&off.ledger);
        assert_eq!((t.file_max_bytes(), t.file_max_age_us()), (0, 0));
        let d = Tuning::new(&Config::default().ledger);
        assert_eq!(
            (d.file_max_bytes(), d.file_max_age_us(), d.file_keep()),
            (256 << 20, 86_400_000_000, 8)
        );
        Config::parse("[ledger]\nfile_max_bytes = 1024\nfile_keep = 1\n").expect("the smallest");
    }

    /// A decision line as written before `settle_by_us` and the candidate's fields existed.
    fn old_decision_line() -> AuditRow {
        let line = r#"{"t":"decision","id":"0193d0c4-0000-7000-8000-000000000000","at_us":1,"key_hash":"ab","tier":null,"endpoint":"/x","method":"*","units":1.0,"cost":1.0,"multiplier":1.0,"allowed":true,"remaining":null,"decided_by":"redis","denial":null,"request_id":"r","node":"n"}"#;
        let Entry::Decision(row) = serde_json::from_str::<Entry>(line).expect("old line") else {
            panic!("a decision");
        };
        row
    }

    #[test]
    fn settle_by_is_in_the_file_only_for_reservations_and_old_lines_have_none() {
        let mut row = old_decision_line();
        assert_eq!(row.settle_by_us, None);
        let plain = serde_json::to_string(&Entry::Decision(row.clone())).expect("json");
        assert!(!plain.contains("settle_by_us"), "{plain}");
        row.settle_by_us = Some(2_000_001);
        let reserved = serde_json::to_string(&Entry::Decision(row.clone())).expect("json");
        assert!(reserved.contains(r#""settle_by_us":2000001"#), "{reserved}");
        assert_eq!(
            serde_json::from_str::<Entry>(&reserved).expect("back"),
            Entry::Decision(row)
        );
        assert_eq!(RowKind::ReservationExpiry.as_str(), "reservation_expiry");
    }

    #[test]
    fn the_candidates_decision_is_in_the_file_only_when_there_is_one() {
        let mut row = old_decision_line();
        assert_eq!((row.candidate_allowed, row.candidate_cost), (None, None));
        let plain = serde_json::to_string(&Entry::Decision(row.clone())).expect("json");
        assert!(!plain.contains("candidate"), "{plain}");
        (row.candidate_allowed, row.candidate_cost) = (Some(false), Some(1.25));
        let with = serde_json::to_string(&Entry::Decision(row.clone())).expect("json");
        assert!(
            with.contains(r#""candidate_allowed":false,"candidate_cost":1.25"#),
            "{with}"
        );
        assert_eq!(
            serde_json::from_str::<Entry>(&with).expect("back"),
            Entry::Decision(row)
        );
    }
}
