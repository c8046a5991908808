//! The contract of `Attacher::snapshot_live` for the libvirt backend, against real KVM domains
//! (no guest OS) and the library directly: Ok only once the domain writes to the new overlay(s),
//! an error only while it still writes the old image(s) — also when libvirt itself fails — a
//! repeated switch (a retry after a lost reply) is a no-op, and several disks switch in one
//! operation, all or none.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use virtdisk_csi::attach::{Attacher, LiveMember};
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
    attach(&dom, &bed.images, &base, SERIAL, "sda");
    (dom, bed, base)
}

/// Attaches `image` as a persistent SCSI disk `target` with the volume's serial.
fn attach(dom: &TestDomain, dir: &Path, image: &Path, serial: &str, target: &str) {
    let xml = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='{target}' bus='scsi'/><serial>{serial}</serial></disk>",
        image.display()
    );
    let file = dir.join(format!("disk-{target}.xml"));
    std::fs::write(&file, xml).unwrap();
    virsh_ok(&[
        "attach-device",
        &dom.name,
        file.to_str().unwrap(),
        "--live",
        "--config",
    ]);
}

/// A qemu-io process holding the write lock of `overlay` until dropped: opened without its
/// backing file (which the domain holds), it locks the overlay alone.
struct LockHolder(std::process::Child);

fn hold_write_lock(overlay: &Path) -> LockHolder {
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        overlay.display()
    );
    let mut holder = Command::new("qemu-io")
        .args(["-c", "sleep 20000", &spec])
        .spawn()
        .unwrap();
    // Held once qemu-io has opened the image, however long it takes to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !virtdisk_test_support::qemu::is_locked(overlay) {
        if let Ok(Some(status)) = holder.try_wait() {
            panic!(
                "qemu-io exited ({status}) before it locked {}",
                overlay.display()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io did not lock {} within 30 s",
            overlay.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    LockHolder(holder)
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn source(dom: &TestDomain, serial: &str) -> Option<PathBuf> {
    dom.live_disk(serial).and_then(|d| d.source)
}

const VOLUME: &str = "default.0123456789abcdef";
const SERIAL: &str = "vd-0123456789abcdef";

fn volume(id: &str) -> VolumeId {
    VolumeId::parse("volume id", id).unwrap().unwrap()
}

/// The one member `snapshot_live` switches: VOLUME onto `overlay`.
fn onto(overlay: &Path) -> Vec<LiveMember> {
    vec![LiveMember {
        volume_id: volume(VOLUME),
        overlay: overlay.to_path_buf(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_then_repeat_is_a_no_op() {
    let (dom, bed, _) = attached("repeat");
    let next = bed.image("0123456789abcdef-1.qcow2");
    overlay(&next, "0123456789abcdef.qcow2", SIZE);

    bed.hv.snapshot_live(&dom.uuid, &onto(&next)).await.unwrap();
    assert!(
        !bed.hv.guest_agent(&dom.uuid, &[]).await.unwrap(),
        "no guest agent is connected"
    );
    assert_eq!(source(&dom, SERIAL), Some(next.clone()));
    assert_eq!(
        dom.inactive_disk(SERIAL).unwrap().source,
        Some(next.clone())
    );
    // The same switch again (the reply was lost): Ok, nothing changes.
    bed.hv.snapshot_live(&dom.uuid, &onto(&next)).await.unwrap();
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
        async move { hv.snapshot_live(&uuid, &onto(&o)).await }
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
    let holder = hold_write_lock(&locked);
    let res = snapshot(locked.clone()).await;
    drop(holder);
    let err = res.unwrap_err();
    eprintln!("locked overlay: {err}");
    assert_eq!(source(&dom, SERIAL), Some(base.clone()));
    assert_eq!(
        dom.inactive_disk(SERIAL).unwrap().source,
        Some(base.clone())
    );

    // The same overlay works once nothing else holds it.
    bed.hv
        .snapshot_live(&dom.uuid, &onto(&locked))
        .await
        .unwrap();
    assert_eq!(source(&dom, SERIAL), Some(locked));
}

/// Two disks of one domain in one call: switched together; when QEMU refuses one (another
/// process holds its overlay), the transaction leaves both on their images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_switch_together_or_not_at_all() {
    let (dom, bed, base) = attached("pair");
    const VOLUME2: &str = "default.0123456789abcdee";
    const SERIAL2: &str = "vd-0123456789abcdee";
    let base2 = bed.image("0123456789abcdee.qcow2");
    create_qcow2(&base2, SIZE);
    attach(&dom, &bed.images, &base2, SERIAL2, "sdb");
    let pair = |a: &Path, b: &Path| {
        vec![
            LiveMember {
                volume_id: volume(VOLUME),
                overlay: a.to_path_buf(),
            },
            LiveMember {
                volume_id: volume(VOLUME2),
                overlay: b.to_path_buf(),
            },
        ]
    };

    // QEMU refuses the second overlay (write-locked elsewhere): neither disk switches.
    let a1 = bed.image("0123456789abcdef-1.qcow2");
    overlay(&a1, "0123456789abcdef.qcow2", SIZE);
    let b1 = bed.image("0123456789abcdee-1.qcow2");
    overlay(&b1, "0123456789abcdee.qcow2", SIZE);
    let holder = hold_write_lock(&b1);
    let res = bed.hv.snapshot_live(&dom.uuid, &pair(&a1, &b1)).await;
    drop(holder);
    let err = res.unwrap_err();
    eprintln!("one overlay locked: {err}");
    assert_eq!(source(&dom, SERIAL), Some(base.clone()), "all or none");
    assert_eq!(source(&dom, SERIAL2), Some(base2.clone()), "all or none");

    // Both free: one call switches both.
    bed.hv
        .snapshot_live(&dom.uuid, &pair(&a1, &b1))
        .await
        .unwrap();
    assert_eq!(source(&dom, SERIAL), Some(a1.clone()));
    assert_eq!(source(&dom, SERIAL2), Some(b1.clone()));
    assert_eq!(dom.inactive_disk(SERIAL).unwrap().source, Some(a1));
    assert_eq!(dom.inactive_disk(SERIAL2).unwrap().source, Some(b1));
}
