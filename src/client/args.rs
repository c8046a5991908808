//! Argument pieces several verbs share: a volume capability, `k=v` maps, sizes.

use crate::csi::proto as csi;
use std::collections::BTreeMap;

/// Access modes, by the names Nomad and the CSI spec use (`single-node-writer` …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub(crate) enum AccessModeArg {
    #[default]
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessModeArg {
    pub(crate) fn to_csi(self) -> csi::volume_capability::access_mode::Mode {
        use csi::volume_capability::access_mode::Mode;
        match self {
            AccessModeArg::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessModeArg::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessModeArg::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessModeArg::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
            AccessModeArg::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
            AccessModeArg::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessModeArg::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        }
    }
}

/// Which page of a listing: one page (`--max-entries`, `--starting-token`) or all (`--all`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PageArgs {
    /// Page size (0: the plugin decides).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_entries: i32,
    #[arg(long, default_value = "")]
    pub(crate) starting_token: String,
    /// Follow next_token until the last page.
    #[arg(long)]
    pub(crate) all: bool,
}

/// One volume capability: `--block`, or a file system (`--fs ext4 --mount-flag noatime`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CapArgs {
    /// Raw block device instead of a file system.
    #[arg(long, conflicts_with_all = ["fs", "mount_flag"])]
    pub block: bool,
    /// File system type of a mount volume (empty: the plugin's default, ext4).
    #[arg(long, value_name = "TYPE", default_value = "")]
    pub fs: String,
    /// Mount flag for a mount volume (repeatable).
    #[arg(long, value_name = "FLAG")]
    pub mount_flag: Vec<String>,
    /// Access mode, as Nomad names them.
    #[arg(long, value_enum, default_value_t)]
    pub mode: AccessModeArg,
}

impl CapArgs {
    pub(crate) fn to_csi(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs.clone(),
                mount_flags: self.mount_flag.clone(),
                volume_mount_group: String::new(),
            })
        };
        csi::VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(AccessMode {
                mode: self.mode.to_csi() as i32,
            }),
        }
    }
}

/// `key=value` (for `--param`, `--context`, `--publish-context`, `--topology`).
pub(super) fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

pub(super) fn to_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

/// clap value parser for sizes: at most what CSI's int64 fields carry (8 EiB), so a size is
/// never cut to a number the user did not type.
pub(super) fn size(s: &str) -> Result<u64, String> {
    let n = super::size::parse(s)?;
    if n > i64::MAX as u64 {
        return Err(format!(
            "size {s:?} is too large: CSI sizes are at most {} bytes (8 EiB)",
            i64::MAX
        ));
    }
    Ok(n)
}

/// Bytes as CSI's int64.
pub(super) fn bytes_i64(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_size_past_int64_is_refused_not_cut() {
        assert_eq!(super::size("8EiB").ok(), None);
        let err = super::size("18446744073709551615").unwrap_err();
        assert!(err.contains("too large") && err.contains("8 EiB"), "{err}");
        assert_eq!(super::size("1PiB").unwrap(), 1 << 50);
    }
}
