//! The machine's floor: the same work the plugin does, done bare (no plugin, no gRPC), in the
//! same run, so each figure can be read as a ratio to what the tools themselves cost.

use super::stats::Samples;
use std::path::Path;
use std::time::{Duration, Instant};
use virtdisk_csi::attach::DiskSpec;
use virtdisk_csi::hypervisor::diskxml;
use virtdisk_csi::ids::VolumeId;
use virtdisk_csi::model::ImageFormat;
use virtdisk_csi::params::{Bus, DiskOptions};
pub use virtdisk_test_support::run_ok;

fn timed_cmd(s: &mut Samples, program: &str, args: &[&str]) {
    let t = Instant::now();
    run_ok(program, args);
    s.push(t.elapsed());
}

/// `n` times `qemu-img create -q -f qcow2 <args> <dir>/<name>-<i>.qcow2 [size]`, timed; each
/// image is removed again.
fn qemu_img_creates(
    dir: &Path,
    name: &str,
    args: &[&str],
    size: Option<&str>,
    n: usize,
) -> Samples {
    let mut s = Samples::default();
    for i in 0..n {
        let p = dir.join(format!("{name}-{i}.qcow2"));
        let mut all = vec!["create", "-q", "-f", "qcow2"];
        all.extend(args);
        all.push(p.to_str().unwrap());
        all.extend(size);
        timed_cmd(&mut s, "qemu-img", &all);
        let _ = std::fs::remove_file(&p);
    }
    s
}

/// `qemu-img create -f qcow2 <size>`, one process per image (what CreateVolume runs).
pub fn qemu_img_create(dir: &Path, size: &str, n: usize) -> Samples {
    qemu_img_creates(dir, "floor", &[], Some(size), n)
}

/// `qemu-img create -b <base>`: an overlay, what snapshots, restores and clones create.
pub fn qemu_img_overlay(dir: &Path, base: &Path, n: usize) -> Samples {
    let backing = ["-F", "qcow2", "-b", base.to_str().unwrap()];
    qemu_img_creates(dir, "floor-overlay", &backing, None, n)
}

/// Bare libvirt hot-plug through the library the plugin uses (one open connection), in the
/// order given (image i to domain i): attach (LIVE|CONFIG, as persist=true) + one live XML
/// read to confirm; then in the same order detach LIVE, re-read until gone, detach CONFIG.
/// Returns (attach, detach).
pub fn libvirt_attach_detach(plan: &[(String, std::path::PathBuf)]) -> (Samples, Samples) {
    use virt::connect::Connect;
    use virt::sys;
    let live = sys::VIR_DOMAIN_AFFECT_LIVE;
    let config = sys::VIR_DOMAIN_AFFECT_CONFIG;
    let conn = Connect::open(Some(virtdisk_test_support::virsh::URI)).expect("libvirt connection");
    let mut attach = Samples::default();
    let mut detach = Samples::default();
    let mut attached = Vec::new();
    let mut per_domain: std::collections::HashMap<&str, usize> = Default::default();
    for (i, (domain, image)) in plan.iter().enumerate() {
        let dom = conn.lookup_domain_by_name(domain).expect("bench domain");
        // The targets the plugin picks (it runs when these are gone): libvirt places a
        // disk on the SCSI controller its target index names (7 per controller).
        let n = per_domain.entry(domain.as_str()).or_default();
        let target = diskxml::target_name(Bus::Scsi, *n);
        *n += 1;
        let key = format!("f{i:015x}");
        let serial = format!("vd-{key}");
        let spec = DiskSpec {
            volume_id: VolumeId::parse("volume id", &format!("floor.{key}"))
                .unwrap()
                .expect("an id of ours"),
            serial: serial.clone(),
            image: image.clone(),
            format: ImageFormat::Qcow2,
            options: DiskOptions::default(),
            readonly: false,
            shareable: false,
        };
        let xml = diskxml::disk_xml(&spec, &target).unwrap();
        let t = Instant::now();
        dom.attach_device_flags(&xml, live | config)
            .expect("bare attach");
        let there = dom.xml_desc(0).unwrap().contains(&serial);
        attach.push(t.elapsed());
        assert!(there, "bare attach: {serial} not in the live XML");
        attached.push((dom, target, serial));
    }
    for (dom, target, serial) in attached {
        let xml = diskxml::detach_xml(&target, "scsi").unwrap();
        let t = Instant::now();
        dom.detach_device_flags(&xml, live).expect("bare detach");
        let deadline = Instant::now() + Duration::from_secs(20);
        while dom.xml_desc(0).unwrap().contains(&serial) {
            assert!(Instant::now() < deadline, "bare detach: {serial} stays");
            std::thread::sleep(Duration::from_millis(1));
        }
        dom.detach_device_flags(&xml, config).expect("bare detach");
        detach.push(t.elapsed());
    }
    (attach, detach)
}

/// What local attach and NodeStage run, bare: a qemu-storage-daemon exporting a fresh 1 GiB
/// qcow2 image over FUSE (`--daemonize` returns once the export is mounted) and `losetup` on
/// the export (→ the attach samples); then mkfs with the plugin's options and mount on that
/// loop device (→ the stage samples). Same device stack as the plugin, no plugin.
pub fn local_attach(dir: &Path, fs: &str, n: usize) -> (Samples, Samples) {
    let (mut attach, mut stage) = (Samples::default(), Samples::default());
    let mnt = dir.join(format!("floor-mnt-{fs}"));
    std::fs::create_dir_all(&mnt).unwrap();
    for i in 0..n {
        let image = dir.join(format!("floor-qsd-{fs}-{i}.qcow2"));
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1G"],
        );
        let export = dir.join(format!("floor-qsd-{fs}-{i}.export"));
        std::fs::write(&export, b"").unwrap();
        let pidfile = dir.join(format!("floor-qsd-{fs}-{i}.pid"));
        let file = serde_json::json!({"driver": "file", "node-name": "file0",
            "filename": image});
        let fmt = serde_json::json!({"driver": "qcow2", "node-name": "disk0", "file": "file0"});
        let exp = serde_json::json!({"type": "fuse", "id": "exp0", "node-name": "disk0",
            "mountpoint": export, "writable": true});
        let t = Instant::now();
        run_ok(
            "qemu-storage-daemon",
            &[
                "--daemonize",
                "--pidfile",
                pidfile.to_str().unwrap(),
                "--blockdev",
                &file.to_string(),
                "--blockdev",
                &fmt.to_string(),
                "--export",
                &exp.to_string(),
            ],
        );
        let dev = run_ok("losetup", &["--find", "--show", export.to_str().unwrap()])
            .trim()
            .to_string();
        attach.push(t.elapsed());
        let t = Instant::now();
        match fs {
            "ext4" => run_ok(
                "mkfs.ext4",
                &["-q", "-F", "-m", "0", "-E", "nodiscard", &dev],
            ),
            _ => run_ok("mkfs.xfs", &["-q", "-K", &dev]),
        };
        run_ok("mount", &["-t", fs, &dev, mnt.to_str().unwrap()]);
        stage.push(t.elapsed());
        run_ok("umount", &[mnt.to_str().unwrap()]);
        run_ok("losetup", &["-d", &dev]);
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(&export);
    }
    (attach, stage)
}

/// One durable record write as the plugin does it (temp file, fsync, rename, fsync the
/// directory): every state change of a volume or snapshot costs at least one.
pub fn durable_write(dir: &Path, n: usize) -> Samples {
    let mut s = Samples::default();
    let value =
        serde_json::json!({"schema": 1, "id": "default.0123456789abcdef", "pad": "x".repeat(600)});
    for i in 0..n {
        let p = dir.join(format!("floor-record-{i}.json"));
        let t = Instant::now();
        virtdisk_csi::fsutil::write_json(&p, &value).unwrap();
        s.push(t.elapsed());
        let _ = std::fs::remove_file(&p);
    }
    s
}
