//! Local attach: this host is a node. ControllerPublish to the host's own node id exports the
//! volume's image as a host block device: a qemu-storage-daemon opens the image (qcow2 or raw)
//! and serves it as a FUSE file, and a loop device turns that file into `/dev/loopN`. The node
//! service then finds the loop device by serial (the export file is named after it) and
//! formats and mounts it like any hot-plugged disk.
//!
//! Nothing is kept in memory: attachments are read back from the state directory and the
//! kernel's loop devices, so a restarted controller knows them, and leftovers of an attach a
//! crash interrupted are cleaned when the backend opens.

mod daemon;
mod limit;
mod loopdev;
mod qmp;
mod slot;

use crate::attach::{Attacher, Attachment, DiskSpec, CTX_BUS, CTX_DEVICE};
use crate::config::{Config, Mode};
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::ObjectId;
use crate::node::mountinfo::MountTable;
use crate::node::Sysfs;
use crate::params::{Bus, Discard, Qos};
use slot::{Record, Slot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// publish_context `bus` of a locally attached volume.
pub(crate) const BUS_LOCAL: &str = "local";

pub(crate) struct LocalAttacher {
    node_id: String,
    state_dir: PathBuf,
    sysfs: Sysfs,
    /// Most volumes attached here at once (`node_limit`).
    limit: u64,
    /// Held from counting the attachments to the end of an attach, so concurrent publishes
    /// of different volumes never pass the limit together.
    attaching: tokio::sync::Mutex<()>,
}

/// The backend for `cfg`, when local attach is on (default: monolith mode only).
pub(crate) async fn from_config(cfg: &Config) -> Result<Option<Arc<dyn Attacher>>> {
    let enabled = cfg.node.local_attach.unwrap_or(cfg.mode == Mode::Monolith);
    if !enabled || !cfg.mode.runs_controller() {
        return Ok(None);
    }
    let node_id = crate::nodeid::resolve(cfg.node_id.as_deref(), Path::new("/"))?;
    let mut attacher = LocalAttacher::open(node_id, cfg.data_dir.join("localattach")).await?;
    attacher.limit = node_limit(cfg).await?.unwrap_or(0);
    Ok(Some(Arc::new(attacher)))
}

/// With local attach on in this process, how many volumes this host holds attached at most:
/// what its kernel allows (see `limit`), lowered by `node.max_volumes_per_node`. NodeGetInfo
/// reports it and ControllerPublish enforces it. None when local attach is off.
pub(crate) async fn node_limit(cfg: &Config) -> Result<Option<u64>> {
    if !cfg.node.local_attach.unwrap_or(cfg.mode == Mode::Monolith) || !cfg.mode.runs_controller() {
        return Ok(None);
    }
    let host = exec::blocking(|| Ok(limit::HostBounds::read())).await?;
    let limit = limit::effective(cfg.node.max_volumes_per_node, host.volumes());
    tracing::debug!(?host, limit, "local attach: volumes per node");
    Ok(Some(limit))
}

fn key_of(volume_id: &str) -> Result<String> {
    ObjectId::parse_volume(volume_id)?
        .map(|o| o.key)
        .ok_or_else(|| Error::NotFound(format!("volume {volume_id} is not one of ours")))
}

impl LocalAttacher {
    /// Opens the state directory and cleans up what an interrupted attach left behind.
    pub(crate) async fn open(node_id: String, state_dir: PathBuf) -> Result<Self> {
        let dir = state_dir.clone();
        exec::blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
        })
        .await?;
        let me = LocalAttacher {
            node_id,
            state_dir,
            sysfs: Sysfs::host(),
            limit: 0,
            attaching: tokio::sync::Mutex::new(()),
        };
        me.recover().await?;
        Ok(me)
    }

    async fn recover(&self) -> Result<()> {
        let dir = self.state_dir.clone();
        for slot in exec::blocking(move || slot::list(&dir)).await? {
            if self.complete(&slot).await?.is_none() {
                tracing::info!(slot = %slot.key, "cleaning up an interrupted local attach");
                // Never fail startup over it: a detach or attach retries the cleanup.
                if let Err(e) = self.teardown(&slot).await {
                    tracing::warn!(slot = %slot.key, error = %e, "cleanup failed");
                }
            }
        }
        Ok(())
    }

    /// The record and loop device of a fully attached slot.
    async fn complete(&self, slot: &Slot) -> Result<Option<(Record, String)>> {
        let (s, sysfs) = (slot.clone(), self.sysfs.clone());
        exec::blocking(move || {
            let Some(rec) = s.read_record()? else {
                return Ok(None);
            };
            let export = s.export_path(&rec.serial);
            Ok(loopdev::bound_to(&sysfs, &export)?
                .into_iter()
                .next()
                .map(|name| (rec, name)))
        })
        .await
    }

    fn attachment(&self, rec: &Record, loop_name: &str) -> Attachment {
        let mut context = BTreeMap::new();
        context.insert(CTX_BUS.to_string(), BUS_LOCAL.to_string());
        context.insert(
            CTX_DEVICE.to_string(),
            self.sysfs.dev_path(loop_name).display().to_string(),
        );
        Attachment {
            node_id: self.node_id.clone(),
            volume_id: rec.volume_id.clone(),
            serial: rec.serial.clone(),
            // Placeholder: the context's `bus=local` is what the node reads.
            bus: Bus::default(),
            readonly: rec.readonly,
            shareable: rec.shareable,
            context,
        }
    }

    /// Takes a slot apart in dependency order: loop devices (refused while the volume is in
    /// use here), the daemon, a FUSE mount a killed daemon left, then the files.
    async fn teardown(&self, slot: &Slot) -> Result<()> {
        let (s, sysfs) = (slot.clone(), self.sysfs.clone());
        let loops: Vec<(String, PathBuf)> = exec::blocking(move || {
            Ok(sysfs
                .loop_devices()?
                .into_iter()
                .filter(|(_, backing)| backing.starts_with(&s.dir))
                .collect())
        })
        .await?;
        for (name, backing) in &loops {
            let (sysfs, n) = (self.sysfs.clone(), name.clone());
            let users = exec::blocking(move || loopdev::users(&sysfs, &n)).await?;
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume is still in use on this host: /dev/{name} is used by {}; \
                     NodeUnpublishVolume and NodeUnstageVolume it first",
                    users.join(", ")
                )));
            }
            loopdev::detach(&self.sysfs, name, backing).await?;
            crate::failpoint!("localattach.loop-detached");
            tracing::info!(device = %name, slot = %slot.key, "loop device detached");
        }
        daemon::stop(slot).await?;
        let s = slot.clone();
        exec::blocking(move || {
            let table = MountTable::read()?;
            for m in table.under(&s.dir) {
                tracing::warn!(mount = %m.mount_point.display(), "detaching a leftover FUSE export");
                nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH).map_err(
                    |e| Error::sys(format!("unmounting {}", m.mount_point.display()), e),
                )?;
            }
            match std::fs::remove_dir_all(&s.dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("removing {}", s.dir.display()), e)),
            }
        })
        .await
    }

    fn check_node(&self, node_id: &str) -> Result<()> {
        if node_id == self.node_id {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "node {node_id} is not this host ({})",
                self.node_id
            )))
        }
    }

    async fn start(&self, slot: &Slot, rec: &Record, spec: &DiskSpec) -> Result<String> {
        let (s, r) = (slot.clone(), rec.clone());
        exec::blocking(move || {
            for dev in ["/dev/fuse", "/dev/loop-control"] {
                if !Path::new(dev).exists() {
                    return Err(Error::Unavailable(format!(
                        "local attach needs {dev}; load the fuse and loop kernel modules"
                    )));
                }
            }
            s.check_paths()?;
            std::fs::create_dir_all(&s.dir)
                .map_err(|e| Error::io(format!("creating {}", s.dir.display()), e))?;
            crate::fsutil::write_json(&s.record_path(), &r)?;
            let export = s.export_path(&r.serial);
            std::fs::write(&export, b"")
                .map_err(|e| Error::io(format!("creating {}", export.display()), e))
        })
        .await?;
        crate::failpoint!("localattach.recorded");
        let discard = spec.options.discard == Some(Discard::Unmap);
        daemon::start(slot, rec, discard).await?;
        crate::failpoint!("localattach.daemon-started");
        let export = slot.export_path(&rec.serial);
        let name = loopdev::attach(&export, rec.readonly, spec.options.logical_block_size).await?;
        crate::failpoint!("localattach.loop-attached");
        // Confirm through sysfs, the way the node will look for it.
        let (sysfs, n) = (self.sysfs.clone(), name.clone());
        let backing = exec::blocking(move || Ok(sysfs.loop_backing_file(&n))).await?;
        if backing.as_deref() != Some(export.as_path()) {
            return Err(Error::internal(format!(
                "/dev/{name} is not backed by {} after losetup",
                export.display()
            )));
        }
        Ok(name)
    }
}

#[async_trait::async_trait]
impl Attacher for LocalAttacher {
    async fn serves(&self, node_id: &str) -> Result<bool> {
        Ok(node_id == self.node_id)
    }

    /// One read of the loop devices for all slots (not one per slot: with hundreds of
    /// volumes attached, a publish would read sysfs hundreds of times over).
    async fn attachments(&self) -> Result<Vec<Attachment>> {
        let (dir, sysfs) = (self.state_dir.clone(), self.sysfs.clone());
        let complete = exec::blocking(move || {
            let mut by_backing: BTreeMap<PathBuf, String> = BTreeMap::new();
            for (name, backing) in sysfs.loop_devices()? {
                by_backing.entry(backing).or_insert(name);
            }
            let mut out = Vec::new();
            for slot in slot::list(&dir)? {
                let Some(rec) = slot.read_record()? else {
                    continue;
                };
                if let Some(name) = by_backing.get(&slot.export_path(&rec.serial)) {
                    out.push((rec, name.clone()));
                }
            }
            Ok(out)
        })
        .await?;
        Ok(complete
            .iter()
            .map(|(rec, name)| self.attachment(rec, name))
            .collect())
    }

    async fn attach(&self, node_id: &str, spec: &DiskSpec, max: u64) -> Result<Attachment> {
        self.check_node(node_id)?;
        let slot = Slot::new(&self.state_dir, &key_of(&spec.volume_id)?);
        if let Some((rec, name)) = self.complete(&slot).await? {
            return Ok(self.attachment(&rec, &name));
        }
        let _counted = self.attaching.lock().await;
        let max = match (max, self.limit) {
            (0, l) | (l, 0) => l,
            (m, l) => m.min(l),
        };
        if max > 0 && self.attachments().await?.len() as u64 >= max {
            return Err(Error::ResourceExhausted(format!(
                "this host already has {max} volumes attached locally, its limit \
                 (max_volumes_per_node, reported by NodeGetInfo); unpublish one first"
            )));
        }
        self.teardown(&slot).await?;
        let rec = Record {
            volume_id: spec.volume_id.clone(),
            serial: slot.serial(),
            image: spec.image.clone(),
            format: spec.format,
            readonly: spec.readonly,
            shareable: spec.shareable,
        };
        match self.start(&slot, &rec, spec).await {
            Ok(name) => {
                tracing::info!(volume = %spec.volume_id, device = %name, readonly = rec.readonly, "volume attached locally");
                Ok(self.attachment(&rec, &name))
            }
            Err(e) => {
                if let Err(t) = self.teardown(&slot).await {
                    tracing::warn!(volume = %spec.volume_id, error = %t, "cleanup after a failed local attach failed");
                }
                Err(e)
            }
        }
    }

    async fn detach(&self, node_id: &str, volume_id: &str) -> Result<()> {
        self.check_node(node_id)?;
        let Ok(key) = key_of(volume_id) else {
            return Ok(());
        };
        self.teardown(&Slot::new(&self.state_dir, &key)).await
    }

    async fn resize(&self, node_id: &str, volume_id: &str, size: u64) -> Result<()> {
        self.check_node(node_id)?;
        let slot = Slot::new(&self.state_dir, &key_of(volume_id)?);
        let Some((rec, name)) = self.complete(&slot).await? else {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not attached to this host"
            )));
        };
        if rec.readonly {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is attached read-only here; unpublish it to expand it"
            )));
        }
        qmp::execute(
            &slot.qmp_path(),
            "block_resize",
            serde_json::json!({"node-name": daemon::DISK_NODE, "size": size}),
        )
        .await?;
        // The kernel caches the FUSE file's size for a second (the export's attribute
        // timeout): refresh until the loop device sees the new size.
        let start = std::time::Instant::now();
        loop {
            loopdev::refresh_capacity(&self.sysfs, &name).await?;
            let (sysfs, n) = (self.sysfs.clone(), name.clone());
            let now = exec::blocking(move || Ok(sysfs.device(&n)))
                .await?
                .map(|d| d.size_bytes)
                .unwrap_or(0);
            if now >= size {
                break;
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                return Err(Error::internal(format!(
                    "/dev/{name} is {now} bytes after growing the image to {size}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        tracing::info!(volume = %volume_id, device = %name, size, "locally attached volume grown");
        Ok(())
    }

    async fn set_qos(&self, node_id: &str, volume_id: &str, qos: &Qos) -> Result<()> {
        self.check_node(node_id)?;
        if !qos.is_empty() {
            tracing::warn!(volume = %volume_id, "local attach does not enforce QoS limits; they apply when the volume is attached to a VM");
        }
        Ok(())
    }

    /// Only the state directory: a host without FUSE or loop support (e.g. a monolith inside
    /// a guest that attaches through libvirt) stays healthy; an attach here says what is missing.
    async fn check_health(&self) -> Result<()> {
        let dir = self.state_dir.clone();
        exec::blocking(move || {
            if dir.is_dir() {
                Ok(())
            } else {
                Err(Error::Unavailable(format!(
                    "local attach state directory {} is missing",
                    dir.display()
                )))
            }
        })
        .await
    }
}
