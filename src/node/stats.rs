//! NodeGetVolumeStats: usage from statvfs (mounts) or the device size (block), and a condition
//! that says whether the path still shows the volume's own disk.

use super::discover::{find_now, DeviceQuery};
use super::sysfs::DeviceKind;
use super::{lstat, mount_table, resolve, Holder, NodeOps, BLOCK_STAGE_FILE};
use crate::error::{Error, Result};
use crate::exec;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsageUnit {
    Bytes,
    Inodes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) unit: UsageUnit,
    pub(crate) total: u64,
    pub(crate) available: u64,
    pub(crate) used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) abnormal: bool,
    pub(crate) message: String,
}

#[derive(Debug, Clone)]
pub(crate) struct VolumeStats {
    pub(crate) usage: Vec<Usage>,
    pub(crate) condition: Condition,
}

fn statvfs_usage(path: &Path) -> Result<Vec<Usage>> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| {
        Error::io(
            format!("statvfs {}", path.display()),
            std::io::Error::from(e),
        )
    })?;
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let files = st.files() as u64;
    Ok(vec![
        Usage {
            unit: UsageUnit::Bytes,
            total: blocks * frsize,
            available: st.blocks_available() as u64 * frsize,
            used: blocks.saturating_sub(st.blocks_free() as u64) * frsize,
        },
        Usage {
            unit: UsageUnit::Inodes,
            total: files,
            available: st.files_available() as u64,
            used: files.saturating_sub(st.files_free() as u64),
        },
    ])
}

/// A loop device whose backing file sits on a FUSE export whose daemon died (ENOTCONN), or
/// that reads a file other than the one now at its backing path (a dead export someone
/// detached), fails every I/O: say so. Other errors (a path outside this mount namespace)
/// prove nothing.
pub(super) fn dead_loop_backing(sysfs: &super::Sysfs, name: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let backing = sysfs.loop_backing_file(name)?;
    match std::fs::metadata(&backing) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Some(format!(
            "the export behind /dev/{name} ({}) is disconnected: its storage daemon is gone",
            backing.display()
        )),
        Ok(m) => {
            let now = (libc::major(m.dev()), libc::minor(m.dev()));
            match sysfs.loop_backing_identity(name) {
                Ok((dev, ino)) if dev != now || ino != m.ino() => Some(format!(
                    "/dev/{name} reads a file that is gone (device {}:{}), not {} (device \
                     {}:{}): its storage daemon is gone",
                    dev.0,
                    dev.1,
                    backing.display(),
                    now.0,
                    now.1
                )),
                _ => None,
            }
        }
        Err(_) => None,
    }
}

impl NodeOps {
    /// Refuses to use a disk whose attachment is dead (a loop device over a FUSE export whose
    /// storage daemon is gone fails every I/O): a mount, bind or grow on it would fail half-way
    /// or, worse, be taken for a blank disk. The controller repairs such an attachment at the
    /// next ControllerPublishVolume once nothing on this node uses it.
    pub(crate) async fn refuse_dead(&self, volume_id: &str, dev: (u32, u32)) -> Result<()> {
        let sysfs = self.sysfs.clone();
        let reason = exec::blocking(move || {
            Ok(sysfs
                .by_dev(dev)?
                .filter(|d| d.kind == DeviceKind::Loop)
                .and_then(|d| dead_loop_backing(&sysfs, &d.name)))
        })
        .await?;
        match reason {
            None => Ok(()),
            Some(reason) => Err(Error::FailedPrecondition(format!(
                "volume {volume_id} cannot be used on this node: {reason}; unpublish and \
                 unstage it here, then ControllerPublishVolume it again (that attaches it afresh)"
            ))),
        }
    }

    /// Usage and condition of the volume at `volume_path`. NOT_FOUND unless that path shows
    /// this volume's disk (told by its serial); a path that does but whose disk or staging
    /// is broken is an abnormal condition.
    pub(crate) async fn stats(
        &self,
        volume_id: &str,
        volume_path: &Path,
        staging_path: Option<&Path>,
    ) -> Result<VolumeStats> {
        let serial = Self::serial_for(volume_id)?;
        let path = resolve(volume_path).await?;
        let not_here = |why: String| {
            Error::NotFound(format!(
                "volume {volume_id} is not at {}: {why}",
                path.display()
            ))
        };
        let meta = match lstat(&path).await {
            Ok(Some(m)) => Some(m),
            Ok(None) => return Err(not_here("the path does not exist".into())),
            // e.g. ENOTCONN: a dead mount is there; report it, not fail.
            Err(_) => None,
        };
        let table = mount_table().await?;
        let Some(mount) = table.at(&path).cloned() else {
            return Err(not_here("nothing is mounted there".into()));
        };
        let mut problems: Vec<String> = Vec::new();
        let mounted = match self.holder(&mount, &serial).await? {
            Holder::Volume(d) => Some(d),
            Holder::Other(what) => return Err(not_here(format!("it shows {what}"))),
            Holder::Unknown(what) => {
                problems.push(format!(
                    "{} shows {what}: the volume's disk (serial {serial}) is gone from under it",
                    path.display()
                ));
                None
            }
        };
        let block = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device())
            || mount.is_device_bind();
        let query = Self::query_for(volume_id, DeviceQuery::default())?;
        let sysfs = self.sysfs.clone();
        let expected = exec::blocking(move || find_now(&sysfs, &query)).await?;
        if expected.is_none() && mounted.is_some() {
            problems.push(format!(
                "the volume's disk (serial {serial}) is not ready on this node"
            ));
        }
        if let Some(d) = expected.as_ref().filter(|d| d.kind == DeviceKind::Loop) {
            let (sysfs, name) = (self.sysfs.clone(), d.name.clone());
            if let Some(e) = exec::blocking(move || Ok(dead_loop_backing(&sysfs, &name))).await? {
                problems.push(e);
            }
        }
        if let Some(staging) = staging_path {
            let staging = resolve(staging).await?;
            if table.at(&staging).is_none() && table.at(&staging.join(BLOCK_STAGE_FILE)).is_none() {
                problems.push(format!(
                    "the staging path {} is no longer mounted",
                    staging.display()
                ));
            }
        }

        let mut usage = Vec::new();
        if block {
            if let Some(d) = mounted.as_ref().or(expected.as_ref()) {
                usage.push(Usage {
                    unit: UsageUnit::Bytes,
                    total: d.size_bytes,
                    available: 0,
                    used: 0,
                });
            }
        } else {
            let p = path.clone();
            match exec::blocking(move || statvfs_usage(&p)).await {
                Ok(u) => usage = u,
                Err(e) => problems.push(format!("cannot read usage: {e}")),
            }
        }
        let condition = if problems.is_empty() {
            Condition {
                abnormal: false,
                message: "ok".into(),
            }
        } else {
            Condition {
                abnormal: true,
                message: problems.join("; "),
            }
        };
        Ok(VolumeStats { usage, condition })
    }
}
