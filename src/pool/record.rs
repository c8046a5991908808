//! The records that make a pool its own database. One JSON file per volume, replaced atomically.

use crate::model::{Capability, Consistency, ContentSource, ImageFormat};
use crate::params::DiskOptions;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const SCHEMA: u32 = 1;

/// Where a multi-step operation stands; a restarted controller finishes or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Record written, image maybe partial: undone on start, redone by a retried create.
    Creating,
    /// Complete and usable.
    Ready,
    /// Delete began: finished on start or by a retried delete.
    Deleting,
}

/// A volume: its record `volumes/<key>.json` in its pool, the durable truth about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub(crate) schema: u32,
    /// The CSI volume id (`<pool>.<key>`).
    pub id: String,
    /// The CSI name it was created with.
    pub name: String,
    /// The pool holding it.
    pub pool: String,
    pub(crate) state: RecordState,
    pub(crate) format: ImageFormat,
    pub(crate) capacity_bytes: u64,
    /// File name (in the pool's `images/`) of the volume's active, writable layer.
    pub image: String,
    /// The capabilities requested at creation.
    pub(crate) capabilities: Vec<Capability>,
    /// The CreateVolume parameters (with its `mutable_parameters` on top) as the volume was
    /// created with them: a repeated CreateVolume is compared with these, so they never change.
    pub(crate) parameters: BTreeMap<String, String>,
    /// The mutable parameters ControllerModifyVolume set since (their current values, on top
    /// of `parameters`); `disk.qos` is what they mean.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) mutable_parameters: BTreeMap<String, String>,
    /// Hot-plug options parsed from the parameters (QoS may change later).
    pub(crate) disk: DiskOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) content_source: Option<ContentSource>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) accessible_topology: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub(crate) created_at: u64,
    /// The read-only layers under `image` (snapshots, clones) and any layer switch in flight.
    #[serde(default, skip_serializing_if = "Chain::is_empty")]
    pub chain: Chain,
    /// The image was handed to a writer: set durably by the first read-write
    /// ControllerPublishVolume, before the attach. A blank image (no backing layers) without
    /// its blocks is then damaged (it held data), never an empty one a crash cut short
    /// (`Pool::check_images`). Records of versions before it lack it: not handed (yet).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) handed_to_writer: bool,
}

impl VolumeRecord {
    /// Images a read of the volume may touch: the active layer plus its backing layers.
    pub(crate) fn depth(&self) -> usize {
        1 + self.chain.backing.len()
    }

    pub(crate) fn is_block_only(&self) -> bool {
        !self.capabilities.is_empty() && self.capabilities.iter().all(|c| c.is_block())
    }

    /// The file system the node should create: the first mount capability's fs_type.
    pub(crate) fn fs_type(&self) -> Option<&str> {
        self.capabilities.iter().find_map(|c| match &c.access_type {
            crate::model::AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => {
                Some(fs_type.as_str())
            }
            _ => None,
        })
    }
}

/// A volume's backing chain. Backing layers are immutable once frozen: the chain recorded here
/// is exactly what the qcow2 headers say, so references can be counted from the records alone.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Chain {
    /// Backing layers (file names in `images/`), nearest first. Empty: a standalone image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<String>,
    /// A new overlay about to become the active layer, named before it is created so that a
    /// crash is finished or undone when the pool opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freezing: Option<Freezing>,
}

impl Chain {
    pub(crate) fn is_empty(&self) -> bool {
        self.backing.is_empty() && self.freezing.is_none()
    }
}

/// A live snapshot in progress: the active layer is being frozen under a new overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freezing {
    /// File name of the new overlay (backed by the current active layer).
    pub overlay: String,
    /// A running domain was asked to switch to the overlay: after a crash the volume must
    /// continue in the overlay, since the domain may already write there.
    #[serde(default)]
    pub handed_to_domain: bool,
}

/// A snapshot: an immutable layer (plus the immutable chain under it), in
/// `snapshots/<key>.json` of the source volume's pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Record format version.
    pub schema: u32,
    /// The CSI snapshot id (`<pool>.<key>`).
    pub id: String,
    /// The CSI name it was created with.
    pub name: String,
    /// The pool holding it (the source volume's pool).
    pub pool: String,
    /// Where its creation or deletion stands.
    pub state: RecordState,
    /// The volume it was taken of.
    pub source_volume_id: String,
    /// File name in `images/` of the frozen layer holding the snapshot's point in time.
    pub layer: String,
    /// The layers under `layer`, nearest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<String>,
    /// The source volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// The CreateSnapshot parameters as given.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Seconds and nanoseconds since the Unix epoch.
    pub created_at: u64,
    /// Nanoseconds past `created_at`.
    #[serde(default)]
    pub created_at_nanos: u32,
    /// Live snapshots only: whether the guest's file systems were frozen (guest agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesced: Option<bool>,
    /// The group snapshot this snapshot is a member of: it is deleted only with its group,
    /// and listed only once its group is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_id: Option<String>,
}

/// A group snapshot: snapshots of several volumes at one point of their writes, in
/// `groups/<key>.json` of the pool of its first volume. Its members are ordinary snapshot
/// records (in their volumes' pools) that name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    /// Record format version.
    pub schema: u32,
    /// The CSI group snapshot id (`<pool>.g<key>`).
    pub id: String,
    /// The CSI name it was created with.
    pub name: String,
    /// The pool holding this record.
    pub pool: String,
    /// Creating: members are being made (a restarted controller removes them and the
    /// record); Ready: every member is; Deleting: members are being removed.
    pub state: RecordState,
    /// The volumes, as requested (the idempotency check compares them as a set).
    pub source_volume_ids: Vec<String>,
    /// The member snapshots, one per volume, in the same order; named before they are made.
    pub snapshot_ids: Vec<String>,
    /// The CreateVolumeGroupSnapshot parameters as given.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// When the members were cut: seconds since the Unix epoch.
    pub created_at: u64,
    /// Nanoseconds past `created_at`.
    #[serde(default)]
    pub created_at_nanos: u32,
    /// The guarantee the members met (set when Ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// A background flattening of a volume's backing chain into one new layer
/// (`flatten/<volume key>.json`): the job names every file it reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenJob {
    /// Record format version.
    pub schema: u32,
    /// The volume whose chain is flattened.
    pub volume_id: String,
    /// The volume's active layer, whose backing is switched to `layer`.
    pub image: String,
    /// The backing chain being collapsed, nearest first.
    pub source: Vec<String>,
    /// The new standalone layer.
    pub layer: String,
    /// Where the job stands.
    pub state: FlattenState,
    /// When the job started (seconds since the Unix epoch).
    pub started_at: u64,
    /// When the job last changed state (seconds since the Unix epoch).
    pub updated_at: u64,
}

/// The steps of a flatten job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlattenState {
    /// Copying the chain into `layer`: undone after a crash.
    Converting,
    /// `layer` is complete and durable; the active layer is being rebased onto it: finished
    /// after a crash.
    Switching,
}

/// `t` as seconds since the Unix epoch and nanoseconds past them (0 before the epoch).
pub(crate) fn epoch_parts(t: std::time::SystemTime) -> (u64, u32) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
