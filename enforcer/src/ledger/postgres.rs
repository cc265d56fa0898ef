//! The PostgreSQL side of the ledger: migrations, binary `COPY` batches, idempotent replay,
//! isolation of the rows PostgreSQL refuses for their data, monthly partitions and retention,
//! and the queries behind `enforcer audit import|usage|export`.
//!
//! Times are `timestamptz`, written as UTC instants; partition bounds are UTC month starts
//! (`'2026-12-01 00:00:00+00'`), so neither the server's nor the client's time zone matters.
use super::quarantine::{Quarantine, Refused};
use super::{AuditRow, Entry, KernelRejections, LedgerError};
use bytes::{BufMut as _, BytesMut};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row as _};
use std::net::IpAddr;
use std::time::Duration;

/// The embedded migrations (`migrations/` at the workspace root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The columns of a binary `COPY` of audit rows ([`encode_rows`]), in order.
pub const COLUMNS: &str = "id, recorded_at, key_hash, key_prefix, tier, endpoint, method, units, \
                       cost, multiplier, allowed, remaining, decided_by, denial, request_id, node, \
                       kind, client_ip, note, operator, true_cost, settle_by, \
                       candidate_allowed, candidate_cost";

/// The indexed `key_prefix` of a key hash: its first 8 bytes as a signed 64-bit integer
/// (0 for a hash that is not hex, which validation never lets through).
pub fn key_prefix(key_hash: &str) -> i64 {
    key_hash
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .map_or(0, |v| v as i64)
}

/// A small lazily connecting pool: the writer's parallel `COPY`s and one more connection for
/// maintenance.
pub fn pool(url: &str) -> Result<PgPool, LedgerError> {
    Ok(PgPoolOptions::new()
        .max_connections(MAX_PARALLEL as u32 + 1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)?)
}

/// Applies the migrations that are not applied yet.
pub async fn migrate(pool: &PgPool) -> Result<(), LedgerError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Most `COPY`s a batch is split into.
pub const MAX_PARALLEL: usize = 8;
/// Smallest part worth its own connection.
const MIN_PART: usize = 1000;

/// Writes batches to PostgreSQL.
#[derive(Debug)]
pub struct PgSink {
    pool: PgPool,
    parallel: usize,
}

impl PgSink {
    /// A sink over `pool` writing a batch as one `COPY`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, parallel: 1 }
    }

    /// Splits large batches into up to `parallel` concurrent `COPY`s, each on its own
    /// connection and in its own transaction: one PostgreSQL backend runs one `COPY` on one
    /// core, so this is how the writer uses more than one.
    pub fn with_parallel(mut self, parallel: usize) -> Self {
        self.parallel = parallel.clamp(1, MAX_PARALLEL);
        self
    }

    /// The pool (maintenance, queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes new rows: binary `COPY` into `token_transactions` (and the rollups). A failure
    /// may leave some parts written: the caller spills the whole batch, and the idempotent
    /// replay skips what is there.
    pub async fn write(&mut self, batch: &[Entry]) -> Result<(), LedgerError> {
        let parts = self.parallel.min(batch.len() / MIN_PART).max(1);
        if parts == 1 {
            return copy(&self.pool, batch, false).await.map(drop);
        }
        let size = batch.len().div_ceil(parts);
        let results = futures_util::future::join_all(
            batch.chunks(size).map(|part| copy(&self.pool, part, false)),
        )
        .await;
        results.into_iter().try_for_each(|r| r.map(drop))
    }

    /// Writes rows that may be there already (a replay after a crash, an import): `COPY` into
    /// a temporary staging table, then `INSERT … ON CONFLICT DO NOTHING`.
    pub async fn write_idempotent(&mut self, batch: &[Entry]) -> Result<(), LedgerError> {
        copy(&self.pool, batch, true).await.map(drop)
    }

    /// Writes `batch` idempotently and returns the rows PostgreSQL refused for their data
    /// ([`LedgerError::is_data_error`]); every other row is committed. One refused row fails
    /// the whole transaction, so a batch that fails that way is split in halves, each written
    /// on its own, down to the single rows that fail (about 2·log2(n) `COPY`s for one bad row
    /// among n). Any other failure (connection, server going away, each attempt slower than
    /// `timeout`) is an error: then which parts committed is not known, and the caller writes
    /// the whole batch again later, which the idempotent insert makes harmless.
    pub async fn write_isolating(
        &mut self,
        batch: &[Entry],
        timeout: Duration,
    ) -> Result<Vec<Refused>, LedgerError> {
        Ok(self.write_isolating_counted(batch, timeout).await?.refused)
    }

    /// [`Self::write_isolating`], also counting the rows PostgreSQL inserted (those not there
    /// already), from the committed transactions' own counts.
    pub async fn write_isolating_counted(
        &mut self,
        batch: &[Entry],
        timeout: Duration,
    ) -> Result<Isolated, LedgerError> {
        let mut refused = Vec::new();
        let mut inserted = 0;
        // Depth first, left half first: refused rows come back in batch order.
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match tokio::time::timeout(timeout, copy(&self.pool, part, true)).await {
                Err(_) => return Err(LedgerError::Timeout),
                // Committed: its count stands (a rolled-back attempt's never did).
                Ok(Ok(n)) => inserted += n,
                Ok(Err(e)) if e.is_data_error() => {
                    if let [entry] = part {
                        refused.push(Refused::new(entry.clone(), &e));
                    } else {
                        let (left, right) = part.split_at(part.len() / 2);
                        parts.push(right);
                        parts.push(left);
                    }
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(Isolated { refused, inserted })
    }
}

/// What [`PgSink::write_isolating_counted`] did.
#[derive(Debug, Default)]
pub struct Isolated {
    /// The rows PostgreSQL refused for their data.
    pub refused: Vec<Refused>,
    /// Rows and rollups inserted; the others were there already (or refused).
    pub inserted: u64,
}

/// One `COPY` of `batch` in one transaction; returns the rows (and rollups) inserted, as
/// PostgreSQL counted them: with `idempotent`, those that were not there already.
async fn copy(pool: &PgPool, batch: &[Entry], idempotent: bool) -> Result<u64, LedgerError> {
    let (rows, kernel) = split(batch);
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut inserted = 0;
    if !rows.is_empty() {
        let data = encode_rows(&rows);
        if idempotent {
            sqlx::query(
                "CREATE TEMP TABLE IF NOT EXISTS ledger_stage \
                     (LIKE token_transactions) ON COMMIT DELETE ROWS",
            )
            .execute(&mut *tx)
            .await?;
            copy_in(&mut tx, "ledger_stage", data).await?;
            inserted += sqlx::query(
                "INSERT INTO token_transactions SELECT * FROM ledger_stage \
                     ON CONFLICT DO NOTHING",
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
        } else {
            inserted += copy_in(&mut tx, "token_transactions", data).await?;
        }
    }
    if !kernel.is_empty() {
        inserted += insert_kernel(&mut tx, &kernel).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Returns the rows copied.
async fn copy_in(
    conn: &mut sqlx::PgConnection,
    table: &str,
    data: BytesMut,
) -> Result<u64, LedgerError> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(data).await?;
    Ok(copy.finish().await?)
}

fn split(batch: &[Entry]) -> (Vec<&AuditRow>, Vec<&KernelRejections>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut kernel = Vec::new();
    for e in batch {
        match e {
            Entry::Decision(r) => rows.push(r),
            Entry::Kernel(k) => kernel.push(k),
        }
    }
    (rows, kernel)
}

/// Rollups are few (one per rejected key and reason per minute): a plain idempotent insert.
/// Returns the rollups inserted (not there already).
async fn insert_kernel(
    conn: &mut sqlx::PgConnection,
    kernel: &[&KernelRejections],
) -> Result<u64, LedgerError> {
    let ids: Vec<uuid::Uuid> = kernel.iter().map(|k| k.id).collect();
    let minutes: Vec<i64> = kernel.iter().map(|k| k.minute_us).collect();
    let nodes: Vec<&str> = kernel.iter().map(|k| k.node.as_str()).collect();
    let key_ids: Vec<i64> = kernel.iter().map(|k| k.key_id).collect();
    let reasons: Vec<&str> = kernel.iter().map(|k| k.reason.as_str()).collect();
    let counts: Vec<i64> = kernel.iter().map(|k| k.count).collect();
    Ok(sqlx::query(
        "INSERT INTO kernel_rejections (id, minute, node, key_id, reason, count) \
         SELECT id, to_timestamp(m / 1e6), n, k, r, c \
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::int8[]) \
              AS u(id, m, n, k, r, c) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&minutes)
    .bind(&nodes)
    .bind(&key_ids)
    .bind(&reasons)
    .bind(&counts)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// The binary `COPY` stream of `rows` (header, tuples, trailer).
pub fn encode_rows(rows: &[&AuditRow]) -> BytesMut {
    let mut b = BytesMut::with_capacity(19 + rows.len() * 260 + 2);
    b.put_slice(b"PGCOPY\n\xff\r\n\0");
    b.put_i32(0); // flags
    b.put_i32(0); // header extension length
    for r in rows {
        b.put_i16(24);
        b.put_i32(16);
        b.put_slice(r.id.as_bytes());
        b.put_i32(8);
        b.put_i64(r.at_us - PG_EPOCH_US);
        text(&mut b, Some(&r.key_hash));
        b.put_i32(8);
        b.put_i64(key_prefix(&r.key_hash));
        text(&mut b, r.tier.as_deref());
        text(&mut b, Some(&r.endpoint));
        text(&mut b, Some(&r.method));
        float(&mut b, Some(r.units));
        float(&mut b, Some(r.cost));
        float(&mut b, Some(r.multiplier));
        b.put_i32(1);
        b.put_u8(u8::from(r.allowed));
        float(&mut b, r.remaining);
        text(&mut b, Some(&r.decided_by));
        text(&mut b, r.denial.as_deref());
        text(&mut b, r.request_id.as_deref());
        text(&mut b, Some(&r.node));
        text(&mut b, Some(r.kind.as_str()));
        inet(&mut b, r.client_ip);
        text(&mut b, r.note.as_deref());
        text(&mut b, r.operator.as_deref());
        float(&mut b, r.true_cost);
        match r.settle_by_us {
            Some(us) => {
                b.put_i32(8);
                b.put_i64(us - PG_EPOCH_US);
            }
            None => b.put_i32(-1),
        }
        match r.candidate_allowed {
            Some(allowed) => {
                b.put_i32(1);
                b.put_u8(u8::from(allowed));
            }
            None => b.put_i32(-1),
        }
        float(&mut b, r.candidate_cost);
    }
    b.put_i16(-1);
    b
}

fn text(b: &mut BytesMut, v: Option<&str>) {
    match v {
        // Text fields are bounded by validation (paths, ids) far below 2 GiB.
        Some(s) => {
            b.put_i32(i32::try_from(s.len()).unwrap_or(i32::MAX));
            b.put_slice(s.as_bytes());
        }
        None => b.put_i32(-1),
    }
}

/// An `inet` in PostgreSQL's binary form: family (2 for IPv4, 3 for IPv6: its own numbers,
/// not the platform's `AF_*`), prefix bits, "is cidr" (0), address length, address bytes.
fn inet(b: &mut BytesMut, v: Option<IpAddr>) {
    match v {
        Some(IpAddr::V4(a)) => {
            b.put_i32(8);
            b.put_slice(&[2, 32, 0, 4]);
            b.put_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            b.put_i32(20);
            b.put_slice(&[3, 128, 0, 16]);
            b.put_slice(&a.octets());
        }
        None => b.put_i32(-1),
    }
}

fn float(b: &mut BytesMut, v: Option<f64>) {
    match v {
        Some(f) => {
            b.put_i32(8);
            b.put_f64(f);
        }
        None => b.put_i32(-1),
    }
}

/// `(year, month)` of a month index (months since year 0).
fn ym(index: i32) -> (i32, i32) {
    (index.div_euclid(12), index.rem_euclid(12) + 1)
}

/// `'YYYY-MM-01 00:00:00+00'`.
fn month_start(index: i32) -> String {
    let (y, m) = ym(index);
    format!("{y:04}-{m:02}-01 00:00:00+00")
}

/// `token_transactions_pYYYYMM`.
fn partition_name(index: i32) -> String {
    let (y, m) = ym(index);
    format!("token_transactions_p{y:04}{m:02}")
}

/// The month index of now (UTC), as PostgreSQL sees it.
async fn current_month(pool: &PgPool) -> Result<i32, LedgerError> {
    let row = sqlx::query(
        "SELECT (extract(year FROM now() AT TIME ZONE 'UTC') * 12 \
                + extract(month FROM now() AT TIME ZONE 'UTC') - 1)::int4",
    )
    .fetch_one(pool)
    .await?;
    Ok(row.try_get(0)?)
}

/// Creates the partitions of last month, this month and `ahead` months, and of every month
/// that has rows in the default partition (moving those rows in). Returns the ones created.
pub async fn ensure_partitions(pool: &PgPool, ahead: u32) -> Result<Vec<String>, LedgerError> {
    let now = current_month(pool).await?;
    let mut months: Vec<i32> = ((now - 1)..=(now + ahead as i32)).collect();
    let stray = sqlx::query(
        "SELECT DISTINCT (extract(year FROM recorded_at AT TIME ZONE 'UTC') * 12 \
                + extract(month FROM recorded_at AT TIME ZONE 'UTC') - 1)::int4 \
         FROM token_transactions_default",
    )
    .fetch_all(pool)
    .await?;
    for r in stray {
        months.push(r.try_get(0)?);
    }
    months.sort_unstable();
    months.dedup();
    let mut created = Vec::new();
    for m in months {
        let name = partition_name(m);
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&name)
            .fetch_one(pool)
            .await?;
        if exists.is_some() {
            continue;
        }
        let (lo, hi) = (month_start(m), month_start(m + 1));
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        // Names and bounds are made here from integers, never from input.
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {name} (LIKE token_transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS) \
             WITH (autovacuum_vacuum_insert_scale_factor = 0.02, \
                   autovacuum_vacuum_scale_factor = 0.02, \
                   autovacuum_analyze_scale_factor = 0.01)"
        ))
        .execute(&mut *tx)
        .await?;
        // Rows of this month that landed in the default partition move into the new one;
        // attaching then finds none left behind.
        let moved = sqlx::query(&format!(
            "WITH moved AS (DELETE FROM token_transactions_default \
                            WHERE recorded_at >= '{lo}' AND recorded_at < '{hi}' RETURNING *) \
             INSERT INTO {name} SELECT * FROM moved"
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(&format!(
            "ALTER TABLE token_transactions ATTACH PARTITION {name} \
             FOR VALUES FROM ('{lo}') TO ('{hi}')"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if moved > 0 {
            tracing::info!(partition = %name, rows = moved, "moved rows out of the default partition");
        }
        created.push(name);
    }
    Ok(created)
}

/// Detaches and drops monthly partitions older than `months` before the current month
/// (0: keep everything). Returns the ones dropped.
pub async fn apply_retention(pool: &PgPool, months: u32) -> Result<Vec<String>, LedgerError> {
    if months == 0 {
        return Ok(Vec::new());
    }
    let oldest_kept = current_month(pool).await? - months as i32;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'token_transactions'::regclass",
    )
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for name in names {
        let Some(digits) = name.strip_prefix("token_transactions_p") else {
            continue;
        };
        let (Ok(y), Ok(m)) = (
            digits.get(..4).unwrap_or("").parse::<i32>(),
            digits.get(4..).unwrap_or("").parse::<i32>(),
        ) else {
            continue;
        };
        if y * 12 + m > oldest_kept {
            continue;
        }
        sqlx::query(&format!(
            "ALTER TABLE token_transactions DETACH PARTITION {name}"
        ))
        .execute(pool)
        .await?;
        sqlx::query(&format!("DROP TABLE {name}"))
            .execute(pool)
            .await?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// Decision rows whose cost was really debited: allowed by the budget (not a denial let
/// through in shadow mode), not an idempotent replay (charged once, by the original), not
/// fail-open (the store was not reached), not a debit-back (the tokens of local fail-soft
/// decisions charged to the shared bucket afterwards: those decisions' rows, `decided_by =
/// 'local'`, count them already, by endpoint).
pub const CHARGED: &str = "kind = 'debit' AND allowed AND denial IS NULL \
     AND decided_by NOT IN ('replay', 'fail-open', 'fail-closed', 'debit-back')";

/// One line of `enforcer audit usage`.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// The endpoint or the hour (UTC), depending on the grouping; `total` without one.
    pub group: String,
    /// Decisions.
    pub decisions: i64,
    /// Allowed decisions.
    pub allowed: i64,
    /// Refunds.
    pub refunds: i64,
    /// Tokens charged at the checks (see [`CHARGED`]; a reservation's estimate) less the
    /// tokens refunded.
    pub cost: f64,
    /// Tokens granted by operators (`enforcer keys grant`).
    pub granted: f64,
    /// Tokens charged once settled: `cost` (the estimates charged at the checks, less
    /// refunds) plus what settles charged (`POST /v1/settle`: negative when they credited).
    pub settled: f64,
    /// Of the tokens charged, how many wallet grants paid (`grant_spend` rows).
    pub from_grants: f64,
    /// Tokens wallet grants forfeited when they expired (`grant_expiry` rows).
    pub expired: f64,
    /// Reservations: the charged decisions that waited for a settle (debit rows with a
    /// `settle_by`).
    pub reservations: i64,
    /// Reservations that expired unsettled (`reservation_expiry` rows): their estimates are
    /// in `cost` and `settled` as charged.
    pub reservations_expired: i64,
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageBy {
    /// One line in total.
    Total,
    /// Per endpoint.
    Endpoint,
    /// Per hour (UTC).
    Hour,
}

/// A key's usage since `since` ago.
pub async fn usage(
    pool: &PgPool,
    key_hash: &str,
    since: Duration,
    by: UsageBy,
) -> Result<Vec<Usage>, LedgerError> {
    let group = match by {
        UsageBy::Total => "'total'",
        UsageBy::Endpoint => "endpoint",
        UsageBy::Hour => {
            "to_char(date_trunc('hour', recorded_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:00\"Z\"')"
        }
    };
    // A refund row names the refunded request by its id; per endpoint it counts where that
    // request's debit row is (or under `(refunds)` when the debit is not in the window).
    let rows = sqlx::query(&format!(
        "WITH r AS ( \
             SELECT t.recorded_at, t.kind, t.allowed, t.denial, t.decided_by, t.cost, t.settle_by, \
                    CASE WHEN t.kind IN ('refund', 'settle') THEN coalesce( \
                        (SELECT d.endpoint FROM token_transactions d \
                         WHERE d.key_prefix = $3 AND d.key_hash = $1 AND d.kind = 'debit' \
                               AND d.allowed AND d.request_id = t.request_id \
                               AND d.recorded_at >= now() - make_interval(secs => $2) \
                         ORDER BY d.recorded_at DESC LIMIT 1), \
                        CASE WHEN t.kind = 'refund' THEN '(refunds)' ELSE '(settles)' END) \
                    WHEN t.kind IN ('grant', 'grant_expiry') THEN '(grants)' \
                    ELSE t.endpoint END AS endpoint \
             FROM token_transactions t \
             WHERE t.key_prefix = $3 AND t.key_hash = $1 \
                   AND t.recorded_at >= now() - make_interval(secs => $2)) \
         SELECT {group} AS g, count(*) FILTER (WHERE kind = 'debit')::int8, \
                count(*) FILTER (WHERE kind = 'debit' AND allowed)::int8, \
                count(*) FILTER (WHERE kind = 'refund')::int8, \
                (coalesce(sum(cost) FILTER (WHERE {CHARGED}), 0) \
                 - coalesce(sum(cost) FILTER (WHERE kind = 'refund'), 0))::float8, \
                coalesce(sum(cost) FILTER (WHERE kind = 'grant'), 0)::float8, \
                (coalesce(sum(cost) FILTER (WHERE {CHARGED}), 0) \
                 - coalesce(sum(cost) FILTER (WHERE kind = 'refund'), 0) \
                 + coalesce(sum(cost) FILTER (WHERE kind = 'settle'), 0))::float8, \
                coalesce(sum(cost) FILTER (WHERE kind = 'grant_spend'), 0)::float8, \
                coalesce(sum(cost) FILTER (WHERE kind = 'grant_expiry'), 0)::float8, \
                count(*) FILTER (WHERE {CHARGED} AND settle_by IS NOT NULL)::int8, \
                count(*) FILTER (WHERE kind = 'reservation_expiry')::int8 \
         FROM r GROUP BY 1 ORDER BY 1"
    ))
    .bind(key_hash)
    .bind(since.as_secs_f64())
    .bind(key_prefix(key_hash))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Usage {
                group: r.try_get(0)?,
                decisions: r.try_get(1)?,
                allowed: r.try_get(2)?,
                refunds: r.try_get(3)?,
                cost: r.try_get(4)?,
                granted: r.try_get(5)?,
                settled: r.try_get(6)?,
                from_grants: r.try_get(7)?,
                expired: r.try_get(8)?,
                reservations: r.try_get(9)?,
                reservations_expired: r.try_get(10)?,
            })
        })
        .collect()
}

/// Tokens charged per `(method, endpoint)` (the request path as recorded) between two times
/// (Unix microseconds, `[from, to)`): what `enforcer audit calibrate` compares with measured
/// cost. Charged as in [`usage`]: [`CHARGED`] debits, less refunds, plus settles; a refund or
/// settle counts where its request's debit row is (in the window).
pub async fn charged_by_endpoint(
    pool: &PgPool,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<Charged>, LedgerError> {
    let rows = sqlx::query(&format!(
        "WITH w AS ( \
             SELECT kind, method, endpoint, key_hash, request_id, cost, allowed, denial, \
                    decided_by \
             FROM token_transactions \
             WHERE recorded_at >= to_timestamp($1::float8 / 1e6) \
                   AND recorded_at < to_timestamp($2::float8 / 1e6)), \
         d AS (SELECT method, endpoint, count(*)::int8 AS n, sum(cost)::float8 AS tokens \
               FROM w WHERE {CHARGED} GROUP BY 1, 2), \
         a AS (SELECT d.method, d.endpoint, \
                      sum(CASE WHEN x.kind = 'refund' THEN -x.cost ELSE x.cost END)::float8 \
                          AS tokens \
               FROM w x JOIN ( \
                   SELECT DISTINCT ON (key_hash, request_id) key_hash, request_id, method, \
                          endpoint \
                   FROM w WHERE kind = 'debit' AND allowed AND request_id IS NOT NULL) d \
                   USING (key_hash, request_id) \
               WHERE x.kind IN ('refund', 'settle') GROUP BY 1, 2) \
         SELECT d.method, d.endpoint, d.n, d.tokens + coalesce(a.tokens, 0) \
         FROM d LEFT JOIN a USING (method, endpoint) ORDER BY 2, 1"
    ))
    .bind(from_us as f64)
    .bind(to_us as f64)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Charged {
                method: r.try_get(0)?,
                endpoint: r.try_get(1)?,
                requests: r.try_get(2)?,
                tokens: r.try_get(3)?,
            })
        })
        .collect()
}

/// One line of [`charged_by_endpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct Charged {
    /// The request's method.
    pub method: String,
    /// The request path, as recorded.
    pub endpoint: String,
    /// Charged decisions.
    pub requests: i64,
    /// Tokens charged, net of refunds and settles.
    pub tokens: f64,
}

/// The bounds of one run of the reservation expiry job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryWindow {
    /// Only reservations whose `settle_by` is at least this far past: a settle or refund row
    /// may still be on its way (another daemon's spill file).
    pub grace: Duration,
    /// Reservations whose `settle_by` is further back than this are not looked at.
    pub lookback: Duration,
    /// Most rows one run inserts.
    pub limit: u32,
}

/// The `reservation_expiry` rows of reservations that were neither settled nor refunded by
/// their `settle_by`: one statement, idempotent, so any number of daemons may run it at
/// once, and a run cut short commits all of its rows or none. Returns the rows inserted.
///
/// - A reservation is a `debit` row with a `settle_by` (the daemon writes one only for an
///   allowed reservation the store charged and remembered).
/// - It expired when no `settle` or `refund` row of the same key and request id was recorded
///   from a minute before it to a minute after its `settle_by` (the minute: the clocks of the
///   daemons that wrote the rows may differ a little; a settle after the record expired is
///   refused and writes no row, and one much earlier is an older request's).
/// - The expiry row's id is derived from the reservation row's id (the MD5 of
///   `reservation_expiry/<id>`, as a UUID) and its `recorded_at` is the `settle_by`: the same
///   reservation always gives the same primary key, in the same partition, so a second insert
///   of it, by a second daemon or a repeated run, is a conflict that `ON CONFLICT DO NOTHING`
///   skips; the `NOT EXISTS` on that key keeps the scan from counting done ones against the
///   limit.
/// - `cost`, `units`, `tier`, `endpoint`, `method`, `request_id` and `node` are the
///   reservation's, `note` its row id, `decided_by` `expiry`.
/// - Bounded: reservations whose `settle_by` lies between `lookback` and `grace` ago, oldest
///   first, at most `limit` rows per run (the partial index on `settle_by` finds them).
pub async fn expire_reservations(pool: &PgPool, window: &ExpiryWindow) -> Result<u64, LedgerError> {
    Ok(sqlx::query(&format!(
        "WITH due AS ( \
             SELECT r.* FROM token_transactions r \
             WHERE r.settle_by IS NOT NULL AND r.kind = 'debit' \
                   AND r.settle_by >= now() - make_interval(secs => $1) \
                   AND r.settle_by < now() - make_interval(secs => $2) \
                   AND NOT EXISTS (SELECT 1 FROM token_transactions e \
                       WHERE e.id = {EXPIRY_ID} AND e.recorded_at = r.settle_by) \
                   AND NOT EXISTS (SELECT 1 FROM token_transactions s \
                       WHERE s.key_prefix = r.key_prefix AND s.key_hash = r.key_hash \
                             AND s.kind IN ('settle', 'refund') \
                             AND s.request_id = r.request_id \
                             AND s.recorded_at >= r.recorded_at - interval '1 minute' \
                             AND s.recorded_at <= r.settle_by + interval '1 minute') \
             ORDER BY r.settle_by LIMIT $3) \
         INSERT INTO token_transactions ({COLUMNS}) \
         SELECT {EXPIRY_ID}, r.settle_by, r.key_hash, r.key_prefix, r.tier, r.endpoint, \
                r.method, r.units, r.cost, r.multiplier, true, NULL, 'expiry', NULL, \
                r.request_id, r.node, 'reservation_expiry', NULL, r.id::text, NULL, NULL, NULL, \
                NULL, NULL \
         FROM due r \
         ON CONFLICT DO NOTHING"
    ))
    .bind(window.lookback.as_secs_f64())
    .bind(window.grace.as_secs_f64())
    .bind(i64::from(window.limit))
    .execute(pool)
    .await?
    .rows_affected())
}

/// The id of the expiry row of reservation row `r` (SQL): the same for every run and daemon.
const EXPIRY_ID: &str = "md5('reservation_expiry/' || r.id::text)::uuid";

/// Every row since `since` ago, oldest first, as (column names, text values) with UTC times.
pub async fn export(
    pool: &PgPool,
    since: Duration,
    mut each: impl FnMut(&[Option<String>]) -> std::io::Result<()>,
) -> Result<u64, LedgerError> {
    use futures_util::TryStreamExt as _;
    let mut stream = sqlx::query(
        "SELECT id::text, to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                key_hash, tier, endpoint, method, units::text, cost::text, multiplier::text, \
                allowed::text, remaining::text, decided_by, denial, request_id, node, \
                host(client_ip), kind, note, operator, true_cost::text, \
                to_char(settle_by AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                candidate_allowed::text, candidate_cost::text \
         FROM token_transactions WHERE recorded_at >= now() - make_interval(secs => $1) \
         ORDER BY recorded_at, id",
    )
    .bind(since.as_secs_f64())
    .fetch(pool);
    let mut n = 0;
    while let Some(row) = stream.try_next().await? {
        let values: Vec<Option<String>> = (0..EXPORT_COLUMNS.len())
            .map(|i| row.try_get::<Option<String>, _>(i))
            .collect::<Result<_, _>>()?;
        each(&values).map_err(|source| LedgerError::File {
            path: "<stdout>".into(),
            error: source,
        })?;
        n += 1;
    }
    Ok(n)
}

/// Column names of [`export`]'s values.
pub const EXPORT_COLUMNS: [&str; 23] = [
    "id",
    "recorded_at",
    "key_hash",
    "tier",
    "endpoint",
    "method",
    "units",
    "cost",
    "multiplier",
    "allowed",
    "remaining",
    "decided_by",
    "denial",
    "request_id",
    "node",
    "client_ip",
    "kind",
    "note",
    "operator",
    "true_cost",
    "settle_by",
    "candidate_allowed",
    "candidate_cost",
];

/// What [`import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imported {
    /// Entries read from the file (rows and rollups).
    pub read: u64,
    /// Entries PostgreSQL inserted (its own count: those not there already).
    pub inserted: u64,
    /// Lines that did not parse (skipped).
    pub corrupt: u64,
    /// Entries PostgreSQL refused for their data: written to the quarantine file instead.
    pub quarantined: u64,
}

impl Imported {
    /// Entries read that were in PostgreSQL already (an earlier import, or the daemon's own
    /// writes), or repeated in the file: neither inserted nor refused.
    pub fn already_present(&self) -> u64 {
        self.read.saturating_sub(self.inserted + self.quarantined)
    }
}

/// Loads a ledger file into PostgreSQL, idempotently (importing twice adds nothing). Rows
/// PostgreSQL refuses for their data go to `quarantine`; the others are imported. A gzip file
/// (a rotated ledger file, `….jsonl.gz`; told by its magic bytes, not its name) is read
/// decompressed, whole; a plain one up to the length it had when the import began.
pub async fn import(
    pool: &PgPool,
    path: &std::path::Path,
    quarantine: &mut Quarantine,
) -> Result<Imported, LedgerError> {
    let err = |source| LedgerError::File {
        path: path.to_owned(),
        error: source,
    };
    let mut sink = PgSink::new(pool.clone());
    let mut done = Imported::default();
    if super::rotate::is_gzip(path)? {
        let file = std::fs::File::open(path).map_err(err)?;
        let mut reader = std::io::BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)),
        );
        loop {
            let chunk =
                super::file::read_lines(&mut reader, super::REPLAY_CHUNK, true).map_err(err)?;
            if chunk.next_offset == 0 {
                break;
            }
            import_chunk(&mut sink, chunk, quarantine, &mut done).await?;
        }
        return Ok(done);
    }
    let end = std::fs::metadata(path).map_err(err)?.len();
    let mut offset = 0;
    loop {
        let chunk = super::file::read_from(path, offset, end, super::REPLAY_CHUNK)?;
        if chunk.entries.is_empty() && chunk.next_offset == offset {
            done.corrupt += chunk.corrupt as u64;
            break;
        }
        offset = chunk.next_offset;
        import_chunk(&mut sink, chunk, quarantine, &mut done).await?;
    }
    Ok(done)
}

/// Writes one chunk of an import, idempotently, quarantining what PostgreSQL refuses.
async fn import_chunk(
    sink: &mut PgSink,
    chunk: super::file::Chunk,
    quarantine: &mut Quarantine,
    done: &mut Imported,
) -> Result<(), LedgerError> {
    done.corrupt += chunk.corrupt as u64;
    if !chunk.entries.is_empty() {
        let written = sink
            .write_isolating_counted(&chunk.entries, IMPORT_TIMEOUT)
            .await?;
        quarantine.append(&written.refused)?;
        done.quarantined += written.refused.len() as u64;
        done.inserted += written.inserted;
    }
    done.read += chunk.entries.len() as u64;
    Ok(())
}

/// One `COPY` of an import (a chunk, or a part of one being split).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(300);
