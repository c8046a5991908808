//! `client volume …`: the Controller service's volume RPCs.

use super::args::{bytes_i64, key_value, size, to_map, CapArgs, PageArgs};
use super::render::{map_text, Report};
use super::view::{self, capacity_text, condition, condition_text, nodes_text};
use super::{pages, ClientError, Ctx};
use crate::csi::proto as csi;
use serde_json::{json, Value};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum VolumeCmd {
    /// CreateVolume (idempotent by name).
    Create(CreateArgs),
    /// ListVolumes, one page (--max-entries, --starting-token) or every page (--all).
    List(PageArgs),
    /// ControllerGetVolume.
    Get { volume_id: String },
    /// DeleteVolume (OK when it does not exist).
    Delete { volume_id: String },
    /// ControllerExpandVolume.
    Expand(ExpandArgs),
    /// ControllerModifyVolume: change mutable parameters (the QoS keys).
    Modify {
        volume_id: String,
        /// Mutable parameter to set (repeatable), e.g. readIopsSec=500.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value, required = true)]
        params: Vec<(String, String)>,
    },
    /// ControllerPublishVolume: attach to a node.
    Publish(PublishArgs),
    /// ControllerUnpublishVolume: detach from a node (no --node: from every node).
    Unpublish {
        volume_id: String,
        #[arg(long, default_value = "")]
        node: String,
    },
    /// ValidateVolumeCapabilities: exits non-zero when not confirmed.
    Validate(ValidateArgs),
    /// ControllerGetCapabilities.
    Caps,
    /// GetCapacity.
    Capacity {
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The volume's name: the idempotency key (the same name and request answer the same volume).
    #[arg(long)]
    name: String,
    /// Required size, e.g. 10GiB or 20G (none: the plugin's default).
    #[arg(long, value_parser = size)]
    size: Option<u64>,
    /// Upper limit of the size.
    #[arg(long, value_parser = size)]
    limit: Option<u64>,
    #[command(flatten)]
    cap: CapArgs,
    /// CreateVolume parameter (repeatable): pool, format, bus, cache, io, discard, ...
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
    params: Vec<(String, String)>,
    /// Mutable parameter (repeatable): the QoS keys, which `volume modify` changes later.
    #[arg(long = "mutable-param", value_name = "KEY=VALUE", value_parser = key_value)]
    mutable_params: Vec<(String, String)>,
    /// Restore this snapshot into the new volume.
    #[arg(long, conflicts_with = "from_volume")]
    from_snapshot: Option<String>,
    /// Clone this volume.
    #[arg(long)]
    from_volume: Option<String>,
    /// Required topology segment (repeatable; all of them form one topology).
    #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = key_value)]
    topology: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ExpandArgs {
    volume_id: String,
    #[arg(long, value_parser = size)]
    size: u64,
    #[arg(long, value_parser = size)]
    limit: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    volume_id: String,
    #[arg(long)]
    node: String,
    #[arg(long)]
    readonly: bool,
    #[command(flatten)]
    cap: CapArgs,
    /// volume_context entry (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
    context: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ValidateArgs {
    volume_id: String,
    #[command(flatten)]
    cap: CapArgs,
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
    params: Vec<(String, String)>,
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
    context: Vec<(String, String)>,
}

pub(super) async fn run(cmd: VolumeCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    match cmd {
        VolumeCmd::Create(a) => create(ctx, a).await,
        VolumeCmd::List(a) => list(ctx, a).await,
        VolumeCmd::Get { volume_id } => get(ctx, volume_id).await,
        VolumeCmd::Delete { volume_id } => delete(ctx, volume_id).await,
        VolumeCmd::Expand(a) => expand(ctx, a).await,
        VolumeCmd::Modify { volume_id, params } => modify(ctx, volume_id, params).await,
        VolumeCmd::Publish(a) => publish(ctx, a).await,
        VolumeCmd::Unpublish { volume_id, node } => unpublish(ctx, volume_id, node).await,
        VolumeCmd::Validate(a) => validate(ctx, a).await,
        VolumeCmd::Caps => caps(ctx).await,
        VolumeCmd::Capacity { params } => capacity(ctx, params).await,
    }
}

async fn create(ctx: &Ctx, a: CreateArgs) -> Result<Report, ClientError> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = match (a.from_snapshot, a.from_volume) {
        (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
        (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
        (None, None) => None,
    };
    let req = csi::CreateVolumeRequest {
        name: a.name,
        capacity_range: (a.size.is_some() || a.limit.is_some()).then(|| csi::CapacityRange {
            required_bytes: bytes_i64(a.size.unwrap_or(0)),
            limit_bytes: bytes_i64(a.limit.unwrap_or(0)),
        }),
        volume_capabilities: vec![a.cap.to_csi()],
        parameters: to_map(&a.params),
        mutable_parameters: to_map(&a.mutable_params),
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        accessibility_requirements: (!a.topology.is_empty()).then(|| {
            let t = csi::Topology {
                segments: to_map(&a.topology),
            };
            csi::TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            }
        }),
        ..Default::default()
    };
    let r = ctx
        .controller()
        .create_volume(ctx.request(req))
        .await?
        .into_inner();
    let v = r.volume.unwrap_or_default();
    Ok(Report::fields(
        view::volume_fields(&v),
        json!({ "volume": view::volume(&v) }),
    ))
}

async fn list(ctx: &Ctx, a: PageArgs) -> Result<Report, ClientError> {
    let (entries, token) = pages(a.starting_token, a.all, |starting_token| async move {
        let req = csi::ListVolumesRequest {
            max_entries: a.max_entries,
            starting_token,
        };
        let r = ctx
            .controller()
            .list_volumes(ctx.request(req))
            .await?
            .into_inner();
        Ok((r.entries, r.next_token))
    })
    .await?;
    Ok(list_report(&entries, &token))
}

async fn get(ctx: &Ctx, volume_id: String) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .controller_get_volume(ctx.request(csi::ControllerGetVolumeRequest { volume_id }))
        .await?
        .into_inner();
    let v = r.volume.unwrap_or_default();
    let (nodes, cond) = r
        .status
        .map(|s| (s.published_node_ids, s.volume_condition))
        .unwrap_or_default();
    let mut fields = view::volume_fields(&v);
    fields.push(("published on", nodes_text(&nodes)));
    fields.push(("condition", condition_text(cond.as_ref())));
    Ok(Report::fields(
        fields,
        json!({
            "volume": view::volume(&v),
            "status": { "published_node_ids": nodes, "volume_condition": condition(cond.as_ref()) },
        }),
    ))
}

async fn delete(ctx: &Ctx, volume_id: String) -> Result<Report, ClientError> {
    ctx.controller()
        .delete_volume(ctx.request(csi::DeleteVolumeRequest {
            volume_id: volume_id.clone(),
            ..Default::default()
        }))
        .await?;
    Ok(Report::message(
        format!("deleted {volume_id}"),
        json!({ "deleted": volume_id }),
    ))
}

async fn expand(ctx: &Ctx, a: ExpandArgs) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .controller_expand_volume(ctx.request(csi::ControllerExpandVolumeRequest {
            volume_id: a.volume_id,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes_i64(a.size),
                limit_bytes: bytes_i64(a.limit.unwrap_or(0)),
            }),
            ..Default::default()
        }))
        .await?
        .into_inner();
    Ok(Report::fields(
        vec![
            ("capacity", capacity_text(r.capacity_bytes)),
            (
                "node expansion required",
                r.node_expansion_required.to_string(),
            ),
        ],
        json!({ "capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required }),
    ))
}

async fn modify(
    ctx: &Ctx,
    volume_id: String,
    params: Vec<(String, String)>,
) -> Result<Report, ClientError> {
    let mutable_parameters = to_map(&params);
    ctx.controller()
        .controller_modify_volume(ctx.request(csi::ControllerModifyVolumeRequest {
            volume_id: volume_id.clone(),
            mutable_parameters: mutable_parameters.clone(),
            ..Default::default()
        }))
        .await?;
    Ok(Report::message(
        format!("modified {volume_id}: {}", map_text(&mutable_parameters)),
        json!({ "modified": volume_id, "mutable_parameters": mutable_parameters }),
    ))
}

async fn publish(ctx: &Ctx, a: PublishArgs) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .controller_publish_volume(ctx.request(csi::ControllerPublishVolumeRequest {
            volume_id: a.volume_id,
            node_id: a.node,
            volume_capability: Some(a.cap.to_csi()),
            readonly: a.readonly,
            volume_context: to_map(&a.context),
            ..Default::default()
        }))
        .await?
        .into_inner();
    Ok(Report::table(
        vec!["KEY", "VALUE"],
        r.publish_context
            .iter()
            .map(|(k, v)| vec![k.clone(), v.clone()])
            .collect(),
        vec![],
        json!({ "publish_context": r.publish_context }),
    ))
}

async fn unpublish(ctx: &Ctx, volume_id: String, node: String) -> Result<Report, ClientError> {
    ctx.controller()
        .controller_unpublish_volume(ctx.request(csi::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            node_id: node.clone(),
            ..Default::default()
        }))
        .await?;
    let from = if node.is_empty() {
        "every node".to_string()
    } else {
        node.clone()
    };
    Ok(Report::message(
        format!("unpublished {volume_id} from {from}"),
        json!({ "unpublished": volume_id, "node_id": node }),
    ))
}

async fn validate(ctx: &Ctx, a: ValidateArgs) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .validate_volume_capabilities(ctx.request(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: a.volume_id,
            volume_capabilities: vec![a.cap.to_csi()],
            parameters: to_map(&a.params),
            volume_context: to_map(&a.context),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let confirmed = r.confirmed.is_some();
    let caps: Vec<Value> = r
        .confirmed
        .iter()
        .flat_map(|c| c.volume_capabilities.iter().map(view::capability))
        .collect();
    Ok(Report::fields(
        vec![
            ("confirmed", confirmed.to_string()),
            (
                "message",
                if r.message.is_empty() {
                    "-".into()
                } else {
                    r.message.clone()
                },
            ),
        ],
        json!({ "confirmed": confirmed, "volume_capabilities": caps, "message": r.message }),
    )
    .failed_if(!confirmed))
}

async fn caps(ctx: &Ctx) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .controller_get_capabilities(ctx.request(csi::ControllerGetCapabilitiesRequest {}))
        .await?
        .into_inner();
    use csi::controller_service_capability::{rpc, Type};
    let names = view::rpc_capability_names(
        r.capabilities
            .iter()
            .map(|c| c.r#type.as_ref().map(|Type::Rpc(r)| r.r#type)),
        |t| rpc::Type::try_from(t).ok().map(|t| t.as_str_name()),
    );
    Ok(Report::capabilities(names))
}

async fn capacity(ctx: &Ctx, params: Vec<(String, String)>) -> Result<Report, ClientError> {
    let r = ctx
        .controller()
        .get_capacity(ctx.request(csi::GetCapacityRequest {
            parameters: to_map(&params),
            ..Default::default()
        }))
        .await?
        .into_inner();
    // Here 0 is an answer (no room, nothing fits), not "unknown" as a volume's size 0 is.
    let room = |bytes: i64| match bytes {
        0 => "none (0 bytes)".to_string(),
        b => capacity_text(b),
    };
    let size = |s: Option<i64>| s.map(room).unwrap_or("-".into());
    Ok(Report::fields(
        vec![
            ("available", room(r.available_capacity)),
            ("maximum volume size", size(r.maximum_volume_size)),
            ("minimum volume size", size(r.minimum_volume_size)),
        ],
        json!({
            "available_capacity": r.available_capacity,
            "maximum_volume_size": r.maximum_volume_size,
            "minimum_volume_size": r.minimum_volume_size,
        }),
    ))
}

fn list_report(entries: &[csi::list_volumes_response::Entry], next_token: &str) -> Report {
    let mut rows = Vec::new();
    let mut json_entries = Vec::new();
    for e in entries {
        let v = e.volume.clone().unwrap_or_default();
        let (nodes, cond) = e
            .status
            .clone()
            .map(|s| (s.published_node_ids, s.volume_condition))
            .unwrap_or_default();
        rows.push(vec![
            v.volume_id.clone(),
            super::size::format(v.capacity_bytes.max(0) as u64),
            nodes_text(&nodes),
            condition_text(cond.as_ref()),
            map_text(&v.volume_context),
        ]);
        json_entries.push(json!({
            "volume": view::volume(&v),
            "status": { "published_node_ids": nodes, "volume_condition": condition(cond.as_ref()) },
        }));
    }
    let footer = if next_token.is_empty() {
        vec![]
    } else {
        vec![format!("next token: {next_token}")]
    };
    Report::table(
        vec![
            "VOLUME ID",
            "CAPACITY",
            "PUBLISHED ON",
            "CONDITION",
            "CONTEXT",
        ],
        rows,
        footer,
        json!({ "entries": json_entries, "next_token": next_token }),
    )
}
