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
use super::store::Layer;
use super::volumes::VolumeLock;
use super::{Pool, Pools};
use crate::attach::Attachments;
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
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
}

impl Default for LayerContext {
    fn default() -> Self {
        LayerContext {
            attachments: Attachments::default(),
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
    pub layer: String,
    pub backing: Vec<String>,
    /// Live freezes only: whether the guest's file systems were quiesced.
    pub quiesced: Option<bool>,
}

/// fsync of a file's data (the frozen layer must be durable before a snapshot is ready).
pub(super) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
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

    /// Freezes the volume's active layer: the volume continues in a new overlay on it, and the
    /// old layer never changes again. Constant time: nothing is copied. Attached read-write,
    /// the node switches live.
    pub(super) async fn freeze(
        &self,
        lock: &VolumeLock,
        rec: VolumeRecord,
    ) -> Result<(Frozen, VolumeRecord)> {
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
        let writer = self.live_writer(&rec.id).await?;
        let (pool, key) = (lock.pool.clone(), lock.key);
        let overlay = exec::blocking(move || pool.new_layer_name(key, ImageFormat::Qcow2)).await?;
        let live = writer.is_some();
        let (frozen, rec) = match writer {
            None => self.freeze_offline(lock, rec, overlay).await?,
            Some(node) => self.freeze_live(lock, rec, overlay, &node).await?,
        };
        crate::failpoint!("freeze.switched");
        self.note_depth(&rec);
        tracing::info!(volume = %rec.id, frozen = %frozen.layer, active = %rec.image,
            depth = rec.depth(), live, "volume layer frozen");
        Ok((frozen, rec))
    }

    /// Not attached read-write: the overlay is made, then one commit switches the record.
    async fn freeze_offline(
        &self,
        lock: &VolumeLock,
        rec: VolumeRecord,
        overlay: String,
    ) -> Result<(Frozen, VolumeRecord)> {
        let (pool, held) = (lock.pool.clone(), lock.held.clone());
        exec::blocking(move || {
            let _held = held;
            let (overlay_path, file) = pool.make_overlay(&rec, &overlay)?;
            let switched = switched(&rec, &overlay);
            // The overlay, its directory entry, the frozen layer's data and the record's temp
            // file become durable at once; then one commit switches the volume.
            let (frozen, images) = (pool.image_path(&rec.image), pool.images_dir());
            let done = std::fs::File::open(&frozen)
                .map_err(|e| Error::io(format!("opening {}", frozen.display()), e))
                .and_then(|layer| Ok((layer, fsutil::open_dir(&images)?)))
                .and_then(|(layer, dir)| {
                    pool.store.put_with(
                        &switched,
                        &[(&file, &overlay_path), (&dir, &images), (&layer, &frozen)],
                        |_| Ok(()),
                    )
                });
            if let Err(e) = done {
                let _ = std::fs::remove_file(&overlay_path);
                return Err(e);
            }
            Ok((frozen_of(&rec, None), switched))
        })
        .await
    }

    /// Attached read-write to `node`: the overlay is made and named in the record (the node
    /// may write there from the switch on), the node switches, then the record does.
    async fn freeze_live(
        &self,
        lock: &VolumeLock,
        rec: VolumeRecord,
        overlay: String,
        node: &str,
    ) -> Result<(Frozen, VolumeRecord)> {
        let (pool, held) = (lock.pool.clone(), lock.held.clone());
        let mut intent = rec.clone();
        intent.chain.freezing = Some(Freezing {
            overlay: overlay.clone(),
            handed_to_domain: true,
        });
        let (p, h, i, o) = (pool.clone(), held.clone(), intent.clone(), overlay.clone());
        let overlay_path = exec::blocking(move || {
            let _held = h;
            let (path, file) = p.make_overlay(&i, &o)?;
            let images = p.images_dir();
            let named = fsutil::open_dir(&images).and_then(|dir| {
                p.store
                    .put_with(&i, &[(&file, &path), (&dir, &images)], |_| Ok(()))
            });
            if let Err(e) = named {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            crate::failpoint!("freeze.intent");
            Ok(path)
        })
        .await?;

        let live = self
            .layers
            .attachments
            .snapshot_live(node, lock.id(), &overlay_path)
            .await
            .map_err(|e| match e {
                Error::Unimplemented(why) => Error::FailedPrecondition(format!(
                    "volume {} is attached read-write to node {node} and {why}; unpublish \
                     it first, then snapshot or clone it",
                    rec.id
                )),
                other => other,
            });
        let live = match live {
            Ok(l) => l,
            Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                // Unknown outcome: the node may already write to the overlay, so it must not be
                // deleted. The record keeps the pending switch; recovery completes it.
                tracing::error!(volume = %rec.id, overlay = %overlay, error = %e,
                    "live snapshot outcome unknown; keeping the new overlay");
                return Err(Error::Unavailable(format!(
                    "could not confirm the live snapshot of volume {} ({e}); the new layer is \
                     kept, and the volume is reconciled when it is next used or the controller \
                     restarts",
                    rec.id
                )));
            }
            Err(e) => {
                // The node still writes the old layer: back to the record as it was (the
                // overlay goes with the commit that stops naming it).
                let (p, h, r) = (pool.clone(), held.clone(), rec.clone());
                let undo = exec::blocking(move || {
                    let _held = h;
                    p.store.put(&r, |_| Ok(())).map(drop)
                })
                .await;
                if let Err(u) = undo {
                    tracing::error!(volume = %rec.id, error = %u,
                        "could not undo a failed freeze; the next use of the volume will");
                }
                return Err(e);
            }
        };
        exec::blocking(move || {
            let _held = held;
            let switched = switched(&rec, &overlay);
            sync_file(&pool.image_path(&rec.image))?;
            pool.store.put(&switched, |_| Ok(()))?;
            Ok((frozen_of(&rec, Some(live.quiesced)), switched))
        })
        .await
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
