//! NodeExpandVolume: make the node see the disk's new size, then grow the filesystem online.

use super::sysfs::{BlockDevice, DeviceKind};
use super::{lstat, mount_table, resolve, ExpandRequest, Holder, NodeOps, BLOCK_STAGE_FILE};
use crate::error::{Error, Result};
use crate::exec;
use std::ffi::OsString;
use std::time::{Duration, Instant};

impl NodeOps {
    /// Returns the device's size after expansion.
    /// Returns the device's size after expansion. Only ever grows this volume's own disk
    /// (told by its serial), whatever path the request names: NOT_FOUND when the path (or the
    /// staging path) does not show it.
    pub(crate) async fn expand(&self, r: ExpandRequest) -> Result<u64> {
        let serial = Self::serial_for(&r.volume_id)?;
        let _g = self.guard(&r.volume_id)?;
        let path = resolve(&r.volume_path).await?;
        let not_here = |why: String| {
            Error::NotFound(format!(
                "volume {} is not at {}: {why}",
                r.volume_id,
                path.display()
            ))
        };
        if matches!(lstat(&path).await, Ok(None)) {
            return Err(not_here("the path does not exist".into()));
        }
        let table = mount_table().await?;
        // The volume path, else the staging path (block: its device file).
        let mut candidates = vec![path.clone()];
        if let Some(s) = &r.staging_path {
            let s = resolve(s).await?;
            candidates.push(s.join(BLOCK_STAGE_FILE));
            candidates.push(s);
        }
        let Some(mount) = candidates.iter().find_map(|c| table.at(c)).cloned() else {
            return Err(not_here(
                "nothing is mounted there (nor at the staging path)".into(),
            ));
        };
        let block_mount = mount.is_device_bind();
        let dev = match self.holder(&mount, &serial).await? {
            Holder::Volume(d) => d,
            Holder::Other(what) | Holder::Unknown(what) => {
                return Err(not_here(format!(
                    "{} shows {what}; refusing to grow it",
                    mount.mount_point.display()
                )))
            }
        };
        self.refuse_dead(&r.volume_id, dev.dev()).await?;
        let dev = self.refresh_size(&dev, r.required_bytes).await?;
        if r.block.unwrap_or(block_mount) {
            return Ok(dev.size_bytes);
        }
        let dev_path = self.sysfs.dev_path(&dev.name);
        super::fs::grow(&mount.fs_type, &dev_path, &mount.mount_point).await?;
        tracing::info!(volume = %r.volume_id, device = %dev.name, size = dev.size_bytes, fs = %mount.fs_type, "filesystem grown");
        Ok(dev.size_bytes)
    }

    /// Asks the kernel to re-read the disk's capacity.
    async fn rescan(&self, dev: &BlockDevice) -> Result<()> {
        match dev.kind {
            DeviceKind::Scsi => {
                let (s, name) = (self.sysfs.clone(), dev.name.clone());
                exec::blocking(move || s.rescan_capacity(&name)).await?;
            }
            DeviceKind::Loop => {
                let p: OsString = self.sysfs.dev_path(&dev.name).into();
                exec::run("losetup", [OsString::from("-c"), p]).await?;
            }
            // virtio-blk learns its new size from the device itself.
            DeviceKind::Virtio | DeviceKind::Other => {}
        }
        Ok(())
    }

    /// Rescans the disk's capacity until it reaches `required` (bounded wait).
    async fn refresh_size(&self, dev: &BlockDevice, required: u64) -> Result<BlockDevice> {
        let start = Instant::now();
        loop {
            // Repeated: a loop device over FUSE sees a new size only once the cached
            // attributes expire.
            self.rescan(dev).await?;
            let (s, name) = (self.sysfs.clone(), dev.name.clone());
            let now = exec::blocking(move || Ok(s.device(&name)))
                .await?
                .ok_or_else(|| Error::NotFound(format!("disk {} disappeared", dev.name)))?;
            if now.size_bytes >= required {
                return Ok(now);
            }
            if start.elapsed() >= self.device_wait {
                return Err(Error::FailedPrecondition(format!(
                    "disk {} is {} bytes, less than the {required} asked for; run \
                     ControllerExpandVolume first",
                    dev.name, now.size_bytes
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
