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
    }
}
