//! External programs the plugin runs, found on PATH (as `exec::run` finds them), with versions.

use super::Check;
use crate::config::Mode;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a program is: on PATH, or only in an sbin directory PATH lacks (common under service
/// managers and Nomad's exec driver).
pub(super) enum Found {
    OnPath(PathBuf),
    OffPath(PathBuf),
    Missing,
}

pub(super) fn find(program: &str) -> Found {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Found::OnPath(candidate);
        }
    }
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let candidate = Path::new(dir).join(program);
        if is_executable(&candidate) {
            return Found::OffPath(candidate);
        }
    }
    Found::Missing
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// First non-empty line the program prints for `args` (stdout, else stderr); None if it cannot
/// run or takes longer than 10 s.
pub(super) async fn first_line(program: &Path, args: &[&str]) -> Option<String> {
    let run = crate::exec::run(program.to_str()?, args);
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .ok()?
        .ok()?;
    out.stdout
        .lines()
        .chain(out.stderr.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// One program check: present (with its version), off PATH (WARN), or missing.
pub(super) async fn program(
    program: &str,
    version_args: &[&str],
    required: bool,
    why: &str,
    package: &str,
) -> Check {
    let name = program.to_string();
    match find(program) {
        Found::OnPath(path) => {
            let version = if version_args.is_empty() {
                "present".to_string()
            } else {
                first_line(&path, version_args)
                    .await
                    .unwrap_or_else(|| "version unknown".into())
            };
            Check::ok(name, format!("{} ({version})", path.display()))
        }
        Found::OffPath(path) => Check::warn(
            name,
            format!("{} exists but is not on PATH; {why}", path.display()),
            format!(
                "add {} to the plugin's PATH",
                path.parent().unwrap_or(Path::new("/")).display()
            ),
        ),
        Found::Missing => Check::missing(
            required,
            name,
            format!("not installed; {why}"),
            format!("apt-get install {package} (or your distribution's equivalent)"),
        ),
    }
}

pub(super) async fn controller_tools(mode: Mode) -> Vec<Check> {
    vec![
        program(
            "qemu-img",
            &["--version"],
            true,
            "volumes, resizes and snapshots use it",
            "qemu-utils",
        )
        .await,
        program(
            "qemu-storage-daemon",
            &["--version"],
            mode == Mode::Monolith,
            "local attach (a volume used on this host itself) exports images with it",
            "qemu-system-common",
        )
        .await,
    ]
}

pub(super) async fn node_tools(mode: Mode) -> Vec<Check> {
    let local_attach = mode == Mode::Monolith;
    vec![
        program(
            "mkfs.ext4",
            &["-V"],
            true,
            "ext4 volumes are formatted with it",
            "e2fsprogs",
        )
        .await,
        program(
            "resize2fs",
            &[],
            false,
            "ext4 volumes are grown with it",
            "e2fsprogs",
        )
        .await,
        program(
            "mkfs.xfs",
            &["-V"],
            false,
            "xfs volumes are formatted with it",
            "xfsprogs",
        )
        .await,
        program(
            "xfs_growfs",
            &["-V"],
            false,
            "xfs volumes are grown with it",
            "xfsprogs",
        )
        .await,
        program(
            "blkid",
            &["-V"],
            true,
            "a disk is formatted only when blkid finds nothing on it",
            "util-linux",
        )
        .await,
        program(
            "mount",
            &["--version"],
            true,
            "volumes are mounted with it",
            "mount",
        )
        .await,
        program(
            "umount",
            &["--version"],
            true,
            "volumes are unmounted with it",
            "mount",
        )
        .await,
        program(
            "losetup",
            &["--version"],
            local_attach,
            "local attach turns exported images into block devices with it",
            "util-linux",
        )
        .await,
    ]
}
