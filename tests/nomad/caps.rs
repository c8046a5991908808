//! Nomad's check of a ValidateVolumeCapabilities answer (`compareCapabilities` in
//! plugins/csi/client.go; contract §1.2): every requested capability must be matched by at
//! least one confirmed capability.

use virtdisk_csi::csi::proto as csi;

use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::AccessType;

/// Ok when Nomad accepts the answer, else Nomad's reason.
pub fn compare(
    requested: &[csi::VolumeCapability],
    confirmed: &[csi::VolumeCapability],
) -> Result<(), String> {
    for req in requested {
        let mut reasons = Vec::new();
        let found = confirmed.iter().any(|c| match matches(req, c) {
            Ok(()) => true,
            Err(why) => {
                reasons.push(why);
                false
            }
        });
        if !found {
            return Err(format!(
                "requested capability {req:?} matches no confirmed capability: {}",
                reasons.join("; ")
            ));
        }
    }
    Ok(())
}

fn mode(c: &csi::VolumeCapability) -> i32 {
    c.access_mode.as_ref().map(|m| m.mode).unwrap_or(0)
}

fn matches(req: &csi::VolumeCapability, conf: &csi::VolumeCapability) -> Result<(), String> {
    // The access mode must match unless the plugin confirmed UNKNOWN.
    if mode(conf) != Mode::Unknown as i32 && mode(conf) != mode(req) {
        return Err(format!(
            "access mode {} confirmed for {}",
            mode(conf),
            mode(req)
        ));
    }
    match (&req.access_type, &conf.access_type) {
        (Some(AccessType::Block(_)), Some(AccessType::Block(_))) => Ok(()),
        (Some(AccessType::Mount(r)), Some(AccessType::Mount(c))) => {
            // Equal, so an empty requested fs_type cannot match a confirmed "ext4".
            if r.fs_type != c.fs_type {
                return Err(format!(
                    "fs_type {:?} confirmed for {:?}",
                    c.fs_type, r.fs_type
                ));
            }
            if let Some(f) = r.mount_flags.iter().find(|f| !c.mount_flags.contains(f)) {
                return Err(format!("mount flag {f:?} not confirmed"));
            }
            Ok(())
        }
        (Some(AccessType::Block(_)), _) => Err("mount confirmed for a block request".into()),
        (Some(AccessType::Mount(_)), _) => Err("block confirmed for a mount request".into()),
        (None, _) => Err("a requested capability has no access type".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtdisk_test_support::rpc::{block_cap, mount_cap};

    fn one(c: &csi::VolumeCapability) -> &[csi::VolumeCapability] {
        std::slice::from_ref(c)
    }

    #[test]
    fn nomads_rules() {
        let bare = mount_cap("", Mode::SingleNodeWriter);
        let ext4 = mount_cap("ext4", Mode::SingleNodeWriter);
        let block = block_cap(Mode::SingleNodeWriter);
        assert!(compare(one(&bare), one(&bare)).is_ok());
        // fs_type must be equal: "" does not match "ext4".
        assert!(compare(one(&bare), one(&ext4)).is_err());
        // Access mode: equal, or UNKNOWN confirmed.
        assert!(compare(one(&bare), one(&mount_cap("", Mode::SingleNodeReaderOnly))).is_err());
        assert!(compare(one(&bare), one(&mount_cap("", Mode::Unknown))).is_ok());
        // Block and mount never match each other.
        assert!(compare(one(&bare), one(&block)).is_err());
        assert!(compare(one(&block), one(&bare)).is_err());
        // Requested flags must be a subset of the confirmed ones.
        let mut flagged = bare.clone();
        if let Some(AccessType::Mount(m)) = flagged.access_type.as_mut() {
            m.mount_flags = vec!["noatime".into()];
        }
        assert!(compare(one(&flagged), one(&bare)).is_err());
        assert!(compare(one(&bare), one(&flagged)).is_ok());
        // Each requested capability needs its own match.
        let two = [bare.clone(), block];
        assert!(compare(&two, one(&bare)).is_err());
        assert!(compare(&two, &two).is_ok());
    }
}
