//! The topology a node reports (NodeGetInfo `accessible_topology`): the segments its hypervisor
//! host hands it in SMBIOS OEM strings, over the `[node] topology` of the config.
//!
//! Inside a libvirt guest the host tells the node where it runs without any per-VM setting in
//! the node plugin: the domain XML carries OEM strings (SMBIOS type 11), e.g.
//!
//! ```xml
//! <os><smbios mode='sysinfo'/></os>
//! <sysinfo type='smbios'>
//!   <oemStrings><entry>topology.virtdisk.csi.io/host=hv1</entry></oemStrings>
//! </sysinfo>
//! ```
//!
//! and the guest kernel exposes each SMBIOS structure under
//! `/sys/firmware/dmi/entries/<type>-<n>/raw` (no dmidecode needed). Every OEM string of the form
//! `topology.virtdisk.csi.io/<name>=<value>` becomes a segment; other OEM strings are left
//! alone. The table is built when the VM starts: after a live migration it still names the
//! host the VM booted on, until the VM is restarted from a definition that names the new one.

use crate::config::{check_topology_value, Topology};
use std::path::Path;

/// OEM strings with this prefix are topology segments (`<prefix><name>=<value>`).
pub(crate) const OEM_PREFIX: &str = "topology.virtdisk.csi.io/";

/// SMBIOS structure type of OEM strings.
const OEM_STRINGS: u8 = 11;

/// The node's segments: `configured` overlaid with the OEM-string segments found under
/// `sysfs_root` (those win). Blocking (reads sysfs).
pub(crate) fn segments(sysfs_root: &Path, configured: &Topology) -> Topology {
    let mut out = configured.clone();
    out.extend(from_smbios(sysfs_root));
    out
}

/// The topology segments in the SMBIOS OEM strings, if any.
pub(crate) fn from_smbios(sysfs_root: &Path) -> Topology {
    let dir = sysfs_root.join("firmware/dmi/entries");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Topology::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{OEM_STRINGS}-")))
        .collect();
    names.sort();
    let mut out = Topology::new();
    for name in names {
        let path = dir.join(&name).join("raw");
        match std::fs::read(&path) {
            Ok(raw) => {
                for s in oem_strings(&raw) {
                    if let Some((k, v)) = segment(&s) {
                        out.insert(k, v);
                    }
                }
            }
            Err(e) => tracing::debug!(path = %path.display(), error = %e, "cannot read"),
        }
    }
    out
}

/// The strings of one raw SMBIOS structure of type 11: after the formatted area (whose length
/// is the header's second byte), NUL-terminated strings up to an empty one.
fn oem_strings(raw: &[u8]) -> Vec<String> {
    if raw.len() < 5 || raw[0] != OEM_STRINGS {
        return Vec::new();
    }
    let formatted = usize::from(raw[1]);
    let Some(strings) = raw.get(formatted..) else {
        return Vec::new();
    };
    strings
        .split(|b| *b == 0)
        .take_while(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// `topology.virtdisk.csi.io/<name>=<value>` → (key, value), when both are valid.
fn segment(s: &str) -> Option<(String, String)> {
    let (key, value) = s.split_once('=')?;
    let name = key.strip_prefix(OEM_PREFIX)?;
    let valid = check_topology_value("topology key", name)
        .and_then(|()| check_topology_value(&format!("topology value of {key}"), value));
    match valid {
        Ok(()) => Some((key.to_string(), value.to_string())),
        Err(e) => {
            tracing::warn!(oem_string = %s, error = %e, "ignoring an SMBIOS OEM string");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw type-11 structure as the kernel exposes it.
    fn raw(strings: &[&str]) -> Vec<u8> {
        let mut r = vec![OEM_STRINGS, 5, 0x00, 0x0b, strings.len() as u8];
        for s in strings {
            r.extend_from_slice(s.as_bytes());
            r.push(0);
        }
        r.push(0);
        r
    }

    fn sysfs(entries: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, bytes) in entries {
            let dir = d.path().join("firmware/dmi/entries").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("raw"), bytes).unwrap();
        }
        d
    }

    #[test]
    fn oem_strings_become_segments_over_the_config() {
        let d = sysfs(&[
            (
                "11-0",
                raw(&[
                    "unrelated vendor string",
                    "topology.virtdisk.csi.io/host=hv2",
                    "topology.virtdisk.csi.io/bad=-x",
                ]),
            ),
            ("11-1", raw(&["topology.virtdisk.csi.io/rack=r7"])),
            // Another structure type with a look-alike string is not read.
            ("1-0", {
                let mut r = raw(&["topology.virtdisk.csi.io/zone=z9"]);
                r[0] = 1;
                r
            }),
        ]);
        let configured: Topology = [
            (
                "topology.virtdisk.csi.io/host".to_string(),
                "hv1".to_string(),
            ),
            (
                "topology.virtdisk.csi.io/zone".to_string(),
                "z1".to_string(),
            ),
        ]
        .into();
        let got = segments(d.path(), &configured);
        let want: Topology = [
            ("topology.virtdisk.csi.io/host", "hv2"),
            ("topology.virtdisk.csi.io/rack", "r7"),
            ("topology.virtdisk.csi.io/zone", "z1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn no_dmi_or_garbage_falls_back_to_the_config() {
        let configured: Topology = [(
            "topology.virtdisk.csi.io/host".to_string(),
            "hv1".to_string(),
        )]
        .into();
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(segments(empty.path(), &configured), configured);
        let d = sysfs(&[("11-0", vec![11, 200, 0]), ("11-1", vec![])]);
        assert_eq!(segments(d.path(), &configured), configured);
        assert!(oem_strings(&raw(&[])).is_empty());
    }
}
