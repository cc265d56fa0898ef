//! `enforcer audit shadow-report`: the shadow candidate policy against the enforced one
//! ([`crate::ledger::shadow`] computes it), as a table for people, CSV for spreadsheets, or
//! JSON for programs (the [`ShadowReport`] as it is: a stable format).
use crate::ledger::shadow::{Bound, ShadowGroup, ShadowReport};
use std::io::Write;

/// `enforcer audit shadow-report`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ShadowReportArgs {
    /// Start: how far back (`7d`, `24h`, `90m`), or an RFC 3339 time with an offset
    /// (`2026-12-01T00:00:00Z`).
    #[arg(long, value_parser = parse_bound, default_value = "7d")]
    pub since: Bound,
    /// End (excluded), as --since; default: now.
    #[arg(long, value_parser = parse_bound)]
    pub until: Option<Bound>,
    /// Newly denied keys listed per tier and endpoint (and overall).
    #[arg(long, default_value_t = 10)]
    pub top: u32,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// PostgreSQL URL.
    #[arg(long, env = "ENFORCER_DATABASE_URL")]
    pub database_url: String,
}

/// Runs `enforcer audit shadow-report`: the report from PostgreSQL, to stdout.
pub async fn run(args: ShadowReportArgs) -> anyhow::Result<()> {
    let pool = super::ledger_pool(&args.database_url)?;
    let report =
        crate::ledger::shadow::report(&pool, &args.since, args.until.as_ref(), args.top).await?;
    render(&report, args.format, &mut std::io::stdout().lock())?;
    Ok(())
}

/// `--format` of `enforcer audit shadow-report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned columns, then the newly denied keys of each line.
    Table,
    /// Comma-separated with a header line; one line per tier and endpoint, then the total.
    Csv,
    /// One JSON object.
    Json,
}

/// `--since` / `--until`: how far back (`7d`, `90m`: see `parse_duration`), or an RFC 3339
/// time with an offset (`2026-12-01T00:00:00Z`, read by PostgreSQL).
pub fn parse_bound(text: &str) -> Result<Bound, String> {
    let looks_like_time = text.len() >= 10
        && text.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && text.as_bytes()[4] == b'-';
    if looks_like_time {
        return Ok(Bound::At(text.to_owned()));
    }
    super::parse_duration(text)
        .map(Bound::Ago)
        .map_err(|e| format!("{e}, or an RFC 3339 time such as 2026-12-01T00:00:00Z"))
}

/// Writes `report` to `out` in `format`.
pub fn render(
    report: &ShadowReport,
    format: ReportFormat,
    out: &mut impl Write,
) -> std::io::Result<()> {
    match format {
        ReportFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, report)?;
            writeln!(out)
        }
        ReportFormat::Csv => csv(report, out),
        ReportFormat::Table => table(report, out),
    }
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 12] = [
    "tier",
    "endpoint",
    "requests",
    "tokens_old",
    "tokens_new",
    "denials_old",
    "denials_new",
    "newly_denied",
    "newly_allowed",
    "denials_per_hour_change",
    "hours_covered",
    "newly_denied_keys",
];

fn csv(report: &ShadowReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    for g in report.groups.iter().chain([&report.total]) {
        // `<key prefix>:<requests>`, space-separated: one field (no comma, no quote).
        let keys: Vec<String> = g
            .newly_denied_keys
            .iter()
            .map(|k| format!("{}:{}", k.key_prefix, k.requests))
            .collect();
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            super::csv_field(&g.tier),
            super::csv_field(&g.endpoint),
            g.requests,
            g.tokens_old,
            g.tokens_new,
            g.denials_old,
            g.denials_new,
            g.newly_denied,
            g.newly_allowed,
            g.denials_per_hour_change
                .map_or_else(String::new, |r| r.to_string()),
            report.hours_covered,
            keys.join(" ")
        )?;
    }
    Ok(())
}

fn table(report: &ShadowReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "shadow candidate vs enforced policy, {} .. {}",
        report.since, report.until
    )?;
    match (&report.first_row, &report.last_row) {
        (Some(first), Some(last)) => writeln!(
            out,
            "rows with a candidate decision: {first} .. {last}: {:.6} h ({:.3} s) covered, what \
             the rates per hour divide by",
            report.hours_covered,
            report.hours_covered * 3600.0
        )?,
        _ => writeln!(out, "no rows with a candidate decision in the window")?,
    }
    writeln!(
        out,
        "{:<12} {:<32} {:>9} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8} {:>12}",
        "tier",
        "endpoint",
        "requests",
        "tokens old",
        "tokens new",
        "denials",
        "denials",
        "newly",
        "newly",
        "Δ denials"
    )?;
    writeln!(
        out,
        "{:<12} {:<32} {:>9} {:>12} {:>12} {:>8} {:>8} {:>8} {:>8} {:>12}",
        "", "", "", "", "", "old", "new", "denied", "allowed", "per hour"
    )?;
    let line = |out: &mut dyn Write, g: &ShadowGroup| {
        writeln!(
            out,
            "{:<12} {:<32} {:>9} {:>12.3} {:>12.3} {:>8} {:>8} {:>8} {:>8} {:>12}",
            g.tier,
            g.endpoint,
            g.requests,
            g.tokens_old,
            g.tokens_new,
            g.denials_old,
            g.denials_new,
            g.newly_denied,
            g.newly_allowed,
            g.denials_per_hour_change
                .map_or_else(|| "-".to_owned(), |r| format!("{r:+.1}"))
        )
    };
    for g in &report.groups {
        line(out, g)?;
    }
    line(out, &report.total)?;
    let with_keys: Vec<&ShadowGroup> = report
        .groups
        .iter()
        .chain([&report.total])
        .filter(|g| !g.newly_denied_keys.is_empty())
        .collect();
    if !with_keys.is_empty() {
        writeln!(
            out,
            "keys the candidate would newly deny (top {}, by hashed key prefix: requests):",
            report.top
        )?;
    }
    for g in with_keys {
        let keys: Vec<String> = g
            .newly_denied_keys
            .iter()
            .map(|k| format!("{} ({})", k.key_prefix, k.requests))
            .collect();
        writeln!(out, "  {} {}: {}", g.tier, g.endpoint, keys.join(", "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::shadow::NewlyDenied;

    #[test]
    fn bounds_are_durations_or_times() {
        assert_eq!(
            parse_bound("7d"),
            Ok(Bound::Ago(std::time::Duration::from_secs(7 * 86_400)))
        );
        assert_eq!(
            parse_bound("2026-12-01T00:00:00Z"),
            Ok(Bound::At("2026-12-01T00:00:00Z".into()))
        );
        assert!(parse_bound("yesterday").is_err());
    }

    #[test]
    fn csv_has_a_line_per_group_and_the_total() {
        let group = |tier: &str, keys: Vec<NewlyDenied>| ShadowGroup {
            tier: tier.into(),
            endpoint: "/a,b".into(),
            requests: 4,
            tokens_old: 30.0,
            tokens_new: 20.5,
            denials_old: 1,
            denials_new: 2,
            newly_denied: 1,
            newly_allowed: 0,
            denials_per_hour_change: Some(3600.0),
            newly_denied_keys: keys,
        };
        let key = NewlyDenied {
            key_hash: "ab".repeat(32),
            key_prefix: "ab".repeat(8),
            requests: 1,
        };
        let report = ShadowReport {
            since: "s".into(),
            until: "u".into(),
            first_row: None,
            last_row: None,
            hours_covered: 0.5,
            rate_basis: crate::ledger::shadow::RATE_BASIS,
            top: 5,
            groups: vec![group("free", vec![key.clone()])],
            total: group("*", vec![key]),
        };
        let mut out = Vec::new();
        render(&report, ReportFormat::Csv, &mut out).expect("csv");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[1],
            "free,\"/a,b\",4,30,20.5,1,2,1,0,3600,0.5,abababababababab:1"
        );
        assert!(lines[2].starts_with("*,"));
    }
}
