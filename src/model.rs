//! Domain types shared by the controller, the hypervisor and the node: what a volume is and
//! how it may be used, independent of the gRPC wire types.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The on-disk format of a volume image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU copy-on-write image (snapshots and clones are layers).
    #[default]
    Qcow2,
    /// Plain raw image (no snapshots; may be shared by several domains).
    Raw,
}

impl ImageFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            other => Err(Error::invalid(format!(
                "format {other:?} is not supported: use qcow2 or raw"
            ))),
        }
    }
}

/// The CSI access mode of a volume capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// CSI SINGLE_NODE_WRITER.
    SingleNodeWriter,
    /// CSI SINGLE_NODE_READER_ONLY.
    SingleNodeReaderOnly,
    /// CSI MULTI_NODE_READER_ONLY.
    MultiNodeReaderOnly,
    /// CSI MULTI_NODE_SINGLE_WRITER.
    MultiNodeSingleWriter,
    /// CSI MULTI_NODE_MULTI_WRITER.
    MultiNodeMultiWriter,
    /// CSI SINGLE_NODE_SINGLE_WRITER.
    SingleNodeSingleWriter,
    /// CSI SINGLE_NODE_MULTI_WRITER.
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub(crate) fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    pub(crate) fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Several writers at once (across nodes) need a shareable raw disk.
    pub(crate) fn is_multi_writer(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        )
    }
}

/// File systems the node can create and grow.
pub(crate) const FS_TYPES: &[&str] = &["ext4", "xfs"];
pub(crate) const DEFAULT_FS_TYPE: &str = "ext4";

/// How a workload uses the volume: a raw block device or a mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AccessType {
    /// A raw block device.
    Block,
    /// A mounted filesystem.
    Mount {
        /// Empty means "the plugin's default" (ext4).
        #[serde(default)]
        fs_type: String,
        /// Extra mount options.
        #[serde(default)]
        mount_flags: Vec<String>,
    },
}

/// A CSI volume capability: access type and access mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Block or mount (with its filesystem type and flags).
    pub access_type: AccessType,
    /// Who may read and write it, from how many nodes.
    pub access_mode: AccessMode,
}

impl Capability {
    pub(crate) fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }

    /// Checks the capability on its own and against a volume of `format`.
    pub(crate) fn check(&self, format: ImageFormat) -> Result<()> {
        self.check_alone()?;
        self.check_for(format)
    }

    /// Checks what the capability asks whatever the volume: a supported file system, safe
    /// mount flags, a block volume for several writers.
    pub(crate) fn check_alone(&self) -> Result<()> {
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
        if self.access_mode.is_multi_writer() && !self.is_block() {
            return Err(Error::invalid(format!(
                "{:?} needs a block volume: ext4 and xfs cannot be written from several nodes \
                 at once",
                self.access_mode
            )));
        }
        Ok(())
    }

    /// Checks the capability against a volume of `format`.
    fn check_for(&self, format: ImageFormat) -> Result<()> {
        if self.access_mode.is_multi_writer() && format != ImageFormat::Raw {
            return Err(Error::invalid(format!(
                "{:?} needs format=raw: libvirt shares only raw images between domains",
                self.access_mode
            )));
        }
        Ok(())
    }
}

/// Options mount(8) acts on itself instead of passing them to the file system: with one of
/// these, it would mount something else than the volume's disk (a new loop device over it:
/// `loop`, `offset`, `sizelimit`, `encryption`), do another operation on what is at the path
/// (`bind`, `rbind`, `move`, `remount`), run another helper (`helper`, `uhelper`) or create
/// and chown paths (`X-mount.*`). Matched on the name before `=`, ignoring case.
const MOUNT_OPERATION_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "move",
    "remount",
    "loop",
    "offset",
    "sizelimit",
    "encryption",
    "helper",
    "uhelper",
];

/// Mount flags go to mount(8) as one `-o` list: no separators or control characters, and none
/// of the options that change what mount(8) does ([`MOUNT_OPERATION_OPTIONS`], `X-mount.*`):
/// the plugin alone decides what is mounted where.
pub(crate) fn check_mount_flag(flag: &str) -> Result<()> {
    let ok = !flag.is_empty()
        && flag.len() <= 256
        && flag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'\\' | b'"' | b'\''));
    if !ok {
        return Err(Error::invalid(format!(
            "mount flag {flag:?} is invalid: one printable option per entry, without commas or quotes"
        )));
    }
    let name = flag
        .split_once('=')
        .map_or(flag, |(n, _)| n)
        .to_ascii_lowercase();
    if MOUNT_OPERATION_OPTIONS.contains(&name.as_str()) || name.starts_with("x-mount.") {
        return Err(Error::invalid(format!(
            "mount flag {flag:?} is not allowed: it makes mount(8) mount something else, or \
             elsewhere, than this volume's disk at the path the CO gave; use file system \
             options (e.g. noatime, discard, nodev)"
        )));
    }
    Ok(())
}

/// The source a volume was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ContentSource {
    /// A snapshot id: the volume starts as that point in time.
    Snapshot(String),
    /// A volume id: the volume starts as a copy of that volume.
    Volume(String),
}

/// The guarantee a snapshot of several volumes met: how the members' points in time relate.
/// Logged, counted in the metrics and kept in the group snapshot's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// No member was attached read-write: nothing was writing them, every member holds all
    /// that was ever written to it.
    Offline,
    /// Crash-consistent: every member holds the same point of the guests' write stream (a
    /// write is in a member's snapshot only if every write issued before it is in its own
    /// member's), as after a power loss. Members on one domain are switched in one QEMU
    /// transaction; several domains are paused together while theirs are cut.
    Crash,
    /// Application-consistent: crash-consistent, and every guest holding a member had its file
    /// systems frozen (qemu-guest-agent) across the cut: they mount clean, without replay.
    Application,
}

impl Consistency {
    /// The name used in logs, metrics and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Offline => "offline",
            Consistency::Crash => "crash-consistent",
            Consistency::Application => "application-consistent",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_that_change_what_mount_does_are_invalid() {
        for ok in [
            "noatime",
            "ro",
            "discard",
            "nouuid",
            "commit=30",
            "data=ordered",
            "x-systemd.automount",
        ] {
            check_mount_flag(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "loop",
            "loop=/dev/loop7",
            "offset=4096",
            "sizelimit=1",
            "bind",
            "rbind",
            "move",
            "remount",
            "REMOUNT",
            "helper=foo",
            "uhelper=udisks2",
            "X-mount.mkdir",
            "x-mount.mkdir=0777",
            "X-mount.owner=0",
            "a,b",
            "",
        ] {
            assert!(
                matches!(check_mount_flag(bad), Err(Error::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
    }
}
