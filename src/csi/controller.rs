//! Controller service: volumes in pools, attached through `attach`.

use super::convert;
use super::proto::{self as csi, controller_server::Controller};
use crate::attach::{Attachments, Publish};
use crate::error::{Error, Result};
use crate::guard::InFlight;
use crate::ids::{self, ObjectId, VolumeId};
use crate::params::{self, VolumeParams};
use crate::pool::{
    CapacityQuery, CreateSnapshot, CreateVolume, Pools, SnapshotFilter, VolumeCondition,
    VolumeLock, VolumeRecord,
};
use tonic::{Request, Response, Status};

/// The controller service. Every operation on a volume holds the volume's lock in its pool
/// (`Pools::lock_volume`), which excludes concurrent operations of this and other processes
/// sharing the pool: the loser gets ABORTED. Every change runs as a task of its own that owns
/// its locks (`change`), so a cancelled RPC releases nothing while the work goes on, and an
/// identical request in flight is waited for rather than refused.
#[derive(Clone)]
pub(crate) struct ControllerService {
    pub pools: Pools,
    pub attachments: Attachments,
    /// Advertise the alpha GET_SNAPSHOT capability (`[snapshots] get_snapshot_capability`).
    pub get_snapshot_capability: bool,
    /// The changes in flight in this process.
    pub inflight: InFlight,
}

type RpcResult<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(v: T) -> RpcResult<T> {
    Ok(Response::new(v))
}

impl ControllerService {
    /// Runs `work`, a change to `object` (`vol:<id>`, `volname:<name>`, …) described by `op`
    /// (every field of the request that matters: identical requests have the same `op`), as a
    /// task of its own (`guard::InFlight`): it keeps its locks and runs to its end even when
    /// the client gives up, and an identical request meanwhile gets its result (waiting at most
    /// as long as that client's deadline allows).
    async fn change<T, F>(&self, object: String, op: String, work: F) -> RpcResult<T>
    where
        T: Clone + Send + Sync + 'static,
        F: std::future::Future<Output = std::result::Result<T, Status>> + Send + 'static,
    {
        self.inflight
            .run(object, op, work)
            .await?
            .map(Response::new)
    }

    /// A volume as CSI reports it; accessible from the topologies of its pool as configured now
    /// (a shared pool: every host that lists it).
    fn volume(&self, v: &crate::pool::VolumeSummary) -> csi::Volume {
        let topologies = match self.pools.get(&v.pool) {
            Some(p) => p.config().accessible_topologies(),
            None if v.accessible_topology.is_empty() => Vec::new(),
            None => vec![v.accessible_topology.clone()],
        };
        convert::volume(v, &topologies)
    }

    /// The lock of the volume a request names (its id parsed at the edge); `None` when no
    /// volume of ours can have that id.
    async fn lock_volume(&self, id: &Option<VolumeId>) -> Result<Option<VolumeLock>> {
        match id {
            Some(id) => self.pools.lock_volume(id).await,
            None => Ok(None),
        }
    }

    /// The lock and record of the volume a request names (`raw`, parsed as `id`): NOT_FOUND
    /// when there is no such volume.
    async fn lock_existing(
        &self,
        id: &Option<VolumeId>,
        raw: &str,
    ) -> Result<(VolumeLock, VolumeRecord)> {
        let lock = self
            .lock_volume(id)
            .await?
            .ok_or_else(|| convert::no_volume(raw))?;
        let rec = self.pools.locked_volume(&lock).await?;
        Ok((lock, rec))
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

/// A volume's status as ListVolumes and ControllerGetVolume report it: its published node ids
/// and its condition (`cond`, from the pool) made abnormal by its attachments in `scan`.
fn status(
    scan: &crate::attach::Scan,
    volume_id: &str,
    cond: &VolumeCondition,
) -> (Vec<String>, csi::VolumeCondition) {
    let (published_node_ids, unconfirmed) = published(scan, volume_id);
    let condition = with_attachments(
        condition(cond),
        scan.known.iter().filter(|a| a.volume_id == volume_id),
        unconfirmed,
    );
    (published_node_ids, condition)
}

fn condition(c: &VolumeCondition) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: c.abnormal(),
        message: c.message(),
    }
}

/// The most entries one ListVolumes or ListSnapshots answer carries, whatever `max_entries`
/// asks (the spec lets a plugin answer fewer, with a `next_token`): a few hundred bytes each,
/// so a page stays far below the 4 MiB that gRPC clients (grpc-go: Nomad, the Kubernetes
/// sidecars) accept by default, however many volumes the pools hold.
pub(crate) const MAX_PAGE: usize = 5_000;

/// The entries of one page: `max_entries`, or (0) the plugin's choice, at most [`MAX_PAGE`].
fn page_size(max_entries: i32) -> Result<usize> {
    match max_entries {
        n if n < 0 => Err(Error::invalid("max_entries must not be negative")),
        0 => Ok(MAX_PAGE),
        n => Ok((n as usize).min(MAX_PAGE)),
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
        // Holds the name's lock, and a clone its source's lock.
        let (object, op) = (format!("volname:{}", r.name), format!("create {create:?}"));
        let this = self.clone();
        self.change(object, op, async move {
            let rec = this.pools.create(create).await?;
            Ok(csi::CreateVolumeResponse {
                volume: Some(this.volume(&rec.summary())),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> RpcResult<csi::DeleteVolumeResponse> {
        let r = req.into_inner();
        let id = convert::volume_id(&r.volume_id)?;
        let this = self.clone();
        let object = format!("vol:{}", r.volume_id);
        self.change(object, "delete".into(), async move {
            let Some(lock) = this.lock_volume(&id).await? else {
                return Ok(csi::DeleteVolumeResponse {});
            };
            if lock.existed() {
                let nodes = this.attachments.nodes_of(&r.volume_id).await?;
                if !nodes.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is still attached to node(s) {}; unpublish it first",
                        r.volume_id,
                        nodes.join(", ")
                    ))
                    .into());
                }
            }
            this.pools.delete(&lock).await?;
            Ok(csi::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerPublishVolumeResponse> {
        let r = req.into_inner();
        let id = convert::volume_id(&r.volume_id)?;
        ids::check_name("node_id", &r.node_id)?;
        let capability = convert::required_capability(r.volume_capability.as_ref())?;
        if !self.attachments.is_enabled() {
            return Err(Error::Unimplemented(
                "ControllerPublishVolume needs an attach backend (libvirt or local attach)".into(),
            )
            .into());
        }
        let publish = Publish {
            node_id: r.node_id.clone(),
            capability,
            readonly: r.readonly,
        };
        let object = format!("vol:{}", r.volume_id);
        let op = format!("publish {publish:?}");
        let this = self.clone();
        self.change(object, op, async move {
            let (lock, rec) = this.lock_existing(&id, &r.volume_id).await?;
            let image = this.pools.image_path(&rec)?;
            let handed = this.pools.hand_to_writer(&lock, &rec);
            let ctx = this
                .attachments
                .publish(lock.id(), &rec, image, &publish, handed)
                .await?;
            Ok(csi::ControllerPublishVolumeResponse {
                publish_context: ctx,
            })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> RpcResult<csi::ControllerUnpublishVolumeResponse> {
        let r = req.into_inner();
        let id = convert::volume_id(&r.volume_id)?;
        if !r.node_id.is_empty() {
            ids::check_name("node_id", &r.node_id)?;
        }
        let object = format!("vol:{}", r.volume_id);
        let op = format!("unpublish {:?}", r.node_id);
        let this = self.clone();
        self.change(object, op, async move {
            let Some(lock) = this.lock_volume(&id).await? else {
                return Ok(csi::ControllerUnpublishVolumeResponse {});
            };
            if r.node_id.is_empty() {
                // Spec: an empty node id means "from every node".
                for node in this.attachments.nodes_of(&r.volume_id).await? {
                    this.attachments.unpublish(lock.id(), &node).await?;
                }
            } else {
                this.attachments.unpublish(lock.id(), &r.node_id).await?;
            }
            this.pools.note_unpublished(lock.id()).await;
            Ok(csi::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> RpcResult<csi::ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        let id = convert::volume_id(&r.volume_id)?;
        let caps = convert::capabilities(&r.volume_capabilities)?;
        convert::check_map("parameters", &r.parameters)?;
        convert::check_map("mutable_parameters", &r.mutable_parameters)?;
        let id = id.ok_or_else(|| convert::no_volume(&r.volume_id))?;
        let rec = self.pools.require_volume(&id).await?;
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
        let take = page_size(r.max_entries)?;
        check_token(&self.pools, &r.starting_token, ObjectId::parse_volume)?;
        let (page, next_token) = self.pools.list_page(&r.starting_token, take).await?;
        // The pages of one walk share one read of the nodes (a listing is a moment's picture).
        let attachments = self
            .attachments
            .recent(crate::attach::LISTING_MAX_AGE)
            .await?;
        let entries = page
            .into_iter()
            .map(|(volume, cond)| {
                let (published_node_ids, condition) = status(&attachments, &volume.id, &cond);
                csi::list_volumes_response::Entry {
                    volume: Some(self.volume(&volume)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition),
                    }),
                }
            })
            .collect();
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
        let caps = r
            .volume_capabilities
            .iter()
            .map(convert::capability)
            .collect::<Result<Vec<_>>>()?;
        // What CreateVolume would refuse whatever the pool (an unsupported fs_type) is
        // INVALID_ARGUMENT here too.
        for c in &caps {
            c.check_alone()?;
        }
        let capacity = self
            .pools
            .capacity(CapacityQuery {
                parameters: r.parameters,
                topology: r.accessible_topology.map(|t| t.segments),
                capabilities: caps,
            })
            .await?;
        ok(csi::GetCapacityResponse {
            available_capacity: capacity.available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(capacity.maximum_volume_size.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(capacity.minimum_volume_size as i64),
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
        let create = CreateSnapshot {
            name: r.name,
            source_volume_id: r.source_volume_id,
            parameters: r.parameters,
        };
        let (object, op) = (format!("snapname:{}", create.name), format!("{create:?}"));
        let pools = self.pools.clone();
        self.change(object, op, async move {
            // Holds the name's lock and the source volume's lock.
            let rec = pools.create_snapshot(create).await?;
            Ok(csi::CreateSnapshotResponse {
                snapshot: Some(convert::snapshot(&rec.summary())),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> RpcResult<csi::DeleteSnapshotResponse> {
        let r = req.into_inner();
        ObjectId::parse_snapshot(&r.snapshot_id)?;
        let pools = self.pools.clone();
        let object = format!("snap:{}", r.snapshot_id);
        self.change(object, "delete".into(), async move {
            pools.delete_snapshot(&r.snapshot_id).await?;
            Ok(csi::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> RpcResult<csi::ListSnapshotsResponse> {
        let r = req.into_inner();
        let take = page_size(r.max_entries)?;
        check_token(&self.pools, &r.starting_token, ObjectId::parse_snapshot)?;
        let filter = SnapshotFilter {
            snapshot_id: (!r.snapshot_id.is_empty()).then_some(r.snapshot_id),
            source_volume_id: (!r.source_volume_id.is_empty()).then_some(r.source_volume_id),
        };
        let (page, next_token) = self
            .pools
            .snapshot_page(filter, &r.starting_token, take)
            .await?;
        ok(csi::ListSnapshotsResponse {
            entries: page
                .iter()
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
            snapshot: Some(convert::snapshot(&rec.summary())),
        })
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> RpcResult<csi::ControllerExpandVolumeResponse> {
        let r = req.into_inner();
        let id = convert::volume_id(&r.volume_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .map(convert::capability)
            .transpose()?;
        let (required, limit) = convert::capacity_range(r.capacity_range.as_ref())?;
        let object = format!("vol:{}", r.volume_id);
        let op = format!("expand {required} {limit} {cap:?}");
        let this = self.clone();
        self.change(object, op, async move {
            let (lock, mut rec) = this.lock_existing(&id, &r.volume_id).await?;
            let target = this.pools.expansion_target(&rec, required, limit).await?;
            if target > rec.capacity_bytes {
                if this.attachments.nodes_of(&rec.id).await?.is_empty() {
                    rec = this.pools.expand_offline(&lock, target, 0).await?;
                } else {
                    this.attachments.resize_online(lock.id(), target).await?;
                    rec.capacity_bytes = target;
                    this.pools.save(&lock, &rec).await?;
                    tracing::info!(volume = %rec.id, size = target, "volume expanded online");
                }
            }
            let block = match &cap {
                Some(c) => c.is_block(),
                None => rec.is_block_only(),
            };
            Ok(csi::ControllerExpandVolumeResponse {
                capacity_bytes: rec.capacity_bytes as i64,
                node_expansion_required: !block,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> RpcResult<csi::ControllerGetVolumeResponse> {
        let r = req.into_inner();
        let id =
            convert::volume_id(&r.volume_id)?.ok_or_else(|| convert::no_volume(&r.volume_id))?;
        let (volume, cond) = self.pools.describe(&id).await?;
        let scan = self.attachments.scan().await?;
        let (published_node_ids, condition) = status(&scan, &volume.id, &cond);
        ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume(&volume)),
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
        let id = convert::volume_id(&r.volume_id)?;
        convert::check_map("mutable_parameters", &r.mutable_parameters)?;
        params::check_mutable(&r.mutable_parameters)?;
        // The values too, before anything is looked up.
        for (k, v) in &r.mutable_parameters {
            params::apply_qos(&mut params::Qos::default(), k, v)?;
        }
        let object = format!("vol:{}", r.volume_id);
        let op = format!("modify {:?}", r.mutable_parameters);
        let this = self.clone();
        self.change(object, op, async move {
            let (lock, mut rec) = this.lock_existing(&id, &r.volume_id).await?;
            let mut qos = rec.disk.qos;
            for (k, v) in &r.mutable_parameters {
                params::apply_qos(&mut qos, k, v)?;
            }
            qos.validate()?;
            if qos != rec.disk.qos {
                this.attachments.set_qos(lock.id(), &qos).await?;
                rec.disk.qos = qos;
                // `parameters` stay what the volume was created with (a repeated
                // CreateVolume is compared with them).
                for (k, v) in &r.mutable_parameters {
                    rec.mutable_parameters.insert(k.clone(), v.clone());
                }
                this.pools.save(&lock, &rec).await?;
                tracing::info!(volume = %rec.id, "volume QoS modified");
            }
            Ok(csi::ControllerModifyVolumeResponse {})
        })
        .await
    }
}

/// A paging token is empty or the id of an object of the listing's kind (`parse`: volume or
/// snapshot) in a configured pool, as the pages we hand out are; anything else (a snapshot id
/// given to ListVolumes, a pool no longer configured) is ABORTED, as the spec asks.
fn check_token(
    pools: &Pools,
    token: &str,
    parse: fn(&str) -> Result<Option<ObjectId>>,
) -> Result<()> {
    if token.is_empty() {
        return Ok(());
    }
    let valid = parse(token)
        .ok()
        .flatten()
        .is_some_and(|o| pools.get(&o.pool).is_some());
    if !valid {
        return Err(Error::Aborted(format!(
            "starting_token {:?} is not valid; start again with an empty token",
            token.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}
