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
}

impl VolumeRecord {
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

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
