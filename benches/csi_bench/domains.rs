//! KVM domains that are the nodes: q35, no OS, no disks. Names start with
//! `vdt-bench-<pid>-`; each is destroyed and undefined when dropped, and domains of an earlier
//! run whose process is gone are swept first.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const URI: &str = "qemu:///system";
const PREFIX: &str = "vdt-bench-";

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

/// Removes `vdt-bench-` domains whose bench process is gone.
pub fn sweep_stale() {
    for name in virsh_ok(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(PREFIX))
    {
        let pid = name[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            eprintln!("sweeping stale bench domain {name}");
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name]);
        }
    }
}

/// A running, persistent KVM domain without an OS.
pub struct BenchDomain {
    pub name: String,
    pub uuid: String,
}

impl BenchDomain {
    pub fn start() -> BenchDomain {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        // libvirt puts 7 SCSI disks on a virtio-scsi controller and hot-adds another for the
        // next 7. Three are defined up front, as on a VM prepared for hot-plug (21 disks), so
        // no measurement includes a one-off controller hot-add; two spare PCIe ports.
        let ports = "<controller type='pci' model='pcie-root-port'/>".repeat(5);
        let scsi: String = (0..3)
            .map(|i| format!("<controller type='scsi' index='{i}' model='virtio-scsi'/>"))
            .collect();
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='pci' model='pcie-root'/>{ports}{scsi}\
             <memballoon model='none'/></devices></domain>"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        virsh_ok(&["define", file.path().to_str().unwrap()]);
        let dom = BenchDomain {
            uuid: virsh_ok(&["domuuid", &name]).trim().to_string(),
            name,
        };
        virsh_ok(&["start", &dom.name]);
        dom
    }

    /// Domains on the connection (all of them, ours and others'): the plugin reads each.
    pub fn count_all() -> usize {
        virsh_ok(&["list", "--all", "--name"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    }
}

impl Drop for BenchDomain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// Starts `n` domains.
pub fn start_many(n: usize) -> Vec<BenchDomain> {
    sweep_stale();
    (0..n).map(|_| BenchDomain::start()).collect()
}
