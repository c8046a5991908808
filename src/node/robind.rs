//! A read-only bind mount made in one step. `mount --bind` followed by a read-only remount
//! leaves a writable mount at the target between the two calls; a crash there left it behind
//! a read-only NodePublishVolume, and the retry then met "already published read-write"
//! forever. The new mount API clones the source mount detached, makes the clone read-only and
//! only then attaches it at the target (open_tree + mount_setattr + move_mount, Linux 5.12+).

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

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{} contains NUL", p.display())))
}

/// Binds `source` onto `target` read-only in one step. `Ok(false)` when the kernel lacks the
/// new mount API (nothing was mounted; the caller falls back). Blocking.
pub(super) fn bind_read_only(source: &Path, target: &Path) -> Result<bool> {
    let (src, dst) = (c_path(source)?, c_path(target)?);
    let empty = c"";
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        Error::io(
            format!(
                "{what} for a read-only bind of {} on {}",
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
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
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
