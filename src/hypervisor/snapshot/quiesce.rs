//! Quiescing a running domain around a live snapshot (blocking; each runs inside
//! `Libvirt::write`, WITHOUT the domain's lock: a freeze that hangs in the guest must not keep
//! the snapshot or the thaw of the same domain waiting):
//! - the guest's file systems frozen and thawed through qemu-guest-agent (`guest-fsfreeze-*`,
//!   libvirt's virDomainFSFreeze/Thaw): application-consistent snapshots;
//! - the domain's vCPUs paused and resumed (virDomainSuspend/Resume): no new write is issued
//!   while snapshots of several domains are cut, so they share one point of the write stream.
//!
//! libvirt runs agent commands as agent jobs, apart from the domain's own jobs, so a thaw or a
//! snapshot can run while a freeze is still waiting for the guest.

use super::super::conn::Libvirt;
use super::xml;
use crate::error::Result;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::Error as VirtError;
use virt::sys;

/// Whether a qemu-guest-agent is connected to the domain (its channel's state in the live
/// XML: the guest opened the port).
pub(crate) fn agent_connected(dom: &Domain, lv: &Libvirt) -> Result<bool> {
    let live = dom
        .xml_desc(0)
        .map_err(|e| lv.error("reading the live domain XML", e))?;
    Ok(xml::live_facts(&live)?.agent_connected)
}

/// Freezes every file system of the guest. `None` when no agent is connected; else how many
/// file systems the agent froze.
pub(crate) fn freeze(dom: &Domain, lv: &Libvirt) -> Result<Option<u32>> {
    if !agent_connected(dom, lv)? {
        return Ok(None);
    }
    // SAFETY: no mount point list (NULL, 0) means every file system; the error is read on this
    // thread right after the failing call.
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(lv.error(
            "freezing the guest's file systems (qemu-guest-agent)",
            VirtError::last_error(),
        ));
    }
    Ok(Some(n as u32))
}

/// Thaws every frozen file system of the guest; how many were thawed (0 when none was
/// frozen). An agent that is not connected has nothing frozen.
pub(crate) fn thaw(dom: &Domain, lv: &Libvirt) -> Result<u32> {
    if !agent_connected(dom, lv)? {
        return Ok(0);
    }
    // SAFETY: as in `freeze`.
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(lv.error(
            "thawing the guest's file systems (qemu-guest-agent)",
            VirtError::last_error(),
        ));
    }
    Ok(n as u32)
}

fn is_running(dom: &Domain, lv: &Libvirt) -> Result<Option<bool>> {
    let info = dom
        .info()
        .map_err(|e| lv.error("reading the domain state", e))?;
    Ok(match info.state {
        Enum::Known(DomainState::Running) => Some(true),
        Enum::Known(DomainState::Paused) => Some(false),
        _ => None,
    })
}

/// Pauses the domain's vCPUs if it runs. Whether it paused it (false: it was not running, or
/// paused already by someone else, whose pause is left alone).
pub(crate) fn pause(dom: &Domain, lv: &Libvirt) -> Result<bool> {
    if is_running(dom, lv)? != Some(true) {
        return Ok(false);
    }
    dom.suspend()
        .map_err(|e| lv.error("pausing the domain", e))?;
    Ok(true)
}

/// Resumes a domain this plugin paused; nothing when it is not paused.
pub(crate) fn resume(dom: &Domain, lv: &Libvirt) -> Result<()> {
    if is_running(dom, lv)? != Some(false) {
        return Ok(());
    }
    dom.resume().map_err(|e| lv.error("resuming the domain", e))
}
