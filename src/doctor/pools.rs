//! Pool directories: writable, and how much room is left.

use super::Check;
use crate::client::size::format as human;
use crate::config::{Config, PoolConfig};
use std::path::{Path, PathBuf};

/// Less free space than this is worth a warning.
const LOW_FREE_BYTES: u64 = 1 << 30;

pub(super) async fn check_pools(cfg: &Config) -> Vec<Check> {
    let pools = cfg.pools.clone();
    crate::exec::blocking(move || Ok(pools.iter().map(check_pool).collect()))
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
