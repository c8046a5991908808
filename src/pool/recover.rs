//! Finishing or undoing what a crashed process (or machine) left half done. Only the holder of an
//! object's lock touches it, so a half-done record is repaired when the pool opens only if no
//! live process (this one or another sharing the pool) holds its lock, and otherwise by the
//! next operation that takes the lock (`Pools::lock_volume`).

use super::record::{FlattenJob, FlattenState, RecordState, SnapshotRecord, VolumeRecord};
use super::store::{Kind, Layer, Slot};
use super::Pool;
use crate::error::Result;
use crate::model::ImageFormat;

impl Pool {
    /// Pool open: settles every half-done volume, snapshot and flattening job nobody holds,
    /// then collects temp files and layer files no record names.
    pub(super) fn recover(&self) -> Result<()> {
        let mut all_settled = true;
        for r in self.store.take_replayed() {
            if r.kind == Kind::Volume {
                all_settled &= self.settle_replayed_volume(r.key, r.rewritten)?;
            }
        }
        if all_settled {
            self.store.finish_replay()?;
        }
        for key in self.store.torn_new(Kind::Volume)? {
            let Some(_held) = self.store.try_lock(Slot::Volume(key))? else {
                continue;
            };
            // What a crash leaves of a create: the volume's first image, empty. Anything more
            // (data written, other layers) was a volume in use: its record stays unreadable.
            if !self.only_an_empty_first_image(key)? {
                tracing::warn!(pool = %self.name(), volume = %self.volume_id(key),
                    "the record of this volume is empty but its images hold data or other \
                     layers: left as it is; restore the record from a backup");
                continue;
            }
            tracing::warn!(pool = %self.name(), volume = %self.volume_id(key),
                "removing the empty record of a volume whose create a crash of the machine \
                 cut short (it was never reported created; its image holds no data)");
            self.store.remove::<VolumeRecord>(key, |_| Ok(()))?;
        }
        let (volumes, snapshots, jobs) = {
            let index = self.store.index()?;
            let volumes: Vec<u64> = index
                .volumes_from(0)
                .filter(|(_, v)| !v.settled())
                .map(|(k, _)| k)
                .collect();
            let snapshots: Vec<u64> = index
                .snapshots_from(0)
                .filter(|(_, s)| s.state != RecordState::Ready)
                .map(|(k, _)| k)
                .collect();
            let jobs: Vec<u64> = index.jobs().map(|(k, _)| k).collect();
            (volumes, snapshots, jobs)
        };
        for key in volumes {
            match self.store.try_lock(Slot::Volume(key))? {
                Some(_held) => self.settle_volume(key)?,
                None => tracing::info!(pool = %self.name(), volume = %self.volume_id(key),
                    "a live process is working on this volume; leaving it to that process"),
            }
        }
        for key in snapshots {
            if let Some(_held) = self.store.try_lock(Slot::Snapshot(key))? {
                tracing::info!(pool = %self.name(), snapshot = %self.snapshot_id(key),
                    "removing a half-made snapshot record");
                self.store.remove::<SnapshotRecord>(key, |_| Ok(()))?;
            }
        }
        for key in jobs {
            let Some(_job) = self.store.try_lock(Slot::Flatten(key))? else {
                continue;
            };
            let Some(_volume) = self.store.try_lock(Slot::Volume(key))? else {
                continue;
            };
            self.settle_job(key)?;
        }
        let started = std::time::Instant::now();
        let removed = self.store.sweep()?;
        tracing::info!(pool = %self.name(), removed, ms = started.elapsed().as_millis() as u64,
            "collected temp files and layer files no record names");
        Ok(())
    }

    /// The image of a blank volume whose journaled create the open-time replay settled
    /// (`Store::replay`): written again, empty, when a crash of the machine lost the file (the
    /// volume was never changed since its create, so never handed to a writer: it held no
    /// data), else made durable. A lost header is written again at the next use
    /// (`qcow2::repair_empty`). A record the replay had to write again whose name another
    /// volume has since taken was never answered (its process died between the line and the
    /// rename, and another process created the name on the retry): it goes. Returns false
    /// when the volume is busy (a live process works on it: replayed again at the next open).
    /// Blocking.
    fn settle_replayed_volume(&self, key: u64, rewritten: bool) -> Result<bool> {
        let Some(_held) = self.store.try_lock(Slot::Volume(key))? else {
            return Ok(false);
        };
        let Some(rec) = self.read_volume(key)? else {
            return Ok(true);
        };
        if rewritten && self.name_taken_by_another(&rec)? {
            tracing::warn!(pool = %self.name(), volume = %rec.id, name = %rec.name,
                "removing a volume whose create never finished: its process died before \
                 answering, and another volume of its name was created since");
            self.store.remove::<VolumeRecord>(key, |_| Ok(()))?;
            return Ok(true);
        }
        if !rec.chain.backing.is_empty() || rec.handed_to_writer {
            return Ok(true);
        }
        let path = self.image_path(&rec.image);
        let images = self.store.images_dir();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(pool = %self.name(), volume = %rec.id, image = %rec.image,
                    "wrote the empty image of the volume again: a crash of the machine lost it \
                     after its create was answered");
                self.store.create_layer(&rec.image, |f| {
                    super::qcow2::write(f, rec.format, rec.capacity_bytes, None)
                })?
            }
            Err(e) => {
                return Err(crate::error::Error::io(
                    format!("opening {}", path.display()),
                    e,
                ))
            }
        };
        let dir = crate::fsutil::open_dir(&images)?;
        crate::fsutil::sync_all_at_once(&[(&file, &path), (&dir, &images)])?;
        Ok(true)
    }

    /// Whether another volume record of this pool has `rec`'s name.
    fn name_taken_by_another(&self, rec: &VolumeRecord) -> Result<bool> {
        let key = rec.key_u64()?;
        let (named, _) = self.records_named(&rec.name, |r: &VolumeRecord| &r.name)?;
        Ok(named.iter().any(|(k, _)| *k != key))
    }

    /// Whether the image files named after volume `key` are at most its first image (plain
    /// name, qcow2 or raw) holding no data (`qcow2::holds_no_data`). Blocking.
    fn only_an_empty_first_image(&self, key: u64) -> Result<bool> {
        let dir = self.store.images_dir();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| crate::error::Error::io(format!("listing {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| crate::error::Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Layer::Std { key: k, stamp, raw } = Layer::parse(&name) else {
                continue;
            };
            if k != key {
                continue;
            }
            let format = if raw {
                ImageFormat::Raw
            } else {
                ImageFormat::Qcow2
            };
            if stamp.is_some() || !super::qcow2::holds_no_data(&entry.path(), format)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Finishes or undoes a half-done change to volume `key`, if there is one. The caller
    /// holds the volume's lock (so nobody alive is making that change). Blocking.
    pub(super) fn settle_volume(&self, key: u64) -> Result<()> {
        let unsettled = self
            .store
            .index()?
            .volume(key)
            .is_some_and(|v| !v.settled());
        if !unsettled {
            return Ok(());
        }
        let Some(mut rec) = self.read_volume(key)? else {
            return Ok(());
        };
        if rec.state != RecordState::Ready {
            // Records of earlier versions: `creating` (image maybe partial) is undone,
            // `deleting` finished. Either way the record goes, and its layers with it.
            tracing::info!(pool = %self.name(), volume = %rec.id, state = ?rec.state,
                "cleaning up a volume a crash left half-made");
            self.store.remove::<VolumeRecord>(key, |_| Ok(()))?;
            return Ok(());
        }
        let Some(f) = rec.chain.freezing.take() else {
            return Ok(());
        };
        if f.handed_to_domain && self.switched_live(&rec, &f.overlay)? {
            // The domain writes to the overlay: the volume continues there.
            tracing::warn!(pool = %self.name(), volume = %rec.id, overlay = %f.overlay,
                "a live snapshot was interrupted; the volume continues in its new overlay");
            let old = std::mem::replace(&mut rec.image, f.overlay);
            rec.chain.backing.insert(0, old);
        } else {
            // The overlay goes with the commit that stops naming it.
            tracing::info!(pool = %self.name(), volume = %rec.id, overlay = %f.overlay,
                "undoing an interrupted snapshot or clone");
        }
        self.store.put(&rec, |_| Ok(())).map(drop)
    }

    /// Whether a node switched to `overlay` in a live snapshot that was interrupted, read back
    /// from the images themselves: QEMU (a domain, a storage daemon; on this host or another
    /// one sharing the pool) holds locks on every image it has open. The overlay held: the
    /// switch happened. The old active image held (and not the overlay): it did not. Neither
    /// held (the node let go since): the overlay holds data only if the node wrote there.
    fn switched_live(&self, rec: &VolumeRecord, overlay: &str) -> Result<bool> {
        let overlay = self.image_path(overlay);
        if !overlay.exists() {
            return Ok(false);
        }
        if super::store::file_is_locked(&overlay)? {
            return Ok(true);
        }
        if super::store::file_is_locked(&self.image_path(&rec.image))? {
            return Ok(false);
        }
        super::qcow2::has_data(&overlay, rec.capacity_bytes)
    }

    /// Undoes a copy in progress or finishes a switch in progress of the flattening job of
    /// volume `key`. The caller holds the job's and the volume's locks. Blocking.
    pub(super) fn settle_job(&self, key: u64) -> Result<()> {
        let Some(job) = self.store.read::<FlattenJob>(key)? else {
            return Ok(());
        };
        match job.state {
            FlattenState::Converting => {
                tracing::info!(pool = %self.name(), volume = %job.volume_id,
                    "undoing an interrupted chain flattening");
                self.store.remove::<FlattenJob>(key, |_| Ok(())).map(drop)
            }
            FlattenState::Switching => {
                tracing::info!(pool = %self.name(), volume = %job.volume_id,
                    "finishing an interrupted chain flattening");
                self.finish_flatten_switch(key, &job)
            }
        }
    }
}
