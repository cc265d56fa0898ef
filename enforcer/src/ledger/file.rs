//! The local append-only ledger file: JSON lines, one [`Entry`] per line.
//!
//! Without a database it is the ledger; with one it is the spill file. Batches are appended
//! with one `write` and, with `fsync = true` (the default), one `fsync` each, so a crash loses
//! at most the batch being written; a torn last line left by a crash is cut off at the next
//! open. Replay progress is kept in `<file>.offset` (the byte offset up to which the rows are
//! in PostgreSQL); a crash between a replayed chunk's commit and that write replays the chunk
//! again, which the idempotent insert makes harmless. A fully replayed file is truncated.
use super::{Entry, LedgerError};
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// The open file and its replay offset.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    file: File,
    fsync: bool,
    len: u64,
    offset: u64,
}

/// Entries read from the file.
#[derive(Debug)]
pub struct Chunk {
    /// The entries, in file order.
    pub entries: Vec<Entry>,
    /// Offset just past the last line read.
    pub next_offset: u64,
    /// Lines that did not parse (skipped, and reported).
    pub corrupt: usize,
}

impl LedgerFile {
    /// Opens (or creates) `path` for appending; cuts a torn last line.
    pub fn open(path: PathBuf, fsync: bool) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::File {
            path: path.clone(),
            error: source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err)?;
        let len = repair_tail(&mut file).map_err(err)?;
        let offset = std::fs::read_to_string(offset_path(&path))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(len);
        Ok(Self {
            path,
            file,
            fsync,
            len,
            offset,
        })
    }

    /// Appends a batch (one write, then fsync if configured).
    pub fn append(&mut self, batch: &[Entry]) -> Result<(), LedgerError> {
        let mut buf = Vec::with_capacity(batch.len() * 320);
        for e in batch {
            // Serializing plain data into a Vec cannot fail.
            if serde_json::to_writer(&mut buf, e).is_ok() {
                buf.push(b'\n');
            }
        }
        let err = |source| LedgerError::File {
            path: self.path.clone(),
            error: source,
        };
        self.file.write_all(&buf).map_err(err)?;
        if self.fsync {
            self.file.sync_data().map_err(err)?;
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Bytes not yet replayed.
    pub fn backlog(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }

    /// No backlog.
    pub fn is_empty(&self) -> bool {
        self.backlog() == 0
    }

    /// Up to `max` entries from the replay offset.
    pub fn read_chunk(&mut self, max: usize) -> Result<Chunk, LedgerError> {
        let path = self.path.clone();
        read_from(&path, self.offset, self.len, max)
    }

    /// Records that everything before `offset` is in PostgreSQL; truncates the file when that
    /// is all of it.
    pub fn advance(&mut self, offset: u64) -> Result<(), LedgerError> {
        let err = |source| LedgerError::File {
            path: self.path.clone(),
            error: source,
        };
        self.offset = offset.min(self.len);
        if self.offset == self.len {
            self.file.set_len(0).map_err(err)?;
            if self.fsync {
                self.file.sync_all().map_err(err)?;
            }
            self.len = 0;
            self.offset = 0;
        }
        std::fs::write(offset_path(&self.path), self.offset.to_string()).map_err(err)
    }
}

/// `<file>.offset`.
fn offset_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".offset");
    PathBuf::from(p)
}

/// Cuts the file after its last complete line; returns the new length.
fn repair_tail(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Look back for the last '\n' in growing windows.
    let mut window = 4096u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        std::io::Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(bytes = len - keep, "ledger file: cut a torn last line");
                file.set_len(keep)?;
            }
            return Ok(keep);
        }
        if start == 0 {
            tracing::warn!(bytes = len, "ledger file: no complete line; emptied");
            file.set_len(0)?;
            return Ok(0);
        }
        window *= 4;
    }
}

/// Reads up to `max` entries of `path` between `offset` and `end`.
pub fn read_from(path: &Path, offset: u64, end: u64, max: usize) -> Result<Chunk, LedgerError> {
    let err = |source| LedgerError::File {
        path: path.to_owned(),
        error: source,
    };
    let mut f = File::open(path).map_err(err)?;
    f.seek(SeekFrom::Start(offset)).map_err(err)?;
    let mut reader = BufReader::with_capacity(1 << 20, f.take(end.saturating_sub(offset)));
    let mut entries = Vec::new();
    let mut corrupt = 0;
    let mut next_offset = offset;
    let mut line = Vec::new();
    while entries.len() < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(err)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // End, or a line still being written: stop before it.
            break;
        }
        next_offset += n as u64;
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => entries.push(e),
            Err(_) => corrupt += 1,
        }
    }
    Ok(Chunk {
        entries,
        next_offset,
        corrupt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AuditRow, now_us};

    fn row(i: u32) -> Entry {
        Entry::Decision(AuditRow {
            id: uuid::Uuid::now_v7(),
            at_us: now_us(),
            key_hash: format!("{i:064x}"),
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
        })
    }

    #[test]
    fn appends_reads_back_and_truncates_when_replayed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let mut f = LedgerFile::open(path.clone(), true).expect("open");
        let rows: Vec<Entry> = (0..5).map(row).collect();
        f.append(&rows).expect("append");
        let c = f.read_chunk(3).expect("read");
        assert_eq!(c.entries, rows[..3]);
        f.advance(c.next_offset).expect("advance");
        // Reopening keeps the offset.
        drop(f);
        let mut f = LedgerFile::open(path.clone(), true).expect("reopen");
        let c = f.read_chunk(10).expect("read");
        assert_eq!(c.entries, rows[3..]);
        f.advance(c.next_offset).expect("advance");
        assert!(f.is_empty());
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
    }

    #[test]
    fn a_torn_last_line_is_cut_and_garbage_is_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let mut f = LedgerFile::open(path.clone(), false).expect("open");
        f.append(&[row(1)]).expect("append");
        drop(f);
        let mut raw = OpenOptions::new().append(true).open(&path).expect("raw");
        raw.write_all(b"not json\n{\"t\":\"decision\",\"id\":")
            .expect("write");
        drop(raw);
        let mut f = LedgerFile::open(path, false).expect("reopen");
        let c = f.read_chunk(10).expect("read");
        assert_eq!(c.entries.len(), 1);
        assert_eq!(c.corrupt, 1);
        assert_eq!(c.next_offset, f.len);
    }
}
