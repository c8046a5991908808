//! One attached volume's state directory: `<state>/<volume key>/` holds the record, the
//! daemon's pid file and QMP socket, and the FUSE export file named after the disk serial (so
//! the node finds the loop device by serial through its backing file, as it finds any disk).

use crate::error::{Error, Result};
use crate::model::ImageFormat;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What was attached, written before anything starts (so a crash leaves a trace to clean).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub volume_id: String,
    pub serial: String,
    pub image: PathBuf,
    pub format: ImageFormat,
    pub readonly: bool,
    /// Published for several nodes' writers (multi-node modes): only echoed back, so a
    /// repeated publish is compared with what was asked first.
    #[serde(default)]
    pub shareable: bool,
    /// The export passes discards down (`discard=unmap`); absent in records of older plugins.
    #[serde(default)]
    pub discard: bool,
    /// The loop device's logical block size, when the volume asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_block_size: Option<u32>,
}

#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub dir: PathBuf,
    pub key: String,
}

/// UNIX socket paths must fit in sun_path (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Slot {
    pub(super) fn new(state_dir: &Path, key: &str) -> Slot {
        Slot {
            dir: state_dir.join(key),
            key: key.to_string(),
        }
    }

    pub(super) fn record_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub(super) fn pid_path(&self) -> PathBuf {
        self.dir.join("qsd.pid")
    }

    pub(super) fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The FUSE export: a regular file the daemon mounts the image on.
    pub(super) fn export_path(&self, serial: &str) -> PathBuf {
        self.dir.join(serial)
    }

    pub(super) fn serial(&self) -> String {
        format!("vd-{}", self.key)
    }

    /// Blocking.
    pub(super) fn read_record(&self) -> Result<Option<Record>> {
        crate::fsutil::read_json(&self.record_path())
    }

    /// Paths go into the daemon's command line: they must be plain and short enough.
    pub(super) fn check_paths(&self) -> Result<()> {
        let qmp = self.qmp_path();
        let s = qmp.to_string_lossy();
        if s.len() > MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "local attach state path {} is too long for a UNIX socket; use a shorter \
                 --data-dir",
                qmp.display()
            )));
        }
        Ok(())
    }
}

/// Slot keys in the state directory (16 hex digits). Blocking.
pub(super) fn list(state_dir: &Path) -> Result<Vec<Slot>> {
    let rd = match std::fs::read_dir(state_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(format!("listing {}", state_dir.display()), e)),
    };
    let mut out: Vec<Slot> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|n| Slot::new(state_dir, &n))
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
