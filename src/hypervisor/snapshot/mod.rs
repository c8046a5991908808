//! Live snapshots: the running domain stops writing a volume's current image and continues in
//! a new qcow2 overlay that the pool created (backed by that image) — an external disk-only
//! snapshot with REUSE_EXT | NO_METADATA | ATOMIC, plus QUIESCE when a guest agent is
//! connected. The old image is never written again and becomes the snapshot's layer.
//!
//! The contract with the pool: Ok only once the domain writes to the overlay, an error only
//! while it still writes the old image (the pool then deletes the overlay). So every outcome
//! is read back from the domain XML, also after a failed call: libvirt reports an error when
//! the guest's file systems cannot be thawed after a successful switch, and a connection lost
//! mid-call leaves the outcome to be found out once libvirtd is back.
//!
//! The persistent definition follows the live one (libvirt does that itself for a disk with
//! the same target and source; otherwise the disk is repointed here), so a domain restart
//! opens the overlay too. A domain that holds the disk only in its persistent definition
//! (shut off) just gets that definition repointed.

mod xml;

use super::conn::{is_connection_error, Libvirt};
use super::{diskxml, ffi, view, Hypervisor};
use crate::attach::LiveSnapshot;
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::VolumeId;
use serde::Deserialize;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

/// How long a switch whose outcome a lost libvirt connection hid is retried (to ride out a
/// libvirtd restart) before giving up.
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What the switch needs, checked before the domain is touched.
#[derive(Debug, Clone)]
struct Switch {
    volume_id: String,
    serial: String,
    overlay: PathBuf,
    /// The overlay's backing file: the image the disk must be reading now.
    backing: PathBuf,
    /// The overlay's virtual size (never below what the guest sees now).
    size: u64,
}

/// See the module documentation. The caller made `overlay` durable and recorded the intent.
pub(super) async fn snapshot_live(
    hv: &Hypervisor,
    node_id: &str,
    volume_id: &VolumeId,
    overlay: &Path,
) -> Result<LiveSnapshot> {
    if !view::in_pools(overlay, hv.pools()) || !overlay.is_absolute() {
        return Err(Error::internal(format!(
            "the overlay {} of volume {volume_id} is not in a pool's images directory",
            overlay.display()
        )));
    }
    let header = overlay_header(overlay).await?;
    let switch = Switch {
        volume_id: volume_id.to_string(),
        serial: volume_id.serial(),
        overlay: overlay.to_path_buf(),
        backing: header.backing,
        size: header.size,
    };
    let started = Instant::now();
    loop {
        let s = switch.clone();
        match hv
            .with_domain(node_id, move |dom, lv| run_switch(dom, lv, &s))
            .await
        {
            // libvirtd went away mid-switch: the next attempt reads what happened and
            // finishes or repeats the switch.
            Err(e) if e.code() == tonic::Code::Unavailable && started.elapsed() < RETRY_FOR => {
                tracing::warn!(volume = %volume_id, node = %node_id, error = %e,
                    "libvirt unreachable during a live snapshot; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                return Err(Error::Aborted(format!(
                    "node {node_id} went away during the snapshot of volume {volume_id} \
                     ({e}); retry"
                )))
            }
            Ok(live) => {
                tracing::info!(volume = %volume_id, node = %node_id, overlay = %overlay.display(),
                    quiesced = live.quiesced, ms = started.elapsed().as_millis() as u64,
                    "live snapshot: the domain writes to the new overlay");
                return Ok(live);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Header facts of the overlay the pool created.
struct Header {
    backing: PathBuf,
    size: u64,
}

#[derive(Deserialize)]
struct InfoDoc {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    backing_format: Option<String>,
}

/// Reads and checks the overlay: qcow2 with a qcow2 backing file named in its header (a
/// relative name is relative to the overlay's directory, as QEMU resolves it).
async fn overlay_header(overlay: &Path) -> Result<Header> {
    let path = overlay
        .to_str()
        .ok_or_else(|| Error::internal(format!("{} is not UTF-8", overlay.display())))?;
    let out = exec::run("qemu-img", ["info", "-U", "--output=json", path]).await?;
    let info: InfoDoc = serde_json::from_str(&out.stdout)
        .map_err(|e| Error::internal(format!("parsing qemu-img info of {path}: {e}")))?;
    let bad = |why: &str| Error::internal(format!("overlay {path} {why}"));
    if info.format != "qcow2" {
        return Err(bad("is not qcow2"));
    }
    let name = info
        .backing_filename
        .ok_or_else(|| bad("has no backing file"))?;
    if info.backing_format.as_deref() != Some("qcow2") {
        return Err(bad("does not name its backing file's format (qcow2)"));
    }
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    Ok(Header {
        backing: dir.join(name),
        size: info.virtual_size,
    })
}

/// The switch on one domain, under its lock (blocking). Idempotent: a repeat after a lost
/// reply finds the disk on the overlay and only completes the persistent definition.
fn run_switch(dom: &Domain, lv: &Libvirt, s: &Switch) -> Result<LiveSnapshot> {
    let v = view::read_view(dom, lv)?;
    let live = v.live_disk(&s.serial).cloned();
    if live.is_none() && v.config_disk(&s.serial).is_none() {
        return Err(Error::Aborted(format!(
            "volume {} was detached from domain {} meanwhile; retry",
            s.volume_id, v.name
        )));
    }
    let mut quiesced = false;
    if let Some(disk) = &live {
        let source = disk.source.as_deref();
        if source != Some(s.overlay.as_path()) {
            if source != Some(s.backing.as_path()) {
                return Err(Error::internal(format!(
                    "disk {} of volume {} reads {}, not {}, the image its new overlay is backed \
                     by; retry",
                    disk.target,
                    s.volume_id,
                    source.map(|p| p.display().to_string()).unwrap_or_default(),
                    s.backing.display()
                )));
            }
            if disk.readonly {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is attached read-only to domain {}: nothing to switch",
                    s.volume_id, v.name
                )));
            }
            let capacity = ffi::block_capacity(dom, &disk.target)
                .map_err(|e| lv.error(&format!("reading the size of disk {}", disk.target), e))?;
            if capacity > s.size {
                return Err(Error::internal(format!(
                    "the new overlay of volume {} holds {} bytes but the domain sees {capacity}; \
                     the guest's disk must not shrink",
                    s.volume_id, s.size
                )));
            }
            let live_xml = dom
                .xml_desc(0)
                .map_err(|e| lv.error("reading the live domain XML", e))?;
            let facts = xml::live_facts(&live_xml)?;
            let overlay = utf8(&s.overlay)?;
            let request = xml::snapshot_xml(&disk.target, overlay, &facts.targets)?;
            quiesced = take(dom, lv, s, &disk.target, &request, facts.agent_connected)?;
        }
        let after = view::read_view(dom, lv)?;
        let now = after.live_disk(&s.serial).and_then(|d| d.source.clone());
        if now.as_deref() != Some(s.overlay.as_path()) {
            return Err(Error::internal(format!(
                "libvirt reported the snapshot of volume {} done, but its disk reads {} (serial \
                 {}), not the new overlay",
                s.volume_id,
                now.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "nothing".into()),
                s.serial
            )));
        }
    }
    match (repoint_persistent(dom, lv, s), &live) {
        (Ok(()), _) => Ok(LiveSnapshot { quiesced }),
        // The domain writes to the overlay now: that is what the pool must record, whatever
        // the persistent definition says. Unpublish still finds the disk by serial.
        (Err(e), Some(_)) => {
            tracing::error!(volume = %s.volume_id, domain = %v.name, error = %e,
                "the persistent definition still names the old image: a restart of the domain \
                 before the volume is unpublished would open the snapshot's layer");
            Ok(LiveSnapshot { quiesced })
        }
        (Err(e), None) => Err(e),
    }
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::internal(format!("{} is not UTF-8", p.display())))
}

/// Takes the snapshot; returns whether the guest's file systems were frozen around it.
fn take(
    dom: &Domain,
    lv: &Libvirt,
    s: &Switch,
    target: &str,
    request: &str,
    quiesce: bool,
) -> Result<bool> {
    let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
    if quiesce {
        flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
    }
    tracing::debug!(volume = %s.volume_id, target, xml = request, quiesce, "live snapshot");
    let Err(e) = create_snapshot(dom, request, flags) else {
        return Ok(quiesce);
    };
    // libvirt fails the call when thawing fails after a successful switch: the XML decides.
    let now = view::read_view(dom, lv)?;
    if now.live_disk(&s.serial).and_then(|d| d.source.as_deref()) == Some(s.overlay.as_path()) {
        tracing::warn!(volume = %s.volume_id, error = %e,
            "libvirt reported an error but the disk was switched to the new overlay");
        if quiesce {
            if let Err(t) = fs_thaw(dom) {
                tracing::warn!(error = %t, "thawing the guest's file systems failed");
            }
        }
        return Ok(quiesce);
    }
    if quiesce && !is_connection_error(&e) {
        // Agent present but the freeze failed (agent busy, hook error): a crash-consistent
        // snapshot is still a snapshot; the record says it was not quiesced.
        tracing::warn!(volume = %s.volume_id, error = %e,
            "guest file systems could not be frozen; taking a crash-consistent snapshot");
        return take(dom, lv, s, target, request, false);
    }
    Err(lv.error(
        &format!("live snapshot of disk {target} of volume {}", s.volume_id),
        e,
    ))
}

/// Points the disk of the persistent definition (if any) at the overlay, unless libvirt did.
fn repoint_persistent(dom: &Domain, lv: &Libvirt, s: &Switch) -> Result<()> {
    let v = view::read_view(dom, lv)?;
    let Some(disk) = v.config_disk(&s.serial) else {
        return Ok(());
    };
    if disk.source.as_deref() == Some(s.overlay.as_path()) {
        return Ok(());
    }
    let inactive = dom
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| lv.error("reading the persistent domain XML", e))?;
    let Some(r) = xml::repoint_disk(&inactive, &s.serial, utf8(&s.overlay)?)? else {
        return Ok(());
    };
    let config = sys::VIR_DOMAIN_AFFECT_CONFIG;
    let what = format!(
        "pointing disk {} of the persistent definition of domain {} at the new overlay",
        disk.target, v.name
    );
    dom.detach_device_flags(&diskxml::detach_xml(&disk.target, &disk.bus)?, config)
        .map_err(|e| lv.error(&what, e))?;
    if let Err(e) = dom.attach_device_flags(&r.repointed, config) {
        let err = lv.error(&what, e);
        if let Err(back) = dom.attach_device_flags(&r.original, config) {
            return Err(Error::internal(format!(
                "{err}; putting the disk back failed too ({}): publish the volume again",
                back.message()
            )));
        }
        return Err(err);
    }
    let after = view::read_view(dom, lv)?;
    if after
        .config_disk(&s.serial)
        .and_then(|d| d.source.as_deref())
        != Some(&s.overlay)
    {
        return Err(Error::internal(format!(
            "{what}: the definition did not change"
        )));
    }
    tracing::info!(volume = %s.volume_id, domain = %v.name, target = %disk.target,
        "persistent definition repointed at the new overlay");
    Ok(())
}

/// virDomainSnapshotCreateXML (the `virt` crate has no safe wrapper).
fn create_snapshot(dom: &Domain, xml: &str, flags: u32) -> std::result::Result<(), VirtError> {
    let xml = CString::new(xml).map_err(VirtError::from)?;
    // SAFETY: valid domain and NUL-terminated XML for the duration of the call; the returned
    // snapshot handle is freed right away (NO_METADATA: nothing to keep); the error is read
    // on this thread right after the failing call.
    unsafe {
        let snap = sys::virDomainSnapshotCreateXML(dom.as_ptr(), xml.as_ptr(), flags);
        if snap.is_null() {
            return Err(VirtError::last_error());
        }
        sys::virDomainSnapshotFree(snap);
    }
    Ok(())
}

/// virDomainFSThaw of every frozen file system.
fn fs_thaw(dom: &Domain) -> std::result::Result<(), VirtError> {
    // SAFETY: no mount point list (NULL, 0) means all; error read on this thread.
    unsafe {
        if sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) < 0 {
            return Err(VirtError::last_error());
        }
    }
    Ok(())
}
