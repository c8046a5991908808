//! CSI requests as tests send them, and short calls that return the part of a reply a test
//! looks at.
//!
//! Builders fill what a CO always sends and leave the rest default; change a field with struct
//! update syntax:
//!
//! ```ignore
//! let req = csi::CreateVolumeRequest { parameters: params(&[("bus", "virtio")]), ..create_req("a", MIB) };
//! let vol = p.controller().create(req).await?;                 // the Volume
//! let ctx = p.controller().publish(publish_req(&vol.volume_id, &node)).await?;  // publish_context
//! p.node().stage(stage_req(&vol.volume_id, &staging, cap)).await?;
//! expect_code(p.controller().delete(&vol.volume_id).await, Code::FailedPrecondition, "in use");
//! ```
//!
//! The short calls ([`ControllerExt`], [`NodeExt`]) exist for every tonic client, also the ones
//! a test builds on its own connection.

use crate::csi;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
};
use std::collections::BTreeMap;
use tonic::transport::Channel;

pub use csi::volume_capability::access_mode::Mode;
pub use csi::volume_content_source::Type as Source;
pub use tonic::{Code, Status};

/// String maps of the CSI messages (parameters, secrets, contexts).
pub type Map = BTreeMap<String, String>;

/// A mount capability: `fs_type` ("" for the plugin's default) and an access mode.
pub fn mount_cap(fs_type: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// `cap` with these mount flags (a block capability is returned as it is: it has none).
pub fn with_flags(cap: &csi::VolumeCapability, flags: &[&str]) -> csi::VolumeCapability {
    let mut cap = cap.clone();
    if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
    }
    cap
}

/// A block capability with an access mode.
pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// The capability most requests carry: ext4, single node writer.
pub fn ext4_cap() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

/// Whether a capability is a block one.
pub fn is_block(cap: &csi::VolumeCapability) -> bool {
    matches!(cap.access_type, Some(AccessType::Block(_)))
}

/// A string map from pairs.
pub fn params(kv: &[(&str, &str)]) -> Map {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `capacity_range` of `required` bytes, no limit.
pub fn capacity(required: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: 0,
    })
}

/// CreateVolume of `name`, `required` bytes (no capacity_range when 0, as Nomad sends it), one
/// ext4 single-node-writer capability.
pub fn create_req(name: &str, required: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: if required > 0 {
            capacity(required)
        } else {
            None
        },
        volume_capabilities: vec![ext4_cap()],
        ..Default::default()
    }
}

/// `volume_content_source` from a source.
pub fn content(source: Source) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(source),
    })
}

/// A restore's source: the snapshot `id`.
pub fn from_snapshot(id: &str) -> Source {
    Source::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

/// A clone's source: the volume `id`.
pub fn from_volume(id: &str) -> Source {
    Source::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

/// CreateVolume of `name` (see [`create_req`]) from a snapshot or volume.
pub fn create_from_req(name: &str, required: i64, source: Source) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: content(source),
        ..create_req(name, required)
    }
}

/// DeleteVolume of `volume_id`.
pub fn delete_req(volume_id: &str) -> csi::DeleteVolumeRequest {
    csi::DeleteVolumeRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    }
}

/// DeleteSnapshot of `snapshot_id`.
pub fn delete_snapshot_req(snapshot_id: &str) -> csi::DeleteSnapshotRequest {
    csi::DeleteSnapshotRequest {
        snapshot_id: snapshot_id.into(),
        ..Default::default()
    }
}

/// ControllerPublish of a volume to a node, ext4 single-node-writer, read-write.
pub fn publish_req(volume_id: &str, node_id: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        volume_capability: Some(ext4_cap()),
        ..Default::default()
    }
}

/// ControllerUnpublish of a volume from a node ("" = from every node).
pub fn unpublish_req(volume_id: &str, node_id: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        ..Default::default()
    }
}

/// ControllerExpandVolume to `required` bytes, no capability.
pub fn expand_req(volume_id: &str, required: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: volume_id.into(),
        capacity_range: capacity(required),
        ..Default::default()
    }
}

/// ValidateVolumeCapabilities of one capability.
pub fn validate_req(
    volume_id: &str,
    cap: csi::VolumeCapability,
) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// CreateSnapshot `name` of the volume `source`.
/// CreateVolumeGroupSnapshot of `sources`, named `name`.
pub fn group_snapshot_req(name: &str, sources: &[&str]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn snapshot_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

/// NodeStageVolume at `staging`.
pub fn stage_req(
    volume_id: &str,
    staging: &str,
    cap: csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// NodeUnstageVolume of `staging`.
pub fn unstage_req(volume_id: &str, staging: &str) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.into(),
    }
}

/// NodePublishVolume of the staged volume at `target`, read-write.
pub fn node_publish_req(
    volume_id: &str,
    staging: &str,
    target: &str,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// NodeUnpublishVolume of `target`.
pub fn node_unpublish_req(volume_id: &str, target: &str) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.into(),
    }
}

/// NodeGetVolumeStats of `path` (`staging` may be "").
pub fn stats_req(volume_id: &str, path: &str, staging: &str) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.into(),
        staging_target_path: staging.into(),
    }
}

/// NodeExpandVolume of the file system at `path` to `required` bytes.
pub fn node_expand_req(volume_id: &str, path: &str, required: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: volume_id.into(),
        volume_path: path.into(),
        capacity_range: capacity(required),
        ..Default::default()
    }
}

/// The code of an answer (`Ok` for a success).
pub fn code_of<T>(r: &Result<T, Status>) -> Code {
    r.as_ref().err().map_or(Code::Ok, Status::code)
}

/// Asserts `r` failed with `code` (`what` names the call); returns the error message.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {}", e.message());
    e.message().to_string()
}

/// The identity RPCs, each answering the part of the reply a test looks at.
#[async_trait::async_trait]
pub trait IdentityExt {
    /// GetPluginInfo, which must answer.
    async fn info(&mut self) -> csi::GetPluginInfoResponse;
    /// GetPluginCapabilities, which must answer: the capabilities.
    async fn capabilities(&mut self) -> Vec<csi::PluginCapability>;
    /// Probe → its `ready` field.
    async fn ready(&mut self) -> Result<Option<bool>, Status>;
}

#[async_trait::async_trait]
impl IdentityExt for IdentityClient<Channel> {
    async fn info(&mut self) -> csi::GetPluginInfoResponse {
        let r = self.get_plugin_info(csi::GetPluginInfoRequest {}).await;
        r.expect("GetPluginInfo").into_inner()
    }

    async fn capabilities(&mut self) -> Vec<csi::PluginCapability> {
        let r = self.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {});
        r.await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities
    }

    async fn ready(&mut self) -> Result<Option<bool>, Status> {
        Ok(self.probe(csi::ProbeRequest {}).await?.into_inner().ready)
    }
}

/// Whether the plugin offers a service (`GetPluginCapabilities`).
pub fn has_service(
    caps: &[csi::PluginCapability],
    service: csi::plugin_capability::service::Type,
) -> bool {
    caps.iter().any(|c| {
        matches!(
            c.r#type,
            Some(csi::plugin_capability::Type::Service(s)) if s.r#type == service as i32
        )
    })
}

/// The controller RPCs a test makes most, each answering the part of the reply it looks at.
#[async_trait::async_trait]
pub trait ControllerExt {
    /// CreateVolume → the volume.
    async fn create(&mut self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status>;
    /// DeleteVolume of `volume_id`.
    async fn delete(&mut self, volume_id: &str) -> Result<(), Status>;
    /// ControllerPublishVolume → the publish_context.
    async fn publish(&mut self, req: csi::ControllerPublishVolumeRequest) -> Result<Map, Status>;
    /// ControllerUnpublishVolume.
    async fn unpublish(&mut self, req: csi::ControllerUnpublishVolumeRequest)
        -> Result<(), Status>;
    /// ControllerExpandVolume → the reply (capacity, node_expansion_required).
    async fn expand(
        &mut self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status>;
    /// ControllerGetVolume of `volume_id` → the reply (volume, status).
    async fn volume(&mut self, volume_id: &str)
        -> Result<csi::ControllerGetVolumeResponse, Status>;
    /// ControllerGetVolume, which must answer: the nodes the volume is published to.
    async fn published_nodes(&mut self, volume_id: &str) -> Vec<String>;
    /// ListVolumes without paging, which must answer: every entry.
    async fn all_volumes(&mut self) -> Vec<csi::list_volumes_response::Entry>;
    /// CreateSnapshot → the snapshot.
    async fn snapshot(&mut self, req: csi::CreateSnapshotRequest) -> Result<csi::Snapshot, Status>;
    /// DeleteSnapshot of `snapshot_id`.
    async fn remove_snapshot(&mut self, snapshot_id: &str) -> Result<(), Status>;
    /// GetSnapshot of `snapshot_id` → the snapshot.
    async fn snapshot_by_id(&mut self, snapshot_id: &str) -> Result<csi::Snapshot, Status>;
    /// ControllerGetCapabilities, which must answer: the RPC types offered.
    async fn rpc_types(&mut self) -> Vec<i32>;
}

#[async_trait::async_trait]
impl ControllerExt for ControllerClient<Channel> {
    async fn create(&mut self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        let r = self.create_volume(req).await?.into_inner();
        Ok(r.volume.expect("CreateVolume answered a volume"))
    }

    async fn delete(&mut self, volume_id: &str) -> Result<(), Status> {
        self.delete_volume(delete_req(volume_id)).await.map(drop)
    }

    async fn publish(&mut self, req: csi::ControllerPublishVolumeRequest) -> Result<Map, Status> {
        let r = self.controller_publish_volume(req).await?.into_inner();
        Ok(r.publish_context.into_iter().collect())
    }

    async fn unpublish(
        &mut self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<(), Status> {
        self.controller_unpublish_volume(req).await.map(drop)
    }

    async fn expand(
        &mut self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        Ok(self.controller_expand_volume(req).await?.into_inner())
    }

    async fn volume(
        &mut self,
        volume_id: &str,
    ) -> Result<csi::ControllerGetVolumeResponse, Status> {
        let req = csi::ControllerGetVolumeRequest {
            volume_id: volume_id.into(),
        };
        Ok(self.controller_get_volume(req).await?.into_inner())
    }

    async fn published_nodes(&mut self, volume_id: &str) -> Vec<String> {
        let got = self.volume(volume_id).await.expect("ControllerGetVolume");
        got.status.expect("a volume status").published_node_ids
    }

    async fn all_volumes(&mut self) -> Vec<csi::list_volumes_response::Entry> {
        let req = csi::ListVolumesRequest::default();
        let r = self.list_volumes(req).await.expect("ListVolumes");
        r.into_inner().entries
    }

    async fn snapshot(&mut self, req: csi::CreateSnapshotRequest) -> Result<csi::Snapshot, Status> {
        let r = self.create_snapshot(req).await?.into_inner();
        Ok(r.snapshot.expect("CreateSnapshot answered a snapshot"))
    }

    async fn remove_snapshot(&mut self, snapshot_id: &str) -> Result<(), Status> {
        let req = delete_snapshot_req(snapshot_id);
        self.delete_snapshot(req).await.map(drop)
    }

    async fn snapshot_by_id(&mut self, snapshot_id: &str) -> Result<csi::Snapshot, Status> {
        let req = csi::GetSnapshotRequest {
            snapshot_id: snapshot_id.into(),
            ..Default::default()
        };
        let r = self.get_snapshot(req).await?.into_inner();
        Ok(r.snapshot.expect("GetSnapshot answered a snapshot"))
    }

    async fn rpc_types(&mut self) -> Vec<i32> {
        let req = csi::ControllerGetCapabilitiesRequest {};
        let r = self.controller_get_capabilities(req).await;
        let caps = r
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities;
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect()
    }
}

/// The node RPCs a test makes most, each answering the part of the reply it looks at.
#[async_trait::async_trait]
pub trait NodeExt {
    /// NodeGetInfo, which must answer: the node id.
    async fn node_id(&mut self) -> String;
    /// NodeGetInfo, which must answer: `max_volumes_per_node` (0: no limit).
    async fn max_volumes(&mut self) -> i64;
    /// NodeStageVolume.
    async fn stage(&mut self, req: csi::NodeStageVolumeRequest) -> Result<(), Status>;
    /// NodeUnstageVolume.
    async fn unstage(&mut self, req: csi::NodeUnstageVolumeRequest) -> Result<(), Status>;
    /// NodePublishVolume.
    async fn publish(&mut self, req: csi::NodePublishVolumeRequest) -> Result<(), Status>;
    /// NodeUnpublishVolume.
    async fn unpublish(&mut self, req: csi::NodeUnpublishVolumeRequest) -> Result<(), Status>;
    /// NodeGetVolumeStats → the reply.
    async fn stats(
        &mut self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status>;
    /// NodeExpandVolume → the capacity it answered.
    async fn expand(&mut self, req: csi::NodeExpandVolumeRequest) -> Result<i64, Status>;
}

#[async_trait::async_trait]
impl NodeExt for NodeClient<Channel> {
    async fn node_id(&mut self) -> String {
        let info = self.node_get_info(csi::NodeGetInfoRequest {}).await;
        info.expect("NodeGetInfo").into_inner().node_id
    }

    async fn max_volumes(&mut self) -> i64 {
        let info = self.node_get_info(csi::NodeGetInfoRequest {}).await;
        info.expect("NodeGetInfo").into_inner().max_volumes_per_node
    }

    async fn stage(&mut self, req: csi::NodeStageVolumeRequest) -> Result<(), Status> {
        self.node_stage_volume(req).await.map(drop)
    }

    async fn unstage(&mut self, req: csi::NodeUnstageVolumeRequest) -> Result<(), Status> {
        self.node_unstage_volume(req).await.map(drop)
    }

    async fn publish(&mut self, req: csi::NodePublishVolumeRequest) -> Result<(), Status> {
        self.node_publish_volume(req).await.map(drop)
    }

    async fn unpublish(&mut self, req: csi::NodeUnpublishVolumeRequest) -> Result<(), Status> {
        self.node_unpublish_volume(req).await.map(drop)
    }

    async fn stats(
        &mut self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        Ok(self.node_get_volume_stats(req).await?.into_inner())
    }

    async fn expand(&mut self, req: csi::NodeExpandVolumeRequest) -> Result<i64, Status> {
        Ok(self
            .node_expand_volume(req)
            .await?
            .into_inner()
            .capacity_bytes)
    }
}

/// The `Bytes` usage's total of a NodeGetVolumeStats reply.
pub fn bytes_total(s: &csi::NodeGetVolumeStatsResponse) -> i64 {
    s.usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .expect("bytes usage")
        .total
}

/// Short calls on a GroupController client.
#[async_trait::async_trait]
pub trait GroupControllerExt {
    /// CreateVolumeGroupSnapshot → the group snapshot.
    async fn create_group(
        &mut self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::VolumeGroupSnapshot, Status>;
    /// GetVolumeGroupSnapshot of `id`, with the member ids the CO passes (may be empty).
    async fn group(
        &mut self,
        id: &str,
        snapshot_ids: &[String],
    ) -> Result<csi::VolumeGroupSnapshot, Status>;
    /// DeleteVolumeGroupSnapshot of `id`, with the member ids the CO passes (may be empty).
    async fn delete_group(&mut self, id: &str, snapshot_ids: &[String]) -> Result<(), Status>;
    /// GroupControllerGetCapabilities, which must answer: the RPC types offered.
    async fn group_rpc_types(&mut self) -> Vec<i32>;
}

#[async_trait::async_trait]
impl GroupControllerExt for GroupControllerClient<Channel> {
    async fn create_group(
        &mut self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::VolumeGroupSnapshot, Status> {
        let r = self.create_volume_group_snapshot(req).await?.into_inner();
        Ok(r.group_snapshot
            .expect("CreateVolumeGroupSnapshot answered a group snapshot"))
    }

    async fn group(
        &mut self,
        id: &str,
        snapshot_ids: &[String],
    ) -> Result<csi::VolumeGroupSnapshot, Status> {
        let req = csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: snapshot_ids.to_vec(),
            ..Default::default()
        };
        let r = self.get_volume_group_snapshot(req).await?.into_inner();
        Ok(r.group_snapshot
            .expect("GetVolumeGroupSnapshot answered a group snapshot"))
    }

    async fn delete_group(&mut self, id: &str, snapshot_ids: &[String]) -> Result<(), Status> {
        let req = csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: snapshot_ids.to_vec(),
            ..Default::default()
        };
        self.delete_volume_group_snapshot(req).await.map(drop)
    }

    async fn group_rpc_types(&mut self) -> Vec<i32> {
        let req = csi::GroupControllerGetCapabilitiesRequest {};
        let r = self.group_controller_get_capabilities(req).await;
        let caps = r
            .expect("GroupControllerGetCapabilities")
            .into_inner()
            .capabilities;
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::group_controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect()
    }
}
