//! CSI messages as JSON values and table cells (the wire types have no serde).

use super::render::{map_text, timestamp};
use super::size;
use crate::csi::proto as csi;
use serde_json::{json, Value};

pub(super) fn topology(t: &[csi::Topology]) -> Value {
    Value::Array(t.iter().map(|t| json!(t.segments)).collect())
}

pub(super) fn topology_text(t: &[csi::Topology]) -> String {
    if t.is_empty() {
        return "-".into();
    }
    t.iter()
        .map(|t| map_text(&t.segments))
        .collect::<Vec<_>>()
        .join(" | ")
}

pub(super) fn content_source(c: Option<&csi::VolumeContentSource>) -> Value {
    use csi::volume_content_source::Type;
    match c.and_then(|c| c.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => json!({ "snapshot_id": s.snapshot_id }),
        Some(Type::Volume(v)) => json!({ "volume_id": v.volume_id }),
        None => Value::Null,
    }
}

fn content_source_text(c: Option<&csi::VolumeContentSource>) -> String {
    use csi::volume_content_source::Type;
    match c.and_then(|c| c.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => format!("snapshot {}", s.snapshot_id),
        Some(Type::Volume(v)) => format!("volume {}", v.volume_id),
        None => "-".into(),
    }
}

pub(super) fn volume(v: &csi::Volume) -> Value {
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": content_source(v.content_source.as_ref()),
        "accessible_topology": topology(&v.accessible_topology),
    })
}

pub(super) fn volume_fields(v: &csi::Volume) -> Vec<(&'static str, String)> {
    vec![
        ("volume id", v.volume_id.clone()),
        ("capacity", capacity_text(v.capacity_bytes)),
        ("context", map_text(&v.volume_context)),
        ("source", content_source_text(v.content_source.as_ref())),
        ("topology", topology_text(&v.accessible_topology)),
    ]
}

pub(super) fn capacity_text(bytes: i64) -> String {
    if bytes <= 0 {
        return "unknown".into();
    }
    format!("{} ({bytes} bytes)", size::format(bytes as u64))
}

pub(super) fn condition(c: Option<&csi::VolumeCondition>) -> Value {
    match c {
        Some(c) => json!({ "abnormal": c.abnormal, "message": c.message }),
        None => Value::Null,
    }
}

pub(super) fn condition_text(c: Option<&csi::VolumeCondition>) -> String {
    match c {
        None => "-".into(),
        Some(c) if c.abnormal => format!("ABNORMAL: {}", c.message),
        Some(c) if c.message.is_empty() => "ok".into(),
        Some(c) => c.message.clone(),
    }
}

pub(super) fn nodes_text(nodes: &[String]) -> String {
    if nodes.is_empty() {
        "-".into()
    } else {
        nodes.join(",")
    }
}

pub(super) fn snapshot(s: &csi::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(|t| timestamp(t.seconds)),
        "creation_time_seconds": s.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    })
}

pub(super) fn snapshot_row(s: &csi::Snapshot) -> Vec<String> {
    vec![
        s.snapshot_id.clone(),
        s.source_volume_id.clone(),
        size::format(s.size_bytes.max(0) as u64),
        s.creation_time
            .as_ref()
            .map(|t| timestamp(t.seconds))
            .unwrap_or_else(|| "-".into()),
        s.ready_to_use.to_string(),
    ]
}

pub(super) const SNAPSHOT_COLUMNS: [&str; 5] =
    ["SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "CREATED", "READY"];

pub(super) fn snapshot_fields(s: &csi::Snapshot) -> Vec<(&'static str, String)> {
    ["snapshot id", "source volume", "size", "created", "ready"]
        .into_iter()
        .zip(snapshot_row(s))
        .collect()
}

/// The names of a GetCapabilities answer: `rpc_types` holds each capability's RPC type
/// (None: a capability of another kind), `name` the proto enum name of a known type.
pub(super) fn rpc_capability_names(
    rpc_types: impl Iterator<Item = Option<i32>>,
    name: impl Fn(i32) -> Option<&'static str>,
) -> Vec<String> {
    rpc_types
        .map(|t| match t {
            Some(t) => name(t).map_or_else(|| format!("rpc-{t}"), enum_name),
            None => "unknown".into(),
        })
        .collect()
}

/// `SINGLE_NODE_WRITER` → `single-node-writer`: the names the flags take.
pub(super) fn enum_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

pub(super) fn capability(c: &csi::VolumeCapability) -> Value {
    use csi::volume_capability::AccessType;
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| csi::volume_capability::access_mode::Mode::try_from(m.mode).ok())
        .map(|m| enum_name(m.as_str_name()));
    match &c.access_type {
        Some(AccessType::Block(_)) => json!({ "block": {}, "access_mode": mode }),
        Some(AccessType::Mount(m)) => json!({
            "mount": { "fs_type": m.fs_type, "mount_flags": m.mount_flags },
            "access_mode": mode,
        }),
        None => json!({ "access_mode": mode }),
    }
}
