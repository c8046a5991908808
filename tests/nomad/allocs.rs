//! Allocations on this node: claim, mount, stop (§2.2, §3.1, §3.2).

use super::*;

impl Nomad {
    // ---------------------------------------------------------------- (b) claim

    /// The server's ControllerPublishVolume for a claim on `node_id` (§3.1): job modes, the
    /// volume's mount_options only, readonly = a read claim.
    pub async fn controller_publish(
        &mut self,
        vol: &Volume,
        job: &JobVolume,
        node_id: &str,
    ) -> Result<Map, ClaimError> {
        if !(self.fp.controller_required && self.fp.has(CtrlCap::PublishUnpublishVolume)) {
            return Ok(Map::new());
        }
        assert!(
            !node_id.is_empty(),
            "Nomad never publishes to an empty node id"
        );
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: vol.remote_id().to_string(),
            node_id: node_id.to_string(),
            volume_capability: Some(capability(
                job.access_mode,
                job.attachment,
                vol.spec.mount_options.as_ref(),
            )),
            readonly: job.read_only,
            secrets: vol.spec.secrets.clone(),
            volume_context: vol.context.clone(),
        };
        let r = self.controller_call("ControllerPublishVolume", |mut c| async move {
            c.controller_publish_volume(deadlined(req)).await
        });
        match r.await {
            Ok(r) => Ok(r.publish_context),
            Err(e) if e.code() == Code::FailedPrecondition => Err(ClaimError::Retryable(e)),
            Err(e) => Err(ClaimError::Publish(e)),
        }
    }

    pub fn new_alloc_id(&mut self) -> String {
        self.allocs += 1;
        format!("a{:07}-{}", self.allocs, std::process::id())
    }

    /// Host paths of an alloc's use of a volume (§2.1).
    pub fn staging_path(&self, vol: &Volume, job: &JobVolume) -> PathBuf {
        self.base
            .join("staging")
            .join(&self.namespace)
            .join(&vol.spec.id)
            .join(job.usage())
    }

    pub fn target_path(&self, alloc_id: &str, vol: &Volume, job: &JobVolume) -> PathBuf {
        self.base
            .join("per-alloc")
            .join(alloc_id)
            .join(&vol.spec.id)
            .join(job.usage())
    }

    /// The raft side of `CSIVolume.Claim` for a new alloc on `node_id`: the claim is recorded
    /// before any plugin call and stays until the alloc's Unpublish releases it.
    pub fn begin_claim(&mut self, vol: &Volume, job: &JobVolume, node_id: &str) -> Alloc {
        let id = self.new_alloc_id();
        self.claims
            .entry(vol.spec.id.clone())
            .or_default()
            .insert(id.clone(), node_id.to_string());
        Alloc {
            staging: self.staging_path(vol, job),
            target: self.target_path(&id, vol, job),
            id,
            volume: vol.clone(),
            job: job.clone(),
            node_id: node_id.to_string(),
            publish_context: Map::new(),
        }
    }

    /// Allocation start on this node (b): claim (ControllerPublish), then MountVolume. On any
    /// error the alloc has failed (or waits, for `Retryable`); Nomad's Postrun still runs, so
    /// the caller runs `stop` (or `retry_claim`).
    pub async fn claim(
        &mut self,
        vol: &Volume,
        job: &JobVolume,
    ) -> Result<Alloc, (Alloc, ClaimError)> {
        let node_id = self.fp.node_id.clone();
        let alloc = self.begin_claim(vol, job, &node_id);
        self.retry_claim(alloc).await
    }

    /// ControllerPublish then MountVolume for an alloc holding its raft claim; also Nomad's
    /// claim loop retrying after a FailedPrecondition.
    pub async fn retry_claim(&mut self, mut alloc: Alloc) -> Result<Alloc, (Alloc, ClaimError)> {
        assert_eq!(
            alloc.node_id, self.fp.node_id,
            "node RPCs go to this node only"
        );
        match self
            .controller_publish(&alloc.volume, &alloc.job, &alloc.node_id.clone())
            .await
        {
            Ok(ctx) => alloc.publish_context = ctx,
            Err(e) => return Err((alloc, e)),
        }
        match self.mount_volume(&alloc).await {
            Ok(()) => Ok(alloc),
            Err(e) => Err((alloc, ClaimError::Mount(e))),
        }
    }

    /// Node capability: the volume's mount_options overlaid by the job's (job fs_type wins
    /// when set, job flags replace when set); the job's modes.
    fn node_capability(&self, alloc: &Alloc) -> csi::VolumeCapability {
        let opts = match (&alloc.volume.spec.mount_options, &alloc.job.mount_options) {
            (None, job) => job.clone(),
            (Some(v), None) => Some(v.clone()),
            (Some(v), Some(j)) => {
                let mut o = v.clone();
                if !j.fs_type.is_empty() {
                    o.fs_type = j.fs_type.clone();
                }
                if !j.mount_flags.is_empty() {
                    o.mount_flags = j.mount_flags.clone();
                }
                Some(o)
            }
        };
        capability(alloc.job.access_mode, alloc.job.attachment, opts.as_ref())
    }

    /// csimanager `MountVolume` (§2.2): stage unless the staging dir is a mount point, publish
    /// unless the target is; the usage is tracked only on success. No deadlines.
    pub async fn mount_volume(&mut self, alloc: &Alloc) -> Result<(), Status> {
        let cap = self.node_capability(alloc);
        if self.fp.requires_staging {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&alloc.staging)
                .unwrap();
            if is_mount_point(&alloc.staging) {
                self.calls
                    .push("NodeStageVolume skipped: staging is a mount".into());
            } else {
                let req = csi::NodeStageVolumeRequest {
                    volume_id: alloc.volume.remote_id().to_string(),
                    publish_context: alloc.publish_context.clone(),
                    staging_target_path: alloc.staging.display().to_string(),
                    volume_capability: Some(cap.clone()),
                    secrets: alloc.volume.spec.secrets.clone(),
                    volume_context: alloc.volume.context.clone(),
                };
                let r = self.node.node_stage_volume(request(req, None)).await;
                self.log("NodeStageVolume", &r);
                r?;
            }
        }
        let parent = alloc.target.parent().unwrap();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .unwrap();
        if alloc.target.exists() && is_mount_point(&alloc.target) {
            self.calls
                .push("NodePublishVolume skipped: target is a mount".into());
        } else {
            let req = csi::NodePublishVolumeRequest {
                volume_id: alloc.volume.remote_id().to_string(),
                publish_context: alloc.publish_context.clone(),
                staging_target_path: if self.fp.requires_staging {
                    alloc.staging.display().to_string()
                } else {
                    String::new()
                },
                target_path: alloc.target.display().to_string(),
                volume_capability: Some(cap),
                readonly: alloc.job.read_only,
                secrets: alloc.volume.spec.secrets.clone(),
                volume_context: alloc.volume.context.clone(),
            };
            let r = self.node.node_publish_volume(request(req, None)).await;
            self.log("NodePublishVolume", &r);
            r?;
        }
        self.usage
            .entry((alloc.volume.spec.id.clone(), alloc.job.usage()))
            .or_default()
            .insert(alloc.id.clone());
        Ok(())
    }

    // ---------------------------------------------------------------- (c) stop

    /// csimanager `UnmountVolume` (§2.2): NodeUnpublish with Nomad's host-path cleanup, then
    /// NodeUnstage when no other alloc here holds the same volume and usage.
    /// Returns (NodeUnpublish as Nomad judged it, NodeUnstage if sent).
    pub async fn unmount_volume(
        &mut self,
        alloc: &Alloc,
    ) -> (Result<(), Status>, Option<Result<(), Status>>) {
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: alloc.volume.remote_id().to_string(),
            target_path: alloc.target.display().to_string(),
        };
        let r = self
            .node
            .node_unpublish_volume(request(req, None))
            .await
            .map(drop);
        self.log("NodeUnpublishVolume", &r);
        let raw = r.clone();
        // Nomad's judgement: NotFound is ignorable; a leftover target that `os.Remove` takes
        // away makes any error ignorable, one it cannot remove is an error of its own.
        let mut judged = match r {
            Err(e) if e.code() == Code::NotFound => Ok(()),
            other => other,
        };
        match std::fs::symlink_metadata(&alloc.target) {
            Ok(m) => {
                let removed = if m.is_dir() {
                    std::fs::remove_dir(&alloc.target)
                } else {
                    std::fs::remove_file(&alloc.target)
                };
                judged = match removed {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Status::internal(format!(
                        "removing {}: {e}",
                        alloc.target.display()
                    ))),
                };
            }
            Err(_) => {
                if matches!(&judged, Err(e) if e.message().contains("no mount point")) {
                    judged = Ok(());
                }
            }
        }
        if judged.is_err() {
            return (raw.and(judged), None);
        }
        let key = (alloc.volume.spec.id.clone(), alloc.job.usage());
        let can_release = match self.usage.get_mut(&key) {
            Some(set) => {
                set.remove(&alloc.id);
                set.is_empty()
            }
            None => true,
        };
        if !(self.fp.requires_staging && can_release) {
            return (raw, None);
        }
        self.usage.remove(&key);
        // COMPAT (pre-1.7 layout): when the namespaced host path is gone (the plugin removed
        // it at an earlier unstage), Nomad unstages `staging/<vol>/<usage>` instead.
        let staging = if alloc.staging.exists() {
            alloc.staging.clone()
        } else {
            self.base
                .join("staging")
                .join(&alloc.volume.spec.id)
                .join(alloc.job.usage())
        };
        let req = csi::NodeUnstageVolumeRequest {
            volume_id: alloc.volume.remote_id().to_string(),
            staging_target_path: staging.display().to_string(),
        };
        let u = self
            .node
            .node_unstage_volume(request(req, None))
            .await
            .map(drop);
        self.log("NodeUnstageVolume", &u);
        (raw, Some(u))
    }

    /// The server's ControllerUnpublishVolume: volume and node id only, never secrets (§1.2).
    pub async fn controller_unpublish(
        &mut self,
        vol: &Volume,
        node_id: &str,
    ) -> Result<(), Status> {
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.remote_id().to_string(),
            node_id: node_id.to_string(),
            secrets: Map::new(),
        };
        let r = self.controller_call("ControllerUnpublishVolume", |mut c| async move {
            c.controller_unpublish_volume(deadlined(req)).await
        });
        r.await.map(drop)
    }

    /// Allocation stop (c), also the cleanup of a failed start: node steps, then the server's
    /// Unpublish (sent even if the node steps failed), which calls ControllerUnpublish unless
    /// another live alloc on this node claims the volume. A ControllerUnpublish error keeps
    /// the claim (volumewatcher retries it later: `release_past_claim`).
    pub async fn stop(&mut self, alloc: &Alloc) -> StopReport {
        let (node_unpublish, node_unstage) = self.unmount_volume(alloc).await;
        let controller_unpublish = self.server_unpublish(alloc).await;
        StopReport {
            node_unpublish,
            node_unstage,
            controller_unpublish,
        }
    }

    /// The server's `CSIVolume.Unpublish` for a claim (§3.2 step 3); also what volumewatcher
    /// sends again for a past claim whose ControllerUnpublish failed.
    pub async fn server_unpublish(&mut self, alloc: &Alloc) -> Option<Result<(), Status>> {
        let others_here = self
            .claims
            .get(&alloc.volume.spec.id)
            .map(|c| c.iter().any(|(a, n)| *a != alloc.id && *n == alloc.node_id))
            .unwrap_or(false);
        if others_here
            || !(self.fp.controller_required && self.fp.has(CtrlCap::PublishUnpublishVolume))
        {
            self.release(alloc);
            return None;
        }
        let r = self
            .controller_unpublish(&alloc.volume, &alloc.node_id)
            .await;
        // NotFound is ignorable: the claim is freed.
        if r.is_ok() || matches!(&r, Err(e) if e.code() == Code::NotFound) {
            self.release(alloc);
        }
        Some(r)
    }

    fn release(&mut self, alloc: &Alloc) {
        if let Some(c) = self.claims.get_mut(&alloc.volume.spec.id) {
            c.remove(&alloc.id);
        }
    }

    /// Whether the server still holds a claim of this alloc (a past claim awaiting release).
    pub fn has_claim(&self, alloc: &Alloc) -> bool {
        self.claims
            .get(&alloc.volume.spec.id)
            .is_some_and(|c| c.contains_key(&alloc.id))
    }
}
