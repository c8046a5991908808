//! NodePublishVolume / NodeUnpublishVolume: bind mounts of the staging mount onto targets.

use super::mountinfo::{MountEntry, MountTable, Role};
use super::record::Asked;
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
    /// Binds the volume's staging mount onto the target. Checked in the order of the CSI
    /// error tables: the volume must be on this node (NOT_FOUND), then the state — a staging
    /// path (FAILED_PRECONDITION), a target outside every volume (FAILED_PRECONDITION), what
    /// the target holds (the same publish: OK; another one: ALREADY_EXISTS), the staging
    /// mount (this volume's, as staged: FAILED_PRECONDITION otherwise).
    pub(crate) async fn publish(&self, r: PublishRequest) -> Result<()> {
        let serial = Self::serial_for(&r.volume_id)?;
        let _g = self.guard(&r.volume_id)?;
        self.present(&r.volume_id).await?;
        let Some(staging_path) = &r.staging_path else {
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: this plugin stages volumes \
                 (STAGE_UNSTAGE_VOLUME); NodeStageVolume the volume first"
                    .into(),
            ));
        };
        let block = r.capability.is_block();
        let readonly = r.readonly || r.capability.access_mode.is_read_only();
        let staging = resolve(staging_path).await?;
        let target = resolve(&r.target_path).await?;
        let source: PathBuf = if block {
            staging.join(BLOCK_STAGE_FILE)
        } else {
            staging.clone()
        };
        let table = mount_table().await?;
        self.refuse_inside_a_volume("target_path", &target, &table)
            .await?;
        let asked = Asked::of(&r.volume_id, &r.capability, readonly);
        let stage = table.at(&source).cloned();
        if let Some(m) = table.at(&target).cloned() {
            return self
                .already_published(&r.volume_id, &serial, &m, &asked, stage.as_ref(), &table)
                .await;
        }
        let Some(stage) = stage else {
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
        // … as its staging mount, not a publish of it (a target given as the staging path).
        if table.role(&stage, BLOCK_STAGE_FILE) == Role::Publish {
            return Err(Error::FailedPrecondition(format!(
                "{} holds a publish of volume {} (a bind of its staging mount{}), not its \
                 staging mount; give the staging_target_path NodeStageVolume staged it at",
                staging.display(),
                r.volume_id,
                table
                    .stage_of(&stage, BLOCK_STAGE_FILE)
                    .map(|s| format!(" at {}", s.mount_point.display()))
                    .unwrap_or_default()
            )));
        }
        if !block && !asked.fs_type.is_empty() && asked.fs_type != stage.fs_type {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged at {} with a {} file system, not {}: publish it with \
                 fs_type {} or empty",
                r.volume_id,
                staging.display(),
                stage.fs_type,
                asked.fs_type,
                stage.fs_type
            )));
        }
        if !block && !readonly && !stage.read_only() {
            if let Some(gid) = r.mount_group {
                super::settle_ownership(&staging, Default::default(), false, Some(gid)).await?;
            }
        }
        if r.capability.access_mode == AccessMode::SingleNodeSingleWriter && !readonly {
            if let Some(w) = table
                .publishes_of(&stage, BLOCK_STAGE_FILE)
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
        super::fs::bind_publish(&source, &target, readonly).await?;
        crate::failpoint!("node-publish.bound");
        self.remember(&target, &asked).await;
        tracing::info!(volume = %r.volume_id, target = %target.display(), readonly, "volume published");
        Ok(())
    }

    /// NodePublish at a target that holds a mount already: OK when it is this volume,
    /// published as asked now; ALREADY_EXISTS when it is a staging mount, another volume, or
    /// this volume published otherwise (access type, file system, flags, read-only).
    async fn already_published(
        &self,
        volume_id: &str,
        serial: &str,
        m: &MountEntry,
        asked: &Asked,
        stage: Option<&MountEntry>,
        table: &MountTable,
    ) -> Result<()> {
        let target = m.mount_point.display();
        match self.holder(m, serial).await? {
            Holder::Volume(_) => {}
            Holder::Other(what) | Holder::Unknown(what) => {
                return Err(Error::AlreadyExists(format!(
                    "target {target} already has {what} mounted, not volume {volume_id}"
                )))
            }
        }
        if table.role(m, BLOCK_STAGE_FILE) == Role::Stage {
            return Err(Error::AlreadyExists(format!(
                "target {target} holds volume {volume_id}'s staging mount, not a publish of \
                 it; publish it at a target of its own"
            )));
        }
        // A publish over a read-only staging mount is read-only whatever was asked.
        let stage_read_only = stage.is_some_and(|s| s.read_only() && s.dev() == m.dev());
        let differs = self.differs_from_made(m, asked, stage_read_only).await;
        match differs {
            None => Ok(()),
            Some(how) => Err(Error::AlreadyExists(format!(
                "volume {volume_id} is already published at {target} {how}; NodeUnpublishVolume \
                 it first to publish it otherwise"
            ))),
        }
    }

    /// Unmounts this volume from the target. A target where another volume is mounted is
    /// left as it is (OK: this volume is not published there); the volume's staging mount is
    /// never taken down here (FAILED_PRECONDITION).
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
            if !self
                .may_take_down(&table, &m, &serial, volume_id, Role::Publish)
                .await?
            {
                return Ok(());
            }
            super::fs::unmount(&target).await?;
            self.forget(&target).await;
            crate::failpoint!("node-unpublish.unmounted");
        }
        remove_leaves(vec![target.clone()]).await;
        tracing::info!(volume = %volume_id, target = %target.display(), "volume unpublished");
        Ok(())
    }
}
