//! Throwaway KVM domains to hot-plug into: q35, 64 MiB, no OS, no disks, free PCIe root ports.
//!
//! ```ignore
//! let dom = TestDomain::start("scsi", 3);                  // 3 free root ports, running
//! let dom = TestDomain::builder("live").root_ports(6).scsi_controllers(1).guest_agent().start();
//! dom.live_disk(&serial);  dom.inactive_disk(&serial);     // parsed by the plugin's reader
//! dom.power_off(); dom.power_on();
//! let mut dom = TestDomain::builder("mig").on(second.uri()).start();   // another libvirtd
//! dom.migrate_live(URI);                                    // follows the domain to URI
//! ```
//!
//! Names are `<prefix><pid>-<n>[-<tag>]` (prefix `vdt-dom-` unless set): a domain is destroyed
//! and undefined when its [`TestDomain`] is dropped, also when the test failed, and domains of
//! a prefix whose process is gone (a killed run) are swept the first time a test makes one.
//! The guest bed names its guests the same way ([`unique_name`], [`sweep_stale`]).

use crate::virsh::{ensure_libvirtd, virsh_at, virsh_ok, virsh_ok_at, URI};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
#[cfg(feature = "libvirt")]
use virtdisk_csi::hypervisor::domxml::{DiskXml, DomainXml};

/// The default name prefix of test domains.
pub const PREFIX: &str = "vdt-dom-";

/// `<prefix><pid>-<n>` plus `-<tag>` when there is one: unique in this process, and the pid
/// tells [`sweep_stale`] whether its test still runs.
pub fn unique_name(prefix: &str, tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{}-{n}", std::process::id());
    if tag.is_empty() {
        name
    } else {
        format!("{name}-{tag}")
    }
}

/// Destroys and undefines the domains named `<prefix><pid>-…` on `uri` whose process is gone.
pub fn sweep_stale(uri: &str, prefix: &str) {
    let out = virsh_at(uri, &["list", "--all", "--name"]);
    for name in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            eprintln!("sweeping stale test domain {name}");
            destroy_and_undefine(uri, name);
        }
    }
}

/// `virsh destroy` and `virsh undefine`, errors ignored (it may be off or transient already).
pub fn destroy_and_undefine(uri: &str, name: &str) {
    let _ = virsh_at(uri, &["destroy", name]);
    let _ = virsh_at(uri, &["undefine", name]);
}

/// Domains on the connection (all of them, ours and others').
pub fn count_all() -> usize {
    virsh_ok(&["list", "--all", "--name"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Libvirt up, and `prefix`'s stale domains swept, once per prefix and process.
fn prepare(prefix: &str) {
    static SWEPT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    ensure_libvirtd();
    if SWEPT.lock().unwrap().insert(prefix.to_string()) {
        sweep_stale(URI, prefix);
    }
}

/// How to make a [`TestDomain`]: [`TestDomain::builder`], then [`DomainBuilder::start`].
#[derive(Debug, Clone)]
pub struct DomainBuilder {
    tag: String,
    prefix: String,
    root_ports: usize,
    scsi_controllers: usize,
    guest_agent: bool,
    persistent: bool,
    uri: String,
}

impl DomainBuilder {
    /// The libvirtd to define it on (default [`URI`], the machine's), e.g. a
    /// [`crate::second_libvirtd::SecondLibvirtd`]'s.
    pub fn on(mut self, uri: &str) -> DomainBuilder {
        self.uri = uri.to_string();
        self
    }

    /// The name prefix (default [`PREFIX`]).
    pub fn prefix(mut self, prefix: &str) -> DomainBuilder {
        self.prefix = prefix.to_string();
        self
    }

    /// `pcie-root-port`s (default 4). Each virtio disk and the virtio-scsi controller take
    /// one; one more goes to the USB controller.
    pub fn root_ports(mut self, n: usize) -> DomainBuilder {
        self.root_ports = n;
        self
    }

    /// virtio-scsi controllers defined up front (default none: the plugin adds one). libvirt
    /// puts 7 disks on each.
    pub fn scsi_controllers(mut self, n: usize) -> DomainBuilder {
        self.scsi_controllers = n;
        self
    }

    /// A qemu-guest-agent channel (never connected: there is no guest to answer).
    pub fn guest_agent(mut self) -> DomainBuilder {
        self.guest_agent = true;
        self
    }

    /// A transient domain (`virsh create`): no persistent definition.
    pub fn transient(mut self) -> DomainBuilder {
        self.persistent = false;
        self
    }

    /// The domain XML.
    pub fn xml(&self, name: &str) -> String {
        let ports = "<controller type='pci' model='pcie-root-port'/>".repeat(self.root_ports);
        let scsi: String = (0..self.scsi_controllers)
            .map(|i| format!("<controller type='scsi' index='{i}' model='virtio-scsi'/>"))
            .collect();
        let agent = if self.guest_agent {
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        } else {
            ""
        };
        format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' model='pcie-root'/>{ports}{scsi}{agent}\
             <memballoon model='none'/></devices></domain>"
        )
    }

    /// Defines and starts the domain (or creates it, when transient).
    pub fn start(self) -> TestDomain {
        prepare(&self.prefix);
        let name = unique_name(&self.prefix, &self.tag);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), self.xml(&name)).unwrap();
        let path = file.path().to_str().unwrap();
        let uri = self.uri.as_str();
        virsh_ok_at(
            uri,
            &[if self.persistent { "define" } else { "create" }, path],
        );
        let dom = TestDomain {
            uuid: virsh_ok_at(uri, &["domuuid", &name]).trim().to_string(),
            name,
            uri: uri.to_string(),
            seen: vec![uri.to_string()],
        };
        if self.persistent {
            dom.power_on();
        }
        dom
    }
}

/// A running KVM domain without an OS; destroyed and undefined when dropped (on every
/// libvirtd it was on).
pub struct TestDomain {
    pub name: String,
    pub uuid: String,
    /// The libvirt connection it runs on now.
    pub uri: String,
    /// Every connection it was on (a live migration leaves a definition behind).
    seen: Vec<String>,
}

impl TestDomain {
    /// A persistent domain named after `tag`, with 4 root ports and nothing else: adjust it,
    /// then [`DomainBuilder::start`].
    pub fn builder(tag: &str) -> DomainBuilder {
        DomainBuilder {
            tag: tag.to_string(),
            prefix: PREFIX.to_string(),
            root_ports: 4,
            scsi_controllers: 0,
            guest_agent: false,
            persistent: true,
            uri: URI.to_string(),
        }
    }

    /// A running persistent domain with `free_ports` PCIe slots for hot-plugged devices (one
    /// more root port goes to the USB controller).
    pub fn start(tag: &str, free_ports: usize) -> TestDomain {
        TestDomain::builder(tag).root_ports(free_ports + 1).start()
    }

    /// Like [`TestDomain::start`], transient (`virsh create`).
    pub fn start_transient(tag: &str, free_ports: usize) -> TestDomain {
        TestDomain::builder(tag)
            .root_ports(free_ports + 1)
            .transient()
            .start()
    }

    /// What live snapshots need: 6 root ports, a virtio-scsi controller and a guest-agent
    /// channel that no agent answers (the snapshot is crash-consistent).
    pub fn with_guest_agent(tag: &str) -> TestDomain {
        TestDomain::builder(tag)
            .root_ports(6)
            .scsi_controllers(1)
            .guest_agent()
            .start()
    }

    /// `virsh -c <its uri now> <args>`, which must succeed; stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        virsh_ok_at(&self.uri, args)
    }

    /// `virsh migrate --live` to the libvirtd at `to` (`--unsafe`: test pools lie on a local
    /// filesystem that libvirt cannot know both hosts share); from then on the domain is
    /// addressed there. Returns how long the migration took.
    pub fn migrate_live(&mut self, to: &str) -> std::time::Duration {
        let started = std::time::Instant::now();
        self.virsh_ok(&["migrate", "--live", "--unsafe", &self.name, to]);
        self.uri = to.to_string();
        if !self.seen.iter().any(|u| u == to) {
            self.seen.push(to.to_string());
        }
        started.elapsed()
    }

    /// The live XML as text.
    pub fn live_xml(&self) -> String {
        self.virsh_ok(&["dumpxml", &self.name])
    }

    /// The persistent definition as text.
    pub fn inactive_xml(&self) -> String {
        self.virsh_ok(&["dumpxml", "--inactive", &self.name])
    }

    /// The persistent definition the domain has (or left) on `uri`, as text.
    pub fn inactive_xml_at(&self, uri: &str) -> String {
        virsh_ok_at(uri, &["dumpxml", "--inactive", &self.name])
    }

    /// Whether the live XML holds a disk with this serial.
    pub fn has_disk(&self, serial: &str) -> bool {
        self.live_xml()
            .contains(&format!("<serial>{serial}</serial>"))
    }

    /// The capacity the domain reports for a disk (`virsh domblkinfo`).
    pub fn capacity(&self, target: &str) -> u64 {
        let out = self.virsh_ok(&["domblkinfo", &self.name, target]);
        out.lines()
            .find_map(|l| l.strip_prefix("Capacity:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no capacity in {out}"))
    }

    /// Powers the domain off (its persistent definition stays).
    pub fn power_off(&self) {
        self.virsh_ok(&["destroy", &self.name]);
    }

    pub fn power_on(&self) {
        self.virsh_ok(&["start", &self.name]);
    }
}

#[cfg(feature = "libvirt")]
impl TestDomain {
    /// The live XML, parsed.
    pub fn live(&self) -> DomainXml {
        DomainXml::parse(&self.live_xml()).unwrap()
    }

    /// The persistent definition, parsed.
    pub fn inactive(&self) -> DomainXml {
        DomainXml::parse(&self.inactive_xml()).unwrap()
    }

    pub fn live_disk(&self, serial: &str) -> Option<DiskXml> {
        self.live().disk_by_serial(serial).cloned()
    }

    pub fn inactive_disk(&self, serial: &str) -> Option<DiskXml> {
        self.inactive().disk_by_serial(serial).cloned()
    }

    pub fn has_scsi_controller(&self) -> bool {
        self.live().has_scsi_controller
    }

    /// The device id of the disk with this serial (its alias in the live XML): what HMP
    /// `qemu-io -d` and [`crate::sequence::MonitorWriter`] name. It stays across live snapshots.
    pub fn disk_alias(&self, serial: &str) -> String {
        let disk = self.live_disk(serial).expect("disk attached");
        disk.alias.expect("disk alias")
    }

    /// The domain's run state (`virsh domstate`: running, paused, shut off…).
    pub fn state(&self) -> String {
        self.virsh_ok(&["domstate", &self.name]).trim().to_string()
    }

    /// Where [`crate::sequence::MonitorWriter`] writes to the disk with this serial.
    pub fn monitor_disk(&self, serial: &str) -> crate::sequence::MonitorDisk {
        crate::sequence::MonitorDisk {
            uri: self.uri.clone(),
            domain: self.name.clone(),
            device: self.disk_alias(serial),
        }
    }

    /// Runs a qemu-io command inside the domain's QEMU on the disk with this serial, as the
    /// guest would write: through the running block layer (HMP `qemu-io -d <device id>`).
    pub fn qemu_io(&self, serial: &str, cmd: &str) {
        let dev = self.disk_alias(serial);
        let hmp = format!("qemu-io -d {dev} \"{cmd}\"");
        self.virsh_ok(&["qemu-monitor-command", &self.name, "--hmp", &hmp]);
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        for uri in &self.seen {
            destroy_and_undefine(uri, &self.name);
        }
    }
}
