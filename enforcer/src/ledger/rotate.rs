//! Rotation of the embedded ledger file: without a database the file is the ledger, and would
//! grow forever (~390 bytes a row), so the writer rotates it by size and age.
//!
//! The appender renames the live file to `<stem>.<UTC time>.jsonl` next to it and opens a
//! fresh one, under the file's lock ([`super::file::LedgerFile::rotate`]: a rename and an
//! open, nothing else). Everything slower happens here, on a thread of its own
//! ([`Rotator`]), never on the decision path: the rotated file is gzip-compressed to
//! `….jsonl.gz.tmp`, fsynced, renamed to `….jsonl.gz`, and only then is the uncompressed file
//! removed; then the oldest rotated files beyond `file_keep` are deleted.
//!
//! No crash loses a row: until the `.gz` is complete and durable the uncompressed file is
//! there. At start ([`recover`]) a `.gz.tmp` left by a crash is removed and every rotated file
//! still uncompressed is compressed again (over a `.gz` of it that may exist already: the
//! uncompressed one is the truth until it is gone).
//!
//! With a database the file is the spill file and is never rotated (its committed part is
//! truncated or compacted instead): rows not yet in PostgreSQL must not be moved away.
use chrono::{DateTime, Timelike as _, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;
use prometheus::IntCounter;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// gzip level of rotated files. 1 (fast): JSON lines still shrink ~10×, at several times the
/// speed of the default level, so one core keeps up with far more decisions than a node makes.
pub const COMPRESSION_LEVEL: u32 = 1;

/// The time in a rotated file's name (UTC, to the second): `20261203T081500Z`.
const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// The two bytes every gzip member starts with (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Errors of rotation and compression.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// A file could not be read, written, renamed, synced or removed.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RotateError + '_ {
    move |error| RotateError::File {
        path: path.to_owned(),
        error,
    }
}

/// The name of the file `live` is rotated to at `at`: `<stem>.<YYYYMMDDTHHMMSSZ>.jsonl` next to
/// it. Names sort in rotation order, which is what [`prune`] deletes by and what a shell glob
/// hands to `audit import`: when a rotated file of that second or a later one exists already
/// (tiny sizes rotate several times a second; a clock set back), the name takes the second
/// after the newest one instead.
pub fn rotated_path(live: &Path, at: DateTime<Utc>) -> Result<PathBuf, RotateError> {
    // Names hold whole seconds: compare in them.
    let mut at = at.with_nanosecond(0).unwrap_or(at);
    if let Some(newest) = list(live)?.into_keys().next_back()
        && newest >= at
    {
        at = newest + chrono::Duration::seconds(1);
    }
    Ok(sibling(
        live,
        &format!("{}.{}.jsonl", stem(live), at.format(STAMP)),
    ))
}

/// `true` when `path` starts with the gzip magic bytes (whatever its name).
pub fn is_gzip(path: &Path) -> Result<bool, RotateError> {
    let mut head = [0u8; 2];
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut read = 0;
    while read < head.len() {
        match f.read(&mut head[read..]).map_err(io_err(path))? {
            0 => return Ok(false),
            n => read += n,
        }
    }
    Ok(head == GZIP_MAGIC)
}

/// What of one rotated file is in the directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// `<stem>.<time>.jsonl`: not compressed (yet).
    pub plain: Option<PathBuf>,
    /// `<stem>.<time>.jsonl.gz`.
    pub gz: Option<PathBuf>,
    /// `<stem>.<time>.jsonl.gz.tmp`: a compression that did not finish.
    pub tmp: Option<PathBuf>,
}

/// The rotated files of `live`, by the time in their names, oldest first. Only names of
/// exactly the rotated form count: the live file, `<file>.offset`, `<file>.compact` and the
/// quarantine file (`<stem>.quarantine.jsonl`) are never taken for one.
pub fn list(live: &Path) -> Result<BTreeMap<DateTime<Utc>, Found>, RotateError> {
    let dir = dir_of(live);
    let prefix = format!("{}.", stem(live));
    let mut out: BTreeMap<DateTime<Utc>, Found> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let (stamp, form) = if let Some(s) = rest.strip_suffix(".jsonl") {
            (s, 0)
        } else if let Some(s) = rest.strip_suffix(".jsonl.gz") {
            (s, 1)
        } else if let Some(s) = rest.strip_suffix(".jsonl.gz.tmp") {
            (s, 2)
        } else {
            continue;
        };
        let Some(key) = parse_stamp(stamp) else {
            continue;
        };
        let found = out.entry(key).or_default();
        let path = entry.path();
        match form {
            0 => found.plain = Some(path),
            1 => found.gz = Some(path),
            _ => found.tmp = Some(path),
        }
    }
    Ok(out)
}

/// `20261203T081500Z` → that instant.
fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    // chrono accepts a few more forms than it writes (fewer digits): only its own output counts.
    let at = chrono::NaiveDateTime::parse_from_str(s, STAMP)
        .ok()?
        .and_utc();
    (at.format(STAMP).to_string() == s).then_some(at)
}

/// Compresses the rotated file `src` to `src.gz`: written to `src.gz.tmp`, fsynced, renamed,
/// the directory fsynced, and only then `src` removed. Returns the `.gz` and its size.
pub fn compress(src: &Path) -> Result<(PathBuf, u64), RotateError> {
    let gz = with_suffix(src, ".gz");
    let tmp = with_suffix(&gz, ".tmp");
    let mut input = File::open(src).map_err(io_err(src))?;
    let out = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut encoder = GzEncoder::new(
        BufWriter::with_capacity(1 << 20, out),
        Compression::new(COMPRESSION_LEVEL),
    );
    std::io::copy(&mut input, &mut encoder).map_err(io_err(src))?;
    let out = encoder
        .finish()
        .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
        .map_err(io_err(&tmp))?;
    out.sync_all().map_err(io_err(&tmp))?;
    let size = out.metadata().map_err(io_err(&tmp))?.len();
    drop(out);
    std::fs::rename(&tmp, &gz).map_err(io_err(&gz))?;
    sync_dir(src)?;
    std::fs::remove_file(src).map_err(io_err(src))?;
    Ok((gz, size))
}

/// Deletes the oldest rotated files of `live` beyond the newest `keep` (every form of each).
/// Returns what it deleted.
pub fn prune(live: &Path, keep: usize) -> Result<Vec<PathBuf>, RotateError> {
    let all = list(live)?;
    let excess = all.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for found in all.into_values().take(excess) {
        for path in [found.gz, found.plain, found.tmp].into_iter().flatten() {
            match std::fs::remove_file(&path) {
                Ok(()) => deleted.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }
    Ok(deleted)
}

/// What a crash may have left: removes every `.gz.tmp` and compresses every rotated file still
/// uncompressed (again, when its `.gz` exists: the uncompressed file is removed only once its
/// `.gz` is durable, so it is the one to trust). Returns the files compressed.
pub fn recover(live: &Path) -> Result<Vec<PathBuf>, RotateError> {
    let mut compressed = Vec::new();
    for found in list(live)?.into_values() {
        if let Some(tmp) = &found.tmp {
            match std::fs::remove_file(tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(tmp)(e)),
            }
        }
        if let Some(plain) = found.plain {
            compressed.push(compress(&plain)?.0);
        }
    }
    Ok(compressed)
}

/// Work for the rotation thread.
#[derive(Debug)]
enum Job {
    /// Compress a file just rotated, then prune to `keep` (`None`: do not prune).
    Compress { path: PathBuf, keep: Option<usize> },
    /// Clean up after a crash ([`recover`]), then prune to `keep`.
    Recover { keep: Option<usize> },
}

/// The thread that compresses rotated files and deletes old ones, off the decision path and
/// off the appender. Dropping it lets it finish what is queued and waits for it (a kill instead
/// leaves the rest to [`recover`] at the next start).
#[derive(Debug)]
pub struct Rotator {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rotator {
    /// Starts the thread for the ledger file `live`; failures are logged and counted in
    /// `errors` (and left for the next start's [`recover`]).
    pub fn start(live: PathBuf, errors: IntCounter) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("ledger-rotate".into())
            .spawn(move || {
                for job in rx {
                    run(&live, job, &errors);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Compresses `path` (just rotated), then deletes the oldest rotated files beyond `keep`.
    pub fn compress(&self, path: PathBuf, keep: Option<usize>) {
        self.send(Job::Compress { path, keep });
    }

    /// Cleans up what a crash left ([`recover`]), then prunes to `keep`.
    pub fn recover(&self, keep: Option<usize>) {
        self.send(Job::Recover { keep });
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx
            && tx.send(job).is_err()
        {
            // The thread is gone (it cannot panic on bad input; only on a bug): the files stay
            // as they are, uncompressed, until the next start recovers them.
            tracing::error!("ledger rotation thread is gone: rotated files stay uncompressed");
        }
    }
}

impl Drop for Rotator {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(live: &Path, job: Job, errors: &IntCounter) {
    let keep = match job {
        Job::Compress { path, keep } => {
            let started = std::time::Instant::now();
            match compress(&path) {
                Ok((gz, size)) => tracing::info!(
                    file = %gz.display(),
                    bytes = size,
                    seconds = started.elapsed().as_secs_f64(),
                    "rotated ledger file compressed"
                ),
                // Pruned before its turn (a tiny `file_keep`): nothing left to do.
                Err(RotateError::File { error, .. })
                    if error.kind() == std::io::ErrorKind::NotFound && !path.exists() => {}
                Err(e) => {
                    errors.inc();
                    tracing::error!(error = %e, "compressing a rotated ledger file failed; it stays uncompressed until the next start");
                }
            }
            keep
        }
        Job::Recover { keep } => {
            match recover(live) {
                Ok(done) => {
                    for gz in done {
                        tracing::warn!(file = %gz.display(), "ledger file left uncompressed by a crash: compressed");
                    }
                }
                Err(e) => {
                    errors.inc();
                    tracing::error!(error = %e, "cleaning up rotated ledger files failed");
                }
            }
            keep
        }
    };
    if let Some(keep) = keep {
        match prune(live, keep) {
            Ok(deleted) => {
                for path in deleted {
                    tracing::info!(file = %path.display(), keep, "old rotated ledger file deleted");
                }
            }
            Err(e) => {
                errors.inc();
                tracing::error!(error = %e, "deleting old rotated ledger files failed");
            }
        }
    }
}

/// fsyncs the directory holding `path`, so that a rename in it is durable.
pub fn sync_dir(path: &Path) -> Result<(), RotateError> {
    let dir = dir_of(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The live file's name without its extension (`enforcer-ledger.jsonl` → `enforcer-ledger`).
fn stem(live: &Path) -> String {
    live.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sibling(live: &Path, name: &str) -> PathBuf {
    dir_of(live).join(name)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::file::LedgerFile;
    use crate::ledger::{AuditRow, Entry, now_us};
    use std::collections::BTreeSet;

    fn row(at_us: i64) -> Entry {
        Entry::Decision(AuditRow::sample(at_us, "ab".repeat(32)))
    }

    fn id(e: &Entry) -> String {
        match e {
            Entry::Decision(r) => r.id.to_string(),
            Entry::Kernel(k) => k.id.to_string(),
        }
    }

    /// Appends `n` rows the way the decision path does; returns their ids.
    fn append(f: &LedgerFile, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let e = row(now_us());
                let mut line = serde_json::to_vec(&e).expect("json");
                line.push(b'\n');
                f.append_line(&line, |_, _| ()).expect("append");
                id(&e)
            })
            .collect()
    }

    /// The ids in a ledger file, plain or gzip.
    fn ids_in(path: &Path) -> Vec<String> {
        let mut text = String::new();
        let mut raw = File::open(path).expect("open");
        if is_gzip(path).expect("magic") {
            flate2::read::MultiGzDecoder::new(raw)
                .read_to_string(&mut text)
                .expect("gunzip");
        } else {
            raw.read_to_string(&mut text).expect("read");
        }
        text.lines()
            .map(|l| id(&serde_json::from_str::<Entry>(l).expect("a whole row")))
            .collect()
    }

    /// Every id in the live file and the rotated `.gz` files; asserts nothing else is there.
    fn ids_everywhere(live: &Path) -> Vec<String> {
        let mut ids = ids_in(live);
        for found in list(live).expect("list").into_values() {
            assert_eq!((&found.plain, &found.tmp), (&None, &None), "{found:?}");
            ids.extend(ids_in(&found.gz.expect("compressed")));
        }
        ids
    }

    fn counter() -> IntCounter {
        IntCounter::new("errors", "errors").expect("counter")
    }

    fn rotate_now(f: &LedgerFile) -> PathBuf {
        let to = rotated_path(f.path(), Utc::now()).expect("name");
        f.rotate(&to).expect("rotate").expect("not empty");
        to
    }

    #[test]
    fn rotates_by_size_and_every_row_is_found_exactly_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("enforcer-ledger.jsonl");
        let f = LedgerFile::open(live.clone(), true).expect("open");
        let errors = counter();
        let rotator = Rotator::start(live.clone(), errors.clone()).expect("thread");
        let mut written = Vec::new();
        let mut rotations = 0;
        let end_before = f.end();
        for _ in 0..20 {
            written.extend(append(&f, 7));
            if f.rotation_due(2048, 0, now_us()) {
                rotator.compress(rotate_now(&f), Some(100));
                rotations += 1;
                assert!(f.is_empty());
            }
        }
        // Positions go on across rotations, as across a truncation.
        assert!(f.end() > end_before);
        assert!(rotations >= 5, "{rotations} rotations");
        // Not due below the size, nor with size rotation off.
        assert!(!f.rotation_due(1 << 30, 0, now_us()));
        assert!(!f.rotation_due(0, 0, now_us()));
        drop(rotator);
        assert_eq!(errors.get(), 0);
        assert_eq!(list(&live).expect("list").len(), rotations);
        let found = ids_everywhere(&live);
        assert_eq!(found.len(), written.len(), "no row lost, none doubled");
        assert_eq!(
            found.iter().collect::<BTreeSet<_>>(),
            written.iter().collect::<BTreeSet<_>>()
        );
        // Nothing else was taken for a rotated file, and nothing else was touched.
        let names: BTreeSet<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains("enforcer-ledger.jsonl"));
        assert!(
            names.iter().all(|n| n == "enforcer-ledger.jsonl"
                || (n.starts_with("enforcer-ledger.2") && n.ends_with(".jsonl.gz"))),
            "{names:?}"
        );
    }

    #[test]
    fn rotates_by_age_of_the_first_row_also_after_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("l.jsonl");
        let f = LedgerFile::open(live.clone(), false).expect("open");
        assert!(!f.rotation_due(0, 1, now_us() + 10_000_000), "empty: never");
        append(&f, 1);
        let hour: i64 = 3_600_000_000;
        let age = |h: u64| h * 3_600_000_000;
        assert!(!f.rotation_due(0, age(1), now_us()));
        assert!(f.rotation_due(0, age(1), now_us() + hour + 1));
        assert!(
            !f.rotation_due(0, 0, now_us() + 100 * hour),
            "0: never by age"
        );
        drop(f);
        // A file whose first row is two days old, opened again: due at once by a day.
        let old = row(now_us() - 48 * hour);
        let mut text = serde_json::to_string(&old).expect("json");
        text.push('\n');
        std::fs::write(&live, text).expect("write");
        let f = LedgerFile::open(live.clone(), false).expect("reopen");
        append(&f, 1);
        assert!(f.rotation_due(0, age(24), now_us()));
        let to = rotate_now(&f);
        // The fresh file's age starts with its first row.
        assert!(!f.rotation_due(0, age(24), now_us()));
        append(&f, 1);
        assert!(!f.rotation_due(0, age(24), now_us()));
        assert_eq!(ids_in(&to)[0], id(&old));
        assert_eq!(ids_in(&live).len(), 1);
    }

    #[test]
    fn keeps_the_newest_n_rotated_files_and_deletes_the_oldest() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("l.jsonl");
        let f = LedgerFile::open(live.clone(), false).expect("open");
        let rotator = Rotator::start(live.clone(), counter()).expect("thread");
        let mut rotated = Vec::new();
        for _ in 0..6 {
            let ids = append(&f, 3);
            rotated.push((rotate_now(&f), ids));
            rotator.compress(rotated.last().expect("one").0.clone(), Some(2));
        }
        drop(rotator);
        let left = list(&live).expect("list");
        assert_eq!(left.len(), 2, "{left:?}");
        // The two newest (several rotations a second: each name a second after the last).
        let kept: Vec<PathBuf> = left.into_values().filter_map(|f| f.gz).collect();
        let newest: Vec<PathBuf> = rotated[4..]
            .iter()
            .map(|(p, _)| with_suffix(p, ".gz"))
            .collect();
        assert_eq!(kept, newest);
        assert_eq!(ids_in(&kept[1]), rotated[5].1);
    }

    #[test]
    fn a_rotated_file_left_uncompressed_by_a_crash_is_compressed_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("l.jsonl");
        let f = LedgerFile::open(live.clone(), false).expect("open");
        let mut written = append(&f, 5);
        // Renamed away, then the daemon died before compressing it.
        let to = rotate_now(&f);
        written.extend(append(&f, 2));
        drop(f);
        assert!(to.exists());
        let _f = LedgerFile::open(live.clone(), false).expect("restart");
        let rotator = Rotator::start(live.clone(), counter()).expect("thread");
        rotator.recover(Some(8));
        drop(rotator);
        assert!(!to.exists(), "the uncompressed file is gone");
        assert!(with_suffix(&to, ".gz").exists());
        let mut found = ids_everywhere(&live);
        found.sort();
        written.sort();
        assert_eq!(found, written);
    }

    #[test]
    fn a_gz_tmp_left_by_a_crash_is_removed_and_its_source_compressed_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("l.jsonl");
        let f = LedgerFile::open(live.clone(), false).expect("open");
        let mut written = append(&f, 4);
        let to = rotate_now(&f);
        // A compression cut off half-way: a torn .gz.tmp beside its source.
        let tmp = with_suffix(&with_suffix(&to, ".gz"), ".tmp");
        std::fs::write(&tmp, [0x1f, 0x8b, 8, 0, 0]).expect("torn tmp");
        // And one whose rename happened but not the removal of its source: both are there.
        written.extend(append(&f, 3));
        let second = rotate_now(&f);
        std::fs::copy(&second, with_suffix(&second, ".gz")).expect("a stale .gz");
        written.extend(append(&f, 1));
        drop(f);
        let errors = counter();
        let rotator = Rotator::start(live.clone(), errors.clone()).expect("thread");
        rotator.recover(None);
        drop(rotator);
        assert_eq!(errors.get(), 0);
        assert!(!tmp.exists() && !to.exists() && !second.exists());
        let mut found = ids_everywhere(&live);
        found.sort();
        written.sort();
        assert_eq!(found, written, "every row exactly once");
    }

    #[test]
    fn only_names_of_the_rotated_form_count() {
        let dir = tempfile::tempdir().expect("tmp");
        let live = dir.path().join("enforcer-ledger.jsonl");
        for name in [
            "enforcer-ledger.jsonl",
            "enforcer-ledger.jsonl.offset",
            "enforcer-ledger.jsonl.compact",
            "enforcer-ledger.quarantine.jsonl",
            "enforcer-ledger.2026120T081500Z.jsonl",
            "enforcer-ledger.20261203T081500Z-1.jsonl",
            "enforcer-ledger.20261203T251500Z.jsonl",
            "other.20261203T081500Z.jsonl.gz",
            "enforcer-ledger.20261203T081500Z.jsonl.gz",
            "enforcer-ledger.20261203T081502Z.jsonl",
            "enforcer-ledger.20261203T081501Z.jsonl.gz.tmp",
        ] {
            std::fs::write(dir.path().join(name), "").expect("write");
        }
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        let keys: Vec<DateTime<Utc>> = list(&live).expect("list").into_keys().collect();
        assert_eq!(
            keys,
            [
                at("2026-12-03T08:15:00Z"),
                at("2026-12-03T08:15:01Z"),
                at("2026-12-03T08:15:02Z")
            ]
        );
        // A rotation in the newest file's second, or before it (a clock set back), takes the
        // second after it: names keep sorting in rotation order.
        for when in ["2026-12-03T08:15:02Z", "2026-12-03T07:00:00Z"] {
            assert_eq!(
                rotated_path(&live, at(when)).expect("name"),
                dir.path().join("enforcer-ledger.20261203T081503Z.jsonl")
            );
        }
        assert_eq!(
            rotated_path(&live, at("2026-12-03T09:00:00Z")).expect("name"),
            dir.path().join("enforcer-ledger.20261203T090000Z.jsonl")
        );
        assert!(!is_gzip(&live).expect("empty file"));
    }
}
