//! Loop devices over FUSE export files, via losetup.

use crate::error::{Error, Result};
use crate::exec;
use crate::node::mountinfo::MountTable;
use crate::node::Sysfs;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Binds a free loop device to `file`; returns its name (`loop3`). Direct I/O stays off: the
/// FUSE export does not take O_DIRECT.
pub(super) async fn attach(
    file: &Path,
    readonly: bool,
    sector_size: Option<u32>,
) -> Result<String> {
    let mut args: Vec<OsString> = vec!["-f".into(), "--show".into(), "--direct-io=off".into()];
    if readonly {
        args.push("-r".into());
    }
    if let Some(size) = sector_size {
        args.push("-b".into());
        args.push(size.to_string().into());
    }
    args.push(file.into());
    let out = exec::run("losetup", args).await?;
    let dev = out.stdout.trim();
    dev.strip_prefix("/dev/")
        .filter(|n| n.starts_with("loop") && !n.contains('/'))
        .map(str::to_string)
        .ok_or_else(|| Error::internal(format!("losetup printed an unexpected device {dev:?}")))
}

/// Who uses the device on this host: mounts of it, bind mounts of its node (block volumes),
/// or an exclusive opener (a filesystem mounted in another mount namespace). Blocking.
pub(super) fn users(sysfs: &Sysfs, name: &str) -> Result<Vec<String>> {
    let Some(dev) = sysfs.device(name) else {
        return Ok(vec![]);
    };
    let table = MountTable::read()?;
    let mut users: Vec<String> = table
        .of_device(dev.dev())
        .iter()
        .map(|m| m.mount_point.display().to_string())
        .collect();
    for m in &table.entries {
        if matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") && m.root != Path::new("/") {
            if let Ok(meta) = std::fs::metadata(&m.mount_point) {
                if meta.file_type().is_block_device()
                    && (libc::major(meta.rdev()), libc::minor(meta.rdev())) == dev.dev()
                {
                    users.push(m.mount_point.display().to_string());
                }
            }
        }
    }
    if users.is_empty() {
        let node = sysfs.dev_path(name);
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&node)
        {
            if e.raw_os_error() == Some(libc::EBUSY) {
                users.push(format!("an exclusive holder of {}", node.display()));
            }
        }
    }
    Ok(users)
}

/// Detaches the loop device and confirms it is unbound. The kernel defers a detach while a
/// process holds the device open: that is reported, never waited out.
pub(super) async fn detach(sysfs: &Sysfs, name: &str, expected_backing: &Path) -> Result<()> {
    let node: PathBuf = sysfs.dev_path(name);
    let res = exec::run("losetup", [OsString::from("-d"), node.clone().into()]).await;
    let start = Instant::now();
    loop {
        let (s, n) = (sysfs.clone(), name.to_string());
        let backing = exec::blocking(move || Ok(s.loop_backing_file(&n))).await?;
        if backing.as_deref() != Some(expected_backing) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(2) {
            res?;
            return Err(Error::FailedPrecondition(format!(
                "{} is still held open by a process; it detaches when that process closes it; \
                 retry then",
                node.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes the loop device re-read its backing file's size.
pub(super) async fn refresh_capacity(sysfs: &Sysfs, name: &str) -> Result<()> {
    exec::run(
        "losetup",
        [OsString::from("-c"), sysfs.dev_path(name).into()],
    )
    .await
    .map(drop)
}
