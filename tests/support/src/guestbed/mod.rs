//! A Linux guest test bed run by libvirt, with the node plugin inside (see README.md next to
//! this file for what a guest is, how the host reaches it, and the timings).
//!
//! ```ignore
//! let Some(bed) = guestbed::testbed_or_skip("my_test").await else { return };
//! let guest = Guest::boot(&bed, "a").await;        // NodeGetInfo in it reports guest.uuid()
//! let node = guest.node();                          // tonic client over the port forward
//! let disk = guest.attach_disk(&image, "vd-…", Bus::Virtio).await;
//! ```
//!
//! The guest is a `<domain type='qemu'>` (TCG: a Linux kernel hangs under nested KVM on the CI
//! hosts) q35 machine booting Debian's cloud kernel directly with an initramfs holding busybox,
//! the needed modules, the filesystem tools and `virtdisk-csi serve --mode node`. See `bed.rs`
//! for the cache, `initramfs.rs` for the guest's contents, `guest.rs` for the transport.

mod bed;
pub mod cpio;
mod guest;
pub mod initramfs;
mod report;
pub mod xml;

pub use bed::{libvirt_uri, world_readable_dir, Testbed, DEFAULT_CACHE};
pub use guest::{Exec, Guest, GuestOptions, DOMAIN_PREFIX, GUEST_EXEC_PORT, GUEST_NODE_PORT};
pub use report::{show, skipped, Skip, Timeline};
pub use xml::Bus;

/// The test bed, or `None` after printing `SKIPPED <test>: <reason>` (a failure instead when
/// `VIRTDISK_GUEST_REQUIRED=1`).
pub async fn testbed_or_skip(test: &str) -> Option<Testbed> {
    match Testbed::prepare().await {
        Ok(bed) => Some(bed),
        Err(skip) => {
            skipped(test, &skip);
            None
        }
    }
}

/// Creates a qcow2 image of `size` bytes in `dir` (the guest's scratch dir is readable by QEMU).
pub fn qcow2(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    crate::qemu::create_qcow2(&path, size);
    path
}
