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
    Stage(StageArgs),
    /// NodeUnstageVolume.
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
    },
    /// NodePublishVolume: bind the staged volume to a target path.
    Publish(PublishArgs),
    /// NodeUnpublishVolume.
    Unpublish {
        volume_id: String,
        #[arg(long)]
        target_path: String,
    },
    /// NodeGetVolumeStats.
    Stats(StatsArgs),
    /// NodeExpandVolume: grow the file system to the device's size.
    Expand(ExpandArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct StageArgs {
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
}

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
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
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    volume_id: String,
    /// The published (or staged) path.
    #[arg(long)]
    path: String,
    #[arg(long, default_value = "")]
    staging_path: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ExpandArgs {
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
}

pub(super) async fn run(cmd: NodeCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    match cmd {
        NodeCmd::Info => info(ctx).await,
        NodeCmd::Caps => caps(ctx).await,
        NodeCmd::Stage(a) => stage(ctx, a).await,
        NodeCmd::Unstage {
            volume_id,
            staging_path,
        } => unstage(ctx, volume_id, staging_path).await,
        NodeCmd::Publish(a) => publish(ctx, a).await,
        NodeCmd::Unpublish {
            volume_id,
            target_path,
        } => unpublish(ctx, volume_id, target_path).await,
        NodeCmd::Stats(a) => stats(ctx, a).await,
        NodeCmd::Expand(a) => expand(ctx, a).await,
    }
}

async fn info(ctx: &Ctx) -> Result<Report, ClientError> {
    let r = ctx
        .node()
        .node_get_info(ctx.request(csi::NodeGetInfoRequest {}))
        .await?
        .into_inner();
    let topo: Vec<csi::Topology> = r.accessible_topology.clone().into_iter().collect();
    let max = if r.max_volumes_per_node == 0 {
        "unlimited".into()
    } else {
        r.max_volumes_per_node.to_string()
    };
    Ok(Report::fields(
        vec![
            ("node id", r.node_id.clone()),
            ("max volumes", max),
            ("topology", view::topology_text(&topo)),
        ],
        json!({
            "node_id": r.node_id,
            "max_volumes_per_node": r.max_volumes_per_node,
            "accessible_topology": r.accessible_topology.map(|t| t.segments),
        }),
    ))
}

async fn caps(ctx: &Ctx) -> Result<Report, ClientError> {
    let r = ctx
        .node()
        .node_get_capabilities(ctx.request(csi::NodeGetCapabilitiesRequest {}))
        .await?
        .into_inner();
    use csi::node_service_capability::{rpc, Type};
    let names = view::rpc_capability_names(
        r.capabilities
            .iter()
            .map(|c| c.r#type.as_ref().map(|Type::Rpc(r)| r.r#type)),
        |t| rpc::Type::try_from(t).ok().map(|t| t.as_str_name()),
    );
    Ok(Report::capabilities(names))
}

async fn stage(ctx: &Ctx, a: StageArgs) -> Result<Report, ClientError> {
    ctx.node()
        .node_stage_volume(ctx.request(csi::NodeStageVolumeRequest {
            volume_id: a.volume_id.clone(),
            publish_context: to_map(&a.publish_context),
            staging_target_path: a.staging_path.clone(),
            volume_capability: Some(a.cap.to_csi()),
            volume_context: to_map(&a.context),
            ..Default::default()
        }))
        .await?;
    Ok(Report::message(
        format!("staged {} at {}", a.volume_id, a.staging_path),
        json!({ "staged": a.volume_id, "staging_target_path": a.staging_path }),
    ))
}

async fn unstage(
    ctx: &Ctx,
    volume_id: String,
    staging_path: String,
) -> Result<Report, ClientError> {
    ctx.node()
        .node_unstage_volume(ctx.request(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.clone(),
            staging_target_path: staging_path.clone(),
        }))
        .await?;
    Ok(Report::message(
        format!("unstaged {volume_id} from {staging_path}"),
        json!({ "unstaged": volume_id, "staging_target_path": staging_path }),
    ))
}

async fn publish(ctx: &Ctx, a: PublishArgs) -> Result<Report, ClientError> {
    ctx.node()
        .node_publish_volume(ctx.request(csi::NodePublishVolumeRequest {
            volume_id: a.volume_id.clone(),
            publish_context: to_map(&a.publish_context),
            staging_target_path: a.staging_path,
            target_path: a.target_path.clone(),
            volume_capability: Some(a.cap.to_csi()),
            readonly: a.readonly,
            volume_context: to_map(&a.context),
            ..Default::default()
        }))
        .await?;
    Ok(Report::message(
        format!("published {} at {}", a.volume_id, a.target_path),
        json!({ "published": a.volume_id, "target_path": a.target_path }),
    ))
}

async fn unpublish(
    ctx: &Ctx,
    volume_id: String,
    target_path: String,
) -> Result<Report, ClientError> {
    ctx.node()
        .node_unpublish_volume(ctx.request(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path: target_path.clone(),
        }))
        .await?;
    Ok(Report::message(
        format!("unpublished {volume_id} from {target_path}"),
        json!({ "unpublished": volume_id, "target_path": target_path }),
    ))
}

async fn stats(ctx: &Ctx, a: StatsArgs) -> Result<Report, ClientError> {
    let r = ctx
        .node()
        .node_get_volume_stats(ctx.request(csi::NodeGetVolumeStatsRequest {
            volume_id: a.volume_id,
            volume_path: a.path,
            staging_target_path: a.staging_path,
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
    Ok(Report::table(
        vec!["UNIT", "TOTAL", "USED", "AVAILABLE"],
        rows,
        vec![format!(
            "condition: {}",
            condition_text(r.volume_condition.as_ref())
        )],
        json!({ "usage": usage, "volume_condition": condition(r.volume_condition.as_ref()) }),
    ))
}

async fn expand(ctx: &Ctx, a: ExpandArgs) -> Result<Report, ClientError> {
    let r = ctx
        .node()
        .node_expand_volume(ctx.request(csi::NodeExpandVolumeRequest {
            volume_id: a.volume_id,
            volume_path: a.path,
            staging_target_path: a.staging_path,
            capacity_range: a.size.map(|s| csi::CapacityRange {
                required_bytes: bytes_i64(s),
                limit_bytes: 0,
            }),
            volume_capability: a.with_capability.then(|| a.cap.to_csi()),
            ..Default::default()
        }))
        .await?
        .into_inner();
    Ok(Report::fields(
        vec![("capacity", capacity_text(r.capacity_bytes))],
        json!({ "capacity_bytes": r.capacity_bytes }),
    ))
}
