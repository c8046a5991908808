//! Image layers shared between volumes and snapshots.
//!
//! A volume's `image` is its active, writable layer; `chain.backing` lists the read-only layers
//! under it. Freezing a volume (for a snapshot or a clone) turns its active layer into a
//! read-only layer and lets the volume continue in a new qcow2 overlay on top of it: no data is
//! copied, so the cost does not depend on the volume's size.
//!
//! References are counted from the records, in the pool's index: a layer file lives while a
//! volume record (image, backing, overlay being switched to), a snapshot record (layer,
//! backing) or a flattening job names it, and goes with the commit that drops its last name.
//! Every new layer file is made under the lock of the volume it is named after, before the
//! commit that names it, so a crash leaves at most a file no record names, which the next
//! open of the pool collects while that volume's lock is free.
//!
//! Raw volumes cannot be frozen (a raw image has no backing file): snapshots and clones of
//! raw volumes are refused with INVALID_ARGUMENT, and restores/clones are always qcow2.

use super::qcow2;
use super::record::{Freezing, VolumeRecord};
use super::store::{Layer, Staged};
use super::volumes::VolumeLock;
use super::{Pool, Pools};
use crate::attach::Attachments;
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::ids::VolumeId;
use crate::model::ImageFormat;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Notify;
use tonic::Code;

/// How many layers a volume's chain may reach before it is flattened (`[snapshots] max_chain_depth`).
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 8;

/// What snapshots, clones and the flattener need besides the pools: who holds a volume live
/// and the chain depth limit.
#[derive(Clone)]
pub(super) struct LayerContext {
    pub(super) attachments: Attachments,
    pub(super) max_chain_depth: usize,
    /// Wakes the background flattener when a chain grew past the limit.
    pub(super) wake: Arc<Notify>,
    /// Volumes whose lock the background flattener of this process is taking or holding
    /// (see [`Maintenance`]).
    pub(super) maintenance: Maintenance,
}

impl Default for LayerContext {
    fn default() -> Self {
        LayerContext {
            attachments: Attachments::default(),
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            wake: Arc::new(Notify::new()),
            maintenance: Maintenance::default(),
        }
    }
}

/// The volumes (by id) whose lock this process is taking or holding for a brief step: the
/// flattener's steps, and a snapshot or clone cutting its source (a header and a record, a few
/// ms). A request that finds such a volume's lock busy waits for the step to end (at most
/// [`Maintenance::WAIT`]) instead of answering ABORTED: the CO has no operation pending on it
/// that would explain an ABORTED, Nomad treats ABORTED from ControllerPublishVolume or
/// CreateSnapshot as final (the claim, or the snapshot, fails), and snapshots or clones of one
/// volume asked for together (several PVCs cloned from one) then follow one another.
#[derive(Clone, Default)]
pub(super) struct Maintenance {
    marks: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// A volume marked as under background maintenance until dropped.
pub(super) struct MaintenanceMark {
    marks: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    volume_id: String,
}

impl Maintenance {
    /// Longest a request waits for a background step on its volume to end; the steps hold the
    /// volume's lock for a record read and write and a look at the attachments.
    pub(super) const WAIT: std::time::Duration = std::time::Duration::from_secs(15);

    /// Marks `volume_id` (before its lock is tried, so that no request sees the lock busy
    /// without the mark) until the mark is dropped.
    pub(super) fn mark(&self, volume_id: String) -> MaintenanceMark {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        *marks.entry(volume_id.clone()).or_default() += 1;
        MaintenanceMark {
            marks: self.marks.clone(),
            volume_id,
        }
    }

    /// How many brief steps of this process are taking or holding the volume's lock (a
    /// caller that marked the volume itself counts once).
    pub(super) fn marks(&self, volume_id: &str) -> usize {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.get(volume_id).copied().unwrap_or(0)
    }
}

impl Drop for MaintenanceMark {
    fn drop(&mut self) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = marks.get_mut(&self.volume_id) {
            *n -= 1;
            if *n == 0 {
                marks.remove(&self.volume_id);
            }
        }
    }
}

impl std::fmt::Debug for LayerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerContext")
            .field("max_chain_depth", &self.max_chain_depth)
            .finish_non_exhaustive()
    }
}

/// A volume's former active layer, now read-only, and the chain under it.
#[derive(Debug, Clone)]
pub(super) struct Frozen {
    pub layer: String,
    pub backing: Vec<String>,
    /// Live freezes only: whether the guest's file systems were quiesced.
    pub quiesced: Option<bool>,
}

/// fsync of a file's data (the frozen layer must be durable before a snapshot is ready).
pub(super) fn sync_file(path: &Path) -> Result<()> {
    super::qcow2::open_regular(path, false)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

impl Pool {
    /// A new, unused layer file name for volume `key`: `<key>-<hex time>.<fmt>`.
    pub(super) fn new_layer_name(&self, key: u64, format: ImageFormat) -> Result<String> {
        let mut stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        loop {
            let layer = Layer::Std {
                key,
                stamp: NonZeroU64::new(stamp),
                raw: format == ImageFormat::Raw,
            };
            let name = layer.to_string();
            if !self.image_path(&name).exists() && !self.store.index()?.is_referenced(&layer) {
                return Ok(name);
            }
            stamp = stamp.wrapping_add(1).max(1);
        }
    }
}

impl Pools {
    /// Wires in the attach backends and the chain depth limit.
    pub fn with_layers(mut self, attachments: Attachments, max_chain_depth: usize) -> Self {
        self.layers.attachments = attachments;
        self.layers.max_chain_depth = max_chain_depth.max(2);
        self
    }

    /// Tells the flattener to look at chains when `rec` grew past the limit.
    pub(super) fn note_depth(&self, rec: &VolumeRecord) {
        if rec.depth() > self.layers.max_chain_depth {
            self.layers.wake.notify_one();
        }
    }

    /// Tells the flattener to look at `id` now when its chain is past the limit: a volume is
    /// flattened only while it is not attached, so an unpublish may be what it waited for.
    /// Reads the index only (which may first catch up with other processes' commits: on the
    /// blocking door).
    pub(crate) async fn note_unpublished(&self, id: &VolumeId) {
        let Some((pool, key)) = self.locate_volume(id) else {
            return;
        };
        let max = self.layers.max_chain_depth;
        let deep = exec::blocking(move || {
            Ok(pool
                .store
                .index()?
                .volume(key)
                .is_some_and(|v| v.depth() > max))
        })
        .await;
        if deep.unwrap_or(false) {
            self.layers.wake.notify_one();
        }
    }

    /// The node that may be writing the volume now (attached read-write), if any.
    async fn live_writer(&self, volume_id: &str) -> Result<Option<String>> {
        let mut writers = self.layers.attachments.writers_of(volume_id).await?;
        if writers.len() > 1 {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is attached read-write to several nodes ({}); a consistent \
                 snapshot needs at most one writer: unpublish it first",
                writers.join(", ")
            )));
        }
        Ok(writers.pop())
    }

    /// Whether the volume's active layer can be frozen now (qcow2, chain not too deep, no
    /// switch pending).
    pub(super) fn check_freezable(&self, rec: &VolumeRecord) -> Result<()> {
        if rec.format != ImageFormat::Qcow2 {
            return Err(Error::invalid(format!(
                "volume {} is raw: snapshots and clones need qcow2 volumes (a raw image cannot \
                 carry the overlay a snapshot needs); create the volume with format=qcow2",
                rec.id
            )));
        }
        let max = self.layers.max_chain_depth;
        if rec.depth() >= 2 * max {
            return Err(Error::Unavailable(format!(
                "the backing chain of volume {} is {} layers deep (limit {max}) and waits for \
                 background flattening, which runs while it is not attached; retry later",
                rec.id,
                rec.depth()
            )));
        }
        if let Some(f) = &rec.chain.freezing {
            return Err(Error::internal(format!(
                "volume {} has an unfinished layer switch to {}",
                rec.id, f.overlay
            )));
        }
        Ok(())
    }

    /// Freezes the volume's active layer: the volume continues in a new overlay on it, and the
    /// old layer never changes again. Constant time: nothing is copied. Attached read-write,
    /// the node switches live.
    pub(super) async fn freeze(
        &self,
        lock: &VolumeLock,
        rec: VolumeRecord,
    ) -> Result<(Frozen, VolumeRecord)> {
        self.check_freezable(&rec)?;
        let writer = self.live_writer(&rec.id).await?;
        let prepared = self.prepare_freeze(lock, rec, writer.is_some()).await?;
        let quiesced = match &writer {
            None => None,
            Some(node) => {
                let live = self
                    .layers
                    .attachments
                    .snapshot_live(node, prepared.lock.id(), &prepared.overlay_path)
                    .await
                    .map_err(|e| unsupported_live(e, &prepared.rec.id, node));
                match live {
                    Ok(l) => Some(l.quiesced),
                    Err(e) => return Err(self.abandon_freeze(prepared, e).await),
                }
            }
        };
        let mut done = self.commit_freezes(vec![(prepared, quiesced)]).await?;
        Ok(done.remove(0))
    }

    /// Step 1 of a freeze: writes the new overlay (on the volume's active layer). `live`: a
    /// node writes the volume and will be told to switch, so one commit names the overlay in
    /// the record first (the node may write there from the switch on); offline, nothing is
    /// recorded yet (a crash leaves an unnamed file, collected at the next open).
    pub(super) async fn prepare_freeze(
        &self,
        lock: &VolumeLock,
        rec: VolumeRecord,
        live: bool,
    ) -> Result<PreparedFreeze> {
        let (pool, key) = (lock.pool.clone(), lock.key);
        let overlay = exec::blocking(move || pool.new_layer_name(key, ImageFormat::Qcow2)).await?;
        let (pool, held) = (lock.pool.clone(), lock.held.clone());
        let mut intent = rec.clone();
        if live {
            intent.chain.freezing = Some(Freezing {
                overlay: overlay.clone(),
                handed_to_domain: true,
            });
        }
        let (o, i) = (overlay.clone(), intent.clone());
        let (path, file) = exec::blocking(move || {
            let _held = held;
            let (path, file) = pool.make_overlay(&i, &o)?;
            if live {
                let images = pool.images_dir();
                let named = fsutil::open_dir(&images).and_then(|dir| {
                    pool.store
                        .put_with(&i, &[(&file, &path), (&dir, &images)], |_| Ok(()))
                });
                if let Err(e) = named {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                crate::failpoint!("freeze.intent");
            }
            Ok((path, file))
        })
        .await?;
        Ok(PreparedFreeze {
            lock: lock.clone(),
            rec: intent,
            overlay,
            overlay_path: path,
            file,
            live,
        })
    }

    /// After a failed switch: an unknown outcome (UNAVAILABLE, DEADLINE_EXCEEDED after the
    /// node was told) keeps the overlay and the pending switch, which recovery completes;
    /// otherwise the record is as before. Returns the error to report.
    pub(super) async fn abandon_freeze(&self, p: PreparedFreeze, e: Error) -> Error {
        let unknown = matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded);
        let (id, live) = (p.rec.id.clone(), p.live);
        self.undo_freeze(p, unknown).await;
        if unknown && live {
            return Error::Unavailable(format!(
                "could not confirm the live snapshot of volume {id} ({e}); the new layer is \
                 kept, and the volume is reconciled when it is next used or the controller \
                 restarts"
            ));
        }
        e
    }

    /// Takes a prepared freeze back: the volume's record as before (the overlay goes with the
    /// commit that stops naming it, or, never named, at once), unless a node may already
    /// write to it (`outcome_unknown` of a live switch): then the record keeps the pending
    /// switch, which recovery completes.
    pub(super) async fn undo_freeze(&self, p: PreparedFreeze, outcome_unknown: bool) {
        if outcome_unknown && p.live {
            tracing::error!(volume = %p.rec.id, overlay = %p.overlay,
                "live snapshot outcome unknown; keeping the new overlay");
            return;
        }
        let (pool, held) = (p.lock.pool.clone(), p.lock.held.clone());
        let (id, live, path) = (p.rec.id.clone(), p.live, p.overlay_path);
        let mut rec = p.rec;
        rec.chain.freezing = None;
        let undo = exec::blocking(move || {
            let _held = held;
            if live {
                pool.store.put(&rec, |_| Ok(())).map(drop)
            } else {
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("removing {}", path.display()), e))
            }
        })
        .await;
        if let Err(u) = undo {
            tracing::error!(volume = %id, error = %u,
                "could not undo a failed freeze; the next use of the volume will");
        }
    }

    /// Last step of freezes whose nodes (if any) write to their overlays now: the frozen
    /// layers (and offline overlays) made durable, then each pool's volume records switched
    /// in ONE batch under one hold of its pool lock. `quiesced`: live freezes only, whether
    /// the guest's file systems were frozen. Each volume's frozen layer and new record, in
    /// order.
    pub(super) async fn commit_freezes(
        &self,
        prepared: Vec<(PreparedFreeze, Option<bool>)>,
    ) -> Result<Vec<(Frozen, VolumeRecord)>> {
        let out = exec::blocking(move || {
            let mut out: Vec<Option<(Frozen, VolumeRecord)>> = std::iter::repeat_with(|| None)
                .take(prepared.len())
                .collect();
            // By pool, in order of first appearance.
            let mut pools: Vec<Arc<Pool>> = Vec::new();
            for (p, _) in &prepared {
                if !pools.iter().any(|q| Arc::ptr_eq(q, &p.lock.pool)) {
                    pools.push(p.lock.pool.clone());
                }
            }
            for pool in pools {
                let mine: Vec<usize> = (0..prepared.len())
                    .filter(|i| Arc::ptr_eq(&prepared[*i].0.lock.pool, &pool))
                    .collect();
                let switched: Vec<VolumeRecord> = mine
                    .iter()
                    .map(|i| switched(&prepared[*i].0.rec, &prepared[*i].0.overlay))
                    .collect();
                let mut opened = Vec::new();
                for i in &mine {
                    let p = &prepared[*i].0;
                    let frozen = pool.image_path(&p.rec.image);
                    let layer = super::qcow2::open_regular(&frozen, false)
                        .map_err(|e| Error::io(format!("opening {}", frozen.display()), e))?;
                    opened.push((layer, frozen));
                }
                let images = pool.images_dir();
                let dir = fsutil::open_dir(&images)?;
                // The frozen layers' data, and the offline overlays with their directory
                // entries, durable at once with the records' temp files.
                let mut alongside: Vec<(&std::fs::File, &std::path::Path)> =
                    opened.iter().map(|(f, p)| (f, p.as_path())).collect();
                for i in &mine {
                    let p = &prepared[*i].0;
                    if !p.live {
                        alongside.push((&p.file, p.overlay_path.as_path()));
                    }
                }
                alongside.push((&dir, images.as_path()));
                let staged = switched
                    .iter()
                    .map(Staged::of)
                    .collect::<Result<Vec<_>>>()?;
                pool.store.put_batch(staged, &alongside, |_| Ok(()))?;
                for (i, rec) in mine.iter().zip(switched) {
                    let (p, quiesced) = &prepared[*i];
                    out[*i] = Some((frozen_of(&p.rec, *quiesced), rec));
                }
            }
            Ok(out.into_iter().flatten().collect::<Vec<_>>())
        })
        .await?;
        crate::failpoint!("freeze.switched");
        for (frozen, rec) in &out {
            self.note_depth(rec);
            tracing::info!(volume = %rec.id, frozen = %frozen.layer, active = %rec.image,
                depth = rec.depth(), live = frozen.quiesced.is_some(), "volume layer frozen");
        }
        Ok(out)
    }
}

/// A volume whose next overlay is written (and, live, named in its record), waiting for its
/// switch. Holds the volume's lock.
pub(super) struct PreparedFreeze {
    pub(super) lock: VolumeLock,
    /// The record as it stands (live: with the pending switch).
    pub(super) rec: VolumeRecord,
    /// File name of the new overlay.
    pub(super) overlay: String,
    pub(super) overlay_path: std::path::PathBuf,
    /// The overlay, open: offline freezes make it durable with the commit that names it.
    file: std::fs::File,
    /// A node writes the volume and is told to switch.
    pub(super) live: bool,
}

/// A live snapshot the volume's attach backend cannot take: FAILED_PRECONDITION, saying what
/// to do.
pub(super) fn unsupported_live(e: Error, volume_id: &str, node: &str) -> Error {
    match e {
        Error::Unimplemented(why) => Error::FailedPrecondition(format!(
            "volume {volume_id} is attached read-write to node {node} and {why}; unpublish it \
             first, then snapshot or clone it"
        )),
        other => other,
    }
}

/// The record of a volume continuing in `overlay`, its old active layer first in the chain.
fn switched(rec: &VolumeRecord, overlay: &str) -> VolumeRecord {
    let mut out = rec.clone();
    out.chain.freezing = None;
    out.chain.backing.insert(0, rec.image.clone());
    out.image = overlay.to_string();
    out
}

fn frozen_of(rec: &VolumeRecord, quiesced: Option<bool>) -> Frozen {
    Frozen {
        layer: rec.image.clone(),
        backing: rec.chain.backing.clone(),
        quiesced,
    }
}

impl Pool {
    /// Writes `overlay`, a qcow2 overlay on the volume's active layer (not yet durable: the
    /// commit that names it makes it so). Blocking; the caller holds the volume's lock.
    fn make_overlay(
        &self,
        rec: &VolumeRecord,
        overlay: &str,
    ) -> Result<(std::path::PathBuf, std::fs::File)> {
        let path = self.image_path(overlay);
        let file = qcow2::create(
            &path,
            ImageFormat::Qcow2,
            rec.capacity_bytes,
            Some(rec.image.as_str()),
        )?;
        crate::failpoint!("freeze.overlay-made");
        Ok((path, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_before_snapshots_still_read() {
        let old = serde_json::json!({
            "schema": 1, "id": "default.0123456789abcdef", "name": "v", "pool": "default",
            "state": "ready", "format": "qcow2", "capacity_bytes": 1048576,
            "image": "0123456789abcdef.qcow2", "capabilities": [], "parameters": {},
            "disk": crate::params::DiskOptions::default(), "created_at": 1
        });
        let rec: VolumeRecord = serde_json::from_value(old).unwrap();
        assert_eq!(rec.depth(), 1);
        assert!(rec.chain.is_empty());
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            !json.contains("chain"),
            "an empty chain is not written: {json}"
        );
    }

    #[test]
    fn layer_file_names() {
        let is_layer_file = |n: &str| Layer::parse(n).volume_key().is_some();
        assert!(is_layer_file("0123456789abcdef.qcow2"));
        assert!(is_layer_file("0123456789abcdef.raw"));
        assert!(is_layer_file("0123456789abcdef-17f3a2b4c5d6e7f8.qcow2"));
        for not in [
            "0123456789abcdef.qcow2.part",
            ".tmp-x",
            "0123456789abcdef-.qcow2",
            "0123456789ABCDEF.qcow2",
            "s123456789abcdef0.qcow2",
            "notes.txt",
            "0123456789abcde.qcow2",
            "0123456789abcdef-xyz.qcow2",
        ] {
            assert!(!is_layer_file(not), "{not}");
        }
    }
}
