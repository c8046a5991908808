//! Image layers shared between volumes and snapshots.
//!
//! A volume's `image` is its active, writable layer; `chain.backing` lists the read-only layers
//! under it. Freezing a volume (for a snapshot or a clone) turns its active layer into a
//! read-only layer and lets the volume continue in a new qcow2 overlay on top of it: no data is
//! copied, so the cost does not depend on the volume's size.
//!
//! References are counted from the records alone: a layer file lives while a volume record
//! (image, backing, overlay being switched to), a snapshot record (layer, backing) or a
//! flattening job names it. Every new file is named by a record before it is created, and a
//! file is removed only once no record names it, so a crash at any step leaves nothing that
//! `recover_layers` cannot finish, undo or collect.
//!
//! Raw volumes cannot be frozen (a raw image has no backing file): snapshots and clones of
//! raw volumes are refused with INVALID_ARGUMENT, and restores/clones are always qcow2.

use super::qemu_img;
use super::record::{FlattenJob, Freezing, SnapshotRecord, VolumeRecord};
use super::{Pool, Pools};
use crate::attach::Attachments;
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::guard::OpGuards;
use crate::ids::ObjectId;
use crate::model::ImageFormat;
use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Notify;
use tonic::Code;

/// How many layers a volume's chain may reach before it is flattened (`[snapshots] max_chain_depth`).
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 8;

/// What snapshots, clones and the flattener need besides the pools: who holds a volume live,
/// the per-object guards shared with the RPCs, and the chain depth limit.
#[derive(Clone)]
pub(super) struct LayerContext {
    pub(super) attachments: Attachments,
    pub(super) guards: OpGuards,
    pub(super) max_chain_depth: usize,
    /// Wakes the background flattener when a chain grew past the limit.
    pub(super) wake: Arc<Notify>,
}

impl Default for LayerContext {
    fn default() -> Self {
        LayerContext {
            attachments: Attachments::default(),
            guards: OpGuards::default(),
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            wake: Arc::new(Notify::new()),
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
    pub(crate) layer: String,
    pub(crate) backing: Vec<String>,
    /// Live freezes only: whether the guest's file systems were quiesced.
    pub(crate) quiesced: Option<bool>,
}

/// Whether `name` is a layer file this plugin made: `<16 hex>[-<hex>].(qcow2|raw)`.
/// Anything else in `images/` is never touched by garbage collection.
pub(super) fn is_layer_file(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(".qcow2")
        .or_else(|| name.strip_suffix(".raw"))
    else {
        return false;
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let (key, stamp) = match stem.split_once('-') {
        Some((k, s)) => (k, Some(s)),
        None => (stem, None),
    };
    key.len() == 16 && hex(key) && stamp.is_none_or(|s| s.len() <= 32 && hex(s))
}

/// Reads every `*.json` record of a directory; any unreadable record is an error, so that
/// garbage collection never runs on a partial picture.
fn read_all<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if let Some(rec) = fsutil::read_json(&entry.path())? {
            out.push(rec);
        }
    }
    Ok(out)
}

/// fsync of a file's data (the frozen layer must be durable before a snapshot is ready).
pub(super) fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

pub(super) fn key_of_volume(id: &str) -> Result<String> {
    Ok(ObjectId::parse_volume(id)?
        .ok_or_else(|| Error::internal(format!("bad volume id {id}")))?
        .key)
}

impl Pool {
    pub(crate) fn snapshots_dir(&self) -> std::path::PathBuf {
        self.dir().join("snapshots")
    }

    pub(crate) fn flatten_dir(&self) -> std::path::PathBuf {
        self.dir().join("flatten")
    }

    /// Runs `f` while no garbage collection can run in this pool. Record writes that add a
    /// reference to a layer that exists already (a restore naming a snapshot's layer) go
    /// through here, so the layer cannot be collected between the check and the write.
    pub(super) fn with_layers_locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _held = self.layers_lock.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// A file name for a volume's first image: `<key>.<fmt>` unless a layer of an earlier
    /// volume of the same name still holds it (its snapshots outlive it).
    pub(super) fn fresh_image_name(&self, key: &str, format: ImageFormat) -> Result<String> {
        let plain = format!("{key}.{}", format.as_str());
        if !self.image_path(&plain).exists() {
            return Ok(plain);
        }
        self.new_layer_name(key, format)
    }

    /// A new, unused layer file name for volume `key`: `<key>-<hex time>.<fmt>`.
    pub(super) fn new_layer_name(&self, key: &str, format: ImageFormat) -> Result<String> {
        let mut stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        loop {
            let name = format!("{key}-{stamp:x}.{}", format.as_str());
            let path = self.image_path(&name);
            if !path.exists() && !self.image_path(&format!("{name}.part")).exists() {
                return Ok(name);
            }
            stamp += 1;
        }
    }

    /// Every layer file some record names. Fails when a record cannot be read.
    fn referenced_layers(&self) -> Result<HashSet<String>> {
        let mut live = HashSet::new();
        for rec in read_all::<VolumeRecord>(&self.volumes_dir())? {
            live.insert(rec.image);
            live.extend(rec.chain.backing);
            if let Some(f) = rec.chain.freezing {
                live.insert(f.overlay);
            }
        }
        for snap in read_all::<SnapshotRecord>(&self.snapshots_dir())? {
            live.insert(snap.layer);
            live.extend(snap.backing);
        }
        for job in read_all::<FlattenJob>(&self.flatten_dir())? {
            live.insert(job.image);
            live.insert(job.layer);
            live.extend(job.source);
        }
        Ok(live)
    }

    /// Removes the layer files no record names any more. Returns how many went.
    /// Blocking: call through `exec::blocking`.
    pub(crate) fn collect_garbage(&self) -> Result<usize> {
        self.with_layers_locked(|| {
            // Files first, records second: a file created after the listing is not
            // considered, and one created before it was named by a record written earlier.
            let dir = self.images_dir();
            let mut files = Vec::new();
            for entry in fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            {
                let entry =
                    entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_layer_file(&name) {
                    files.push(name);
                }
            }
            let live = self.referenced_layers()?;
            let mut removed = 0;
            for name in files.into_iter().filter(|f| !live.contains(f)) {
                tracing::info!(pool = %self.name(), layer = %name, "removing a layer nothing uses");
                fsutil::remove_durable(&self.image_path(&name))?;
                crate::failpoint!("gc.layer-removed");
                removed += 1;
            }
            Ok(removed)
        })
    }

    /// Pool open: finishes or undoes layer switches, snapshots and flattening that a crash
    /// interrupted, then collects unreferenced layers.
    pub(super) fn recover_layers(&self) -> Result<()> {
        for mut rec in self.all_volumes()? {
            let Some(f) = rec.chain.freezing.take() else {
                continue;
            };
            let overlay = self.image_path(&f.overlay);
            if f.handed_to_domain && overlay.exists() {
                // The domain may already write to the overlay: the volume continues there.
                tracing::warn!(pool = %self.name(), volume = %rec.id, overlay = %f.overlay,
                    "a live snapshot was interrupted; the volume continues in its new overlay");
                let old = std::mem::replace(&mut rec.image, f.overlay);
                rec.chain.backing.insert(0, old);
            } else {
                tracing::info!(pool = %self.name(), volume = %rec.id, overlay = %f.overlay,
                    "undoing an interrupted snapshot or clone");
                fsutil::remove_durable(&overlay)?;
            }
            self.write_volume(&rec)?;
        }
        self.recover_snapshots()?;
        self.recover_flatten_jobs()?;
        if let Err(e) = self.collect_garbage() {
            tracing::warn!(pool = %self.name(), error = %e,
                "not collecting unused layers: a record could not be read");
        }
        Ok(())
    }
}

impl Pools {
    /// Wires in the attach backends, the RPC guards and the chain depth limit.
    pub fn with_layers(
        mut self,
        attachments: Attachments,
        guards: OpGuards,
        max_chain_depth: usize,
    ) -> Self {
        self.layers.attachments = attachments;
        self.layers.guards = guards;
        self.layers.max_chain_depth = max_chain_depth.max(2);
        self
    }

    pub(super) fn pool_of(&self, name: &str) -> Result<Arc<Pool>> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::internal(format!("pool {name} is not configured")))
    }

    /// Tells the flattener to look at chains when `rec` grew past the limit.
    pub(super) fn note_depth(&self, rec: &VolumeRecord) {
        if rec.depth() > self.layers.max_chain_depth {
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
                "volume {} has an unfinished layer switch to {}; restart the controller to \
                 recover it",
                rec.id, f.overlay
            )));
        }
        Ok(())
    }

    /// Freezes the volume's active layer: the volume continues in a new overlay on it, and the
    /// old layer never changes again. Constant time: nothing is copied. Attached read-write,
    /// the node switches live. The caller holds the volume's guard.
    pub(super) async fn freeze(&self, rec: VolumeRecord) -> Result<(Frozen, VolumeRecord)> {
        self.check_freezable(&rec)?;
        let writer = self.live_writer(&rec.id).await?;
        let prepared = self.prepare_freeze(rec, writer.is_some()).await?;
        let quiesced = match &writer {
            None => None,
            Some(node) => {
                let live = self
                    .layers
                    .attachments
                    .snapshot_live(node, &prepared.rec.id, &prepared.overlay_path)
                    .await
                    .map_err(|e| unsupported_live(e, &prepared.rec.id, node));
                match live {
                    Ok(l) => Some(l.quiesced),
                    Err(e) => return Err(self.abandon_freeze(prepared, e).await),
                }
            }
        };
        let (frozen, rec) = self
            .commit_freezes(vec![(prepared, quiesced)])
            .await?
            .remove(0);
        Ok((frozen, rec))
    }

    /// Step 1 of a freeze: names a new overlay in the volume's record (a pending switch), then
    /// creates it, durably. `live`: a node writes the volume, and will be told to switch, so
    /// the record says the overlay is handed to it (after a crash the volume continues there).
    pub(super) async fn prepare_freeze(
        &self,
        rec: VolumeRecord,
        live: bool,
    ) -> Result<PreparedFreeze> {
        let pool = self.pool_of(&rec.pool)?;
        let key = key_of_volume(&rec.id)?;
        let p = pool.clone();
        let overlay = exec::blocking(move || p.new_layer_name(&key, ImageFormat::Qcow2)).await?;
        let mut rec = rec;
        rec.chain.freezing = Some(Freezing {
            overlay: overlay.clone(),
            handed_to_domain: false,
        });
        let (p, r) = (pool.clone(), rec.clone());
        exec::blocking(move || p.write_volume(&r)).await?;
        crate::failpoint!("freeze.intent");
        let overlay_path = pool.image_path(&overlay);
        let made = async {
            qemu_img::create(
                &overlay_path,
                ImageFormat::Qcow2,
                rec.capacity_bytes,
                Some((rec.image.as_str(), ImageFormat::Qcow2)),
            )
            .await?;
            let (p, o) = (pool.clone(), overlay_path.clone());
            exec::blocking(move || {
                sync_file(&o)?;
                fsutil::sync_dir(&p.images_dir())
            })
            .await?;
            crate::failpoint!("freeze.overlay-made");
            if live {
                if let Some(f) = rec.chain.freezing.as_mut() {
                    f.handed_to_domain = true;
                }
                let (p, r) = (pool.clone(), rec.clone());
                exec::blocking(move || p.write_volume(&r)).await?;
            }
            Ok(())
        }
        .await;
        let prepared = PreparedFreeze {
            pool,
            rec,
            overlay,
            overlay_path,
        };
        match made {
            Ok(()) => Ok(prepared),
            Err(e) => Err(self.abandon_freeze(prepared, e).await),
        }
    }

    /// After a failed switch: an unknown outcome (UNAVAILABLE, DEADLINE_EXCEEDED after the
    /// node was told) keeps the overlay and the pending switch, which pool recovery completes;
    /// otherwise the overlay goes and the record is as before. Returns the error to report.
    pub(super) async fn abandon_freeze(&self, p: PreparedFreeze, e: Error) -> Error {
        let unknown = matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded);
        let (id, handed) = (p.rec.id.clone(), p.handed());
        self.undo_freeze(p, unknown).await;
        if unknown && handed {
            return Error::Unavailable(format!(
                "could not confirm the live snapshot of volume {id} ({e}); the new layer is \
                 kept, and restarting the controller reconciles the volume"
            ));
        }
        e
    }

    /// Takes a prepared freeze back: the overlay goes and the record is as before, unless
    /// the node may already write to it (`outcome_unknown` and it was handed over): then the
    /// record keeps the pending switch, which pool recovery completes.
    pub(super) async fn undo_freeze(&self, p: PreparedFreeze, outcome_unknown: bool) {
        if outcome_unknown && p.handed() {
            tracing::error!(volume = %p.rec.id, overlay = %p.overlay,
                "live snapshot outcome unknown; keeping the new overlay");
            return;
        }
        let mut rec = p.rec;
        rec.chain.freezing = None;
        let (pool, r, path) = (p.pool, rec.clone(), p.overlay_path);
        let undo = exec::blocking(move || {
            fsutil::remove_durable(&path)?;
            pool.write_volume(&r)
        })
        .await;
        if let Err(u) = undo {
            tracing::error!(volume = %rec.id, error = %u,
                "could not undo a failed freeze; the next controller start will");
        }
    }

    /// Last step of freezes whose nodes (if any) write to their overlays now: each frozen
    /// layer made durable, then every volume's record switched to its overlay, all under one
    /// hold of each pool's layer lock. `quiesced`: live freezes only, whether the guest's file
    /// systems were frozen. Returns each volume's frozen layer and new record, in order.
    pub(super) async fn commit_freezes(
        &self,
        prepared: Vec<(PreparedFreeze, Option<bool>)>,
    ) -> Result<Vec<(Frozen, VolumeRecord)>> {
        let out = exec::blocking(move || {
            for (p, _) in &prepared {
                sync_file(&p.pool.image_path(&p.rec.image))?;
            }
            let mut out = Vec::with_capacity(prepared.len());
            let mut i = 0;
            while i < prepared.len() {
                // One hold of the lock for the run of volumes of one pool.
                let pool = prepared[i].0.pool.clone();
                let end = (i..prepared.len())
                    .find(|j| !Arc::ptr_eq(&prepared[*j].0.pool, &pool))
                    .unwrap_or(prepared.len());
                pool.with_layers_locked(|| {
                    for (p, quiesced) in &prepared[i..end] {
                        let mut switched = p.rec.clone();
                        switched.chain.freezing = None;
                        switched.chain.backing.insert(0, p.rec.image.clone());
                        switched.image = p.overlay.clone();
                        pool.write_volume(&switched)?;
                        let frozen = Frozen {
                            layer: p.rec.image.clone(),
                            backing: p.rec.chain.backing.clone(),
                            quiesced: *quiesced,
                        };
                        out.push((frozen, switched));
                    }
                    Ok(())
                })?;
                i = end;
            }
            Ok(out)
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

/// A volume whose next overlay is made and named in its record, waiting for its switch.
#[derive(Debug)]
pub(super) struct PreparedFreeze {
    pub(super) pool: Arc<Pool>,
    /// The record as written, with the pending switch.
    pub(super) rec: VolumeRecord,
    /// File name of the new overlay.
    pub(super) overlay: String,
    pub(super) overlay_path: std::path::PathBuf,
}

impl PreparedFreeze {
    /// A node was (or is about to be) told to switch to the overlay.
    fn handed(&self) -> bool {
        self.rec
            .chain
            .freezing
            .as_ref()
            .is_some_and(|f| f.handed_to_domain)
    }
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
