//! NodeExpandVolume: make the node see the disk's new size, then grow the filesystem online.

use super::sysfs::{BlockDevice, DeviceKind};
use super::{lstat, mount_table, mounted_dev, resolve, ExpandRequest, NodeOps, BLOCK_STAGE_FILE};
use crate::error::{Error, Result};
use crate::exec;
use std::ffi::OsString;
use std::time::{Duration, Instant};

impl NodeOps {
    /// Returns the device's size after expansion.
    pub(crate) async fn expand(&self, r: ExpandRequest) -> Result<u64> {
        let _g = self.guard(&r.volume_id)?;
        let path = resolve(&r.volume_path).await?;
        if matches!(lstat(&path).await, Ok(None)) {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
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
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not mounted at {}; stage and publish it first",
                r.volume_id,
                path.display()
            )));
        };
        let block_mount = matches!(mount.fs_type.as_str(), "devtmpfs" | "tmpfs")
            && mount.root != std::path::Path::new("/");
        let dev_no = mounted_dev(&mount).await.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "cannot tell which disk is mounted at {}",
                mount.mount_point.display()
            ))
        })?;
        let sysfs = self.sysfs.clone();
        let dev = exec::blocking(move || sysfs.by_dev(dev_no))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "the disk of volume {} ({}:{}) is gone from this node",
                    r.volume_id, dev_no.0, dev_no.1
                ))
            })?;
        // Only ever grow this volume's own disk, whatever path the request names.
        let expected = crate::ids::ObjectId::parse_volume(&r.volume_id)?.map(|o| o.serial());
        let (s, name) = (self.sysfs.clone(), dev.name.clone());
        let actual = exec::blocking(move || Ok(s.serial_of(&name))).await?;
        if expected.is_none() || actual != expected {
            return Err(Error::FailedPrecondition(format!(
                "{} holds disk {} (serial {}), which is not the disk of volume {}; refusing to \
                 grow it",
                mount.mount_point.display(),
                dev.name,
                actual.as_deref().unwrap_or("unknown"),
                r.volume_id
            )));
        }
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
