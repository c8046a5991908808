//! Changing an attached disk in place: online expansion and I/O limits.

use super::conn::{DomainLock, Libvirt};
use super::ffi;
use super::plug::domain_by_uuid;
use super::view;
use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::model::ImageFormat;
use crate::params::Qos;
use crate::pool::qemu_img;
use std::path::PathBuf;
use virt::sys;

enum Resized {
    /// The running domain grew the disk; the guest sees `capacity` bytes now.
    Live { target: String, capacity: u64 },
    /// Only in the persistent definition of a shut-off domain: grow the image file.
    Offline { image: PathBuf, format: ImageFormat },
}

/// Grows the disk to `size` bytes: virDomainBlockResize on a running domain (the guest sees
/// the new size at once), else `qemu-img resize` of the image. The libvirt call holds `lock`
/// (the domain's) until it returns; `qemu-img` is killed if the caller gives up.
pub(super) async fn resize(
    lv: &Libvirt,
    lock: &DomainLock,
    uuid: &str,
    volume_id: &VolumeId,
    size: u64,
) -> Result<()> {
    let serial = volume_id.serial();
    let (u, vol, held) = (uuid.to_string(), volume_id.to_string(), lock.clone());
    let outcome = lv
        .write(move |c, l| {
            let _held = held;
            resize_live(c, l, &u, &vol, &serial, size)
        })
        .await?;
    match outcome {
        Resized::Live { target, capacity } => {
            tracing::info!(volume = %volume_id, target = %target, capacity, "disk resized online");
            Ok(())
        }
        Resized::Offline { image, format } => {
            if qemu_img::info(&image).await?.virtual_size < size {
                qemu_img::resize(&image, format, size).await?;
            }
            tracing::info!(volume = %volume_id, size, "image of a shut-off domain resized");
            Ok(())
        }
    }
}

fn resize_live(
    conn: &virt::connect::Connect,
    lv: &Libvirt,
    uuid: &str,
    volume_id: &str,
    serial: &str,
    size: u64,
) -> Result<Resized> {
    let dom = domain_by_uuid(conn, lv, uuid)?;
    let v = view::read_view(&dom, lv)?;
    if let Some(disk) = v.live_disk(serial) {
        let target = disk.target.clone();
        let capacity = ffi::block_capacity(&dom, &target)
            .map_err(|e| lv.error(&format!("reading the size of disk {target}"), e))?;
        if capacity < size {
            dom.block_resize(&target, size, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                .map_err(|e| {
                    lv.error(&format!("resizing disk {target} of volume {volume_id}"), e)
                })?;
        }
        let capacity = ffi::block_capacity(&dom, &target)
            .map_err(|e| lv.error(&format!("reading the size of disk {target}"), e))?;
        if capacity < size {
            return Err(Error::internal(format!(
                "disk {target} of volume {volume_id} reports {capacity} bytes after resizing to \
                 {size}"
            )));
        }
        return Ok(Resized::Live { target, capacity });
    }
    if let Some(disk) = v.config_disk(serial) {
        let image = disk.source.clone().ok_or_else(|| {
            Error::internal(format!(
                "disk {} of volume {volume_id} has no source",
                disk.target
            ))
        })?;
        let format = match disk.format.as_deref() {
            Some("raw") => ImageFormat::Raw,
            _ => ImageFormat::Qcow2,
        };
        return Ok(Resized::Offline { image, format });
    }
    Err(Error::Aborted(format!(
        "volume {volume_id} was detached from domain {} meanwhile; retry the expansion",
        v.name
    )))
}

/// Applies `qos` to the disk, live and in the persistent definition, and checks the live
/// `<iotune>` reads back as `qos`. The libvirt calls hold `lock` (the domain's) until they
/// return.
pub(super) async fn set_qos(
    lv: &Libvirt,
    lock: &DomainLock,
    uuid: &str,
    volume_id: &VolumeId,
    qos: &Qos,
) -> Result<()> {
    let serial = volume_id.serial();
    let (u, vol, q, held) = (uuid.to_string(), volume_id.to_string(), *qos, lock.clone());
    lv.write(move |c, l| {
        let _held = held;
        let dom = domain_by_uuid(c, l, &u)?;
        let v = view::read_view(&dom, l)?;
        let what = |t: &str| format!("setting I/O limits of disk {t} of volume {vol}");
        if let Some(disk) = v.live_disk(&serial) {
            ffi::set_block_iotune(&dom, &disk.target, &q, sys::VIR_DOMAIN_AFFECT_LIVE)
                .map_err(|e| l.error(&what(&disk.target), e))?;
        }
        crate::failpoint!("libvirt.iotune-set");
        if let Some(disk) = v.config_disk(&serial) {
            ffi::set_block_iotune(&dom, &disk.target, &q, sys::VIR_DOMAIN_AFFECT_CONFIG)
                .map_err(|e| l.error(&what(&disk.target), e))?;
        }
        let after = view::read_view(&dom, l)?;
        if let Some(disk) = after.live_disk(&serial) {
            if disk.iotune != q {
                return Err(Error::internal(format!(
                    "disk {} of volume {vol} has I/O limits {:?} after setting {q:?}",
                    disk.target, disk.iotune
                )));
            }
        }
        tracing::info!(volume = %vol, domain = %v.name, "I/O limits applied");
        Ok(())
    })
    .await
}
