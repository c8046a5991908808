//! The XML of live snapshots: the `<domainsnapshot>` request, the facts read from the live
//! domain XML (guest agent, every disk target), and the rewrite of a disk of the persistent
//! definition onto a new source.

use crate::error::{Error, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};
use serde::Deserialize;
use std::io::Cursor;

/// The virtio channel name of qemu-guest-agent.
const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

fn write_err(e: std::io::Error) -> Error {
    Error::internal(format!("writing snapshot XML: {e}"))
}

fn finish(w: Writer<Cursor<Vec<u8>>>) -> Result<String> {
    String::from_utf8(w.into_inner().into_inner())
        .map_err(|e| Error::internal(format!("snapshot XML is not UTF-8: {e}")))
}

/// One external disk-only snapshot of several disks of a domain at once: each `(target,
/// overlay)` of `external` switches to its overlay (qcow2, created by the caller), in one QEMU
/// transaction. Every other disk in `all` is named with `snapshot='no'`, since libvirt would
/// otherwise give each of them a new overlay of its own choosing.
pub(super) fn snapshot_xml(external: &[(&str, &str)], all: &[String]) -> Result<String> {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    let description = if external.len() == 1 {
        "virtdisk-csi: live snapshot of a volume"
    } else {
        "virtdisk-csi: live snapshot of a group of volumes"
    };
    w.create_element("domainsnapshot")
        .write_inner_content(|w| {
            w.create_element("description")
                .write_text_content(quick_xml::events::BytesText::new(description))?;
            w.create_element("disks").write_inner_content(|w| {
                for (target, overlay) in external {
                    w.create_element("disk")
                        .with_attribute(("name", *target))
                        .with_attribute(("snapshot", "external"))
                        .with_attribute(("type", "file"))
                        .write_inner_content(|w| {
                            w.create_element("driver")
                                .with_attribute(("type", "qcow2"))
                                .write_empty()?;
                            w.create_element("source")
                                .with_attribute(("file", *overlay))
                                .write_empty()?;
                            Ok(())
                        })?;
                }
                for other in all
                    .iter()
                    .filter(|o| !external.iter().any(|(t, _)| *t == o.as_str()))
                {
                    w.create_element("disk")
                        .with_attribute(("name", other.as_str()))
                        .with_attribute(("snapshot", "no"))
                        .write_empty()?;
                }
                Ok(())
            })?;
            Ok(())
        })
        .map_err(write_err)?;
    finish(w)
}

/// What a live snapshot needs to know about the running domain besides its disks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct LiveFacts {
    /// A qemu-guest-agent channel is connected: file systems can be frozen.
    pub(crate) agent_connected: bool,
    /// The target of every `<disk>` (any device: cdroms too).
    pub(crate) targets: Vec<String>,
}

#[derive(Deserialize)]
struct DomainDoc {
    #[serde(default)]
    devices: Option<DevicesDoc>,
}

#[derive(Deserialize, Default)]
struct DevicesDoc {
    #[serde(default, rename = "disk")]
    disks: Vec<DiskDoc>,
    #[serde(default, rename = "channel")]
    channels: Vec<ChannelDoc>,
}

#[derive(Deserialize)]
struct DiskDoc {
    #[serde(default)]
    target: Option<DevDoc>,
}

#[derive(Deserialize)]
struct DevDoc {
    #[serde(rename = "@dev")]
    dev: String,
}

#[derive(Deserialize)]
struct ChannelDoc {
    #[serde(default, rename = "@type")]
    kind: Option<String>,
    #[serde(default)]
    target: Option<ChannelTargetDoc>,
}

#[derive(Deserialize)]
struct ChannelTargetDoc {
    #[serde(default, rename = "@type")]
    kind: Option<String>,
    #[serde(default, rename = "@name")]
    name: Option<String>,
    #[serde(default, rename = "@state")]
    state: Option<String>,
}

/// Reads the guest agent state and the disk targets from a live domain XML.
pub(super) fn live_facts(xml: &str) -> Result<LiveFacts> {
    let doc: DomainDoc = quick_xml::de::from_str(xml)
        .map_err(|e| Error::internal(format!("cannot parse libvirt domain XML: {e}")))?;
    let devices = doc.devices.unwrap_or_default();
    let agent_connected = devices.channels.iter().any(|c| {
        let Some(t) = &c.target else { return false };
        c.kind.as_deref() == Some("unix")
            && t.kind.as_deref() == Some("virtio")
            && t.name.as_deref() == Some(GUEST_AGENT_CHANNEL)
            && t.state.as_deref() == Some("connected")
    });
    let targets = devices
        .disks
        .into_iter()
        .filter_map(|d| d.target.map(|t| t.dev))
        .collect();
    Ok(LiveFacts {
        agent_connected,
        targets,
    })
}

/// A `<disk>` of a domain definition: as it is, and pointed at a new source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RepointedDisk {
    pub(crate) original: String,
    pub(crate) repointed: String,
}

fn parse_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("cannot read the persistent domain XML: {e}"))
}

/// The `<disk>` with `<serial>serial</serial>` in a domain XML, and a copy of it whose
/// `<source file>` is `new_source` and that has no `<backingStore>` (the new image's header
/// names its backing file; libvirt reads the chain from there). None when no disk has that
/// serial. Everything else of the element (driver, target, iotune, alias, …) is kept as is.
pub(super) fn repoint_disk(
    domain_xml: &str,
    serial: &str,
    new_source: &str,
) -> Result<Option<RepointedDisk>> {
    let mut reader = Reader::from_str(domain_xml);
    let mut disk: Option<Vec<Event<'static>>> = None;
    let mut depth = 0usize;
    loop {
        let event = reader.read_event().map_err(parse_err)?;
        if matches!(event, Event::Eof) {
            return Ok(None);
        }
        let opens_disk = matches!(&event, Event::Start(e) if e.name().into_inner() == "disk");
        if disk.is_none() && opens_disk {
            disk = Some(vec![event.into_owned()]);
            depth = 1;
            continue;
        }
        let Some(events) = disk.as_mut() else {
            continue;
        };
        match &event {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth -= 1,
            _ => {}
        }
        events.push(event.into_owned());
        if depth == 0 {
            let events = disk.take().unwrap_or_default();
            if serial_of(&events).as_deref() == Some(serial) {
                return Ok(Some(RepointedDisk {
                    original: write_events(&events, None)?,
                    repointed: write_events(&events, Some(new_source))?,
                }));
            }
        }
    }
}

/// The text of the `<serial>` child of a captured `<disk>`.
fn serial_of(events: &[Event<'static>]) -> Option<String> {
    let mut depth = 0usize;
    let mut in_serial = false;
    for event in events {
        match event {
            Event::Start(e) => {
                depth += 1;
                in_serial = depth == 2 && e.name().into_inner() == "serial";
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                in_serial = false;
            }
            // Our serials are plain `vd-<hex>`: no entity references to resolve.
            Event::Text(t) if in_serial => return Some(t.xml10_content().trim().to_string()),
            _ => {}
        }
    }
    None
}

/// Writes a captured `<disk>` back, pointed at `new_source` when given.
fn write_events(events: &[Event<'static>], new_source: Option<&str>) -> Result<String> {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    let mut depth = 0usize;
    // Depth at which a skipped `<backingStore>` subtree started.
    let mut skipping: Option<usize> = None;
    for event in events {
        let (opens, closes) = match event {
            Event::Start(_) => (true, false),
            Event::End(_) => (false, true),
            _ => (false, false),
        };
        if opens {
            depth += 1;
        }
        let at_child =
            |e: &BytesStart, name: &str, d: usize| d == 2 && e.name().into_inner() == name;
        let out = match (event, new_source) {
            _ if skipping.is_some() => None,
            (Event::Start(e), Some(_)) if at_child(e, "backingStore", depth) => {
                skipping = Some(depth);
                None
            }
            (Event::Empty(e), Some(_)) if at_child(e, "backingStore", depth + 1) => None,
            (Event::Start(e), Some(src)) if at_child(e, "source", depth) => {
                Some(Event::Start(with_file(e, src)?))
            }
            (Event::Empty(e), Some(src)) if at_child(e, "source", depth + 1) => {
                Some(Event::Empty(with_file(e, src)?))
            }
            _ => Some(event.clone()),
        };
        if let Some(out) = out {
            w.write_event(out).map_err(parse_err)?;
        }
        if closes {
            if skipping == Some(depth) {
                skipping = None;
            }
            depth = depth.saturating_sub(1);
        }
    }
    String::from_utf8(w.into_inner().into_inner()).map_err(parse_err)
}

/// A `<source>` with `file` set to `src` and without the runtime `index`.
fn with_file(e: &BytesStart, src: &str) -> Result<BytesStart<'static>> {
    let mut out = BytesStart::new("source");
    for attr in e.attributes() {
        let attr = attr.map_err(parse_err)?;
        if matches!(attr.key.into_inner(), "file" | "index") {
            continue;
        }
        out.push_attribute(attr);
    }
    out.push_attribute(("file", src));
    Ok(out.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domxml::DomainXml;

    const LIVE: &str = r#"<domain type='kvm' id='3'>
  <name>vdt-live</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/p/images/0123456789abcdef.qcow2' index='1'/>
      <backingStore/>
      <target dev='sda' bus='scsi'/>
      <serial>vd-0123456789abcdef</serial>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/guest/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='STATE'/>
      <alias name='channel0'/>
    </channel>
    <channel type='pty'>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn guest_agent_must_be_connected() {
        let on = live_facts(&LIVE.replace("STATE", "connected")).unwrap();
        assert!(on.agent_connected);
        assert_eq!(on.targets, vec!["sda", "sdb", "vda"]);
        let off = live_facts(&LIVE.replace("STATE", "disconnected")).unwrap();
        assert!(
            !off.agent_connected,
            "a pty channel is not the agent socket"
        );
        let none = live_facts("<domain><name>n</name></domain>").unwrap();
        assert_eq!(none, LiveFacts::default());
    }

    #[test]
    fn snapshot_names_every_other_disk_no() {
        let others = vec!["sda".to_string(), "sdb".into(), "vda".into()];
        let xml = snapshot_xml(&[("sda", "/p/images/a'b&c.qcow2")], &others).unwrap();
        assert!(
            xml.contains(
                r#"<disk name="sda" snapshot="external" type="file"><driver type="qcow2"/><source file="/p/images/a&apos;b&amp;c.qcow2"/></disk>"#
            ),
            "{xml}"
        );
        assert!(xml.contains(r#"<disk name="sdb" snapshot="no"/>"#), "{xml}");
        assert!(xml.contains(r#"<disk name="vda" snapshot="no"/>"#), "{xml}");
        assert_eq!(xml.matches("<disk ").count(), 3, "{xml}");
        assert!(xml.starts_with("<domainsnapshot>") && xml.ends_with("</domainsnapshot>"));
    }

    #[test]
    fn one_snapshot_switches_several_disks() {
        let all = vec!["sda".to_string(), "sdb".into(), "vda".into(), "vdb".into()];
        let xml = snapshot_xml(&[("sda", "/p/a.qcow2"), ("vdb", "/p/b.qcow2")], &all).unwrap();
        assert!(
            xml.contains(r#"<disk name="sda" snapshot="external" type="file"><driver type="qcow2"/><source file="/p/a.qcow2"/></disk>"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<disk name="vdb" snapshot="external" type="file"><driver type="qcow2"/><source file="/p/b.qcow2"/></disk>"#),
            "{xml}"
        );
        assert!(xml.contains(r#"<disk name="sdb" snapshot="no"/>"#), "{xml}");
        assert!(xml.contains(r#"<disk name="vda" snapshot="no"/>"#), "{xml}");
        assert_eq!(
            xml.matches("<disk ").count(),
            4,
            "every disk named once: {xml}"
        );
        assert!(xml.contains("group of volumes"), "{xml}");
    }

    const INACTIVE: &str = r#"<domain type='kvm'>
  <name>vdt-live</name>
  <devices>
    <disk type='file' device='disk'>
      <source file='/guest/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <serial>vd-0123456789abcdef-not</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='/p/images/0123456789abcdef-1.qcow2'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/p/images/0123456789abcdef.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='sdb' bus='scsi'/>
      <iotune><total_iops_sec>100</total_iops_sec></iotune>
      <serial>vd-0123456789abcdef</serial>
      <alias name='ua-vd-0123456789abcdef'/>
      <address type='drive' controller='0' bus='0' target='0' unit='1'/>
    </disk>
  </devices>
</domain>"#;

    fn read_back(device: &str) -> DomainXml {
        DomainXml::parse(&format!(
            "<domain><name>n</name><devices>{device}</devices></domain>"
        ))
        .unwrap()
    }

    #[test]
    fn repoint_changes_only_the_source() {
        let r = repoint_disk(INACTIVE, "vd-0123456789abcdef", "/p/images/new&.qcow2")
            .unwrap()
            .expect("disk found");
        let before = read_back(&r.original);
        let after = read_back(&r.repointed);
        let (b, a) = (&before.disks[0], &after.disks[0]);
        assert_eq!(
            b.source.as_deref(),
            Some("/p/images/0123456789abcdef-1.qcow2".as_ref())
        );
        assert_eq!(a.source.as_deref(), Some("/p/images/new&.qcow2".as_ref()));
        assert_eq!(
            (&a.target, &a.bus, &a.serial, &a.cache, &a.io, &a.iotune, &a.alias),
            (&b.target, &b.bus, &b.serial, &b.cache, &b.io, &b.iotune, &b.alias)
        );
        assert!(r.original.contains("backingStore"));
        assert!(!r.repointed.contains("backingStore"), "{}", r.repointed);
        assert!(r.repointed.contains("<seclabel"), "{}", r.repointed);
        assert!(r.repointed.contains("<address"), "{}", r.repointed);
    }

    #[test]
    fn repoint_an_empty_source_element_and_drop_the_index() {
        let r = repoint_disk(
            LIVE.replace("STATE", "x").as_str(),
            "vd-0123456789abcdef",
            "/n.qcow2",
        )
        .unwrap()
        .unwrap();
        assert!(
            r.repointed.contains(r#"<source file="/n.qcow2"/>"#),
            "{}",
            r.repointed
        );
        assert!(!r.repointed.contains("index"), "{}", r.repointed);
        assert!(!r.repointed.contains("backingStore"), "{}", r.repointed);
        assert!(r.original.contains("index='1'"), "{}", r.original);
    }

    #[test]
    fn repoint_without_that_serial_is_none() {
        assert_eq!(
            repoint_disk(INACTIVE, "vd-ffffffffffffffff", "/x").unwrap(),
            None
        );
        assert_eq!(
            repoint_disk("<domain/>", "vd-0123456789abcdef", "/x").unwrap(),
            None
        );
    }
}
