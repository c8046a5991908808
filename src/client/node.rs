//! `client node …`: the Node service (talk to the node plugin's socket).

use super::args::{bytes_i64, key_value, size, to_map, CapArgs};
use super::render::Report;
use super::view::{self, capacity_text, condition, condition_text, enum_name};
use super::{ClientError, Ctx};
use crate::csi::proto as csi;
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum NodeCmd {
    /// NodeGetInfo: node id, volume limit, topology.
    Info,
    /// NodeGetCapabilities.
    Caps,
    /// NodeStageVolume: find the disk, format if blank, mount at the staging path.
    Stage {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[command(flatten)]
        cap: CapArgs,
        /// publish_context entry from `volume publish` (repeatable), e.g. serial=vd-…
        #[arg(long = "publish-context", value_name = "KEY=VALUE", value_parser = key_value)]
        publish_context: Vec<(String, String)>,
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
    },
    /// NodeUnstageVolume.
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
    },
    /// NodePublishVolume: bind the staged volume to a target path.
    Publish {
        volume_id: String,
        #[arg(long)]
        target_path: String,
        #[arg(long, default_value = "")]
        staging_path: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
        #[arg(long = "publish-context", value_name = "KEY=VALUE", value_parser = key_value)]
        publish_context: Vec<(String, String)>,
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        volume_id: String,
        #[arg(long)]
        target_path: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        volume_id: String,
        /// The published (or staged) path.
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "")]
        staging_path: String,
    },
    /// NodeExpandVolume: grow the file system to the device's size.
    Expand {
        volume_id: String,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "")]
        staging_path: String,
        #[arg(long, value_parser = size)]
        size: Option<u64>,
        /// Pass a capability (e.g. --block) only when it matters to the plugin.
        #[arg(long)]
        with_capability: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
}

pub(super) async fn run(cmd: NodeCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    let mut n = ctx.node();
    Ok(match cmd {
        NodeCmd::Info => {
            let r = n
                .node_get_info(ctx.request(csi::NodeGetInfoRequest {}))
                .await?
                .into_inner();
            let topo: Vec<csi::Topology> = r.accessible_topology.clone().into_iter().collect();
            Report::fields(
                vec![
                    ("node id", r.node_id.clone()),
                    (
                        "max volumes",
                        if r.max_volumes_per_node == 0 {
                            "unlimited".into()
                        } else {
                            r.max_volumes_per_node.to_string()
                        },
                    ),
                    ("topology", view::topology_text(&topo)),
                ],
                json!({
                    "node_id": r.node_id,
                    "max_volumes_per_node": r.max_volumes_per_node,
                    "accessible_topology": r.accessible_topology.map(|t| t.segments),
                }),
            )
        }
        NodeCmd::Caps => {
            let r = n
                .node_get_capabilities(ctx.request(csi::NodeGetCapabilitiesRequest {}))
                .await?
                .into_inner();
            let names: Vec<String> = r
                .capabilities
                .iter()
                .map(|c| {
                    use csi::node_service_capability::{rpc, Type};
                    match &c.r#type {
                        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type)
                            .map(|t| enum_name(t.as_str_name()))
                            .unwrap_or_else(|_| format!("rpc-{}", r.r#type)),
                        None => "unknown".into(),
                    }
                })
                .collect();
            Report::capabilities(names)
        }
        NodeCmd::Stage {
            volume_id,
            staging_path,
            cap,
            publish_context,
            context,
        } => {
            n.node_stage_volume(ctx.request(csi::NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context: to_map(&publish_context),
                staging_target_path: staging_path.clone(),
                volume_capability: Some(cap.to_csi()),
                volume_context: to_map(&context),
                ..Default::default()
            }))
            .await?;
            Report::message(
                format!("staged {volume_id} at {staging_path}"),
                json!({ "staged": volume_id, "staging_target_path": staging_path }),
            )
        }
        NodeCmd::Unstage {
            volume_id,
            staging_path,
        } => {
            n.node_unstage_volume(ctx.request(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.clone(),
            }))
            .await?;
            Report::message(
                format!("unstaged {volume_id} from {staging_path}"),
                json!({ "unstaged": volume_id, "staging_target_path": staging_path }),
            )
        }
        NodeCmd::Publish {
            volume_id,
            target_path,
            staging_path,
            readonly,
            cap,
            publish_context,
            context,
        } => {
            n.node_publish_volume(ctx.request(csi::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context: to_map(&publish_context),
                staging_target_path: staging_path,
                target_path: target_path.clone(),
                volume_capability: Some(cap.to_csi()),
                readonly,
                volume_context: to_map(&context),
                ..Default::default()
            }))
            .await?;
            Report::message(
                format!("published {volume_id} at {target_path}"),
                json!({ "published": volume_id, "target_path": target_path }),
            )
        }
        NodeCmd::Unpublish {
            volume_id,
            target_path,
        } => {
            n.node_unpublish_volume(ctx.request(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target_path.clone(),
            }))
            .await?;
            Report::message(
                format!("unpublished {volume_id} from {target_path}"),
                json!({ "unpublished": volume_id, "target_path": target_path }),
            )
        }
        NodeCmd::Stats {
            volume_id,
            path,
            staging_path,
        } => {
            let r = n
                .node_get_volume_stats(ctx.request(csi::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: staging_path,
                }))
                .await?
                .into_inner();
            let unit = |u: i32| {
                csi::volume_usage::Unit::try_from(u)
                    .map(|u| enum_name(u.as_str_name()))
                    .unwrap_or_else(|_| u.to_string())
            };
            let rows = r
                .usage
                .iter()
                .map(|u| {
                    vec![
                        unit(u.unit),
                        u.total.to_string(),
                        u.used.to_string(),
                        u.available.to_string(),
                    ]
                })
                .collect();
            let usage: Vec<_> = r
                .usage
                .iter()
                .map(|u| json!({ "unit": unit(u.unit), "total": u.total, "used": u.used, "available": u.available }))
                .collect();
            Report::table(
                vec!["UNIT", "TOTAL", "USED", "AVAILABLE"],
                rows,
                vec![format!(
                    "condition: {}",
                    condition_text(r.volume_condition.as_ref())
                )],
                json!({ "usage": usage, "volume_condition": condition(r.volume_condition.as_ref()) }),
            )
        }
        NodeCmd::Expand {
            volume_id,
            path,
            staging_path,
            size,
            with_capability,
            cap,
        } => {
            let r = n
                .node_expand_volume(ctx.request(csi::NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: staging_path,
                    capacity_range: size.map(|s| csi::CapacityRange {
                        required_bytes: bytes_i64(s),
                        limit_bytes: 0,
                    }),
                    volume_capability: with_capability.then(|| cap.to_csi()),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Report::fields(
                vec![("capacity", capacity_text(r.capacity_bytes))],
                json!({ "capacity_bytes": r.capacity_bytes }),
            )
        }
    })
}
