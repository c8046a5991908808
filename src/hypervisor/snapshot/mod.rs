//! Live snapshots: a running domain stops writing the current images of some of its disks
//! and continues in new qcow2 overlays that the pool created (each backed by its disk's
//! image) — ONE external disk-only snapshot with REUSE_EXT | NO_METADATA | ATOMIC naming every
//! such disk, which libvirt hands to QEMU as one `transaction`: every disk switches at the same
//! instant of the guest's write stream, or none does. The old images are never written again
//! and become the snapshots' layers.
//!
//! The guest's file systems are frozen around the switch by the caller (`quiesce`, driven by
//! `attach`), not by libvirt's QUIESCE flag, so the frozen window is bounded by the caller and
//! spans several domains when a group does.
//!
//! The contract with the pool: Ok only once the domain writes to every overlay, an error only
//! while it still writes every old image (the pool then deletes the overlays). So every outcome
//! is read back from the domain XML, also after a failed call: a connection lost mid-call
//! leaves the outcome to be found out once libvirtd is back.
//!
//! The persistent definition follows the live one (libvirt does that itself for a disk with
//! the same target and source; otherwise the disk is repointed here), so a domain restart
//! opens the overlays too. A domain that holds a disk only in its persistent definition
//! (shut off) just gets that definition repointed.

pub(super) mod quiesce;
mod xml;

use super::conn::Libvirt;
use super::{diskxml, ffi, view, Hypervisor};
use crate::attach::LiveMember;
use crate::error::{Error, Result};
use crate::exec;
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

/// What the switch of one disk needs, checked before the domain is touched.
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

/// See the module documentation. The caller made every overlay durable and recorded the
/// intent. All members are disks of the domain of `node_id`.
pub(super) async fn snapshot_live(
    hv: &Hypervisor,
    node_id: &str,
    members: &[LiveMember],
) -> Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    let switches = read_switches(hv, members).await?;
    let what = describe(members);
    let started = Instant::now();
    loop {
        let s = switches.clone();
        match hv
            .with_domain(node_id, move |dom, lv| run_switch(dom, lv, &s))
            .await
        {
            // libvirtd went away mid-switch: the next attempt reads what happened and
            // finishes or repeats the switch.
            Err(e) if e.code() == tonic::Code::Unavailable && started.elapsed() < RETRY_FOR => {
                tracing::warn!(of = %what, node = %node_id, error = %e,
                    "libvirt unreachable during a live snapshot; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                return Err(Error::Aborted(format!(
                    "node {node_id} went away during the snapshot of {what} ({e}); retry"
                )))
            }
            Ok(()) => {
                tracing::info!(of = %what, node = %node_id, disks = members.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "live snapshot: the domain writes to the new overlay(s)");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// "volume v" or "volumes a, b, c", for messages.
fn describe(members: &[LiveMember]) -> String {
    let ids: Vec<String> = members.iter().map(|m| m.volume_id.to_string()).collect();
    match ids.as_slice() {
        [one] => format!("volume {one}"),
        many => format!("volumes {}", many.join(", ")),
    }
}

/// Checks every overlay and reads its header (concurrently: one `qemu-img info` each).
async fn read_switches(hv: &Hypervisor, members: &[LiveMember]) -> Result<Vec<Switch>> {
    let mut reads = tokio::task::JoinSet::new();
    for (i, m) in members.iter().enumerate() {
        if !view::in_pools(&m.overlay, hv.pools()) || !m.overlay.is_absolute() {
            return Err(Error::internal(format!(
                "the overlay {} of volume {} is not in a pool's images directory",
                m.overlay.display(),
                m.volume_id
            )));
        }
        let m = m.clone();
        reads.spawn(async move {
            let header = overlay_header(&m.overlay).await?;
            Ok::<_, Error>((
                i,
                Switch {
                    serial: m.volume_id.serial(),
                    volume_id: m.volume_id.to_string(),
                    overlay: m.overlay,
                    backing: header.backing,
                    size: header.size,
                },
            ))
        });
    }
    let mut out: Vec<Option<Switch>> = vec![None; members.len()];
    while let Some(done) = reads.join_next().await {
        let (i, s) = done.map_err(|e| Error::internal(format!("reading an overlay: {e}")))??;
        out[i] = Some(s);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Header facts of the overlay the pool created.
struct Header {
    backing: PathBuf,
    size: u64,
}

/// Reads and checks the overlay's header (without a process: `pool::qcow2`): qcow2 with a
/// qcow2 backing file (a relative name is relative to the overlay's directory, as QEMU
/// resolves it).
async fn overlay_header(overlay: &Path) -> Result<Header> {
    let path = overlay.to_path_buf();
    let header = exec::blocking(move || crate::pool::qcow2::read_header(&path)).await?;
    let bad = |why: &str| Error::internal(format!("overlay {} {why}", overlay.display()));
    let name = header.backing.ok_or_else(|| bad("has no backing file"))?;
    if header.backing_format.as_deref() != Some("qcow2") {
        return Err(bad("does not name its backing file's format (qcow2)"));
    }
    let dir = overlay.parent().unwrap_or(Path::new("/"));
    Ok(Header {
        backing: dir.join(name),
        size: header.size,
    })
}

/// The switch on one domain, under its lock (blocking). Idempotent: a repeat after a lost
/// reply finds the disks on their overlays and only completes the persistent definition.
fn run_switch(dom: &Domain, lv: &Libvirt, switches: &[Switch]) -> Result<()> {
    let v = view::read_view(dom, lv)?;
    // (target, switch) of every disk the running domain still writes the old image of.
    let mut pending: Vec<(String, &Switch)> = Vec::new();
    for s in switches {
        let Some(disk) = v.live_disk(&s.serial) else {
            if v.config_disk(&s.serial).is_none() {
                return Err(Error::Aborted(format!(
                    "volume {} was detached from domain {} meanwhile; retry",
                    s.volume_id, v.name
                )));
            }
            continue;
        };
        let source = disk.source.as_deref();
        if source == Some(s.overlay.as_path()) {
            continue;
        }
        if source != Some(s.backing.as_path()) {
            return Err(Error::internal(format!(
                "disk {} of volume {} reads {}, not {}, the image its new overlay is backed by;                  retry",
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
                "the new overlay of volume {} holds {} bytes but the domain sees {capacity};                  the guest's disk must not shrink",
                s.volume_id, s.size
            )));
        }
        pending.push((disk.target.clone(), s));
    }
    if !pending.is_empty() {
        let live_xml = dom
            .xml_desc(0)
            .map_err(|e| lv.error("reading the live domain XML", e))?;
        let facts = xml::live_facts(&live_xml)?;
        let external = pending
            .iter()
            .map(|(t, s)| Ok((t.as_str(), utf8(&s.overlay)?)))
            .collect::<Result<Vec<_>>>()?;
        let request = xml::snapshot_xml(&external, &facts.targets)?;
        take(dom, lv, &pending, &request)?;
    }
    let after = view::read_view(dom, lv)?;
    for s in switches {
        let Some(disk) = after.live_disk(&s.serial) else {
            continue;
        };
        if disk.source.as_deref() != Some(s.overlay.as_path()) {
            return Err(Error::internal(format!(
                "libvirt reported the snapshot of volume {} done, but its disk reads {} (serial                  {}), not the new overlay",
                s.volume_id,
                disk.source
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "nothing".into()),
                s.serial
            )));
        }
    }
    for s in switches {
        // libvirt follows the live switch in the persistent definition itself when the disk
        // is the same there (target and source): nothing to do for those.
        let followed = after
            .config_disk(&s.serial)
            .is_none_or(|d| d.source.as_deref() == Some(s.overlay.as_path()));
        if followed {
            continue;
        }
        match (repoint_persistent(dom, lv, s), v.live_disk(&s.serial)) {
            (Ok(()), _) => {}
            // The domain writes to the overlay now: that is what the pool must record,
            // whatever the persistent definition says. Unpublish still finds the disk by
            // serial.
            (Err(e), Some(_)) => {
                tracing::error!(volume = %s.volume_id, domain = %v.name, error = %e,
                    "the persistent definition still names the old image: a restart of the                      domain before the volume is unpublished would open the snapshot's layer");
            }
            (Err(e), None) => return Err(e),
        }
    }
    Ok(())
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::internal(format!("{} is not UTF-8", p.display())))
}

/// Takes the snapshot of every pending disk in one call. On an error the domain XML decides:
/// QEMU applies the transaction to all disks or to none.
fn take(dom: &Domain, lv: &Libvirt, pending: &[(String, &Switch)], request: &str) -> Result<()> {
    let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
    tracing::debug!(disks = pending.len(), xml = request, "live snapshot");
    let Err(e) = create_snapshot(dom, request, flags) else {
        return Ok(());
    };
    let now = view::read_view(dom, lv)?;
    let switched = pending
        .iter()
        .filter(|(_, s)| {
            now.live_disk(&s.serial).and_then(|d| d.source.as_deref()) == Some(s.overlay.as_path())
        })
        .count();
    let targets: Vec<&str> = pending.iter().map(|(t, _)| t.as_str()).collect();
    if switched == pending.len() {
        tracing::warn!(targets = ?targets, error = %e,
            "libvirt reported an error but every disk was switched to its new overlay");
        return Ok(());
    }
    if switched > 0 {
        return Err(Error::internal(format!(
            "the live snapshot of disks {} failed ({}) with {switched} of {} disks switched:              QEMU applies it to all or none, so something else changed the domain",
            targets.join(", "),
            e.message(),
            pending.len()
        )));
    }
    let ids: Vec<&str> = pending.iter().map(|(_, s)| s.volume_id.as_str()).collect();
    Err(lv.error(
        &format!(
            "live snapshot of disk(s) {} of volume(s) {}",
            targets.join(", "),
            ids.join(", ")
        ),
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
