//! Pool directories: writable, and how much room is left.

use super::Check;
use crate::client::size::format as human;
use crate::config::{Config, PoolConfig};
use std::path::{Path, PathBuf};

/// Less free space than this is worth a warning.
const LOW_FREE_BYTES: u64 = 1 << 30;

pub(super) async fn check_pools(cfg: &Config) -> Vec<Check> {
    let pools = cfg.pools.clone();
    // Only libvirt's QEMU opens images as another user (local attach runs as the plugin).
    let libvirt = cfg.libvirt.enabled;
    crate::exec::blocking(move || {
        Ok(pools
            .iter()
            .map(|p| match (check_pool(p), libvirt) {
                (c, true) if c.status == super::Status::Ok => qemu_reach(p, c),
                (c, _) => c,
            })
            .collect())
    })
    .await
    .unwrap_or_else(|e| vec![Check::fail("pools", e.to_string(), "report this as a bug")])
}

pub(super) async fn check_data_dir(dir: &Path) -> Check {
    let dir = dir.to_path_buf();
    crate::exec::blocking(move || Ok(data_dir(&dir)))
        .await
        .unwrap_or_else(|e| Check::fail("data dir", e.to_string(), "report this as a bug"))
}

fn data_dir(dir: &Path) -> Check {
    let name = "data dir";
    if dir.is_dir() {
        match probe_write(dir) {
            Ok(()) => Check::ok(name, format!("{} writable", dir.display())),
            Err(e) => Check::warn(
                name,
                format!("{} is not writable: {e}", dir.display()),
                "run as root or give the plugin's user the directory",
            ),
        }
    } else {
        match creatable(dir) {
            Ok(parent) => Check::ok(
                name,
                format!(
                    "{} does not exist yet; it is created at start ({} is writable)",
                    dir.display(),
                    parent.display()
                ),
            ),
            Err(e) => Check::warn(
                name,
                e,
                format!("create {} or pass --data-dir", dir.display()),
            ),
        }
    }
}

fn check_pool(p: &PoolConfig) -> Check {
    let name = format!("pool {}", p.name);
    let dir = &p.path;
    if !dir.exists() {
        return match creatable(dir) {
            Ok(parent) => Check::ok(
                name,
                format!(
                    "{} does not exist yet; it is created at start ({} is writable, {} free)",
                    dir.display(),
                    parent.display(),
                    free_text(&parent)
                ),
            ),
            Err(e) => Check::fail(
                name,
                e,
                format!(
                    "mkdir -p {} (on the storage meant for images)",
                    dir.display()
                ),
            ),
        };
    }
    if !dir.is_dir() {
        return Check::fail(
            name,
            format!("{} is not a directory", dir.display()),
            "point the pool's path at a directory",
        );
    }
    // Write where the plugin writes: its records directory when it exists.
    let target = [dir.join("volumes"), dir.to_path_buf()]
        .into_iter()
        .find(|d| d.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    if let Err(e) = probe_write(&target) {
        return Check::fail(
            name,
            format!("{} is not writable: {e}", target.display()),
            format!(
                "chown/chmod {} for the plugin's user, or remount it read-write",
                dir.display()
            ),
        );
    }
    let (free, total) = match space(dir) {
        Ok(s) => s,
        Err(e) => {
            return Check::warn(
                name,
                format!("{} writable, free space unknown: {e}", dir.display()),
                "check the filesystem holding the pool",
            )
        }
    };
    let limit = p
        .capacity_bytes
        .map(|c| format!(", capped at {}", human(c)))
        .unwrap_or_default();
    let detail = format!(
        "{} writable, {} free of {} ({}{limit})",
        dir.display(),
        human(free),
        human(total),
        p.format.as_str()
    );
    if free < LOW_FREE_BYTES || (total > 0 && free * 20 < total) {
        Check::warn(
            name,
            format!("{detail}: space is low"),
            "free space or grow the filesystem; thin images fail writes when it fills",
        )
    } else {
        Check::ok(name, detail)
    }
}

/// The users libvirt runs QEMU as by default (qemu.conf `user`): Debian and Ubuntu, then
/// Fedora, RHEL and SUSE.
const QEMU_USERS: [&str; 2] = ["libvirt-qemu", "qemu"];

/// `ok` (the pool's check), or a warning when the user QEMU runs as cannot reach into the
/// pool: a directory above it (or the pool itself) that this user may not search, by its mode
/// bits. Publishing would then fail in libvirt with "Cannot access storage file … Permission
/// denied". ACLs are not read (one may grant what the mode does not): a warning, not a failure.
fn qemu_reach(p: &PoolConfig, ok: Check) -> Check {
    let Some(user) = QEMU_USERS
        .iter()
        .find_map(|n| nix::unistd::User::from_name(n).ok().flatten())
    else {
        return ok;
    };
    let stat = |d: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d)
            .ok()
            .map(|m| (m.mode(), m.uid(), m.gid()))
    };
    let groups = nix::unistd::getgrouplist(
        &std::ffi::CString::new(user.name.as_str()).unwrap_or_default(),
        user.gid,
    )
    .unwrap_or_else(|_| vec![user.gid]);
    let groups: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    // QEMU opens the images in `images/` (made with the plugin's umask), by the path as
    // written and, through a symlink, by the real one: every directory on both ways counts.
    let images = p.path.join("images");
    let real = std::fs::canonicalize(&images)
        .or_else(|_| std::fs::canonicalize(&p.path))
        .ok();
    let closed = std::iter::once(images)
        .chain(real)
        .find_map(|path| closed_ancestor(&path, user.uid.as_raw(), &groups, stat));
    match closed {
        None => ok,
        Some(dir) => Check::warn(
            ok.name,
            format!(
                "{}; but user {} (QEMU, as libvirt runs it) cannot search {}: publishing a \
                 volume of this pool would fail with \"Permission denied\"",
                ok.detail,
                user.name,
                dir.display()
            ),
            format!(
                "chmod o+x {} (or grant {} search by group or ACL)",
                dir.display(),
                user.name
            ),
        ),
    }
}

/// The first of `path` and its ancestors (from the root down) that user `uid` (in `groups`)
/// may not search by its mode bits (`stat`: mode, owner, group; `None` when it does not
/// exist, then it is not judged). Root searches everything.
fn closed_ancestor(
    path: &Path,
    uid: u32,
    groups: &[u32],
    stat: impl Fn(&Path) -> Option<(u32, u32, u32)>,
) -> Option<PathBuf> {
    if uid == 0 {
        return None;
    }
    let mut dirs: Vec<&Path> = path.ancestors().collect();
    dirs.reverse();
    dirs.into_iter().find_map(|d| {
        let (mode, owner, group) = stat(d)?;
        let bit = if owner == uid {
            0o100
        } else if groups.contains(&group) {
            0o010
        } else {
            0o001
        };
        (mode & bit == 0).then(|| d.to_path_buf())
    })
}

fn probe_write(dir: &Path) -> std::io::Result<()> {
    let f = tempfile::Builder::new()
        .prefix(".doctor-")
        .tempfile_in(dir)?;
    drop(f);
    Ok(())
}

/// The nearest existing ancestor, if the plugin could create `dir` under it.
fn creatable(dir: &Path) -> Result<PathBuf, String> {
    let mut cur = dir.parent();
    while let Some(p) = cur {
        if p.exists() {
            return match nix::unistd::access(p, nix::unistd::AccessFlags::W_OK) {
                Ok(()) => Ok(p.to_path_buf()),
                Err(e) => Err(format!(
                    "{} does not exist and {} is not writable ({e})",
                    dir.display(),
                    p.display()
                )),
            };
        }
        cur = p.parent();
    }
    Err(format!("{} has no existing ancestor", dir.display()))
}

fn space(dir: &Path) -> Result<(u64, u64), String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| e.to_string())?;
    let f = st.fragment_size() as u64;
    Ok((st.blocks_available() as u64 * f, st.blocks() as u64 * f))
}

fn free_text(dir: &Path) -> String {
    space(dir)
        .map(|(free, _)| human(free))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn pool(path: PathBuf) -> PoolConfig {
        PoolConfig {
            name: "p".into(),
            path,
            format: Default::default(),
            topology: Default::default(),
            capacity_bytes: Some(1 << 30),
            overcommit: true,
            hosts: Vec::new(),
        }
    }

    #[test]
    fn the_first_directory_qemu_cannot_search_is_named() {
        // path → (mode, owner, group)
        let modes = |m: &[(&str, u32, u32, u32)]| {
            let m: Vec<(PathBuf, (u32, u32, u32))> = m
                .iter()
                .map(|(p, mode, u, g)| (PathBuf::from(p), (*mode, *u, *g)))
                .collect();
            move |d: &Path| m.iter().find(|(p, _)| p == d).map(|(_, s)| *s)
        };
        let tree = modes(&[
            ("/", 0o755, 0, 0),
            ("/srv", 0o700, 0, 0),
            ("/srv/pools", 0o755, 0, 0),
        ]);
        let qemu = (64055, [64055]);
        assert_eq!(
            closed_ancestor(Path::new("/srv/pools/a"), qemu.0, &qemu.1, &tree),
            Some(PathBuf::from("/srv"))
        );
        // By group, by owner, for root: searchable.
        let by_group = modes(&[("/", 0o755, 0, 0), ("/srv", 0o710, 0, 64055)]);
        assert_eq!(
            closed_ancestor(Path::new("/srv/p"), qemu.0, &qemu.1, &by_group),
            None
        );
        let by_owner = modes(&[("/", 0o755, 0, 0), ("/srv", 0o700, 64055, 0)]);
        assert_eq!(
            closed_ancestor(Path::new("/srv/p"), qemu.0, &qemu.1, &by_owner),
            None
        );
        assert_eq!(closed_ancestor(Path::new("/srv/p"), 0, &[0], &tree), None);
        // A group bit does not help a user outside the group.
        let other_group = modes(&[("/", 0o755, 0, 0), ("/srv", 0o750, 0, 5)]);
        assert_eq!(
            closed_ancestor(Path::new("/srv/p"), qemu.0, &qemu.1, &other_group),
            Some(PathBuf::from("/srv"))
        );
    }

    #[test]
    fn writable_missing_and_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let c = check_pool(&pool(dir.path().to_path_buf()));
        assert_ne!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("writable"), "{c:?}");
        assert!(c.detail.contains("capped at 1 GiB"), "{c:?}");
        let c = check_pool(&pool(dir.path().join("a/b")));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("created at start"));
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(check_pool(&pool(file)).status, Status::Fail);
        // Nothing was left behind by the write probe.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
