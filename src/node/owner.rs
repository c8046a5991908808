//! Who may write a mounted volume: a fresh file system's root gets the owner and mode the
//! volume was created with (`rootUid`/`rootGid`/`rootMode`, Nomad's way, since Nomad sends no
//! group), and a CO's `volume_mount_group` (Kubernetes' fsGroup, through the
//! VOLUME_MOUNT_GROUP node capability) makes the file system the group's, the way the kubelet
//! does it itself for drivers without that capability: every file and directory gets the
//! group and group read/write, directories also group search and setgid (so new files inherit
//! the group). ext4 and xfs take no `gid=` mount option, so ownership is the only way.
//! Everything here is blocking.

use crate::error::{Error, Result};
use crate::params::RootOwnership;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// What mkfs leaves at the root: owned by root, mode 0755, nothing but ext4's `lost+found`.
/// A root in that state has never been used, so setting its owner again after a crash
/// between mkfs and the first chown is safe.
fn pristine(root: &Path) -> Result<bool> {
    let m = std::fs::metadata(root)
        .map_err(|e| Error::io(format!("inspecting {}", root.display()), e))?;
    if m.uid() != 0 || m.gid() != 0 || m.mode() & 0o7777 != 0o755 {
        return Ok(false);
    }
    let rd =
        std::fs::read_dir(root).map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
        if e.file_name() != "lost+found" {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sets the root's owner and mode from `want` when the file system is fresh (just formatted,
/// or still pristine). Returns whether it did.
pub(super) fn set_fresh_root(root: &Path, want: &RootOwnership, formatted: bool) -> Result<bool> {
    if want.is_empty() || !(formatted || pristine(root)?) {
        return Ok(false);
    }
    if want.uid.is_some() || want.gid.is_some() {
        std::os::unix::fs::chown(root, want.uid, want.gid)
            .map_err(|e| Error::io(format!("setting the owner of {}", root.display()), e))?;
    }
    if let Some(mode) = want.mode {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("setting the mode of {}", root.display()), e))?;
    }
    Ok(true)
}

/// Group read/write for everything; search and setgid for directories.
const FILE_BITS: u32 = 0o060;
const DIR_BITS: u32 = 0o2070;

/// The root already carries the group with the bits (the kubelet's `OnRootMismatch` test):
/// then the walk is skipped, so a large volume is not walked at every mount.
fn root_matches(root: &Path, gid: u32) -> Result<bool> {
    let m = std::fs::symlink_metadata(root)
        .map_err(|e| Error::io(format!("inspecting {}", root.display()), e))?;
    Ok(m.gid() == gid && m.mode() & DIR_BITS == DIR_BITS)
}

/// Makes the file system at `root` the group's (see the module doc). Symlinks get the group
/// only (their mode means nothing); mount points below `root` (another file system) are not
/// entered. Returns how many entries it changed.
pub(super) fn apply_group(root: &Path, gid: u32) -> Result<u64> {
    if root_matches(root, gid)? {
        return Ok(0);
    }
    let dev = std::fs::symlink_metadata(root)
        .map_err(|e| Error::io(format!("inspecting {}", root.display()), e))?
        .dev();
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)
            .map_err(|e| Error::io(format!("inspecting {}", p.display()), e))?;
        if m.dev() != dev {
            continue;
        }
        if m.gid() != gid {
            std::os::unix::fs::lchown(&p, None, Some(gid))
                .map_err(|e| Error::io(format!("setting the group of {}", p.display()), e))?;
        }
        let ft = m.file_type();
        if !ft.is_symlink() {
            let bits = if ft.is_dir() { DIR_BITS } else { FILE_BITS };
            // chown clears setuid/setgid of files: take the mode again.
            let mode = std::fs::symlink_metadata(&p)
                .map_err(|e| Error::io(format!("inspecting {}", p.display()), e))?
                .mode()
                & 0o7777;
            if mode & bits != bits {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | bits))
                    .map_err(|e| Error::io(format!("setting the mode of {}", p.display()), e))?;
            }
        }
        if ft.is_dir() {
            let rd = std::fs::read_dir(&p)
                .map_err(|e| Error::io(format!("listing {}", p.display()), e))?;
            for e in rd {
                stack.push(
                    e.map_err(|e| Error::io(format!("listing {}", p.display()), e))?
                        .path(),
                );
            }
        }
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ownership_like_the_kubelet() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("vol");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/f"), b"x").unwrap();
        std::fs::set_permissions(root.join("a/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("f", root.join("a/link")).unwrap();
        assert!(apply_group(&root, 4242).unwrap() >= 5);
        for (p, bits) in [("", DIR_BITS), ("a/b", DIR_BITS), ("a/f", FILE_BITS)] {
            let m = std::fs::metadata(root.join(p)).unwrap();
            assert_eq!(m.gid(), 4242, "{p}");
            assert_eq!(m.mode() & bits, bits, "{p}: {:o}", m.mode());
        }
        assert_eq!(
            std::fs::symlink_metadata(root.join("a/link"))
                .unwrap()
                .gid(),
            4242
        );
        assert_eq!(
            apply_group(&root, 4242).unwrap(),
            0,
            "root matches: no walk"
        );
    }

    #[test]
    fn fresh_root_only() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("fs");
        std::fs::create_dir_all(root.join("lost+found")).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let want = RootOwnership {
            uid: Some(65534),
            gid: Some(65534),
            mode: Some(0o770),
        };
        // Pristine (a crash after mkfs): set.
        assert!(set_fresh_root(&root, &want, false).unwrap());
        let m = std::fs::metadata(&root).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (65534, 65534, 0o770));
        // Used since: never touched again.
        std::os::unix::fs::chown(&root, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("data"), b"x").unwrap();
        assert!(!set_fresh_root(&root, &want, false).unwrap());
        assert!(!set_fresh_root(&root, &RootOwnership::default(), true).unwrap());
    }
}
