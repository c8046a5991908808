//! Filesystems and mounts through the system tools (blkid, mkfs, mount, umount, resize2fs,
//! xfs_growfs), run through `exec` so nothing blocks the runtime.

use crate::error::{Error, Kind, Result};
use crate::exec;
use std::ffi::OsString;
use std::path::Path;

/// What a device holds, by `blkid -p` (a low-level probe that ignores the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    /// No signature at all: safe to format.
    Blank,
    Filesystem(String),
    /// A partition table, RAID member, LUKS…: never formatted, never mounted.
    Other(String),
}

pub(crate) fn parse_blkid_export(out: &str) -> Content {
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    if let Some(pt) = get("PTTYPE") {
        return Content::Other(format!("a {pt} partition table"));
    }
    match (get("TYPE"), get("USAGE")) {
        (Some(t), Some(u)) if u == "filesystem" => Content::Filesystem(t),
        (Some(t), _) => Content::Other(t),
        (None, _) => Content::Other("an unrecognised signature".into()),
    }
}

pub(crate) async fn probe(dev: &Path) -> Result<Content> {
    let args: Vec<OsString> = vec!["-p".into(), "-o".into(), "export".into(), dev.into()];
    let out = exec::run_unchecked("blkid", args).await?;
    match out.code {
        Some(0) => Ok(parse_blkid_export(&out.stdout)),
        // 2: nothing found.
        Some(2) => Ok(Content::Blank),
        // 8: several conflicting signatures.
        Some(8) => Ok(Content::Other("several conflicting signatures".into())),
        _ => Err(exec::tool_error("blkid", &out)),
    }
}

/// Creates a filesystem on a device the caller has checked is blank. Discards are skipped:
/// a fresh image is unallocated already, and discarding through layers is slow.
pub(crate) async fn mkfs(dev: &Path, fs_type: &str) -> Result<()> {
    let d: OsString = dev.into();
    match fs_type {
        // -m 0: no root reserve on a data volume; -F: whole device, no prompt.
        "ext4" => exec::run(
            "mkfs.ext4",
            [
                "-q".into(),
                "-F".into(),
                "-m".into(),
                "0".into(),
                "-E".into(),
                "nodiscard".into(),
                d,
            ],
        )
        .await
        .map(drop),
        // No -f: mkfs.xfs itself refuses a device that holds a filesystem.
        "xfs" => exec::run("mkfs.xfs", ["-q".into(), "-K".into(), d])
            .await
            .map(drop),
        other => Err(Error::invalid(format!(
            "cannot create a {other:?} filesystem: use ext4 or xfs"
        ))),
    }
}

pub(crate) async fn mount(
    dev: &Path,
    target: &Path,
    fs_type: &str,
    options: &[String],
) -> Result<()> {
    let mut args: Vec<OsString> = vec!["-t".into(), fs_type.into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(",").into());
    }
    args.push(dev.into());
    args.push(target.into());
    exec::run("mount", args).await.map(drop)
}

pub(crate) async fn bind(source: &Path, target: &Path) -> Result<()> {
    exec::run(
        "mount",
        [OsString::from("--bind"), source.into(), target.into()],
    )
    .await
    .map(drop)
}

/// A read-only bind mount (the filesystem stays writable elsewhere), made read-only before it
/// appears at `target` (see `robind`); on kernels without the new mount API, bind and then
/// remount, never leaving a writable mount behind if the remount fails.
pub(crate) async fn bind_read_only(source: &Path, target: &Path) -> Result<()> {
    let (s, t) = (source.to_path_buf(), target.to_path_buf());
    if exec::blocking(move || super::robind::bind_read_only(&s, &t)).await? {
        return Ok(());
    }
    bind(source, target).await?;
    if let Err(e) = remount_read_only(target).await {
        let _ = unmount(target).await;
        return Err(e);
    }
    Ok(())
}

/// A bind mount's own read-only flag (the filesystem stays writable elsewhere).
pub(crate) async fn remount_read_only(target: &Path) -> Result<()> {
    exec::run(
        "mount",
        [
            OsString::from("-o"),
            "remount,bind,ro".into(),
            target.into(),
        ],
    )
    .await
    .map(drop)
}

/// Shared, so every bind of it joins its peer group and can be counted at unstage.
pub(crate) async fn make_shared(target: &Path) -> Result<()> {
    exec::run("mount", [OsString::from("--make-shared"), target.into()])
        .await
        .map(drop)
}

/// Unmounts `target` by the system call (umount2), so the failure is told by its errno: a
/// mount still in use (EBUSY) is FAILED_PRECONDITION, whatever the host's language.
pub(crate) async fn unmount(target: &Path) -> Result<()> {
    let t = target.to_path_buf();
    exec::blocking(move || {
        nix::mount::umount2(&t, nix::mount::MntFlags::empty()).map_err(|errno| {
            let advice = if errno == nix::errno::Errno::EBUSY {
                " (a process still uses it; stop it and retry)"
            } else {
                ""
            };
            Error::sys(format!("unmounting {}{advice}", t.display()), errno)
        })
    })
    .await
}

/// Grows a mounted filesystem to the size of its device.
pub(crate) async fn grow(fs_type: &str, dev: &Path, mount_point: &Path) -> Result<()> {
    match fs_type {
        "ext4" | "ext3" | "ext2" => exec::run("resize2fs", [OsString::from(dev)])
            .await
            .map(drop)
            .map_err(|e| match e.kind() {
                // The kernel demands CAP_SYS_RESOURCE for ext4 online resize.
                Some(Kind::PermissionDenied) => Error::FailedPrecondition(format!(
                    "the kernel refused to grow the ext4 filesystem on {}: the plugin needs \
                     CAP_SYS_RESOURCE for that (run it privileged): {e}",
                    dev.display()
                )),
                _ => e,
            }),
        "xfs" => exec::run("xfs_growfs", [OsString::from(mount_point)])
            .await
            .map(drop),
        other => Err(Error::FailedPrecondition(format!(
            "cannot grow a {other} filesystem online; only ext4 and xfs"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output() {
        assert_eq!(
            parse_blkid_export(
                "DEVNAME=/dev/loop0\nUUID=x\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Content::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/sda\nPTUUID=x\nPTTYPE=gpt\n"),
            Content::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid_export("TYPE=crypto_LUKS\nUSAGE=crypto\n"),
            Content::Other("crypto_LUKS".into())
        );
    }
}
