//! CreateVolume `parameters` (StorageClass parameters / Nomad volume `parameters`): the pool,
//! the image format and the hot-plug options ControllerPublish uses later. Every key is
//! checked; unknown keys are rejected so a typo never silently does nothing.

use crate::error::{Error, Result};
use crate::model::ImageFormat;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Keys the external-provisioner adds (`--extra-create-metadata`); informational, ignored.
const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// Request parameters as compared for idempotency (a repeated Create*): the keys the
/// external-provisioner adds (`K8S_PREFIX`) left out.
pub(crate) fn own_parameters(m: &BTreeMap<String, String>) -> BTreeMap<&String, &String> {
    m.iter()
        .filter(|(k, _)| !k.starts_with(K8S_PREFIX))
        .collect()
}

/// The bus a disk is hot-plugged on (`bus` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// virtio-scsi: attaches in milliseconds, detaches at once; the default.
    #[default]
    Scsi,
    /// virtio-blk: one PCI slot per disk; needs the guest's cooperation to detach.
    Virtio,
    /// SATA (AHCI): for guests without virtio drivers; no hot-plug on most machine types.
    Sata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Cache {
    None,
    Writethrough,
    Writeback,
    Directsync,
    Unsafe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum IoMode {
    Native,
    Threads,
    IoUring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Discard {
    Unmap,
    Ignore,
}

/// `<iotune>` limits; 0/None means unlimited. `total_*` excludes `read_*`/`write_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Qos {
    /// Bytes per second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_sec: Option<u64>,
    /// Read bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_sec: Option<u64>,
    /// Write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bytes_sec: Option<u64>,
    /// I/O operations per second, reads and writes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iops_sec: Option<u64>,
    /// Read operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops_sec: Option<u64>,
    /// Write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops_sec: Option<u64>,
}

impl Qos {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Qos::default()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let both = |t: Option<u64>, r: Option<u64>, w: Option<u64>, what: &str| {
            if t.is_some() && (r.is_some() || w.is_some()) {
                Err(Error::invalid(format!(
                    "total{what}Sec cannot be combined with read{what}Sec or write{what}Sec \
                     (libvirt iotune: total excludes read/write)"
                )))
            } else {
                Ok(())
            }
        };
        both(
            self.total_bytes_sec,
            self.read_bytes_sec,
            self.write_bytes_sec,
            "Bytes",
        )?;
        both(
            self.total_iops_sec,
            self.read_iops_sec,
            self.write_iops_sec,
            "Iops",
        )
    }
}

/// How the disk is presented to the domain when published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOptions {
    #[serde(default)]
    pub(crate) bus: Bus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cache: Option<Cache>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) io: Option<IoMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) discard: Option<Discard>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) logical_block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) physical_block_size: Option<u32>,
    /// Attach LIVE and CONFIG (survives a guest reboot) rather than LIVE only.
    #[serde(default = "yes")]
    pub(crate) persist: bool,
    #[serde(default)]
    pub(crate) qos: Qos,
}

fn yes() -> bool {
    true
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            bus: Bus::Scsi,
            cache: None,
            io: None,
            discard: None,
            logical_block_size: None,
            physical_block_size: None,
            persist: true,
            qos: Qos::default(),
        }
    }
}

/// Everything CreateVolume's parameters say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct VolumeParams {
    pub(crate) pool: Option<String>,
    pub(crate) format: Option<ImageFormat>,
    pub(crate) disk: DiskOptions,
    pub(crate) root: RootOwnership,
}

/// Owner and mode of a fresh file system's root directory (`rootUid`, `rootGid`, `rootMode`),
/// set by the node right after it formats the volume: a task that runs as a non-root user
/// (Nomad's `exec` driver runs tasks as `nobody`) can then write. Nomad sends no fsGroup, so
/// these are its way; Kubernetes uses fsGroup (`volume_mount_group`) instead. They travel to
/// the node in the volume_context under the same keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RootOwnership {
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    /// Permission bits, setuid/setgid/sticky included (at most 0o7777).
    pub(crate) mode: Option<u32>,
}

/// The keys of `RootOwnership` (parameters and volume_context alike).
pub(crate) const ROOT_KEYS: [&str; 3] = ["rootUid", "rootGid", "rootMode"];

impl RootOwnership {
    pub(crate) fn is_empty(&self) -> bool {
        *self == RootOwnership::default()
    }

    /// Applies one key; `Ok(false)` if `key` is not one of `ROOT_KEYS`.
    pub(crate) fn apply(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "rootUid" => self.uid = Some(id_number(key, value)?),
            "rootGid" => self.gid = Some(id_number(key, value)?),
            "rootMode" => self.mode = Some(mode_bits(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// From a volume_context (the node's view); unknown keys are not its business.
    pub(crate) fn from_context(ctx: &BTreeMap<String, String>) -> Result<Self> {
        let mut r = RootOwnership::default();
        for key in ROOT_KEYS {
            if let Some(v) = ctx.get(key) {
                r.apply(key, v)?;
            }
        }
        Ok(r)
    }
}

/// A user or group id: decimal, 0 to 4294967294 (4294967295 is the kernel's "no id").
pub(crate) fn id_number(key: &str, value: &str) -> Result<u32> {
    match value.trim().parse::<u32>() {
        Ok(n) if n != u32::MAX && !value.trim().starts_with('+') => Ok(n),
        _ => Err(Error::invalid(format!(
            "{key}={value:?} is invalid: use a numeric id from 0 to 4294967294"
        ))),
    }
}

/// Octal permission bits such as `0775` or `2770`, at most `7777`.
fn mode_bits(key: &str, value: &str) -> Result<u32> {
    let v = value.trim();
    let ok = !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(v, 8) {
        Ok(n) if ok && n <= 0o7777 => Ok(n),
        _ => Err(Error::invalid(format!(
            "parameter {key}={value:?} is invalid: use octal permission bits such as 0775 \
             (at most 7777)"
        ))),
    }
}

/// The parameter keys and what they take; shown in errors and documented in README.md.
pub(crate) const KEYS: &[(&str, &str)] = &[
    ("pool", "name of a configured pool"),
    ("format", "qcow2 | raw"),
    ("bus", "scsi | virtio | sata"),
    (
        "cache",
        "none | writethrough | writeback | directsync | unsafe",
    ),
    ("io", "native | threads | io_uring"),
    ("discard", "unmap | ignore"),
    ("logicalBlockSize", "512..65536, power of two"),
    (
        "physicalBlockSize",
        "512..65536, power of two, >= logicalBlockSize",
    ),
    ("persist", "true | false"),
    ("rootUid", "numeric uid owning a fresh file system's root"),
    ("rootGid", "numeric gid owning a fresh file system's root"),
    (
        "rootMode",
        "octal mode of a fresh file system's root, e.g. 0775",
    ),
    ("totalBytesSec", "bytes/s"),
    ("readBytesSec", "bytes/s"),
    ("writeBytesSec", "bytes/s"),
    ("totalIopsSec", "IO/s"),
    ("readIopsSec", "IO/s"),
    ("writeIopsSec", "IO/s"),
];

/// Keys ControllerModifyVolume may change (the others are fixed at creation).
pub(crate) const MUTABLE_KEYS: &[&str] = &[
    "totalBytesSec",
    "readBytesSec",
    "writeBytesSec",
    "totalIopsSec",
    "readIopsSec",
    "writeIopsSec",
];

/// Checks that every key of `mutable` (CreateVolume's or ControllerModifyVolume's
/// `mutable_parameters`) is one that may change after creation; the values are checked where
/// they are applied.
pub(crate) fn check_mutable(mutable: &BTreeMap<String, String>) -> Result<()> {
    match mutable.keys().find(|k| !MUTABLE_KEYS.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(Error::invalid(format!(
            "mutable parameter {:?} is not supported; mutable parameters: {}",
            k.chars().take(64).collect::<String>(),
            MUTABLE_KEYS.join(", ")
        ))),
    }
}

/// CreateVolume's `parameters` with its `mutable_parameters` on top: the spec has the
/// mutable ones take precedence. The result is what the volume is created with (and what a
/// repeated CreateVolume is compared with).
pub(crate) fn with_mutable(
    parameters: &BTreeMap<String, String>,
    mutable: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    check_mutable(mutable)?;
    let mut all = parameters.clone();
    all.extend(mutable.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(all)
}

fn enum_value<T: for<'de> Deserialize<'de>>(key: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        let allowed = KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or("");
        Error::invalid(format!(
            "parameter {key}={value:?} is invalid: use {allowed}"
        ))
    })
}

fn number(key: &str, value: &str) -> Result<u64> {
    value.trim().parse::<u64>().map_err(|_| {
        Error::invalid(format!(
            "parameter {key}={value:?} is invalid: use a non-negative whole number"
        ))
    })
}

fn block_size(key: &str, value: &str) -> Result<u32> {
    let n = number(key, value)?;
    if !(512..=65536).contains(&n) || !n.is_power_of_two() {
        return Err(Error::invalid(format!(
            "parameter {key}={value} is invalid: use a power of two from 512 to 65536"
        )));
    }
    Ok(n as u32)
}

/// Applies one QoS key; `Ok(false)` if `key` is not a QoS key.
pub(crate) fn apply_qos(qos: &mut Qos, key: &str, value: &str) -> Result<bool> {
    let slot = match key {
        "totalBytesSec" => &mut qos.total_bytes_sec,
        "readBytesSec" => &mut qos.read_bytes_sec,
        "writeBytesSec" => &mut qos.write_bytes_sec,
        "totalIopsSec" => &mut qos.total_iops_sec,
        "readIopsSec" => &mut qos.read_iops_sec,
        "writeIopsSec" => &mut qos.write_iops_sec,
        _ => return Ok(false),
    };
    let n = number(key, value)?;
    if n > MAX_QOS {
        // Accepted here, QEMU would refuse the disk at every publish.
        return Err(Error::invalid(format!(
            "parameter {key}={n} is invalid: QEMU takes throttle limits up to {MAX_QOS}"
        )));
    }
    *slot = (n > 0).then_some(n);
    Ok(true)
}

/// QEMU's largest I/O throttle limit (THROTTLE_VALUE_MAX).
pub(crate) const MAX_QOS: u64 = 1_000_000_000_000_000;

impl VolumeParams {
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> Result<Self> {
        let mut p = VolumeParams::default();
        if params.len() > 64 {
            return Err(Error::invalid("too many parameters (at most 64)"));
        }
        for (key, value) in params {
            if key.starts_with(K8S_PREFIX) {
                continue;
            }
            if value.len() > 256 {
                return Err(Error::invalid(format!(
                    "parameter {key} is {} bytes long; at most 256 are allowed",
                    value.len()
                )));
            }
            let d = &mut p.disk;
            match key.as_str() {
                "pool" => {
                    crate::ids::check_pool_name(value)?;
                    p.pool = Some(value.clone());
                }
                "format" => p.format = Some(ImageFormat::parse(value)?),
                "bus" => d.bus = enum_value(key, value)?,
                "cache" => d.cache = Some(enum_value(key, value)?),
                "io" => d.io = Some(enum_value(key, value)?),
                "discard" => d.discard = Some(enum_value(key, value)?),
                "logicalBlockSize" => d.logical_block_size = Some(block_size(key, value)?),
                "physicalBlockSize" => d.physical_block_size = Some(block_size(key, value)?),
                "persist" => {
                    d.persist = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(Error::invalid(format!(
                                "parameter persist={value:?} is invalid: use true or false"
                            )))
                        }
                    }
                }
                other if p.root.apply(other, value)? => {}
                other => {
                    if !apply_qos(&mut d.qos, other, value)? {
                        let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                        return Err(Error::invalid(format!(
                            "unknown parameter {other:?}; known parameters: {}",
                            known.join(", ")
                        )));
                    }
                }
            }
        }
        p.disk.validate()?;
        Ok(p)
    }
}

impl DiskOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if let (Some(l), Some(ph)) = (self.logical_block_size, self.physical_block_size) {
            if ph < l {
                return Err(Error::invalid(format!(
                    "physicalBlockSize {ph} is smaller than logicalBlockSize {l}"
                )));
            }
        }
        if self.io == Some(IoMode::Native)
            && !matches!(self.cache, Some(Cache::None) | Some(Cache::Directsync))
        {
            return Err(Error::invalid(
                "io=native needs cache=none or cache=directsync (QEMU opens the image with O_DIRECT)",
            ));
        }
        self.qos.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_key() {
        let p = VolumeParams::parse(&map(&[
            ("pool", "fast"),
            ("format", "raw"),
            ("bus", "virtio"),
            ("cache", "none"),
            ("io", "native"),
            ("discard", "unmap"),
            ("logicalBlockSize", "512"),
            ("physicalBlockSize", "4096"),
            ("persist", "false"),
            ("readBytesSec", "1048576"),
            ("totalIopsSec", "100"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(p.pool.as_deref(), Some("fast"));
        assert_eq!(p.format, Some(ImageFormat::Raw));
        assert_eq!(p.disk.bus, Bus::Virtio);
        assert_eq!(p.disk.io, Some(IoMode::Native));
        assert!(!p.disk.persist);
        assert_eq!(p.disk.qos.read_bytes_sec, Some(1048576));
        assert_eq!(p.disk.qos.total_iops_sec, Some(100));
        let r = VolumeParams::parse(&map(&[
            ("rootUid", "65534"),
            ("rootGid", "0"),
            ("rootMode", "2775"),
        ]))
        .unwrap()
        .root;
        assert_eq!((r.uid, r.gid, r.mode), (Some(65534), Some(0), Some(0o2775)));
    }

    #[test]
    fn mutable_parameters_are_qos_keys_and_take_precedence() {
        let merged = with_mutable(
            &map(&[("bus", "virtio"), ("readIopsSec", "10")]),
            &map(&[("readIopsSec", "100"), ("writeBytesSec", "4096")]),
        )
        .unwrap();
        let p = VolumeParams::parse(&merged).unwrap();
        assert_eq!(p.disk.bus, Bus::Virtio);
        assert_eq!(p.disk.qos.read_iops_sec, Some(100));
        assert_eq!(p.disk.qos.write_bytes_sec, Some(4096));
        for bad in [("XXX_FakeKey", "x"), ("bus", "scsi"), ("pool", "default")] {
            let err = with_mutable(&BTreeMap::new(), &map(&[bad])).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            vec![("bus", "ide")],
            vec![("cache", "fast")],
            vec![("unknownKey", "1")],
            vec![("logicalBlockSize", "1000")],
            vec![("logicalBlockSize", "4096"), ("physicalBlockSize", "512")],
            vec![("totalBytesSec", "1"), ("readBytesSec", "1")],
            vec![("totalIopsSec", "-5")],
            vec![("io", "native")],
            vec![("pool", "../etc")],
            vec![("persist", "yes")],
            vec![("totalBytesSec", "1000000000000001")],
            vec![("writeIopsSec", "18446744073709551615")],
            vec![("rootUid", "nobody")],
            vec![("rootUid", "-1")],
            vec![("rootGid", "4294967295")],
            vec![("rootMode", "0778")],
            vec![("rootMode", "17777")],
            vec![("rootMode", "rwx")],
            vec![("rootMode", "")],
        ] {
            let err = VolumeParams::parse(&map(&bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }
}
