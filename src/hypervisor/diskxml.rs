//! Writing the device XML that goes to libvirt. Every value passes through quick-xml's
//! escaping writer; nothing is pasted into a template.

use crate::attach::DiskSpec;
use crate::error::{Error, Result};
use crate::model::ImageFormat;
use crate::params::{Bus, Qos};
use quick_xml::events::BytesText;
use quick_xml::Writer;
use std::collections::HashSet;
use std::io::Cursor;

/// Most disks one bus can take; a PCI slot shortage on virtio is reported by libvirt itself.
const MAX_TARGETS: usize = 26 * 27;

fn io_err(e: std::io::Error) -> Error {
    Error::internal(format!("writing device XML: {e}"))
}

/// The libvirt spelling of a parameter value (the serde names are libvirt's).
pub(crate) fn wire<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The `<target bus>` of a bus.
pub(crate) fn bus_name(bus: Bus) -> &'static str {
    match bus {
        Bus::Scsi => "scsi",
        Bus::Virtio => "virtio",
        Bus::Sata => "sata",
    }
}

pub(crate) fn parse_bus(name: &str) -> Option<Bus> {
    match name {
        "scsi" => Some(Bus::Scsi),
        "virtio" => Some(Bus::Virtio),
        "sata" => Some(Bus::Sata),
        _ => None,
    }
}

/// `sd`/`vd` + a, b, …, z, aa, ab, … (the kernel's and libvirt's disk naming).
pub fn target_name(bus: Bus, index: usize) -> String {
    let prefix = if bus == Bus::Virtio { "vd" } else { "sd" };
    let mut suffix = Vec::new();
    let mut i = index + 1;
    while i > 0 {
        i -= 1;
        suffix.push(b'a' + (i % 26) as u8);
        i /= 26;
    }
    suffix.reverse();
    format!("{prefix}{}", String::from_utf8(suffix).unwrap_or_default())
}

/// The first target name of `bus` that no disk in `used` holds.
pub(crate) fn free_target(bus: Bus, used: &HashSet<String>) -> Result<String> {
    (0..MAX_TARGETS)
        .map(|i| target_name(bus, i))
        .find(|t| !used.contains(t))
        .ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "every {} target name is taken on this domain",
                bus_name(bus)
            ))
        })
}

/// The user alias of a plugin disk (libvirt keeps `ua-` aliases across hot-plug).
pub(crate) fn alias_for(serial: &str) -> String {
    format!("ua-{serial}")
}

/// The `<disk>` element that hot-plugs `spec` as `target`.
pub fn disk_xml(spec: &DiskSpec, target: &str) -> Result<String> {
    let image = spec.image.to_str().ok_or_else(|| {
        Error::invalid(format!("image path {} is not UTF-8", spec.image.display()))
    })?;
    if spec.shareable && spec.format != ImageFormat::Raw {
        return Err(Error::invalid(format!(
            "volume {} cannot be shared between nodes: libvirt shares only raw images",
            spec.volume_id
        )));
    }
    let o = &spec.options;
    let mut w = Writer::new(Cursor::new(Vec::new()));
    w.create_element("disk")
        .with_attribute(("type", "file"))
        .with_attribute(("device", "disk"))
        .write_inner_content(|w| {
            let mut driver = w
                .create_element("driver")
                .with_attribute(("name", "qemu"))
                .with_attribute(("type", spec.format.as_str()));
            let cache = o.cache.map(wire);
            let io = o.io.map(wire);
            let discard = o.discard.map(wire);
            if let Some(v) = &cache {
                driver = driver.with_attribute(("cache", v.as_str()));
            }
            if let Some(v) = &io {
                driver = driver.with_attribute(("io", v.as_str()));
            }
            if let Some(v) = &discard {
                driver = driver.with_attribute(("discard", v.as_str()));
            }
            driver.write_empty()?;
            w.create_element("source")
                .with_attribute(("file", image))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", target))
                .with_attribute(("bus", bus_name(o.bus)))
                .write_empty()?;
            if o.logical_block_size.is_some() || o.physical_block_size.is_some() {
                let logical = o.logical_block_size.map(|v| v.to_string());
                let physical = o.physical_block_size.map(|v| v.to_string());
                let mut blockio = w.create_element("blockio");
                if let Some(v) = &logical {
                    blockio = blockio.with_attribute(("logical_block_size", v.as_str()));
                }
                if let Some(v) = &physical {
                    blockio = blockio.with_attribute(("physical_block_size", v.as_str()));
                }
                blockio.write_empty()?;
            }
            if !o.qos.is_empty() {
                w.create_element("iotune")
                    .write_inner_content(|w| write_iotune(w, &o.qos))?;
            }
            w.create_element("serial")
                .write_text_content(BytesText::new(&spec.serial))?;
            if spec.readonly {
                w.create_element("readonly").write_empty()?;
            }
            if spec.shareable {
                w.create_element("shareable").write_empty()?;
            }
            w.create_element("alias")
                .with_attribute(("name", alias_for(&spec.serial).as_str()))
                .write_empty()?;
            Ok(())
        })
        .map_err(io_err)?;
    finish(w)
}

fn write_iotune(w: &mut Writer<Cursor<Vec<u8>>>, q: &Qos) -> std::io::Result<()> {
    for (name, value) in qos_fields(q) {
        if let Some(v) = value {
            w.create_element(name)
                .write_text_content(BytesText::new(&v.to_string()))?;
        }
    }
    Ok(())
}

/// The libvirt names of the six QoS limits, in `<iotune>` order.
pub(crate) fn qos_fields(q: &Qos) -> [(&'static str, Option<u64>); 6] {
    [
        ("total_bytes_sec", q.total_bytes_sec),
        ("read_bytes_sec", q.read_bytes_sec),
        ("write_bytes_sec", q.write_bytes_sec),
        ("total_iops_sec", q.total_iops_sec),
        ("read_iops_sec", q.read_iops_sec),
        ("write_iops_sec", q.write_iops_sec),
    ]
}

/// The smallest `<disk>` libvirt matches on detach: libvirt finds disks by target name.
pub fn detach_xml(target: &str, bus: &str) -> Result<String> {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    w.create_element("disk")
        .with_attribute(("type", "file"))
        .with_attribute(("device", "disk"))
        .write_inner_content(|w| {
            let mut t = w.create_element("target").with_attribute(("dev", target));
            if !bus.is_empty() {
                t = t.with_attribute(("bus", bus));
            }
            t.write_empty()?;
            Ok(())
        })
        .map_err(io_err)?;
    finish(w)
}

/// The virtio-scsi controller SCSI disks hang on.
pub(crate) fn scsi_controller_xml() -> Result<String> {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    w.create_element("controller")
        .with_attribute(("type", "scsi"))
        .with_attribute(("model", "virtio-scsi"))
        .write_empty()
        .map_err(io_err)?;
    finish(w)
}

fn finish(w: Writer<Cursor<Vec<u8>>>) -> Result<String> {
    String::from_utf8(w.into_inner().into_inner())
        .map_err(|e| Error::internal(format!("device XML is not UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domxml::DomainXml;
    use crate::params::{Cache, Discard, DiskOptions, IoMode};

    fn spec() -> DiskSpec {
        DiskSpec {
            volume_id: crate::ids::VolumeId::parse("volume id", "default.0123456789abcdef")
                .unwrap()
                .unwrap(),
            serial: "vd-0123456789abcdef".into(),
            image: "/pools/a'b<c>&\"d/images/x.qcow2".into(),
            format: ImageFormat::Qcow2,
            options: DiskOptions::default(),
            readonly: false,
            shareable: false,
        }
    }

    /// Wraps a device in a domain so the reader can check what the writer wrote.
    fn read_back(device: &str) -> DomainXml {
        DomainXml::parse(&format!(
            "<domain><name>n</name><devices>{device}</devices></domain>"
        ))
        .unwrap()
    }

    #[test]
    fn target_names_follow_kernel_naming() {
        assert_eq!(target_name(Bus::Scsi, 0), "sda");
        assert_eq!(target_name(Bus::Sata, 25), "sdz");
        assert_eq!(target_name(Bus::Scsi, 26), "sdaa");
        assert_eq!(target_name(Bus::Virtio, 27), "vdab");
        assert_eq!(target_name(Bus::Virtio, 26 + 26 * 26), "vdaaa");
        let used: HashSet<String> = ["sda", "sdb", "vda"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(free_target(Bus::Scsi, &used).unwrap(), "sdc");
        assert_eq!(free_target(Bus::Virtio, &used).unwrap(), "vdb");
    }

    #[test]
    fn minimal_disk_escapes_the_path() {
        let xml = disk_xml(&spec(), "sdb").unwrap();
        assert!(xml.contains("a&apos;b&lt;c&gt;&amp;&quot;d"), "{xml}");
        let d = read_back(&xml);
        let disk = d.disk_by_serial("vd-0123456789abcdef").unwrap();
        assert_eq!(disk.target, "sdb");
        assert_eq!(disk.bus, "scsi");
        assert_eq!(
            disk.source.as_deref(),
            Some("/pools/a'b<c>&\"d/images/x.qcow2".as_ref())
        );
        assert_eq!(disk.format.as_deref(), Some("qcow2"));
        assert_eq!(disk.cache, None);
        assert!(!disk.readonly && !disk.shareable);
        assert!(disk.iotune.is_empty());
        assert_eq!(disk.alias.as_deref(), Some("ua-vd-0123456789abcdef"));
        assert!(!xml.contains("iotune") && !xml.contains("blockio"));
    }

    #[test]
    fn every_option_is_written() {
        let mut s = spec();
        s.format = ImageFormat::Raw;
        s.readonly = true;
        s.shareable = true;
        s.options = DiskOptions {
            bus: Bus::Virtio,
            cache: Some(Cache::Directsync),
            io: Some(IoMode::IoUring),
            discard: Some(Discard::Unmap),
            logical_block_size: Some(512),
            physical_block_size: Some(4096),
            persist: true,
            qos: Qos {
                total_bytes_sec: Some(1 << 20),
                read_iops_sec: Some(100),
                write_iops_sec: Some(50),
                ..Qos::default()
            },
        };
        let xml = disk_xml(&s, "vdc").unwrap();
        assert!(
            xml.contains(r#"<blockio logical_block_size="512" physical_block_size="4096"/>"#),
            "{xml}"
        );
        let d = read_back(&xml);
        let disk = d.disk_by_target("vdc").unwrap();
        assert_eq!(disk.bus, "virtio");
        assert_eq!(disk.format.as_deref(), Some("raw"));
        assert_eq!(disk.cache.as_deref(), Some("directsync"));
        assert_eq!(disk.io.as_deref(), Some("io_uring"));
        assert_eq!(disk.discard.as_deref(), Some("unmap"));
        assert!(disk.readonly && disk.shareable);
        assert_eq!(disk.iotune, s.options.qos);
    }

    #[test]
    fn shareable_qcow2_is_refused() {
        let mut s = spec();
        s.shareable = true;
        assert!(matches!(
            disk_xml(&s, "sda"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn detach_and_controller_xml() {
        assert_eq!(
            detach_xml("sdb", "scsi").unwrap(),
            r#"<disk type="file" device="disk"><target dev="sdb" bus="scsi"/></disk>"#
        );
        assert_eq!(
            scsi_controller_xml().unwrap(),
            r#"<controller type="scsi" model="virtio-scsi"/>"#
        );
    }
}
