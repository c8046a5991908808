//! Attaching a disk (blocking; runs inside `Libvirt::write` under the domain's lock).

use super::attachment_of;
use super::conn::Libvirt;
use super::diskxml;
use super::view::PoolImages;
use super::view::{self, DomainView};
use crate::attach::{Attachment, DiskSpec};
use crate::error::{Error, Result};
use crate::params::Bus;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

const LIVE: u32 = sys::VIR_DOMAIN_AFFECT_LIVE;
const CONFIG: u32 = sys::VIR_DOMAIN_AFFECT_CONFIG;

/// The domain with this UUID; NotFound if it went away.
pub(super) fn domain_by_uuid(conn: &Connect, lv: &Libvirt, uuid: &str) -> Result<Domain> {
    conn.lookup_domain_by_uuid_string(uuid).map_err(|e| {
        if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN {
            Error::NotFound(format!(
                "node {uuid} is not known: its libvirt domain is gone"
            ))
        } else {
            lv.error(&format!("looking up domain {uuid}"), e)
        }
    })
}

/// Attaches `spec` to the domain and confirms it is in the live XML (and the persistent one
/// when persisting). On failure, whatever half of the disk got attached is taken out again.
pub(super) fn attach(
    conn: &Connect,
    lv: &Libvirt,
    pools: &[PoolImages],
    uuid: &str,
    node_id: &str,
    spec: &DiskSpec,
    max: u64,
) -> Result<Attachment> {
    let dom = domain_by_uuid(conn, lv, uuid)?;
    let v = view::read_view(&dom, lv)?;
    if !v.active {
        return Err(Error::FailedPrecondition(format!(
            "node {node_id}: domain {} is not running; disks are hot-plugged into running \
             domains only, so start it first",
            v.name
        )));
    }
    let persist = spec.options.persist && v.persistent;
    if spec.options.persist && !v.persistent {
        tracing::info!(domain = %v.name, volume = %spec.volume_id,
            "transient domain: attaching live only (it has no persistent definition)");
    }
    if let Some(disk) = v.live_disk(&spec.serial) {
        // Already attached (a retry after a lost reply): complete the persistent half.
        if persist && v.config_disk(&spec.serial).is_none() {
            let free_in_config = v
                .config
                .as_ref()
                .is_none_or(|c| c.disk_by_target(&disk.target).is_none());
            if free_in_config {
                let xml = diskxml::disk_xml(spec, &disk.target)?;
                dom.attach_device_flags(&xml, CONFIG).map_err(|e| {
                    lv.error("adding the disk to the persistent domain definition", e)
                })?;
            }
        }
        return Ok(attachment_of(node_id, &spec.volume_id.to_string(), disk));
    }
    let mut v = v;
    if let Some(stale) = v.config_disk(&spec.serial) {
        // Left in the persistent definition by an earlier attach: start from clean.
        let xml = diskxml::detach_xml(&stale.target, &stale.bus)?;
        dom.detach_device_flags(&xml, CONFIG).map_err(|e| {
            lv.error(
                "removing a stale copy of the disk from the persistent definition",
                e,
            )
        })?;
        v = view::read_view(&dom, lv)?;
    }
    check_limit(&v, pools, node_id, spec, max)?;
    let bus = spec.options.bus;
    if bus == Bus::Sata {
        return Err(Error::FailedPrecondition(format!(
            "volume {} has bus=sata, which cannot be hot-plugged (QEMU's AHCI controller has no \
             hotplug); create the volume with bus=scsi or bus=virtio",
            spec.volume_id
        )));
    }
    if bus == Bus::Scsi {
        ensure_scsi_controller(&dom, lv, &v, persist)?;
    }
    let target = diskxml::free_target(bus, &v.used_targets())?;
    let xml = diskxml::disk_xml(spec, &target)?;
    let flags = if persist { LIVE | CONFIG } else { LIVE };
    tracing::debug!(domain = %v.name, target = %target, xml = %xml, "attaching disk");
    if let Err(e) = dom.attach_device_flags(&xml, flags) {
        let err = lv.error(
            &format!("attaching volume {} to node {node_id}", spec.volume_id),
            e,
        );
        return Err(undo_partial(&dom, lv, &spec.serial, err));
    }
    crate::failpoint!("libvirt.attached");
    confirm(&dom, lv, node_id, spec, persist)
}

/// RESOURCE_EXHAUSTED when the domain already holds `max` plugin volumes.
fn check_limit(
    v: &DomainView,
    pools: &[PoolImages],
    node_id: &str,
    spec: &DiskSpec,
    max: u64,
) -> Result<()> {
    if max == 0 {
        return Ok(());
    }
    let this = spec.volume_id.to_string();
    let held = v
        .plugin_disks(pools)
        .iter()
        .filter(|(vol, _)| *vol != this)
        .count() as u64;
    if held >= max {
        return Err(Error::ResourceExhausted(format!(
            "node {node_id} already holds {held} volumes, its limit (max_volumes_per_node = \
             {max}); unpublish one first"
        )));
    }
    Ok(())
}

/// Adds a virtio-scsi controller when the domain has no SCSI controller (live, and in the
/// persistent definition when the disk goes there too).
fn ensure_scsi_controller(dom: &Domain, lv: &Libvirt, v: &DomainView, persist: bool) -> Result<()> {
    let xml = diskxml::scsi_controller_xml()?;
    let live_has = v.live.as_ref().is_some_and(|x| x.has_scsi_controller);
    if !live_has {
        tracing::info!(domain = %v.name, "adding a virtio-scsi controller");
        dom.attach_device_flags(&xml, LIVE)
            .map_err(|e| lv.error("adding a virtio-scsi controller to the domain", e))?;
    }
    let config_has = v.config.as_ref().is_some_and(|x| x.has_scsi_controller);
    if persist && !config_has {
        dom.attach_device_flags(&xml, CONFIG).map_err(|e| {
            lv.error(
                "adding a virtio-scsi controller to the persistent domain definition",
                e,
            )
        })?;
    }
    Ok(())
}

/// Reads the domain back: the disk must be in the live XML (and the persistent one).
fn confirm(
    dom: &Domain,
    lv: &Libvirt,
    node_id: &str,
    spec: &DiskSpec,
    persist: bool,
) -> Result<Attachment> {
    let after = view::read_view(dom, lv)?;
    let live = after.live_disk(&spec.serial);
    let complete = live.is_some() && (!persist || after.config_disk(&spec.serial).is_some());
    match live {
        Some(disk) if complete => Ok(attachment_of(node_id, &spec.volume_id.to_string(), disk)),
        _ => {
            let err = Error::Unavailable(format!(
                "libvirt accepted volume {} for node {node_id} but the disk is not in the \
                 domain's {} definition; retry",
                spec.volume_id,
                if live.is_none() { "live" } else { "persistent" }
            ));
            Err(undo_partial(dom, lv, &spec.serial, err))
        }
    }
}

/// Takes out any half of a failed attach, then returns `err` (with a note if that failed).
fn undo_partial(dom: &Domain, lv: &Libvirt, serial: &str, err: Error) -> Error {
    let v = match view::read_view(dom, lv) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check for a half-attached disk");
            return err;
        }
    };
    let mut leftovers = Vec::new();
    for (disk, flag, name) in [
        (v.live_disk(serial), LIVE, "live"),
        (v.config_disk(serial), CONFIG, "persistent"),
    ] {
        let Some(disk) = disk else { continue };
        let removed = diskxml::detach_xml(&disk.target, &disk.bus).and_then(|xml| {
            dom.detach_device_flags(&xml, flag)
                .map_err(|e| lv.error("removing a half-attached disk", e))
        });
        match removed {
            Ok(()) => tracing::info!(target = %disk.target, definition = name,
                "removed the disk of a failed attach"),
            Err(e) => {
                tracing::warn!(error = %e, target = %disk.target, definition = name,
                    "cannot remove the disk of a failed attach");
                leftovers.push(format!("{} ({name})", disk.target));
            }
        }
    }
    if leftovers.is_empty() {
        return err;
    }
    let note = format!(
        "; disk {} could not be removed again and may still be attached: unpublish the volume",
        leftovers.join(", ")
    );
    Error::condition(err.code(), format!("{err}{note}"))
}
