//! Throwaway KVM domains for the live snapshot tests (a trimmed copy of the hot-plug tests'
//! helpers): q35, no OS, a few PCIe root ports, a virtio-scsi controller, a qemu-guest-agent channel (never connected:
//! there is no guest). Names start with `vdt-live-<pid>-`; a `TestDomain` is destroyed and
//! undefined when dropped, also when a test fails. Domains left by a crashed run (dead pid)
//! are swept on first use.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};
use virtdisk_csi::hypervisor::domxml::{DiskXml, DomainXml};

pub const URI: &str = "qemu:///system";
const PREFIX: &str = "vdt-live-";

pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
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
        let names = virsh_ok(&["list", "--all", "--name"]);
        for name in names
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(PREFIX))
        {
            let pid = name[PREFIX.len()..]
                .split('-')
                .next()
                .and_then(|p| p.parse::<i32>().ok());
            // Only names this helper made (`<prefix><pid>-…`) of a process that is gone.
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                eprintln!("sweeping stale test domain {name}");
                let _ = virsh(&["destroy", name]);
                let _ = virsh(&["undefine", name]);
            }
        }
    });
}

/// A running KVM domain without an OS, defined (persistent) and started.
pub struct TestDomain {
    pub name: String,
    pub uuid: String,
}

impl TestDomain {
    pub fn start(tag: &str) -> TestDomain {
        ensure_libvirtd();
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ports = "<controller type='pci' model='pcie-root-port'/>".repeat(6);
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' model='pcie-root'/>{ports}\
             <controller type='scsi' model='virtio-scsi'/>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <memballoon model='none'/></devices></domain>"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        virsh_ok(&["define", file.path().to_str().unwrap()]);
        let dom = TestDomain {
            uuid: virsh_ok(&["domuuid", &name]).trim().to_string(),
            name,
        };
        dom.power_on();
        dom
    }

    pub fn live(&self) -> DomainXml {
        DomainXml::parse(&virsh_ok(&["dumpxml", &self.name])).unwrap()
    }

    pub fn inactive(&self) -> DomainXml {
        DomainXml::parse(&virsh_ok(&["dumpxml", "--inactive", &self.name])).unwrap()
    }

    pub fn live_disk(&self, serial: &str) -> Option<DiskXml> {
        self.live().disk_by_serial(serial).cloned()
    }

    pub fn inactive_disk(&self, serial: &str) -> Option<DiskXml> {
        self.inactive().disk_by_serial(serial).cloned()
    }

    /// The capacity the domain reports for a disk (`virsh domblkinfo`).
    pub fn capacity(&self, target: &str) -> u64 {
        let out = virsh_ok(&["domblkinfo", &self.name, target]);
        out.lines()
            .find_map(|l| l.strip_prefix("Capacity:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no capacity in {out}"))
    }

    /// Runs a qemu-io command inside the domain's QEMU on the disk with this serial, as the
    /// guest would write: through the running block layer (HMP `qemu-io -d <device id>`).
    pub fn qemu_io(&self, serial: &str, cmd: &str) {
        let disk = self.live_disk(serial).expect("disk attached");
        let dev = disk.alias.expect("disk alias");
        virsh_ok(&[
            "qemu-monitor-command",
            &self.name,
            "--hmp",
            &format!("qemu-io -d {dev} \"{cmd}\""),
        ]);
    }

    /// Powers the domain off (its persistent definition stays).
    pub fn power_off(&self) {
        virsh_ok(&["destroy", &self.name]);
    }

    pub fn power_on(&self) {
        virsh_ok(&["start", &self.name]);
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// The serial the plugin gives a volume's disk.
pub fn serial_of(volume_id: &str) -> String {
    format!("vd-{}", key_of(volume_id))
}

pub fn key_of(id: &str) -> &str {
    id.rsplit_once('.').unwrap().1
}

/// Lets libvirt's QEMU (user libvirt-qemu) reach pool images under a test temp dir: tempdirs
/// are 0700, the pool directories below them 0755.
pub fn open_for_qemu(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs one host-side qemu-io command on an image; `-U` (force share) since the domain may
/// hold it. Returns whether it succeeded (a pattern mismatch is a failure).
pub fn host_qemu_io(image: &Path, cmd: &str) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    if cmd.starts_with("read") {
        c.args(["-r", "-U"]);
    }
    let out = c
        .args(["-f", "qcow2", "-c", cmd])
        .arg(image)
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

pub fn assert_reads(image: &Path, pattern: u8, offset: u64, len: u64) {
    let (ok, text) = host_qemu_io(image, &format!("read -P {pattern:#x} {offset} {len}"));
    assert!(
        ok,
        "{} should read {pattern:#x} at {offset}: {text}",
        image.display()
    );
}

pub fn write_pattern(image: &Path, pattern: u8, offset: u64, len: u64) {
    let (ok, text) = host_qemu_io(image, &format!("write -P {pattern:#x} {offset} {len}"));
    assert!(ok, "qemu-io write into {}: {text}", image.display());
}

/// Milliseconds since `t`, for the latency lines the tests print.
pub fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}
