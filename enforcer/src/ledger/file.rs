//! The local append-only ledger file: JSON lines, one [`Entry`] per line.
//!
//! Without a database it is the ledger; with one it is the spill file, and (with `journal`,
//! the default) the write-ahead log of every row: the decision path appends a row here before
//! the decision is answered ([`LedgerFile::append_line`], one `write` under a lock), so a
//! daemon killed after answering has the row on disk (in the page cache, which outlives the
//! process); the writer fsyncs the file once per flush interval ([`LedgerFile::sync`]).
//! Without `journal` the writer appends whole batches ([`LedgerFile::append`]).
//!
//! Positions are *logical*: bytes ever appended, across truncations and compactions, so a
//! position stays valid while the file is cut behind it. With a database, everything before
//! the committed position is in PostgreSQL; [`LedgerFile::commit`] records that in
//! `<file>.offset` (the physical offset and the file's inode), truncates the file once all of
//! it is committed, and, when the committed part is large but the file never runs empty under
//! steady traffic, compacts it (the uncommitted tail copied to a new file renamed over it). A
//! crash between a commit in PostgreSQL and the offset write replays those rows again, which
//! the idempotent insert makes harmless; the offset is only ever written *behind* what the
//! file holds (0 before a truncation, the new file's inode before a compaction), so no crash
//! can make a restart skip a row. A torn last line left by a crash is cut at the next open.
//!
//! Without a database the file is rotated by size and age ([`LedgerFile::rotate`], driven by
//! the appender; compression in [`super::rotate`]): renamed away whole and replaced by an
//! empty file, which for the positions is a truncation (the logical end stays, the base moves
//! up to it). Nothing reads positions back without a database, so nothing needs the old part.
use super::{Entry, LedgerError, now_us};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The committed part of the file is compacted away once it is this large (and the rest small).
const COMPACT_BYTES: u64 = 16 << 20;
/// Most uncommitted bytes a compaction copies (it holds the append lock meanwhile).
const COMPACT_TAIL_BYTES: u64 = 4 << 20;

/// A row appended to the file: its entry and where its line is.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Logical position of the line's first byte.
    pub start: u64,
    /// Logical position just past its newline.
    pub end: u64,
    /// The row.
    pub entry: Entry,
}

/// The open file, shared by the decision path (appends) and the writer.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    fsync: bool,
    /// Logical position up to which `<file>.offset` said the rows were in PostgreSQL at open.
    opened_committed: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: Arc<File>,
    /// Bytes in the file, always at a line end.
    len: u64,
    /// Logical position of the file's byte 0.
    base: u64,
    /// Appended to since the last sync.
    dirty: bool,
    /// The file's inode (named in `<file>.offset`).
    ino: u64,
    /// When the file's first row was appended (microseconds since the epoch); `None` while it
    /// is empty. What rotation by age measures.
    first_at_us: Option<i64>,
}

/// A file just rotated away: what is left to do with it outside the lock.
#[derive(Debug)]
pub struct Rotated {
    /// The old file, still open: to fsync what was appended to it since the last sync.
    pub file: Arc<File>,
    /// Its size.
    pub bytes: u64,
}

/// Entries read from the file.
#[derive(Debug)]
pub struct Chunk {
    /// The entries, in file order.
    pub entries: Vec<Entry>,
    /// Position just past the last line read ([`read_from`]: physical; [`LedgerFile::read_chunk`]:
    /// logical).
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
        let ino = file.metadata().map_err(err)?.ino();
        let opened_committed = read_offset(&path, ino).min(len);
        let first_at_us = (len > 0).then(|| first_row_at(&path).unwrap_or_else(now_us));
        Ok(Self {
            path,
            fsync,
            opened_committed,
            state: Mutex::new(State {
                file: Arc::new(file),
                len,
                base: 0,
                dirty: false,
                ino,
                first_at_us,
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `<file>.offset` said, at open, that PostgreSQL's part of the file ends.
    pub fn opened_committed(&self) -> u64 {
        self.opened_committed
    }

    /// Logical position of the end of the file.
    pub fn end(&self) -> u64 {
        let s = self.state.lock();
        s.base + s.len
    }

    /// Bytes in the file now.
    pub fn len(&self) -> u64 {
        self.state.lock().len
    }

    /// Whether the file holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the file is due for rotation at `now_us`: it holds at least `max_bytes` (0:
    /// never by size), or its first row is at least `max_age_us` old (0: never by age).
    pub fn rotation_due(&self, max_bytes: u64, max_age_us: u64, now_us: i64) -> bool {
        let s = self.state.lock();
        if s.len == 0 {
            return false;
        }
        let by_size = max_bytes > 0 && s.len >= max_bytes;
        let by_age = max_age_us > 0
            && s.first_at_us.is_some_and(|first| {
                now_us.saturating_sub(first) >= i64::try_from(max_age_us).unwrap_or(i64::MAX)
            });
        by_size || by_age
    }

    /// Renames the file to `to` and opens a fresh one in its place, under the lock (a rename
    /// and an open: appends wait only for that). `None` when the file is empty. Positions go
    /// on from where they were, as after a truncation; `<file>.offset` (meaningless without a
    /// database, and naming an inode that may be reused) is removed. The caller fsyncs the old
    /// file and the directory ([`Rotated`]) and compresses `to`. Only for the embedded ledger:
    /// with a database the rows not yet in PostgreSQL must stay in this file.
    pub fn rotate(&self, to: &Path) -> Result<Option<Rotated>, LedgerError> {
        let mut s = self.state.lock();
        if s.len == 0 {
            return Ok(None);
        }
        if to.exists() {
            // A rename would replace it: rows of an earlier rotation would be gone.
            return Err(LedgerError::File {
                path: to.to_owned(),
                error: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
        std::fs::rename(&self.path, to).map_err(|source| LedgerError::File {
            path: to.to_owned(),
            error: source,
        })?;
        let opened = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&self.path)
            .and_then(|f| f.metadata().map(|m| (f, m.ino())));
        let (new, ino) = match opened {
            Ok(o) => o,
            Err(source) => {
                // Back where it was: appends go on into the old file, nothing is lost.
                if let Err(back) = std::fs::rename(to, &self.path) {
                    tracing::error!(error = %back, file = %to.display(), "ledger file: renaming a rotated file back failed; rows go on into it");
                }
                return Err(LedgerError::File {
                    path: self.path.clone(),
                    error: source,
                });
            }
        };
        let old = std::mem::replace(&mut s.file, Arc::new(new));
        let bytes = s.len;
        s.base += s.len;
        s.len = 0;
        s.dirty = false;
        s.ino = ino;
        s.first_at_us = None;
        drop(s);
        match std::fs::remove_file(offset_path(&self.path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LedgerError::File {
                    path: offset_path(&self.path),
                    error: source,
                });
            }
        }
        Ok(Some(Rotated { file: old, bytes }))
    }

    /// Appends one complete line (ending in `\n`) with one `write`, and calls `then` with its
    /// logical start and end while still holding the lock, so that whatever `then` queues is
    /// queued in file order. A failed write is cut off again, so the file keeps whole lines.
    pub fn append_line<R>(
        &self,
        line: &[u8],
        then: impl FnOnce(u64, u64) -> R,
    ) -> Result<R, LedgerError> {
        let mut s = self.state.lock();
        let start = s.base + s.len;
        self.write_locked(&mut s, line)?;
        Ok(then(start, start + line.len() as u64))
    }

    /// Appends a batch with one `write` (the caller syncs: [`LedgerFile::sync`]), and hands
    /// the rows with their positions to `then` while still holding the lock.
    pub fn append(
        &self,
        batch: Vec<Entry>,
        then: impl FnOnce(Vec<Logged>),
    ) -> Result<(), LedgerError> {
        let mut buf = Vec::with_capacity(batch.len() * 320);
        let mut ends = Vec::with_capacity(batch.len());
        for e in &batch {
            super::json::write(e, &mut buf).map_err(|e| LedgerError::File {
                path: self.path.clone(),
                error: std::io::Error::other(e),
            })?;
            buf.push(b'\n');
            ends.push(buf.len() as u64);
        }
        {
            let mut s = self.state.lock();
            let base = s.base + s.len;
            self.write_locked(&mut s, &buf)?;
            let mut start = base;
            let logged = batch
                .into_iter()
                .zip(ends)
                .map(|(entry, end)| {
                    let l = Logged {
                        start,
                        end: base + end,
                        entry,
                    };
                    start = base + end;
                    l
                })
                .collect();
            then(logged);
        }
        Ok(())
    }

    fn write_locked(&self, s: &mut State, buf: &[u8]) -> Result<(), LedgerError> {
        let err = |source| LedgerError::File {
            path: self.path.clone(),
            error: source,
        };
        if let Err(e) = (&*s.file).write_all(buf) {
            // Cut a partial line, so the next append does not glue onto it.
            if let Err(cut) = s.file.set_len(s.len) {
                tracing::error!(error = %cut, "ledger file: cutting a failed write failed");
            }
            return Err(err(e));
        }
        if s.len == 0 {
            s.first_at_us = Some(now_us());
        }
        s.len += buf.len() as u64;
        s.dirty = true;
        Ok(())
    }

    /// `fdatasync`s what was appended since the last call, outside the lock (appends go on
    /// meanwhile).
    pub fn sync(&self) -> Result<(), LedgerError> {
        let file = {
            let mut s = self.state.lock();
            if !s.dirty {
                return Ok(());
            }
            s.dirty = false;
            s.file.clone()
        };
        file.sync_data().map_err(|source| {
            self.state.lock().dirty = true;
            LedgerError::File {
                path: self.path.clone(),
                error: source,
            }
        })
    }

    /// Up to `max` entries from logical position `from`.
    pub fn read_chunk(&self, from: u64, max: usize) -> Result<Chunk, LedgerError> {
        let (base, len) = {
            let s = self.state.lock();
            (s.base, s.len)
        };
        let mut chunk = read_from(&self.path, from.saturating_sub(base), len, max)?;
        chunk.next_offset += base;
        Ok(chunk)
    }

    /// Records that everything before logical position `upto` is in PostgreSQL: truncates the
    /// file when that is all of it, compacts it when the committed part is large, else writes
    /// the offset.
    pub fn commit(&self, upto: u64) -> Result<(), LedgerError> {
        let (base, len, ino) = {
            let s = self.state.lock();
            (s.base, s.len, s.ino)
        };
        let physical = upto.saturating_sub(base).min(len);
        if physical == len {
            if len == 0 {
                return Ok(());
            }
            // 0 first (durably, with fsync): were the truncation on disk and this not, a
            // restart would skip that many bytes of the rows appended after it.
            write_offset(&self.path, 0, ino, self.fsync)?;
            let mut s = self.state.lock();
            // Rows appended since the check stay; the offset 0 is safe (they are replayed
            // idempotently after a crash) until the next commit writes the real one.
            if s.base + s.len == upto {
                s.file.set_len(0).map_err(|source| LedgerError::File {
                    path: self.path.clone(),
                    error: source,
                })?;
                s.base = upto;
                s.len = 0;
                s.first_at_us = None;
            }
            return Ok(());
        }
        if physical >= COMPACT_BYTES && len - physical <= COMPACT_TAIL_BYTES {
            return self.compact(upto);
        }
        write_offset(&self.path, physical, ino, false)
    }

    /// Replaces the file with its part from logical position `upto` on: copied to a new file
    /// that is renamed over it. The offset names the new file's inode before the rename, so a
    /// crash anywhere leaves either the old file (inode not matching: replayed from its start,
    /// idempotently) or the new one (offset 0).
    fn compact(&self, upto: u64) -> Result<(), LedgerError> {
        let mut tmp_path = self.path.as_os_str().to_owned();
        tmp_path.push(".compact");
        let tmp_path = PathBuf::from(tmp_path);
        let err = |source| LedgerError::File {
            path: tmp_path.clone(),
            error: source,
        };
        let _ = std::fs::remove_file(&tmp_path);
        let mut new = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(err)?;
        let new_ino = new.metadata().map_err(err)?.ino();
        write_offset(&self.path, 0, new_ino, self.fsync)?;
        let mut s = self.state.lock();
        let physical = upto.saturating_sub(s.base).min(s.len);
        let mut tail = vec![0; usize::try_from(s.len - physical).unwrap_or(0)];
        s.file.read_exact_at(&mut tail, physical).map_err(err)?;
        new.write_all(&tail).map_err(err)?;
        if self.fsync {
            new.sync_data().map_err(err)?;
        }
        std::fs::rename(&tmp_path, &self.path).map_err(err)?;
        s.file = Arc::new(new);
        s.ino = new_ino;
        s.base += physical;
        s.len = tail.len() as u64;
        s.dirty = !self.fsync && !tail.is_empty();
        drop(s);
        if self.fsync
            && let Some(dir) = self.path.parent()
        {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| LedgerError::File {
                    path: dir.to_owned(),
                    error: source,
                })?;
        }
        tracing::debug!(
            dropped = physical,
            kept = tail.len(),
            "ledger file compacted"
        );
        Ok(())
    }
}

/// When the first row of `path` was made (its `at_us`, a rollup's minute), if it parses.
fn first_row_at(path: &Path) -> Option<i64> {
    let mut line = Vec::new();
    BufReader::new(File::open(path).ok()?)
        .take(1 << 20)
        .read_until(b'\n', &mut line)
        .ok()?;
    match serde_json::from_slice::<Entry>(&line).ok()? {
        Entry::Decision(r) => Some(r.at_us),
        Entry::Kernel(k) => Some(k.minute_us),
    }
}

/// The offset in `<file>.offset` if it is for the file with inode `ino` (a bare number, the
/// format before compaction existed, is taken as is), else 0: replay everything.
fn read_offset(path: &Path, ino: u64) -> u64 {
    let Ok(text) = std::fs::read_to_string(offset_path(path)) else {
        return 0;
    };
    let mut fields = text.split_whitespace();
    let Some(Ok(offset)) = fields.next().map(str::parse::<u64>) else {
        return 0;
    };
    match fields.next().map(str::parse::<u64>) {
        None => offset,
        Some(Ok(i)) if i == ino => offset,
        Some(_) => 0,
    }
}

fn write_offset(path: &Path, offset: u64, ino: u64, durable: bool) -> Result<(), LedgerError> {
    let op = offset_path(path);
    let err = |source| LedgerError::File {
        path: op.clone(),
        error: source,
    };
    let mut f = File::create(&op).map_err(err)?;
    f.write_all(format!("{offset} {ino}\n").as_bytes())
        .map_err(err)?;
    if durable {
        f.sync_all().map_err(err)?;
    }
    Ok(())
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
    let mut chunk = read_lines(&mut reader, max, false).map_err(err)?;
    chunk.next_offset += offset;
    Ok(chunk)
}

/// Reads up to `max` entries from `reader`; `next_offset` is the bytes consumed. A last line
/// without its newline is left alone (one still being written), unless `complete` says the
/// input is whole (a compressed rotated file): then it is parsed like the others.
pub fn read_lines(reader: &mut impl BufRead, max: usize, complete: bool) -> std::io::Result<Chunk> {
    let mut entries = Vec::new();
    let mut corrupt = 0;
    let mut next_offset = 0;
    let mut line = Vec::new();
    while entries.len() < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || (line.last() != Some(&b'\n') && !complete) {
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
        Entry::Decision(AuditRow::sample(now_us(), format!("{i:064x}")))
    }

    fn line(e: &Entry) -> Vec<u8> {
        let mut l = serde_json::to_vec(e).expect("json");
        l.push(b'\n');
        l
    }

    fn append(f: &LedgerFile, rows: &[Entry]) -> Vec<Logged> {
        let mut out = Vec::new();
        f.append(rows.to_vec(), |l| out = l).expect("append");
        out
    }

    #[test]
    fn appends_reads_back_and_truncates_when_committed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let f = LedgerFile::open(path.clone(), true).expect("open");
        let rows: Vec<Entry> = (0..5).map(row).collect();
        let logged = append(&f, &rows);
        assert_eq!(logged.len(), 5);
        assert_eq!(logged[0].start, 0);
        assert!(logged.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(logged[4].end, f.end());
        let c = f.read_chunk(0, 3).expect("read");
        assert_eq!(c.entries, rows[..3]);
        assert_eq!(c.next_offset, logged[2].end);
        f.commit(c.next_offset).expect("commit");
        // Reopening starts from the committed offset.
        drop(f);
        let f = LedgerFile::open(path.clone(), true).expect("reopen");
        assert_eq!(f.opened_committed(), logged[2].end);
        let c = f.read_chunk(f.opened_committed(), 10).expect("read");
        assert_eq!(c.entries, rows[3..]);
        f.commit(c.next_offset).expect("commit");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        // Positions go on growing across the truncation.
        assert_eq!(f.end(), c.next_offset);
        let one = line(&row(9));
        let (start, end) = f.append_line(&one, |s, e| (s, e)).expect("line");
        assert_eq!(
            (start, end),
            (c.next_offset, c.next_offset + one.len() as u64)
        );
        assert_eq!(
            f.read_chunk(start, 10).expect("read").entries,
            vec![row_like(&one)]
        );
    }

    fn row_like(line: &[u8]) -> Entry {
        serde_json::from_slice(line).expect("entry")
    }

    #[test]
    fn a_large_committed_part_is_compacted_away_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let f = LedgerFile::open(path.clone(), false).expect("open");
        let rows: Vec<Entry> = (0..1000).map(row).collect();
        let per_batch = append(&f, &rows).last().expect("row").end;
        let batches = COMPACT_BYTES / per_batch + 1;
        for _ in 1..batches {
            append(&f, &rows);
        }
        let tail = append(&f, &rows[..3]);
        let upto = tail[0].start;
        f.commit(upto).expect("commit");
        // Only the uncommitted rows are left, at the same logical positions.
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            tail[2].end - upto
        );
        assert_eq!(f.read_chunk(upto, 10).expect("read").entries, rows[..3]);
        // A restart replays exactly them.
        drop(f);
        let f = LedgerFile::open(path, false).expect("reopen");
        assert_eq!(f.opened_committed(), 0);
        assert_eq!(f.read_chunk(0, 10).expect("read").entries, rows[..3]);
    }

    #[test]
    fn an_offset_for_another_inode_replays_from_the_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let f = LedgerFile::open(path.clone(), false).expect("open");
        let logged = append(&f, &[row(1), row(2)]);
        f.commit(logged[0].end).expect("commit");
        drop(f);
        assert_eq!(
            LedgerFile::open(path.clone(), false)
                .expect("open")
                .opened_committed(),
            logged[0].end
        );
        // A compaction that crashed after naming the new file: the old one is replayed whole.
        std::fs::write(offset_path(&path), format!("{} 1\n", logged[0].end)).expect("write");
        assert_eq!(
            LedgerFile::open(path.clone(), false)
                .expect("open")
                .opened_committed(),
            0
        );
        // The format before inodes were recorded.
        std::fs::write(offset_path(&path), format!("{}", logged[0].end)).expect("write");
        assert_eq!(
            LedgerFile::open(path, false)
                .expect("open")
                .opened_committed(),
            logged[0].end
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_and_garbage_is_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.jsonl");
        let f = LedgerFile::open(path.clone(), false).expect("open");
        append(&f, &[row(1)]);
        drop(f);
        let mut raw = OpenOptions::new().append(true).open(&path).expect("raw");
        raw.write_all(b"not json\n{\"t\":\"decision\",\"id\":")
            .expect("write");
        drop(raw);
        let f = LedgerFile::open(path, false).expect("reopen");
        let c = f.read_chunk(0, 10).expect("read");
        assert_eq!(c.entries.len(), 1);
        assert_eq!(c.corrupt, 1);
        assert_eq!(c.next_offset, f.end());
    }
}
