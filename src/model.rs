//! Domain types shared by the controller, the hypervisor and the node: what a volume is and
//! how it may be used, independent of the gRPC wire types.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            other => Err(Error::invalid(format!(
                "format {other:?} is not supported: use qcow2 or raw"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Several writers at once (across nodes) need a shareable raw disk.
    pub fn is_multi_writer(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        )
    }
}

/// File systems the node can create and grow.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];
pub const DEFAULT_FS_TYPE: &str = "ext4";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AccessType {
    Block,
    Mount {
        /// Empty means "the plugin's default" (ext4).
        #[serde(default)]
        fs_type: String,
        #[serde(default)]
        mount_flags: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }

    /// Checks the capability on its own and against a volume of `format`.
    pub fn check(&self, format: ImageFormat) -> Result<()> {
        if let AccessType::Mount {
            fs_type,
            mount_flags,
        } = &self.access_type
        {
            if !fs_type.is_empty() && !FS_TYPES.contains(&fs_type.as_str()) {
                return Err(Error::invalid(format!(
                    "fs_type {fs_type:?} is not supported: use ext4, xfs or leave it empty"
                )));
            }
            for flag in mount_flags {
                check_mount_flag(flag)?;
            }
        }
        if self.access_mode.is_multi_writer() {
            if !self.is_block() {
                return Err(Error::invalid(format!(
                    "{:?} needs a block volume: ext4 and xfs cannot be written from several \
                     nodes at once",
                    self.access_mode
                )));
            }
            if format != ImageFormat::Raw {
                return Err(Error::invalid(format!(
                    "{:?} needs format=raw: libvirt shares only raw images between domains",
                    self.access_mode
                )));
            }
        }
        Ok(())
    }
}

/// Mount flags go to mount(8) as one `-o` list: no separators or control characters.
pub fn check_mount_flag(flag: &str) -> Result<()> {
    let ok = !flag.is_empty()
        && flag.len() <= 256
        && flag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'\\' | b'"' | b'\''));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "mount flag {flag:?} is invalid: one printable option per entry, without commas or quotes"
        )))
    }
}

/// The source a volume was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}
