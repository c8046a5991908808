//! The contract of `Attacher::snapshot_live` for the libvirt backend, against real KVM domains
//! (no guest OS) and the library directly: Ok only once the domain writes to the new overlay,
//! an error only while it still writes the old image — also when libvirt itself fails — and a
//! repeated switch (a retry after a lost reply) is a no-op.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use virtdisk_csi::attach::Attacher;
use virtdisk_csi::hypervisor::{Hypervisor, HypervisorConfig, NodeIdKind, PoolImages};
use virtdisk_csi::ids::VolumeId;
use virtdisk_test_support::qemu::{create_overlay, create_qcow2};
use virtdisk_test_support::virsh::{virsh_ok, URI};
use virtdisk_test_support::{open_for_qemu, TestDomain};

const SIZE: u64 = 64 << 20;

/// A pool-like images dir QEMU can reach, and a backend that knows it as pool `default`.
struct Bed {
    _dir: tempfile::TempDir,
    images: PathBuf,
    hv: Hypervisor,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        open_for_qemu(dir.path());
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        open_for_qemu(&images);
        let hv = Hypervisor::new(HypervisorConfig::single(
            URI,
            vec![PoolImages {
                pool: "default".into(),
                images_dir: images.clone(),
            }],
            Duration::from_secs(2),
            NodeIdKind::Uuid,
        ));
        Bed {
            _dir: dir,
            images,
            hv,
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }
}

/// An overlay as the pool makes it: qcow2, backing named relative to its directory.
fn overlay(path: &Path, backing: &str, size: u64) {
    create_overlay(path, backing, Some(size));
}

/// A domain with the volume's base image attached, in a bed.
fn attached(tag: &str) -> (TestDomain, Bed, PathBuf) {
    let dom = TestDomain::with_guest_agent(tag);
    let bed = Bed::new();
    let base = bed.image("0123456789abcdef.qcow2");
    create_qcow2(&base, SIZE);
    attach(&dom, &bed.images, &base, SERIAL);
    (dom, bed, base)
}

/// Attaches `image` as a persistent SCSI disk with the volume's serial.
fn attach(dom: &TestDomain, dir: &Path, image: &Path, serial: &str) {
    let xml = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='sda' bus='scsi'/><serial>{serial}</serial></disk>",
        image.display()
    );
    let file = dir.join("disk.xml");
    std::fs::write(&file, xml).unwrap();
    virsh_ok(&[
        "attach-device",
        &dom.name,
        file.to_str().unwrap(),
        "--live",
        "--config",
    ]);
}

fn source(dom: &TestDomain, serial: &str) -> Option<PathBuf> {
    dom.live_disk(serial).and_then(|d| d.source)
}

const VOLUME: &str = "default.0123456789abcdef";
const SERIAL: &str = "vd-0123456789abcdef";

fn volume() -> VolumeId {
    VolumeId::parse("volume id", VOLUME).unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_then_repeat_is_a_no_op() {
    let (dom, bed, _) = attached("repeat");
    let next = bed.image("0123456789abcdef-1.qcow2");
    overlay(&next, "0123456789abcdef.qcow2", SIZE);

    let live = bed
        .hv
        .snapshot_live(&dom.uuid, &volume(), &next)
        .await
        .unwrap();
    assert!(!live.quiesced, "no guest agent is connected");
    assert_eq!(source(&dom, SERIAL), Some(next.clone()));
    assert_eq!(
        dom.inactive_disk(SERIAL).unwrap().source,
        Some(next.clone())
    );
    // The same switch again (the reply was lost): Ok, nothing changes.
    bed.hv
        .snapshot_live(&dom.uuid, &volume(), &next)
        .await
        .unwrap();
    assert_eq!(source(&dom, SERIAL), Some(next.clone()));
    // attachments() still maps the disk to the volume.
    let atts = bed.hv.attachments().await.unwrap();
    assert!(
        atts.iter()
            .any(|a| a.volume_id == VOLUME && a.node_id == dom.uuid),
        "{atts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_or_failed_switches_leave_the_domain_on_its_image() {
    let (dom, bed, base) = attached("refuse");
    let snapshot = |o: PathBuf| {
        let hv = bed.hv.clone();
        let uuid = dom.uuid.clone();
        async move { hv.snapshot_live(&uuid, &volume(), &o).await }
    };

    // Backed by another image than the one the disk reads.
    create_qcow2(&bed.image("ffffffffffffffff.qcow2"), SIZE);
    let wrong = bed.image("0123456789abcdef-1.qcow2");
    overlay(&wrong, "ffffffffffffffff.qcow2", SIZE);
    let err = snapshot(wrong).await.unwrap_err();
    eprintln!("wrong backing: {err}");
    assert_eq!(source(&dom, SERIAL), Some(base.clone()));

    // Smaller than the disk the guest sees.
    let small = bed.image("0123456789abcdef-2.qcow2");
    overlay(&small, "0123456789abcdef.qcow2", SIZE / 2);
    let err = snapshot(small).await.unwrap_err();
    assert!(err.to_string().contains("must not shrink"), "{err}");
    assert_eq!(source(&dom, SERIAL), Some(base.clone()));

    // Outside every pool: attachments() would lose the disk.
    let outside = bed
        .images
        .parent()
        .unwrap()
        .join("0123456789abcdef-3.qcow2");
    overlay(&outside, "images/0123456789abcdef.qcow2", SIZE);
    assert!(snapshot(outside).await.is_err());
    assert_eq!(source(&dom, SERIAL), Some(base.clone()));

    // libvirt/QEMU refuse the switch: another process holds the overlay's write lock.
    let locked = bed.image("0123456789abcdef-4.qcow2");
    overlay(&locked, "0123456789abcdef.qcow2", SIZE);
    // Opened without its backing file (which the domain holds): locks the overlay alone.
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        locked.display()
    );
    let mut holder = Command::new("qemu-io")
        .args(["-c", "sleep 20000", &spec])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let res = snapshot(locked.clone()).await;
    let _ = holder.kill();
    let _ = holder.wait();
    let err = res.unwrap_err();
    eprintln!("locked overlay: {err}");
    assert_eq!(source(&dom, SERIAL), Some(base.clone()));
    assert_eq!(
        dom.inactive_disk(SERIAL).unwrap().source,
        Some(base.clone())
    );

    // The same overlay works once nothing else holds it.
    bed.hv
        .snapshot_live(&dom.uuid, &volume(), &locked)
        .await
        .unwrap();
    assert_eq!(source(&dom, SERIAL), Some(locked));
}
