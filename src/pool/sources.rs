//! CreateVolume with a content source. A restore is a new qcow2 overlay on the snapshot's
//! layer; a clone first freezes the source volume's active layer (exactly as a snapshot does,
//! but with no snapshot record: the layer lives as long as a chain reaches it), then overlays
//! it. Either way nothing is copied, and the new volume lives in the source's pool.

use super::record::{Chain, RecordState, SnapshotRecord, VolumeRecord, SCHEMA};
use super::volumes::{size_for, CreateVolume};
use super::Pools;
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::ObjectId;
use crate::model::{ContentSource, ImageFormat};
use crate::params::VolumeParams;

enum Base {
    Snapshot(SnapshotRecord),
    Volume(VolumeRecord),
}

impl Pools {
    /// Creates volume `key` from `source`. The caller holds the new volume's guard and, for a
    /// clone, the source volume's guard.
    pub(super) async fn create_from_source(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        key: &str,
        source: &ContentSource,
    ) -> Result<VolumeRecord> {
        let (base, pool_name, min_size) = match source {
            ContentSource::Snapshot(id) => {
                let snap = self.snapshot(id).await?.ok_or_else(|| {
                    Error::NotFound(format!("source snapshot {id} does not exist"))
                })?;
                let (pool, size) = (snap.pool.clone(), snap.size_bytes);
                (Base::Snapshot(snap), pool, size)
            }
            ContentSource::Volume(id) => {
                let vol = self
                    .volume(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
                if vol.format != ImageFormat::Qcow2 {
                    return Err(Error::invalid(format!(
                        "source volume {id} is raw and cannot be cloned; clones need a qcow2 \
                         source"
                    )));
                }
                let (pool, size) = (vol.pool.clone(), vol.capacity_bytes);
                (Base::Volume(vol), pool, size)
            }
        };
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
        let size = size_for(req.required_bytes.max(min_size), req.limit_bytes, min_size)?;
        let mut in_source_pool = params.clone();
        in_source_pool.pool = Some(pool_name);
        let pool = self.choose_pool(req, &in_source_pool, size).await?;
        for cap in &req.capabilities {
            cap.check(ImageFormat::Qcow2)?;
        }

        let (layer, below, snapshot_key) = match base {
            Base::Snapshot(s) => {
                let k = ObjectId::parse_snapshot(&s.id)?.map(|o| o.key);
                (s.layer, s.backing, k)
            }
            Base::Volume(v) => {
                let (frozen, _) = self.freeze(v).await?;
                (frozen.layer, frozen.backing, None)
            }
        };
        let (p, k) = (pool.clone(), key.to_string());
        let image = exec::blocking(move || p.fresh_image_name(&k, ImageFormat::Qcow2)).await?;
        let mut backing = vec![layer.clone()];
        backing.extend(below);
        let rec = VolumeRecord {
            schema: SCHEMA,
            id: pool.volume_id(key),
            name: req.name.clone(),
            pool: pool.name().to_string(),
            state: RecordState::Creating,
            format: ImageFormat::Qcow2,
            capacity_bytes: size,
            image,
            capabilities: req.capabilities.clone(),
            parameters: req.parameters.clone(),
            disk: params.disk.clone(),
            content_source: Some(source.clone()),
            accessible_topology: pool.topology().clone(),
            created_at: super::record::now_secs(),
            chain: Chain {
                backing,
                freezing: None,
            },
        };
        // Name the source layer in our record while the snapshot still holds it: from then on
        // deleting the snapshot keeps the layer for us.
        let (p, r) = (pool.clone(), rec.clone());
        exec::blocking(move || {
            p.with_layers_locked(|| {
                if let Some(skey) = &snapshot_key {
                    let still = p
                        .read_snapshot(skey)?
                        .is_some_and(|s| s.state == RecordState::Ready && s.layer == layer);
                    if !still {
                        return Err(Error::NotFound(
                            "the source snapshot was deleted while the volume was being created"
                                .into(),
                        ));
                    }
                }
                p.write_volume(&r)
            })
        })
        .await?;
        crate::failpoint!("restore.linked");
        let rec = self.materialize(&pool, rec).await?;
        self.note_depth(&rec);
        Ok(rec)
    }
}
