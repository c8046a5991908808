//! A throwaway KVM domain (q35, no OS, no disks) playing a second Nomad client node: its UUID
//! is what a node plugin inside it would report. Names start with `vdt-nomad-<pid>-`; the
//! domain is destroyed and undefined on drop, also when the test fails, and domains of earlier
//! runs whose process is gone are swept on first use.

use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";
const PREFIX: &str = "vdt-nomad-";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// libvirtd answers (started if needed), and stale domains of dead test runs are gone.
fn ensure_libvirtd() {
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
        for name in virsh_ok(&["list", "--all", "--name"])
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(PREFIX))
        {
            let pid = name[PREFIX.len()..]
                .split('-')
                .next()
                .and_then(|p| p.parse::<i32>().ok());
            if !pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
                eprintln!("sweeping stale test domain {name}");
                let _ = virsh(&["destroy", name]);
                let _ = virsh(&["undefine", name]);
            }
        }
    });
}

pub struct TestDomain {
    pub name: String,
    pub uuid: String,
}

impl TestDomain {
    /// A running, persistent domain with two free PCIe root ports.
    pub fn start(tag: &str) -> TestDomain {
        ensure_libvirtd();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let ports = "<controller type='pci' model='pcie-root-port'/>".repeat(3);
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' model='pcie-root'/>{ports}\
             <memballoon model='none'/></devices></domain>"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        virsh_ok(&["define", file.path().to_str().unwrap()]);
        let dom = TestDomain {
            uuid: virsh_ok(&["domuuid", &name]).trim().to_string(),
            name,
        };
        virsh_ok(&["start", &dom.name]);
        dom
    }

    /// Whether the live XML holds a disk with this serial.
    pub fn has_disk(&self, serial: &str) -> bool {
        virsh_ok(&["dumpxml", &self.name]).contains(&format!("<serial>{serial}</serial>"))
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// Lets libvirt's QEMU (user libvirt-qemu) reach pool images under a 0700 test temp dir.
pub fn open_for_qemu(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}
