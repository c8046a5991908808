//! `client volume …`: the Controller service's volume RPCs.

use super::args::{bytes_i64, key_value, size, to_map, CapArgs};
use super::render::{map_text, Report};
use super::view::{self, capacity_text, condition, condition_text, enum_name, nodes_text};
use super::{ClientError, Ctx};
use crate::csi::proto as csi;
use serde_json::{json, Value};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum VolumeCmd {
    /// CreateVolume (idempotent by name).
    Create {
        /// The volume's name: the idempotency key (the plugin derives the id from it).
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
        /// Restore this snapshot into the new volume.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume.
        #[arg(long)]
        from_volume: Option<String>,
        /// Required topology segment (repeatable; all of them form one topology).
        #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
    /// ListVolumes, one page (--max-entries, --starting-token) or every page (--all).
    List {
        /// Page size (0: the plugin decides).
        #[arg(long, default_value_t = 0)]
        max_entries: i32,
        #[arg(long, default_value = "")]
        starting_token: String,
        /// Follow next_token until the last page.
        #[arg(long)]
        all: bool,
    },
    /// ControllerGetVolume.
    Get { volume_id: String },
    /// DeleteVolume (OK when it does not exist).
    Delete { volume_id: String },
    /// ControllerExpandVolume.
    Expand {
        volume_id: String,
        #[arg(long, value_parser = size)]
        size: u64,
        #[arg(long, value_parser = size)]
        limit: Option<u64>,
    },
    /// ControllerPublishVolume: attach to a node.
    Publish {
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
    },
    /// ControllerUnpublishVolume: detach from a node (no --node: from every node).
    Unpublish {
        volume_id: String,
        #[arg(long, default_value = "")]
        node: String,
    },
    /// ValidateVolumeCapabilities: exits non-zero when not confirmed.
    Validate {
        volume_id: String,
        #[command(flatten)]
        cap: CapArgs,
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
    },
    /// ControllerGetCapabilities.
    Caps,
    /// GetCapacity.
    Capacity {
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
}

pub(super) async fn run(cmd: VolumeCmd, ctx: &Ctx) -> Result<Report, ClientError> {
    let mut c = ctx.controller();
    Ok(match cmd {
        VolumeCmd::Create {
            name,
            size,
            limit,
            cap,
            params,
            from_snapshot,
            from_volume,
            topology,
        } => {
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            let req = csi::CreateVolumeRequest {
                name,
                capacity_range: (size.is_some() || limit.is_some()).then(|| csi::CapacityRange {
                    required_bytes: bytes_i64(size.unwrap_or(0)),
                    limit_bytes: bytes_i64(limit.unwrap_or(0)),
                }),
                volume_capabilities: vec![cap.to_csi()],
                parameters: to_map(&params),
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                accessibility_requirements: (!topology.is_empty()).then(|| {
                    let t = csi::Topology {
                        segments: to_map(&topology),
                    };
                    csi::TopologyRequirement {
                        requisite: vec![t.clone()],
                        preferred: vec![t],
                    }
                }),
                ..Default::default()
            };
            let r = c.create_volume(ctx.request(req)).await?.into_inner();
            let v = r.volume.unwrap_or_default();
            Report::fields(
                view::volume_fields(&v),
                json!({ "volume": view::volume(&v) }),
            )
        }
        VolumeCmd::List {
            max_entries,
            starting_token,
            all,
        } => {
            let mut token = starting_token;
            let mut entries = Vec::new();
            loop {
                let req = csi::ListVolumesRequest {
                    max_entries,
                    starting_token: token.clone(),
                };
                let r = c.list_volumes(ctx.request(req)).await?.into_inner();
                entries.extend(r.entries);
                if !all || r.next_token.is_empty() {
                    token = r.next_token;
                    break;
                }
                if r.next_token == token {
                    return Err(ClientError::Failed(format!(
                        "the plugin returned next_token {token:?} again; stopping to avoid a loop"
                    )));
                }
                token = r.next_token;
            }
            list_report(&entries, &token)
        }
        VolumeCmd::Get { volume_id } => {
            let r = c
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
            Report::fields(
                fields,
                json!({
                    "volume": view::volume(&v),
                    "status": { "published_node_ids": nodes, "volume_condition": condition(cond.as_ref()) },
                }),
            )
        }
        VolumeCmd::Delete { volume_id } => {
            c.delete_volume(ctx.request(csi::DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                ..Default::default()
            }))
            .await?;
            Report::message(
                format!("deleted {volume_id}"),
                json!({ "deleted": volume_id }),
            )
        }
        VolumeCmd::Expand {
            volume_id,
            size,
            limit,
        } => {
            let r = c
                .controller_expand_volume(ctx.request(csi::ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: bytes_i64(size),
                        limit_bytes: bytes_i64(limit.unwrap_or(0)),
                    }),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Report::fields(
                vec![
                    ("capacity", capacity_text(r.capacity_bytes)),
                    (
                        "node expansion required",
                        r.node_expansion_required.to_string(),
                    ),
                ],
                json!({ "capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required }),
            )
        }
        VolumeCmd::Publish {
            volume_id,
            node,
            readonly,
            cap,
            context,
        } => {
            let r = c
                .controller_publish_volume(ctx.request(csi::ControllerPublishVolumeRequest {
                    volume_id,
                    node_id: node,
                    volume_capability: Some(cap.to_csi()),
                    readonly,
                    volume_context: to_map(&context),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Report::table(
                vec!["KEY", "VALUE"],
                r.publish_context
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.clone()])
                    .collect(),
                vec![],
                json!({ "publish_context": r.publish_context }),
            )
        }
        VolumeCmd::Unpublish { volume_id, node } => {
            c.controller_unpublish_volume(ctx.request(csi::ControllerUnpublishVolumeRequest {
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
            Report::message(
                format!("unpublished {volume_id} from {from}"),
                json!({ "unpublished": volume_id, "node_id": node }),
            )
        }
        VolumeCmd::Validate {
            volume_id,
            cap,
            params,
            context,
        } => {
            let r = c
                .validate_volume_capabilities(ctx.request(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id,
                    volume_capabilities: vec![cap.to_csi()],
                    parameters: to_map(&params),
                    volume_context: to_map(&context),
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
            Report::fields(
                vec![
                    ("confirmed", confirmed.to_string()),
                    ("message", if r.message.is_empty() { "-".into() } else { r.message.clone() }),
                ],
                json!({ "confirmed": confirmed, "volume_capabilities": caps, "message": r.message }),
            )
            .failed_if(!confirmed)
        }
        VolumeCmd::Caps => {
            let r = c
                .controller_get_capabilities(ctx.request(csi::ControllerGetCapabilitiesRequest {}))
                .await?
                .into_inner();
            let names: Vec<String> = r
                .capabilities
                .iter()
                .map(|cap| {
                    use csi::controller_service_capability::{rpc, Type};
                    match &cap.r#type {
                        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type)
                            .map(|t| enum_name(t.as_str_name()))
                            .unwrap_or_else(|_| format!("rpc-{}", r.r#type)),
                        None => "unknown".into(),
                    }
                })
                .collect();
            Report::capabilities(names)
        }
        VolumeCmd::Capacity { params } => {
            let r = c
                .get_capacity(ctx.request(csi::GetCapacityRequest {
                    parameters: to_map(&params),
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Report::fields(
                vec![
                    ("available", capacity_text(r.available_capacity)),
                    (
                        "maximum volume size",
                        r.maximum_volume_size
                            .map(capacity_text)
                            .unwrap_or("-".into()),
                    ),
                    (
                        "minimum volume size",
                        r.minimum_volume_size
                            .map(capacity_text)
                            .unwrap_or("-".into()),
                    ),
                ],
                json!({
                    "available_capacity": r.available_capacity,
                    "maximum_volume_size": r.maximum_volume_size,
                    "minimum_volume_size": r.minimum_volume_size,
                }),
            )
        }
    })
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
