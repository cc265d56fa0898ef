//! The shadow comparison report behind `enforcer audit shadow-report`: the shadow candidate
//! policy ([`crate::shadow`]) against the enforced one, from the decision rows that carry a
//! candidate decision (`candidate_allowed IS NOT NULL`) in PostgreSQL.
//!
//! Per tier and endpoint: requests, tokens charged (old: the enforced cost of the requests the
//! enforced policy allowed; new: the candidate cost of those the candidate allowed), denials
//! old vs new, the requests the candidate would newly deny or newly allow, the keys it would
//! newly deny most (top N, by hashed key), and the estimated change in denials per hour. "Old
//! denied" is the enforced policy's verdict (`denial IS NOT NULL`), also when shadow mode let
//! the request through. Rows without a candidate decision (replays, unknown keys, operational
//! endpoints, decisions without the store, every other kind) do not count.
//!
//! The rate per hour divides by the hours the rows actually cover (the first to the last row
//! with a candidate decision in the window), not by the window asked for: a candidate switched
//! on yesterday is not diluted over a week. The report says which span it used.
use super::LedgerError;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::postgres::PgPool;
use std::time::Duration;

/// One end of the report's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// This long before now (PostgreSQL's `now()`).
    Ago(Duration),
    /// A time PostgreSQL reads as `timestamptz`: RFC 3339 with an offset,
    /// `2026-12-01T00:00:00Z`.
    At(String),
}

/// What the report says why its rates are per hour of the rows' span.
pub const RATE_BASIS: &str = "hours from the first to the last row with a candidate decision \
                              in the window";

/// The report. Its JSON (`--format json`) is this, field for field: a stable format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowReport {
    /// Start of the window asked for (UTC, RFC 3339, microseconds).
    pub since: String,
    /// End of the window asked for (excluded).
    pub until: String,
    /// The first row with a candidate decision in the window; `None`: none.
    pub first_row: Option<String>,
    /// The last one.
    pub last_row: Option<String>,
    /// Hours from `first_row` to `last_row`: what the per-hour rates divide by.
    pub hours_covered: f64,
    /// How `hours_covered` is measured ([`RATE_BASIS`]).
    pub rate_basis: &'static str,
    /// Newly denied keys listed per group, at most.
    pub top: u32,
    /// One per tier and endpoint, ordered by tier, then endpoint.
    pub groups: Vec<ShadowGroup>,
    /// All groups together (tier and endpoint `*`), with the top newly denied keys overall.
    pub total: ShadowGroup,
}

/// One tier and endpoint (or the total).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowGroup {
    /// The tier the enforced policy charged.
    pub tier: String,
    /// The endpoint as priced (normal form).
    pub endpoint: String,
    /// Decisions with a candidate decision.
    pub requests: i64,
    /// Tokens the enforced policy charged (the cost of the requests it allowed).
    pub tokens_old: f64,
    /// Tokens the candidate would have charged (the candidate cost of those it allowed).
    pub tokens_new: f64,
    /// Requests the enforced policy denied (or would have: shadow mode).
    pub denials_old: i64,
    /// Requests the candidate would have denied.
    pub denials_new: i64,
    /// Allowed by the enforced policy, denied by the candidate.
    pub newly_denied: i64,
    /// Denied by the enforced policy, allowed by the candidate.
    pub newly_allowed: i64,
    /// `(denials_new − denials_old) / hours_covered`; `None` when the rows cover no time.
    pub denials_per_hour_change: Option<f64>,
    /// The keys with the most newly denied requests, most first (ties by hash), at most `top`.
    pub newly_denied_keys: Vec<NewlyDenied>,
}

/// A key the candidate would newly deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewlyDenied {
    /// SHA-256 of the key, hex (as in the ledger; `enforcer audit usage --key-hash` takes it).
    pub key_hash: String,
    /// Its first 16 hex digits, as the table shows it.
    pub key_prefix: String,
    /// Its newly denied requests.
    pub requests: i64,
}

/// The rows the report reads (a CTE named `r`): decisions with a candidate decision in the
/// window `w`.
const ROWS: &str = "w AS ( \
         SELECT coalesce($1::timestamptz, now() - make_interval(secs => $2)) AS lo, \
                coalesce($3::timestamptz, now() - make_interval(secs => $4)) AS hi), \
     r AS ( \
         SELECT coalesce(t.tier, '') AS tier, t.endpoint, t.key_hash, t.recorded_at, t.cost, \
                t.candidate_cost, t.denial IS NULL AS old_ok, t.candidate_allowed AS new_ok \
         FROM token_transactions t, w \
         WHERE t.kind = 'debit' AND t.candidate_allowed IS NOT NULL \
               AND t.recorded_at >= w.lo AND t.recorded_at < w.hi)";

/// A UTC instant as RFC 3339 with microseconds (SQL, of the column or expression `$x`).
fn utc(expr: &str) -> String {
    format!("to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// The report over `[since, until)` (`until` `None`: now), with at most `top` newly denied
/// keys per group. One snapshot: every number is of the same rows.
pub async fn report(
    pool: &PgPool,
    since: &Bound,
    until: Option<&Bound>,
    top: u32,
) -> Result<ShadowReport, LedgerError> {
    let until = until.cloned().unwrap_or(Bound::Ago(Duration::ZERO));
    let (since_at, since_ago) = bind(since);
    let (until_at, until_ago) = bind(&until);
    let mut tx = pool.begin().await?;
    // One snapshot, and one now() for the window, across the three queries.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    macro_rules! query {
        ($sql:expr) => {
            sqlx::query($sql)
                .bind(since_at.as_deref())
                .bind(since_ago)
                .bind(until_at.as_deref())
                .bind(until_ago)
        };
    }
    let window = query!(&format!(
        "WITH {ROWS} SELECT {}, {}, {}, {}, \
                coalesce(extract(epoch FROM max(r.recorded_at) - min(r.recorded_at)), 0)::float8 \
         FROM w LEFT JOIN r ON true GROUP BY w.lo, w.hi",
        utc("w.lo"),
        utc("w.hi"),
        utc("min(r.recorded_at)"),
        utc("max(r.recorded_at)"),
    ))
    .fetch_one(&mut *tx)
    .await?;
    let since: String = window.try_get(0)?;
    let until: String = window.try_get(1)?;
    let first_row: Option<String> = window.try_get(2)?;
    let last_row: Option<String> = window.try_get(3)?;
    let hours_covered = window.try_get::<f64, _>(4)? / 3600.0;
    let rate =
        |old: i64, new: i64| (hours_covered > 0.0).then(|| (new - old) as f64 / hours_covered);

    let lines = query!(&format!(
        "WITH {ROWS} \
         SELECT tier, endpoint, GROUPING(tier, endpoint)::int4, count(*)::int8, \
                coalesce(sum(cost) FILTER (WHERE old_ok), 0)::float8, \
                coalesce(sum(candidate_cost) FILTER (WHERE new_ok), 0)::float8, \
                count(*) FILTER (WHERE NOT old_ok)::int8, \
                count(*) FILTER (WHERE NOT new_ok)::int8, \
                count(*) FILTER (WHERE old_ok AND NOT new_ok)::int8, \
                count(*) FILTER (WHERE new_ok AND NOT old_ok)::int8 \
         FROM r GROUP BY GROUPING SETS ((tier, endpoint), ()) \
         ORDER BY 3, 1, 2"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut groups = Vec::new();
    let mut total = None;
    for line in &lines {
        let is_total = line.try_get::<i32, _>(2)? != 0;
        let (denials_old, denials_new) = (line.try_get(6)?, line.try_get(7)?);
        let group = ShadowGroup {
            tier: if is_total {
                "*".into()
            } else {
                line.try_get(0)?
            },
            endpoint: if is_total {
                "*".into()
            } else {
                line.try_get(1)?
            },
            requests: line.try_get(3)?,
            tokens_old: line.try_get(4)?,
            tokens_new: line.try_get(5)?,
            denials_old,
            denials_new,
            newly_denied: line.try_get(8)?,
            newly_allowed: line.try_get(9)?,
            denials_per_hour_change: rate(denials_old, denials_new),
            newly_denied_keys: Vec::new(),
        };
        if is_total {
            total = Some(group);
        } else {
            groups.push(group);
        }
    }

    // The keys: per group and overall, most newly denied requests first, ties by hash.
    let keys = query!(&format!(
        "WITH {ROWS}, k AS ( \
             SELECT tier, endpoint, key_hash, GROUPING(tier, endpoint)::int4 AS g, \
                    count(*)::int8 AS n \
             FROM r WHERE old_ok AND NOT new_ok \
             GROUP BY GROUPING SETS ((tier, endpoint, key_hash), (key_hash))) \
         SELECT tier, endpoint, key_hash, g, n FROM ( \
             SELECT k.*, row_number() OVER ( \
                 PARTITION BY g, tier, endpoint ORDER BY n DESC, key_hash) AS rank \
             FROM k) ranked \
         WHERE rank <= $5 ORDER BY g, tier, endpoint, n DESC, key_hash"
    ))
    .bind(i64::from(top))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut total = total.unwrap_or_else(|| ShadowGroup {
        tier: "*".into(),
        endpoint: "*".into(),
        requests: 0,
        tokens_old: 0.0,
        tokens_new: 0.0,
        denials_old: 0,
        denials_new: 0,
        newly_denied: 0,
        newly_allowed: 0,
        denials_per_hour_change: rate(0, 0),
        newly_denied_keys: Vec::new(),
    });
    for k in &keys {
        let key_hash: String = k.try_get(2)?;
        let key = NewlyDenied {
            key_prefix: key_hash.get(..16).unwrap_or(&key_hash).to_owned(),
            key_hash,
            requests: k.try_get(4)?,
        };
        if k.try_get::<i32, _>(3)? != 0 {
            total.newly_denied_keys.push(key);
            continue;
        }
        let (tier, endpoint): (String, String) = (k.try_get(0)?, k.try_get(1)?);
        if let Some(g) = groups
            .iter_mut()
            .find(|g| g.tier == tier && g.endpoint == endpoint)
        {
            g.newly_denied_keys.push(key);
        }
    }
    Ok(ShadowReport {
        since,
        until,
        first_row,
        last_row,
        hours_covered,
        rate_basis: RATE_BASIS,
        top,
        groups,
        total,
    })
}

/// A bound as the two parameters of [`ROWS`]: a time, or seconds ago.
fn bind(b: &Bound) -> (Option<String>, f64) {
    match b {
        Bound::At(t) => (Some(t.clone()), 0.0),
        Bound::Ago(d) => (None, d.as_secs_f64()),
    }
}
