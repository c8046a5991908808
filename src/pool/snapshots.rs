//! Snapshots: a frozen layer of the source volume, recorded in `snapshots/<key>.json` of the
//! volume's pool. The key derives from the snapshot name, so a repeated CreateSnapshot finds
//! its snapshot without an index. A snapshot outlives its source volume; its layer outlives
//! the snapshot while restored volumes still read through it.

use super::layers::key_of_volume;
use super::record::{RecordState, SnapshotRecord, SCHEMA};
use super::{Pool, Pools};
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::ids::{self, ObjectId};
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    fn snapshot_path(&self, key: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{key}.json"))
    }

    pub(crate) fn read_snapshot(&self, key: &str) -> Result<Option<SnapshotRecord>> {
        fsutil::read_json(&self.snapshot_path(key))
    }

    /// Writes a snapshot record atomically (temp, fsync, rename, fsync dir). Blocking.
    pub fn write_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        let key = ObjectId::parse_snapshot(&rec.id)?
            .ok_or_else(|| Error::internal(format!("bad snapshot id {}", rec.id)))?
            .key;
        fsutil::write_json(&self.snapshot_path(&key), rec)
    }

    pub(crate) fn remove_snapshot_record(&self, key: &str) -> Result<()> {
        fsutil::remove_durable(&self.snapshot_path(key))
    }

    /// Every snapshot record of the pool, any state, sorted by id (unreadable ones skipped).
    pub(crate) fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut out: Vec<SnapshotRecord> = self.read_records(&self.snapshots_dir(), "snapshot")?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Every `<key>.json` record in `dir` (temp files skipped; unreadable ones skipped and
    /// logged as `what` records): for listings, never for garbage collection.
    pub(crate) fn read_records<T: serde::de::DeserializeOwned>(
        &self,
        dir: &std::path::Path,
        what: &str,
    ) -> Result<Vec<T>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            match fsutil::read_json(&entry.path()) {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(pool = %self.name(), key, error = %e, "skipping an unreadable {what} record")
                }
            }
        }
        Ok(out)
    }

    /// Snapshot records are written Ready in one step; anything else is a leftover.
    pub(super) fn recover_snapshots(&self) -> Result<()> {
        for rec in self.all_snapshots()? {
            if rec.state != RecordState::Ready {
                tracing::info!(pool = %self.name(), snapshot = %rec.id, "removing a half-made snapshot record");
                let key = ObjectId::parse_snapshot(&rec.id)?
                    .ok_or_else(|| Error::internal(format!("bad snapshot id {}", rec.id)))?
                    .key;
                self.remove_snapshot_record(&key)?;
            }
        }
        Ok(())
    }
}

impl Pools {
    /// CreateSnapshot. Idempotent by name: the same name and source give the same snapshot;
    /// the same name with another source is ALREADY_EXISTS. The caller holds the snapshot's
    /// and the source volume's guards.
    pub async fn create_snapshot(&self, req: CreateSnapshot) -> Result<SnapshotRecord> {
        ids::check_name("snapshot name", &req.name)?;
        ids::check_safe_id("source_volume_id", &req.source_volume_id)?;
        let key = ids::snapshot_key_for_name(&req.name);
        for pool in self.all() {
            let (p, k) = (pool.clone(), key.clone());
            let Some(existing) = exec::blocking(move || p.read_snapshot(&k)).await? else {
                continue;
            };
            if existing.name != req.name {
                return Err(Error::AlreadyExists(format!(
                    "snapshot id {} is taken by the snapshot named {:?}; choose another name",
                    existing.id, existing.name
                )));
            }
            if existing.source_volume_id != req.source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "a snapshot named {:?} already exists ({}) of volume {}; use another name",
                    req.name, existing.id, existing.source_volume_id
                )));
            }
            if existing.state == RecordState::Ready {
                return Ok(existing);
            }
        }

        let vol = self.volume(&req.source_volume_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "source volume {} does not exist",
                req.source_volume_id
            ))
        })?;
        let pool = self.pool_of(&vol.pool)?;
        let size = vol.capacity_bytes;
        let (frozen, _vol) = self.freeze(vol).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let rec = SnapshotRecord {
            schema: SCHEMA,
            id: ObjectId::new(pool.name(), &key).to_string(),
            name: req.name.clone(),
            pool: pool.name().to_string(),
            state: RecordState::Ready,
            source_volume_id: req.source_volume_id.clone(),
            layer: frozen.layer,
            backing: frozen.backing,
            size_bytes: size,
            parameters: req.parameters.clone(),
            created_at: now.as_secs(),
            created_at_nanos: now.subsec_nanos(),
            quiesced: frozen.quiesced,
            group_snapshot_id: None,
        };
        // The layer is in the volume's chain already, so it cannot be collected meanwhile.
        let (p, r) = (pool.clone(), rec.clone());
        exec::blocking(move || p.write_snapshot(&r)).await?;
        crate::failpoint!("snapshot.recorded");
        tracing::info!(snapshot = %rec.id, volume = %rec.source_volume_id, layer = %rec.layer,
            "snapshot created");
        Ok(rec)
    }

    /// A Ready snapshot by id; `Ok(None)` when it does not exist.
    pub(crate) async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let Some(oid) = ObjectId::parse_snapshot(id)? else {
            return Ok(None);
        };
        let Some(pool) = self.get(&oid.pool).cloned() else {
            return Ok(None);
        };
        let this = self.clone();
        exec::blocking(move || {
            let rec = pool.read_snapshot(&oid.key)?;
            match rec.filter(|r| r.state == RecordState::Ready) {
                Some(r) if this.member_visible(&r)? => Ok(Some(r)),
                _ => Ok(None),
            }
        })
        .await
    }

    /// Every Ready snapshot of every pool, sorted by id.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let this = self.clone();
        exec::blocking(move || {
            let mut all = Vec::new();
            // Members are listed once their group is Ready: one read per group.
            let mut groups: std::collections::HashMap<String, bool> = Default::default();
            for p in this.all() {
                for r in p.all_snapshots()? {
                    if r.state != RecordState::Ready {
                        continue;
                    }
                    let visible = match &r.group_snapshot_id {
                        None => true,
                        Some(g) => match groups.get(g) {
                            Some(v) => *v,
                            None => {
                                let v = this.member_visible(&r)?;
                                groups.insert(g.clone(), v);
                                v
                            }
                        },
                    };
                    if visible {
                        all.push(r);
                    }
                }
            }
            all.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(all)
        })
        .await
    }

    /// DeleteSnapshot: OK for unknown ids; INVALID_ARGUMENT for a member of a group snapshot
    /// (the spec's "part of a group": it goes with its group). The record goes at once; the
    /// layer stays while a volume still reads through it and is removed with the last of them.
    pub(crate) async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let Some(oid) = ObjectId::parse_snapshot(id)? else {
            return Ok(());
        };
        let Some(pool) = self.get(&oid.pool).cloned() else {
            return Ok(());
        };
        let this = self.clone();
        exec::blocking(move || {
            let existed = pool.with_layers_locked(|| {
                let rec = pool.read_snapshot(&oid.key)?;
                if let Some(r) = &rec {
                    if let (Some(g), Some(_)) = (&r.group_snapshot_id, this.group_state(r)?) {
                        return Err(Error::invalid(format!(
                            "snapshot {} is a member of group snapshot {g} and cannot be \
                             deleted alone; delete the group (DeleteVolumeGroupSnapshot)",
                            r.id
                        )));
                    }
                }
                let existed = rec.is_some();
                pool.remove_snapshot_record(&oid.key)?;
                Ok(existed)
            })?;
            crate::failpoint!("snapshot.deleted");
            if existed {
                tracing::info!(snapshot = %oid, "snapshot deleted");
                if let Err(e) = pool.collect_garbage() {
                    tracing::warn!(pool = %pool.name(), error = %e, "layer cleanup deferred");
                }
            }
            Ok(())
        })
        .await
    }

    /// The guard keys of a CreateSnapshot: the snapshot's name and its source volume.
    pub(crate) fn snapshot_guard_keys(name: &str, source_volume_id: &str) -> Result<Vec<String>> {
        let mut keys = vec![crate::guard::snapshot_key(&ids::snapshot_key_for_name(
            name,
        ))];
        if ObjectId::parse_volume(source_volume_id)?.is_some() {
            keys.push(crate::guard::volume_key(&key_of_volume(source_volume_id)?));
        }
        Ok(keys)
    }
}
