//! Freezing the file systems of locally attached volumes around a live snapshot (the host's
//! side of `Attacher::freeze_filesystems`), so that the frozen layers hold clean file systems
//! (ext4 and xfs flush their journal and mark it clean on freeze) rather than crash-consistent
//! ones. A file system is mounted on this host from the volume's loop device (the node's
//! staging mount and the publishes bound from it share one superblock: freezing one freezes
//! them all).
//!
//! Only the file systems of the volumes a snapshot cuts are frozen, never another volume's.
//! Their dirty data is written out first (`sync`, bounded), so a daemon that does not answer
//! is found before anything is frozen.
//!
//! `fsfreeze` (util-linux) does the FIFREEZE/FITHAW. Each freeze is bounded: one that has not
//! returned in time is given up (the snapshot is then crash-consistent) and thawed as soon as
//! it completes. A marker in the slot (`frozen.json`, naming the mount point) is written
//! before the freeze and removed after the thaw, so a plugin killed in between thaws the file
//! system when it starts again (`thaw_left`), before anything else, instead of leaving the
//! workload blocked.

use super::slot::Slot;
use crate::error::Result;
use crate::exec;
use crate::node::mountinfo::MountTable;
use crate::node::Sysfs;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

const PROGRAM: &str = "fsfreeze";
/// How long a freeze may take (it writes out the file system's dirty data first).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed thaw is retried before it is left to the next start.
const THAW_RETRIES: u32 = 10;
const THAW_PAUSE: Duration = Duration::from_millis(500);

/// The marker of a file system this plugin may have left frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    mount_point: PathBuf,
}

fn marker_path(slot: &Slot) -> PathBuf {
    slot.dir.join("frozen.json")
}

/// A mount point in `table` of the file system on `/dev/<loop_name>`, if it is mounted (a
/// block volume, or a volume not staged yet, has none); `table` is read (once, for all the
/// callers' devices) only for a device that exists. Blocking.
pub(super) fn mount_of(
    sysfs: &Sysfs,
    loop_name: &str,
    table: &mut Option<MountTable>,
) -> Result<Option<PathBuf>> {
    let Some(dev) = sysfs.device(loop_name) else {
        return Ok(None);
    };
    let table = match table {
        Some(t) => t,
        None => table.insert(MountTable::read()?),
    };
    let found = table
        .of_device(dev.dev())
        .into_iter()
        .find(|m| !m.fs_type.starts_with("fuse"))
        .map(|m| m.mount_point.clone());
    Ok(found)
}

/// Writes out the dirty data of the file system at `mount_point` (`sync -f`, syncfs) without
/// freezing it, bounded like a freeze: whether it finished in time. A daemon that does not
/// answer shows here, before anything is frozen; the freeze that follows has little left to
/// write, so writers stall for less.
pub(super) async fn sync(mount_point: &Path) -> bool {
    let run = exec::run("sync", [Path::new("-f"), mount_point]);
    match tokio::time::timeout(FREEZE_TIMEOUT, run).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(mount = %mount_point.display(), error = %e,
                "cannot write out the file system's dirty data");
            false
        }
        Err(_) => {
            tracing::warn!(mount = %mount_point.display(), secs = FREEZE_TIMEOUT.as_secs(),
                "writing out the file system's dirty data takes too long: its storage daemon \
                 does not keep up or does not answer");
            false
        }
    }
}

/// A file system frozen for a snapshot; `thaw` it on every path.
#[derive(Debug)]
pub(super) struct Frozen {
    slot: Slot,
    mount_point: PathBuf,
}

/// Freezes the file system at `mount_point` (marker first). None when it could not be frozen
/// in time or at all (logged): the snapshot is then crash-consistent.
pub(super) async fn freeze(slot: &Slot, mount_point: &Path) -> Option<Frozen> {
    let marker = Marker {
        mount_point: mount_point.to_path_buf(),
    };
    let path = marker_path(slot);
    let m = marker.clone();
    if let Err(e) = exec::blocking(move || crate::fsutil::write_json(&path, &m)).await {
        tracing::warn!(mount = %mount_point.display(), error = %e,
            "cannot write the freeze marker; snapshot without freezing the file system");
        return None;
    }
    let frozen = Frozen {
        slot: slot.clone(),
        mount_point: mount_point.to_path_buf(),
    };
    let run = exec::run(PROGRAM, [Path::new("--freeze"), mount_point]);
    match tokio::time::timeout(FREEZE_TIMEOUT, run).await {
        Ok(Ok(_)) => Some(frozen),
        Ok(Err(e)) => {
            tracing::warn!(mount = %mount_point.display(), error = %e,
                "cannot freeze the file system; the snapshot is crash-consistent");
            // It may have frozen nonetheless (e.g. already frozen by someone else: then the
            // thaw undoes theirs, which is what a crash-safe plugin must do anyway).
            frozen.thaw().await;
            None
        }
        Err(_) => {
            tracing::warn!(mount = %mount_point.display(), secs = FREEZE_TIMEOUT.as_secs(),
                "freezing the file system takes too long; the snapshot is crash-consistent, \
                 and the file system is thawed once the freeze completes");
            // A FITHAW waits for a freeze in progress, then undoes it.
            tokio::spawn(frozen.thaw());
            None
        }
    }
}

impl Frozen {
    /// Thaws the file system, retrying for a while; the marker goes once it is thawed (kept
    /// when every try failed: the next start thaws it).
    pub(super) async fn thaw(self) {
        for attempt in 0..THAW_RETRIES {
            match thaw_at(&self.mount_point).await {
                Ok(()) => {
                    let path = marker_path(&self.slot);
                    let removed =
                        exec::blocking(move || crate::fsutil::remove_durable(&path)).await;
                    if let Err(e) = removed {
                        tracing::warn!(error = %e, "cannot remove the freeze marker");
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(mount = %self.mount_point.display(), attempt, error = %e,
                        "thawing the file system failed; retrying");
                    tokio::time::sleep(THAW_PAUSE).await;
                }
            }
        }
        tracing::error!(mount = %self.mount_point.display(),
            "the file system stays frozen: run `fsfreeze --unfreeze` on it, or restart the \
             plugin (it thaws what it left frozen)");
    }
}

/// FITHAW; OK when it was not frozen (EINVAL) or is no longer mounted.
async fn thaw_at(mount_point: &Path) -> Result<()> {
    let out = exec::run_unchecked(PROGRAM, [Path::new("--unfreeze"), mount_point]).await?;
    let not_frozen = ["Invalid argument", "No such file or directory"];
    if out.code == Some(0) || not_frozen.iter().any(|w| out.stderr.contains(w)) {
        return Ok(());
    }
    Err(exec::tool_error(PROGRAM, &out))
}

/// Thaws the file system the marker in `slot` names, if there is one (one try), and removes
/// the marker; the mount point thawed, or None without a marker.
pub(super) async fn thaw_marked(slot: &Slot) -> Result<Option<PathBuf>> {
    let path = marker_path(slot);
    let Some(marker) = exec::blocking(move || crate::fsutil::read_json::<Marker>(&path)).await?
    else {
        return Ok(None);
    };
    thaw_at(&marker.mount_point).await?;
    let path = marker_path(slot);
    exec::blocking(move || crate::fsutil::remove_durable(&path)).await?;
    Ok(Some(marker.mount_point))
}

/// At start: thaws a file system a killed plugin left frozen in `slot` (its marker says
/// which), before anything else uses the volume.
pub(super) async fn thaw_left(slot: &Slot) {
    match thaw_marked(slot).await {
        Ok(None) => {}
        Ok(Some(mount)) => tracing::warn!(slot = %slot.key, mount = %mount.display(),
            "a snapshot left this file system frozen; thawed it"),
        Err(e) => tracing::error!(slot = %slot.key, error = %e,
            "a snapshot left a file system frozen and thawing it failed: run `fsfreeze \
             --unfreeze` on it"),
    }
}
