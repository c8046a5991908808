//! The node id: `--node-id`, else the DMI product UUID (inside a libvirt guest it equals the
//! domain UUID, which the controller resolves), else `/etc/machine-id`. Stable across restarts
//! and never failing for lack of DMI.

use crate::error::{Error, Result};
use std::path::Path;

pub(crate) fn resolve(flag: Option<&str>, root: &Path) -> Result<String> {
    if let Some(id) = flag.filter(|s| !s.trim().is_empty()) {
        return Ok(id.trim().to_string());
    }
    let dmi = root.join("sys/class/dmi/id/product_uuid");
    if let Ok(uuid) = std::fs::read_to_string(&dmi) {
        let uuid = uuid.trim().to_ascii_lowercase();
        if !uuid.is_empty() && uuid != "00000000-0000-0000-0000-000000000000" {
            return Ok(uuid);
        }
    }
    let mid = root.join("etc/machine-id");
    match std::fs::read_to_string(&mid) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => Err(Error::Unavailable(format!(
            "cannot determine the node id: no --node-id, no {} and no {}",
            dmi.display(),
            mid.display()
        ))),
    }
}

/// This host is a QEMU/KVM guest (DMI says so): its DMI UUID may be a libvirt domain's.
pub(crate) fn is_qemu_guest(root: &Path) -> bool {
    let dmi = root.join("sys/class/dmi/id");
    ["sys_vendor", "product_name"].iter().any(|f| {
        std::fs::read_to_string(dmi.join(f)).is_ok_and(|v| {
            let v = v.trim();
            v.starts_with("QEMU") || v.contains("KVM")
        })
    })
}

/// The process runs in the host's PID namespace (the initial one has a fixed inode number,
/// PROC_PID_INIT_INO). In a PID namespace of its own, everything the plugin starts dies with
/// that namespace's init.
pub(crate) fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == PROC_PID_INIT_INO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_dmi_machine_id() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert!(resolve(None, r).is_err());
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/machine-id"), "abc123\n").unwrap();
        assert_eq!(resolve(None, r).unwrap(), "abc123");
        std::fs::create_dir_all(r.join("sys/class/dmi/id")).unwrap();
        std::fs::write(r.join("sys/class/dmi/id/product_uuid"), "AAAA-BB\n").unwrap();
        assert_eq!(resolve(None, r).unwrap(), "aaaa-bb");
        assert_eq!(resolve(Some("n1"), r).unwrap(), "n1");
        assert!(!is_qemu_guest(r));
        std::fs::write(r.join("sys/class/dmi/id/sys_vendor"), "QEMU\n").unwrap();
        assert!(is_qemu_guest(r));
    }
}
