//! Snapshots: a frozen layer of the source volume, recorded in `snapshots/s<key>.json` of the
//! volume's pool. The key is new for every snapshot; the name is the idempotency key, found
//! through the index. A snapshot outlives its source volume; its layer outlives the snapshot
//! while restored volumes still read through it.

use super::record::{RecordState, SnapshotRecord, SCHEMA};
use super::store::{Kind, Slot};
use super::volumes::Named;
use super::{Pool, Pools};
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::{self, VolumeId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A CreateSnapshot request, validated by the caller.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    /// The CSI snapshot name.
    pub name: String,
    /// The volume to snapshot.
    pub source_volume_id: String,
    /// The CreateSnapshot parameters.
    pub parameters: BTreeMap<String, String>,
}

impl Pool {
    /// The record (any state) of the snapshot named `name` in this pool, or whether the name
    /// is free or cannot be told free (`record_named`).
    fn snapshot_named(&self, name: &str) -> Result<Named<SnapshotRecord>> {
        self.record_named(name, |r: &SnapshotRecord| &r.name)
    }

    /// A key no snapshot of this pool has.
    pub(super) fn new_snapshot_key(&self) -> Result<u64> {
        loop {
            let key = ids::random_u64();
            if self.store.index()?.snapshot(key).is_none() {
                return Ok(key);
            }
        }
    }
}

impl Pools {
    /// The pool and key a snapshot id names; `Ok(None)` when it cannot be a snapshot of ours.
    pub(super) fn locate_snapshot(&self, id: &str) -> Result<Option<(Arc<Pool>, u64)>> {
        self.locate(Kind::Snapshot, id)
    }

    /// CreateSnapshot. Idempotent by name: the same name and source give the same snapshot;
    /// the same name with another source is ALREADY_EXISTS. Holds the name's lock and the
    /// source volume's lock.
    pub async fn create_snapshot(&self, req: CreateSnapshot) -> Result<SnapshotRecord> {
        ids::check_name("snapshot name", &req.name)?;
        // Parsed once; an id that is not ours is NOT_FOUND below, after the name's lookup.
        let source = VolumeId::parse("source_volume_id", &req.source_volume_id)?;
        let hash = ids::name_hash(ids::SNAPSHOT, &req.name);
        let _name = self
            .lock_name(
                Slot::SnapshotName(hash),
                format!("the snapshot named {:?}", req.name),
            )
            .await?;
        if let Some(existing) = self.existing_snapshot(&req).await? {
            return Ok(existing);
        }
        let missing = || {
            Error::NotFound(format!(
                "source volume {} does not exist",
                req.source_volume_id
            ))
        };
        // Marked before the lock is tried: another snapshot or clone of the volume waits for
        // this one's cut rather than answering ABORTED (`Maintenance`).
        let _queued = source
            .as_ref()
            .map(|s| self.layers.maintenance.mark(s.to_string()));
        let lock = match &source {
            Some(source) => self.lock_volume_marked(source).await?,
            None => None,
        }
        .ok_or_else(missing)?;
        let vol = self.locked_source(&lock, missing).await?;
        let size = vol.capacity_bytes;
        let (frozen, _vol) = self.freeze(&lock, vol).await?;
        let pool = lock.pool.clone();
        let (secs, nanos) = super::record::epoch_parts(std::time::SystemTime::now());
        let p = pool.clone();
        let key = exec::blocking(move || p.new_snapshot_key()).await?;
        let rec = SnapshotRecord {
            schema: SCHEMA,
            id: pool.snapshot_id(key),
            name: req.name.clone(),
            pool: pool.name().to_string(),
            state: RecordState::Ready,
            source_volume_id: req.source_volume_id.clone(),
            layer: frozen.layer,
            backing: frozen.backing,
            size_bytes: size,
            parameters: req.parameters.clone(),
            created_at: secs,
            created_at_nanos: nanos,
            quiesced: frozen.quiesced,
            group_snapshot_id: None,
        };
        // The layer is in the volume's chain already, so it cannot be collected meanwhile.
        let (r, held) = (rec.clone(), lock.held.clone());
        exec::blocking(move || {
            let _held = held;
            pool.store
                .put(&r, |index| index.names_known(Kind::Snapshot, &r.name))
                .map(drop)
        })
        .await?;
        crate::failpoint!("snapshot.recorded");
        tracing::info!(snapshot = %rec.id, volume = %rec.source_volume_id, layer = %rec.layer,
            "snapshot created");
        Ok(rec)
    }

    /// The snapshot a repeated CreateSnapshot names, if it is Ready and of the same source;
    /// ALREADY_EXISTS for another source. A half-made record of an earlier version is removed.
    async fn existing_snapshot(&self, req: &CreateSnapshot) -> Result<Option<SnapshotRecord>> {
        let pools = self.all().to_vec();
        let name = req.name.clone();
        let found = exec::blocking(move || {
            let mut unknown = None;
            for pool in &pools {
                match pool.snapshot_named(&name)? {
                    Named::Found(rec) => return Ok(Some((pool.clone(), rec))),
                    // Not here, but an unreadable snapshot record may hold the name.
                    Named::Unknown(e) => unknown = unknown.or(Some(e)),
                    Named::Free => {}
                }
            }
            unknown.map_or(Ok(None), Err)
        })
        .await?;
        let Some((pool, existing)) = found else {
            return Ok(None);
        };
        if existing.source_volume_id != req.source_volume_id {
            return Err(Error::AlreadyExists(format!(
                "a snapshot named {:?} already exists ({}) of volume {}; use another name",
                req.name, existing.id, existing.source_volume_id
            )));
        }
        if existing.state == RecordState::Ready {
            return Ok(Some(existing));
        }
        let id = existing.id.clone();
        exec::blocking(move || {
            let key = super::store::Record::key(&existing)?;
            let _held = pool
                .store
                .lock(Slot::Snapshot(key), &|| format!("snapshot {id}"))?;
            pool.store
                .remove::<SnapshotRecord>(key, |_| Ok(()))
                .map(drop)
        })
        .await?;
        Ok(None)
    }

    /// A Ready snapshot by id (a member of a group only once its group is Ready); `Ok(None)`
    /// when it does not exist.
    pub(crate) async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let Some((pool, key)) = self.locate_snapshot(id)? else {
            return Ok(None);
        };
        let this = self.clone();
        exec::blocking(move || {
            let known = pool
                .store
                .index()?
                .find_snapshot(key)?
                .is_some_and(|s| s.state == RecordState::Ready);
            if !known {
                return Ok(None);
            }
            let rec = pool
                .store
                .read::<SnapshotRecord>(key)?
                .filter(|r| r.state == RecordState::Ready);
            match rec {
                Some(r) if this.member_visible(r.group_snapshot_id.as_deref())? => Ok(Some(r)),
                _ => Ok(None),
            }
        })
        .await
    }

    /// DeleteSnapshot: OK for unknown ids; ABORTED while another operation holds the
    /// snapshot; INVALID_ARGUMENT for a member of a group snapshot (the spec's "part of a
    /// group": it goes with its group). The record goes at once; the layer stays while a
    /// volume still reads through it and is removed with the last of them.
    pub(crate) async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let Some((pool, key)) = self.locate_snapshot(id)? else {
            return Ok(());
        };
        let id = id.to_string();
        let this = self.clone();
        exec::blocking(move || {
            let _held = pool
                .store
                .lock(Slot::Snapshot(key), &|| format!("snapshot {id}"))?;
            let group = match pool.store.index()?.find_snapshot(key)? {
                None => return Ok(()),
                Some(s) => s.group.clone(),
            };
            if let Some(g) = group {
                this.group_readable(&g)?;
                if this.group_state(&g)?.is_some() {
                    return Err(Error::invalid(format!(
                        "snapshot {id} is a member of group snapshot {g} and cannot be deleted \
                         alone; delete the group (DeleteVolumeGroupSnapshot)"
                    )));
                }
            }
            pool.store.remove::<SnapshotRecord>(key, |_| Ok(()))?;
            crate::failpoint!("snapshot.deleted");
            tracing::info!(snapshot = %id, "snapshot deleted");
            Ok(())
        })
        .await
    }
}
