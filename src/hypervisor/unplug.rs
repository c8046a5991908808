//! Detaching a disk and confirming it is gone (under the domain's lock).
//!
//! A live detach is a request to the guest: virtio-blk and PCI devices leave only when the
//! guest OS lets go, and libvirt may return success while the disk is still there. So the
//! live XML is re-read (woken by DEVICE_REMOVED events, else polled) until the disk is gone
//! or the detach timeout passes, which is a retryable error, never OK.

use super::conn::{device_removed, DomainLock, Libvirt};
use super::diskxml;
use super::plug::domain_by_uuid;
use super::view;
use crate::error::{Error, Kind, Result};
use crate::ids::VolumeId;
use std::time::{Duration, Instant};
use tonic::Code;
use virt::sys;

const POLL: Duration = Duration::from_millis(200);

/// What the live detach request found.
struct Requested {
    /// Target dev of the disk in the live definition, if it was there.
    live_target: Option<String>,
    domain: String,
}

/// Detaches the volume's disk from the domain `uuid` of `lv`'s host, live and persistent,
/// confirming it is gone from the live definition within `timeout`. Every libvirt call holds
/// `lock` (the domain's) until it returns. Returns whether the disk was in the live definition
/// (false: there was nothing to detach live).
pub(super) async fn detach(
    lv: &Libvirt,
    lock: &DomainLock,
    uuid: &str,
    volume_id: &VolumeId,
    timeout: Duration,
) -> Result<bool> {
    let serial = volume_id.serial();
    let started = Instant::now();
    let deadline = started + timeout;
    let (u, s, held) = (uuid.to_string(), serial.clone(), lock.clone());
    let requested = match lv
        .write(move |c, l| {
            let _held = held;
            request_live(c, l, &u, &s)
        })
        .await
    {
        Ok(r) => r,
        // The domain went away meanwhile: nothing is attached to it any more.
        Err(e) if e.code() == Code::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    crate::failpoint!("libvirt.detach-requested");
    if let Some(target) = &requested.live_target {
        wait_gone(lv, lock, uuid, &serial, deadline)
            .await
            .map_err(|e| match e.code() {
                Code::DeadlineExceeded => Error::Timeout(format!(
                    "volume {volume_id}: disk {target} is still attached to domain {} after {}s; \
                 the guest has not released it (a guest without a running OS, or one using \
                 the disk, cannot). The detach request stays pending; retry \
                 ControllerUnpublishVolume",
                    requested.domain,
                    started.elapsed().as_secs()
                )),
                _ => e,
            })?;
        tracing::info!(volume = %volume_id, domain = %requested.domain, target = %target,
            ms = started.elapsed().as_millis() as u64, "disk detached from the live domain");
        crate::failpoint!("libvirt.live-detached");
    }
    remove_stale(lv, lock, uuid, volume_id).await?;
    Ok(requested.live_target.is_some())
}

/// Removes the volume's disk from the persistent definition of domain `uuid` of `lv`'s host
/// (a shut-off definition a live migration left behind, or the persistent half of a detach).
/// OK when it is not there or the domain is gone.
pub(super) async fn remove_stale(
    lv: &Libvirt,
    lock: &DomainLock,
    uuid: &str,
    volume_id: &VolumeId,
) -> Result<()> {
    let serial = volume_id.serial();
    let (u, held) = (uuid.to_string(), lock.clone());
    match lv
        .write(move |c, l| {
            let _held = held;
            remove_persistent(c, l, &u, &serial)
        })
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sends the live detach request if the disk is in the live definition.
fn request_live(
    conn: &virt::connect::Connect,
    lv: &Libvirt,
    uuid: &str,
    serial: &str,
) -> Result<Requested> {
    let dom = domain_by_uuid(conn, lv, uuid)?;
    let v = view::read_view(&dom, lv)?;
    let Some(disk) = v.live_disk(serial) else {
        return Ok(Requested {
            live_target: None,
            domain: v.name,
        });
    };
    let xml = diskxml::detach_xml(&disk.target, &disk.bus)?;
    if let Err(e) = dom.detach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE) {
        let missing = e.code().to_raw() == sys::VIR_ERR_DEVICE_MISSING;
        let err = lv.error(&format!("detaching disk {}", disk.target), e);
        // Gone already, or a removal the guest has yet to finish: the wait decides.
        if !missing && err.kind() != Some(Kind::UnplugPending) {
            return Err(err);
        }
        tracing::debug!(error = %err, "detach request not accepted; waiting for the disk to go");
    }
    Ok(Requested {
        live_target: Some(disk.target.clone()),
        domain: v.name,
    })
}

/// Re-reads the live definition until the disk with `serial` is gone or `deadline` passes.
async fn wait_gone(
    lv: &Libvirt,
    lock: &DomainLock,
    uuid: &str,
    serial: &str,
    deadline: Instant,
) -> Result<()> {
    loop {
        let removed = device_removed();
        let (u, s, held) = (uuid.to_string(), serial.to_string(), lock.clone());
        let present = lv
            .read(move |c, l| {
                let _held = &held;
                let dom = match domain_by_uuid(c, l, &u) {
                    Ok(d) => d,
                    Err(e) if e.code() == Code::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                };
                Ok(view::read_view(&dom, l)?.live_disk(&s).is_some())
            })
            .await?;
        if !present {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout(String::new()));
        }
        let nap = POLL.min(deadline - now);
        tokio::select! {
            _ = removed => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
}

/// Removes the disk from the persistent definition (also a leftover whose live half is gone).
fn remove_persistent(
    conn: &virt::connect::Connect,
    lv: &Libvirt,
    uuid: &str,
    serial: &str,
) -> Result<()> {
    let dom = domain_by_uuid(conn, lv, uuid)?;
    let v = view::read_view(&dom, lv)?;
    let Some(disk) = v.config_disk(serial) else {
        return Ok(());
    };
    let xml = diskxml::detach_xml(&disk.target, &disk.bus)?;
    match dom.detach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_CONFIG) {
        Ok(()) => {}
        Err(e) if e.code().to_raw() == sys::VIR_ERR_DEVICE_MISSING => {}
        Err(e) => {
            return Err(lv.error(
                &format!(
                    "removing disk {} from the persistent definition",
                    disk.target
                ),
                e,
            ))
        }
    }
    if view::read_view(&dom, lv)?.config_disk(serial).is_some() {
        return Err(Error::Unavailable(format!(
            "disk {} is still in the persistent definition of domain {}; retry",
            disk.target, v.name
        )));
    }
    tracing::info!(domain = %v.name, target = %disk.target, "disk removed from the persistent definition");
    Ok(())
}
