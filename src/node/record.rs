//! What NodeStageVolume and NodePublishVolume asked for at a path, kept beside the kernel's
//! mount table. The kernel shows a mount's file system, read-only flag and per-mount flags,
//! but not every option it was asked for (file systems hide the ones at their default), so a
//! repeated call at the same path is compared with the request that made the mount: the same
//! request is OK, another one ALREADY_EXISTS (CSI: "published but incompatible").
//!
//! The kernel stays the truth: a record names its mount (mountinfo id, device, boot), and one
//! whose mount is gone is stale and ignored. Without a record (lost, or a mount an older
//! version made) the comparison falls back to what the kernel shows (see
//! `Asked::differs_from_mount`), and a repeat that matches it becomes its record. Records
//! live until the mount is taken down; they are not made durable (a crash of the host takes
//! the mounts with it) and a failure to keep one costs only the exact comparison, never the
//! RPC.

use super::mountinfo::MountEntry;
use crate::error::{Error, Result};
use crate::model::{AccessType, Capability};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The terms of a stage or publish request that decide what is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Asked {
    pub(crate) volume_id: String,
    /// A block volume (a device node bound here), else a file system.
    pub(crate) block: bool,
    /// The file system asked for; empty: whatever the disk holds.
    pub(crate) fs_type: String,
    /// The capability's mount flags, as given.
    pub(crate) mount_flags: Vec<String>,
    /// Read-only, as asked (the access mode's or the publish's `readonly`).
    pub(crate) read_only: bool,
}

impl Asked {
    /// The terms of a request for `volume_id` with `capability`, read-only or not.
    pub(crate) fn of(volume_id: &str, capability: &Capability, read_only: bool) -> Asked {
        let (block, fs_type, mount_flags) = match &capability.access_type {
            AccessType::Block => (true, String::new(), Vec::new()),
            AccessType::Mount {
                fs_type,
                mount_flags,
            } => (false, fs_type.clone(), mount_flags.clone()),
        };
        Asked {
            volume_id: volume_id.to_string(),
            block,
            fs_type,
            mount_flags,
            read_only,
        }
    }

    /// How this request differs from the one that made the mount (`before`); None when it is
    /// the same (flags compared as a set: their order and repeats mean nothing to mount).
    pub(crate) fn differs_from(&self, before: &Asked) -> Option<String> {
        if self.block != before.block {
            return Some(format!(
                "as a {}, not as a {}",
                kind(before.block),
                kind(self.block)
            ));
        }
        if !self.fs_type.is_empty() && self.fs_type != before.fs_type {
            let was = if before.fs_type.is_empty() {
                "no fs_type".to_string()
            } else {
                format!("fs_type {}", before.fs_type)
            };
            return Some(format!("with {was}, not {}", self.fs_type));
        }
        if flag_set(&self.mount_flags) != flag_set(&before.mount_flags) {
            return Some(format!(
                "with mount flags {:?}, not {:?}",
                before.mount_flags, self.mount_flags
            ));
        }
        if self.read_only != before.read_only {
            return Some(read_only_words(before.read_only).to_string());
        }
        None
    }

    /// How this request differs from what the kernel shows of mount `m` (no record of the
    /// request that made it): the access type, the file system and whether it is read-only.
    /// `read_only_anyway`: the mount is read-only whatever was asked (a read-only disk or
    /// staging mount under a publish).
    pub(crate) fn differs_from_mount(
        &self,
        m: &MountEntry,
        read_only_anyway: bool,
    ) -> Option<String> {
        let block = m.is_device_bind();
        if self.block != block {
            return Some(format!(
                "as a {}, not as a {}",
                kind(block),
                kind(self.block)
            ));
        }
        if !block && !self.fs_type.is_empty() && self.fs_type != m.fs_type {
            return Some(format!("with fs_type {}, not {}", m.fs_type, self.fs_type));
        }
        if m.read_only() != (self.read_only || read_only_anyway) {
            return Some(read_only_words(m.read_only()).to_string());
        }
        None
    }
}

fn kind(block: bool) -> &'static str {
    if block {
        "block device"
    } else {
        "file system"
    }
}

fn read_only_words(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

fn flag_set(flags: &[String]) -> std::collections::BTreeSet<&str> {
    flags.iter().map(String::as_str).collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The mount point, as mountinfo shows it.
    path: PathBuf,
    asked: Asked,
    /// The mount it describes: mountinfo id and device, in this boot.
    mount_id: u32,
    dev: (u32, u32),
    boot_id: String,
}

/// The records of one node plugin: a directory of small JSON files, one per mount point.
/// Opened on first use (created if missing, records of an earlier boot removed).
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: Option<PathBuf>,
    opened: Arc<OnceLock<Opened>>,
}

#[derive(Debug)]
struct Opened {
    /// None: no records (none configured, or the directory cannot be made).
    dir: Option<PathBuf>,
    boot_id: String,
}

/// This boot's id; records of another boot are stale (their mounts are gone).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Records {
    /// Records under `dir`; None: none kept (every comparison falls back to the kernel's view).
    pub(crate) fn new(dir: Option<PathBuf>) -> Records {
        Records {
            dir,
            opened: Arc::default(),
        }
    }

    /// The directory, ready. Blocking (the first time).
    fn opened(&self) -> &Opened {
        self.opened.get_or_init(|| {
            let dir = self.dir.clone().and_then(|d| match std::fs::create_dir_all(&d) {
                Ok(()) => Some(d),
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot keep node mount records: repeated NodeStage/NodePublish calls are compared with what the kernel shows only");
                    None
                }
            });
            let opened = Opened {
                dir,
                boot_id: boot_id(),
            };
            opened.sweep();
            opened
        })
    }

    fn file(&self, path: &Path) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let dir = self.opened().dir.as_ref()?;
        let digest = Sha256::digest(path.as_os_str().as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Some(dir.join(format!("{name}.json")))
    }
}

impl Opened {
    /// Removes the records of other boots.
    fn sweep(&self) {
        let Some(dir) = &self.dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let stale = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                .is_none_or(|r| r.boot_id != self.boot_id);
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Records {
    /// Keeps what was asked for the mount `m` (just made; a file system's record names the
    /// one mounted). Blocking.
    pub(crate) fn save(&self, m: &MountEntry, asked: &Asked) {
        let Some(file) = self.file(&m.mount_point) else {
            return;
        };
        let mut asked = asked.clone();
        if !asked.block {
            // The file system mounted, whether or not the request named one.
            asked.fs_type = m.fs_type.clone();
        }
        let rec = Record {
            path: m.mount_point.clone(),
            asked,
            mount_id: m.id,
            dev: m.dev(),
            boot_id: self.opened().boot_id.clone(),
        };
        if let Err(e) = write_replacing(&file, &rec) {
            tracing::warn!(path = %m.mount_point.display(), error = %e, "cannot keep the node mount record");
        }
    }

    /// What was asked for the mount `m`, when a record of exactly that mount exists. Blocking.
    pub(crate) fn load(&self, m: &MountEntry) -> Option<Asked> {
        let file = self.file(&m.mount_point)?;
        let rec: Record = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        (rec.path == m.mount_point
            && rec.mount_id == m.id
            && rec.dev == m.dev()
            && rec.boot_id == self.opened().boot_id)
            .then_some(rec.asked)
    }

    /// Drops the record of the mount at `mount_point` (taken down). Blocking.
    pub(crate) fn forget(&self, mount_point: &Path) {
        if let Some(file) = self.file(mount_point) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Replaces `file` atomically (temp file and rename; no fsync, see the module doc).
fn write_replacing(file: &Path, rec: &Record) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let ctx = || format!("writing {}", file.display());
    let bytes = serde_json::to_vec(rec)
        .map_err(|e| Error::internal(format!("serializing {}: {e}", file.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx(), e))?;
    tmp.write_all(&bytes).map_err(|e| Error::io(ctx(), e))?;
    tmp.persist(file).map_err(|e| Error::io(ctx(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mountinfo::MountTable;

    fn asked(flags: &[&str], fs: &str, ro: bool) -> Asked {
        Asked {
            volume_id: "default.0123456789abcdef".into(),
            block: false,
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            read_only: ro,
        }
    }

    #[test]
    fn the_same_request_in_other_words_is_the_same() {
        let before = asked(&["noatime", "discard"], "ext4", false);
        assert_eq!(
            asked(&["discard", "noatime", "discard"], "ext4", false).differs_from(&before),
            None
        );
        assert_eq!(
            asked(&["noatime", "discard"], "", false).differs_from(&before),
            None
        );
        for other in [
            asked(&["noatime"], "ext4", false),
            asked(&["noatime", "discard", "nodev"], "ext4", false),
            asked(&["noatime", "discard"], "xfs", false),
            asked(&["noatime", "discard"], "ext4", true),
            Asked {
                block: true,
                ..before.clone()
            },
        ] {
            assert!(other.differs_from(&before).is_some(), "{other:?}");
        }
    }

    #[test]
    fn without_a_record_the_kernel_view_decides() {
        let t = MountTable::parse(
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n\
             5 1 7:1 / /s rw,noatime shared:3 - ext4 /dev/loop1 rw\n\
             6 1 7:1 / /t ro shared:3 - ext4 /dev/loop1 rw\n\
             7 1 0:6 /loop1 /b rw - devtmpfs devtmpfs rw\n",
        )
        .unwrap();
        // (request, mount point, read-only anyway, the same?)
        let cases = [
            // Flags cannot be told from the kernel: not compared.
            (asked(&[], "ext4", false), "/s", false, true),
            (asked(&[], "xfs", false), "/s", false, false),
            (asked(&[], "", true), "/s", false, false),
            (asked(&[], "", true), "/t", false, true),
            (asked(&[], "", false), "/t", false, false),
            (asked(&[], "", false), "/t", true, true),
            (asked(&[], "", false), "/b", false, false),
        ];
        for (a, p, anyway, same) in cases {
            let m = t.at(Path::new(p)).unwrap();
            let differs = a.differs_from_mount(m, anyway);
            assert_eq!(
                differs.is_none(),
                same,
                "{a:?} at {p} ({anyway}): {differs:?}"
            );
        }
    }

    #[test]
    fn records_name_their_mount() {
        let dir = tempfile::tempdir().unwrap();
        let recs = Records::new(Some(dir.path().join("node")));
        let t = MountTable::parse(
            "1 0 254:0 / / rw - ext4 /dev/vda rw\n5 1 7:1 / /s rw shared:3 - ext4 /dev/loop1 rw\n",
        )
        .unwrap();
        let m = t.at(Path::new("/s")).unwrap().clone();
        let a = asked(&["noatime"], "ext4", false);
        recs.save(&m, &a);
        assert_eq!(recs.load(&m), Some(a.clone()));
        // Another mount at the same path (remounted since): the record is stale.
        let other = MountEntry { id: 9, ..m.clone() };
        assert_eq!(recs.load(&other), None);
        // Reopened in the same boot: kept; a record of another boot: swept.
        let file = recs.file(&m.mount_point).unwrap();
        let recs = Records::new(Some(dir.path().join("node")));
        assert_eq!(recs.load(&m), Some(a.clone()));
        let mut rec: Record = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        rec.boot_id = "another-boot".into();
        std::fs::write(&file, serde_json::to_vec(&rec).unwrap()).unwrap();
        let recs = Records::new(Some(dir.path().join("node")));
        assert_eq!(recs.load(&m), None);
        assert!(
            !file.exists(),
            "a record of another boot is swept on first use"
        );
        recs.save(&m, &a);
        recs.forget(&m.mount_point);
        assert_eq!(recs.load(&m), None);
        // No directory: nothing kept, nothing fails.
        let none = Records::new(None);
        none.save(&m, &a);
        assert_eq!(none.load(&m), None);
    }
}
