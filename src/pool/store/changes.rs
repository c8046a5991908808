//! The change log: `<pool>/changes`, one line `<tag> <16 hex key>` per commit, appended under
//! the exclusive pool lock before the commit's rename. It tells a process which records
//! other processes changed since it last looked; the records stay the truth (the log is not
//! fsynced: after a crash of the machine every process rebuilds its index anyway).
//!
//! The first line, `virtdisk-csi changes v1 <epoch>`, names the log's epoch. Past 8 MiB a
//! commit starts the log afresh under a new epoch; a process that finds a new epoch, or a
//! shorter log, re-reads every record.

use super::kinds::Kind;
use super::locks::Locks;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &str = "virtdisk-csi changes v1 ";
const HEADER_LEN: u64 = MAGIC.len() as u64 + 16 + 1;
const LINE_LEN: usize = 19;
const RESET_AT: u64 = 8 << 20;

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

    /// Takes the log as it is now as read (before a full re-read of the records).
    pub(super) fn rewind(&mut self) -> Result<()> {
        self.epoch = self.read_epoch()?.unwrap_or(0);
        let meta = self.metadata()?;
        self.seen = pos_of(&meta, meta.len());
        Ok(())
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
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') {
                break;
            }
            match parse_line(line) {
                Some(k) => keys.push(k),
                None => return Ok(News::Reset),
            }
            used += line.len();
        }
        self.seen = pos_of(&meta, self.seen.len + used as u64);
        Ok(News::Keys(keys))
    }

    /// Appends one change. The caller holds the pool lock exclusively and has read the log
    /// to its end.
    pub(super) fn append(&mut self, kind: Kind, key: u64) -> Result<()> {
        let line = format!("{} {key:016x}\n", kind.tag() as char);
        debug_assert_eq!(line.len(), LINE_LEN);
        (&self.file)
            .write_all(line.as_bytes())
            .map_err(|e| self.io("appending to", e))?;
        let meta = self.metadata()?;
        self.seen = pos_of(&meta, meta.len());
        Ok(())
    }

    pub(super) fn needs_reset(&self) -> bool {
        self.seen.len > RESET_AT
    }

    /// Starts the log afresh under a new epoch. The caller holds the pool lock exclusively.
    pub(super) fn reset(&mut self) -> Result<()> {
        let epoch = new_epoch();
        self.file.set_len(0).map_err(|e| self.io("resetting", e))?;
        (&self.file)
            .write_all(header(epoch).as_bytes())
            .map_err(|e| self.io("resetting", e))?;
        self.file.sync_all().map_err(|e| self.io("syncing", e))?;
        self.epoch = epoch;
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

fn parse_line(line: &[u8]) -> Option<(Kind, u64)> {
    if line.len() != LINE_LEN || line[1] != b' ' {
        return None;
    }
    let kind = Kind::from_tag(line[0])?;
    let key = super::kinds::parse_key(std::str::from_utf8(&line[2..LINE_LEN - 1]).ok()?)?;
    Some((kind, key))
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
