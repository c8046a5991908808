//! Durable file updates: the pool is the database, so every record is replaced atomically.

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent directory", path.display())))?;
    let ctx = || format!("writing {}", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx(), e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(ctx(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(ctx(), e))?;
    tmp.persist(path).map_err(|e| Error::io(ctx(), e.error))?;
    sync_dir(dir)
}

/// Removes a file durably; a missing file is not an error.
pub(crate) fn remove_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs every file at once: independent durable steps (a new image, its directory, a
/// record's temp file) then cost about one device flush instead of one each. The calling
/// thread syncs the first file; the others go to a few long-lived helper threads (a thread
/// start per commit would cost more than it saves).
pub(crate) fn sync_all_at_once(files: &[(&File, &Path)]) -> Result<()> {
    let sync = |f: &File, p: &Path| {
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", p.display()), e))
    };
    let Some(((first, first_path), rest)) = files.split_first() else {
        return Ok(());
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut sent = 0;
    let mut result = Ok(());
    for (f, p) in rest {
        // A duplicate of the descriptor: fsync through it syncs the same file.
        match f.try_clone() {
            Ok(dup) => {
                helpers().send((dup, p.to_path_buf(), done_tx.clone()));
                sent += 1;
            }
            Err(e) => result = Err(Error::io(format!("syncing {}", p.display()), e)),
        }
    }
    let mine = sync(first, first_path);
    for _ in 0..sent {
        let theirs = done_rx
            .recv()
            .unwrap_or_else(|_| Err(Error::internal("an fsync helper thread stopped")));
        result = result.and(theirs);
    }
    mine.and(result)
}

type SyncJob = (
    File,
    std::path::PathBuf,
    std::sync::mpsc::Sender<Result<()>>,
);

/// The fsync helper threads, started on first use.
struct Helpers {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<SyncJob>>,
}

impl Helpers {
    fn send(&self, job: SyncJob) {
        let reply = job.2.clone();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if sent.is_err() {
            let _ = reply.send(Err(Error::internal("the fsync helper threads stopped")));
        }
    }
}

fn helpers() -> &'static Helpers {
    const THREADS: usize = 3;
    static HELPERS: std::sync::OnceLock<Helpers> = std::sync::OnceLock::new();
    HELPERS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SyncJob>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fsync-{i}"))
                .stack_size(64 << 10)
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((file, path, reply)) = job else {
                        return;
                    };
                    let r = file
                        .sync_all()
                        .map_err(|e| Error::io(format!("syncing {}", path.display()), e));
                    let _ = reply.send(r);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start an fsync helper thread");
            }
        }
        Helpers {
            jobs: std::sync::Mutex::new(tx),
        }
    })
}

/// Opens a directory for fsync.
pub(crate) fn open_dir(dir: &Path) -> Result<File> {
    File::open(dir).map_err(|e| Error::io(format!("opening directory {}", dir.display()), e))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Reads a JSON record; `Ok(None)` when the file does not exist.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    read_json_or(path, |e| {
        Error::internal(format!(
            "{} is corrupt ({e}): restore it from a backup or remove it",
            path.display()
        ))
    })
}

/// Like [`read_json`], with `corrupt` making the error for bytes that are not the record.
pub(crate) fn read_json_or<T: serde::de::DeserializeOwned>(
    path: &Path,
    corrupt: impl FnOnce(serde_json::Error) -> Error,
) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(corrupt),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Writes `value` as JSON to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("serializing {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_synced_at_once_report_each_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let fa = File::create(&a).unwrap();
        let fb = File::create(&b).unwrap();
        let d = open_dir(dir.path()).unwrap();
        sync_all_at_once(&[(&fa, &a), (&fb, &b), (&d, dir.path())]).unwrap();
        sync_all_at_once(&[]).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        remove_durable(&p).unwrap();
        remove_durable(&p).unwrap();
    }
}

/// A role's claim on a data directory (`<data_dir>/<role>.lock`, an exclusive `flock`), held
/// for as long as the value lives; the kernel drops it when the process dies.
#[derive(Debug)]
pub(crate) struct DataDirClaim {
    _lock: nix::fcntl::Flock<File>,
}

/// Claims `data_dir` for `role` ("controller", "node"): two processes of one role on one data
/// directory would share its state (the node's mount records) and undo each other's work.
/// (Controllers share what they must share through their pools: records, locks, the attach
/// ledger.)
/// FAILED_PRECONDITION naming the directory when another live process holds it. Blocking.
pub(crate) fn claim_data_dir(data_dir: &Path, role: &str) -> Result<DataDirClaim> {
    use nix::fcntl::{Flock, FlockArg};
    fs::create_dir_all(data_dir).map_err(|e| {
        Error::io(
            format!("creating the data directory {}", data_dir.display()),
            e,
        )
    })?;
    let path = data_dir.join(format!("{role}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DataDirClaim { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::FailedPrecondition(format!(
            "another virtdisk-csi {role} is running with the data directory {}: give each \
                 instance its own --data-dir (instances share pools, never a data directory)",
            data_dir.display()
        ))),
        Err((_, e)) => Err(Error::sys(format!("locking {}", path.display()), e)),
    }
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    #[test]
    fn one_claim_per_role_and_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim_data_dir(dir.path(), "controller").unwrap();
        let second = claim_data_dir(dir.path(), "controller").unwrap_err();
        assert_eq!(second.code(), tonic::Code::FailedPrecondition);
        assert!(second.to_string().contains("--data-dir"), "{second}");
        // Another role on the same directory (a controller and a node on one host) is fine.
        let _node = claim_data_dir(dir.path(), "node").unwrap();
        drop(first);
        claim_data_dir(dir.path(), "controller").unwrap();
    }
}
