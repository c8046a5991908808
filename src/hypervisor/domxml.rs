//! Reading libvirt domain XML: the few facts the plugin needs (name, UUID, disks, whether a
//! SCSI controller exists). Unknown elements are ignored, so any libvirt version parses.

use crate::error::{Error, Result};
use crate::params::Qos;
use serde::Deserialize;
use std::path::PathBuf;

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskXml {
    /// `<target dev>`, e.g. `sda` or `vdb`: the name libvirt APIs take.
    pub target: String,
    /// `<target bus>`: scsi, virtio, sata, …
    pub bus: String,
    /// `<source file>` (or `dev` for block disks).
    pub source: Option<PathBuf>,
    /// `<serial>`: `vd-<key>` for the plugin's disks.
    pub serial: Option<String>,
    /// `<driver type>`: qcow2, raw, …
    pub format: Option<String>,
    /// `<driver cache>`.
    pub cache: Option<String>,
    /// `<driver io>`.
    pub io: Option<String>,
    /// `<driver discard>`.
    pub discard: Option<String>,
    /// `<readonly/>` is present.
    pub readonly: bool,
    /// `<shareable/>` is present.
    pub shareable: bool,
    /// `<iotune>` limits.
    pub iotune: Qos,
    /// `<alias name>` (live definitions only).
    pub alias: Option<String>,
}

/// The parts of a domain definition the plugin reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainXml {
    pub(crate) name: String,
    pub(crate) uuid: String,
    /// Every `<disk>` of the definition, in document order.
    pub disks: Vec<DiskXml>,
    /// The definition has a SCSI controller (`<controller type='scsi'>`).
    pub has_scsi_controller: bool,
}

impl DomainXml {
    /// Parses a domain XML document (live or inactive); InvalidArgument when it is not one.
    pub fn parse(xml: &str) -> Result<DomainXml> {
        let doc: DomainDoc = quick_xml::de::from_str(xml)
            .map_err(|e| Error::internal(format!("cannot parse libvirt domain XML: {e}")))?;
        let devices = doc.devices.unwrap_or_default();
        let disks = devices
            .disks
            .into_iter()
            .filter(|d| d.device.as_deref().unwrap_or("disk") == "disk")
            .filter_map(DiskDoc::into_disk)
            .collect();
        let has_scsi_controller = devices
            .controllers
            .iter()
            .any(|c| c.kind.as_deref() == Some("scsi"));
        Ok(DomainXml {
            name: doc.name,
            uuid: doc.uuid.unwrap_or_default().to_ascii_lowercase(),
            disks,
            has_scsi_controller,
        })
    }

    /// The disk whose `<serial>` is `serial`, if any.
    pub fn disk_by_serial(&self, serial: &str) -> Option<&DiskXml> {
        self.disks
            .iter()
            .find(|d| d.serial.as_deref() == Some(serial))
    }

    pub(crate) fn disk_by_target(&self, target: &str) -> Option<&DiskXml> {
        self.disks.iter().find(|d| d.target == target)
    }
}

#[derive(Deserialize)]
struct DomainDoc {
    name: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    devices: Option<DevicesDoc>,
}

#[derive(Deserialize, Default)]
struct DevicesDoc {
    #[serde(default, rename = "disk")]
    disks: Vec<DiskDoc>,
    #[serde(default, rename = "controller")]
    controllers: Vec<ControllerDoc>,
}

#[derive(Deserialize)]
struct ControllerDoc {
    #[serde(default, rename = "@type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct DiskDoc {
    #[serde(default, rename = "@device")]
    device: Option<String>,
    #[serde(default)]
    driver: Option<DriverDoc>,
    #[serde(default)]
    source: Option<SourceDoc>,
    #[serde(default)]
    target: Option<TargetDoc>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    readonly: Option<Flag>,
    #[serde(default)]
    shareable: Option<Flag>,
    #[serde(default)]
    iotune: Option<IotuneDoc>,
    #[serde(default)]
    alias: Option<AliasDoc>,
}

/// An empty marker element such as `<readonly/>`.
#[derive(Deserialize)]
struct Flag {}

#[derive(Deserialize)]
struct DriverDoc {
    #[serde(default, rename = "@type")]
    format: Option<String>,
    #[serde(default, rename = "@cache")]
    cache: Option<String>,
    #[serde(default, rename = "@io")]
    io: Option<String>,
    #[serde(default, rename = "@discard")]
    discard: Option<String>,
}

#[derive(Deserialize)]
struct SourceDoc {
    #[serde(default, rename = "@file")]
    file: Option<String>,
    #[serde(default, rename = "@dev")]
    dev: Option<String>,
}

#[derive(Deserialize)]
struct TargetDoc {
    #[serde(rename = "@dev")]
    dev: String,
    #[serde(default, rename = "@bus")]
    bus: Option<String>,
}

#[derive(Deserialize)]
struct AliasDoc {
    #[serde(rename = "@name")]
    name: String,
}

#[derive(Deserialize, Default)]
struct IotuneDoc {
    #[serde(default)]
    total_bytes_sec: Option<u64>,
    #[serde(default)]
    read_bytes_sec: Option<u64>,
    #[serde(default)]
    write_bytes_sec: Option<u64>,
    #[serde(default)]
    total_iops_sec: Option<u64>,
    #[serde(default)]
    read_iops_sec: Option<u64>,
    #[serde(default)]
    write_iops_sec: Option<u64>,
}

impl DiskDoc {
    fn into_disk(self) -> Option<DiskXml> {
        let target = self.target?;
        let driver = self.driver;
        let io = self.iotune.unwrap_or_default();
        let nonzero = |v: Option<u64>| v.filter(|n| *n > 0);
        Some(DiskXml {
            target: target.dev,
            bus: target.bus.unwrap_or_default(),
            source: self
                .source
                .and_then(|s| s.file.or(s.dev))
                .map(PathBuf::from),
            serial: self.serial.map(|s| s.trim().to_string()),
            format: driver.as_ref().and_then(|d| d.format.clone()),
            cache: driver.as_ref().and_then(|d| d.cache.clone()),
            io: driver.as_ref().and_then(|d| d.io.clone()),
            discard: driver.as_ref().and_then(|d| d.discard.clone()),
            readonly: self.readonly.is_some(),
            shareable: self.shareable.is_some(),
            iotune: Qos {
                total_bytes_sec: nonzero(io.total_bytes_sec),
                read_bytes_sec: nonzero(io.read_bytes_sec),
                write_bytes_sec: nonzero(io.write_bytes_sec),
                total_iops_sec: nonzero(io.total_iops_sec),
                read_iops_sec: nonzero(io.read_iops_sec),
                write_iops_sec: nonzero(io.write_iops_sec),
            },
            alias: self.alias.map(|a| a.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged `virsh dumpxml` of a running q35 domain with two hot-plugged disks.
    const LIVE: &str = r#"<domain type='kvm' id='1'>
  <name>vdt-hv-scratch</name>
  <uuid>5DAD5D3C-6E12-466E-9B43-47A61F27DE97</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>
      <source file='/tmp/hvx/a.qcow2' index='1'/>
      <backingStore/>
      <blockio logical_block_size='512' physical_block_size='4096'/>
      <target dev='sda' bus='scsi'/>
      <iotune>
        <total_bytes_sec>1048576</total_bytes_sec>
        <read_iops_sec>100</read_iops_sec>
      </iotune>
      <serial>vd-0123456789abcdef</serial>
      <alias name='ua-vd-0123456789abcdef'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'><alias name='pcie.0'/></controller>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/hvx/b&amp;c.raw'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdz' bus='sata'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'><alias name='scsi0'/></controller>
    <memballoon model='none'/>
  </devices>
</domain>"#;

    #[test]
    fn parses_live_domain() {
        let d = DomainXml::parse(LIVE).unwrap();
        assert_eq!(d.name, "vdt-hv-scratch");
        assert_eq!(d.uuid, "5dad5d3c-6e12-466e-9b43-47a61f27de97");
        assert!(d.has_scsi_controller);
        assert_eq!(d.disks.len(), 2, "the cdrom is not a disk");
        let a = d.disk_by_serial("vd-0123456789abcdef").unwrap();
        assert_eq!(a.target, "sda");
        assert_eq!(a.bus, "scsi");
        assert_eq!(a.source.as_deref(), Some("/tmp/hvx/a.qcow2".as_ref()));
        assert_eq!(a.format.as_deref(), Some("qcow2"));
        assert_eq!(a.cache.as_deref(), Some("none"));
        assert_eq!(a.io.as_deref(), Some("native"));
        assert_eq!(a.discard.as_deref(), Some("unmap"));
        assert!(!a.readonly && !a.shareable);
        assert_eq!(a.iotune.total_bytes_sec, Some(1048576));
        assert_eq!(a.iotune.read_iops_sec, Some(100));
        assert_eq!(a.iotune.write_iops_sec, None);
        assert_eq!(a.alias.as_deref(), Some("ua-vd-0123456789abcdef"));
        let b = d.disk_by_target("vda").unwrap();
        assert!(b.readonly && b.shareable);
        assert_eq!(b.source.as_deref(), Some("/tmp/hvx/b&c.raw".as_ref()));
        assert_eq!(b.serial, None);
    }

    #[test]
    fn parses_domain_without_devices() {
        let d = DomainXml::parse("<domain><name>x</name></domain>").unwrap();
        assert!(d.disks.is_empty() && !d.has_scsi_controller);
        assert!(DomainXml::parse("<domain>").is_err());
    }
}
