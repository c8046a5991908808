//! Node service (runs inside the VM, or on the host for local attach).

use super::proto::{self as csi, node_server::Node};
use crate::config::NodeConfig;
use tonic::{Request, Response, Status};

pub struct NodeService {
    pub node_id: String,
    pub config: NodeConfig,
}

type RpcResult<T> = std::result::Result<Response<T>, Status>;

fn todo<T>(rpc: &str) -> RpcResult<T> {
    Err(Status::unimplemented(format!(
        "{rpc} is not implemented yet"
    )))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _req: Request<csi::NodeStageVolumeRequest>,
    ) -> RpcResult<csi::NodeStageVolumeResponse> {
        todo("NodeStageVolume")
    }

    async fn node_unstage_volume(
        &self,
        _req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> RpcResult<csi::NodeUnstageVolumeResponse> {
        todo("NodeUnstageVolume")
    }

    async fn node_publish_volume(
        &self,
        _req: Request<csi::NodePublishVolumeRequest>,
    ) -> RpcResult<csi::NodePublishVolumeResponse> {
        todo("NodePublishVolume")
    }

    async fn node_unpublish_volume(
        &self,
        _req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> RpcResult<csi::NodeUnpublishVolumeResponse> {
        todo("NodeUnpublishVolume")
    }

    async fn node_get_volume_stats(
        &self,
        _req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> RpcResult<csi::NodeGetVolumeStatsResponse> {
        todo("NodeGetVolumeStats")
    }

    async fn node_expand_volume(
        &self,
        _req: Request<csi::NodeExpandVolumeRequest>,
    ) -> RpcResult<csi::NodeExpandVolumeResponse> {
        todo("NodeExpandVolume")
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> RpcResult<csi::NodeGetCapabilitiesResponse> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> RpcResult<csi::NodeGetInfoResponse> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes_per_node.min(i64::MAX as u64) as i64,
            accessible_topology: (!self.config.topology.is_empty()).then(|| csi::Topology {
                segments: self.config.topology.clone(),
            }),
        }))
    }
}
