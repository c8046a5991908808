//! Live snapshot of a locally attached volume, in its storage daemon over QMP: the daemon
//! opens the overlay the pool created as a new node (`blockdev-add`, its backing left unset),
//! then one `transaction` of `blockdev-snapshot` puts it on top of the layer the FUSE export
//! serves. QEMU drains and flushes the old layer, makes it the overlay's backing (read-only
//! from then on) and moves the export onto the overlay at once: the loop device and the file
//! system on it never see a gap. The overlay's header, written by the pool, is left as it is.
//!
//! Nodes are numbered (`daemon::format_node`): the daemon starts with layer 0 and each
//! switch adds the next. The daemon's command line keeps naming the first image, so what a
//! daemon serves is always read from QMP (`Served::active`); the slot's record is updated
//! after each switch, and adoption accepts a record one switch behind (a plugin killed
//! between the switch and the record).
//!
//! The pool's contract (`Attacher::snapshot_live`): Ok only once the export serves the
//! overlay; a definite error only while it serves the old layer; UNAVAILABLE when that cannot
//! be told. The outcome is read back from the daemon after every failure. A node added but
//! not switched (the switch failed, or the plugin died between the two steps) is deleted
//! before the next switch and when the plugin adopts the daemon: it would hold the overlay's
//! image lock, which the pool's recovery reads as "switched".

use super::daemon::{format_node, protocol_node, Active};
use super::qmp::{self, Session};
use super::slot::{Record, Slot};
use crate::attach::outcome_unknown;
use crate::error::{Error, Result};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// How long the whole switch may take (a healthy daemon needs milliseconds; a flush of the
/// old layer may take longer on a slow disk).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Switches the export of the daemon in `slot` to `overlay` (see the module documentation).
/// Idempotent: a daemon already serving `overlay` is left as it is. Returns the layer served.
pub(super) async fn switch(slot: &Slot, rec: &Record, overlay: &Path) -> Result<Active> {
    let socket = slot.qmp_path();
    let prepared = qmp::bounded(&socket, "blockdev-add", SWITCH_TIMEOUT, async {
        let mut s = Session::connect(&socket).await?;
        let prepared = prepare(&mut s, rec, overlay).await?;
        Ok((s, prepared))
    })
    .await;
    // Nothing was switched yet: every failure is definite (a node added meanwhile is deleted
    // by the next switch or adoption, before anyone reads its lock).
    let (mut session, prepared) = prepared.map_err(|e| {
        if outcome_unknown(&e) {
            Error::Aborted(format!(
                "the storage daemon of volume {} did not prepare the live snapshot ({e}); \
                 nothing was switched: retry",
                rec.volume_id
            ))
        } else {
            e
        }
    })?;
    let (from, to) = match prepared {
        Prepared::Done(active) => {
            record_image(slot, rec, &active).await;
            return Ok(active);
        }
        Prepared::Added { from, to } => (from, to),
    };
    crate::failpoint!("localattach.overlay-added");
    let actions = json!({"actions": [{
        "type": "blockdev-snapshot",
        "data": {"node": format_node(from), "overlay": format_node(to)},
    }]});
    let done = qmp::bounded(&socket, "transaction", SWITCH_TIMEOUT, async {
        session.execute("transaction", actions).await
    })
    .await;
    drop(session);
    // What the daemon says now decides, whatever the reply was.
    let now = qmp::served(&socket).await.map(|s| s.active());
    match (done, now) {
        (_, Ok(Ok(active))) if active.image == overlay => {
            crate::failpoint!("localattach.switched");
            record_image(slot, rec, &active).await;
            Ok(active)
        }
        (done, Ok(Ok(active))) if active.layer == from => {
            // Still on the old layer: a definite failure; the unused node goes.
            if let Err(e) = delete_layers(&socket, &[to]).await {
                tracing::warn!(volume = %rec.volume_id, error = %e,
                    "cannot delete the unused overlay node; the next snapshot or a restart will");
            }
            Err(match done {
                Err(e) if !outcome_unknown(&e) => e,
                Err(e) => Error::Aborted(format!(
                    "the live snapshot of volume {} did not happen ({e}); retry",
                    rec.volume_id
                )),
                Ok(_) => Error::internal(format!(
                    "the storage daemon of volume {} reported the snapshot done, but its export \
                     still serves {}",
                    rec.volume_id,
                    active.image.display()
                )),
            })
        }
        (done, now) => Err(Error::Unavailable(format!(
            "the outcome of the live snapshot of volume {} is unknown (reply: {}; the daemon \
             now: {})",
            rec.volume_id,
            match done {
                Ok(_) => "ok".to_string(),
                Err(e) => e.to_string(),
            },
            match now {
                Ok(Ok(a)) => format!("serves {}", a.image.display()),
                Ok(Err(why)) => why,
                Err(e) => e.to_string(),
            }
        ))),
    }
}

/// Where a switch stands once the overlay node is ready.
enum Prepared {
    /// The export serves the overlay already (a repeated switch).
    Done(Active),
    /// Node `to` holds the overlay; the export serves `from`.
    Added { from: u32, to: u32 },
}

/// Checks what the daemon serves, deletes nodes a failed switch left, adds the overlay node
/// and checks its header against the layer it goes on.
async fn prepare(s: &mut Session, rec: &Record, overlay: &Path) -> Result<Prepared> {
    let served = s.served().await?;
    let active = served.active().map_err(|why| {
        Error::FailedPrecondition(format!(
            "the storage daemon of volume {} cannot be snapshotted live: {why}; unpublish it \
             and publish it again",
            rec.volume_id
        ))
    })?;
    if active.image == overlay {
        return Ok(Prepared::Done(active));
    }
    let stale = served.above(active.layer);
    for n in stale.iter().rev() {
        tracing::info!(volume = %rec.volume_id, node = %format_node(*n),
            "deleting an overlay node a failed snapshot left");
        s.execute("blockdev-del", json!({"node-name": format_node(*n)}))
            .await?;
    }
    let to = active.layer + 1;
    let mut file = json!({
        "driver": "file",
        "node-name": protocol_node(to),
        "filename": overlay,
    });
    let mut format = json!({
        "driver": "qcow2",
        "node-name": format_node(to),
        "read-only": false,
        "backing": null,
    });
    if rec.discard {
        file["discard"] = json!("unmap");
        format["discard"] = json!("unmap");
    }
    format["file"] = file;
    s.execute("blockdev-add", format).await?;
    let added = s.served().await?;
    let node = added.nodes.iter().find(|n| n.name == format_node(to));
    let backing = node
        .and_then(|n| n.backing_filename.as_deref())
        .map(|b| overlay.parent().unwrap_or(Path::new("/")).join(b));
    let size = node.map_or(0, |n| n.virtual_size);
    let wrong = if backing.as_deref() != Some(active.image.as_path()) {
        Some(format!(
            "its header names {} as its backing file, not {}, the image the volume's export \
             serves",
            backing.map_or_else(|| "nothing".into(), |b| b.display().to_string()),
            active.image.display()
        ))
    } else if size < active.size {
        Some(format!(
            "it holds {size} bytes but the export serves {}; the disk must not shrink",
            active.size
        ))
    } else {
        None
    };
    if let Some(why) = wrong {
        s.execute("blockdev-del", json!({"node-name": format_node(to)}))
            .await?;
        return Err(Error::internal(format!(
            "the new overlay {} of volume {} cannot go on top of its active layer: {why}",
            overlay.display(),
            rec.volume_id
        )));
    }
    Ok(Prepared::Added {
        from: active.layer,
        to,
    })
}

/// Deletes the format nodes `layers` (their file nodes go with them).
async fn delete_layers(socket: &Path, layers: &[u32]) -> Result<()> {
    qmp::bounded(socket, "blockdev-del", qmp::QUERY_TIMEOUT, async {
        let mut s = Session::connect(socket).await?;
        for n in layers {
            s.execute("blockdev-del", json!({"node-name": format_node(*n)}))
                .await?;
        }
        Ok(())
    })
    .await
}

/// After adoption: deletes overlay nodes above the active layer (a switch the plugin's death
/// interrupted after `blockdev-add`), so their image locks cannot be read as a switch.
pub(super) async fn drop_unswitched(slot: &Slot, active: &Active) -> Result<()> {
    let socket = slot.qmp_path();
    let served = qmp::served(&socket).await?;
    let stale = served.above(active.layer);
    if stale.is_empty() {
        return Ok(());
    }
    tracing::warn!(slot = %slot.key, nodes = ?stale,
        "deleting overlay nodes of a live snapshot that was interrupted before its switch");
    let mut desc = stale;
    desc.reverse();
    delete_layers(&socket, &desc).await
}

/// Records the layer the daemon serves in the slot (a failure is logged: adoption reads the
/// daemon, and accepts a record behind it).
pub(super) async fn record_image(slot: &Slot, rec: &Record, active: &Active) {
    if rec.image == active.image {
        return;
    }
    let mut updated = rec.clone();
    updated.image = active.image.clone();
    let path = slot.record_path();
    let res = crate::exec::blocking(move || crate::fsutil::write_json(&path, &updated)).await;
    match res {
        Ok(()) => tracing::debug!(slot = %slot.key, image = %active.image.display(),
            "local attach record follows the daemon's active layer"),
        Err(e) => tracing::warn!(slot = %slot.key, error = %e,
            "cannot record the daemon's active layer; adoption reads it from the daemon"),
    }
}
