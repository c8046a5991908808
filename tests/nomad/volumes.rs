//! Volumes as Nomad's servers handle them: create, register, delete, list external (§3.6–3.8).

use super::*;

impl Nomad {
    // ---------------------------------------------------------------- (a) create / register

    /// `nomad volume create` (§3.6): CreateVolume with accessibility_requirements always
    /// present (empty lists without a topology_request) and capacity_range only when set.
    pub async fn volume_create(&mut self, spec: &VolumeSpec) -> Result<Volume, Status> {
        self.require(CtrlCap::CreateDeleteVolume);
        assert!(!spec.name.is_empty(), "missing Name");
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let source = if !spec.snapshot_id.is_empty() {
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: spec.snapshot_id.clone(),
            }))
        } else if !spec.clone_id.is_empty() {
            Some(Type::Volume(VolumeSource {
                volume_id: spec.clone_id.clone(),
            }))
        } else {
            None
        };
        let req = csi::CreateVolumeRequest {
            name: spec.name.clone(),
            capacity_range: (spec.capacity_min != 0 || spec.capacity_max != 0).then_some(
                csi::CapacityRange {
                    required_bytes: spec.capacity_min,
                    limit_bytes: spec.capacity_max,
                },
            ),
            volume_capabilities: spec
                .capabilities
                .iter()
                .map(|(m, a)| capability(*m, *a, spec.mount_options.as_ref()))
                .collect(),
            parameters: spec.parameters.clone(),
            secrets: spec.secrets.clone(),
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: vec![],
                preferred: vec![],
            }),
            mutable_parameters: Default::default(),
        };
        let r = self.controller_call("CreateVolume", |mut c| async move {
            c.create_volume(deadlined(req)).await
        });
        let v = r
            .await?
            .volume
            .ok_or_else(|| Status::internal("CreateVolume answered without a volume"))?;
        Ok(Volume {
            spec: spec.clone(),
            external_id: v.volume_id,
            capacity: v.capacity_bytes,
            context: v.volume_context,
            topologies: v.accessible_topology,
        })
    }

    /// `nomad volume register` of an existing external volume (§3.7): ValidateVolumeCapabilities
    /// with `mount{}` capabilities (the server drops mount_options), then Nomad's comparison.
    /// Err(text) is Nomad refusing the registration.
    pub async fn volume_register(
        &mut self,
        spec: &VolumeSpec,
        external_id: &str,
    ) -> Result<Volume, String> {
        let vol = Volume {
            spec: spec.clone(),
            external_id: external_id.to_string(),
            capacity: 0,
            context: spec.context.clone(),
            topologies: vec![],
        };
        if !self.fp.controller_required {
            return Ok(vol);
        }
        let requested: Vec<csi::VolumeCapability> = spec
            .capabilities
            .iter()
            .map(|(m, a)| capability(*m, *a, None))
            .collect();
        let req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: vol.remote_id().to_string(),
            volume_context: spec.context.clone(),
            volume_capabilities: requested.clone(),
            parameters: spec.parameters.clone(),
            secrets: spec.secrets.clone(),
            mutable_parameters: Default::default(),
        };
        let r = self.controller_call("ValidateVolumeCapabilities", |mut c| async move {
            c.validate_volume_capabilities(deadlined(req)).await
        });
        let r = r
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
        // An unset `confirmed` is accepted (the message is only debug-logged).
        if r.confirmed.is_none() {
            self.calls
                .push(format!("(not confirmed, accepted anyway: {})", r.message));
        }
        if let Some(confirmed) = r.confirmed {
            if !confirmed.volume_capabilities.is_empty() {
                caps::compare(&requested, &confirmed.volume_capabilities)?;
            }
        }
        Ok(vol)
    }

    // ---------------------------------------------------------------- (e) delete

    /// `nomad volume delete` (§3.7): DeleteVolume with the ExternalID and the secrets.
    pub async fn volume_delete(&mut self, vol: &Volume) -> Result<(), Status> {
        assert!(self.fp.controller_required);
        let req = csi::DeleteVolumeRequest {
            volume_id: vol.external_id.clone(),
            secrets: vol.spec.secrets.clone(),
        };
        let r = self.controller_call("DeleteVolume", |mut c| async move {
            c.delete_volume(deadlined(req)).await
        });
        r.await.map(drop)
    }

    // ---------------------------------------------------------------- (f) external volumes

    /// One page of `GET /v1/volumes/external?per_page=N&next_token=T` (§3.8).
    pub async fn external_page(
        &mut self,
        per_page: i32,
        next_token: &str,
    ) -> Result<(Vec<ExternalVolume>, String), Status> {
        self.require(CtrlCap::ListVolumes);
        let req = csi::ListVolumesRequest {
            max_entries: per_page,
            starting_token: next_token.to_string(),
        };
        let r = self.controller_call("ListVolumes", |mut c| async move {
            c.list_volumes(deadlined(req)).await
        });
        let r = r.await?;
        let mut out = Vec::new();
        for e in r.entries {
            // Nomad dereferences entry.volume: a missing one would panic the client.
            let v = e
                .volume
                .expect("every ListVolumes entry must have `volume` set");
            use csi::volume_content_source::Type;
            let (mut snapshot_id, mut clone_id) = (String::new(), String::new());
            match v.content_source.and_then(|s| s.r#type) {
                Some(Type::Snapshot(s)) => snapshot_id = s.snapshot_id,
                Some(Type::Volume(s)) => clone_id = s.volume_id,
                None => {}
            }
            let status = e.status.unwrap_or_default();
            let cond = status.volume_condition.unwrap_or_default();
            out.push(ExternalVolume {
                external_id: v.volume_id,
                capacity_bytes: v.capacity_bytes,
                volume_context: v.volume_context,
                snapshot_id,
                clone_id,
                published_external_node_ids: status.published_node_ids,
                is_abnormal: cond.abnormal,
                status: cond.message,
            });
        }
        if per_page > 0 {
            out.truncate(per_page as usize);
        }
        Ok((out, r.next_token))
    }

    /// `nomad volume status -verbose`: pages of `per_page` until next_token is "" (or a page
    /// comes back empty).
    pub async fn external_all(&mut self, per_page: i32) -> Result<Vec<ExternalVolume>, Status> {
        let mut all = Vec::new();
        let mut token = String::new();
        for _ in 0..1000 {
            let (page, next) = self.external_page(per_page, &token).await?;
            let empty = page.is_empty();
            all.extend(page);
            if next.is_empty() || empty {
                return Ok(all);
            }
            token = next;
        }
        panic!("ListVolumes paging does not end");
    }
}
