//! Identity service: who we are, what we offer, whether we are ready.

use super::proto::{self as csi, identity_server::Identity};
use crate::attach::Attachments;
use crate::pool::Pools;
use tonic::{Request, Response, Status};

pub(crate) struct IdentityService {
    pub driver_name: String,
    pub controller: bool,
    pub topology: bool,
    /// Controller modes: pools that must be writable, attach backends that must be healthy.
    pub pools: Option<Pools>,
    pub attachments: Option<Attachments>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service::Type, Service, Type as Cap, VolumeExpansion};
        let service = |t: Type| csi::PluginCapability {
            r#type: Some(Cap::Service(Service { r#type: t as i32 })),
        };
        let mut caps = Vec::new();
        if self.controller {
            caps.push(service(Type::ControllerService));
            caps.push(service(Type::GroupControllerService));
            caps.push(csi::PluginCapability {
                r#type: Some(Cap::VolumeExpansion(VolumeExpansion {
                    r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                })),
            });
        }
        if self.topology {
            caps.push(service(Type::VolumeAccessibilityConstraints));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        if let Some(pools) = &self.pools {
            pools
                .check_writable()
                .await
                .map_err(|e| Status::failed_precondition(format!("not ready: {e}")))?;
        }
        if let Some(att) = &self.attachments {
            att.check_health()
                .await
                .map_err(|e| Status::failed_precondition(format!("not ready: {e}")))?;
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
