//! Throwaway KVM domains for the hot-plug tests: q35, no OS, no disks, a few PCIe root ports.
//! Names start with `vdt-hv-<pid>-`; a `TestDomain` is destroyed and undefined when dropped,
//! also when a test fails. Domains left by a crashed run (dead pid) are swept on first use.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};
use virtdisk_csi::hypervisor::domxml::{DiskXml, DomainXml};

pub const URI: &str = "qemu:///system";
const PREFIX: &str = "vdt-hv-";

fn virsh(args: &[&str]) -> std::process::Output {
    virsh_at(URI, args)
}

/// `virsh -q -c <uri> <args>`.
pub fn virsh_at(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    virsh_ok_at(URI, args)
}

/// `virsh -q -c <uri> <args>` that must succeed; its stdout.
pub fn virsh_ok_at(uri: &str, args: &[&str]) -> String {
    let out = virsh_at(uri, args);
    assert!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts virtlogd and libvirtd if they are not running, once per test binary; sweeps
/// domains of earlier runs whose process is gone.
pub fn ensure_libvirtd() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !virsh(&["version"]).status.success() {
            for daemon in ["virtlogd", "libvirtd"] {
                let _ = Command::new(daemon).arg("-d").status();
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !virsh(&["version"]).status.success() {
                assert!(Instant::now() < deadline, "libvirtd did not come up");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        sweep_stale_domains();
    });
}

fn sweep_stale_domains() {
    sweep_stale_domains_at(URI);
}

/// Destroys and undefines the test domains on `uri` whose test process is gone.
pub fn sweep_stale_domains_at(uri: &str) {
    let names = virsh_ok_at(uri, &["list", "--all", "--name"]);
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(PREFIX))
    {
        let pid = name[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            eprintln!("sweeping stale test domain {name}");
            let _ = virsh_at(uri, &["destroy", name]);
            let _ = virsh_at(uri, &["undefine", name]);
        }
    }
}

/// A running KVM domain without an OS, defined (persistent) and started.
pub struct TestDomain {
    pub name: String,
    pub uuid: String,
    /// The libvirt connection the domain runs on now.
    pub uri: String,
    /// Every connection it was on (a live migration leaves a definition behind).
    seen: Vec<String>,
}

impl TestDomain {
    /// `root_ports` free PCIe slots for hot-plugged devices (each virtio disk and the
    /// virtio-scsi controller take one; the USB controller takes one more).
    pub fn start(tag: &str, root_ports: usize) -> TestDomain {
        Self::boot(tag, root_ports, true)
    }

    /// A transient domain (`virsh create`): no persistent definition.
    pub fn start_transient(tag: &str, root_ports: usize) -> TestDomain {
        Self::boot(tag, root_ports, false)
    }

    /// Like [`TestDomain::start`], on the libvirtd at `uri` (e.g. a second host's).
    pub fn start_on(uri: &str, tag: &str, root_ports: usize) -> TestDomain {
        Self::boot_on(uri, tag, root_ports, true)
    }

    fn boot(tag: &str, root_ports: usize, persistent: bool) -> TestDomain {
        ensure_libvirtd();
        Self::boot_on(URI, tag, root_ports, persistent)
    }

    fn boot_on(uri: &str, tag: &str, root_ports: usize, persistent: bool) -> TestDomain {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ports = "<controller type='pci' model='pcie-root-port'/>".repeat(root_ports + 1);
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' model='pcie-root'/>{ports}\
             <memballoon model='none'/></devices></domain>"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        let path = file.path().to_str().unwrap();
        virsh_ok_at(uri, &[if persistent { "define" } else { "create" }, path]);
        let dom = TestDomain {
            uuid: virsh_ok_at(uri, &["domuuid", &name]).trim().to_string(),
            name,
            uri: uri.to_string(),
            seen: vec![uri.to_string()],
        };
        if persistent {
            virsh_ok_at(uri, &["start", &dom.name]);
        }
        dom
    }

    /// `virsh -c <uri of the domain now> <args>`, must succeed.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        virsh_ok_at(&self.uri, args)
    }

    /// `virsh migrate --live` to the libvirtd at `to` (`--unsafe`: the test pools lie on a
    /// local filesystem that libvirt cannot know both hosts share). Returns how long it took.
    pub fn migrate_live(&mut self, to: &str) -> Duration {
        let started = Instant::now();
        self.virsh_ok(&["migrate", "--live", "--unsafe", &self.name, to]);
        self.uri = to.to_string();
        if !self.seen.iter().any(|u| u == to) {
            self.seen.push(to.to_string());
        }
        started.elapsed()
    }

    pub fn live(&self) -> DomainXml {
        DomainXml::parse(&self.virsh_ok(&["dumpxml", &self.name])).unwrap()
    }

    pub fn inactive(&self) -> DomainXml {
        DomainXml::parse(&self.virsh_ok(&["dumpxml", "--inactive", &self.name])).unwrap()
    }

    /// The persistent definition of the domain on `uri` (e.g. the one a migration left).
    pub fn inactive_at(&self, uri: &str) -> DomainXml {
        DomainXml::parse(&virsh_ok_at(uri, &["dumpxml", "--inactive", &self.name])).unwrap()
    }

    pub fn live_disk(&self, serial: &str) -> Option<DiskXml> {
        self.live().disk_by_serial(serial).cloned()
    }

    pub fn inactive_disk(&self, serial: &str) -> Option<DiskXml> {
        self.inactive().disk_by_serial(serial).cloned()
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

    pub fn has_scsi_controller(&self) -> bool {
        self.live().has_scsi_controller
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        for uri in &self.seen {
            let _ = virsh_at(uri, &["destroy", &self.name]);
            let _ = virsh_at(uri, &["undefine", &self.name]);
        }
    }
}

/// The serial the plugin gives a volume's disk.
pub fn serial_of(volume_id: &str) -> String {
    let key = volume_id.rsplit_once('.').unwrap().1;
    format!("vd-{key}")
}

/// Lets libvirt's QEMU (user libvirt-qemu) reach pool images under a test temp dir: tempdirs
/// are 0700, the pool directories below them 0755.
pub fn open_for_qemu(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Milliseconds since `t`, for the latency lines the tests print.
pub fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}
