//! Pools: directories holding volume images and their records. The pool is the database:
//! everything the controller knows about a volume is read back from here after a restart.

mod flatten;
mod groups;
mod layers;
pub(crate) mod qemu_img;
pub mod record;
mod snapshots;
mod sources;
mod volumes;

pub use groups::{CreateGroupSnapshot, GroupSnapshot, MAX_GROUP_MEMBERS};
pub use layers::DEFAULT_MAX_CHAIN_DEPTH;
pub use record::{GroupSnapshotRecord, RecordState, SnapshotRecord, VolumeRecord};
pub use snapshots::CreateSnapshot;
pub use volumes::TopologyRequirement;
pub(crate) use volumes::{CapacityQuery, MIB};
pub use volumes::{CreateVolume, Pools};

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::ids::ObjectId;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One pool directory:
/// `volumes/<key>.json` records, `images/<file>` image layers, `snapshots/<key>.json`
/// snapshot records, `groups/<key>.json` group snapshot records, `flatten/<key>.json`
/// background flattening jobs.
#[derive(Debug)]
pub struct Pool {
    cfg: PoolConfig,
    /// Serializes layer garbage collection with record writes that add a reference to an
    /// existing layer (see `layers`).
    layers_lock: std::sync::Mutex<()>,
}

impl Pool {
    /// Creates the directories if needed and finishes or undoes what a crash interrupted.
    /// Blocking: call through `exec::blocking`.
    pub(crate) fn open(cfg: PoolConfig) -> Result<Pool> {
        let pool = Pool {
            cfg,
            layers_lock: Default::default(),
        };
        for dir in [
            pool.volumes_dir(),
            pool.images_dir(),
            pool.snapshots_dir(),
            pool.groups_dir(),
            pool.flatten_dir(),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating pool directory {}", dir.display()), e))?;
        }
        pool.recover()?;
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
        self.cfg.path.join("volumes")
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.cfg.path.join("images")
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.volumes_dir().join(format!("{key}.json"))
    }

    /// Absolute path of an image file of this pool.
    pub(crate) fn image_path(&self, file: &str) -> PathBuf {
        self.images_dir().join(file)
    }

    pub(crate) fn volume_id(&self, key: &str) -> String {
        ObjectId::new(&self.cfg.name, key).to_string()
    }

    /// Reads one record (any state).
    pub(crate) fn read_volume(&self, key: &str) -> Result<Option<VolumeRecord>> {
        fsutil::read_json(&self.record_path(key))
    }

    /// Writes a volume record atomically (temp, fsync, rename, fsync dir). Blocking.
    pub fn write_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let key = ObjectId::parse_volume(&rec.id)?
            .ok_or_else(|| Error::internal(format!("bad volume id {}", rec.id)))?
            .key;
        fsutil::write_json(&self.record_path(&key), rec)
    }

    pub(crate) fn remove_volume_record(&self, key: &str) -> Result<()> {
        fsutil::remove_durable(&self.record_path(key))
    }

    /// The keys of every volume record (any state), from the directory listing alone.
    pub(crate) fn volume_keys(&self) -> Result<Vec<String>> {
        let dir = self.volumes_dir();
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !key.starts_with('.') {
                keys.push(key.to_string());
            }
        }
        Ok(keys)
    }

    /// One record, or None when it is gone or unreadable (logged): for listings.
    pub(crate) fn read_volume_for_listing(&self, key: &str) -> Option<VolumeRecord> {
        match self.read_volume(key) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::warn!(pool = %self.cfg.name, key, error = %e, "skipping unreadable record");
                None
            }
        }
    }

    /// Every record of the pool, any state, sorted by id.
    pub(crate) fn all_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut out: Vec<VolumeRecord> = self
            .volume_keys()?
            .iter()
            .filter_map(|key| self.read_volume_for_listing(key))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
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

    /// Finishes deletes and undoes creates that a crash interrupted; removes temp files.
    fn recover(&self) -> Result<()> {
        for dir in [
            self.volumes_dir(),
            self.images_dir(),
            self.snapshots_dir(),
            self.groups_dir(),
            self.flatten_dir(),
        ] {
            for entry in fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            {
                let entry =
                    entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".tmp-") || name.ends_with(".part") {
                    tracing::info!(pool = %self.cfg.name, file = %name, "removing leftover temp file");
                    fsutil::remove_durable(&entry.path())?;
                }
            }
        }
        for rec in self.all_volumes()? {
            if rec.state != RecordState::Ready {
                tracing::info!(pool = %self.cfg.name, volume = %rec.id, state = ?rec.state,
                    "cleaning up a volume a crash left half-made");
                self.discard_volume(&rec)?;
            }
        }
        self.recover_layers()
    }

    /// Removes a volume's image and then its record (in that order: no orphan image).
    pub(crate) fn discard_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let key = ObjectId::parse_volume(&rec.id)?
            .ok_or_else(|| Error::internal(format!("bad volume id {}", rec.id)))?
            .key;
        fsutil::remove_durable(&self.image_path(&format!("{}.part", rec.image)))?;
        fsutil::remove_durable(&self.image_path(&rec.image))?;
        crate::failpoint!("delete.image-removed");
        self.remove_volume_record(&key)
    }
}
