//! NodeStageVolume / NodeUnstageVolume.
//!
//! A mount volume is mounted at the staging path; a block volume has its device node bound onto
//! `<staging>/virtdisk-block-device` ([`BLOCK_STAGE_FILE`]). Either way the staging mount is made shared, so every bind of it (each
//! publish) joins its peer group: unstage counts the peers and refuses while any remain.
//! Staging the same volume under a second path mounts the same device there too; the kernel
//! reuses the superblock, so both paths show one filesystem and each unstages on its own.

use super::fs::{self, Content};
use super::mountinfo::MountEntry;
use super::mountinfo::{MountTable, Role};
use super::record::Asked;
use super::sysfs::BlockDevice;
use super::{lstat, mount_table, paths, resolve, Holder, NodeOps, StageRequest, BLOCK_STAGE_FILE};
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

fn describe(m: &MountEntry) -> String {
    format!(
        "{} ({} from {})",
        m.mount_point.display(),
        m.fs_type,
        m.source
    )
}

impl NodeOps {
    /// Mounts the volume's disk at the staging path (a mount volume) or binds its device node
    /// onto the staging file (block). Checked in the order of the CSI error tables: the
    /// publish_context (INVALID_ARGUMENT), the disk (NOT_FOUND, at once where it cannot still
    /// be appearing), then the state: a dead attachment and a staging path inside a volume
    /// (FAILED_PRECONDITION), what the staging path holds (this stage as asked: OK; anything
    /// else: ALREADY_EXISTS), the disk's content.
    pub(crate) async fn stage(&self, r: StageRequest) -> Result<()> {
        let _g = self.guard(&r.volume_id)?;
        let query = Self::query_for(&r.volume_id, r.device.clone())?;
        let dev = self.find_device(&query).await?;
        self.refuse_dead(&r.volume_id, dev.dev()).await?;
        let staging = resolve(&r.staging_path).await?;
        let table = mount_table().await?;
        self.refuse_inside_a_volume("staging_target_path", &staging, &table)
            .await?;
        let block = r.capability.is_block();
        // A block volume's staging file is bound read-write whatever the mode (the publishes
        // are what the consumers see).
        let read_only = !block && (dev.read_only || r.capability.access_mode.is_read_only());
        let asked = Asked::of(&r.volume_id, &r.capability, read_only);
        let block_file = staging.join(BLOCK_STAGE_FILE);
        let (point, elsewhere) = if block {
            (&block_file, &staging)
        } else {
            (&staging, &block_file)
        };
        if let Some(m) = table.at(elsewhere) {
            return Err(Error::AlreadyExists(format!(
                "staging path {} already holds {}, where a {} volume is not staged; unstage \
                 it, or stage this volume at another staging path",
                staging.display(),
                describe(m),
                if block { "block" } else { "mount" }
            )));
        }
        if let Some(m) = table.at(point).cloned() {
            self.already_staged(&r, &query.serial, &dev, &m, &asked, &table)
                .await?;
            fs::make_shared(point).await?;
            if !block && !m.read_only() {
                super::settle_ownership(&staging, r.root, false, r.mount_group).await?;
            }
            return Ok(());
        }
        ensure_dir(&r.staging_path).await?;
        let staging = resolve(&r.staging_path).await?;
        let point = if block {
            let block_file = staging.join(BLOCK_STAGE_FILE);
            self.stage_block(&r, &dev, &block_file).await?;
            block_file
        } else {
            self.stage_mount(&r, &dev, &staging, read_only).await?;
            staging
        };
        self.remember(&point, &asked).await;
        Ok(())
    }

    /// NodeStage at a staging path that holds a mount already: OK when it is this volume's
    /// staging mount, made as asked now; ALREADY_EXISTS when it is another disk, a publish of
    /// this volume, or this volume staged otherwise (file system, flags, read-only).
    async fn already_staged(
        &self,
        r: &StageRequest,
        serial: &str,
        dev: &BlockDevice,
        m: &MountEntry,
        asked: &Asked,
        table: &MountTable,
    ) -> Result<()> {
        let here = m.mount_point.display();
        match self.holder(m, serial).await? {
            Holder::Volume(d) if d.dev() == dev.dev() => {}
            Holder::Volume(d) => {
                return Err(Error::AlreadyExists(format!(
                    "staging path {here} already has disk {} mounted, not this volume's disk \
                     {}; unstage it first",
                    d.name, dev.name
                )))
            }
            Holder::Other(what) | Holder::Unknown(what) => {
                return Err(Error::AlreadyExists(format!(
                    "staging path {here} already has {what} mounted, not this volume's disk \
                     {}; unstage it first",
                    dev.name
                )))
            }
        }
        if table.role(m, BLOCK_STAGE_FILE) == Role::Publish {
            return Err(Error::AlreadyExists(format!(
                "{here} holds a publish of volume {} (a bind of its staging mount{}), not a \
                 staging mount; stage the volume at a staging path of its own",
                r.volume_id,
                table
                    .stage_of(m, BLOCK_STAGE_FILE)
                    .map(|s| format!(" at {}", s.mount_point.display()))
                    .unwrap_or_default()
            )));
        }
        let differs = self
            .differs_from_made(m, asked, dev.read_only && !asked.block)
            .await;
        match differs {
            None => Ok(()),
            Some(how) => Err(Error::AlreadyExists(format!(
                "volume {} is already staged at {here} {how}; NodeUnstageVolume it first to \
                 stage it otherwise",
                r.volume_id
            ))),
        }
    }

    /// Binds the disk's device node onto the (new) staging file, shared so its publishes can
    /// be told and counted.
    async fn stage_block(
        &self,
        r: &StageRequest,
        dev: &BlockDevice,
        block_file: &Path,
    ) -> Result<()> {
        let dev_path = self.sysfs.dev_path(&dev.name);
        ensure_file(block_file).await?;
        fs::bind(&dev_path, block_file).await?;
        crate::failpoint!("stage.block-bound");
        fs::make_shared(block_file).await?;
        tracing::info!(volume = %r.volume_id, device = %dev.name, staging = %block_file.display(), "block volume staged");
        Ok(())
    }

    /// A mount volume at a staging path where nothing is mounted: make sure the disk carries
    /// a filesystem (formatting only a disk that reads and is blank), then mount it.
    async fn stage_mount(
        &self,
        r: &StageRequest,
        dev: &BlockDevice,
        staging: &Path,
        read_only: bool,
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
        let (fs_type, formatted) = self.ensure_filesystem(r, dev, requested, read_only).await?;
        let ro_mount_only = superblock_read_only(r, dev, read_only).await?;
        let options = mount_options(mount_flags, &fs_type, read_only && !ro_mount_only);
        let dev_path = self.sysfs.dev_path(&dev.name);
        if let Err(e) = fs::mount(&dev_path, staging, &fs_type, &options).await {
            return Err(refused_option(&fs_type, mount_flags, e).await);
        }
        crate::failpoint!("stage.mounted");
        let finish = async {
            if ro_mount_only {
                fs::remount_read_only(staging).await?;
            } else if !read_only {
                super::settle_ownership(staging, r.root, formatted, r.mount_group).await?;
            }
            fs::make_shared(staging).await
        };
        if let Err(e) = finish.await {
            let _ = fs::unmount(staging).await;
            return Err(e);
        }
        tracing::info!(volume = %r.volume_id, device = %dev.name, fs = %fs_type, staging = %staging.display(), "volume staged");
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
    /// mounted is left as it is (OK: this volume is not staged there); a publish of this
    /// volume is never taken down here, nor a staging mount its publishes still use
    /// (FAILED_PRECONDITION).
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
            let Some(m) = table
                .at(&block_file)
                .or_else(|| table.at(&staging))
                .cloned()
            else {
                break;
            };
            if !self
                .may_take_down(&table, &m, &serial, volume_id, Role::Stage)
                .await?
            {
                return Ok(());
            }
            let publishes = table.publishes_of(&m, BLOCK_STAGE_FILE);
            if !publishes.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {} (binds of its staging mount \
                     at {}); NodeUnpublishVolume those targets before unstaging it",
                    super::list(&publishes),
                    m.mount_point.display()
                )));
            }
            fs::unmount(&m.mount_point).await?;
            self.forget(&m.mount_point).await;
            crate::failpoint!("unstage.unmounted");
        }
        remove_leaves(vec![block_file, staging.clone()]).await;
        tracing::info!(volume = %volume_id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }
}

/// A failed mount explained: an option the file system refuses is INVALID_ARGUMENT with the
/// kernel's reason (mount(8) says only "wrong fs type, bad option, bad superblock …");
/// anything else stays as it was.
async fn refused_option(fs_type: &str, flags: &[String], failed: Error) -> Error {
    let (fs, f) = (fs_type.to_string(), flags.to_vec());
    match exec::blocking(move || Ok(super::fsopts::refused(&fs, &f))).await {
        Ok(Some((flag, why))) => Error::invalid(format!(
            "mount flag {flag:?} is refused by the {fs_type} file system ({why}); nothing was \
             mounted: fix or remove the flag"
        )),
        _ => failed,
    }
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
