//! The checkpointer: makes the files of journaled new records durable soon after their commit,
//! off the request path, and says so in the change log (`=` lines, see `changes`).
//!
//! A journaled create (`Store::put_new_with`) is durable once its line in the change log is
//! fdatasynced; its record file and the files it names (a blank image) are renamed or written
//! into place without an fsync and handed here. One thread per store waits a few milliseconds
//! for more to come, fsyncs them all at once with their directories (a round of many files
//! flushes their file system instead, `syncfs`, at most once a second: one device flush rather
//! than one per file, so a burst of creates does not queue its journal flushes behind the
//! checkpoint's), then appends `=<owner> <epoch> <offset>` under the pool lock and fdatasyncs
//! the log. Nothing is lost if
//! it never runs (a crash, a kill): the next open replays the lines of an owner that is gone.
//!
//! What needs the files durable earlier does not wait for it: a commit that changes such a
//! record makes its files durable first (`Store::commit_keys`), and so does a log reset for
//! every unsynced line it would drop (`Store::reset_long_log`).

use super::changes::ChangeLog;
use super::locks::Locks;
use crate::error::Result;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long the thread waits for more journaled creates before it syncs.
const GATHER: Duration = Duration::from_millis(20);
/// How long it waits before trying again after an fsync failed.
const RETRY: Duration = Duration::from_secs(1);
/// A round with at least this many files to sync flushes their file systems instead
/// (`syncfs`: one device flush, where an fsync per file costs one each)...
const WHOLE_FS_FROM: usize = 16;
/// ...at most this often: `syncfs` also writes whatever else is dirty on the file system (guest
/// data in a writeback cache), which the kernel would have written within seconds anyway.
const WHOLE_FS_EVERY: Duration = Duration::from_secs(1);

/// What one journaled create has to make durable: open files (the record file and the files
/// it names) and directories, by path.
struct ToSync {
    files: Vec<(File, PathBuf)>,
    dirs: Vec<PathBuf>,
}

/// Files of one journaled create, waiting for their fsync.
struct Entry {
    id: u64,
    /// The log's epoch and where the line ends in it.
    epoch: u64,
    end: u64,
    /// The record file and the files it names (open), and the directories to sync by path.
    files: Arc<ToSync>,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    log: Arc<Mutex<ChangeLog>>,
    locks: Arc<Locks>,
    owner: u64,
    pool: String,
    /// When the last round flushed whole file systems.
    last_whole: Mutex<Option<std::time::Instant>>,
    /// A directory of each file system the store's files live on, opened at start, by device.
    file_systems: HashMap<u64, File>,
}

/// The checkpointer of one store. Dropping it syncs what is pending and stops its thread.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// The checkpointer of the store of `pool`, whose files live under `dirs` (opened now:
    /// a `syncfs` through a descriptor reports the write errors of its file system since the
    /// descriptor was opened, so one opened at each round could miss an earlier one).
    pub(super) fn start(
        pool: &str,
        owner: u64,
        log: Arc<Mutex<ChangeLog>>,
        locks: Arc<Locks>,
        dirs: &[PathBuf],
    ) -> Checkpointer {
        use std::os::unix::fs::MetadataExt;
        let mut file_systems = HashMap::new();
        for d in dirs {
            if let Ok(dir) = crate::fsutil::open_dir(d) {
                if let Ok(meta) = dir.metadata() {
                    file_systems.entry(meta.dev()).or_insert(dir);
                }
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
            log,
            locks,
            owner,
            pool: pool.to_string(),
            last_whole: Mutex::new(None),
            file_systems,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .stack_size(128 << 10)
            .spawn(move || s.run())
            .inspect_err(|e| {
                tracing::warn!(pool, error = %e,
                    "could not start the checkpoint thread: journaled creates stay in the \
                     change log until the next start")
            })
            .ok();
        Checkpointer { shared, thread }
    }

    /// Hands over the files of the create journaled in `epoch` up to `end`: `files` (open)
    /// and the directories `dirs`.
    pub(super) fn add(
        &self,
        epoch: u64,
        end: u64,
        files: Vec<(File, PathBuf)>,
        dirs: Vec<PathBuf>,
    ) {
        if self.thread.is_none() {
            // No thread to do it later: now (the line stays unsynced in the log; the files
            // are durable, which is all a later commit or reset needs).
            let now = Arc::new(ToSync { files, dirs });
            if let Err(e) = sync(std::iter::once(&now)) {
                tracing::warn!(pool = %self.shared.pool, error = %e,
                    "could not make the files of a new record durable (its create is durable \
                     in the change log)");
            }
            return;
        }
        let mut s = self.shared.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.entries.push(Entry {
            id,
            epoch,
            end,
            files: Arc::new(ToSync { files, dirs }),
        });
        if s.entries.len() == 1 {
            self.shared.wake.notify_one();
        }
    }
}

impl Checkpointer {
    /// One round now, on the calling thread (at shutdown).
    pub(super) fn flush(&self) -> Result<()> {
        self.shared.checkpoint()
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            {
                let mut s = self.lock();
                while s.entries.is_empty() && !s.stop {
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                if s.entries.is_empty() {
                    return;
                }
                if !s.stop {
                    // Gather: a burst of creates costs one round of fsyncs, not one each.
                    let (g, _) = self
                        .wake
                        .wait_timeout_while(s, GATHER, |s| !s.stop)
                        .unwrap_or_else(|p| p.into_inner());
                    drop(g);
                }
            }
            if let Err(e) = self.checkpoint() {
                tracing::warn!(pool = %self.pool, error = %e,
                    "could not make the files of new records durable; trying again (their \
                     creates are durable in the change log)");
                let s = self.lock();
                if s.stop {
                    return;
                }
                let _ = self.wake.wait_timeout(s, RETRY);
            }
        }
    }

    /// One round: sync what is pending, then log that it is.
    fn checkpoint(&self) -> Result<()> {
        let batch: Vec<(u64, u64, u64, Arc<ToSync>)> = {
            let s = self.lock();
            s.entries
                .iter()
                .map(|e| (e.id, e.epoch, e.end, e.files.clone()))
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        crate::failpoint!("store.checkpoint");
        let files: usize = batch.iter().map(|b| b.3.files.len()).sum();
        let whole = files >= WHOLE_FS_FROM && {
            let mut last = self.last_whole.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= WHOLE_FS_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        // A file outside the file systems known at start: one by one.
        if !(whole && sync_file_systems(&self.file_systems, batch.iter().map(|b| &b.3))?) {
            sync(batch.iter().map(|b| &b.3))?;
        }
        {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let _pool = self.locks.pool_exclusive()?;
            // Lines of an epoch the log has left behind are gone with it (a reset syncs first).
            let epoch = log.epoch();
            let through = batch.iter().filter(|b| b.1 == epoch).map(|b| b.2).max();
            if let Some(through) = through {
                log.append_synced(self.owner, epoch, through)?;
                log.sync()?;
            }
        }
        let done: std::collections::HashSet<u64> = batch.iter().map(|b| b.0).collect();
        self.lock().entries.retain(|e| !done.contains(&e.id));
        Ok(())
    }
}

/// Flushes the file systems that hold the files and directories of `batch` (`syncfs` through
/// the descriptors of `file_systems`, each once): their data, inodes and directory entries
/// reach the disk with one device flush per file system. Returns false, having done nothing,
/// when one of them is not in `file_systems`.
fn sync_file_systems<'a>(
    file_systems: &HashMap<u64, File>,
    batch: impl Iterator<Item = &'a Arc<ToSync>>,
) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs = std::collections::BTreeSet::new();
    for b in batch {
        dirs.extend(b.files.iter().filter_map(|(_, p)| p.parent()));
        dirs.extend(b.dirs.iter().map(|d| d.as_path()));
    }
    let mut devices = std::collections::BTreeSet::new();
    for d in dirs {
        let meta = std::fs::metadata(d)
            .map_err(|e| crate::error::Error::io(format!("checking {}", d.display()), e))?;
        if !file_systems.contains_key(&meta.dev()) {
            return Ok(false);
        }
        devices.insert(meta.dev());
    }
    for dev in devices {
        nix::unistd::syncfs(&file_systems[&dev])
            .map_err(|e| crate::error::Error::io("syncing a pool's file system", e.into()))?;
    }
    Ok(true)
}

/// fsyncs the files and directories of `batch` at once, each directory once.
fn sync<'a>(batch: impl Iterator<Item = &'a Arc<ToSync>>) -> Result<()> {
    let mut files: Vec<(&File, &std::path::Path)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut dirs = Vec::new();
    for b in batch {
        for (f, p) in &b.files {
            if seen.insert(p.clone()) {
                files.push((f, p));
            }
        }
        for d in &b.dirs {
            if seen.insert(d.clone()) {
                dirs.push((crate::fsutil::open_dir(d)?, d.clone()));
            }
        }
    }
    files.extend(dirs.iter().map(|(f, p)| (f, p.as_path())));
    crate::fsutil::sync_all_at_once(&files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of a round make the files of a batch durable without error: an fsync per
    /// file and directory, or a flush of each file system once (`syncfs`).
    #[test]
    fn a_round_syncs_files_one_by_one_or_their_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let batch: Vec<Arc<ToSync>> = (0..20)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, b"x").unwrap();
                let file = File::open(&path).unwrap();
                Arc::new(ToSync {
                    files: vec![(file, path)],
                    dirs: vec![dir.path().to_path_buf()],
                })
            })
            .collect();
        sync(batch.iter()).unwrap();
        let known: HashMap<u64, File> = HashMap::new();
        assert!(!sync_file_systems(&known, batch.iter()).unwrap());
        let known = {
            use std::os::unix::fs::MetadataExt;
            let d = File::open(dir.path()).unwrap();
            HashMap::from([(d.metadata().unwrap().dev(), d)])
        };
        assert!(sync_file_systems(&known, batch.iter()).unwrap());
        let gone = Arc::new(ToSync {
            files: vec![],
            dirs: vec![dir.path().join("missing")],
        });
        assert!(sync_file_systems(&known, std::iter::once(&gone)).is_err());
    }
}
