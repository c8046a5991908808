//! Finding the disk of a volume from its publish_context: by serial in sysfs, with a bounded
//! wait (hot-plugged disks take a moment to show up) and a SCSI host rescan as recovery.

use super::sysfs::{BlockDevice, DeviceKind, Sysfs};
use crate::error::{Error, Result};
use crate::exec;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the controller told us about the disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceQuery {
    pub(crate) serial: String,
    /// `scsi`, `virtio`, `sata` or `local`.
    pub(crate) bus: String,
    /// Local attach: the host block device (checked, never trusted blindly).
    pub(crate) device_path: Option<String>,
}

/// The local-attach device named in the publish_context, if it is a loop device whose
/// backing file is this volume's export (named after the serial).
fn local_device(sysfs: &Sysfs, path: &str, serial: &str) -> Option<BlockDevice> {
    let name = Path::new(path)
        .strip_prefix(&sysfs.dev_root)
        .ok()?
        .to_str()?;
    let dev = sysfs.device(name)?;
    (dev.kind == DeviceKind::Loop
        && sysfs.serial_of(name).as_deref() == Some(serial)
        && sysfs.has_node(&dev))
    .then_some(dev)
}

/// One look, no waiting: the disk with this serial, if present. Blocking.
pub(crate) fn find_now(sysfs: &Sysfs, q: &DeviceQuery) -> Result<Option<BlockDevice>> {
    if let Some(path) = &q.device_path {
        if let Some(dev) = local_device(sysfs, path, &q.serial) {
            return Ok(Some(dev));
        }
    }
    let found = sysfs.find_by_serial(&q.serial)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(sysfs.has_node(one).then(|| one.clone())),
        many => Err(Error::FailedPrecondition(format!(
            "several disks report serial {}: {}; detach the duplicates",
            q.serial,
            many.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Waits up to `timeout` for the disk (zero: one look), rescanning SCSI hosts after 1 s and
/// then at growing intervals (5 s, 10 s, 20 s …: a rescan recovers a missed hot-plug event,
/// and repeating it every few seconds only loads the bus).
pub(crate) async fn wait_for_device(
    sysfs: &Sysfs,
    q: &DeviceQuery,
    timeout: Duration,
) -> Result<BlockDevice> {
    let start = Instant::now();
    let mut next_rescan = Duration::from_secs(1);
    let mut rescan_gap = Duration::from_secs(5);
    let mut pause = Duration::from_millis(50);
    let mut rescans = 0;
    loop {
        let (s, qq) = (sysfs.clone(), q.clone());
        if let Some(dev) = exec::blocking(move || find_now(&s, &qq)).await? {
            if rescans > 0 || start.elapsed() > Duration::from_secs(1) {
                tracing::info!(serial = %q.serial, device = %dev.name, waited_ms = start.elapsed().as_millis() as u64, rescans, "disk appeared");
            }
            return Ok(dev);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            if let Some(path) = &q.device_path {
                tracing::warn!(serial = %q.serial, device = %path, "the publish_context device is not this volume's disk");
            }
            let bus = if q.bus.is_empty() {
                "unknown"
            } else {
                q.bus.as_str()
            };
            let waited = if timeout.is_zero() {
                format!(
                    "is attached to this node (bus {bus}: a disk that is not there now will \
                     not appear later)"
                )
            } else {
                format!(
                    "appeared within {}s (bus {bus}; SCSI hosts rescanned {rescans} times)",
                    timeout.as_secs()
                )
            };
            return Err(Error::NotFound(format!(
                "no disk with serial {} {waited}; looked for virtio serials, SCSI \
                 vpd_pg80/wwid and loop backing files under {}/block; check that \
                 ControllerPublishVolume succeeded for this node",
                q.serial,
                sysfs.sys_root.display()
            )));
        }
        if elapsed >= next_rescan && q.bus != "local" && q.bus != "virtio" {
            let s = sysfs.clone();
            let hosts = exec::blocking(move || Ok(s.rescan_scsi_hosts())).await?;
            tracing::info!(serial = %q.serial, hosts, "disk not found yet: rescanned SCSI hosts");
            rescans += 1;
            next_rescan = elapsed + rescan_gap;
            rescan_gap *= 2;
        }
        tokio::time::sleep(pause.min(timeout.saturating_sub(elapsed))).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::super::sysfs::fake::*;
    use super::*;

    #[tokio::test]
    async fn finds_a_disk_that_appears_after_a_rescan() {
        let t = FakeTree::new();
        let scan = t.scsi_host("host0");
        let s = t.sysfs();
        let q = DeviceQuery {
            serial: "vd-0123456789abcdef".into(),
            bus: "scsi".into(),
            device_path: None,
        };
        // The "kernel" adds the disk once the scan file is written.
        let sys = t.dir.path().to_path_buf();
        let kernel = tokio::spawn(async move {
            loop {
                if std::fs::read_to_string(&scan).unwrap() == "- - -" {
                    let d = sys.join("sys/block/sdc");
                    std::fs::create_dir_all(d.join("device")).unwrap();
                    std::fs::write(d.join("dev"), "8:32").unwrap();
                    std::fs::write(d.join("size"), "2048").unwrap();
                    std::fs::write(d.join("device/vpd_pg80"), vpd_pg80("vd-0123456789abcdef"))
                        .unwrap();
                    std::fs::write(sys.join("dev/sdc"), "8:32").unwrap();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let dev = wait_for_device(&s, &q, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(dev.name, "sdc");
        assert_eq!(dev.size_bytes, 2048 * 512);
        kernel.await.unwrap();
    }

    #[tokio::test]
    async fn missing_disk_is_not_found_naming_the_serial() {
        let t = FakeTree::new();
        let q = DeviceQuery {
            serial: "vd-ffffffffffffffff".into(),
            bus: "virtio".into(),
            device_path: None,
        };
        let err = wait_for_device(&t.sysfs(), &q, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)));
        assert!(err.to_string().contains("vd-ffffffffffffffff"), "{err}");
    }

    #[tokio::test]
    async fn no_wait_is_one_look() {
        let t = FakeTree::new();
        let scan = t.scsi_host("host0");
        let q = DeviceQuery {
            serial: "vd-eeeeeeeeeeeeeeee".into(),
            ..Default::default()
        };
        let err = wait_for_device(&t.sysfs(), &q, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)));
        assert!(err.to_string().contains("not appear later"), "{err}");
        assert_eq!(std::fs::read_to_string(scan).unwrap(), "", "a SCSI rescan");
    }

    #[tokio::test]
    async fn local_device_path_is_checked_against_the_serial() {
        let t = FakeTree::new();
        for (name, dev, backing) in [
            ("loop0", "7:0", "/x/vd-1111111111111111"),
            ("loop1", "7:1", "/x/vd-2222222222222222"),
        ] {
            let d = t.disk(name, dev, 100);
            std::fs::create_dir_all(d.join("loop")).unwrap();
            std::fs::write(d.join("loop/backing_file"), backing).unwrap();
        }
        let s = t.sysfs();
        let dev_root = t.dir.path().join("dev");
        // Right path: used.
        let q = DeviceQuery {
            serial: "vd-2222222222222222".into(),
            bus: "local".into(),
            device_path: Some(dev_root.join("loop1").to_str().unwrap().into()),
        };
        assert_eq!(find_now(&s, &q).unwrap().unwrap().name, "loop1");
        // Wrong path (another volume's loop device): the serial decides.
        let q = DeviceQuery {
            device_path: Some(dev_root.join("loop0").to_str().unwrap().into()),
            ..q
        };
        assert_eq!(find_now(&s, &q).unwrap().unwrap().name, "loop1");
        // Path outside the dev root: ignored.
        let q = DeviceQuery {
            device_path: Some("/etc/passwd".into()),
            ..q
        };
        assert_eq!(find_now(&s, &q).unwrap().unwrap().name, "loop1");
    }

    #[test]
    fn duplicate_serials_are_refused() {
        let t = FakeTree::new();
        for (n, d) in [("vdb", "254:16"), ("vdc", "254:32")] {
            let dir = t.disk(n, d, 10);
            std::fs::write(dir.join("serial"), "vd-3333333333333333").unwrap();
        }
        let q = DeviceQuery {
            serial: "vd-3333333333333333".into(),
            ..Default::default()
        };
        assert!(matches!(
            find_now(&t.sysfs(), &q),
            Err(Error::FailedPrecondition(_))
        ));
    }
}
