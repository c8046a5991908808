//! A publish's bind mount made in one step, read-only when asked and a slave of the staging
//! mount's peer group. `mount --bind` followed by a remount leaves the bind as it was cloned
//! (writable, a peer of the staging mount) between the calls; a crash there left a writable
//! mount behind a read-only NodePublishVolume, and the retry then met "already published
//! read-write" forever. The new mount API clones the source mount detached, sets the clone's
//! attributes and only then attaches it at the target (open_tree + mount_setattr +
//! move_mount, Linux 5.12+).
//!
//! A slave, not a peer: the mount table then tells a publish from the staging mount it was
//! bound from (see `MountTable::role`), and a mount made inside one consumer's target never
//! propagates back into the staging mount or the other targets.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct mount_attr` of <linux/mount.h>.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 1;
const MS_SLAVE: u64 = 1 << 19;

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{} contains NUL", p.display())))
}

/// Binds `source` onto `target` in one step: a slave of `source`'s peer group, read-only when
/// `read_only`. `Ok(false)` when the kernel lacks the new mount API (nothing was mounted; the
/// caller falls back). Blocking.
pub(super) fn bind_slave(source: &Path, target: &Path, read_only: bool) -> Result<bool> {
    let (src, dst) = (c_path(source)?, c_path(target)?);
    let empty = c"";
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        Error::io(
            format!(
                "{what} for a bind of {} on {}",
                source.display(),
                target.display()
            ),
            e,
        )
    };
    let unsupported = || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
    // SAFETY: plain syscalls on NUL-terminated paths that outlive the calls.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return if unsupported() {
            Ok(false)
        } else {
            Err(fail("open_tree"))
        };
    }
    // SAFETY: open_tree returned a new file descriptor that nothing else owns. Closing it
    // without move_mount dissolves the detached clone.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = MountAttr {
        attr_set: if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: MS_SLAVE,
        userns_fd: 0,
    };
    // SAFETY: `attr` lives across the call and its size is passed along.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return if unsupported() {
            Ok(false)
        } else {
            Err(fail("mount_setattr"))
        };
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(fail("move_mount"));
    }
    Ok(true)
}
