//! Locks in the pool, shared by every process that opens it: fcntl open-file-description
//! (OFD) byte-range locks on the pool's `changes` file. They exclude other processes (NFS
//! honours them) and, because each lock is taken through its own open file description,
//! other threads of this process too; the kernel drops them when the holder dies.
//!
//! Offsets: the pool lock is one byte at 2^60; each object lock one byte at 2^61 + (kind, key),
//! far beyond anything the change log writes (locks and data do not interact anyway).

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOL_OFFSET: i64 = 1 << 60;
const OBJECT_BASE: i64 = 1 << 61;
/// How long a commit waits for another process's commit before giving up.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// What an object lock protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A volume (by key): every operation on it, and the layer files named after it.
    Volume(u64),
    /// A snapshot (by key).
    Snapshot(u64),
    /// A volume name (by its hash): CreateVolume of that name.
    VolumeName(u64),
    /// A snapshot name (by its hash): CreateSnapshot of that name.
    SnapshotName(u64),
    /// The flattening job of a volume (by the volume's key).
    Flatten(u64),
    /// A group snapshot (by key).
    Group(u64),
    /// A group snapshot name (by its hash): CreateVolumeGroupSnapshot of that name.
    GroupName(u64),
    /// A store instance (by its random owner token), held while it lives: its spare files
    /// (`spares`) are its own until then.
    Owner(u64),
}

impl Slot {
    fn offset(self) -> i64 {
        let (tag, id) = match self {
            Slot::Volume(k) => (0, k),
            Slot::Snapshot(k) => (1, k),
            Slot::VolumeName(h) => (2, h),
            Slot::SnapshotName(h) => (3, h),
            Slot::Flatten(k) => (4, k),
            Slot::Group(k) => (5, k),
            Slot::GroupName(h) => (6, h),
            Slot::Owner(t) => (7, t),
        };
        // 3 bits of kind and the low 58 bits of the id: distinct objects share a byte with
        // odds of 2^-58, and then only make each other wait.
        OBJECT_BASE | (tag << 58) | (id & ((1 << 58) - 1)) as i64
    }
}

fn range(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        // OFD locks require 0.
        l_pid: 0,
    }
}

/// Tries once; Ok(false) when another holder conflicts.
fn try_set(file: &File, lock: &libc::flock) -> std::io::Result<bool> {
    loop {
        match fcntl(file, FcntlArg::F_OFD_SETLK(lock)) {
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN | Errno::EACCES) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

pub(super) struct Locks {
    path: PathBuf,
    /// The open file description through which this process takes the pool lock (callers
    /// serialize on the store's log mutex, so it holds one state at a time).
    pool: File,
}

/// The pool lock, held until dropped.
pub(super) struct PoolLock<'a> {
    file: &'a File,
}

impl Drop for PoolLock<'_> {
    fn drop(&mut self) {
        let unlock = range(libc::F_UNLCK, POOL_OFFSET, 1);
        if let Err(e) = fcntl(self.file, FcntlArg::F_OFD_SETLK(&unlock)) {
            tracing::error!(error = %e, "could not release the pool lock");
        }
    }
}

/// The lock of one object, held until the last clone is dropped (a clone moves into each
/// blocking call made under it, so a cancelled RPC cannot release it while that call runs).
#[derive(Clone)]
pub(crate) struct ObjectLock {
    _held: Arc<HeldRange>,
}

/// One locked byte, released explicitly on drop. Closing the descriptor alone is not enough:
/// an OFD lock lasts until the last descriptor of its open file description closes, and a
/// child process forked at that moment holds a copy of every descriptor until its `exec`
/// (close-on-exec), so the lock would outlive its holder by that window and a following
/// operation on the object would be refused as "in progress".
struct HeldRange {
    file: File,
    offset: i64,
}

impl Drop for HeldRange {
    fn drop(&mut self) {
        let unlock = range(libc::F_UNLCK, self.offset, 1);
        if let Err(e) = fcntl(&self.file, FcntlArg::F_OFD_SETLK(&unlock)) {
            tracing::error!(error = %e, "could not release an object lock");
        }
    }
}

impl std::fmt::Debug for ObjectLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectLock")
    }
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening the pool lock file {}", path.display()), e))
}

impl Locks {
    pub(super) fn open(path: &Path) -> Result<Locks> {
        Ok(Locks {
            path: path.to_path_buf(),
            pool: open_rw(path)?,
        })
    }

    fn pool_lock(&self, kind: libc::c_int) -> Result<PoolLock<'_>> {
        let lock = range(kind, POOL_OFFSET, 1);
        let deadline = Instant::now() + POOL_WAIT;
        let mut pause = Duration::from_micros(50);
        loop {
            let got = try_set(&self.pool, &lock).map_err(|e| {
                Error::io(format!("locking the pool at {}", self.path.display()), e)
            })?;
            if got {
                return Ok(PoolLock { file: &self.pool });
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "another process has held the lock of the pool at {} for {} s; check the \
                     other controller instances using this pool",
                    self.path.display(),
                    POOL_WAIT.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// The pool lock for a commit (waits while another commit runs).
    pub(super) fn pool_exclusive(&self) -> Result<PoolLock<'_>> {
        self.pool_lock(libc::F_WRLCK)
    }

    /// The pool lock for reading the change log (waits while a commit runs).
    pub(super) fn pool_shared(&self) -> Result<PoolLock<'_>> {
        self.pool_lock(libc::F_RDLCK)
    }

    /// Takes an object lock at once, or `None` when someone (any process) holds it.
    pub(super) fn object(&self, slot: Slot) -> Result<Option<ObjectLock>> {
        let file = open_rw(&self.path)?;
        let got = try_set(&file, &range(libc::F_WRLCK, slot.offset(), 1))
            .map_err(|e| Error::io(format!("locking {slot:?} in {}", self.path.display()), e))?;
        Ok(got.then(|| ObjectLock {
            _held: Arc::new(HeldRange {
                file,
                offset: slot.offset(),
            }),
        }))
    }
}

/// Locks a whole file through `file`'s open file description (a temp file, until renamed).
pub(crate) fn lock_whole_file(file: &File) -> std::io::Result<()> {
    if try_set(file, &range(libc::F_WRLCK, 0, 0))? {
        Ok(())
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    }
}

/// Whether some process holds a lock on the file at `path` (a writer of ours on its temp
/// file; QEMU on an image it has open: it locks bytes of every image it uses). False when
/// nothing is there, and for what is not a regular file (no image: QEMU opens none), which is
/// never opened in a way that could block (`qcow2::open_image`).
pub(crate) fn file_is_locked(path: &Path) -> Result<bool> {
    use crate::pool::qcow2::{open_image, Opened};
    let file = match open_image(path, false) {
        Ok(Opened::File(f, _)) => f,
        Ok(Opened::Missing | Opened::NotRegular(_)) => return Ok(false),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    let mut probe = range(libc::F_WRLCK, 0, 0);
    loop {
        match fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) => return Ok(probe.l_type != libc::F_UNLCK as libc::c_short),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("checking locks on {}", path.display()),
                    e.into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_locks_exclude_until_the_last_clone_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes");
        std::fs::write(&path, b"").unwrap();
        let locks = Locks::open(&path).unwrap();
        let a = locks.object(Slot::Volume(7)).unwrap().expect("free");
        assert!(locks.object(Slot::Volume(7)).unwrap().is_none());
        // Other slots, including the same number of another kind, are independent.
        let _b = locks.object(Slot::VolumeName(7)).unwrap().expect("free");
        let clone = a.clone();
        drop(a);
        assert!(locks.object(Slot::Volume(7)).unwrap().is_none());
        drop(clone);
        assert!(locks.object(Slot::Volume(7)).unwrap().is_some());
    }

    #[test]
    fn an_object_lock_ends_with_its_holder_even_while_a_copy_of_its_descriptor_lives() {
        // A child forked while the lock is held keeps a copy of the descriptor until exec:
        // the same open file description, here through a duplicate.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes");
        std::fs::write(&path, b"").unwrap();
        let locks = Locks::open(&path).unwrap();
        let held = locks.object(Slot::Volume(9)).unwrap().expect("free");
        let inherited = held._held.file.try_clone().unwrap();
        drop(held);
        assert!(locks.object(Slot::Volume(9)).unwrap().is_some());
        drop(inherited);
    }

    #[test]
    fn shared_pool_locks_wait_for_the_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes");
        std::fs::write(&path, b"").unwrap();
        let a = Locks::open(&path).unwrap();
        let b = Locks::open(&path).unwrap();
        let held = a.pool_exclusive().unwrap();
        assert!(!try_set(&b.pool, &range(libc::F_RDLCK, POOL_OFFSET, 1)).unwrap());
        drop(held);
        let _shared = b.pool_shared().unwrap();
        let _also = a.pool_shared().unwrap();
    }

    #[test]
    fn temp_file_locks_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        assert!(!file_is_locked(tmp.path()).unwrap());
        lock_whole_file(tmp.as_file()).unwrap();
        assert!(file_is_locked(tmp.path()).unwrap());
        let path = tmp.path().to_path_buf();
        drop(tmp);
        assert!(!file_is_locked(&path).unwrap());
    }
}
