//! CreateVolume with a content source. A restore is a new qcow2 overlay on the snapshot's
//! layer; a clone first freezes the source volume's active layer (exactly as a snapshot does,
//! but with no snapshot record: the layer lives as long as a chain reaches it), then overlays
//! it. Either way nothing is copied, and the new volume lives in the source's pool.

use super::layers::MaintenanceMark;
use super::record::{Chain, RecordState, SnapshotRecord, VolumeRecord};
use super::store::{Index, Layer};
use super::volumes::{new_record, size_for, CreateVolume, VolumeLock};
use super::{Pool, Pools};
use crate::error::{Error, Result};
use crate::exec;
use crate::model::{ContentSource, ImageFormat};
use crate::params::VolumeParams;
use std::sync::Arc;

/// What the new volume is made from.
enum Base {
    Snapshot(SnapshotRecord),
    /// A clone's source, locked for the whole clone, and marked as briefly held so that
    /// other snapshots and clones of it wait (`Maintenance`; dropped after the lock).
    Volume {
        vol: Box<VolumeRecord>,
        lock: VolumeLock,
        _queued: MaintenanceMark,
    },
}

impl Base {
    fn pool(&self) -> &str {
        match self {
            Base::Snapshot(s) => &s.pool,
            Base::Volume { vol, .. } => &vol.pool,
        }
    }

    /// The smallest size the new volume may have.
    fn size(&self) -> u64 {
        match self {
            Base::Snapshot(s) => s.size_bytes,
            Base::Volume { vol, .. } => vol.capacity_bytes,
        }
    }
}

/// A precondition checked under the pool lock when the new record is committed.
type Check = Box<dyn FnOnce(&Index) -> Result<()> + Send>;

/// The read-only layer the new volume is an overlay on, the chain under it, and what must
/// still hold when the new record is committed.
struct Source {
    layer: String,
    below: Vec<String>,
    check: Check,
    /// A clone's source lock, held until the new volume is committed, and its mark as briefly
    /// held (`Maintenance`), dropped after it.
    _lock: Option<(VolumeLock, MaintenanceMark)>,
}

impl Pools {
    /// Creates a volume from `source`. The caller holds the new volume's name lock.
    pub(super) async fn create_from_source(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        source: &ContentSource,
    ) -> Result<VolumeRecord> {
        let base = self.resolve_source(source).await?;
        let (pool, size) = self.place(req, params, &base).await?;
        let Source {
            layer,
            below,
            check: source_check,
            _lock: source_lock,
        } = self.source_layer(base).await?;
        let p = pool.clone();
        let (key, lock, image) = exec::blocking(move || {
            let (key, lock) = p.new_volume_key()?;
            Ok((key, lock, p.first_image_name(key, ImageFormat::Qcow2)?))
        })
        .await?;
        let mut backing = vec![layer];
        backing.extend(below);
        let rec = new_record(
            &pool,
            key,
            req,
            params,
            (ImageFormat::Qcow2, size, image),
            Chain {
                backing,
                freezing: None,
            },
        );
        let name_free = pool.name_free_check(&req.name);
        let rec = self
            .materialize(&pool, lock, rec, move |index| {
                source_check(index)?;
                name_free(index)
            })
            .await?;
        drop(source_lock);
        self.note_depth(&rec);
        Ok(rec)
    }

    /// Step 1: the snapshot to restore, or the volume to clone (locked).
    async fn resolve_source(&self, source: &ContentSource) -> Result<Base> {
        match source {
            ContentSource::Snapshot(id) => {
                let snap = self.snapshot(id).await?.ok_or_else(|| {
                    Error::NotFound(format!("source snapshot {id} does not exist"))
                })?;
                // Its layers must be whole before a volume is built on them.
                let pool = self.get(&snap.pool).cloned().ok_or_else(|| {
                    Error::internal(format!("pool {} is not configured", snap.pool))
                })?;
                let layers: Vec<String> = std::iter::once(snap.layer.clone())
                    .chain(snap.backing.iter().cloned())
                    .collect();
                let owner = format!("snapshot {id}");
                exec::blocking(move || {
                    pool.check_layers(layers.iter(), ImageFormat::Qcow2, &owner)
                })
                .await?;
                Ok(Base::Snapshot(snap))
            }
            ContentSource::Volume(id) => {
                let missing = || Error::NotFound(format!("source volume {id} does not exist"));
                let vid = Self::own_volume_id("source volume_id", id, missing)?;
                let queued = self.layers.maintenance.mark(vid.to_string());
                let lock = self.lock_volume_marked(&vid).await?.ok_or_else(missing)?;
                let vol = self.locked_source(&lock, missing).await?;
                if vol.format != ImageFormat::Qcow2 {
                    return Err(Error::invalid(format!(
                        "source volume {id} is raw and cannot be cloned; clones need a qcow2 \
                         source"
                    )));
                }
                Ok(Base::Volume {
                    vol: Box::new(vol),
                    lock,
                    _queued: queued,
                })
            }
        }
    }

    /// Step 2: the pool (the source's) and the size of the new volume, checked against the
    /// request.
    async fn place(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        base: &Base,
    ) -> Result<(Arc<Pool>, u64)> {
        let (pool_name, min_size) = (base.pool().to_string(), base.size());
        if params.format == Some(ImageFormat::Raw) {
            return Err(Error::invalid(
                "a volume made from a snapshot or another volume is a qcow2 overlay on it; \
                 remove format=raw",
            ));
        }
        if let Some(p) = &params.pool {
            if *p != pool_name {
                return Err(Error::invalid(format!(
                    "a volume made from this source lives in the source's pool {pool_name}, not \
                     {p}; remove the pool parameter or name {pool_name}"
                )));
            }
        }
        if req.limit_bytes > 0 && req.limit_bytes < min_size {
            return Err(Error::OutOfRange(format!(
                "the source holds {min_size} bytes but limit_bytes is {}; a volume made from it \
                 must be at least as large",
                req.limit_bytes
            )));
        }
        let fs_min = super::volumes::fs_minimum(req)?;
        let required = req.required_bytes.max(min_size).max(fs_min);
        let size = size_for(required, req.limit_bytes, min_size.max(fs_min))?;
        let mut in_source_pool = params.clone();
        in_source_pool.pool = Some(pool_name);
        let pool = self.choose_pool(req, &in_source_pool, size).await?;
        for cap in &req.capabilities {
            cap.check(ImageFormat::Qcow2)?;
        }
        Ok((pool, size))
    }

    /// Step 3: the layer to overlay. A restore uses the snapshot's layer, which must still be
    /// the snapshot's when the new record is committed (a DeleteSnapshot may run meanwhile);
    /// a clone freezes its source first.
    async fn source_layer(&self, base: Base) -> Result<Source> {
        match base {
            Base::Snapshot(s) => {
                let key = super::store::Record::key(&s)?;
                let layer = Layer::parse(&s.layer);
                Ok(Source {
                    layer: s.layer,
                    below: s.backing,
                    check: Box::new(move |index: &Index| {
                        let still = index
                            .snapshot(key)
                            .is_some_and(|e| e.state == RecordState::Ready && e.layer == layer);
                        if still {
                            Ok(())
                        } else {
                            Err(Error::NotFound(
                                "the source snapshot was deleted while the volume was being \
                                 created"
                                    .into(),
                            ))
                        }
                    }),
                    _lock: None,
                })
            }
            Base::Volume {
                vol: v,
                lock,
                _queued,
            } => {
                // One value from here on: on every path the lock goes before its mark.
                let held = (lock, _queued);
                let (frozen, _) = self.freeze(&held.0, *v).await?;
                let layer = Layer::parse(&frozen.layer);
                Ok(Source {
                    layer: frozen.layer,
                    below: frozen.backing,
                    check: Box::new(move |index: &Index| {
                        if index.is_referenced(&layer) {
                            Ok(())
                        } else {
                            Err(Error::internal(
                                "the frozen layer of the clone's source vanished",
                            ))
                        }
                    }),
                    _lock: Some(held),
                })
            }
        }
    }
}
