//! The pool store: every record of one pool (volumes, snapshots, flattening jobs), written
//! durably to the pool directory and indexed in memory.
//!
//! # Design
//!
//! **The pool is the only durable truth; memory indexes it.** Each record is one JSON file,
//! `<kind dir>/<key>.json` (`volumes/`, `snapshots/`, `flatten/`), in the layout every earlier
//! version wrote, so existing pools open unchanged. The [`Index`] holds a compact entry per
//! record (what listings, name lookups, capacity sums and layer garbage collection need; not
//! parameters or disk options, which are read from the record file when an operation needs
//! them). It is built once when the pool opens — each record file is read once — and kept
//! exact by the code that writes records: a change enters the index only after it is durable.
//!
//! **One record layout, one listing, one commit.** A record kind is a [`Record`] type: its
//! directory, its change-log tag, how its key is spelt, and the index entry it makes. Reading,
//! listing, writing and removing are generic over it ([`Store::put`], [`Store::remove`],
//! [`Store::read`], the start-up listing in [`Store::open`]). Adding a kind — the group
//! snapshots of a later change, whose records name several snapshots — is a new [`Kind`]
//! variant, a record type with its `Record` impl and an index table; the commit protocol,
//! the change log, locking, recovery and listing need no change.
//!
//! **A commit is one durable write**, the floor of any crash-safe store: the record goes to a
//! temp file in its directory, which is fsynced; then, under the pool lock, the change is
//! logged, the temp file is renamed over the record, the directory fsynced and the index
//! updated. A removal moves the record away and fsyncs the directory. Image layers that no
//! record names any more after a commit (reference counts in the index) are removed right
//! after it, unless a process holds one open (then a later start's sweep collects it). A new
//! overlay is written and fsynced *before* the commit that names it, so a crash leaves at most
//! an unnamed file, which the next open collects.
//!
//! **A new blank volume is journaled: one fdatasync** ([`Store::put_new_with`]), CreateVolume's
//! hot path, below the floor of a durable file write (write, fsync, rename, fsync directory:
//! two device flushes). Its image header (written here, see `qcow2`, no `qemu-img` process)
//! and its record's temp file are written; under the pool lock, the record's bytes are
//! appended to the change log as one self-checking line and the log is fdatasynced (the
//! create is durable now), the record renamed into place (nothing is replaced: the key is
//! new) and the index updated. The files are made durable right after, off the request path,
//! by the store's checkpointer (`journal`), which then logs that they are. What needs them
//! durable sooner makes them so itself: a commit that changes such a record (publish marks
//! it handed to a writer, a snapshot freezes its image) syncs its files first, and a log reset
//! syncs what is pending. When the pool opens, the journaled creates of stores that are gone
//! are replayed: a record file a crash of the machine lost or emptied is written again from
//! its line, and the caller writes a lost blank image again (`Pool::recover`; it held no
//! data: nothing was changed since the create). A crash before the line is durable leaves no
//! record, an empty record file (removed at the next open as a create never answered:
//! `recover`), or a whole one (a create never answered, found by name when retried); an
//! empty image that lost its blocks is written again before use (`qcow2::repair_empty`). A
//! record's file key is checked against the id inside it, so a block of another record can
//! never pass for it.
//!
//! **A record that cannot be read** (not JSON, torn, another record's bytes) stays out of the
//! index but is remembered with why (`Index::readable`): every lookup of its id answers
//! `Error::UnreadableRecord` (FAILED_PRECONDITION, with the file and what to do), never "does
//! not exist", and no name of its kind can be told free meanwhile (`Index::names_known`).
//!
//! **Spare inodes** (`spares`): a removed record or layer keeps its inode as an emptied
//! `.spare-*` file, which a later new record or layer takes instead of allocating one (on ext4
//! without a journal, allocating after many deletes costs ~1 ms of system time).
//!
//! **Ids unique over time.** Volume and snapshot keys are 64 random bits (`ids`); the name is
//! the idempotency key, found through the index (a name hash → key map, confirmed against the
//! record). A volume created again under a reused name gets a new id, so snapshots of the old
//! volume never list under the new one. Ids made by earlier versions (keys derived from names)
//! look the same and stay valid.
//!
//! **Several processes on one pool** (controller instances on a shared pool, as Nomad runs
//! them). Locks live in the pool, as fcntl open-file-description byte-range locks on the
//! `changes` file (NFS honours them; the kernel frees a dead process's locks):
//! - the *pool lock* (one byte, exclusive, waited for briefly) covers every commit;
//! - an *object lock* per volume, snapshot, volume name and snapshot name (one byte each, at
//!   an offset derived from the key or the name's hash) is held for a whole operation; an
//!   operation that cannot get it at once answers ABORTED. The same lock excludes threads of
//!   one process, so it is also the per-volume operation guard.
//! - The `changes` file is also a change log: every commit appends `<tag> <key>` under the
//!   pool lock before its rename. A process compares the log's size with what it has read
//!   before it answers (one `fstat`) and, when another process committed, re-reads just the
//!   records named since (under the pool lock shared, so never half a commit). Commits catch up
//!   the same way under the exclusive lock, so name uniqueness, restore preconditions and
//!   garbage collection are always decided on the pool's current state. The log is reset when
//!   it passes 8 MiB; a process that sees the reset re-reads every record.
//! - Recovery never touches what a live process is doing: a half-done record is finished or
//!   undone only by whoever holds its object lock (at open, or when an operation takes the
//!   lock and finds it), an unnamed layer file is collected only while its volume's lock is
//!   free, and a temp file only when its writer's lock on it is gone.
//!
//! **Blocking I/O** runs on `exec::blocking` (the async methods of `Pools`); everything in this
//! module is blocking and cheap to call from there.
//!
//! On NFS, a process's own commits and every decision taken under the pool lock see the other
//! processes' writes at once (taking a lock revalidates NFS caches); plain reads (listings,
//! lookups) see them as soon as the client's attribute cache for `changes` expires (`actimeo`).

mod changes;
mod index;
mod journal;
mod kinds;
mod locks;
mod spares;

pub(crate) use index::{Index, Layer, VolumeEntry};
pub(crate) use kinds::{parse_id, parse_key, Kind, Record};
pub(crate) use locks::{file_is_locked, lock_whole_file, ObjectLock, Slot};

use crate::error::{Error, Result};
use crate::fsutil;
use changes::{ChangeLog, Changes};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

/// One record of a `put_batch`: its kind, key and bytes, and how it enters the index.
pub(crate) struct Staged<'a> {
    kind: Kind,
    key: u64,
    bytes: Vec<u8>,
    apply: Box<dyn FnOnce(&mut Index) + 'a>,
}

impl<'a> Staged<'a> {
    /// `rec`, ready for a batch.
    pub(crate) fn of<R: Record>(rec: &'a R) -> Result<Staged<'a>> {
        let key = rec.key()?;
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::internal(format!("serializing a {} record: {e}", R::KIND.dir())))?;
        Ok(Staged {
            kind: R::KIND,
            key,
            bytes,
            apply: Box::new(move |index| rec.insert_into(index, key)),
        })
    }
}

/// A journaled create the open-time replay settled (`Store::take_replayed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub kind: Kind,
    pub key: u64,
    /// Its record file was missing or not what the line held, and was written again.
    pub rewritten: bool,
}

/// What a commit does to its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Write,
    Remove,
}

/// What a commit left for the caller: the layer files it removed because nothing names them
/// any more. One it could not remove (a process holds it open, or unlinking failed) is left to
/// the open-time sweep of a later start, and not listed.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    pub freed: Vec<String>,
}

/// What became of a layer file nothing names ([`Store::unlink_layer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unlinked {
    /// Removed (unlinked, or kept as an emptied spare inode).
    Removed,
    /// Already gone.
    Gone,
    /// Left where it is: a process holds it open, or it could not be removed (logged).
    Left,
}

/// The records of one pool, on disk and in memory.
pub(crate) struct Store {
    dir: PathBuf,
    pool: String,
    index: RwLock<Index>,
    /// The change log and the pool lock share one file descriptor; the mutex orders this
    /// process's commits and catch-ups (one open file description holds one lock state).
    log: Arc<Mutex<ChangeLog>>,
    changes: Changes,
    locks: Arc<locks::Locks>,
    /// Spare inodes of each record directory (`Kind::ALL` order).
    record_spares: [spares::Spares; 4],
    /// Spare inodes of `images/`.
    image_spares: spares::Spares,
    /// Makes the files of journaled creates durable in the background (`journal`). Declared
    /// before the owner lock: dropped first, its last round runs while the lock still says
    /// this store is alive.
    checkpointer: journal::Checkpointer,
    /// This instance's owner token (its spares and journaled lines are its own), and its
    /// lock, held while it lives.
    owner: u64,
    _owner: ObjectLock,
    /// Records the open-time replay wrote or synced from the change log (`Store::replay`),
    /// for the caller to check the files they name (`Store::take_replayed`), and what to log
    /// settled after (`Store::finish_replay`): owner → where its last line ends, the epoch.
    replayed: Mutex<(Vec<Replayed>, HashMap<u64, u64>, u64)>,
    /// When a log reset was last put off because a gone store's journaled record is not here
    /// (`Store::reset_long_log`).
    reset_blocked: Mutex<Option<std::time::Instant>>,
    /// The unreadable records as last read (their files' stamps), so that one mended or
    /// removed by hand is read again at the next request (`Store::sync`), not at a restart.
    unreadable_seen: Mutex<HashMap<(Kind, u64), Option<FileStamp>>>,
}

/// What tells a record file's contents changed without reading it: inode, length, times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file at `path`; `None` when there is none (or it cannot be looked at).
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A record file's bytes, if it exists.
type RecordBytes = Option<Vec<u8>>;

/// Records read by a helper thread at start-up: their bytes back to back, and per key where
/// its bytes are (or that it vanished, or why it could not be read).
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    items: Vec<(u64, std::io::Result<Option<std::ops::Range<usize>>>)>,
}

impl Batch {
    fn push(&mut self, key: u64, read: std::io::Result<Option<&[u8]>>) {
        let item = read.map(|bytes| {
            bytes.map(|b| {
                let start = self.data.len();
                self.data.extend_from_slice(b);
                start..self.data.len()
            })
        });
        self.items.push((key, item));
    }
}

/// Reads the files of one directory by name, through the directory's descriptor and one
/// buffer (start-up reads every record: no path walk, no allocation per file).
struct DirReader {
    dir: fs::File,
    buf: Vec<u8>,
}

impl DirReader {
    fn open(dir: &Path) -> Result<DirReader> {
        let dir =
            fs::File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        Ok(DirReader {
            dir,
            buf: vec![0; 16 << 10],
        })
    }

    /// The bytes of file `name`, or `None` when it vanished meanwhile.
    fn read(&mut self, name: &str) -> std::io::Result<Option<&[u8]>> {
        use nix::fcntl::{openat, OFlag};
        use std::io::Read;
        let fd = match openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // A record fits the buffer: one read returns all of it (a regular file reads short
        // only at its end); a bigger one is read on to the end.
        let mut file = fs::File::from(fd);
        let mut len = 0;
        loop {
            if len == self.buf.len() {
                self.buf.resize(len * 2, 0);
            }
            let n = match file.read(&mut self.buf[len..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            len += n;
            if n == 0 || len < self.buf.len() {
                break;
            }
        }
        Ok(Some(&self.buf[..len]))
    }
}

/// The largest record `put_new_with` commits in one round: one block of the file system, which a
/// crash leaves whole or empty.
const ONE_BLOCK: usize = 4096;

/// The temp file names this store writes: `.tmp-<random>` in a record directory.
const TEMP_PREFIX: &str = ".tmp-";

/// The error for a pool record file (`record`, its path) whose bytes are not a record
/// (`why`): what to do, and what removing it would cost (the image files only it names are
/// collected at the next start, so "moving it aside" alone gives their data up).
pub(crate) fn corrupt_record(record: &str, why: &dyn std::fmt::Display) -> Error {
    Error::UnreadableRecord(format!(
        "record {record} is corrupt ({why}): restore it from a backup or mend its JSON. While \
         it is unreadable the pool collects no unused image files; removing it gives up what it \
         describes, and the image files only it names are deleted at the next start (move them \
         out of the pool first to keep their data)"
    ))
}

impl Store {
    /// Opens the store of the pool at `dir`: creates the directories, reads every record once
    /// into the index. Recovery of half-done work is the caller's (it knows the kinds' rules);
    /// see [`Store::unsettled`] and [`Store::sweep`].
    pub(crate) fn open(pool: &str, dir: &Path) -> Result<Store> {
        for kind in Kind::ALL {
            let d = dir.join(kind.dir());
            fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("creating pool directory {}", d.display()), e))?;
        }
        let images = dir.join("images");
        fs::create_dir_all(&images)
            .map_err(|e| Error::io(format!("creating pool directory {}", images.display()), e))?;
        let (log, changes, locks) = changes::open(dir)?;
        let (owner, owner_lock) = loop {
            let token = crate::ids::random_u64();
            if let Some(held) = locks.object(Slot::Owner(token))? {
                break (token, held);
            }
        };
        let spare_dir = |d: PathBuf| spares::Spares::new(d, owner);
        let (log, locks) = (Arc::new(Mutex::new(log)), Arc::new(locks));
        let mut dirs: Vec<PathBuf> = Kind::ALL.iter().map(|k| dir.join(k.dir())).collect();
        dirs.push(images.clone());
        let checkpointer =
            journal::Checkpointer::start(pool, owner, log.clone(), locks.clone(), &dirs);
        let store = Store {
            dir: dir.to_path_buf(),
            pool: pool.to_string(),
            index: RwLock::new(Index::default()),
            log,
            changes,
            locks,
            record_spares: Kind::ALL.map(|k| spare_dir(dir.join(k.dir()))),
            image_spares: spare_dir(images),
            checkpointer,
            owner,
            _owner: owner_lock,
            replayed: Mutex::default(),
            reset_blocked: Mutex::default(),
            unreadable_seen: Mutex::default(),
        };
        store.replay()?;
        store.reload_all()?;
        Ok(store)
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    fn record_path(&self, kind: Kind, key: u64) -> PathBuf {
        kind.record_path(&self.dir, key)
    }

    /// Reads every record of every kind into a fresh index (start-up, or after the change log
    /// was reset under us). Unreadable records are logged and left out; their layers are then
    /// unknown, so the open-time collection of unused layers stays off until they are fixed.
    fn reload_all(&self) -> Result<()> {
        let mut log = self.lock_log();
        {
            // Where the log stands, taken between commits: commits after it are caught up
            // later (a record read twice is harmless). The listing itself holds no pool lock.
            let _shared = self.locks.pool_shared()?;
            log.rewind()?;
        }
        self.rebuild(&mut log)
    }

    /// The one directory listing: keys of every record file of `kind` (temp files and names
    /// that are not keys of this kind are skipped).
    pub(crate) fn list_keys(&self, kind: Kind) -> Result<Vec<u64>> {
        let dir = self.dir.join(kind.dir());
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match kind.parse_file_key(stem) {
                Some(key) => keys.push(key),
                None if stem.starts_with('.') => {}
                None => tracing::warn!(pool = %self.pool, file = %stem, dir = %dir.display(),
                    "ignoring a record file whose name is not a key"),
            }
        }
        Ok(keys)
    }

    /// Reads one record file; `Ok(None)` when there is none.
    pub(crate) fn read<R: Record>(&self, key: u64) -> Result<Option<R>> {
        let path = self.record_path(R::KIND, key);
        fsutil::read_json_or(&path, |e| corrupt_record(&path.display().to_string(), &e))
    }

    /// The index, brought up to date with other processes' commits first.
    pub(crate) fn index(&self) -> Result<RwLockReadGuard<'_, Index>> {
        self.sync()?;
        Ok(self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Catches up with commits of other processes (a no-op costing one `fstat` when there were
    /// none), and reads again an unreadable record whose file changed since it was read (one
    /// mended or removed by hand; a `stat` per unreadable record, nothing when there is none).
    pub(crate) fn sync(&self) -> Result<()> {
        if self.changes.changed()? {
            let mut log = self.lock_log();
            let _shared = self.locks.pool_shared()?;
            self.catch_up(&mut log)?;
        }
        self.recheck_unreadable()
    }

    /// Reads again the unreadable records whose files changed since they were last read (or
    /// that were never looked at here since they became unreadable).
    fn recheck_unreadable(&self) -> Result<()> {
        let keys = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            if index.unreadable() == 0 {
                return Ok(());
            }
            index.unreadable_keys()
        };
        // The stats first, outside the mutex: concurrent requests do not queue behind them.
        let stamps: HashMap<(Kind, u64), Option<FileStamp>> = keys
            .into_iter()
            .map(|(kind, key)| ((kind, key), FileStamp::of(&self.record_path(kind, key))))
            .collect();
        let mut seen = self
            .unreadable_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        seen.retain(|k, _| stamps.contains_key(k));
        // Changed since last read: read again, and warned about if still unreadable. Never
        // looked at here (it became unreadable since): read again once, quietly (its
        // reader warned), since a mend may have come in between.
        let (mut changed, mut first) = (Vec::new(), Vec::new());
        for (k, now) in stamps {
            match seen.insert(k, now) {
                None => first.push(k),
                Some(before) if before != now => changed.push(k),
                Some(_) => {}
            }
        }
        drop(seen);
        if changed.is_empty() && first.is_empty() {
            return Ok(());
        }
        let _log = self.lock_log();
        let _shared = self.locks.pool_shared()?;
        self.reread(changed, Some("a changed record is still unreadable"));
        self.reread(first, None);
        Ok(())
    }

    /// Reads the records `keys` again into the index: a record now readable is indexed, one
    /// gone is removed, one unreadable is marked so (and warned about with `why`, if given).
    /// The caller holds the pool lock (shared or exclusive) and the log mutex.
    fn reread(&self, keys: Vec<(Kind, u64)>, why: Option<&str>) {
        let fresh: Vec<(Kind, u64, Result<RecordBytes>)> = keys
            .into_iter()
            .map(|(kind, key)| (kind, key, self.read_bytes(kind, key)))
            .collect();
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        for (kind, key, bytes) in fresh {
            let was_unreadable = index.readable(kind, key).is_err();
            let inserted = match bytes {
                Ok(Some(bytes)) => kind.insert_bytes(&mut index, &self.dir, key, &bytes),
                Ok(None) => {
                    kind.remove_from(&mut index, key);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            match inserted {
                Err(e) => {
                    if let Some(why) = why {
                        tracing::warn!(pool = %self.pool, kind = kind.dir(),
                            key = %kind.file_key(key), error = %e, "{why}");
                    }
                    kind.remove_from(&mut index, key);
                    index.set_unreadable(kind, key, &e);
                }
                Ok(()) if was_unreadable => {
                    tracing::info!(pool = %self.pool, kind = kind.dir(), key = %kind.file_key(key),
                        "an unreadable record was mended or removed: read again");
                }
                Ok(()) => {}
            }
        }
        // Layers another process freed are its to unlink; layers a mend leaves unnamed are
        // the next start's sweep's.
        index.take_freed();
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, ChangeLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what was logged since our last look and re-reads the records it names. The caller
    /// holds the pool lock (shared or exclusive) and the log mutex.
    fn catch_up(&self, log: &mut ChangeLog) -> Result<()> {
        match log.read_new()? {
            changes::News::None => {
                self.changes.seen(log.seen);
                Ok(())
            }
            changes::News::Reset => {
                tracing::info!(pool = %self.pool, "change log was reset; re-reading every record");
                log.rewind()?;
                self.rebuild(log)
            }
            changes::News::Keys(keys) => {
                let mut seen = HashSet::new();
                let keys: Vec<(Kind, u64)> = keys.into_iter().filter(|k| seen.insert(*k)).collect();
                self.reread(keys, Some("a record another process wrote is unreadable"));
                self.changes.seen(log.seen);
                Ok(())
            }
        }
    }

    /// One record file's bytes; `Ok(None)` when there is none.
    fn read_bytes(&self, kind: Kind, key: u64) -> Result<RecordBytes> {
        let path = self.record_path(kind, key);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Lists and reads every record into a new index, which replaces the current one.
    fn rebuild(&self, log: &mut ChangeLog) -> Result<()> {
        let started = std::time::Instant::now();
        let mut index = Index::default();
        for kind in Kind::ALL {
            let keys = self.list_keys(kind)?;
            self.load(kind, &keys, &mut index)?;
        }
        index.take_freed();
        index.shrink();
        tracing::info!(pool = %self.pool, volumes = index.volume_count(),
            ms = started.elapsed().as_millis() as u64, "read every record into the index");
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        self.changes.seen(log.seen);
        Ok(())
    }

    /// Reads the records `keys` of `kind` into `index`. Reading runs on helper threads, in
    /// batches, while this thread parses and indexes what they read: start-up time is the
    /// file system's, not the sum of both.
    fn load(&self, kind: Kind, keys: &[u64], index: &mut Index) -> Result<()> {
        const BATCH: usize = 512;
        let dir = self.dir.join(kind.dir());
        let batches: Vec<&[u64]> = keys.chunks(BATCH).collect();
        let readers = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, 4)
            .min(batches.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(readers * 2);
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..readers {
                let (tx, next, batches, dir) = (tx.clone(), &next, &batches, &dir);
                scope.spawn(move || {
                    let Ok(mut reader) = DirReader::open(dir) else {
                        return;
                    };
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(keys) = batches.get(i) else {
                            return;
                        };
                        let mut batch = Batch::default();
                        for &key in *keys {
                            let read = reader.read(&format!("{}.json", kind.file_key(key)));
                            batch.push(key, read);
                        }
                        if tx.send(batch).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut got = 0;
            for batch in rx {
                for (key, item) in batch.items {
                    got += 1;
                    let indexed = match item {
                        Ok(Some(range)) => {
                            kind.insert_bytes(index, &self.dir, key, &batch.data[range])
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(Error::io(
                            format!(
                                "reading record {}",
                                kind.record_path(&self.dir, key).display()
                            ),
                            e,
                        )),
                    };
                    if let Err(e) = indexed {
                        tracing::warn!(pool = %self.pool, kind = kind.dir(), key = %kind.file_key(key),
                            error = %e, "skipping an unreadable record");
                        index.set_unreadable(kind, key, &e);
                    }
                }
            }
            if got != keys.len() {
                return Err(Error::internal(format!(
                    "read {got} of the {} records in {}",
                    keys.len(),
                    dir.display()
                )));
            }
            Ok(())
        })
    }

    /// Writes `rec` as one durable commit. `check` runs under the pool lock on the index as
    /// it is then (after catching up with other processes) and may refuse the commit.
    pub(crate) fn put<R: Record>(
        &self,
        rec: &R,
        check: impl FnOnce(&Index) -> Result<()>,
    ) -> Result<Committed> {
        self.put_with(rec, &[], check)
    }

    /// `put`, making `alongside` (files the record will name, and their directory) durable at
    /// the same time as the record's temp file, before the commit.
    pub(crate) fn put_with<R: Record>(
        &self,
        rec: &R,
        alongside: &[(&fs::File, &Path)],
        check: impl FnOnce(&Index) -> Result<()>,
    ) -> Result<Committed> {
        self.put_batch(vec![Staged::of(rec)?], alongside, check)
    }

    /// Writes the record of a new object (a key no record file has), which names `alongside`
    /// (files written, not yet durable, and their directories), as one **journaled** commit:
    /// the record's bytes go to the change log, which is fdatasynced (one device flush, the
    /// create is durable), then the temp file is renamed into place and the index updated,
    /// all under the pool lock; the record file and `alongside` are fsynced later by the
    /// checkpointer (see the module documentation). After a crash of the machine the caller
    /// must be able to rebuild `alongside` from the record (`Store::take_replayed`), as a
    /// blank image can be. A key that has a record file already is an error; a failure after
    /// the line was written takes it back (a plain line supersedes it). A record of more than
    /// a block takes the two-round commit of [`Store::put_with`].
    pub(crate) fn put_new_with<R: Record>(
        &self,
        rec: &R,
        alongside: &[(&fs::File, &Path)],
        check: impl FnOnce(&Index) -> Result<()>,
    ) -> Result<Committed> {
        let staged = Staged::of(rec)?;
        if staged.bytes.len() > ONE_BLOCK {
            // A crash may leave a longer file half written rather than empty, which could not
            // be told from a damaged record: the two-round commit then.
            return self.put_batch(vec![staged], alongside, check);
        }
        let Staged {
            kind,
            key,
            bytes,
            apply,
        } = staged;
        let dir = self.dir.join(kind.dir());
        let temp = temp_file(&dir, &bytes, self.spares(kind).take())?;
        crate::failpoint!("store.temp-written");
        let path = self.record_path(kind, key);
        let mut files = Vec::with_capacity(alongside.len() + 1);
        for (f, p) in alongside {
            let dup = f
                .try_clone()
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
            files.push((dup, p.to_path_buf()));
        }
        {
            let mut log = self.lock_log();
            let _pool = self.locks.pool_exclusive()?;
            self.catch_up(&mut log)?;
            check(&self.index.read().unwrap_or_else(|p| p.into_inner()))?;
            let end = log.append_new(kind, key, self.owner, &bytes)?;
            if let Err(e) = log.sync() {
                self.unjournal(&mut log, kind, key);
                return Err(e);
            }
            crate::failpoint!("store.journaled");
            let file = match temp.persist_new(&path) {
                Ok(file) => file,
                Err(e) => {
                    self.unjournal(&mut log, kind, key);
                    return Err(Error::io(
                        format!("writing new record {}", path.display()),
                        e,
                    ));
                }
            };
            crate::failpoint!("store.renamed");
            {
                let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
                apply(&mut index);
                // A new record names only new files: it frees none.
                index.take_freed();
            }
            // Handed over before the pool lock goes: the checkpointer gets this store's lines
            // in log order, so an `=` line it writes never covers one it was not given.
            files.push((file, path));
            self.checkpointer.add(log.epoch(), end, files, vec![dir]);
            // Creates alone also fill the log.
            self.reset_if_long(&mut log);
            self.changes.seen(log.seen);
        }
        Ok(Committed::default())
    }

    /// Takes back a journaled line whose create did not finish: a plain line for the record
    /// supersedes it (replay skips it then), made durable if it can be.
    fn unjournal(&self, log: &mut ChangeLog, kind: Kind, key: u64) {
        let taken = log.append(kind, key).and_then(|()| log.sync());
        if let Err(e) = taken {
            tracing::warn!(pool = %self.pool, kind = kind.dir(), key = %kind.file_key(key), error = %e,
                "could not take back the journaled line of a create that failed; the next start \
                 may find its record");
        }
    }

    /// Open time, before the index is read: settles the journaled creates of stores that are
    /// gone (a crash, a kill, an exit before their checkpoint). Each record file is written
    /// again from its line when it is missing or not what the line holds (a crash of the
    /// machine lost it), then the files are fsynced; the caller checks the files the records
    /// name (`Store::take_replayed`) and then logs them settled (`Store::finish_replay`): until
    /// then they are replayed again at every open. Lines of live stores are theirs to settle.
    fn replay(&self) -> Result<()> {
        let mut log = self.lock_log();
        let _pool = self.locks.pool_exclusive()?;
        let scan = log.scan()?;
        if scan.torn {
            tracing::warn!(pool = %self.pool, log = %self.dir.join("changes").display(),
                "skipping bytes of the change log that a crash of the machine tore");
            log.end_torn_tail()?;
        }
        let mut alive: HashMap<u64, bool> = HashMap::new();
        let mut settled: HashMap<u64, u64> = HashMap::new();
        let mut replayed = Vec::new();
        let mut to_sync = Vec::new();
        for j in &scan.unsynced {
            if self.owner_alive(&mut alive, j.owner)? {
                continue;
            }
            let rewritten = self.settle_journaled(j, &mut to_sync)?;
            replayed.push(Replayed {
                kind: j.kind,
                key: j.key,
                rewritten,
            });
            let through = settled.entry(j.owner).or_default();
            *through = (*through).max(j.end);
        }
        sync_paths(to_sync)?;
        if !replayed.is_empty() {
            tracing::info!(pool = %self.pool, records = replayed.len(),
                "settling the journaled creates of processes that are gone");
        }
        let epoch = scan.epoch.unwrap_or(0);
        *self.replayed.lock().unwrap_or_else(|p| p.into_inner()) = (replayed, settled, epoch);
        Ok(())
    }

    /// Makes the record file of a journaled create hold the line's bytes (rewritten durably
    /// when it did not; true then), and adds it and its directory to `to_sync`.
    fn settle_journaled(&self, j: &changes::Journaled, to_sync: &mut Vec<PathBuf>) -> Result<bool> {
        let path = self.record_path(j.kind, j.key);
        let dir = self.dir.join(j.kind.dir());
        let rewritten = self.read_bytes(j.kind, j.key)?.as_deref() != Some(&j.bytes[..]);
        if rewritten {
            let temp = temp_file(&dir, &j.bytes, None)?;
            fsutil::sync_all_at_once(&[(temp.file(), &temp.path)])?;
            temp.persist(&path)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            tracing::warn!(pool = %self.pool, record = %path.display(),
                "wrote a record again from the change log: its create was durable there, but \
                 its file was lost or never written (the process or the machine crashed first)");
        }
        to_sync.push(path);
        to_sync.push(dir);
        Ok(rewritten)
    }

    /// Logs the journaled creates the open-time replay settled as settled (an `=` line per
    /// owner that is gone), once the caller has checked the files they name. Not called when
    /// that failed: the next open replays them again.
    pub(crate) fn finish_replay(&self) -> Result<()> {
        let (settled, epoch) = {
            let mut r = self.replayed.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut r.1), r.2)
        };
        if settled.is_empty() {
            return Ok(());
        }
        let mut log = self.lock_log();
        let _pool = self.locks.pool_exclusive()?;
        for (owner, through) in &settled {
            log.append_synced(*owner, epoch, *through)?;
        }
        log.sync()
    }

    /// Makes the files of this store's journaled creates durable now, and logs them so
    /// (the checkpointer's round, on the calling thread). Blocking.
    pub(crate) fn checkpoint(&self) -> Result<()> {
        self.checkpointer.flush()
    }

    /// The records the open-time replay settled (each once): the caller checks the files
    /// they name (a blank image a crash lost is written again), then calls
    /// [`Store::finish_replay`].
    pub(crate) fn take_replayed(&self) -> Vec<Replayed> {
        std::mem::take(&mut self.replayed.lock().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// Makes the files of the journaled creates `keys` durable (whoever journaled them): the
    /// record file and its directory, and a volume's image and `images/`. Before a commit
    /// that changes them. The caller holds the pool lock.
    fn sync_journaled(&self, keys: &[(Kind, u64)]) -> Result<()> {
        let mut paths: Vec<PathBuf> = Vec::new();
        {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            for (kind, key) in keys {
                paths.push(self.record_path(*kind, *key));
                paths.push(self.dir.join(kind.dir()));
                if let (Kind::Volume, Some(v)) = (kind, index.volume(*key)) {
                    paths.push(self.images_dir().join(v.image.to_string()));
                    paths.push(self.images_dir());
                }
            }
        }
        sync_paths(paths)
    }

    /// Whether the store of `owner` is alive (its owner lock is held; this store's is),
    /// remembered in `seen` for the rest of a pass.
    fn owner_alive(&self, seen: &mut HashMap<u64, bool>, owner: u64) -> Result<bool> {
        if let Some(alive) = seen.get(&owner) {
            return Ok(*alive);
        }
        let alive = owner == self.owner || self.locks.object(Slot::Owner(owner))?.is_none();
        seen.insert(owner, alive);
        Ok(alive)
    }

    /// A new layer file `images/<name>` (which must not exist), written by `write` into an
    /// empty file: a spare inode when there is one (`spares`), else a fresh file. Returns the
    /// open file, not yet fsynced. On error nothing is left behind.
    pub(crate) fn create_layer(
        &self,
        name: &str,
        write: impl Fn(&fs::File) -> std::io::Result<()>,
    ) -> Result<fs::File> {
        let path = self.images_dir().join(name);
        let ctx = |e| Error::io(format!("writing image {}", path.display()), e);
        if let Some((file, spare)) = self.image_spares.take() {
            if let Err(e) = spares::as_new(&file) {
                // Not fit to be a new file after all: a fresh one is made instead.
                tracing::debug!(file = %spare.display(), error = %e, "dropping a spare");
                let _ = fs::remove_file(&spare);
            } else {
                let made = write(&file).and_then(|()| spares::rename_noreplace(&spare, &path));
                return match made {
                    Ok(()) => Ok(file),
                    Err(e) => {
                        let _ = fs::remove_file(&spare);
                        Err(ctx(e))
                    }
                };
            }
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(spares::LAYER_MODE)
            .open(&path)
            .map_err(ctx)?;
        if let Err(e) = write(&file) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(ctx(e));
        }
        Ok(file)
    }

    /// Keys of `kind` whose record file is empty (or zero bytes only): a new record whose
    /// journaled commit (`put_new_with`) a crash of the machine cut short before its line was
    /// durable, its bytes never on the disk. Nothing else leaves such a file: every other write renames a durable temp
    /// file over the record. Only records the index could not read are looked at.
    pub(crate) fn torn_new(&self, kind: Kind) -> Result<Vec<u64>> {
        let keys = self.index()?.unreadable_of(kind);
        let mut torn = Vec::new();
        for key in keys {
            if let Some(bytes) = self.read_bytes(kind, key)? {
                if bytes.iter().all(|b| *b == 0) {
                    torn.push(key);
                }
            }
        }
        Ok(torn)
    }

    /// The spares of a record directory.
    fn spares(&self, kind: Kind) -> &spares::Spares {
        let at = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.record_spares[at]
    }

    /// Removes the record file at `path` durably: its inode is kept as a spare when there is
    /// room (`spares`), else it is unlinked; then the directory is fsynced. A missing file is
    /// not an error.
    fn remove_record_file(&self, kind: Kind, path: &Path) -> Result<()> {
        let dir = self.dir.join(kind.dir());
        match self.spares(kind).retire(path) {
            Ok(true) => fsutil::sync_dir(&dir),
            Ok(false) => fsutil::remove_durable(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                // Not kept (the record may or may not have moved): unlink it as before.
                tracing::debug!(file = %path.display(), error = %e, "could not keep a spare");
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
                }
                fsutil::sync_dir(&dir)
            }
        }
    }

    /// Removes a record as one durable commit (no error when it is already gone).
    pub(crate) fn remove<R: Record>(
        &self,
        key: u64,
        check: impl FnOnce(&Index) -> Result<()>,
    ) -> Result<Committed> {
        let path = self.record_path(R::KIND, key);
        self.commit_keys(
            &[(R::KIND, key)],
            Change::Remove,
            check,
            || self.remove_record_file(R::KIND, &path),
            |index| R::KIND.remove_from(index, key),
        )
    }

    /// Writes several records (of any kinds) as one commit, under one hold of the pool lock:
    /// each temp file, and `alongside`, made durable at once first; then (if `check` allows)
    /// every change logged, renamed into place, each directory synced once, and the index
    /// updated. Another process catching up
    /// sees all of them or none (it reads the log under the pool lock). Each record's rename
    /// is atomic on its own: a crash may land some of them, as separate `put`s would.
    pub(crate) fn put_batch(
        &self,
        items: Vec<Staged<'_>>,
        alongside: &[(&fs::File, &Path)],
        check: impl FnOnce(&Index) -> Result<()>,
    ) -> Result<Committed> {
        if items.is_empty() {
            return Ok(Committed::default());
        }
        let mut temps = Vec::with_capacity(items.len());
        for it in &items {
            let spare = self.spares(it.kind).take();
            temps.push(temp_file(&self.dir.join(it.kind.dir()), &it.bytes, spare)?);
        }
        let mut files: Vec<(&fs::File, &Path)> =
            temps.iter().map(|t| (t.file(), t.path.as_path())).collect();
        files.extend_from_slice(alongside);
        fsutil::sync_all_at_once(&files)?;
        crate::failpoint!("store.temp-synced");
        let keys: Vec<(Kind, u64)> = items.iter().map(|it| (it.kind, it.key)).collect();
        let paths: Vec<PathBuf> = keys
            .iter()
            .map(|(k, key)| self.record_path(*k, *key))
            .collect();
        let dirs: std::collections::BTreeSet<Kind> = keys.iter().map(|(k, _)| *k).collect();
        self.commit_keys(
            &keys,
            Change::Write,
            check,
            || {
                for (tmp, path) in temps.into_iter().zip(&paths) {
                    tmp.persist(path)
                        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                }
                for kind in &dirs {
                    fsutil::sync_dir(&self.dir.join(kind.dir()))?;
                }
                Ok(())
            },
            |index| {
                for it in items {
                    (it.apply)(index);
                }
            },
        )
    }

    /// The commit protocol shared by writes and removals of the records `keys` (logged
    /// together): pool lock, catch up, check, log the change, make it durable, update the
    /// index, unlock, unlink the layers it freed.
    fn commit_keys(
        &self,
        keys: &[(Kind, u64)],
        change: Change,
        check: impl FnOnce(&Index) -> Result<()>,
        durable: impl FnOnce() -> Result<()>,
        apply: impl FnOnce(&mut Index),
    ) -> Result<Committed> {
        let freed = {
            let mut log = self.lock_log();
            let _pool = self.locks.pool_exclusive()?;
            self.catch_up(&mut log)?;
            check(&self.index.read().unwrap_or_else(|p| p.into_inner()))?;
            // A record whose create is journaled but whose files may not be durable yet: its
            // files first, then a durable line that supersedes the journaled one (replay would
            // otherwise write the create's bytes over this change after a crash).
            let journaled: Vec<(Kind, u64)> = keys
                .iter()
                .copied()
                .filter(|(kind, key)| log.is_unsynced(*kind, *key))
                .collect();
            if !journaled.is_empty() && change == Change::Write {
                // (A removal needs only the durable line: nothing it leaves names the files.)
                self.sync_journaled(&journaled)?;
            }
            // Logged before the rename: a reader holds the pool lock shared while it reads the
            // log, so it never sees the line without the record that goes with it.
            for (kind, key) in keys {
                log.append(*kind, *key)?;
            }
            if !journaled.is_empty() || log.suspect() {
                log.sync()?;
            }
            crate::failpoint!("store.change-logged");
            durable()?;
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            apply(&mut index);
            let mut freed = index.take_freed();
            if index.unreadable() > 0 && !freed.is_empty() {
                // An unreadable record's layers are not counted: what this commit freed may
                // be under it. Left for the sweep of a start after it is mended or removed.
                tracing::warn!(pool = %self.pool, layers = freed.len(),
                    "not removing the layer files this change left unnamed: a record of the \
                     pool is unreadable and may use them; the first start after it is \
                     restored, mended or removed collects them");
                freed.clear();
            }
            // The reset reads the index (the images of journaled creates): not under this guard.
            drop(index);
            self.reset_if_long(&mut log);
            self.changes.seen(log.seen);
            freed
        };
        crate::failpoint!("store.committed");
        let mut out = Committed::default();
        for layer in freed {
            let name = layer.to_string();
            if self.unlink_layer(&name) == Unlinked::Removed {
                out.freed.push(name);
            }
        }
        Ok(out)
    }

    /// After a commit: starts the log afresh if it is past 8 MiB (`reset_long_log`). The
    /// change is committed already: a failure is logged, and the next commit tries again.
    /// The caller holds the pool lock and no guard of the index.
    fn reset_if_long(&self, log: &mut ChangeLog) {
        if !log.is_long() {
            return;
        }
        if let Err(e) = self.reset_long_log(log) {
            tracing::warn!(pool = %self.pool, error = %e,
                "could not start the change log afresh; the next change tries again");
        }
    }

    /// Starts a log past 8 MiB afresh. Journaled lines that are unsynced would be lost with
    /// it: this store's own, and those of stores that are gone (their files exist: a crash of
    /// the machine would have restarted this process too), have their files made durable
    /// here (once per 8 MiB of log); a live store's lines wait for its checkpoint. The caller
    /// holds the pool lock and has caught up.
    fn reset_long_log(&self, log: &mut ChangeLog) -> Result<()> {
        let mut alive: HashMap<u64, bool> = HashMap::new();
        let (mut keys, mut theirs) = (Vec::new(), Vec::new());
        for ((kind, key), u) in log.unsynced() {
            if u.owner != self.owner {
                if self.owner_alive(&mut alive, u.owner)? {
                    return Ok(());
                }
                theirs.push((kind, key));
            }
            keys.push((kind, key));
        }
        let dead = !theirs.is_empty();
        if dead {
            // A full read of the log: at most once a minute while the answer is no.
            let mut blocked = self.reset_blocked.lock().unwrap_or_else(|p| p.into_inner());
            let every = std::time::Duration::from_secs(if cfg!(test) { 0 } else { 60 });
            if blocked.is_some_and(|t| t.elapsed() < every) {
                return Ok(());
            }
            if !self.dead_lines_are_here(log)? {
                *blocked = Some(std::time::Instant::now());
                return Ok(());
            }
            *blocked = None;
        }
        if !keys.is_empty() {
            self.sync_journaled(&keys)?;
        }
        log.reset()?;
        // What a gone store's line named is indexed as its file now is.
        self.reread(
            theirs,
            Some("a record a process that is gone journaled is unreadable"),
        );
        Ok(())
    }

    /// Whether every unsynced line of a store that is gone has its record file here, holding
    /// its bytes. Not so when that store's host crashed with the files in its page cache (a
    /// pool shared over NFS): only the open-time replay of a restart settles them then (it
    /// writes them again), so the log is not reset before (warned about).
    fn dead_lines_are_here(&self, log: &ChangeLog) -> Result<bool> {
        let scan = log.scan()?;
        for j in scan.unsynced.iter().filter(|j| j.owner != self.owner) {
            if self.read_bytes(j.kind, j.key)?.as_deref() != Some(&j.bytes[..]) {
                tracing::warn!(pool = %self.pool, record = %self.record_path(j.kind, j.key).display(),
                    "not starting the change log afresh: a process that is gone (on this host or \
                     another sharing the pool) journaled a create whose record is not here; the \
                     next start of a controller on the pool writes it again");
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs `f` on the index as it is now in the pool (under the pool lock, shared, after
    /// catching up): for decisions that must not miss another process's last commit.
    pub(crate) fn with_current<T>(&self, f: impl FnOnce(&Index) -> T) -> Result<T> {
        let mut log = self.lock_log();
        let _pool = self.locks.pool_shared()?;
        self.catch_up(&mut log)?;
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        Ok(f(&index))
    }

    /// Removes a layer file that no record names: kept as an emptied spare inode (`spares`)
    /// when it can be, else unlinked (its directory entry is not fsynced: if the removal is
    /// lost in a crash, the next open collects the file again). The one place a layer file
    /// goes, after a commit and in the open-time sweep.
    ///
    /// Never one a process holds open: QEMU and qemu-storage-daemon lock every image they use
    /// (`file_is_locked`), and a layer no record names can still be in use (its record was
    /// removed by hand while the volume was attached). Unlinking it would leave its data only
    /// in a file that is gone when that process lets go; it is left, with a warning, for the
    /// sweep of a start after it is detached. This plugin holds no lock on a layer file of its
    /// own beyond an operation (which holds the volume's lock, so the sweep skips its files),
    /// so a file is left only while another process uses it.
    fn unlink_layer(&self, name: &str) -> Unlinked {
        let path = self.images_dir().join(name);
        match locks::file_is_locked(&path) {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(pool = %self.pool, file = %path.display(),
                    "not removing a layer file that no record names: a process holds it open \
                     (QEMU and qemu-storage-daemon lock the images they use); detach it, then \
                     the next start collects it");
                return Unlinked::Left;
            }
            Err(e) => {
                tracing::warn!(pool = %self.pool, file = %path.display(), error = %e,
                    "not removing a layer file that no record names: could not tell whether a \
                     process holds it open; the next start tries again");
                return Unlinked::Left;
            }
        }
        let kept = self.image_spares.retire(&path).unwrap_or(false);
        let removed = if kept { Ok(()) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => {
                tracing::info!(pool = %self.pool, layer = %name, "removed a layer nothing uses");
                crate::failpoint!("gc.layer-removed");
                Unlinked::Removed
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Unlinked::Gone,
            Err(e) => {
                tracing::warn!(pool = %self.pool, file = %path.display(), error = %e,
                    "could not remove a layer file that no record names; the next start will");
                Unlinked::Left
            }
        }
    }

    /// Takes the lock of one object (a volume, a snapshot, a name) at once, or answers
    /// ABORTED naming `what`.
    pub(crate) fn lock(&self, slot: Slot, what: &dyn Fn() -> String) -> Result<ObjectLock> {
        self.locks.object(slot)?.ok_or_else(|| {
            Error::Aborted(format!(
                "an operation on {} is already in progress (in this or another controller \
                 process); retry later",
                what()
            ))
        })
    }

    /// Like [`Store::lock`], but `None` when the object is busy.
    pub(crate) fn try_lock(&self, slot: Slot) -> Result<Option<ObjectLock>> {
        self.locks.object(slot)
    }

    /// Open-time housekeeping, blocking: removes temp files whose writer is gone, and layer
    /// files of this store's naming that no record names, no live operation is making and no
    /// process holds open (`unlink_layer`). Returns how many layer files went. Skipped (with a
    /// warning) while a record is unreadable.
    pub(crate) fn sweep(&self) -> Result<usize> {
        for kind in Kind::ALL {
            self.remove_stale_temp_files(&self.dir.join(kind.dir()))?;
        }
        let images = self.images_dir();
        self.remove_stale_temp_files(&images)?;
        if self.index()?.unreadable() > 0 {
            tracing::warn!(pool = %self.pool,
                "not collecting unused layers: a record could not be read; restore or mend it (the \
                 error that names it says how)");
            return Ok(0);
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(&images)
            .map_err(|e| Error::io(format!("listing {}", images.display()), e))?
        {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", images.display()), e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        let candidates: Vec<(String, u64)> = {
            let index = self.index()?;
            names
                .into_iter()
                .filter_map(|name| {
                    let layer = Layer::parse(&name);
                    let volume_key = layer.volume_key()?;
                    (!index.is_referenced(&layer)).then_some((name, volume_key))
                })
                .collect()
        };
        let mut removed = 0;
        for (name, volume_key) in candidates {
            // A live operation on that volume may be making the file right now.
            let Some(_held) = self.try_lock(Slot::Volume(volume_key))? else {
                continue;
            };
            let layer = Layer::parse(&name);
            let unused = self.with_current(|index| !index.is_referenced(&layer))?;
            if unused && self.unlink_layer(&name) == Unlinked::Removed {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes `.tmp-*` files (and `.part` files of earlier versions) whose writer is gone
    /// (a writer holds a lock on its temp file until the rename), and spare inodes of store
    /// instances that are gone (`spares`).
    fn remove_stale_temp_files(&self, dir: &Path) -> Result<()> {
        let mut spares_removed = 0;
        for entry in
            fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(owner) = spares::Spares::owner_of(&name) {
                // Another live instance's spare (or our own) stays; a dead one's goes.
                if self.try_lock(Slot::Owner(owner))?.is_some() {
                    spares_removed += 1;
                    fs::remove_file(&path)
                        .or_else(|e| match e.kind() {
                            std::io::ErrorKind::NotFound => Ok(()),
                            _ => Err(e),
                        })
                        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                }
                continue;
            }
            if !(name.starts_with(TEMP_PREFIX) || name.ends_with(".part")) {
                continue;
            }
            if locks::file_is_locked(&path)? {
                continue;
            }
            tracing::info!(pool = %self.pool, file = %path.display(), "removing a leftover temp file");
            fsutil::remove_durable(&path)?;
        }
        if spares_removed > 0 {
            tracing::info!(pool = %self.pool, dir = %dir.display(), removed = spares_removed,
                "removed the spare files of processes that are gone");
        }
        Ok(())
    }
}

/// A record's bytes in a temp file (not yet fsynced), removed on drop unless renamed into
/// place. A fresh temp file (`.tmp-*`) is locked until then; a spare (`.spare-*`) is this
/// store's by its owner lock.
struct Temp {
    /// `None` once renamed into place (the file was handed to the caller).
    file: Option<fs::File>,
    path: PathBuf,
}

impl Temp {
    fn file(&self) -> &fs::File {
        self.file.as_ref().expect("a temp file not yet placed")
    }

    /// Renames the temp file over `to`.
    fn persist(mut self, to: &Path) -> std::io::Result<fs::File> {
        fs::rename(&self.path, to)?;
        Ok(self.file.take().expect("a temp file not yet placed"))
    }

    /// Renames the temp file to `to`, which must not exist.
    fn persist_new(mut self, to: &Path) -> std::io::Result<fs::File> {
        spares::rename_noreplace(&self.path, to)?;
        Ok(self.file.take().expect("a temp file not yet placed"))
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// fsyncs the files and directories at `paths` at once, each once; a path that does not
/// exist (any more) is skipped.
fn sync_paths(mut paths: Vec<PathBuf>) -> Result<()> {
    paths.sort();
    paths.dedup();
    let mut open = Vec::with_capacity(paths.len());
    for p in paths {
        match fs::File::open(&p) {
            Ok(f) => open.push((f, p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("opening {}", p.display()), e)),
        }
    }
    let files: Vec<(&fs::File, &Path)> = open.iter().map(|(f, p)| (f, p.as_path())).collect();
    fsutil::sync_all_at_once(&files)
}

/// Writes `bytes` into a new temp file of `dir`, or into `spare` when given.
fn temp_file(dir: &Path, bytes: &[u8], spare: Option<(fs::File, PathBuf)>) -> Result<Temp> {
    let ctx = || format!("writing a record in {}", dir.display());
    let (file, path) = match spare {
        Some(spare) => spare,
        None => {
            let file = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempfile_in(dir)
                .map_err(|e| Error::io(ctx(), e))?;
            locks::lock_whole_file(file.as_file()).map_err(|e| Error::io(ctx(), e))?;
            file.keep().map_err(|e| Error::io(ctx(), e.error))?
        }
    };
    let temp = Temp {
        file: Some(file),
        path,
    };
    temp.file()
        .write_all(bytes)
        .map_err(|e| Error::io(ctx(), e))?;
    Ok(temp)
}

/// Hands the memory that start-up's reading freed back to the system (glibc keeps freed
/// memory in its arenas otherwise, so the resident size would stay at the start-up peak).
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own allocator state; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::record::VolumeRecord;

    fn record(key: u64) -> VolumeRecord {
        index::tests::vol(key, &format!("n{key}"), &format!("{key:016x}.qcow2"), &[])
    }

    /// A journaled create whose store died before its checkpoint, and whose record file a
    /// crash of the machine lost: the next open writes it again from the line, indexes it,
    /// hands it to the caller once, and logs it settled (a second open replays nothing).
    #[test]
    fn a_dead_stores_journaled_create_is_replayed_once() {
        let dir = tempfile::tempdir().unwrap();
        let (key, dead_owner) = (0x1234, 0xdead);
        let bytes = serde_json::to_vec_pretty(&record(key)).unwrap();
        {
            let store = Store::open("p", dir.path()).unwrap();
            let mut log = store.lock_log();
            let _pool = store.locks.pool_exclusive().unwrap();
            log.append_new(Kind::Volume, key, dead_owner, &bytes)
                .unwrap();
            log.sync().unwrap();
        }
        let path = Kind::Volume.record_path(dir.path(), key);
        assert!(!path.exists());
        let store = Store::open("p", dir.path()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert!(store.index().unwrap().volume(key).is_some());
        let replayed = Replayed {
            kind: Kind::Volume,
            key,
            rewritten: true,
        };
        assert_eq!(store.take_replayed(), vec![replayed]);
        assert!(store.take_replayed().is_empty());
        // Not logged settled before the caller says so: the next open replays it again.
        drop(store);
        let store = Store::open("p", dir.path()).unwrap();
        let again = Replayed {
            rewritten: false,
            ..replayed
        };
        assert_eq!(store.take_replayed(), vec![again]);
        store.finish_replay().unwrap();
        store.sync().unwrap();
        assert!(!store.lock_log().is_unsynced(Kind::Volume, key));
        drop(store);
        // Settled: the record removed by hand stays removed.
        fs::remove_file(&path).unwrap();
        let store = Store::open("p", dir.path()).unwrap();
        assert!(store.take_replayed().is_empty());
        assert!(!path.exists());
    }

    /// A live store's journaled lines are its own to settle: another store opening the pool
    /// leaves them (and sees them unsynced), then sees the owner's checkpoint clear them.
    #[test]
    fn a_live_stores_journaled_create_is_left_to_it_and_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open("p", dir.path()).unwrap();
        let rec = record(0x77);
        a.put_new_with(&rec, &[], |_| Ok(())).unwrap();
        let b = Store::open("p", dir.path()).unwrap();
        assert!(b.take_replayed().is_empty());
        assert!(b.index().unwrap().volume(0x77).is_some());
        // The checkpoint comes within its gathering time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            b.sync().unwrap();
            if !b.lock_log().is_unsynced(Kind::Volume, 0x77) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never checkpointed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // A change after a create: a plain line, no journaled one left anywhere.
        b.remove::<VolumeRecord>(0x77, |_| Ok(())).unwrap();
        a.sync().unwrap();
        assert!(a.index().unwrap().volume(0x77).is_none());
        assert!(a.lock_log().scan().unwrap().unsynced.is_empty());
    }

    /// The log is started afresh past its limit (64 KiB in tests) by creates alone and by
    /// other commits, with journaled creates still unsynced (their files are made durable
    /// first), and nothing is lost: a second store opened after sees every record.
    #[test]
    fn a_long_log_is_reset_under_creates_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("p", dir.path()).unwrap();
        let log_len = || fs::metadata(dir.path().join("changes")).unwrap().len();
        let (mut resets, mut last) = (0, log_len());
        let mut note = |resets: &mut i32| {
            let now = log_len();
            *resets += i32::from(now < last);
            last = now;
        };
        for key in 1..=400u64 {
            store.put_new_with(&record(key), &[], |_| Ok(())).unwrap();
            note(&mut resets);
        }
        assert!(resets >= 2, "creates alone reset the log {resets} times");
        // The unsynced line of a store that is gone, whose record is not here (its host
        // crashed with it in its page cache): no reset may drop it.
        let bytes = serde_json::to_vec_pretty(&record(7777)).unwrap();
        {
            let mut log = store.lock_log();
            let _pool = store.locks.pool_exclusive().unwrap();
            log.append_new(Kind::Volume, 7777, 0xdead, &bytes).unwrap();
        }
        resets = 0;
        for key in 401..=600u64 {
            store.put_new_with(&record(key), &[], |_| Ok(())).unwrap();
            store.remove::<VolumeRecord>(key, |_| Ok(())).unwrap();
            note(&mut resets);
        }
        assert_eq!(resets, 0, "a reset dropped a line whose record is not here");
        // Its record arrives (here: by hand): removals right after creates, past the limit,
        // commit and reset (its files are synced by path first).
        fs::write(Kind::Volume.record_path(dir.path(), 7777), &bytes).unwrap();
        for key in 601..=800u64 {
            store.put_new_with(&record(key), &[], |_| Ok(())).unwrap();
            store.remove::<VolumeRecord>(key, |_| Ok(())).unwrap();
            note(&mut resets);
        }
        assert!(resets >= 1, "the log was not reset: {}", log_len());
        assert_eq!(store.index().unwrap().volume_count(), 401);
        let other = Store::open("p", dir.path()).unwrap();
        assert_eq!(other.index().unwrap().volume_count(), 401);
        assert!(other.take_replayed().is_empty());
    }

    /// A change to a record whose create is still unsynced makes the create's files durable
    /// and its own line durable first: the journaled line is superseded.
    #[test]
    fn a_change_right_after_a_create_supersedes_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("p", dir.path()).unwrap();
        let mut rec = record(0x99);
        store.put_new_with(&rec, &[], |_| Ok(())).unwrap();
        rec.handed_to_writer = true;
        store.put(&rec, |_| Ok(())).unwrap();
        let scan = store.lock_log().scan().unwrap();
        assert!(scan.unsynced.is_empty(), "{:?}", scan.unsynced);
        let read: VolumeRecord = store.read(0x99).unwrap().unwrap();
        assert!(read.handed_to_writer);
    }
}
