//! The node side: find the volume's disk, format it once, mount it at the staging path, bind it
//! to each target, report its health and grow it. State lives in the kernel (mountinfo,
//! sysfs), so a restarted plugin picks up exactly where the last one stopped; beside it the
//! node keeps only what each mount was asked for (`record`), valid while that very mount is.

mod bindmount;
pub(crate) mod discover;
mod expand;
pub(crate) mod fs;
mod fsopts;
pub mod mountinfo;
mod owner;
pub(crate) mod paths;
mod publish;
mod record;
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
use crate::ids::{self, ObjectId};
use crate::model::Capability;
use mountinfo::{MountTable, Role};
use record::Records;
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
    /// None: the CO sent none (FAILED_PRECONDITION, once the volume is known to be here).
    pub(crate) staging_path: Option<PathBuf>,
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
    /// Disks may be hot-plugged into this node (a VM): one that is not there yet may still be
    /// appearing. False on a host whose volumes are attached locally, which are there when
    /// ControllerPublishVolume returns, or never.
    hotplug: bool,
    guards: OpGuards,
    /// What each stage and publish asked for (see `record`).
    records: Records,
}

impl NodeOps {
    pub(crate) fn new(cfg: &NodeConfig) -> Self {
        NodeOps {
            sysfs: Sysfs::new(cfg.sysfs_root(), cfg.dev_root()),
            device_wait: cfg.device_wait(),
            hotplug: cfg.local_attach != Some(true) || crate::nodeid::is_qemu_guest(Path::new("/")),
            guards: OpGuards::default(),
            records: Records::new(cfg.state_dir.clone()),
        }
    }

    /// The disk of a volume, `q` checked: found at once when it cannot still be appearing (a
    /// locally attached volume, or no publish_context on a node that attaches locally), else
    /// within the bounded wait for a hot-plugged disk. NOT_FOUND when it is not there.
    async fn find_device(&self, q: &DeviceQuery) -> Result<sysfs::BlockDevice> {
        let may_still_appear = match q.bus.as_str() {
            "local" => false,
            "" => self.hotplug,
            _ => true,
        };
        let wait = if may_still_appear {
            self.device_wait
        } else {
            Duration::ZERO
        };
        discover::wait_for_device(&self.sysfs, q, wait).await
    }

    /// NOT_FOUND unless the volume's disk is on this node now (no waiting: for the RPCs that
    /// come after NodeStageVolume found it).
    async fn present(&self, volume_id: &str) -> Result<()> {
        let query = Self::query_for(volume_id, DeviceQuery::default())?;
        let (s, q) = (self.sysfs.clone(), query.clone());
        exec::blocking(move || discover::find_now(&s, &q))
            .await?
            .map(drop)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "volume {volume_id} is not on this node: no disk with serial {} is \
                     attached here; ControllerPublishVolume it to this node and \
                     NodeStageVolume it first",
                    query.serial
                ))
            })
    }

    /// FAILED_PRECONDITION when `path` (a staging or target path) lies in the file system of
    /// one of this plugin's disks — any volume's, this one's too: the CO's directory would
    /// become a directory in that volume, and the volume mounted there would show through
    /// its staging path and every publish. Told by the disk behind the mount that holds the
    /// path's parent, never by the path's spelling.
    async fn refuse_inside_a_volume(
        &self,
        what: &str,
        path: &Path,
        table: &MountTable,
    ) -> Result<()> {
        let Some(parent) = path.parent().map(Path::to_path_buf) else {
            return Ok(());
        };
        let real = exec::blocking(move || Ok(paths::real_location(&parent))).await?;
        let Some(m) = table.containing(&real).cloned() else {
            return Ok(());
        };
        if let Behind::Disk(d, Some(serial)) = self.behind(&m).await? {
            if ids::is_volume_serial(&serial) {
                return Err(Error::FailedPrecondition(format!(
                    "{what} {} lies inside the file system of volume disk {} (serial {serial}), \
                     mounted at {}: a path there would create files in that volume and mount \
                     one volume inside another; give a path in the CO's own directory",
                    path.display(),
                    d.name,
                    m.mount_point.display()
                )));
            }
        }
        Ok(())
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

    /// The disk behind mount `m` (a filesystem's device, or the device a bound device node
    /// refers to), told by sysfs, never by the path.
    async fn behind(&self, m: &mountinfo::MountEntry) -> Result<Behind> {
        let Some(dev) = mounted_dev(m).await else {
            return Ok(Behind::Gone(format!(
                "a device node that cannot be read ({} from {})",
                m.fs_type, m.source
            )));
        };
        // Major 0 is the kernel's unnamed device: tmpfs, proc, FUSE, NFS, overlay … have no
        // disk behind them, so they are never a volume of this plugin, dead or alive.
        if dev.0 == 0 {
            return Ok(Behind::NoDisk(format!(
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
            None => Behind::Gone(format!(
                "device {}:{}, which is gone from this node",
                dev.0, dev.1
            )),
            Some((d, serial)) => Behind::Disk(d, serial),
        })
    }

    /// Which disk mount `m` shows, against the volume whose serial is `serial`.
    async fn holder(&self, m: &mountinfo::MountEntry, serial: &str) -> Result<Holder> {
        Ok(match self.behind(m).await? {
            Behind::NoDisk(what) => Holder::Other(what),
            Behind::Gone(what) => Holder::Unknown(what),
            Behind::Disk(d, Some(s)) if s == serial => Holder::Volume(d),
            Behind::Disk(d, s) => Holder::Other(match s {
                Some(s) if ids::is_volume_serial(&s) => {
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

    /// NodeUnpublish (`takes_down` = [`Role::Publish`]) and NodeUnstage ([`Role::Stage`]):
    /// whether mount `m` may be taken down for `volume_id`. It must show the volume's own
    /// disk, or a disk gone from the node (a dead mount: nobody's data is there any more);
    /// another volume's disk is left alone (false: the caller answers OK and touches nothing,
    /// since this volume is not mounted there). And it must be a mount of the kind the RPC
    /// takes down, told from the mount table (`MountTable::role`): a NodeUnpublish naming the
    /// volume's staging mount, or a NodeUnstage naming one of its publishes, would take the
    /// consumer's data away — FAILED_PRECONDITION, saying what is there.
    async fn may_take_down(
        &self,
        table: &MountTable,
        m: &mountinfo::MountEntry,
        serial: &str,
        volume_id: &str,
        takes_down: Role,
    ) -> Result<bool> {
        match self.holder(m, serial).await? {
            Holder::Volume(_) => {}
            Holder::Other(what) => {
                tracing::warn!(volume = %volume_id, path = %m.mount_point.display(), holds = %what,
                    "another disk is mounted here, not this volume's: left untouched");
                return Ok(false);
            }
            Holder::Unknown(what) => {
                tracing::warn!(volume = %volume_id, path = %m.mount_point.display(), holds = %what,
                    "a mount whose disk is gone");
            }
        }
        let role = table.role(m, BLOCK_STAGE_FILE);
        if role == Role::Either || role == takes_down {
            return Ok(true);
        }
        let here = m.mount_point.display();
        Err(Error::FailedPrecondition(match takes_down {
            Role::Publish => {
                let publishes = list(&table.publishes_of(m, BLOCK_STAGE_FILE));
                format!(
                    "{here} is volume {volume_id}'s staging mount, not a publish of it (a bind \
                     at a target): NodeUnpublishVolume takes down publishes only; \
                     NodeUnstageVolume {here}{}",
                    if publishes.is_empty() {
                        String::new()
                    } else {
                        format!(" once its publishes at {publishes} are unpublished")
                    }
                )
            }
            _ => format!(
                "volume {volume_id} is published at {here} (a bind of its staging mount{}), \
                 not staged there: NodeUnpublishVolume {here} first, then NodeUnstageVolume the \
                 staging path NodeStageVolume staged it at",
                table
                    .stage_of(m, BLOCK_STAGE_FILE)
                    .map(|s| format!(" at {}", s.mount_point.display()))
                    .unwrap_or_default()
            ),
        }))
    }

    /// Keeps what was asked for the mount just made at `mount_point` (see `record`).
    async fn remember(&self, mount_point: &Path, asked: &record::Asked) {
        let (records, p, a) = (
            self.records.clone(),
            mount_point.to_path_buf(),
            asked.clone(),
        );
        let _ = exec::blocking(move || {
            if let Some(m) = MountTable::read()?.at(&p) {
                records.save(m, &a);
            }
            Ok(())
        })
        .await;
    }

    /// How a repeated request (`asked`) differs from the one that made mount `m`; None when
    /// it is the same. Compared with `m`'s record when there is one, else with what the kernel
    /// shows (`read_only_anyway`: see `Asked::differs_from_mount`); a repeat that matches a
    /// mount with no record (a crash, an older version) becomes its record from now on.
    async fn differs_from_made(
        &self,
        m: &mountinfo::MountEntry,
        asked: &record::Asked,
        read_only_anyway: bool,
    ) -> Option<String> {
        let (records, mc, a) = (self.records.clone(), m.clone(), asked.clone());
        let before = exec::blocking(move || {
            let before = records.load(&mc);
            if before.is_none() && a.differs_from_mount(&mc, read_only_anyway).is_none() {
                records.save(&mc, &a);
            }
            Ok(before)
        })
        .await
        .ok()
        .flatten();
        match before {
            Some(before) => asked.differs_from(&before),
            None => asked.differs_from_mount(m, read_only_anyway),
        }
    }

    /// Drops the record of the mount taken down at `mount_point`.
    async fn forget(&self, mount_point: &Path) {
        let (records, p) = (self.records.clone(), mount_point.to_path_buf());
        let _ = exec::blocking(move || {
            records.forget(&p);
            Ok(())
        })
        .await;
    }

    /// The serial to look for: the one derived from the volume id (Nomad keeps
    /// publish_context in memory only and may lose it). A publish_context serial that names
    /// another disk is INVALID_ARGUMENT: staging it would mount another volume's data under
    /// this volume's name. An id that is not one of this plugin's is NOT_FOUND at once.
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
            None => {
                return Err(Error::NotFound(format!(
                    "volume {volume_id} is not a volume of this plugin (ids are \
                     <pool>.<16 hex digits>), so none of its disks is on this node"
                )))
            }
        }
        Ok(q)
    }
}

/// What is behind a mount (see `NodeOps::behind`).
#[derive(Debug)]
enum Behind {
    /// A file system with no disk (tmpfs, proc, FUSE …), described.
    NoDisk(String),
    /// A disk that cannot be told: gone from the node (hot-unplugged, detached), described.
    Gone(String),
    /// A disk of this node, with the serial it reports.
    Disk(sysfs::BlockDevice, Option<String>),
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

/// Mount points, comma separated, for messages.
fn list(mounts: &[&mountinfo::MountEntry]) -> String {
    mounts
        .iter()
        .map(|m| m.mount_point.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
