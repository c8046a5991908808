//! End to end inside a real Linux guest run by libvirt (issue 7). Needs root, libvirtd and
//! Debian's apt sources; otherwise each test prints SKIPPED with the reason. Also the guest
//! bed's own checks (initramfs archive, module order, XML), which need nothing.

use std::time::{Duration, Instant};
use virtdisk_test_support::guestbed::{self, Bus, Guest};
use virtdisk_test_support::prelude::*;

/// One guest: NodeGetInfo reports the domain UUID (DMI, no --node-id); disks hot-plugged on
/// virtio-blk and on virtio-scsi appear in the guest under their serial, take a filesystem
/// (the packed mkfs/mount work), and leave again when detached (the guest acks the unplug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_reports_its_uuid_and_sees_hotplugged_disks() {
    const TEST: &str = "guest_boots_reports_its_uuid_and_sees_hotplugged_disks";
    let started = Instant::now();
    let Some(bed) = guestbed::testbed_or_skip(TEST).await else {
        return;
    };
    let mut prep = format!(
        "test bed: cache {}, kernel {}, initramfs {}",
        bed.cache.display(),
        bed.kernel_version,
        bed.initrd.display()
    );
    for (step, took) in &bed.steps {
        prep.push_str(&format!("\n  {:>7} ms  {step}", took.as_millis()));
    }
    guestbed::show(&prep);

    let mut guest = Guest::boot(&bed, "smoke").await;
    assert_eq!(
        guest.node().node_id().await,
        guest.uuid(),
        "NodeGetInfo must report the DMI product UUID, which is the domain UUID"
    );
    guest.timeline.mark("NodeGetInfo = domain UUID");
    guest.assert_tools_load().await;
    guest
        .timeline
        .mark("guest: every packed tool finds its libraries");
    // qemu-guest-agent runs on its virtio-serial channel and answers libvirt.
    guest.wait_guest_agent(Duration::from_secs(60)).await;
    guest.timeline.mark("guest agent connected");
    let froze = guest.virsh(&["domfsfreeze", guest.name()]).await;
    let thawed = guest.virsh(&["domfsthaw", guest.name()]).await;
    assert!(
        froze.as_deref().is_ok_and(|o| o.contains("Froze")),
        "{froze:?}"
    );
    assert!(
        thawed.as_deref().is_ok_and(|o| o.contains("Thawed")),
        "{thawed:?}"
    );
    let log = guest.guest_agent_log().await;
    assert!(log.contains("guest-fsfreeze-freeze"), "agent log: {log}");
    guest
        .timeline
        .mark("guest agent froze and thawed (virsh domfsfreeze/domfsthaw)");

    // Kernel messages all through the hot-plugs: they go to the console port, in the middle of
    // a user-space line if they come then; the events the test reads must not see them.
    guest
        .sh(
            "(while [ ! -e /tmp/quiet ]; do echo vdt-kernel-noise >/dev/kmsg; usleep 2000; done) \
             </dev/null >/dev/null 2>&1 &",
        )
        .await;
    let cases = [
        (Bus::Virtio, "vd-00000000000000a1", "ext4"),
        (Bus::Scsi, "vd-00000000000000a2", "xfs"),
    ];
    for (bus, serial, fs) in cases {
        let bus_name = bus.as_str();
        // xfs needs at least 300 MiB; the image is thin.
        let image = guestbed::qcow2(guest.dir(), &format!("{serial}.qcow2"), 512 << 20);
        let mark = guest.mark();
        let t = Instant::now();
        let disk_xml = guest.attach_disk(&image, serial, bus).await;
        let returned = t.elapsed();
        let dev = guest.wait_disk_added(mark, serial).await;
        let visible = t.elapsed();
        guest
            .timeline
            .span(format!("{bus_name}: attach-device returned"), returned);
        guest.timeline.span(
            format!("{bus_name}: attach → /dev/{dev} in the guest"),
            visible,
        );
        assert!(guest.has_disk(serial).await, "{serial} is in the live XML");
        assert_eq!(
            guest
                .sh(&format!("/sbin/vdt-disk-serial {dev}"))
                .await
                .trim(),
            serial
        );

        let t = Instant::now();
        let out = guest
            .sh(&format!(
                "mkfs.{fs} -q /dev/{dev} && mkdir -p /mnt/{dev} && mount /dev/{dev} /mnt/{dev} &&
                 echo hello-{serial} > /mnt/{dev}/file && umount /mnt/{dev} &&
                 mount -o ro /dev/{dev} /mnt/{dev} && cat /mnt/{dev}/file && umount /mnt/{dev} &&
                 blkid -o value -s TYPE /dev/{dev}"
            ))
            .await;
        guest.timeline.span(
            format!("{bus_name}: mkfs.{fs}, mount, write, remount, read"),
            t.elapsed(),
        );
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            [format!("hello-{serial}"), fs.to_string()]
        );

        let mark = guest.mark();
        let t = Instant::now();
        guest.detach_disk(&disk_xml).await;
        let returned = t.elapsed();
        guest.wait_disk_gone(serial, Duration::from_secs(30)).await;
        let gone = t.elapsed();
        guest.wait_disk_removed(mark, &dev).await;
        guest
            .timeline
            .span(format!("{bus_name}: detach-device returned"), returned);
        guest
            .timeline
            .span(format!("{bus_name}: detach → gone from the live XML"), gone);
        assert!(!guest.has_disk(serial).await);
        let left = guest
            .sh(&format!("test ! -e /sys/block/{dev} && echo gone"))
            .await;
        assert_eq!(left.trim(), "gone", "/dev/{dev} left the guest");
    }
    guest.sh("touch /tmp/quiet").await;
    let noise = guest.console().matches("vdt-kernel-noise").count();
    assert!(noise > 10, "the kernel printed {noise} noise lines");
    let events = guest.events();
    let foreign: Vec<&str> = events
        .lines()
        .filter(|l| !l.starts_with("vdt:") && !l.starts_with("vdt-block "))
        .collect();
    assert!(foreign.is_empty(), "not event lines: {foreign:?}");
    guest.timeline.mark("done");
    guest.timeline.print();
    guestbed::show(&format!(
        "{TEST}: {} ms in all",
        started.elapsed().as_millis()
    ));
}

/// Two guests side by side (as the publish/move sequence needs): each reports its own domain
/// UUID; after a hard reset a guest's node plugin answers again on the same channel; after a
/// power cycle a guest finds the disk attached persistently before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guests_have_their_own_ids_and_survive_reset_and_power_cycle() {
    const TEST: &str = "two_guests_have_their_own_ids_and_survive_reset_and_power_cycle";
    let Some(bed) = guestbed::testbed_or_skip(TEST).await else {
        return;
    };
    let (mut a, mut b) = tokio::join!(Guest::boot(&bed, "a"), Guest::boot(&bed, "b"));
    assert_ne!(a.uuid(), b.uuid());
    for guest in [&a, &b] {
        let id = guest.node().node_id().await;
        assert_eq!(id, guest.uuid(), "{} reports its own UUID", guest.name());
    }
    let serial = "vd-00000000000000b1";
    let image = guestbed::qcow2(a.dir(), "persistent.qcow2", 64 << 20);
    let mark = a.mark();
    a.attach_disk_with(&image, serial, Bus::Virtio, true).await;
    a.wait_disk_added(mark, serial).await;

    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let boot_before = b.sh(boot_id).await;
    let (_, ()) = tokio::join!(b.reset(), async {
        let mark = a.mark();
        a.power_cycle().await;
        let dev = a.wait_disk_added(mark, serial).await;
        assert_eq!(
            a.sh(&format!("/sbin/vdt-disk-serial {dev}")).await.trim(),
            serial
        );
    });
    let id = b.node().node_get_info(csi::NodeGetInfoRequest {}).await;
    let id = id
        .expect("NodeGetInfo after the reset")
        .into_inner()
        .node_id;
    assert_eq!(id, b.uuid());
    let boot_after = b.sh(boot_id).await;
    assert_ne!(boot_before, boot_after, "{} rebooted", b.name());
    a.timeline.print();
    b.timeline.print();
}

/// The transport the guests use, without a guest: `serve --endpoint tcp://…` answers gRPC.
#[tokio::test]
async fn node_plugin_serves_on_a_tcp_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _plugin = KillOnDrop(
        std::process::Command::new(virtdisk_test_support::plugin::bin())
            .args([
                "serve",
                "--mode",
                "node",
                "--node-id",
                "tcp-node",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(["--endpoint", &format!("tcp://127.0.0.1:{port}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start virtdisk-csi"),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let mut node = csi::node_client::NodeClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        match node.node_get_info(csi::NodeGetInfoRequest {}).await {
            Ok(info) => break info.into_inner(),
            Err(e) if Instant::now() > deadline => {
                panic!("no answer on tcp://127.0.0.1:{port}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(info.node_id, "tcp-node");
}

/// The guest bed's own checks: what it builds, without booting anything.
mod guestbed_checks {
    use std::path::Path;
    use virtdisk_test_support::guestbed::cpio::Archive;
    use virtdisk_test_support::guestbed::initramfs::{modinfo_depends, module_load_order};
    use virtdisk_test_support::guestbed::xml::{disk, free_target};
    use virtdisk_test_support::guestbed::Bus;

    #[test]
    fn cpio_parents_come_first_and_records_are_aligned() {
        let mut a = Archive::default();
        a.bytes("/usr/bin/tool", "#!/bin/sh\n", 0o755);
        a.symlink("/etc/mtab", "/proc/self/mounts");
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf);
        let usr = text.find("usr\0").unwrap();
        let bin = text.find("usr/bin\0").unwrap();
        let tool = text.find("usr/bin/tool\0").unwrap();
        assert!(usr < bin && bin < tool);
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        assert_eq!(buf.len() % 4, 0);
    }

    #[test]
    fn initramfs_modinfo_depends_is_parsed() {
        let data = b"junk\0license=GPL\0depends=virtio_ring,virtio\0name=virtio_blk\0";
        assert_eq!(modinfo_depends(data), vec!["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(modinfo_depends(b"no modinfo here").is_empty());
    }

    #[test]
    fn initramfs_dependencies_load_first() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(k.join("virtio_blk.ko"), b"\0depends=virtio,virtio_ring\0").unwrap();
        std::fs::write(k.join("virtio.ko"), b"\0depends=virtio_ring\0").unwrap();
        std::fs::write(k.join("virtio_ring.ko"), b"\0depends=\0").unwrap();
        std::fs::write(k.join("crc-t10dif.ko"), b"\0depends=\0").unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["virtio_blk", "ext4", "crc_t10dif"]).unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk", "crc_t10dif"]);
        assert!(module_load_order(dir.path(), &["nosuch"]).is_err());
    }

    #[test]
    fn xml_values_are_escaped() {
        let xml = disk(Path::new("/tmp/a'b<c>.qcow2"), "vdb", Bus::Virtio, "vd-&x");
        assert!(xml.contains("/tmp/a&apos;b&lt;c&gt;.qcow2"));
        assert!(xml.contains("<serial>vd-&amp;x</serial>"));
    }

    #[test]
    fn xml_free_target_skips_used_names() {
        let live = "<target dev='vda' bus='virtio'/><target dev='sda' bus='scsi'/>";
        assert_eq!(free_target(live, Bus::Virtio), "vdb");
        assert_eq!(free_target(live, Bus::Scsi), "sdb");
    }
}
