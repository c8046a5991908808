//! The records that make a pool its own database. One JSON file per volume, replaced atomically.

use crate::model::{Capability, ContentSource, ImageFormat};
use crate::params::DiskOptions;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: u32 = 1;

/// Where a multi-step operation stands; a restarted controller finishes or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Record written, image maybe partial: undone on start, redone by a retried create.
    Creating,
    Ready,
    /// Delete began: finished on start or by a retried delete.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub schema: u32,
    pub id: String,
    pub name: String,
    pub pool: String,
    pub state: RecordState,
    pub format: ImageFormat,
    pub capacity_bytes: u64,
    /// File name (in the pool's `images/`) of the volume's active, writable layer.
    pub image: String,
    /// The capabilities requested at creation.
    pub capabilities: Vec<Capability>,
    /// The CreateVolume parameters as given (minus orchestrator metadata), for idempotency.
    pub parameters: BTreeMap<String, String>,
    /// Hot-plug options parsed from the parameters (QoS may change later).
    pub disk: DiskOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<ContentSource>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accessible_topology: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The read-only layers under `image` (snapshots, clones) and any layer switch in flight.
    #[serde(default, skip_serializing_if = "Chain::is_empty")]
    pub chain: Chain,
}

impl VolumeRecord {
    /// Images a read of the volume may touch: the active layer plus its backing layers.
    pub fn depth(&self) -> usize {
        1 + self.chain.backing.len()
    }

    pub fn is_block_only(&self) -> bool {
        !self.capabilities.is_empty() && self.capabilities.iter().all(|c| c.is_block())
    }

    /// The file system the node should create: the first mount capability's fs_type.
    pub fn fs_type(&self) -> Option<&str> {
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
    pub fn is_empty(&self) -> bool {
        self.backing.is_empty() && self.freezing.is_none()
    }
}

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
    pub schema: u32,
    pub id: String,
    pub name: String,
    pub pool: String,
    pub state: RecordState,
    pub source_volume_id: String,
    /// File name in `images/` of the frozen layer holding the snapshot's point in time.
    pub layer: String,
    /// The layers under `layer`, nearest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<String>,
    /// The source volume's size when the snapshot was taken.
    pub size_bytes: u64,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Seconds and nanoseconds since the Unix epoch.
    pub created_at: u64,
    #[serde(default)]
    pub created_at_nanos: u32,
    /// Live snapshots only: whether the guest's file systems were frozen (guest agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesced: Option<bool>,
}

/// A background flattening of a volume's backing chain into one new layer
/// (`flatten/<volume key>.json`): the job names every file it reads or writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenJob {
    pub schema: u32,
    pub volume_id: String,
    /// The volume's active layer, whose backing is switched to `layer`.
    pub image: String,
    /// The backing chain being collapsed, nearest first.
    pub source: Vec<String>,
    /// The new standalone layer.
    pub layer: String,
    pub state: FlattenState,
    pub started_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlattenState {
    /// Copying the chain into `layer`: undone after a crash.
    Converting,
    /// `layer` is complete and durable; the active layer is being rebased onto it: finished
    /// after a crash.
    Switching,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
