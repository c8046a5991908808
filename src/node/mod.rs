//! The node side: find the volume's disk, format it once, mount it at the staging path, bind it
//! to each target, report its health and grow it. State lives in the kernel only (mountinfo,
//! sysfs), so a restarted plugin picks up exactly where the last one stopped.

pub(crate) mod discover;
mod expand;
pub(crate) mod fs;
pub mod mountinfo;
mod owner;
pub(crate) mod paths;
mod publish;
mod robind;
mod stage;
mod stats;
pub(crate) mod sysfs;

pub(crate) use discover::DeviceQuery;
pub(crate) use stats::UsageUnit;
pub use sysfs::Sysfs;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::exec;
use crate::guard::{OpGuard, OpGuards};
use crate::ids::ObjectId;
use crate::model::Capability;
use mountinfo::MountTable;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Inside a block volume's staging directory: the file the device node is bound onto. The
/// name is distinctive: unstage tells other staging paths of the volume from publishes by it.
pub const BLOCK_STAGE_FILE: &str = "virtdisk-block-device";

/// NodeStageVolume in domain terms.
#[derive(Debug, Clone)]
pub(crate) struct StageRequest {
    pub(crate) volume_id: String,
    pub(crate) staging_path: PathBuf,
    pub(crate) capability: Capability,
    pub(crate) device: DeviceQuery,
    /// The volume's file system when the capability names none (volume_context `fsType`).
    pub(crate) default_fs: Option<String>,
    /// Owner and mode of a fresh file system's root (volume_context `rootUid`/…).
    pub(crate) root: crate::params::RootOwnership,
    /// The CO's `volume_mount_group` (Kubernetes fsGroup): the file system becomes the group's.
    pub(crate) mount_group: Option<u32>,
}

/// NodePublishVolume in domain terms.
#[derive(Debug, Clone)]
pub(crate) struct PublishRequest {
    pub(crate) volume_id: String,
    pub(crate) staging_path: PathBuf,
    pub(crate) target_path: PathBuf,
    pub(crate) capability: Capability,
    pub(crate) readonly: bool,
    /// The CO's `volume_mount_group` (Kubernetes fsGroup).
    pub(crate) mount_group: Option<u32>,
}

/// NodeExpandVolume in domain terms.
#[derive(Debug, Clone)]
pub(crate) struct ExpandRequest {
    pub(crate) volume_id: String,
    pub(crate) volume_path: PathBuf,
    pub(crate) staging_path: Option<PathBuf>,
    pub(crate) required_bytes: u64,
    /// From the capability when given; else read from what is mounted.
    pub(crate) block: Option<bool>,
}

#[derive(Clone)]
pub(crate) struct NodeOps {
    sysfs: Sysfs,
    device_wait: Duration,
    guards: OpGuards,
}

impl NodeOps {
    pub(crate) fn new(cfg: &NodeConfig) -> Self {
        NodeOps {
            sysfs: Sysfs::new(cfg.sysfs_root(), cfg.dev_root()),
            device_wait: cfg.device_wait(),
            guards: OpGuards::default(),
        }
    }

    fn guard(&self, volume_id: &str) -> Result<OpGuard> {
        self.guards.try_acquire(&[format!("vol:{volume_id}")])
    }

    /// The serial of this plugin's volume `volume_id` (`vd-<key>`); NOT_FOUND for an id
    /// that is not one of this plugin's volumes (none of its disks can be that volume).
    pub(crate) fn serial_for(volume_id: &str) -> Result<String> {
        ObjectId::parse_volume(volume_id)?
            .map(|o| o.serial())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "volume {volume_id} is not a volume of this plugin, so it is not on this \
                     node"
                ))
            })
    }

    /// Which disk mount `m` shows (a filesystem's device, or the device a bound device node
    /// refers to), told by that disk's serial in sysfs, never by the path.
    async fn holder(&self, m: &mountinfo::MountEntry, serial: &str) -> Result<Holder> {
        let Some(dev) = mounted_dev(m).await else {
            return Ok(Holder::Unknown(format!(
                "a device node that cannot be read ({} from {})",
                m.fs_type, m.source
            )));
        };
        // Major 0 is the kernel's unnamed device: tmpfs, proc, FUSE, NFS, overlay … have no
        // disk behind them, so they are never a volume of this plugin, dead or alive.
        if dev.0 == 0 {
            return Ok(Holder::Other(format!(
                "a {} file system from {} (no disk behind it: not a volume of this plugin)",
                m.fs_type, m.source
            )));
        }
        let sysfs = self.sysfs.clone();
        let found = exec::blocking(move || {
            Ok(sysfs.by_dev(dev)?.map(|d| {
                let serial = sysfs.serial_of(&d.name);
                (d, serial)
            }))
        })
        .await?;
        Ok(match found {
            None => Holder::Unknown(format!(
                "device {}:{}, which is gone from this node",
                dev.0, dev.1
            )),
            Some((d, Some(s))) if s == serial => Holder::Volume(d),
            Some((d, s)) => Holder::Other(match s {
                Some(s) if s.starts_with("vd-") => {
                    format!(
                        "disk {} (serial {s}: another volume of this plugin)",
                        d.name
                    )
                }
                Some(s) => format!("disk {} (serial {s}: not a volume of this plugin)", d.name),
                None => format!("disk {} (no serial: not a volume of this plugin)", d.name),
            }),
        })
    }

    /// NodeUnpublish and NodeUnstage: whether mount `m` may be taken down for `volume_id`:
    /// it shows the volume's own disk, or a disk gone from the node (a dead mount: nobody's
    /// data is there any more). Another volume's disk is left alone (false): the caller
    /// answers OK and touches nothing, since this volume is not mounted there.
    async fn may_take_down(
        &self,
        m: &mountinfo::MountEntry,
        serial: &str,
        volume_id: &str,
    ) -> Result<bool> {
        match self.holder(m, serial).await? {
            Holder::Volume(_) => Ok(true),
            Holder::Other(what) => {
                tracing::warn!(volume = %volume_id, path = %m.mount_point.display(), holds = %what,
                    "another disk is mounted here, not this volume's: left untouched");
                Ok(false)
            }
            Holder::Unknown(what) => {
                tracing::warn!(volume = %volume_id, path = %m.mount_point.display(), holds = %what,
                    "taking down a mount whose disk is gone");
                Ok(true)
            }
        }
    }

    /// The serial to look for: the one derived from the volume id (Nomad keeps
    /// publish_context in memory only and may lose it). A publish_context serial that names
    /// another disk is INVALID_ARGUMENT: staging it would mount another volume's data under
    /// this volume's name. For an id that is not one of this plugin's, the publish_context's.
    pub(crate) fn query_for(volume_id: &str, mut q: DeviceQuery) -> Result<DeviceQuery> {
        match ObjectId::parse_volume(volume_id)?.map(|o| o.serial()) {
            Some(own) if q.serial.is_empty() => q.serial = own,
            Some(own) if q.serial != own => {
                return Err(Error::invalid(format!(
                    "publish_context serial {} is not volume {volume_id}'s disk (serial {own}); \
                     pass the publish_context ControllerPublishVolume returned for this volume",
                    q.serial
                )))
            }
            Some(_) => {}
            None if q.serial.is_empty() => {
                return Err(Error::NotFound(format!(
                    "volume {volume_id} is not a volume of this plugin and the publish_context \
                     names no serial"
                )))
            }
            None => {}
        }
        Ok(q)
    }
}

/// Whose disk a mount shows (see `NodeOps::holder`).
#[derive(Debug)]
enum Holder {
    /// The disk of the volume asked about.
    Volume(sysfs::BlockDevice),
    /// Another disk, described for messages.
    Other(String),
    /// A disk that cannot be told: gone from the node (hot-unplugged, detached), described.
    Unknown(String),
}

/// Who may write the file system mounted read-write at `root`: a fresh root's owner and mode,
/// then the mount group (see `owner`).
async fn settle_ownership(
    root: &Path,
    fresh: crate::params::RootOwnership,
    formatted: bool,
    mount_group: Option<u32>,
) -> Result<()> {
    let root = root.to_path_buf();
    exec::blocking(move || {
        if owner::set_fresh_root(&root, &fresh, formatted)? {
            tracing::info!(root = %root.display(), uid = ?fresh.uid, gid = ?fresh.gid, mode = ?fresh.mode.map(|m| format!("{m:o}")), "fresh file system root owner set");
        }
        if let Some(gid) = mount_group {
            let n = owner::apply_group(&root, gid)?;
            if n > 0 {
                tracing::info!(root = %root.display(), gid, entries = n, "file system made the mount group's");
            }
        }
        Ok(())
    })
    .await
}

async fn mount_table() -> Result<MountTable> {
    exec::blocking(MountTable::read).await
}

/// `paths::resolve` off the runtime.
async fn resolve(path: &Path) -> Result<PathBuf> {
    let p = path.to_path_buf();
    exec::blocking(move || paths::resolve(&p)).await
}

/// lstat; None when the path does not exist.
async fn lstat(path: &Path) -> Result<Option<std::fs::Metadata>> {
    let p = path.to_path_buf();
    exec::blocking(move || match std::fs::symlink_metadata(&p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("inspecting {}", p.display()), e)),
    })
    .await
}

/// The device number a block device node refers to; for anything else that is not a block
/// device node, `fs_dev` (the file system's own device). None when `path` cannot be read.
/// Blocking.
fn rdev_of(path: &Path, fs_dev: (u32, u32)) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    Some(if m.file_type().is_block_device() {
        (libc::major(m.rdev()), libc::minor(m.rdev()))
    } else {
        fs_dev
    })
}

/// The device number a mount stands for: the filesystem's device, or for a bind-mounted
/// device node (block volumes) the device the node refers to. A bind of anything else from a
/// devtmpfs or tmpfs (a directory, a file) stands for that file system's own (unnamed) device.
async fn mounted_dev(m: &mountinfo::MountEntry) -> Option<(u32, u32)> {
    if m.root == Path::new("/") || !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") {
        return Some(m.dev());
    }
    let (p, fs_dev) = (m.mount_point.clone(), m.dev());
    exec::blocking(move || Ok(rdev_of(&p, fs_dev)))
        .await
        .ok()
        .flatten()
}
