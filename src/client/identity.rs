//! `client identity info|caps|probe`.

use super::render::{map_text, Report};
use super::view::enum_name;
use super::{ClientError, Ctx};
use crate::csi::proto as csi;
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum IdentityCmd {
    /// GetPluginInfo: name and version.
    Info,
    /// GetPluginCapabilities.
    Caps,
    /// Probe: exits non-zero when the plugin says it is not ready.
    Probe,
}

pub(super) async fn run(cmd: IdentityCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    let mut id = ctx.identity();
    Ok(match cmd {
        IdentityCmd::Info => {
            let r = id
                .get_plugin_info(ctx.request(csi::GetPluginInfoRequest {}))
                .await?
                .into_inner();
            Report::fields(
                vec![
                    ("name", r.name.clone()),
                    ("version", r.vendor_version.clone()),
                    ("manifest", map_text(&r.manifest)),
                ],
                json!({ "name": r.name, "vendor_version": r.vendor_version, "manifest": r.manifest }),
            )
        }
        IdentityCmd::Caps => {
            let r = id
                .get_plugin_capabilities(ctx.request(csi::GetPluginCapabilitiesRequest {}))
                .await?
                .into_inner();
            let names: Vec<String> = r.capabilities.iter().map(plugin_capability).collect();
            Report::capabilities(names)
        }
        IdentityCmd::Probe => {
            let r = id
                .probe(ctx.request(csi::ProbeRequest {}))
                .await?
                .into_inner();
            // An unset `ready` means ready (CSI spec; Nomad reads it the same way).
            let ready = r.ready.unwrap_or(true);
            Report::message(
                if ready { "ready" } else { "NOT ready" },
                json!({ "ready": ready }),
            )
            .failed_if(!ready)
        }
    })
}

fn plugin_capability(c: &csi::PluginCapability) -> String {
    use csi::plugin_capability::{service, volume_expansion, Type};
    match &c.r#type {
        Some(Type::Service(s)) => service::Type::try_from(s.r#type)
            .map(|t| enum_name(t.as_str_name()))
            .unwrap_or_else(|_| format!("service-{}", s.r#type)),
        Some(Type::VolumeExpansion(v)) => format!(
            "volume-expansion-{}",
            volume_expansion::Type::try_from(v.r#type)
                .map(|t| enum_name(t.as_str_name()))
                .unwrap_or_else(|_| v.r#type.to_string())
        ),
        None => "unknown".into(),
    }
}
