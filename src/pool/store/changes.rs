//! The change log: `<pool>/changes`, appended under the exclusive pool lock. It tells a
//! process which records other processes changed since it last looked, and it is the journal
//! of new records (`Store::put_new_with`).
//!
//! Lines after the header `virtdisk-csi changes v1 <epoch>`:
//! - `<tag> <key>`: a commit changed the record `<key>` of kind `<tag>` (the record file is the
//!   truth: re-read it). Appended before the commit's rename; not fsynced by itself.
//! - `+<tag> <key> <owner> <check> <bytes>`: a **new record, journaled**: its file's bytes (a
//!   JSON string), the first 64 bits of their SHA-256 in hex (`<check>`), and the owner token
//!   of the store that wrote it. The line is fdatasynced before the record file is renamed
//!   into place, which is then not fsynced: the line is what makes the create durable. The
//!   owner's checkpointer makes the files durable soon after and says so with
//! - `=<owner> <epoch> <offset>`: every journaled line of `<owner>` in epoch `<epoch>` that
//!   ends at or before byte `<offset>` has durable files (fdatasynced before anyone reads it).
//!
//! A journaled line is *unsynced* until a `=` line covers it or a later line names its key
//! (whoever commits a change to such a record makes its files durable first and fdatasyncs the
//! log after its line: `Store::commit_keys`). When the pool opens, unsynced lines of owners
//! that are gone are replayed (`Store::open`): the record file is written again from the line
//! if a crash of the machine lost it, and the caller checks the files it names.
//!
//! Past 8 MiB a commit starts the log afresh under a new epoch, once no line is unsynced; a
//! process that finds a new epoch, or a shorter log, re-reads every record.

use super::kinds::Kind;
use super::locks::Locks;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &str = "virtdisk-csi changes v1 ";
const HEADER_LEN: u64 = MAGIC.len() as u64 + 16 + 1;
const LINE_LEN: usize = 19;
/// Past this length a commit starts the log afresh (tests: small, to get there quickly).
const RESET_AT: u64 = if cfg!(test) { 64 << 10 } else { 8 << 20 };

/// How far a process has read the log: its length and modification time then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Pos {
    len: u64,
    mtime: (i64, i64),
}

fn pos_of(meta: &std::fs::Metadata, len: u64) -> Pos {
    Pos {
        len,
        mtime: (meta.mtime(), meta.mtime_nsec()),
    }
}

/// The writer's and catch-up's view of the log (behind the store's log mutex).
pub(super) struct ChangeLog {
    path: PathBuf,
    file: File,
    epoch: u64,
    pub(super) seen: Pos,
    /// The unsynced journaled lines of the log as read so far, by record.
    unsynced: HashMap<(Kind, u64), Unsynced>,
    /// An fdatasync of the log failed: what was appended may be visible and yet not durable,
    /// so every commit syncs the log after its line until a reset starts it afresh.
    suspect: bool,
}

/// A journaled new record whose files are not known to be durable yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unsynced {
    /// The owner token of the store that wrote it.
    pub(super) owner: u64,
    /// Where its line ends in the log.
    pub(super) end: u64,
}

/// A journaled line that [`ChangeLog::scan`] found unsynced, with the record's bytes.
#[derive(Debug)]
pub(super) struct Journaled {
    pub(super) kind: Kind,
    pub(super) key: u64,
    pub(super) owner: u64,
    pub(super) end: u64,
    pub(super) bytes: Vec<u8>,
}

/// What [`ChangeLog::scan`] found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The log's epoch (`None` when its header is not one).
    pub(super) epoch: Option<u64>,
    /// Unsynced journaled lines, in log order.
    pub(super) unsynced: Vec<Journaled>,
    /// Bytes that are not a line: a crash of the machine tore the log's tail (never a commit
    /// that was answered: its line was durable before the answer). Skipped.
    pub(super) torn: bool,
}

/// One line of the log.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Change(Kind, u64),
    New {
        kind: Kind,
        key: u64,
        owner: u64,
        bytes: Vec<u8>,
    },
    Synced {
        owner: u64,
        epoch: u64,
        through: u64,
    },
}

/// What the log says happened since the last look.
pub(super) enum News {
    None,
    /// The log was started afresh (or is unreadable): re-read everything.
    Reset,
    Keys(Vec<(Kind, u64)>),
}

/// The lock-free check before each answer: has the log changed since we last read it?
pub(super) struct Changes {
    file: File,
    seen: Mutex<Pos>,
}

impl Changes {
    pub(super) fn changed(&self) -> Result<bool> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("checking the pool's change log", e))?;
        let now = pos_of(&meta, meta.len());
        Ok(*self.seen.lock().unwrap_or_else(|p| p.into_inner()) != now)
    }

    pub(super) fn seen(&self, pos: Pos) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = pos;
    }
}

fn header(epoch: u64) -> String {
    format!("{MAGIC}{epoch:016x}\n")
}

fn parse_header(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let hex = text.strip_prefix(MAGIC)?.strip_suffix('\n')?;
    super::kinds::parse_key(hex)
}

fn new_epoch() -> u64 {
    crate::ids::random_u64()
}

/// Opens (creating if needed) the change log of the pool at `dir`, and the locks that live in
/// the same file.
pub(super) fn open(dir: &Path) -> Result<(ChangeLog, Changes, Locks)> {
    let path = dir.join("changes");
    let ctx = |e| Error::io(format!("opening {}", path.display()), e);
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&path)
        .map_err(ctx)?;
    let locks = Locks::open(&path)?;
    let mut log = ChangeLog {
        path: path.clone(),
        file,
        epoch: 0,
        seen: Pos::default(),
        unsynced: HashMap::new(),
        suspect: false,
    };
    {
        let _pool = locks.pool_exclusive()?;
        if log.read_epoch()?.is_none() {
            // New (or unreadable): start it. Readers of an unreadable log re-read everything.
            log.reset()?;
        }
    }
    let changes = Changes {
        file: File::open(&path).map_err(ctx)?,
        seen: Mutex::new(Pos::default()),
    };
    Ok((log, changes, locks))
}

impl ChangeLog {
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{what} {}", self.path.display()), e)
    }

    fn read_epoch(&self) -> Result<Option<u64>> {
        let mut buf = vec![0u8; HEADER_LEN as usize];
        let n = read_at(&self.file, &mut buf, 0).map_err(|e| self.io("reading", e))?;
        Ok(parse_header(&buf[..n]))
    }

    fn metadata(&self) -> Result<std::fs::Metadata> {
        self.file.metadata().map_err(|e| self.io("checking", e))
    }

    /// Takes the log as it is now as read (before a full re-read of the records): its epoch,
    /// its length, and its unsynced journaled lines. The caller holds the pool lock.
    pub(super) fn rewind(&mut self) -> Result<()> {
        self.epoch = self.read_epoch()?.unwrap_or(0);
        let meta = self.metadata()?;
        let scan = self.scan()?;
        self.unsynced = scan
            .unsynced
            .iter()
            .map(|j| {
                let u = Unsynced {
                    owner: j.owner,
                    end: j.end,
                };
                ((j.kind, j.key), u)
            })
            .collect();
        self.seen = pos_of(&meta, meta.len());
        Ok(())
    }

    /// Reads the whole log: its unsynced journaled lines, with their bytes, and whether its
    /// tail is torn. The caller holds the pool lock.
    pub(super) fn scan(&self) -> Result<Scan> {
        let epoch = self.read_epoch()?;
        let len = self.metadata()?.len();
        let mut out = Scan {
            epoch,
            ..Scan::default()
        };
        if epoch.is_none() || len <= HEADER_LEN {
            return Ok(out);
        }
        let mut buf = vec![0u8; (len - HEADER_LEN) as usize];
        let n = read_at(&self.file, &mut buf, HEADER_LEN).map_err(|e| self.io("reading", e))?;
        buf.truncate(n);
        // Journaled lines are parsed whole (their bytes decoded and checked) only if they end
        // up unsynced: start-up reads the whole log.
        let mut open: HashMap<(Kind, u64), (Journaled, std::ops::Range<usize>)> = HashMap::new();
        let mut end = HEADER_LEN;
        let mut at = 0;
        for raw in buf.split_inclusive(|b| *b == b'\n') {
            let range = at..at + raw.len();
            at += raw.len();
            end += raw.len() as u64;
            // A line that is not one (bytes a crash tore, no newline at the end): skipped;
            // appends never glue onto one (a failed append is cut off again: `write_line`).
            let parsed = raw.ends_with(b"\n").then(|| parse_line(raw, false));
            let Some(line) = parsed.flatten() else {
                out.torn = true;
                continue;
            };
            match line {
                Line::Change(kind, key) => {
                    open.remove(&(kind, key));
                }
                Line::New {
                    kind,
                    key,
                    owner,
                    bytes,
                } => {
                    let j = Journaled {
                        kind,
                        key,
                        owner,
                        end,
                        bytes,
                    };
                    open.insert((kind, key), (j, range));
                }
                Line::Synced {
                    owner,
                    epoch: e,
                    through,
                } => {
                    if Some(e) == epoch {
                        open.retain(|_, (j, _)| !(j.owner == owner && j.end <= through));
                    }
                }
            }
        }
        let mut unsynced: Vec<_> = open.into_values().collect();
        unsynced.sort_by_key(|(j, _)| j.end);
        for (mut j, range) in unsynced {
            // Bytes that do not check: a crash tore the line; its create was never answered.
            let Some(Line::New { bytes, .. }) = parse_line(&buf[range], true) else {
                out.torn = true;
                continue;
            };
            j.bytes = bytes;
            out.unsynced.push(j);
        }
        Ok(out)
    }

    /// Whether the record `(kind, key)` has an unsynced journaled line, as read so far.
    pub(super) fn is_unsynced(&self, kind: Kind, key: u64) -> bool {
        self.unsynced.contains_key(&(kind, key))
    }

    /// The records with unsynced journaled lines, as read so far.
    pub(super) fn unsynced(&self) -> impl Iterator<Item = ((Kind, u64), Unsynced)> + '_ {
        self.unsynced.iter().map(|(k, u)| (*k, *u))
    }

    /// The log's epoch as last read.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn note(&mut self, line: &Line, end: u64) {
        match line {
            Line::Change(kind, key) => {
                self.unsynced.remove(&(*kind, *key));
            }
            Line::New {
                kind, key, owner, ..
            } => {
                let u = Unsynced { owner: *owner, end };
                self.unsynced.insert((*kind, *key), u);
            }
            Line::Synced {
                owner,
                epoch,
                through,
            } => {
                if *epoch == self.epoch {
                    self.unsynced
                        .retain(|_, u| !(u.owner == *owner && u.end <= *through));
                }
            }
        }
    }

    /// The keys logged since the last read. The caller holds the pool lock.
    pub(super) fn read_new(&mut self) -> Result<News> {
        let meta = self.metadata()?;
        let len = meta.len();
        if self.read_epoch()? != Some(self.epoch) || len < self.seen.len {
            return Ok(News::Reset);
        }
        if len == self.seen.len {
            self.seen = pos_of(&meta, len);
            return Ok(News::None);
        }
        let mut buf = vec![0u8; (len - self.seen.len) as usize];
        let n = read_at(&self.file, &mut buf, self.seen.len).map_err(|e| self.io("reading", e))?;
        buf.truncate(n);
        let mut keys = Vec::new();
        let mut used = 0;
        for raw in buf.split_inclusive(|b| *b == b'\n') {
            if raw.last() != Some(&b'\n') {
                break;
            }
            let Some(line) = parse_line(raw, false) else {
                return Ok(News::Reset);
            };
            used += raw.len();
            match &line {
                Line::Change(kind, key) | Line::New { kind, key, .. } => keys.push((*kind, *key)),
                Line::Synced { .. } => {}
            }
            self.note(&line, self.seen.len + used as u64);
        }
        self.seen = pos_of(&meta, self.seen.len + used as u64);
        Ok(News::Keys(keys))
    }

    /// Appends one change. The caller holds the pool lock exclusively and has read the log
    /// to its end.
    pub(super) fn append(&mut self, kind: Kind, key: u64) -> Result<()> {
        let line = format!("{} {key:016x}\n", kind.tag() as char);
        debug_assert_eq!(line.len(), LINE_LEN);
        self.write_line(&line)?;
        let meta = self.metadata()?;
        self.seen = pos_of(&meta, meta.len());
        self.unsynced.remove(&(kind, key));
        Ok(())
    }

    /// Appends the journaled line of a new record `(kind, key)` whose file will hold `bytes`
    /// (UTF-8: a record's JSON), written by the store of `owner`; returns where it ends. Not
    /// durable until [`ChangeLog::sync`]. The caller holds the pool lock exclusively and has
    /// read the log to its end.
    pub(super) fn append_new(
        &mut self,
        kind: Kind,
        key: u64,
        owner: u64,
        bytes: &[u8],
    ) -> Result<u64> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::internal("a record to journal is not UTF-8"))?;
        let quoted = serde_json::to_string(text)
            .map_err(|e| Error::internal(format!("journaling a record: {e}")))?;
        let line = format!(
            "+{} {key:016x} {owner:016x} {:016x} {quoted}\n",
            kind.tag() as char,
            check(bytes)
        );
        self.write_line(&line)?;
        let meta = self.metadata()?;
        self.seen = pos_of(&meta, meta.len());
        let end = meta.len();
        self.unsynced.insert((kind, key), Unsynced { owner, end });
        Ok(end)
    }

    /// Appends `=<owner> <epoch> <through>`: the journaled lines of `owner` in `epoch` that end
    /// at or before `through` have durable files. Leaves what this process has read where it
    /// was (the line is read back like anyone's). The caller holds the pool lock exclusively
    /// and syncs the log after.
    pub(super) fn append_synced(&mut self, owner: u64, epoch: u64, through: u64) -> Result<()> {
        let line = format!("={owner:016x} {epoch:016x} {through:016x}\n");
        self.write_line(&line)
    }

    /// Appends one line whole, or nothing: a write that fails part way (a full file system)
    /// is cut off again, so the next line never glues onto a fragment. The caller holds the
    /// pool lock exclusively.
    fn write_line(&mut self, line: &str) -> Result<()> {
        let before = self.metadata()?.len();
        let written = (&self.file).write_all(line.as_bytes());
        written.map_err(|e| {
            if let Err(cut) = self.file.set_len(before) {
                tracing::warn!(log = %self.path.display(), error = %cut,
                    "could not cut off a failed append to the change log");
                self.suspect = true;
            }
            self.io("appending to", e)
        })
    }

    /// Ends a torn last line (bytes without a newline) with one, so that the next line is not
    /// glued onto it. The caller holds the pool lock exclusively.
    pub(super) fn end_torn_tail(&mut self) -> Result<()> {
        let len = self.metadata()?.len();
        let mut last = [0u8; 1];
        if len <= HEADER_LEN
            || read_at(&self.file, &mut last, len - 1).map_err(|e| self.io("reading", e))? != 1
        {
            return Ok(());
        }
        if last[0] != b'\n' {
            self.write_line("\n")?;
        }
        Ok(())
    }

    /// Makes what was appended durable (fdatasync). A failure leaves the log suspect.
    pub(super) fn sync(&mut self) -> Result<()> {
        let synced = self.file.sync_data();
        synced.map_err(|e| {
            self.suspect = true;
            self.io("syncing", e)
        })
    }

    /// Whether an fdatasync of the log failed since its last reset: every line must then be
    /// synced before what it stands for is made durable.
    pub(super) fn suspect(&self) -> bool {
        self.suspect
    }

    /// Past 8 MiB: due for a reset (`Store::reset_long_log`).
    pub(super) fn is_long(&self) -> bool {
        self.seen.len > RESET_AT
    }

    /// Starts the log afresh under a new epoch. The caller holds the pool lock exclusively.
    /// The new header is written over the old one first and the lines cut off after it: a
    /// failure on the way leaves the old log (or the new, empty one), never one without a
    /// header, which would drop journaled lines appended after it.
    pub(super) fn reset(&mut self) -> Result<()> {
        let epoch = new_epoch();
        let len = self.metadata()?.len();
        if len >= HEADER_LEN {
            // The append-only descriptor cannot write at an offset: a second one.
            let at = OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(|e| self.io("resetting", e))?;
            at.write_all_at(header(epoch).as_bytes(), 0)
                .map_err(|e| self.io("resetting", e))?;
            self.file
                .set_len(HEADER_LEN)
                .map_err(|e| self.io("resetting", e))?;
        } else {
            self.file.set_len(0).map_err(|e| self.io("resetting", e))?;
            (&self.file)
                .write_all(header(epoch).as_bytes())
                .map_err(|e| self.io("resetting", e))?;
        }
        self.file.sync_all().map_err(|e| self.io("syncing", e))?;
        self.epoch = epoch;
        self.unsynced.clear();
        self.suspect = false;
        let meta = self.metadata()?;
        self.seen = pos_of(&meta, meta.len());
        Ok(())
    }
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The first 64 bits of the SHA-256 of `bytes`: what a journaled line carries to tell its
/// record's bytes whole.
fn check(bytes: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// One whole line (with its newline), or `None` when it is not a line of the log. A journaled
/// line's bytes are decoded and checked only with `decode` (else they are left empty).
fn parse_line(line: &[u8], decode: bool) -> Option<Line> {
    let body = line.strip_suffix(b"\n")?;
    let hex = |b: &[u8]| super::kinds::parse_key(std::str::from_utf8(b).ok()?);
    match body.first()? {
        b'+' => {
            // +<tag> <key> <owner> <check> <json string>
            let kind = Kind::from_tag(*body.get(1)?)?;
            let fields = body.get(2..)?;
            let (mut at, mut nums) = (0, [0u64; 3]);
            for n in &mut nums {
                if fields.get(at) != Some(&b' ') {
                    return None;
                }
                *n = hex(fields.get(at + 1..at + 17)?)?;
                at += 17;
            }
            if fields.get(at) != Some(&b' ') {
                return None;
            }
            let quoted = fields.get(at + 1..)?;
            let [key, owner, sum] = nums;
            if !decode {
                let whole = quoted.len() >= 2 && quoted[0] == b'"' && quoted.ends_with(b"\"");
                return whole.then_some(Line::New {
                    kind,
                    key,
                    owner,
                    bytes: Vec::new(),
                });
            }
            let text: String = serde_json::from_slice(quoted).ok()?;
            let bytes = text.into_bytes();
            (check(&bytes) == sum).then_some(Line::New {
                kind,
                key,
                owner,
                bytes,
            })
        }
        b'=' => {
            // =<owner> <epoch> <through>
            if body.len() != 1 + 16 * 3 + 2 || body[17] != b' ' || body[34] != b' ' {
                return None;
            }
            Some(Line::Synced {
                owner: hex(&body[1..17])?,
                epoch: hex(&body[18..34])?,
                through: hex(&body[35..51])?,
            })
        }
        _ => {
            if line.len() != LINE_LEN || line[1] != b' ' {
                return None;
            }
            let kind = Kind::from_tag(line[0])?;
            Some(Line::Change(kind, hex(&line[2..LINE_LEN - 1])?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_reader_sees_appends_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _, locks) = open(dir.path()).unwrap();
        let (mut b, b_changes, _) = open(dir.path()).unwrap();
        b.rewind().unwrap();
        b_changes.seen(b.seen);
        assert!(!b_changes.changed().unwrap());
        {
            let _l = locks.pool_exclusive().unwrap();
            a.rewind().unwrap();
            a.append(Kind::Volume, 7).unwrap();
            a.append(Kind::Snapshot, 9).unwrap();
        }
        assert!(b_changes.changed().unwrap());
        match b.read_new().unwrap() {
            News::Keys(k) => assert_eq!(k, vec![(Kind::Volume, 7), (Kind::Snapshot, 9)]),
            _ => panic!("expected keys"),
        }
        b_changes.seen(b.seen);
        assert!(!b_changes.changed().unwrap());
        assert!(matches!(b.read_new().unwrap(), News::None));
        a.reset().unwrap();
        assert!(matches!(b.read_new().unwrap(), News::Reset));
    }

    #[test]
    fn journaled_lines_stay_unsynced_until_their_owner_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _, locks) = open(dir.path()).unwrap();
        let (mut b, _, _) = open(dir.path()).unwrap();
        let _l = locks.pool_exclusive().unwrap();
        a.rewind().unwrap();
        b.rewind().unwrap();
        let bytes = b"{\n  \"id\": \"p.0000000000000007\"\n}".to_vec();
        let end7 = a.append_new(Kind::Volume, 7, 0xa, &bytes).unwrap();
        let end8 = a.append_new(Kind::Volume, 8, 0xa, &bytes).unwrap();
        a.append_new(Kind::Snapshot, 9, 0xb, &bytes).unwrap();
        assert!(a.is_unsynced(Kind::Volume, 7));
        match b.read_new().unwrap() {
            News::Keys(k) => assert_eq!(
                k,
                vec![(Kind::Volume, 7), (Kind::Volume, 8), (Kind::Snapshot, 9)]
            ),
            _ => panic!("expected keys"),
        }
        assert!(b.is_unsynced(Kind::Volume, 8));
        // Covers 7 only; another epoch's line covers nothing.
        a.append_synced(0xa, a.epoch(), end7).unwrap();
        a.append_synced(0xa, a.epoch() ^ 1, end8).unwrap();
        // A plain line supersedes the journaled one of 9.
        a.append(Kind::Snapshot, 9).unwrap();
        b.read_new().unwrap();
        assert!(!b.is_unsynced(Kind::Volume, 7));
        assert!(b.is_unsynced(Kind::Volume, 8));
        assert!(!b.is_unsynced(Kind::Snapshot, 9));
        let scan = b.scan().unwrap();
        assert!(!scan.torn);
        assert_eq!(scan.unsynced.len(), 1);
        let j = &scan.unsynced[0];
        assert_eq!(
            (j.kind, j.key, j.owner, j.end),
            (Kind::Volume, 8, 0xa, end8)
        );
        assert_eq!(j.bytes, bytes);
        // A reader that starts afresh finds the same.
        b.rewind().unwrap();
        assert!(b.is_unsynced(Kind::Volume, 8) && !b.is_unsynced(Kind::Volume, 7));
    }

    #[test]
    fn a_journaled_line_whose_bytes_do_not_check_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _, _) = open(dir.path()).unwrap();
        a.rewind().unwrap();
        a.append_new(Kind::Volume, 1, 0xa, b"{}").unwrap();
        let text = std::fs::read_to_string(dir.path().join("changes")).unwrap();
        let line = text.lines().last().unwrap().to_string();
        assert!(parse_line(format!("{line}\n").as_bytes(), true).is_some());
        // One byte of the record changed: its check fails.
        let bad = line.replace("{}", "{ }");
        assert!(parse_line(format!("{bad}\n").as_bytes(), true).is_none());
        assert!(parse_line(format!("{bad}\n").as_bytes(), false).is_some());
        (&a.file).write_all(b"+v 00000000").unwrap();
        let scan = a.scan().unwrap();
        assert!(scan.torn);
        assert_eq!(scan.unsynced.len(), 1);
    }

    #[test]
    fn half_written_lines_wait_and_garbage_resets() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _, _) = open(dir.path()).unwrap();
        a.rewind().unwrap();
        (&a.file).write_all(b"v 00000000").unwrap();
        assert!(matches!(a.read_new().unwrap(), News::Keys(k) if k.is_empty()));
        (&a.file).write_all(b"00000001\n").unwrap();
        assert!(matches!(a.read_new().unwrap(), News::Keys(k) if k == vec![(Kind::Volume, 1)]));
        (&a.file).write_all(b"garbage here......\n").unwrap();
        assert!(matches!(a.read_new().unwrap(), News::Reset));
    }
}
