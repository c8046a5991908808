//! NodePublishVolume / NodeUnpublishVolume: bind mounts of the staging mount onto targets.

use super::stage::remove_leaves;
use super::{
    lstat, mount_table, paths, resolve, Holder, NodeOps, PublishRequest, BLOCK_STAGE_FILE,
};
use crate::error::{Error, Result};
use crate::exec;
use crate::model::AccessMode;
use std::path::{Path, PathBuf};

/// Creates the target leaf (and missing parents): a directory for a mount volume, a file for a
/// block volume. Nomad and Kubernetes create only the parent.
async fn ensure_target(target: &Path, block: bool) -> Result<()> {
    let t = target.to_path_buf();
    exec::blocking(move || {
        paths::refuse_symlink("target_path", &t)?;
        if let Some(parent) = t.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
        }
        let meta = std::fs::symlink_metadata(&t).ok();
        if block {
            if meta.as_ref().is_some_and(|m| m.is_dir()) {
                std::fs::remove_dir(&t).map_err(|e| {
                    Error::AlreadyExists(format!(
                        "target {} is a non-empty directory; a block volume needs a file ({e})",
                        t.display()
                    ))
                })?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&t)
                .map(drop)
                .map_err(|e| Error::io(format!("creating {}", t.display()), e))
        } else {
            if meta.as_ref().is_some_and(|m| !m.is_dir()) {
                return Err(Error::AlreadyExists(format!(
                    "target {} exists and is not a directory; a mount volume needs a directory",
                    t.display()
                )));
            }
            std::fs::create_dir_all(&t)
                .map_err(|e| Error::io(format!("creating {}", t.display()), e))
        }
    })
    .await
}

impl NodeOps {
    pub(crate) async fn publish(&self, r: PublishRequest) -> Result<()> {
        let serial = Self::serial_for(&r.volume_id)?;
        let _g = self.guard(&r.volume_id)?;
        let block = r.capability.is_block();
        let readonly = r.readonly || r.capability.access_mode.is_read_only();
        let staging = resolve(&r.staging_path).await?;
        let target = resolve(&r.target_path).await?;
        let source: PathBuf = if block {
            staging.join(BLOCK_STAGE_FILE)
        } else {
            staging.clone()
        };
        let table = mount_table().await?;
        let Some(stage) = table.at(&source).cloned() else {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged at {} (as a {} volume); call NodeStageVolume first",
                r.volume_id,
                staging.display(),
                if block { "block" } else { "mount" }
            )));
        };
        // The staging path must hold this volume: a CO that mixed up paths (Nomad skips
        // NodeStage when the staging directory is already a mount point) would otherwise
        // publish another volume's data under this one's name.
        match self.holder(&stage, &serial).await? {
            Holder::Volume(d) => self.refuse_dead(&r.volume_id, d.dev()).await?,
            Holder::Other(what) | Holder::Unknown(what) => {
                return Err(Error::FailedPrecondition(format!(
                    "staging path {} holds {what}, not volume {}'s disk (serial {serial}); \
                     NodeStageVolume this volume at its own staging path first",
                    staging.display(),
                    r.volume_id
                )))
            }
        }
        if !block && !readonly && !stage.read_only() {
            if let Some(gid) = r.mount_group {
                super::settle_ownership(&staging, Default::default(), false, Some(gid)).await?;
            }
        }
        if let Some(m) = table.at(&target) {
            if m.dev() == stage.dev() && m.root == stage.root {
                if m.read_only() == readonly {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published at {} {}; unpublish it first to change that",
                    r.volume_id,
                    target.display(),
                    if m.read_only() {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            return Err(Error::AlreadyExists(format!(
                "target {} already has {} mounted from {}, not volume {}",
                target.display(),
                m.fs_type,
                m.source,
                r.volume_id
            )));
        }
        if r.capability.access_mode == AccessMode::SingleNodeSingleWriter && !readonly {
            if let Some(w) = table
                .users_of(&stage, BLOCK_STAGE_FILE)
                .iter()
                .find(|u| !u.read_only())
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is single-writer and already published read-write at {}",
                    r.volume_id,
                    w.mount_point.display()
                )));
            }
        }
        ensure_target(&target, block).await?;
        if readonly {
            super::fs::bind_read_only(&source, &target).await?;
        } else {
            super::fs::bind(&source, &target).await?;
        }
        crate::failpoint!("node-publish.bound");
        tracing::info!(volume = %r.volume_id, target = %target.display(), readonly, "volume published");
        Ok(())
    }

    /// Unmounts this volume from the target. A target where another volume is mounted is
    /// left as it is (OK: this volume is not published there).
    pub(crate) async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let Ok(serial) = Self::serial_for(volume_id) else {
            // Not one of this plugin's volumes: it is published nowhere.
            return Ok(());
        };
        let _g = self.guard(volume_id)?;
        let target = resolve(target_path).await?;
        // An error other than "not found" (e.g. a dead mount) still goes on to unmount.
        if matches!(lstat(&target).await, Ok(None)) {
            return Ok(());
        }
        // Loop: a mount may be stacked on another (a CO that published twice by hand).
        for _ in 0..8 {
            let table = mount_table().await?;
            let Some(m) = table.at(&target).cloned() else {
                break;
            };
            if !self.may_take_down(&m, &serial, volume_id).await? {
                return Ok(());
            }
            super::fs::unmount(&target).await?;
            crate::failpoint!("node-unpublish.unmounted");
        }
        remove_leaves(vec![target.clone()]).await;
        tracing::info!(volume = %volume_id, target = %target.display(), "volume unpublished");
        Ok(())
    }
}
