//! Node-side checks: privileges, sysfs (where disks are found by serial), mountinfo (where
//! mount state is read), the node id, drivers, and the devices local attach uses.

use super::Check;
use crate::config::Mode;
use std::path::Path;

pub(super) async fn node_checks(mode: Mode) -> Vec<Check> {
    crate::exec::blocking(move || Ok(blocking_checks(mode, Path::new("/"))))
        .await
        .unwrap_or_else(|e| vec![Check::fail("host", e.to_string(), "report this as a bug")])
}

/// Blocking (reads sysfs and procfs). `root` is `/` except in tests.
pub(super) fn blocking_checks(mode: Mode, root: &Path) -> Vec<Check> {
    let mut checks = vec![
        privileges(),
        mountinfo(root),
        sysfs(root),
        node_id(mode, root),
    ];
    if mode == Mode::Node {
        checks.push(driver(
            root,
            "virtio_scsi",
            "bus=scsi disks (the default bus)",
        ));
        checks.push(driver(root, "virtio_blk", "bus=virtio disks"));
    }
    if mode == Mode::Monolith {
        for (dev, what, module) in [
            (
                "dev/fuse",
                "local attach exports images through FUSE",
                "fuse",
            ),
            (
                "dev/loop-control",
                "local attach maps exports to loop devices",
                "loop",
            ),
        ] {
            let path = root.join(dev);
            checks.push(if path.exists() {
                Check::ok(format!("/{dev}"), "present")
            } else {
                Check::warn(
                    format!("/{dev}"),
                    format!("missing; {what}"),
                    format!("modprobe {module}"),
                )
            });
        }
    }
    checks
}

fn privileges() -> Check {
    if nix::unistd::geteuid().is_root() {
        Check::ok(
            "root",
            "running as root (mount and mkfs need CAP_SYS_ADMIN)",
        )
    } else {
        Check::fail(
            "root",
            "not running as root: the node service mounts and formats disks",
            "run the node plugin as root (Nomad: raw_exec or a privileged task; Kubernetes: privileged: true)",
        )
    }
}

fn mountinfo(root: &Path) -> Check {
    let path = root.join("proc/self/mountinfo");
    match std::fs::read_to_string(&path) {
        Ok(text) => Check::ok(
            "mountinfo",
            format!(
                "{} readable ({} mounts)",
                path.display(),
                text.lines().count()
            ),
        ),
        Err(e) => Check::fail(
            "mountinfo",
            format!("cannot read {}: {e}", path.display()),
            "mount /proc (the plugin reads mount state from it)",
        ),
    }
}

/// /sys/block must be readable, and so must the serials the node matches disks by.
fn sysfs(root: &Path) -> Check {
    let block = root.join("sys/block");
    let entries = match std::fs::read_dir(&block) {
        Ok(e) => e,
        Err(e) => {
            return Check::fail(
                "sysfs",
                format!("cannot read {}: {e}", block.display()),
                "mount sysfs at /sys (read-write for SCSI rescans)",
            )
        }
    };
    let (mut disks, mut unreadable) = (0, Vec::new());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let serial = if name.starts_with("vd") {
            entry.path().join("serial")
        } else if name.starts_with("sd") {
            entry.path().join("device/vpd_pg80")
        } else {
            continue;
        };
        disks += 1;
        if std::fs::read(&serial).is_err() {
            unreadable.push(name);
        }
    }
    if unreadable.is_empty() {
        Check::ok(
            "sysfs",
            format!(
                "{} readable; serials of {disks} virtio/SCSI disk(s) readable",
                block.display()
            ),
        )
    } else {
        Check::warn(
            "sysfs",
            format!("cannot read the serial of {}", unreadable.join(", ")),
            "run as root with /sys mounted from the host (not a private sysfs)",
        )
    }
}

fn node_id(mode: Mode, root: &Path) -> Check {
    let dmi = root.join("sys/class/dmi/id/product_uuid");
    let has_dmi = std::fs::read_to_string(&dmi)
        .map(|s| !s.trim().is_empty() && !s.trim().chars().all(|c| c == '0' || c == '-'))
        .unwrap_or(false);
    match crate::nodeid::resolve(None, root) {
        Ok(id) if has_dmi => Check::ok(
            "node id",
            format!("{id} (DMI product_uuid: inside a libvirt guest this is the domain UUID)"),
        ),
        Ok(id) if mode == Mode::Monolith => Check::ok(
            "node id",
            format!("{id} (from /etc/machine-id: no DMI here; local attach serves this id)"),
        ),
        Ok(id) => Check::warn(
            "node id",
            format!(
                "{id} comes from /etc/machine-id: {} is missing, and no libvirt domain has this id",
                dmi.display()
            ),
            "pass --node-id <libvirt domain name or UUID> to the node plugin",
        ),
        Err(e) => Check::fail(
            "node id",
            e.to_string(),
            "pass --node-id, or run inside a VM that exposes DMI",
        ),
    }
}

/// A kernel driver, loaded or built in.
fn driver(root: &Path, module: &str, what: &str) -> Check {
    let loaded = root.join("sys/module").join(module).exists();
    let builtin = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| {
            let release = u.release().to_string_lossy().into_owned();
            std::fs::read_to_string(
                root.join("lib/modules")
                    .join(release)
                    .join("modules.builtin"),
            )
            .ok()
        })
        .map(|text| text.lines().any(|l| l.ends_with(&format!("/{module}.ko"))))
        .unwrap_or(false);
    if loaded || builtin {
        Check::ok(
            module,
            format!(
                "driver available ({})",
                if loaded { "loaded" } else { "built in" }
            ),
        )
    } else {
        Check::warn(
            module,
            format!("driver not loaded; {what} will not appear"),
            format!("modprobe {module}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_tree_without_dmi() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/self")).unwrap();
        std::fs::write(
            r.join("proc/self/mountinfo"),
            "1 0 8:1 / / rw - ext4 /dev/sda rw\n",
        )
        .unwrap();
        std::fs::create_dir_all(r.join("sys/block/vda")).unwrap();
        std::fs::write(r.join("sys/block/vda/serial"), "vd-0123456789abcdef").unwrap();
        std::fs::create_dir_all(r.join("sys/block/sda/device")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/machine-id"), "abc\n").unwrap();
        let checks = blocking_checks(Mode::Node, r);
        let by = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(by("mountinfo").status, super::super::Status::Ok);
        // sda has no vpd_pg80: reported, not fatal.
        assert_eq!(by("sysfs").status, super::super::Status::Warn);
        assert!(by("sysfs").detail.contains("sda"));
        assert_eq!(by("node id").status, super::super::Status::Warn);
        assert_eq!(by("virtio_scsi").status, super::super::Status::Warn);
        std::fs::create_dir_all(r.join("sys/class/dmi/id")).unwrap();
        std::fs::write(r.join("sys/class/dmi/id/product_uuid"), "AB-CD\n").unwrap();
        let checks = blocking_checks(Mode::Node, r);
        let id = checks.iter().find(|c| c.name == "node id").unwrap();
        assert_eq!(id.status, super::super::Status::Ok);
        assert!(id.detail.starts_with("ab-cd"));
    }
}
