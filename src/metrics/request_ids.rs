//! The ids an RPC is about (volume, node, snapshot, name), read from the request so the RPC's
//! span can carry them. Only these string fields are taken: secrets, contexts and parameters
//! are never looked at, so they cannot leak into logs.

use crate::csi::proto as csi;
use prost::Message;

/// Ids longer than this are cut in logs (they are invalid anyway: ids are short).
const MAX_ID_LEN: usize = 128;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RequestIds {
    pub volume_id: Option<String>,
    pub node_id: Option<String>,
    pub snapshot_id: Option<String>,
    /// CreateVolume: the requested name (the volume id is not known yet).
    pub volume_name: Option<String>,
    /// CreateSnapshot: the requested name.
    pub snapshot_name: Option<String>,
    /// CreateVolume: the snapshot or volume it is made from.
    pub source: Option<String>,
}

fn id(s: String) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let mut s = s;
    if s.len() > MAX_ID_LEN {
        let mut cut = MAX_ID_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    Some(s)
}

fn ids(volume: String, node: String, snapshot: String) -> RequestIds {
    RequestIds {
        volume_id: id(volume),
        node_id: id(node),
        snapshot_id: id(snapshot),
        ..Default::default()
    }
}

/// The payload of the first gRPC frame of a unary request body: `[flag:1][len:4][message]`.
/// None for a compressed or truncated frame (then the span simply carries no ids).
pub(super) fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let header = body.get(..5)?;
    if header[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    body.get(5..5 + len)
}

/// Decodes `message` as the request type of `method` and picks out its ids.
pub(super) fn extract(method: &str, message: &[u8]) -> RequestIds {
    fn dec<M: Message + Default>(b: &[u8]) -> Option<M> {
        M::decode(b).ok()
    }
    let s = String::new;
    let found =
        match method {
            "CreateVolume" => dec::<csi::CreateVolumeRequest>(message).map(|r| {
                let source = match r.volume_content_source.and_then(|c| c.r#type) {
                    Some(csi::volume_content_source::Type::Volume(v)) => v.volume_id,
                    Some(csi::volume_content_source::Type::Snapshot(sn)) => sn.snapshot_id,
                    None => s(),
                };
                RequestIds {
                    volume_name: id(r.name),
                    source: id(source),
                    ..Default::default()
                }
            }),
            "DeleteVolume" => {
                dec::<csi::DeleteVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "ControllerPublishVolume" => dec::<csi::ControllerPublishVolumeRequest>(message)
                .map(|r| ids(r.volume_id, r.node_id, s())),
            "ControllerUnpublishVolume" => dec::<csi::ControllerUnpublishVolumeRequest>(message)
                .map(|r| ids(r.volume_id, r.node_id, s())),
            "ValidateVolumeCapabilities" => dec::<csi::ValidateVolumeCapabilitiesRequest>(message)
                .map(|r| ids(r.volume_id, s(), s())),
            "ControllerGetVolume" => {
                dec::<csi::ControllerGetVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "ControllerModifyVolume" => dec::<csi::ControllerModifyVolumeRequest>(message)
                .map(|r| ids(r.volume_id, s(), s())),
            "ControllerExpandVolume" => dec::<csi::ControllerExpandVolumeRequest>(message)
                .map(|r| ids(r.volume_id, s(), s())),
            "CreateSnapshot" => dec::<csi::CreateSnapshotRequest>(message).map(|r| RequestIds {
                snapshot_name: id(r.name),
                ..ids(r.source_volume_id, s(), s())
            }),
            "DeleteSnapshot" => {
                dec::<csi::DeleteSnapshotRequest>(message).map(|r| ids(s(), s(), r.snapshot_id))
            }
            "GetSnapshot" => {
                dec::<csi::GetSnapshotRequest>(message).map(|r| ids(s(), s(), r.snapshot_id))
            }
            "ListSnapshots" => dec::<csi::ListSnapshotsRequest>(message)
                .map(|r| ids(r.source_volume_id, s(), r.snapshot_id)),
            // Group snapshots: the group's name or id in the snapshot fields.
            "CreateVolumeGroupSnapshot" => dec::<csi::CreateVolumeGroupSnapshotRequest>(message)
                .map(|r| RequestIds {
                    snapshot_name: id(r.name),
                    ..Default::default()
                }),
            "GetVolumeGroupSnapshot" => dec::<csi::GetVolumeGroupSnapshotRequest>(message)
                .map(|r| ids(s(), s(), r.group_snapshot_id)),
            "DeleteVolumeGroupSnapshot" => dec::<csi::DeleteVolumeGroupSnapshotRequest>(message)
                .map(|r| ids(s(), s(), r.group_snapshot_id)),
            "NodeStageVolume" => {
                dec::<csi::NodeStageVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "NodeUnstageVolume" => {
                dec::<csi::NodeUnstageVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "NodePublishVolume" => {
                dec::<csi::NodePublishVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "NodeUnpublishVolume" => {
                dec::<csi::NodeUnpublishVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "NodeGetVolumeStats" => {
                dec::<csi::NodeGetVolumeStatsRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            "NodeExpandVolume" => {
                dec::<csi::NodeExpandVolumeRequest>(message).map(|r| ids(r.volume_id, s(), s()))
            }
            _ => None,
        };
    found.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn picks_ids_and_never_secrets() {
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: "default.0123456789abcdef".into(),
            node_id: "node-1".into(),
            secrets: [("password".to_string(), "hunter2".to_string())].into(),
            ..Default::default()
        };
        let body = frame(&req);
        let got = extract("ControllerPublishVolume", grpc_message(&body).unwrap());
        assert_eq!(got.volume_id.as_deref(), Some("default.0123456789abcdef"));
        assert_eq!(got.node_id.as_deref(), Some("node-1"));
        assert!(!format!("{got:?}").contains("hunter2"));
    }

    #[test]
    fn create_volume_carries_the_name_and_bad_input_gives_nothing() {
        let req = csi::CreateVolumeRequest {
            name: "pvc-1".into(),
            ..Default::default()
        };
        let body = frame(&req);
        let got = extract("CreateVolume", grpc_message(&body).unwrap());
        assert_eq!(got.volume_name.as_deref(), Some("pvc-1"));
        assert_eq!(got.volume_id, None);
        assert_eq!(
            extract("DeleteVolume", &[0xff, 0xff, 0xff]),
            RequestIds::default()
        );
        assert_eq!(grpc_message(&[1, 0, 0, 0, 0]), None);
        assert_eq!(grpc_message(&[0, 0, 0, 0, 9, 1]), None);
        let long = id("x".repeat(500)).unwrap();
        assert!(long.len() < 140);
    }
}
