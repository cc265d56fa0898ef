//! The quarantine file: rows PostgreSQL refused for their data, kept aside so that they stop
//! nothing else.
//!
//! A row that PostgreSQL refuses for what it contains (SQLSTATE class 22, data exception, e.g.
//! `22021` for a NUL byte in a text column; class 23, integrity constraint violation, e.g. the
//! `CHECK` on a rollup's count) fails again however often it is sent. Left in a batch, it
//! would fail that batch, and left at the head of the spill file, every replay after it. The
//! writer isolates such rows ([`super::postgres::PgSink::write_isolating`]) and appends them
//! here, next to the ledger file (`ledger.jsonl` → `ledger.quarantine.jsonl`): one JSON line
//! per row, the ledger file's format plus `sqlstate` and `error`, PostgreSQL's code and
//! message. The file is opened at the first refused row, appended to, never truncated.
use super::{Entry, LedgerError};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A row PostgreSQL refused for its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The row, as it was.
    pub entry: Entry,
    /// PostgreSQL's SQLSTATE (`22021`, …).
    pub sqlstate: String,
    /// PostgreSQL's message.
    pub error: String,
}

impl Refused {
    /// `entry`, refused with `error`.
    pub fn new(entry: Entry, error: &LedgerError) -> Self {
        let (sqlstate, error) = match error {
            LedgerError::Postgres(sqlx::Error::Database(e)) => (
                e.code().map(|c| c.into_owned()).unwrap_or_default(),
                e.message().to_owned(),
            ),
            other => (String::new(), other.to_string()),
        };
        Self {
            entry,
            sqlstate,
            error,
        }
    }
}

/// One line of the file: the row's own fields (`"t":"decision"`, …), then why.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    entry: &'a Entry,
    sqlstate: &'a str,
    error: &'a str,
}

/// `ledger.jsonl` → `ledger.quarantine.jsonl` (`ledger` → `ledger.quarantine.jsonl`).
pub fn path_for(ledger_file: &Path) -> PathBuf {
    ledger_file.with_extension("quarantine.jsonl")
}

/// The quarantine file, opened at its first row.
#[derive(Debug)]
pub struct Quarantine {
    path: PathBuf,
    fsync: bool,
    file: Option<File>,
}

impl Quarantine {
    /// The quarantine file at `path`; with `fsync`, each append is synced before it returns.
    pub fn new(path: PathBuf, fsync: bool) -> Self {
        Self {
            path,
            fsync,
            file: None,
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rows` (one write); when it returns `Ok` they are in the file, so the caller
    /// may record that they are dealt with.
    pub fn append(&mut self, rows: &[Refused]) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(rows.len() * 400);
        for r in rows {
            let line = Line {
                entry: &r.entry,
                sqlstate: &r.sqlstate,
                error: &r.error,
            };
            serde_json::to_writer(&mut buf, &line).map_err(|e| LedgerError::File {
                path: self.path.clone(),
                error: std::io::Error::other(e),
            })?;
            buf.push(b'\n');
        }
        let err = |error| LedgerError::File {
            path: self.path.clone(),
            error,
        };
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&self.path)
                    .map_err(err)?,
            ),
        };
        file.write_all(&buf).map_err(err)?;
        if self.fsync {
            file.sync_data().map_err(err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AuditRow, KernelRejections};

    #[test]
    fn a_quarantined_line_is_the_row_in_the_ledger_format_plus_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = path_for(&dir.path().join("spill.jsonl"));
        assert_eq!(path, dir.path().join("spill.quarantine.jsonl"));
        let row = Entry::Decision(AuditRow {
            tier: None,
            endpoint: "/a\u{0}b".into(),
            cost: 2.0,
            allowed: false,
            remaining: None,
            denial: Some("exhausted".into()),
            ..AuditRow::sample(1, "ab".repeat(32))
        });
        let rollup = Entry::Kernel(KernelRejections {
            id: uuid::Uuid::now_v7(),
            minute_us: 60_000_000,
            node: "n".into(),
            key_id: -1,
            reason: "l4".into(),
            count: 0,
        });
        let mut q = Quarantine::new(path.clone(), false);
        q.append(&[]).expect("nothing");
        assert!(!path.exists(), "no file without a refused row");
        let refused = |entry: &Entry, code: &str| Refused {
            entry: entry.clone(),
            sqlstate: code.into(),
            error: "why".into(),
        };
        q.append(&[refused(&row, "22021"), refused(&rollup, "23514")])
            .expect("append");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["t"], "decision");
        assert_eq!(lines[0]["sqlstate"], "22021");
        assert_eq!(lines[0]["error"], "why");
        assert_eq!(lines[1]["t"], "kernel");
        // The ledger file's reader reads it back as the rows themselves.
        let back: Vec<Entry> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("entry"))
            .collect();
        assert_eq!(back, vec![row, rollup]);
    }
}
