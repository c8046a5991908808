//! Snapshots and clones of volumes attached read-write to running KVM domains (no guest OS),
//! against the real libvirtd, QEMU and qemu-img, driving the real binary: the domain switches
//! to the new overlay live (external disk-only snapshot), its persistent definition follows,
//! the snapshot keeps the point in time (also data the domain wrote just before it), and the
//! data the domain writes afterwards lands in the overlay only.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::path::{Path, PathBuf};
use std::time::Instant;
use virtdisk_test_support::pool::{check_all_layers, layer_files, snapshot_layer, volume_image};
use virtdisk_test_support::pool::{snapshot_record, volume_record};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::backing_of;
use virtdisk_test_support::virsh::virsh_ok;

const VOL: i64 = 64 * MIB;
const K64: u64 = 64 * 1024;

async fn controller() -> Plugin {
    let launch = Plugin::launch("controller").config("[libvirt]\ndetach_timeout_secs = 2\n");
    launch.readable_by_qemu().start().await
}

/// A domain, a controller, and a volume `name` (not attached) whose first 64 KiB are 0xaa.
async fn setup(tag: &str, name: &str) -> (TestDomain, Plugin, String, String, PathBuf) {
    let dom = TestDomain::with_guest_agent(tag);
    let p = controller().await;
    let vol = create(&p, name, None).await;
    let serial = serial_of(&vol);
    let first = image_of(&p, &vol);
    write_pattern(&first, 0xaa, 0, K64);
    (dom, p, vol, serial, first)
}

fn image_of(p: &Plugin, volume_id: &str) -> PathBuf {
    volume_image(&p.pool_dir(), volume_id)
}

fn layer_of(p: &Plugin, snapshot_id: &str) -> PathBuf {
    snapshot_layer(&p.pool_dir(), snapshot_id)
}

async fn create(p: &Plugin, name: &str, source: Option<Source>) -> String {
    let req = match source {
        Some(source) => create_from_req(name, VOL, source),
        None => create_req(name, VOL),
    };
    let vol = p.controller().create(req).await;
    vol.unwrap_or_else(|e| panic!("create volume {name}: {e:?}"))
        .volume_id
}

async fn snapshot(p: &Plugin, name: &str, source: &str) -> csi::Snapshot {
    let t = Instant::now();
    let snap = p.controller().snapshot(snapshot_req(name, source)).await;
    let snap = snap.unwrap_or_else(|e| panic!("snapshot {name}: {e:?}"));
    eprintln!("snapshot {name} of {source}: {} ms", ms(t));
    snap
}

async fn publish(p: &Plugin, volume: &str, node: &str) {
    let r = p.controller().publish(publish_req(volume, node)).await;
    r.expect("publish");
}

async fn unpublish(p: &Plugin, volume: &str, node: &str) {
    let r = p.controller().unpublish(unpublish_req(volume, node)).await;
    r.expect("unpublish");
}

async fn published_nodes(p: &Plugin, volume: &str) -> Vec<String> {
    p.controller().published_nodes(volume).await
}

/// Deletes the volumes and snapshots; then no layer file is left.
async fn delete_all(p: &Plugin, volumes: &[&String], snapshots: &[&String]) {
    let mut c = p.controller();
    for id in volumes {
        let r = c.delete(id).await;
        r.unwrap_or_else(|e| panic!("delete volume {id}: {e:?}"));
    }
    for id in snapshots {
        let r = c.remove_snapshot(id).await;
        r.unwrap_or_else(|e| panic!("delete snapshot {id}: {e:?}"));
    }
    assert_eq!(
        layer_files(&p.pool_dir()),
        Vec::<PathBuf>::new(),
        "images/ is empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_clone_of_an_attached_volume() {
    // 0xaa written before the volume is attached.
    let (dom, mut p, vol, serial, first) = setup("main", "live-src").await;
    publish(&p, &vol, &dom.uuid).await;
    let disk = dom.live_disk(&serial).expect("attached");
    assert_eq!(disk.source.as_deref(), Some(first.as_path()));
    // Written by the domain just before the snapshot, not flushed: the switch must take it.
    dom.qemu_io(&serial, &format!("write -P 0xcc {K64} {K64}"));

    let snap = snapshot(&p, "live-snap", &vol).await;
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, VOL);
    let layer = layer_of(&p, &snap.snapshot_id);
    assert_eq!(
        layer, first,
        "the image the domain wrote is the snapshot's layer"
    );
    // No guest agent answers in a domain without an OS: a crash-consistent snapshot.
    let record = snapshot_record(&p.pool_dir(), &snap.snapshot_id);
    assert_eq!(record["quiesced"], false);

    // The domain now writes to the new overlay, live and after a restart.
    let overlay = image_of(&p, &vol);
    assert_ne!(overlay, first);
    assert_eq!(
        backing_of(&overlay).as_deref(),
        first.file_name().unwrap().to_str()
    );
    let live = dom.live_disk(&serial).expect("still attached");
    assert_eq!(live.source.as_deref(), Some(overlay.as_path()));
    assert_eq!(live.target, disk.target);
    let persistent = dom.inactive_disk(&serial).expect("persist=true");
    assert_eq!(persistent.source.as_deref(), Some(overlay.as_path()));
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);
    assert!(
        p.log()
            .contains("live snapshot: the domain writes to the new overlay"),
        "{}",
        p.log()
    );

    // Written by the domain after the snapshot: only the overlay sees it.
    dom.qemu_io(&serial, &format!("write -P 0xbb 0 {K64}"));
    dom.qemu_io(&serial, "flush");
    assert_pattern(&overlay, 0xbb, 0, K64);
    assert_pattern(&layer, 0xaa, 0, K64);
    assert_pattern(&layer, 0xcc, K64, K64);

    let restored = create(&p, "live-restored", Some(from_snapshot(&snap.snapshot_id))).await;
    let restored_image = image_of(&p, &restored);
    assert_pattern(&restored_image, 0xaa, 0, K64);
    assert_pattern(&restored_image, 0xcc, K64, K64);
    // The frozen layer stays readable by QEMU: the restore, which reads through it, attaches
    // to the same domain while the source (whose chain holds it too) stays attached.
    publish(&p, &restored, &dom.uuid).await;
    let restored_serial = serial_of(&restored);
    dom.qemu_io(&restored_serial, &format!("write -P 0xee 0 {K64}"));
    dom.qemu_io(&restored_serial, "flush");
    assert_pattern(&restored_image, 0xee, 0, K64);
    assert_pattern(&restored_image, 0xcc, K64, K64);
    assert_pattern(&layer, 0xaa, 0, K64);
    unpublish(&p, &restored, &dom.uuid).await;

    // A clone of the attached volume freezes it live as well and sees its current data.
    let t = Instant::now();
    let clone = create(&p, "live-clone", Some(from_volume(&vol))).await;
    eprintln!("clone of the attached volume: {} ms", ms(t));
    let clone_image = image_of(&p, &clone);
    assert_pattern(&clone_image, 0xbb, 0, K64);
    assert_pattern(&clone_image, 0xcc, K64, K64);
    let top = image_of(&p, &vol);
    assert_ne!(top, overlay);
    assert_eq!(
        dom.live_disk(&serial).unwrap().source.as_deref(),
        Some(top.as_path())
    );
    assert_eq!(
        dom.inactive_disk(&serial).unwrap().source.as_deref(),
        Some(top.as_path())
    );

    // Online expansion after live snapshots grows the top layer the domain writes to.
    let r = p.controller().expand(expand_req(&vol, 2 * VOL)).await;
    r.expect("expand online");
    assert_eq!(dom.capacity(&disk.target), 2 * VOL as u64);
    assert_eq!(qemu_img_info(&top)["virtual-size"], 2 * VOL);

    // A restarted controller still finds the disk (its source is the overlay now) and can
    // snapshot it live again.
    p.restart().await;
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);
    // A power cycle boots from the persistent definition libvirt updated: the top layer
    // with its chain under it.
    dom.power_off();
    dom.power_on();
    assert_eq!(
        dom.live_disk(&serial).unwrap().source.as_deref(),
        Some(top.as_path())
    );
    dom.qemu_io(&serial, &format!("write -P 0xdd 0 {K64}"));
    let snap2 = snapshot(&p, "live-snap-2", &vol).await;
    assert!(snap2.ready_to_use);
    assert_eq!(snap2.size_bytes, 2 * VOL);
    assert_pattern(&layer_of(&p, &snap2.snapshot_id), 0xdd, 0, K64);
    assert_eq!(
        dom.live_disk(&serial).unwrap().source.as_deref(),
        Some(image_of(&p, &vol).as_path())
    );
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);

    unpublish(&p, &vol, &dom.uuid).await;
    assert!(dom.live_disk(&serial).is_none());
    assert!(dom.inactive_disk(&serial).is_none());
    assert!(published_nodes(&p, &vol).await.is_empty());
    let layers = check_all_layers(&p.pool_dir());
    eprintln!("{layers} layer files, all clean");
    for f in layer_files(&p.pool_dir()) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&f).unwrap();
        eprintln!(
            "  {} uid {} gid {} mode {:o}",
            f.file_name().unwrap().to_string_lossy(),
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        );
    }
    // The source's chain after two snapshots and a clone: four layers.
    let record = volume_record(&p.pool_dir(), &vol);
    assert_eq!(record["chain"]["backing"].as_array().map(Vec::len), Some(3));
    assert_pattern(&image_of(&p, &vol), 0xdd, 0, K64);
    assert_pattern(&image_of(&p, &vol), 0xcc, K64, K64);

    let snapshots = [&snap.snapshot_id, &snap2.snapshot_id];
    delete_all(&p, &[&vol, &restored, &clone], &snapshots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shut_off_domain_gets_its_persistent_definition_switched() {
    let (dom, p, vol, serial, first) = setup("off", "off-src").await;
    publish(&p, &vol, &dom.uuid).await;
    dom.power_off();
    // persist=true: still attached to the shut-off node.
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);

    let snap = snapshot(&p, "off-snap", &vol).await;
    assert!(snap.ready_to_use);
    assert_eq!(layer_of(&p, &snap.snapshot_id), first);
    let overlay = image_of(&p, &vol);
    let persistent = dom.inactive_disk(&serial).expect("still defined");
    assert_eq!(persistent.source.as_deref(), Some(overlay.as_path()));
    assert!(p.log().contains("persistent definition repointed"));
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);

    // The next boot opens the overlay, with the frozen layer under it.
    dom.power_on();
    let live = dom.live_disk(&serial).expect("attached after boot");
    assert_eq!(live.source.as_deref(), Some(overlay.as_path()));
    dom.qemu_io(&serial, &format!("write -P 0xbb 0 {K64}"));
    dom.qemu_io(&serial, "flush");
    assert_pattern(&overlay, 0xbb, 0, K64);
    assert_pattern(&first, 0xaa, 0, K64);

    unpublish(&p, &vol, &dom.uuid).await;
    check_all_layers(&p.pool_dir());
    delete_all(&p, &[&vol], &[&snap.snapshot_id]).await;
}

/// A disk whose persistent copy sits on another target than the live one (attached by hand,
/// or by another tool) is not followed by libvirt: the plugin repoints it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_copy_on_another_target_is_repointed() {
    let (dom, p, vol, serial, first) = setup("repoint", "repoint-src").await;
    virsh_ok(&[
        "attach-device",
        &dom.name,
        &disk_file(p.dir.path(), &first, &serial, "sda"),
        "--live",
    ]);
    virsh_ok(&[
        "attach-device",
        &dom.name,
        &disk_file(p.dir.path(), &first, &serial, "sdb"),
        "--config",
    ]);
    assert_eq!(published_nodes(&p, &vol).await, vec![dom.uuid.clone()]);

    let snap = snapshot(&p, "repoint-snap", &vol).await;
    assert!(snap.ready_to_use);
    let overlay = image_of(&p, &vol);
    let live = dom.live_disk(&serial).unwrap();
    let persistent = dom.inactive_disk(&serial).unwrap();
    assert_eq!(live.source.as_deref(), Some(overlay.as_path()));
    assert_eq!(persistent.source.as_deref(), Some(overlay.as_path()));
    assert_eq!(
        (live.target.as_str(), persistent.target.as_str()),
        ("sda", "sdb")
    );
    assert_eq!(
        persistent.cache.as_deref(),
        Some("none"),
        "the rest is kept"
    );

    unpublish(&p, &vol, &dom.uuid).await;
    assert!(dom.live_disk(&serial).is_none() && dom.inactive_disk(&serial).is_none());
    check_all_layers(&p.pool_dir());
    assert_pattern(&layer_of(&p, &snap.snapshot_id), 0xaa, 0, K64);
    delete_all(&p, &[&vol], &[&snap.snapshot_id]).await;
}

/// A `<disk>` file for `virsh attach-device`, written into the test's temp dir.
fn disk_file(dir: &Path, image: &Path, serial: &str, target: &str) -> String {
    let xml = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>\
         <source file='{}'/><target dev='{target}' bus='scsi'/><serial>{serial}</serial></disk>",
        image.display()
    );
    let path = dir.join(format!("disk-{target}.xml"));
    std::fs::write(&path, xml).unwrap();
    path.to_str().unwrap().to_string()
}
