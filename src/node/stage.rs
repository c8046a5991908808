//! NodeStageVolume / NodeUnstageVolume.
//!
//! A mount volume is mounted at the staging path; a block volume has its device node bound onto
//! `<staging>/device`. Either way the staging mount is made shared, so every bind of it (each
//! publish) joins its peer group: unstage counts the peers and refuses while any remain.
//! Staging the same volume under a second path mounts the same device there too; the kernel
//! reuses the superblock, so both paths show one filesystem and each unstages on its own.

use super::fs::{self, Content};
use super::mountinfo::MountEntry;
use super::sysfs::BlockDevice;
use super::{
    lstat, mount_table, mounted_dev, paths, resolve, NodeOps, StageRequest, BLOCK_STAGE_FILE,
};
use crate::error::{Error, Result};
use crate::exec;
use crate::model::{AccessType, DEFAULT_FS_TYPE, FS_TYPES};
use std::path::{Path, PathBuf};

/// Creates the staging directory if missing (the CO should have, but need not).
async fn ensure_dir(path: &Path) -> Result<()> {
    let p = path.to_path_buf();
    exec::blocking(move || {
        paths::refuse_symlink("staging_target_path", &p)?;
        std::fs::create_dir_all(&p)
            .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        if !p.is_dir() {
            return Err(Error::invalid(format!(
                "{} is not a directory",
                p.display()
            )));
        }
        Ok(())
    })
    .await
}

/// Creates an empty regular file to mount a device node onto.
async fn ensure_file(path: &Path) -> Result<()> {
    let p = path.to_path_buf();
    exec::blocking(move || {
        paths::refuse_symlink("path", &p)?;
        if p.is_dir() {
            // An empty directory left by a CO that expected a mount volume.
            std::fs::remove_dir(&p).map_err(|e| {
                Error::AlreadyExists(format!(
                    "{} is a non-empty directory; a block volume needs a file there ({e})",
                    p.display()
                ))
            })?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map(drop)
            .map_err(|e| Error::io(format!("creating {}", p.display()), e))
    })
    .await
}

/// What the staging path holds now.
struct StagingState {
    staging: PathBuf,
    block_file: PathBuf,
    /// A filesystem mounted at the staging path.
    here: Option<MountEntry>,
    /// A device node bound onto `<staging>/BLOCK_STAGE_FILE`.
    here_block: Option<MountEntry>,
}

fn describe(m: &MountEntry) -> String {
    format!(
        "{} ({} from {})",
        m.mount_point.display(),
        m.fs_type,
        m.source
    )
}

impl NodeOps {
    pub(crate) async fn stage(&self, r: StageRequest) -> Result<()> {
        let _g = self.guard(&r.volume_id)?;
        let query = Self::query_for(&r.volume_id, r.device.clone())?;
        let dev = super::discover::wait_for_device(&self.sysfs, &query, self.device_wait).await?;
        self.refuse_dead(&r.volume_id, dev.dev()).await?;
        ensure_dir(&r.staging_path).await?;
        let staging = resolve(&r.staging_path).await?;
        let block_file = staging.join(BLOCK_STAGE_FILE);
        let table = mount_table().await?;
        let here = table.at(&staging).cloned();
        let here_block = table.at(&block_file).cloned();
        let at = StagingState {
            staging,
            block_file,
            here,
            here_block,
        };
        if r.capability.is_block() {
            self.stage_block(&r, &dev, at).await
        } else {
            self.stage_mount(&r, &dev, at).await
        }
    }

    async fn stage_block(
        &self,
        r: &StageRequest,
        dev: &BlockDevice,
        at: StagingState,
    ) -> Result<()> {
        let StagingState {
            staging,
            block_file,
            here,
            here_block,
        } = at;
        let dev_path = self.sysfs.dev_path(&dev.name);
        if let Some(m) = here {
            return Err(Error::AlreadyExists(format!(
                "staging path {} holds a mounted filesystem {}; a block volume cannot be \
                 staged there",
                staging.display(),
                describe(&m)
            )));
        }
        if let Some(m) = here_block {
            if mounted_dev(&m).await == Some(dev.dev()) {
                fs::make_shared(&block_file).await?;
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "staging path {} already holds another device; unstage it first",
                staging.display()
            )));
        }
        ensure_file(&block_file).await?;
        fs::bind(&dev_path, &block_file).await?;
        crate::failpoint!("stage.block-bound");
        fs::make_shared(&block_file).await?;
        tracing::info!(volume = %r.volume_id, device = %dev.name, staging = %staging.display(), "block volume staged");
        Ok(())
    }

    /// A mount volume: reuse what is staged here already, else make sure the disk carries a
    /// filesystem (formatting only a disk that reads and is blank), then mount it.
    async fn stage_mount(
        &self,
        r: &StageRequest,
        dev: &BlockDevice,
        at: StagingState,
    ) -> Result<()> {
        let AccessType::Mount {
            fs_type,
            mount_flags,
        } = &r.capability.access_type
        else {
            return Err(Error::internal(
                "a block capability reached the mount staging",
            ));
        };
        let requested = (!fs_type.is_empty()).then(|| fs_type.clone());
        if already_staged(r, dev, &at, requested.as_deref())? {
            fs::make_shared(&at.staging).await?;
            if at.here.as_ref().is_some_and(|m| !m.read_only()) {
                super::settle_ownership(&at.staging, r.root, false, r.mount_group).await?;
            }
            return Ok(());
        }
        let read_only = dev.read_only || r.capability.access_mode.is_read_only();
        let (fs_type, formatted) = self.ensure_filesystem(r, dev, requested, read_only).await?;
        let ro_mount_only = superblock_read_only(r, dev, read_only).await?;
        let options = mount_options(mount_flags, &fs_type, read_only && !ro_mount_only);
        let dev_path = self.sysfs.dev_path(&dev.name);
        fs::mount(&dev_path, &at.staging, &fs_type, &options).await?;
        crate::failpoint!("stage.mounted");
        let finish = async {
            if ro_mount_only {
                fs::remount_read_only(&at.staging).await?;
            } else if !read_only {
                super::settle_ownership(&at.staging, r.root, formatted, r.mount_group).await?;
            }
            fs::make_shared(&at.staging).await
        };
        if let Err(e) = finish.await {
            let _ = fs::unmount(&at.staging).await;
            return Err(e);
        }
        tracing::info!(volume = %r.volume_id, device = %dev.name, fs = %fs_type, staging = %at.staging.display(), "volume staged");
        Ok(())
    }

    /// The filesystem to mount, and whether it was just made: the one on the disk, or a new
    /// one when the disk reads and carries no signature at all.
    async fn ensure_filesystem(
        &self,
        r: &StageRequest,
        dev: &BlockDevice,
        requested: Option<String>,
        read_only: bool,
    ) -> Result<(String, bool)> {
        let dev_path = self.sysfs.dev_path(&dev.name);
        match fs::probe(&dev_path).await? {
            Content::Blank => {
                let fs_type = requested
                    .or_else(|| r.default_fs.clone().filter(|f| !f.is_empty()))
                    .unwrap_or_else(|| DEFAULT_FS_TYPE.to_string());
                if !FS_TYPES.contains(&fs_type.as_str()) {
                    return Err(Error::invalid(format!(
                        "fs_type {fs_type:?} is not supported: use ext4 or xfs"
                    )));
                }
                if read_only {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} has no filesystem yet and is attached read-only; publish it \
                         read-write once to format it",
                        r.volume_id
                    )));
                }
                tracing::info!(volume = %r.volume_id, device = %dev.name, fs = %fs_type, "formatting blank disk");
                fs::mkfs(&dev_path, &fs_type)
                    .await
                    .map_err(|e| fs::mkfs_failure(e, &fs_type, dev.size_bytes))?;
                crate::failpoint!("stage.formatted");
                Ok((fs_type, true))
            }
            Content::Filesystem(found) => {
                if let Some(want) = requested.as_ref().filter(|w| **w != found) {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} holds a {found} filesystem but {want} was asked for; it is \
                         never reformatted: ask for {found} or leave fs_type empty",
                        r.volume_id
                    )));
                }
                Ok((found, false))
            }
            Content::Other(what) => Err(Error::FailedPrecondition(format!(
                "volume {}'s disk {} holds {what}, not a filesystem; refusing to format or \
                 mount it",
                r.volume_id, dev.name
            ))),
        }
    }

    /// Unmounts this volume from the staging path. A staging path where another volume is
    /// mounted is left as it is (OK: this volume is not staged there).
    pub(crate) async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let Ok(serial) = Self::serial_for(volume_id) else {
            // Not one of this plugin's volumes: it is staged nowhere.
            return Ok(());
        };
        let _g = self.guard(volume_id)?;
        let staging = resolve(staging_path).await?;
        // An error other than "not found" (e.g. a dead mount) still goes on to unmount.
        if matches!(lstat(&staging).await, Ok(None)) {
            return Ok(());
        }
        let block_file = staging.join(BLOCK_STAGE_FILE);
        // Loop: a mount may be stacked on another (a CO that staged twice by hand).
        for _ in 0..8 {
            let table = mount_table().await?;
            let Some(m) = table.at(&block_file).or_else(|| table.at(&staging)) else {
                break;
            };
            if !self.may_take_down(m, &serial, volume_id).await? {
                return Ok(());
            }
            let users = table.users_of(m, BLOCK_STAGE_FILE);
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; NodeUnpublishVolume those \
                     targets before unstaging {}",
                    users
                        .iter()
                        .map(|u| u.mount_point.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    staging.display()
                )));
            }
            fs::unmount(&m.mount_point.clone()).await?;
            crate::failpoint!("unstage.unmounted");
        }
        remove_leaves(vec![block_file, staging.clone()]).await;
        tracing::info!(volume = %volume_id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }
}

/// Whether the staging path already holds this volume as asked (then there is nothing to
/// mount); an error when it holds something else.
fn already_staged(
    r: &StageRequest,
    dev: &BlockDevice,
    at: &StagingState,
    requested: Option<&str>,
) -> Result<bool> {
    if at.here_block.is_some() {
        return Err(Error::AlreadyExists(format!(
            "staging path {} holds a block volume; unstage it first",
            at.staging.display()
        )));
    }
    let Some(m) = &at.here else {
        return Ok(false);
    };
    if m.dev() != dev.dev() {
        return Err(Error::AlreadyExists(format!(
            "staging path {} already has {} mounted, not this volume's disk {}; unstage it first",
            at.staging.display(),
            describe(m),
            dev.name
        )));
    }
    if let Some(want) = requested.filter(|w| *w != m.fs_type) {
        return Err(Error::AlreadyExists(format!(
            "volume {} is staged at {} as {}, not {want}",
            r.volume_id,
            at.staging.display(),
            m.fs_type
        )));
    }
    Ok(true)
}

/// Whether the mount must be made read-only on its own, over a read-write superblock.
///
/// The disk may be staged at another path already (Nomad stages once per usage, e.g. a reader
/// next to a writer): the kernel shares one superblock per device, and mount refuses to flip
/// its read-only state. A read-only stage of a disk mounted read-write gets the read-write
/// superblock behind a read-only mount; a read-write stage of a disk mounted read-only
/// elsewhere is refused.
async fn superblock_read_only(
    r: &StageRequest,
    dev: &BlockDevice,
    read_only: bool,
) -> Result<bool> {
    let others = mount_table().await?;
    let mounts = others.of_device(dev.dev());
    let sb_read_only = mounts
        .first()
        .map(|m| m.super_options.iter().any(|o| o == "ro"));
    match sb_read_only {
        Some(false) => Ok(read_only),
        Some(true) if !read_only => Err(Error::FailedPrecondition(format!(
            "volume {} is mounted read-only elsewhere on this node ({}); a read-write stage \
             needs those read-only stages unstaged first",
            r.volume_id,
            mounts
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        _ => Ok(false),
    }
}

/// The capability's flags, plus what the node needs: `ro` for read-only disks and modes,
/// `nouuid` for xfs (a clone or snapshot restore carries its origin's UUID, which xfs would
/// refuse to mount twice on one node).
pub(super) fn mount_options(flags: &[String], fs_type: &str, read_only: bool) -> Vec<String> {
    let mut opts: Vec<String> = Vec::new();
    let mut push = |o: &str| {
        if !opts.iter().any(|x| x == o) {
            opts.push(o.to_string());
        }
    };
    for f in flags {
        if read_only && f == "rw" {
            continue;
        }
        push(f);
    }
    if read_only {
        push("ro");
    }
    if fs_type == "xfs" {
        push("nouuid");
    }
    opts
}

/// Removes what the plugin created: the empty files block volumes are bound onto, then empty
/// directories. Anything else (a directory the CO filled, a file with content, a symlink) is
/// logged and kept: it is not the plugin's, and an unpublish of a path that holds no mount
/// must never delete a file that happens to be there.
pub(super) async fn remove_leaves(paths: Vec<PathBuf>) {
    let _ = exec::blocking(move || {
        for p in paths {
            let res = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&p),
                Ok(m) if m.is_file() && m.len() == 0 => std::fs::remove_file(&p),
                Ok(_) => {
                    tracing::warn!(path = %p.display(),
                        "left in place: not an empty file or directory the plugin made");
                    continue;
                }
                Err(_) => continue,
            };
            if let Err(e) = res {
                tracing::warn!(path = %p.display(), error = %e, "left in place");
            }
        }
        Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_add_ro_and_nouuid_once() {
        let flags = vec![
            "noatime".to_string(),
            "rw".to_string(),
            "noatime".to_string(),
        ];
        assert_eq!(mount_options(&flags, "ext4", false), vec!["noatime", "rw"]);
        assert_eq!(
            mount_options(&flags, "xfs", true),
            vec!["noatime", "ro", "nouuid"]
        );
        assert!(mount_options(&[], "ext4", false).is_empty());
    }
}
