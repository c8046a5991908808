//! Block devices as sysfs describes them. No udev: `/dev/disk/by-id` is often missing (no udev
//! on the host, minimal guests, containers), while sysfs always knows each disk's serial.
//! Both roots are configurable so tests run against fake trees. Every function here is
//! blocking (small sysfs reads); call through `exec::blocking`.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    /// virtio-blk: `/sys/block/vd*/serial`.
    Virtio,
    /// SCSI disk (virtio-scsi, SATA through libata): `device/vpd_pg80` or `device/wwid`.
    Scsi,
    /// Loop device (local attach): the backing file is named after the serial.
    Loop,
    Other,
}

/// A whole-disk block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockDevice {
    /// Kernel name, e.g. `sda`, `vdb`, `loop3`.
    pub(crate) name: String,
    pub(crate) kind: DeviceKind,
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) size_bytes: u64,
    pub(crate) read_only: bool,
}

impl BlockDevice {
    pub(crate) fn dev(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

/// The kernel's view of block devices: a sysfs root and a `/dev` root (a fake tree in unit tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    pub(crate) sys_root: PathBuf,
    pub(crate) dev_root: PathBuf,
    /// The device number of a node under `dev_root`: [`block_node_dev`] on a host; the fake
    /// tree of unit tests has its own (its nodes are plain files).
    node_dev: fn(&Path) -> Option<(u32, u32)>,
}

/// The device number of `path` if it is a block device node.
fn block_node_dev(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    m.file_type().is_block_device().then(|| {
        let rdev = m.rdev();
        (libc::major(rdev), libc::minor(rdev))
    })
}

fn read_trimmed(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let s = String::from_utf8_lossy(&bytes);
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

/// The serial in a SCSI VPD page 0x80: byte 1 is the page code, bytes 2–3 the big-endian
/// length of the serial that follows the 4-byte header, padded with spaces or NULs.
pub(crate) fn parse_vpd_pg80(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = u16::from_be_bytes([page[2], page[3]]) as usize;
    let body = &page[4..page.len().min(4 + len)];
    let s = String::from_utf8_lossy(body);
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

fn kind_of(name: &str) -> DeviceKind {
    if name.starts_with("vd") {
        DeviceKind::Virtio
    } else if name.starts_with("sd") {
        DeviceKind::Scsi
    } else if name.starts_with("loop") {
        DeviceKind::Loop
    } else {
        DeviceKind::Other
    }
}

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

impl Sysfs {
    pub(crate) fn new(sys_root: impl Into<PathBuf>, dev_root: impl Into<PathBuf>) -> Self {
        Sysfs {
            sys_root: sys_root.into(),
            dev_root: dev_root.into(),
            node_dev: block_node_dev,
        }
    }

    /// The real `/sys` and `/dev`.
    pub fn host() -> Self {
        Self::new("/sys", "/dev")
    }

    /// `/dev/<name>`.
    pub(crate) fn dev_path(&self, name: &str) -> PathBuf {
        self.dev_root.join(name)
    }

    /// Whether `/dev/<name>` is the node of `dev` (a block device with its device number).
    pub(crate) fn has_node(&self, dev: &BlockDevice) -> bool {
        (self.node_dev)(&self.dev_path(&dev.name)) == Some(dev.dev())
    }

    fn block_dir(&self, name: &str) -> PathBuf {
        self.sys_root.join("block").join(name)
    }

    /// Names under `/sys/block`, sorted.
    pub(crate) fn names(&self) -> Result<Vec<String>> {
        let dir = self.sys_root.join("block");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The device called `name`, or None when it is gone.
    pub(crate) fn device(&self, name: &str) -> Option<BlockDevice> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let dir = self.block_dir(name);
        let dev = read_trimmed(&dir.join("dev"))?;
        let (major, minor) = dev.split_once(':')?;
        let sectors: u64 = read_trimmed(&dir.join("size"))?.parse().ok()?;
        Some(BlockDevice {
            name: name.to_string(),
            kind: kind_of(name),
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            size_bytes: sectors.saturating_mul(512),
            read_only: read_trimmed(&dir.join("ro")).as_deref() == Some("1"),
        })
    }

    /// The whole disk with device number `major:minor`.
    pub(crate) fn by_dev(&self, dev: (u32, u32)) -> Result<Option<BlockDevice>> {
        Ok(self
            .names()?
            .iter()
            .filter_map(|n| self.device(n))
            .find(|d| d.dev() == dev))
    }

    /// The backing file of a loop device, as the kernel reports it.
    pub(crate) fn loop_backing_file(&self, name: &str) -> Option<PathBuf> {
        read_trimmed(&self.block_dir(name).join("loop/backing_file")).map(PathBuf::from)
    }

    /// The device number and inode of the file the loop device reads: the identity of the open
    /// file, not its path (a dead FUSE export and a live one at the same path differ here).
    /// Blocking.
    pub(crate) fn loop_backing_identity(&self, name: &str) -> Result<((u32, u32), u64)> {
        let node = self.dev_path(name);
        let f = std::fs::File::open(&node)
            .map_err(|e| Error::io(format!("opening {}", node.display()), e))?;
        // SAFETY: all-zero is a valid LoopInfo64 (integers and byte arrays).
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64, which LoopInfo64 mirrors.
        unsafe { loop_get_status64(std::os::fd::AsRawFd::as_raw_fd(&f), &mut info) }
            .map_err(|e| Error::sys(format!("LOOP_GET_STATUS64 on {}", node.display()), e))?;
        // The kernel encodes dev_t as glibc does (huge_encode_dev).
        let dev = info.lo_device as libc::dev_t;
        Ok(((libc::major(dev), libc::minor(dev)), info.lo_inode))
    }

    /// Every bound loop device with its backing file.
    pub fn loop_devices(&self) -> Result<Vec<(String, PathBuf)>> {
        Ok(self
            .names()?
            .into_iter()
            .filter(|n| n.starts_with("loop"))
            .filter_map(|n| self.loop_backing_file(&n).map(|b| (n, b)))
            .collect())
    }

    /// The serial a disk reports, read the way its bus exposes it.
    pub(crate) fn serial_of(&self, name: &str) -> Option<String> {
        let dir = self.block_dir(name);
        match kind_of(name) {
            DeviceKind::Virtio => read_trimmed(&dir.join("serial")),
            DeviceKind::Scsi => std::fs::read(dir.join("device/vpd_pg80"))
                .ok()
                .and_then(|p| parse_vpd_pg80(&p))
                .or_else(|| {
                    // e.g. "t10.QEMU     QEMU HARDDISK   vd-0123456789abcdef"
                    read_trimmed(&dir.join("device/wwid"))
                        .and_then(|w| w.split_whitespace().last().map(str::to_string))
                }),
            DeviceKind::Loop => self
                .loop_backing_file(name)
                .and_then(|b| b.file_name().and_then(|f| f.to_str()).map(str::to_string)),
            DeviceKind::Other => read_trimmed(&dir.join("serial")),
        }
    }

    /// Every disk whose serial is `serial`.
    pub(crate) fn find_by_serial(&self, serial: &str) -> Result<Vec<BlockDevice>> {
        Ok(self
            .names()?
            .iter()
            .filter(|n| self.serial_of(n).as_deref() == Some(serial))
            .filter_map(|n| self.device(n))
            .collect())
    }

    /// Asks every SCSI host to scan for new disks (`- - -` = all channels, targets, LUNs):
    /// the recovery when a hot-plugged disk was missed. Returns how many hosts were asked.
    pub(crate) fn rescan_scsi_hosts(&self) -> usize {
        let dir = self.sys_root.join("class/scsi_host");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut n = 0;
        for host in rd.filter_map(|e| e.ok()) {
            let scan = host.path().join("scan");
            match std::fs::write(&scan, "- - -") {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(path = %scan.display(), error = %e, "SCSI host rescan failed")
                }
            }
        }
        n
    }

    /// Makes a SCSI disk re-read its capacity (after the hypervisor grew it). Other disks
    /// learn it on their own (virtio-blk) or need a tool (loop). Returns whether it rescanned.
    pub(crate) fn rescan_capacity(&self, name: &str) -> Result<bool> {
        let path = self.block_dir(name).join("device/rescan");
        if kind_of(name) != DeviceKind::Scsi || !path.exists() {
            return Ok(false);
        }
        std::fs::write(&path, "1")
            .map_err(|e| Error::io(format!("rescanning {}", path.display()), e))?;
        Ok(true)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake sysfs + /dev tree for tests.
    use super::*;

    pub(crate) struct FakeTree {
        pub(crate) dir: tempfile::TempDir,
    }

    impl Default for FakeTree {
        fn default() -> Self {
            Self::new()
        }
    }

    impl FakeTree {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sys/block")).unwrap();
            std::fs::create_dir_all(dir.path().join("dev")).unwrap();
            FakeTree { dir }
        }

        /// The tree's sysfs; its /dev nodes are plain files holding `major:minor`.
        pub(crate) fn sysfs(&self) -> Sysfs {
            Sysfs {
                node_dev: plain_file_dev,
                ..Sysfs::new(self.dir.path().join("sys"), self.dir.path().join("dev"))
            }
        }

        /// Adds a disk: `dev`, `size` (sectors), `ro`, and a /dev node (a plain file holding
        /// `dev`).
        pub(crate) fn disk(&self, name: &str, dev: &str, sectors: u64) -> PathBuf {
            let d = self.dir.path().join("sys/block").join(name);
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
            std::fs::write(d.join("ro"), "0\n").unwrap();
            std::fs::write(self.dir.path().join("dev").join(name), dev).unwrap();
            d
        }

        pub(crate) fn scsi_host(&self, host: &str) -> PathBuf {
            let d = self.dir.path().join("sys/class/scsi_host").join(host);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("scan"), "").unwrap();
            d.join("scan")
        }
    }

    /// A fake /dev node's device number: the `major:minor` it holds.
    fn plain_file_dev(path: &Path) -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(path).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// A VPD page 0x80 as a QEMU scsi-hd returns it.
    pub(crate) fn vpd_pg80(serial: &str) -> Vec<u8> {
        let mut page = vec![0x00, 0x80, 0x00, serial.len() as u8];
        page.extend_from_slice(serial.as_bytes());
        page
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    #[test]
    fn vpd_page_parsing() {
        assert_eq!(
            parse_vpd_pg80(&vpd_pg80("vd-0123456789abcdef")).as_deref(),
            Some("vd-0123456789abcdef")
        );
        // Padded with spaces and a length longer than the data.
        let mut page = vec![0x00, 0x80, 0x00, 0x20];
        page.extend_from_slice(b"  vd-1  \0\0");
        assert_eq!(parse_vpd_pg80(&page).as_deref(), Some("vd-1"));
        assert_eq!(parse_vpd_pg80(&[0x00, 0x83, 0x00, 0x01, b'x']), None);
        assert_eq!(parse_vpd_pg80(&[0x00, 0x80]), None);
        assert_eq!(parse_vpd_pg80(&[0x00, 0x80, 0x00, 0x00]), None);
    }

    #[test]
    fn finds_disks_by_serial_on_every_bus() {
        let t = FakeTree::new();
        let vda = t.disk("vda", "254:0", 2048);
        std::fs::write(vda.join("serial"), "root-disk\n").unwrap();
        let vdb = t.disk("vdb", "254:16", 4096);
        std::fs::write(vdb.join("serial"), "vd-aaaaaaaaaaaaaaaa").unwrap();
        let sda = t.disk("sda", "8:0", 8192);
        std::fs::write(sda.join("device/vpd_pg80"), vpd_pg80("vd-bbbbbbbbbbbbbbbb")).unwrap();
        let sdb = t.disk("sdb", "8:16", 8192);
        std::fs::write(
            sdb.join("device/wwid"),
            "t10.QEMU     QEMU HARDDISK   vd-cccccccccccccccc\n",
        )
        .unwrap();
        let loop0 = t.disk("loop0", "7:0", 100);
        std::fs::create_dir_all(loop0.join("loop")).unwrap();
        std::fs::write(
            loop0.join("loop/backing_file"),
            "/var/lib/virtdisk/localattach/dddddddddddddddd/vd-dddddddddddddddd\n",
        )
        .unwrap();
        let s = t.sysfs();

        let found = s.find_by_serial("vd-aaaaaaaaaaaaaaaa").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "vdb");
        assert_eq!(found[0].kind, DeviceKind::Virtio);
        assert_eq!(found[0].dev(), (254, 16));
        assert_eq!(found[0].size_bytes, 4096 * 512);
        assert_eq!(
            s.find_by_serial("vd-bbbbbbbbbbbbbbbb").unwrap()[0].name,
            "sda"
        );
        assert_eq!(
            s.find_by_serial("vd-cccccccccccccccc").unwrap()[0].name,
            "sdb"
        );
        let lo = &s.find_by_serial("vd-dddddddddddddddd").unwrap()[0];
        assert_eq!((lo.name.as_str(), lo.kind), ("loop0", DeviceKind::Loop));
        assert!(s.find_by_serial("vd-eeeeeeeeeeeeeeee").unwrap().is_empty());
        assert_eq!(s.by_dev((8, 16)).unwrap().unwrap().name, "sdb");
        assert_eq!(s.loop_devices().unwrap().len(), 1);
        assert_eq!(s.dev_path("sda"), t.dir.path().join("dev/sda"));
        assert!(s.device("../etc").is_none());
    }

    #[test]
    fn only_a_block_device_with_the_right_number_is_a_node() {
        let t = FakeTree::new();
        t.disk("vdb", "254:16", 8);
        let fake = t.sysfs();
        let dev = fake.device("vdb").unwrap();
        assert!(fake.has_node(&dev));
        let moved = BlockDevice {
            minor: 17,
            ..dev.clone()
        };
        assert!(!fake.has_node(&moved), "another device number");
        // Read as on a host, the same tree's plain file is no device node.
        let host = Sysfs::new(t.dir.path().join("sys"), t.dir.path().join("dev"));
        assert!(!host.has_node(&dev));
        // A real block device node is one, with its own number only.
        if let Some(loop_dev) = (0..8).find_map(|n| {
            let name = format!("loop{n}");
            Sysfs::host().device(&name)
        }) {
            assert!(Sysfs::host().has_node(&loop_dev), "{loop_dev:?}");
            let other = BlockDevice {
                minor: loop_dev.minor + 1000,
                ..loop_dev
            };
            assert!(!Sysfs::host().has_node(&other));
        }
    }

    #[test]
    fn rescans_write_the_kernel_files() {
        let t = FakeTree::new();
        let scan0 = t.scsi_host("host0");
        let scan1 = t.scsi_host("host1");
        let s = t.sysfs();
        assert_eq!(s.rescan_scsi_hosts(), 2);
        assert_eq!(std::fs::read_to_string(scan0).unwrap(), "- - -");
        assert_eq!(std::fs::read_to_string(scan1).unwrap(), "- - -");
        let sda = t.disk("sda", "8:0", 10);
        std::fs::write(sda.join("device/rescan"), "").unwrap();
        assert!(s.rescan_capacity("sda").unwrap());
        assert_eq!(
            std::fs::read_to_string(sda.join("device/rescan")).unwrap(),
            "1"
        );
        t.disk("vdb", "254:16", 10);
        assert!(!s.rescan_capacity("vdb").unwrap());
    }
}
