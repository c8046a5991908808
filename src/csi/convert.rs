//! Wire types ↔ domain types.

use super::proto as csi;
use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::model::{AccessMode, AccessType, Capability, ContentSource};
use crate::pool::{SnapshotSummary, TopologyRequirement, VolumeSummary};
use std::collections::BTreeMap;

/// A request's `volume_id`, parsed once here and passed inward as a [`VolumeId`]:
/// INVALID_ARGUMENT when it is missing or unsafe; `None` when it is well-formed but no volume
/// of this plugin can have it. Each RPC answers `None` as `csi-error-tables.md` says for it:
/// NOT_FOUND ("volume does not exist"), or success for DeleteVolume and
/// ControllerUnpublishVolume (nothing to delete or detach).
pub(crate) fn volume_id(id: &str) -> Result<Option<VolumeId>> {
    VolumeId::parse("volume_id", id)
}

/// NOT_FOUND for volume `id`.
pub(crate) fn no_volume(id: &str) -> Error {
    Error::NotFound(format!("volume {id} does not exist"))
}

pub(crate) fn access_mode(m: Option<&csi::volume_capability::AccessMode>) -> Result<AccessMode> {
    use csi::volume_capability::access_mode::Mode;
    let raw = m.map(|m| m.mode).unwrap_or(0);
    Ok(match Mode::try_from(raw).unwrap_or(Mode::Unknown) {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter => AccessMode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter => AccessMode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::Unknown => {
            return Err(Error::invalid(
                "volume_capability.access_mode is missing or unknown",
            ))
        }
    })
}

/// A capability in domain terms (access type and mode checked for presence and syntax).
pub(crate) fn capability(c: &csi::VolumeCapability) -> Result<Capability> {
    use csi::volume_capability::AccessType as At;
    let access_type = match &c.access_type {
        Some(At::Block(_)) => AccessType::Block,
        Some(At::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
        },
        None => {
            return Err(Error::invalid(
                "volume_capability needs an access type: block or mount",
            ))
        }
    };
    let cap = Capability {
        access_type,
        access_mode: access_mode(c.access_mode.as_ref())?,
    };
    if let AccessType::Mount { mount_flags, .. } = &cap.access_type {
        if mount_flags.len() > 64 {
            return Err(Error::invalid("too many mount_flags (at most 64)"));
        }
    }
    Ok(cap)
}

pub(crate) fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities is required"));
    }
    if caps.len() > 16 {
        return Err(Error::invalid("too many volume_capabilities (at most 16)"));
    }
    caps.iter().map(capability).collect()
}

pub(crate) fn required_capability(c: Option<&csi::VolumeCapability>) -> Result<Capability> {
    capability(c.ok_or_else(|| Error::invalid("volume_capability is required"))?)
}

/// Non-negative byte counts from the wire's int64.
pub(crate) fn capacity_range(r: Option<&csi::CapacityRange>) -> Result<(u64, u64)> {
    let Some(r) = r else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::OutOfRange(
            "capacity_range must not be negative".to_string(),
        ));
    }
    Ok((r.required_bytes as u64, r.limit_bytes as u64))
}

pub(crate) fn topology_requirement(
    t: Option<&csi::TopologyRequirement>,
) -> Result<TopologyRequirement> {
    let Some(t) = t else {
        return Ok(TopologyRequirement::default());
    };
    let conv = |v: &[csi::Topology]| -> Result<Vec<BTreeMap<String, String>>> {
        if v.len() > 64 {
            return Err(Error::invalid("too many topologies (at most 64)"));
        }
        Ok(v.iter().map(|t| t.segments.clone()).collect())
    };
    Ok(TopologyRequirement {
        requisite: conv(&t.requisite)?,
        preferred: conv(&t.preferred)?,
    })
}

pub(crate) fn content_source(
    s: Option<&csi::VolumeContentSource>,
) -> Result<Option<ContentSource>> {
    use csi::volume_content_source::Type;
    Ok(match s.and_then(|s| s.r#type.as_ref()) {
        None => None,
        Some(Type::Snapshot(s)) => {
            crate::ids::check_safe_id("snapshot_id", &s.snapshot_id)?;
            Some(ContentSource::Snapshot(s.snapshot_id.clone()))
        }
        Some(Type::Volume(v)) => {
            crate::ids::check_safe_id("source volume_id", &v.volume_id)?;
            Some(ContentSource::Volume(v.volume_id.clone()))
        }
    })
}

pub(crate) fn content_source_to_proto(s: &ContentSource) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

/// volume_context keys: what the node needs, since it never sees the parameters.
pub(crate) const CTX_FORMAT: &str = "format";
pub(crate) const CTX_POOL: &str = "pool";
pub(crate) const CTX_FS_TYPE: &str = "fsType";

/// A volume as CSI reports it, accessible from `topologies` (none: from everywhere).
pub(crate) fn volume(rec: &VolumeSummary, topologies: &[crate::config::Topology]) -> csi::Volume {
    let mut ctx = BTreeMap::new();
    ctx.insert(CTX_POOL.to_string(), rec.pool.clone());
    ctx.insert(CTX_FORMAT.to_string(), rec.format.as_str().to_string());
    // The node sets a fresh file system's root owner and mode from these.
    ctx.extend(rec.root.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(fs) = &rec.fs_type {
        ctx.insert(CTX_FS_TYPE.to_string(), fs.clone());
    }
    csi::Volume {
        capacity_bytes: rec.capacity_bytes as i64,
        volume_id: rec.id.clone(),
        volume_context: ctx,
        content_source: rec.content_source.as_ref().map(content_source_to_proto),
        accessible_topology: topologies
            .iter()
            .map(|t| csi::Topology {
                segments: t.clone(),
            })
            .collect(),
    }
}

/// Maps must stay small: they are copied into records and XML.
pub(crate) fn check_map(what: &str, m: &BTreeMap<String, String>) -> Result<()> {
    if m.len() > 64 {
        return Err(Error::invalid(format!(
            "{what} has {} entries; at most 64",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.len() > 256 || v.len() > 4096 || k.contains('\0') || v.contains('\0') {
            return Err(Error::invalid(format!(
                "{what} entry {:?} is too long or contains NUL",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

pub(crate) fn snapshot(rec: &SnapshotSummary) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: rec.size_bytes as i64,
        snapshot_id: rec.id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: rec.created_at as i64,
            nanos: rec.created_at_nanos as i32,
        }),
        ready_to_use: rec.ready_to_use,
        group_snapshot_id: rec.group_snapshot_id.clone().unwrap_or_default(),
    }
}

/// A group snapshot and its members; ready when every member is.
pub(crate) fn group_snapshot(g: &crate::pool::GroupSnapshot) -> csi::VolumeGroupSnapshot {
    let snapshots: Vec<csi::Snapshot> = g.members.iter().map(|m| snapshot(&m.summary())).collect();
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.record.id.clone(),
        ready_to_use: g.record.state == crate::pool::RecordState::Ready
            && snapshots.iter().all(|s| s.ready_to_use),
        snapshots,
        creation_time: Some(prost_types::Timestamp {
            seconds: g.record.created_at as i64,
            nanos: g.record.created_at_nanos as i32,
        }),
    }
}
