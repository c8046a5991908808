//! Pools: directories holding volume images and their records. The pool is the database:
//! everything the controller knows about a volume is read back from here after a restart,
//! and several controller processes may share one pool. `store` holds the design: records,
//! the in-memory index, the commit protocol, locks and the change log.

mod flatten;
mod groups;
mod layers;
mod listing;
pub(crate) mod qcow2;
pub(crate) mod qemu_img;
pub mod record;
mod recover;
mod snapshots;
mod sources;
pub(crate) mod store;
mod volumes;

pub use groups::{CreateGroupSnapshot, GroupSnapshot, MAX_GROUP_MEMBERS};
pub use layers::DEFAULT_MAX_CHAIN_DEPTH;
pub(crate) use listing::{SnapshotFilter, SnapshotSummary, VolumeCondition, VolumeSummary};
pub use record::{GroupSnapshotRecord, RecordState, SnapshotRecord, VolumeRecord};
pub use snapshots::CreateSnapshot;
pub use volumes::TopologyRequirement;
pub(crate) use volumes::{CapacityQuery, VolumeLock};
pub use volumes::{CreateVolume, Pools};

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use store::{Kind, Store};

/// One pool directory: `volumes/<key>.json`, `snapshots/<key>.json`, `groups/<key>.json` and
/// `flatten/<key>.json` records, `images/<file>` image layers, and `changes` (the change log
/// and the locks).
#[derive(Debug)]
pub struct Pool {
    cfg: PoolConfig,
    store: Store,
}

impl Pool {
    /// Creates the directories if needed, reads every record into the index, and finishes or
    /// undoes what a crash interrupted (skipping what a live process is working on).
    /// Blocking: call through `exec::blocking`.
    pub(crate) fn open(cfg: PoolConfig) -> Result<Pool> {
        let store = Store::open(&cfg.name, &cfg.path)?;
        let pool = Pool { cfg, store };
        pool.recover()?;
        pool.warn_same_names(Kind::Volume)?;
        pool.warn_same_names(Kind::Snapshot)?;
        Ok(pool)
    }

    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    pub(crate) fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub(crate) fn topology(&self) -> &BTreeMap<String, String> {
        &self.cfg.topology
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.cfg.path
    }

    pub(crate) fn volumes_dir(&self) -> PathBuf {
        self.cfg.path.join(Kind::Volume.dir())
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.store.images_dir()
    }

    /// Absolute path of an image file of this pool.
    pub(crate) fn image_path(&self, file: &str) -> PathBuf {
        self.images_dir().join(file)
    }

    /// The id of the volume with `key` in this pool.
    pub(crate) fn volume_id(&self, key: u64) -> String {
        format!("{}.{}", self.cfg.name, Kind::Volume.file_key(key))
    }

    /// The id of the snapshot with `key` in this pool.
    pub(crate) fn snapshot_id(&self, key: u64) -> String {
        format!("{}.{}", self.cfg.name, Kind::Snapshot.file_key(key))
    }

    /// Reads one volume record (any state) from its file.
    pub(crate) fn read_volume(&self, key: u64) -> Result<Option<VolumeRecord>> {
        self.store.read(key)
    }

    /// Writes a volume record as one commit, whatever it says (repair tools and tests; the
    /// operations check their preconditions under the pool lock). Blocking.
    pub fn write_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.store.put(rec, |_| Ok(())).map(drop)
    }

    /// Writes a snapshot record as one commit (repair tools and tests). Blocking.
    pub fn write_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        self.store.put(rec, |_| Ok(())).map(drop)
    }

    /// How many volumes the pool holds (not being deleted) and the sum of their sizes.
    pub(crate) fn usage(&self) -> Result<(usize, u64)> {
        let index = self.store.index()?;
        Ok((index.volume_count(), index.provisioned()))
    }

    /// The number of records of each kind (named by its directory: `volumes`, `snapshots`, …)
    /// that exist in the pool but could not be read (from the index).
    pub(crate) fn unreadable_records(&self) -> Result<Vec<(&'static str, usize)>> {
        let index = self.store.index()?;
        Ok(Kind::ALL
            .iter()
            .map(|k| (k.dir(), index.unreadable_of(*k).len()))
            .collect())
    }

    /// Free bytes of the filesystem holding the pool.
    pub(crate) fn free_bytes(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(self.dir()).map_err(|e| {
            Error::io(
                format!("statvfs {}", self.dir().display()),
                std::io::Error::from(e),
            )
        })?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// Whether the pool directory accepts new files (Probe's readiness check).
    pub(crate) fn check_writable(&self) -> Result<()> {
        let probe = tempfile::Builder::new()
            .prefix(".probe-")
            .tempfile_in(self.volumes_dir())
            .map_err(|e| {
                Error::io(
                    format!(
                        "pool {} at {} is not writable",
                        self.name(),
                        self.dir().display()
                    ),
                    e,
                )
            })?;
        drop(probe);
        Ok(())
    }
}
