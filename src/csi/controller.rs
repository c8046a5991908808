//! Controller service: volumes in pools, attached through `attach`.

use super::convert;
use super::proto::{self as csi, controller_server::Controller};
use crate::attach::{Attachments, Publish};
use crate::error::{Error, Result};
use crate::exec;
use crate::guard::{OpGuard, OpGuards};
use crate::ids::{self, ObjectId};
use crate::model::ContentSource;
use crate::params::{self, VolumeParams};
use crate::pool::{
    CapacityQuery, CreateSnapshot, CreateVolume, Pools, SnapshotRecord, VolumeRecord,
};
use tonic::{Request, Response, Status};

pub(crate) struct ControllerService {
    pub pools: Pools,
    pub attachments: Attachments,
    pub guards: OpGuards,
    /// Advertise the alpha GET_SNAPSHOT capability (`[snapshots] get_snapshot_capability`).
    pub get_snapshot_capability: bool,
}

type RpcResult<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(v: T) -> RpcResult<T> {
    Ok(Response::new(v))
}

/// Guard key of a volume: its name-derived key, the same before and after the pool is chosen.
fn volume_guard_key(key: &str) -> String {
    crate::guard::volume_key(key)
}

impl ControllerService {
    fn guard_volume_id(&self, id: &str) -> Result<Option<(ObjectId, OpGuard)>> {
        let Some(oid) = ObjectId::parse_volume(id)? else {
            return Ok(None);
        };
        let g = self.guards.try_acquire(&[volume_guard_key(&oid.key)])?;
        Ok(Some((oid, g)))
    }

    /// A volume as CSI reports it; accessible from the topologies of its pool as configured now
    /// (a shared pool: every host that lists it).
    fn volume(&self, rec: &VolumeRecord) -> csi::Volume {
        let topologies = match self.pools.get(&rec.pool) {
            Some(p) => p.config().accessible_topologies(),
            None if rec.accessible_topology.is_empty() => Vec::new(),
            None => vec![rec.accessible_topology.clone()],
        };
        convert::volume(rec, &topologies)
    }

    /// The condition of each volume (are its image and backing layers in the pool?), checked
    /// in one blocking call.
    async fn volume_conditions(&self, recs: &[&VolumeRecord]) -> Result<Vec<csi::VolumeCondition>> {
        let checks = recs
            .iter()
            .map(|rec| Ok(((*rec).clone(), self.pools.image_path(rec)?)))
            .collect::<Result<Vec<_>>>()?;
        exec::blocking(move || {
            Ok(checks
                .iter()
                .map(|(rec, image)| volume_condition(rec, image))
                .collect())
        })
        .await
    }
}

/// published_node_ids of a volume: the nodes the backends report, plus those a backend that
/// could not be asked last held it on (its ledger), with why they are unconfirmed.
fn published(scan: &crate::attach::Scan, volume_id: &str) -> (Vec<String>, Option<String>) {
    let mut nodes: Vec<String> = scan
        .known
        .iter()
        .filter(|a| a.volume_id == volume_id)
        .map(|a| a.node_id.clone())
        .collect();
    let unconfirmed = scan.unconfirmed(volume_id).map(|(more, reason)| {
        let msg = if more.is_empty() {
            format!("whether the volume is attached to a VM is unknown: {reason}")
        } else {
            format!(
                "its attachment to {} is not confirmed: {reason}",
                more.join(", ")
            )
        };
        nodes.extend(more);
        msg
    });
    nodes.sort();
    nodes.dedup();
    (nodes, unconfirmed)
}

/// `condition`, made abnormal by every attachment of the volume that cannot serve I/O and by
/// attachments that cannot be confirmed now.
fn with_attachments<'a>(
    mut condition: csi::VolumeCondition,
    attachments: impl Iterator<Item = &'a crate::attach::Attachment>,
    unconfirmed: Option<String>,
) -> csi::VolumeCondition {
    let dead: Vec<String> = attachments
        .filter_map(|a| a.abnormal.clone())
        .chain(unconfirmed)
        .collect();
    if dead.is_empty() {
        return condition;
    }
    let mut problems: Vec<String> = Vec::new();
    if condition.abnormal {
        problems.push(condition.message.clone());
    }
    problems.extend(dead);
    condition.abnormal = true;
    condition.message = problems.join("; ");
    condition
}

/// Whether a volume's image and backing layers are in its pool. Blocking.
fn volume_condition(rec: &VolumeRecord, image: &std::path::Path) -> csi::VolumeCondition {
    let dir = image.parent().unwrap_or(std::path::Path::new(""));
    let missing = std::iter::once(&rec.image)
        .chain(rec.chain.backing.iter())
        .find(|l| !dir.join(l).exists());
    match missing {
        None => csi::VolumeCondition {
            abnormal: false,
            message: "ok".into(),
        },
        Some(layer) if *layer == rec.image => csi::VolumeCondition {
            abnormal: true,
            message: format!(
                "image {} of the volume is missing from pool {}",
                rec.image, rec.pool
            ),
        },
        Some(layer) => csi::VolumeCondition {
            abnormal: true,
            message: format!(
                "backing layer {layer} of the volume is missing from pool {}",
                rec.pool
            ),
        },
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> RpcResult<csi::CreateVolumeResponse> {
        let r = req.into_inner();
        ids::check_name("name", &r.name)?;
        convert::check_map("parameters", &r.parameters)?;
        convert::check_map("mutable_parameters", &r.mutable_parameters)?;
        // Every INVALID_ARGUMENT check before OUT_OF_RANGE, and both before any lookup.
        let capabilities = convert::capabilities(&r.volume_capabilities)?;
        let parameters = params::with_mutable(&r.parameters, &r.mutable_parameters)?;
        let content_source = convert::content_source(r.volume_content_source.as_ref())?;
        let topology = convert::topology_requirement(r.accessibility_requirements.as_ref())?;
        let (required, limit) = convert::capacity_range(r.capacity_range.as_ref())?;
        let create = CreateVolume {
            name: r.name.clone(),
            required_bytes: required,
            limit_bytes: limit,
            capabilities,
            parameters,
            content_source,
            topology,
        };
        let key = ids::volume_key_for_name(&r.name);
        let mut keys = vec![volume_guard_key(&key)];
        // A clone freezes its source: no other operation may run on the source meanwhile.
        if let Some(ContentSource::Volume(src)) = &create.content_source {
            if let Some(src) = ObjectId::parse_volume(src)? {
                keys.push(volume_guard_key(&src.key));
                keys.dedup();
            }
        }
        let _g = self.guards.try_acquire(&keys)?;
        let rec = self.pools.create(create).await?;
        ok(csi::CreateVolumeResponse {
            volume: Some(self.volume(&rec)),
        })
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> RpcResult<csi::DeleteVolumeResponse> {
        let r = req.into_inner();
        let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
            return ok(csi::DeleteVolumeResponse {});
        };
        if self.pools.volume(&r.volume_id).await?.is_some() {
            let nodes = self.attachments.nodes_of(&r.volume_id).await?;
            if !nodes.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is still attached to node(s) {}; unpublish it first",
                    r.volume_id,
                    nodes.join(", ")
                ))
                .into());
            }
        }
        self.pools.delete(&r.volume_id).await?;
        ok(csi::DeleteVolumeResponse {})
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerPublishVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        ids::check_name("node_id", &r.node_id)?;
        let capability = convert::required_capability(r.volume_capability.as_ref())?;
        if !self.attachments.is_enabled() {
            return Err(Error::Unimplemented(
                "ControllerPublishVolume needs an attach backend (libvirt or local attach)".into(),
            )
            .into());
        }
        let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
            return Err(Error::NotFound(format!("volume {} does not exist", r.volume_id)).into());
        };
        let rec = self.pools.require_volume(&r.volume_id).await?;
        let image = self.pools.image_path(&rec)?;
        let publish = Publish {
            node_id: r.node_id.clone(),
            capability,
            readonly: r.readonly,
        };
        let ctx = self.attachments.publish(&rec, image, &publish).await?;
        ok(csi::ControllerPublishVolumeResponse {
            publish_context: ctx,
        })
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerUnpublishVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        if r.node_id.is_empty() {
            // Spec: an empty node id means "from every node".
            let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
                return ok(csi::ControllerUnpublishVolumeResponse {});
            };
            for node in self.attachments.nodes_of(&r.volume_id).await? {
                self.attachments.unpublish(&r.volume_id, &node).await?;
            }
            return ok(csi::ControllerUnpublishVolumeResponse {});
        }
        ids::check_name("node_id", &r.node_id)?;
        let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
            return ok(csi::ControllerUnpublishVolumeResponse {});
        };
        self.attachments.unpublish(&r.volume_id, &r.node_id).await?;
        ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> RpcResult<csi::ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let caps = convert::capabilities(&r.volume_capabilities)?;
        convert::check_map("parameters", &r.parameters)?;
        convert::check_map("mutable_parameters", &r.mutable_parameters)?;
        let rec = self.pools.require_volume(&r.volume_id).await?;
        let problem = caps
            .iter()
            .find_map(|c| c.check(rec.format).err())
            .or_else(|| {
                params::with_mutable(&r.parameters, &r.mutable_parameters)
                    .and_then(|all| VolumeParams::parse(&all))
                    .err()
            });
        let (confirmed, message) = match problem {
            Some(e) => (None, e.to_string()),
            None => (
                Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                String::new(),
            ),
        };
        ok(csi::ValidateVolumeCapabilitiesResponse { confirmed, message })
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> RpcResult<csi::ListVolumesResponse> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries must not be negative").into());
        }
        check_token(&r.starting_token)?;
        let take = if r.max_entries == 0 {
            usize::MAX
        } else {
            r.max_entries as usize
        };
        let (page, next_token) = self.pools.list_page(&r.starting_token, take).await?;
        // The pages of one walk share one read of the nodes (a listing is a moment's picture).
        let attachments = self
            .attachments
            .recent(crate::attach::LISTING_MAX_AGE)
            .await?;
        let page: Vec<&VolumeRecord> = page.iter().collect();
        let conditions = self.volume_conditions(&page).await?;
        let mut entries = Vec::with_capacity(page.len());
        for (rec, condition) in page.into_iter().zip(conditions) {
            let (published_node_ids, unconfirmed) = published(&attachments, &rec.id);
            let condition = with_attachments(
                condition,
                attachments.known.iter().filter(|a| a.volume_id == rec.id),
                unconfirmed,
            );
            entries.push(csi::list_volumes_response::Entry {
                volume: Some(self.volume(rec)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids,
                    volume_condition: Some(condition),
                }),
            });
        }
        ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> RpcResult<csi::GetCapacityResponse> {
        let r = req.into_inner();
        convert::check_map("parameters", &r.parameters)?;
        for c in &r.volume_capabilities {
            convert::capability(c)?;
        }
        let available = self
            .pools
            .capacity(CapacityQuery {
                parameters: r.parameters,
                topology: r.accessible_topology.map(|t| t.segments),
            })
            .await?;
        ok(csi::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(available.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(crate::pool::MIB as i64),
        })
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> RpcResult<csi::ControllerGetCapabilitiesResponse> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let mut types = vec![
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::ExpandVolume,
            Type::ListVolumesPublishedNodes,
            Type::VolumeCondition,
            Type::GetVolume,
            Type::ModifyVolume,
            Type::SingleNodeMultiWriter,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
        ];
        // Alpha, known to no CO; the other alpha capabilities above (VOLUME_CONDITION,
        // GET_VOLUME, SINGLE_NODE_MULTI_WRITER) are read by Kubernetes and Nomad.
        if self.get_snapshot_capability {
            types.push(Type::GetSnapshot);
        }
        if self.attachments.is_enabled() {
            types.push(Type::PublishUnpublishVolume);
            types.push(Type::PublishReadonly);
        }
        let capabilities = types
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        ok(csi::ControllerGetCapabilitiesResponse { capabilities })
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> RpcResult<csi::CreateSnapshotResponse> {
        let r = req.into_inner();
        ids::check_name("name", &r.name)?;
        ids::check_safe_id("source_volume_id", &r.source_volume_id)?;
        convert::check_map("parameters", &r.parameters)?;
        let _g = self
            .guards
            .try_acquire(&Pools::snapshot_guard_keys(&r.name, &r.source_volume_id)?)?;
        let rec = self
            .pools
            .create_snapshot(CreateSnapshot {
                name: r.name,
                source_volume_id: r.source_volume_id,
                parameters: r.parameters,
            })
            .await?;
        ok(csi::CreateSnapshotResponse {
            snapshot: Some(convert::snapshot(&rec)),
        })
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> RpcResult<csi::DeleteSnapshotResponse> {
        let r = req.into_inner();
        let Some(oid) = ObjectId::parse_snapshot(&r.snapshot_id)? else {
            return ok(csi::DeleteSnapshotResponse {});
        };
        let _g = self
            .guards
            .try_acquire(&[crate::guard::snapshot_key(&oid.key)])?;
        self.pools.delete_snapshot(&r.snapshot_id).await?;
        ok(csi::DeleteSnapshotResponse {})
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> RpcResult<csi::ListSnapshotsResponse> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries must not be negative").into());
        }
        let mut all: Vec<SnapshotRecord> = if r.snapshot_id.is_empty() {
            self.pools.list_snapshots().await?
        } else {
            // An id that cannot be ours names no snapshot: an empty list, not an error.
            match self.pools.snapshot(&r.snapshot_id).await {
                Ok(found) => found.into_iter().collect(),
                Err(Error::InvalidArgument(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            }
        };
        if !r.source_volume_id.is_empty() {
            all.retain(|s| s.source_volume_id == r.source_volume_id);
        }
        let start = page_start(&all, &r.starting_token, |s| &s.id)?;
        let take = if r.max_entries == 0 {
            usize::MAX
        } else {
            r.max_entries as usize
        };
        let page: Vec<&SnapshotRecord> = all[start..].iter().take(take).collect();
        let next_token = all
            .get(start + page.len())
            .map(|s| s.id.clone())
            .unwrap_or_default();
        ok(csi::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(convert::snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> RpcResult<csi::GetSnapshotResponse> {
        let r = req.into_inner();
        ids::check_safe_id("snapshot_id", &r.snapshot_id)?;
        let rec =
            self.pools.snapshot(&r.snapshot_id).await?.ok_or_else(|| {
                Error::NotFound(format!("snapshot {} does not exist", r.snapshot_id))
            })?;
        ok(csi::GetSnapshotResponse {
            snapshot: Some(convert::snapshot(&rec)),
        })
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> RpcResult<csi::ControllerExpandVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .map(convert::capability)
            .transpose()?;
        let (required, limit) = convert::capacity_range(r.capacity_range.as_ref())?;
        let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
            return Err(Error::NotFound(format!("volume {} does not exist", r.volume_id)).into());
        };
        let mut rec = self.pools.require_volume(&r.volume_id).await?;
        let target = self.pools.expansion_target(&rec, required, limit).await?;
        if target > rec.capacity_bytes {
            if self.attachments.nodes_of(&rec.id).await?.is_empty() {
                rec = self.pools.expand_offline(&rec.id, target, 0).await?;
            } else {
                self.attachments.resize_online(&rec.id, target).await?;
                rec.capacity_bytes = target;
                self.pools.save(&rec).await?;
                tracing::info!(volume = %rec.id, size = target, "volume expanded online");
            }
        }
        let block = match &cap {
            Some(c) => c.is_block(),
            None => rec.is_block_only(),
        };
        ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: rec.capacity_bytes as i64,
            node_expansion_required: !block,
        })
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> RpcResult<csi::ControllerGetVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let rec = self.pools.require_volume(&r.volume_id).await?;
        let scan = self.attachments.scan().await?;
        let attachments: Vec<&crate::attach::Attachment> = scan
            .known
            .iter()
            .filter(|a| a.volume_id == rec.id)
            .collect();
        let (published_node_ids, unconfirmed) = published(&scan, &rec.id);
        let condition = self
            .volume_conditions(&[&rec])
            .await?
            .pop()
            .ok_or_else(|| Error::internal("no volume condition"))?;
        let condition = with_attachments(condition, attachments.into_iter(), unconfirmed);
        ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume(&rec)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> RpcResult<csi::ControllerModifyVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        convert::check_map("mutable_parameters", &r.mutable_parameters)?;
        params::check_mutable(&r.mutable_parameters)?;
        // The values too, before anything is looked up.
        for (k, v) in &r.mutable_parameters {
            params::apply_qos(&mut params::Qos::default(), k, v)?;
        }
        let Some((_oid, _g)) = self.guard_volume_id(&r.volume_id)? else {
            return Err(Error::NotFound(format!("volume {} does not exist", r.volume_id)).into());
        };
        let mut rec = self.pools.require_volume(&r.volume_id).await?;
        let mut qos = rec.disk.qos;
        for (k, v) in &r.mutable_parameters {
            params::apply_qos(&mut qos, k, v)?;
        }
        qos.validate()?;
        if qos != rec.disk.qos {
            self.attachments.set_qos(&rec.id, &qos).await?;
            rec.disk.qos = qos;
            for (k, v) in &r.mutable_parameters {
                rec.parameters.insert(k.clone(), v.clone());
            }
            self.pools.save(&rec).await?;
            tracing::info!(volume = %rec.id, "volume QoS modified");
        }
        ok(csi::ControllerModifyVolumeResponse {})
    }
}

/// Index of the first entry at or after `token` (the id of the next entry to return).
/// A token that is not a volume id of ours is invalid: ABORTED, as the spec asks.
pub(crate) fn page_start<T>(all: &[T], token: &str, id: impl Fn(&T) -> &String) -> Result<usize> {
    check_token(token)?;
    Ok(all.partition_point(|v| id(v).as_str() < token))
}

/// A paging token is empty or the id of a volume or snapshot of ours; anything else is
/// ABORTED, as the spec asks.
fn check_token(token: &str) -> Result<()> {
    if token.is_empty() {
        return Ok(());
    }
    let valid = ObjectId::parse_volume(token).ok().flatten().is_some()
        || ObjectId::parse_snapshot(token).ok().flatten().is_some();
    if !valid {
        return Err(Error::Aborted(format!(
            "starting_token {:?} is not valid; start again with an empty token",
            token.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}
