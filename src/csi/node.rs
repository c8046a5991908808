//! Node service (runs inside the VM, or on the host for local attach): validation and
//! conversion only; the work is in `crate::node`.

use super::convert;
use super::proto::{self as csi, node_server::Node};
use crate::attach::{CTX_BUS, CTX_DEVICE, CTX_SERIAL};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::ids;
use crate::model::{self, AccessType, Capability};
use crate::node::{self, paths, DeviceQuery, NodeOps};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tonic::{Request, Response, Status};

pub(crate) struct NodeService {
    pub node_id: String,
    pub config: NodeConfig,
    pub ops: NodeOps,
}

impl NodeService {
    pub(crate) fn new(node_id: String, config: NodeConfig) -> Self {
        let ops = NodeOps::new(&config);
        NodeService {
            node_id,
            config,
            ops,
        }
    }
}

type RpcResult<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(v: T) -> RpcResult<T> {
    Ok(Response::new(v))
}

/// The capability, with the checks the node relies on (fs type, flags).
fn capability(c: Option<&csi::VolumeCapability>) -> Result<Capability> {
    let cap = convert::required_capability(c)?;
    if let AccessType::Mount {
        fs_type,
        mount_flags,
    } = &cap.access_type
    {
        if !fs_type.is_empty() && !model::FS_TYPES.contains(&fs_type.as_str()) {
            return Err(Error::invalid(format!(
                "fs_type {fs_type:?} is not supported: use ext4, xfs or leave it empty"
            )));
        }
        for f in mount_flags {
            model::check_mount_flag(f)?;
        }
    }
    Ok(cap)
}

/// The capability's `volume_mount_group` (VOLUME_MOUNT_GROUP): a numeric group id.
fn mount_group(c: Option<&csi::VolumeCapability>) -> Result<Option<u32>> {
    use csi::volume_capability::AccessType as At;
    match c.and_then(|c| c.access_type.as_ref()) {
        Some(At::Mount(m)) if !m.volume_mount_group.is_empty() => {
            crate::params::id_number("volume_mount_group", &m.volume_mount_group).map(Some)
        }
        _ => Ok(None),
    }
}

fn device_query(ctx: &BTreeMap<String, String>) -> Result<DeviceQuery> {
    convert::check_map("publish_context", ctx)?;
    let get = |k: &str| ctx.get(k).cloned().unwrap_or_default();
    let serial = get(CTX_SERIAL);
    if !serial.is_empty() {
        ids::check_safe_id("publish_context serial", &serial)?;
    }
    let device_path = ctx
        .get(CTX_DEVICE)
        .map(|p| paths::check("publish_context devicePath", p))
        .transpose()?
        .map(|p| p.to_string_lossy().into_owned());
    Ok(DeviceQuery {
        serial,
        bus: get(CTX_BUS),
        device_path,
    })
}

impl NodeService {
    /// A staging or target path from the CO: well-formed and, with `allowed_path_roots`,
    /// leading below one of them.
    async fn co_path(&self, what: &'static str, raw: &str) -> Result<PathBuf> {
        let path = paths::check(what, raw)?;
        if !self.config.allowed_path_roots.is_empty() {
            let (p, roots) = (path.clone(), self.config.allowed_path_roots.clone());
            crate::exec::blocking(move || paths::check_within(what, &p, &roots)).await?;
        }
        Ok(path)
    }

    /// The path a request says the volume is at (NodeGetVolumeStats, NodeExpandVolume). A
    /// missing or unreadable one (NUL, too long) or one outside `allowed_path_roots` is
    /// INVALID_ARGUMENT now; one where no volume can be (relative, with `.` or `..`, `/`) is
    /// the inner NOT_FOUND, for the caller to raise once every other field is checked.
    async fn volume_path(&self, volume_id: &str, raw: &str) -> Result<Result<PathBuf>> {
        const WHAT: &str = "volume_path";
        if raw.is_empty() || raw.len() > paths::MAX_PATH_LEN || raw.contains('\0') {
            return paths::check(WHAT, raw).map(Ok);
        }
        match paths::check(WHAT, raw) {
            Ok(_) => self.co_path(WHAT, raw).await.map(Ok),
            Err(e) => Ok(Err(Error::NotFound(format!(
                "volume {volume_id} is not at {raw:?}: no volume can be there ({e})"
            )))),
        }
    }

    async fn optional_co_path(&self, what: &'static str, raw: &str) -> Result<Option<PathBuf>> {
        if raw.is_empty() {
            return Ok(None);
        }
        self.co_path(what, raw).await.map(Some)
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> RpcResult<csi::NodeStageVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let staging_path = self
            .co_path("staging_target_path", &r.staging_target_path)
            .await?;
        let capability = capability(r.volume_capability.as_ref())?;
        let mount_group = mount_group(r.volume_capability.as_ref())?;
        convert::check_map("volume_context", &r.volume_context)?;
        let root = crate::params::RootOwnership::from_context(&r.volume_context)?;
        self.ops
            .stage(node::StageRequest {
                volume_id: r.volume_id,
                staging_path,
                capability,
                device: device_query(&r.publish_context)?,
                default_fs: r.volume_context.get(convert::CTX_FS_TYPE).cloned(),
                root,
                mount_group,
            })
            .await?;
        ok(csi::NodeStageVolumeResponse {})
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> RpcResult<csi::NodeUnstageVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let staging_path = self
            .co_path("staging_target_path", &r.staging_target_path)
            .await?;
        self.ops.unstage(&r.volume_id, &staging_path).await?;
        ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> RpcResult<csi::NodePublishVolumeResponse> {
        let r = req.into_inner();
        // Every field first (INVALID_ARGUMENT), then whether the volume is here (NOT_FOUND),
        // then the state: no staging path at all is FAILED_PRECONDITION ("staging target path
        // not set", CSI), checked in the domain once the volume is known to be on this node.
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let target_path = self.co_path("target_path", &r.target_path).await?;
        let staging_path = self
            .optional_co_path("staging_target_path", &r.staging_target_path)
            .await?;
        let capability = capability(r.volume_capability.as_ref())?;
        let mount_group = mount_group(r.volume_capability.as_ref())?;
        convert::check_map("volume_context", &r.volume_context)?;
        convert::check_map("publish_context", &r.publish_context)?;
        if staging_path.as_ref() == Some(&target_path) {
            return Err(Error::invalid("target_path must differ from staging_target_path").into());
        }
        self.ops
            .publish(node::PublishRequest {
                volume_id: r.volume_id,
                staging_path,
                target_path,
                capability,
                readonly: r.readonly,
                mount_group,
            })
            .await?;
        ok(csi::NodePublishVolumeResponse {})
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> RpcResult<csi::NodeUnpublishVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let target_path = self.co_path("target_path", &r.target_path).await?;
        self.ops.unpublish(&r.volume_id, &target_path).await?;
        ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> RpcResult<csi::NodeGetVolumeStatsResponse> {
        use csi::volume_usage::Unit;
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let volume_path = self.volume_path(&r.volume_id, &r.volume_path).await?;
        let staging = self
            .optional_co_path("staging_target_path", &r.staging_target_path)
            .await?;
        let volume_path = volume_path?;
        let stats = self
            .ops
            .stats(&r.volume_id, &volume_path, staging.as_deref())
            .await?;
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        ok(csi::NodeGetVolumeStatsResponse {
            usage: stats
                .usage
                .iter()
                .map(|u| csi::VolumeUsage {
                    available: clamp(u.available),
                    total: clamp(u.total),
                    used: clamp(u.used),
                    unit: match u.unit {
                        node::UsageUnit::Bytes => Unit::Bytes,
                        node::UsageUnit::Inodes => Unit::Inodes,
                    } as i32,
                })
                .collect(),
            volume_condition: Some(csi::VolumeCondition {
                abnormal: stats.condition.abnormal,
                message: stats.condition.message,
            }),
        })
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> RpcResult<csi::NodeExpandVolumeResponse> {
        let r = req.into_inner();
        ids::check_safe_id("volume_id", &r.volume_id)?;
        let volume_path = self.volume_path(&r.volume_id, &r.volume_path).await?;
        let staging_path = self
            .optional_co_path("staging_target_path", &r.staging_target_path)
            .await?;
        let block = r
            .volume_capability
            .as_ref()
            .map(|c| capability(Some(c)))
            .transpose()?
            .map(|c| c.is_block());
        let (required, limit) = convert::capacity_range(r.capacity_range.as_ref())?;
        if limit > 0 && required > limit {
            return Err(Error::OutOfRange(format!(
                "required_bytes {required} exceeds limit_bytes {limit}"
            ))
            .into());
        }
        let volume_path = volume_path?;
        let size = self
            .ops
            .expand(node::ExpandRequest {
                volume_id: r.volume_id,
                volume_path,
                staging_path,
                required_bytes: required,
                block,
            })
            .await?;
        ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: size.min(i64::MAX as u64) as i64,
        })
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> RpcResult<csi::NodeGetCapabilitiesResponse> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::VolumeMountGroup,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        ok(csi::NodeGetCapabilitiesResponse { capabilities })
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> RpcResult<csi::NodeGetInfoResponse> {
        // Read on every call: the host's SMBIOS OEM strings, over the configured segments.
        let (sysfs, configured) = (self.config.sysfs_root(), self.config.topology.clone());
        let segments =
            crate::exec::blocking(move || Ok(crate::nodetopo::segments(&sysfs, &configured)))
                .await?;
        ok(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes_per_node.min(i64::MAX as u64) as i64,
            accessible_topology: (!segments.is_empty()).then_some(csi::Topology { segments }),
        })
    }
}
