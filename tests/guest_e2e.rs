//! End to end inside a real Linux guest run by libvirt (issue 7). Needs root, libvirtd and
//! Debian's apt sources; otherwise each test prints SKIPPED with the reason.

mod guestbed;

use guestbed::{Bus, Guest};
use std::time::{Duration, Instant};
use virtdisk_csi::csi::proto as csi;

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
    let mut prep = guestbed::Timeline::new(format!(
        "test bed (cache {}, kernel {})",
        bed.cache.display(),
        bed.kernel_version
    ));
    for (step, took) in &bed.steps {
        prep.span(step, *took);
    }
    prep.print();

    let mut guest = Guest::boot(&bed, "smoke").await;
    let info = guest
        .node()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(
        info.node_id,
        guest.uuid(),
        "NodeGetInfo must report the DMI product UUID, which is the domain UUID"
    );
    guest.timeline.mark("NodeGetInfo = domain UUID");
    guest.assert_tools_load().await;
    guest
        .timeline
        .mark("guest: every packed tool finds its libraries");

    let cases = [
        (Bus::Virtio, "vd-00000000000000a1", "ext4"),
        (Bus::Scsi, "vd-00000000000000a2", "xfs"),
    ];
    for (bus, serial, fs) in cases {
        let bus_name = bus.as_str();
        // xfs needs at least 300 MiB; the image is thin.
        let image = guestbed::qcow2(guest.dir(), &format!("{serial}.qcow2"), 512 << 20);
        let mark = guest.console_mark();
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

        let mark = guest.console_mark();
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
    guest.timeline.mark("done");
    guest.timeline.print();
    guestbed::show(&format!(
        "{TEST}: {} ms in all",
        started.elapsed().as_millis()
    ));
}
