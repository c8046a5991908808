//! Which mount option a file system refuses, and the kernel's words for why. mount(8) says
//! only "wrong fs type, bad option, bad superblock … or other error" (exit 32) for all of
//! these; the kernel's file system context (fsopen + fsconfig, Linux 5.2+) parses one option at
//! a time, mounting nothing, and logs the reason. A failed stage mount is explained with it:
//! an option the file system refuses is the caller's to fix (INVALID_ARGUMENT).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;

/// Options mount(8) handles itself (per-mount and superblock flags, its own bookkeeping):
/// never passed to the file system's parser, so never asked about here (mount(8),
/// "FILESYSTEM-INDEPENDENT MOUNT OPTIONS").
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "noatime",
    "auto",
    "noauto",
    "defaults",
    "dev",
    "nodev",
    "diratime",
    "nodiratime",
    "dirsync",
    "exec",
    "noexec",
    "group",
    "nogroup",
    "iversion",
    "noiversion",
    "mand",
    "nomand",
    "_netdev",
    "nofail",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "suid",
    "nosuid",
    "silent",
    "loud",
    "owner",
    "noowner",
    "ro",
    "rw",
    "sync",
    "user",
    "nouser",
    "users",
    "nousers",
    "symfollow",
    "nosymfollow",
];

/// Whether mount(8) keeps `flag` to itself (see [`MOUNT_OPTIONS`], `x-*`, `comment=`).
fn handled_by_mount(flag: &str) -> bool {
    let name = flag.split_once('=').map_or(flag, |(n, _)| n);
    let lower = name.to_ascii_lowercase();
    MOUNT_OPTIONS.contains(&lower.as_str()) || lower.starts_with("x-") || lower == "comment"
}

/// The first of `flags` that `fs_type` refuses, with the kernel's reason, e.g.
/// `("commit=soon", "ext4: Bad value for 'commit'")`. None when every option parses, or the
/// kernel cannot say (no fsopen: Linux < 5.2, or not allowed). Blocking.
pub(crate) fn refused(fs_type: &str, flags: &[String]) -> Option<(String, String)> {
    let fs = CString::new(fs_type).ok()?;
    // SAFETY: fsopen with a NUL-terminated name that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fs.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fsopen returned a new file descriptor that nothing else owns.
    let ctx = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    for flag in flags.iter().filter(|f| !handled_by_mount(f)) {
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (flag.as_str(), None),
        };
        let (Ok(key), Ok(value)) = (CString::new(key), value.map(CString::new).transpose()) else {
            continue;
        };
        let (cmd, value_ptr) = match &value {
            Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
            None => (FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: fsconfig on our context with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                ctx.as_raw_fd(),
                cmd,
                key.as_ptr(),
                value_ptr,
                0,
            )
        };
        if rc < 0 {
            let errno = std::io::Error::last_os_error();
            let said = kernel_log(&ctx);
            let why = if said.is_empty() {
                errno.to_string()
            } else {
                said.join("; ")
            };
            return Some((flag.clone(), why));
        }
    }
    None
}

/// What the kernel logged on a file system context: lines `e <message>` (errors), `w …`,
/// `i …`; read until it has no more.
fn kernel_log(ctx: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..16 {
        // SAFETY: reading into a buffer we own, its length passed along.
        let n = unsafe { libc::read(ctx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf[..n as usize])
            .trim()
            .to_string();
        let text = line
            .split_once(' ')
            .map_or(line.as_str(), |(_, rest)| rest)
            .to_string();
        out.push(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_are_not_the_file_systems() {
        for f in ["noatime", "RO", "x-systemd.automount", "comment=x", "nodev"] {
            assert!(handled_by_mount(f), "{f}");
        }
        for f in [
            "discard",
            "commit=30",
            "data=ordered",
            "nouuid",
            "no_such_option",
        ] {
            assert!(!handled_by_mount(f), "{f}");
        }
    }

    /// The real kernel's parser (fsopen needs CAP_SYS_ADMIN: root).
    #[test]
    fn the_kernel_says_which_option_it_refuses() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: fsopen needs root");
            return;
        }
        let flags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            refused(
                "ext4",
                &flags(&["noatime", "discard", "commit=30", "data=ordered"])
            ),
            None
        );
        let (flag, why) = refused("ext4", &flags(&["noatime", "no_such_option"])).unwrap();
        assert_eq!(flag, "no_such_option");
        assert!(why.contains("no_such_option"), "{why}");
        let (flag, why) = refused("ext4", &flags(&["commit=soon"])).unwrap();
        assert_eq!(flag, "commit=soon");
        assert!(why.contains("commit"), "{why}");
        assert_eq!(refused("xfs", &flags(&["nouuid", "noatime"])), None);
        assert!(refused("xfs", &flags(&["data=journal"])).is_some());
    }
}
