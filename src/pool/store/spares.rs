//! Spare inodes: files of removed records and layers, emptied and kept to hold the next new
//! record or layer instead of a fresh file.
//!
//! Why: creating a file costs an inode allocation, and on ext4 without a journal (this
//! project's CI machine) `find_inode_bit` skips every inode of the block group freed in the last
//! 60–300 s, reading its inode table block each time. After a burst of deletes a create then
//! took ~0.9 ms of system time instead of ~10 µs (measured: `perf` shows `recently_deleted`).
//! A pool that deletes as often as it creates — CI, Nomad jobs with per-allocation volumes —
//! lives in that state. A removal that keeps its inode frees none, and a create that takes one
//! allocates none, so CreateVolume costs the same before and after deletes.
//!
//! Safety:
//! - A spare is handed out only once it is *durably empty* (truncated and fsynced): a crash of
//!   the machine while a new record or image is written into it, before the commit's fsync,
//!   can then show an empty file at the new name, never the bytes it held before (no volume's
//!   data or record ever appears under another's name).
//! - A layer is made a spare only when no process holds a lock on it (QEMU locks every image
//!   it uses), and any file only when it has no other name (a hard-linked backup keeps its
//!   bytes) and no extended attributes (libvirt's remembered owner, a security label);
//!   otherwise it is unlinked as before, so a running guest keeps its data. A reader that
//!   holds no lock is not seen: emptying takes the bytes from under it, as an unlink did not.
//! - A spare whose background fsync fails is removed, never handed out.
//! - Spares are named `.spare-<owner>-<n>` (never a record or layer name: listings skip them).
//!   `<owner>` is a random token whose lock (in the pool's lock file) the owning store holds
//!   while it lives; the open-time sweep removes spares whose owner's lock is free (a dead
//!   process's) and never uses another process's spares.
//! - At most [`CAP`] spares per directory; beyond that a removal unlinks as before.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Spares kept per directory, at most.
pub(super) const CAP: usize = 256;

/// What a spare's name starts with.
pub(super) const PREFIX: &str = ".spare-";

/// The spares of one directory of one store.
pub(super) struct Spares {
    dir: PathBuf,
    owner: u64,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Durably empty: ready to be taken.
    clean: Vec<u64>,
    /// Emptied, being fsynced in the background.
    dirty: usize,
}

impl Spares {
    pub(super) fn new(dir: PathBuf, owner: u64) -> Spares {
        Spares {
            dir,
            owner,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{:016x}-{n}", self.owner))
    }

    /// The owner token of a spare's file name, if it is one.
    pub(super) fn owner_of(name: &str) -> Option<u64> {
        let rest = name.strip_prefix(PREFIX)?;
        let (owner, n) = rest.split_once('-')?;
        n.parse::<u64>().ok()?;
        (owner.len() == 16)
            .then(|| u64::from_str_radix(owner, 16).ok())
            .flatten()
    }

    /// A reserved spare name, or `None` when the directory has `CAP` spares already.
    fn reserve(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        if s.clean.len() + s.dirty >= CAP {
            return None;
        }
        s.next += 1;
        Some(s.next)
    }

    /// Makes the file at `path` a spare: renamed to a spare name (the directory entry moves
    /// as an unlink would move it: the caller fsyncs the directory as it would then) and
    /// emptied, then fsynced in the background; it is handed out once that is done. Returns
    /// false when it was not kept (no room; the file is where it was, for the caller to
    /// unlink). A crash before the background fsync leaves a dot-file the open-time sweep
    /// removes.
    pub(super) fn retire(&self, path: &Path) -> std::io::Result<bool> {
        if !keepable(path)? {
            return Ok(false);
        }
        let Some(n) = self.reserve() else {
            return Ok(false);
        };
        let spare = self.path(n);
        fs::rename(path, &spare)?;
        let emptied = match OpenOptions::new().write(true).truncate(true).open(&spare) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&spare);
                return Err(e);
            }
        };
        lock(&self.state).dirty += 1;
        let state = self.state.clone();
        background::sync(emptied, move |synced| {
            let mut s = lock(&state);
            s.dirty -= 1;
            if synced {
                s.clean.push(n);
            } else {
                // Never handed out: it goes.
                let _ = fs::remove_file(&spare);
            }
        });
        Ok(true)
    }

    /// A clean spare, opened for writing, at its spare name (the caller writes into it and
    /// renames it where it belongs; if it does not, it unlinks it); `None` when there is
    /// none (the caller creates a fresh file).
    pub(super) fn take(&self) -> Option<(File, PathBuf)> {
        loop {
            let n = lock(&self.state).clean.pop()?;
            let path = self.path(n);
            // Gone (removed by hand): try the next.
            if let Ok(f) = OpenOptions::new().write(true).truncate(true).open(&path) {
                return Some((f, path));
            }
        }
    }
}

/// Whether the file at `path` may become a spare: emptying it must take nothing from anyone
/// else. Not when it has other names (a hard-linked backup of the pool would lose the bytes),
/// nor when it carries extended attributes (libvirt's remembered owner and reference count,
/// a security label: they belong to the old file, and would mislead whoever finds them on a new
/// one). `NotFound` when there is no file.
fn keepable(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Ok(false);
    }
    match xattr::list(path) {
        Ok(mut names) => Ok(names.next().is_none()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(true),
        Err(e) => Err(e),
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thread that fsyncs retired spares, apart from the helpers of commits
/// (`fsutil::sync_all_at_once`), so that a burst of removals never queues ahead of a commit.
/// It is detached: what it has not synced at exit stays a dirty spare, which the next open's
/// sweep removes.
mod background {
    use std::fs::File;
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};

    type Job = (File, Box<dyn FnOnce(bool) + Send>);

    pub(super) fn sync(file: File, done: impl FnOnce(bool) + Send + 'static) {
        static JOBS: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
        let jobs = JOBS.get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            std::thread::Builder::new()
                .name("spare-sync".into())
                .stack_size(64 << 10)
                .spawn(move || {
                    for (file, done) in rx {
                        done(file.sync_all().is_ok());
                    }
                })
                .inspect_err(
                    |e| tracing::error!(error = %e, "could not start the spare-sync thread"),
                )
                .ok()
                .map(|_| Mutex::new(tx))
        });
        let job: Job = (file, Box::new(done));
        let unsent = match jobs {
            Some(tx) => tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(job)
                .err()
                .map(|e| e.0),
            None => Some(job),
        };
        // No thread: the spare is not handed out.
        if let Some((_, done)) = unsent {
            done(false);
        }
    }
}

/// The mode of a new layer file.
pub(super) const LAYER_MODE: u32 = 0o644;

/// Gives a spare taken for a new layer the owner and mode a fresh file would have: libvirt
/// may have left a layer it used owned by QEMU's user.
pub(super) fn as_new(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = file.metadata()?;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
        nix::unistd::fchown(file, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
    }
    if meta.mode() & 0o7777 != LAYER_MODE {
        file.set_permissions(fs::Permissions::from_mode(LAYER_MODE))?;
    }
    Ok(())
}

/// `rename(2)` that fails with EEXIST instead of replacing `to`. Where the file system has no
/// RENAME_NOREPLACE (NFS, CephFS: EINVAL), `link(2)` then `unlink(2)` of the old name, which
/// fails the same way when `to` exists.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let renamed = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    match renamed {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        let s = Spares::new(PathBuf::from("/x"), 0xabc);
        let p = s.path(7);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, ".spare-0000000000000abc-7");
        assert_eq!(Spares::owner_of(name), Some(0xabc));
        assert_eq!(Spares::owner_of(".spare-abc-7"), None);
        assert_eq!(Spares::owner_of(".tmp-abc"), None);
        assert_eq!(Spares::owner_of(".spare-0000000000000abc-x"), None);
    }

    /// Waits for the background fsyncs of `s` to finish.
    fn settle(s: &Spares) {
        while lock(&s.state).dirty > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn a_retired_file_comes_back_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spares::new(dir.path().to_path_buf(), 1);
        let old = dir.path().join("a.json");
        fs::write(&old, b"secret").unwrap();
        assert!(s.retire(&old).unwrap());
        assert!(!old.exists());
        settle(&s);
        let (f, path) = s.take().unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        assert_eq!(
            Spares::owner_of(path.file_name().unwrap().to_str().unwrap()),
            Some(1)
        );
        assert!(s.take().is_none());
        // Never over an existing file.
        fs::write(dir.path().join("c.json"), b"keep").unwrap();
        assert!(rename_noreplace(&path, &dir.path().join("c.json")).is_err());
        assert_eq!(fs::read(dir.path().join("c.json")).unwrap(), b"keep");
        // A missing file is not kept.
        assert!(s.retire(&dir.path().join("gone")).is_err());
        // Nor one with another name (a hard-linked backup keeps its bytes).
        let linked = dir.path().join("l.json");
        fs::write(&linked, b"backup").unwrap();
        fs::hard_link(&linked, dir.path().join("backup.json")).unwrap();
        assert!(!s.retire(&linked).unwrap());
        assert_eq!(fs::read(dir.path().join("backup.json")).unwrap(), b"backup");
        assert!(linked.exists());
    }

    #[test]
    fn at_most_cap_spares() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spares::new(dir.path().to_path_buf(), 2);
        for i in 0..CAP + 3 {
            let p = dir.path().join(format!("{i}.qcow2"));
            fs::write(&p, [1u8]).unwrap();
            let kept = s.retire(&p).unwrap();
            assert_eq!(kept, i < CAP, "file {i}");
            assert_eq!(p.exists(), !kept);
        }
        settle(&s);
        assert_eq!(lock(&s.state).clean.len(), CAP);
    }
}
