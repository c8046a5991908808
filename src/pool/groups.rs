//! Group snapshots (CSI VolumeGroupSnapshot): a snapshot of each of several volumes, all at
//! one point of the writes to them, each an ordinary snapshot too (restorable, listed with its
//! group's id) that is deleted only with its group.
//!
//! Every member is a frozen layer, as a single snapshot is: constant time whatever the sizes.
//! How the members are cut at one point:
//! - members nobody writes (not attached read-write): their layers are frozen offline, their
//!   records switched under one hold of each pool's layer lock;
//! - members attached read-write: per node ONE live operation switches all of them (one QEMU
//!   transaction); the guests' file systems are frozen around it where an agent answers, and
//!   several nodes are paused together while theirs are cut (`attach::live`).
//!
//! The guarantee met (`Consistency`) is logged, counted and kept in the group's record.
//!
//! Records: `groups/<key>.json` in the pool of the first volume, key derived from the name
//! (a repeated request finds it without an index); members `snapshots/<key>.json` in their
//! volumes' pools, keys derived from the group's key and the volume id. The group record is
//! written Creating (naming every member) before anything is made, members are recorded once
//! every volume is switched, and the group turns Ready last: a member is listed only once its
//! group is Ready, and a restarted controller removes what a Creating or Deleting group names.

use super::layers::{key_of_volume, Frozen, PreparedFreeze};
use super::record::{GroupSnapshotRecord, RecordState, SnapshotRecord, VolumeRecord, SCHEMA};
use super::{Pool, Pools};
use crate::attach::{LiveMember, NodeMembers};
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::ids::{self, ObjectId};
use crate::model::{Consistency, ImageFormat};
use futures_util::future::join_all;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The most volumes one group snapshot may hold.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// A CreateVolumeGroupSnapshot request, validated by the caller.
#[derive(Debug, Clone)]
pub struct CreateGroupSnapshot {
    /// The CSI group snapshot name.
    pub name: String,
    /// The volumes to snapshot together.
    pub source_volume_ids: Vec<String>,
    /// The CreateVolumeGroupSnapshot parameters.
    pub parameters: BTreeMap<String, String>,
}

/// A group snapshot and its members (in the order of its volumes).
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    /// The group's record.
    pub record: GroupSnapshotRecord,
    /// The member snapshots.
    pub members: Vec<SnapshotRecord>,
}

impl Pool {
    pub(crate) fn groups_dir(&self) -> PathBuf {
        self.dir().join("groups")
    }

    fn group_path(&self, key: &str) -> PathBuf {
        self.groups_dir().join(format!("{key}.json"))
    }

    pub(crate) fn read_group(&self, key: &str) -> Result<Option<GroupSnapshotRecord>> {
        fsutil::read_json(&self.group_path(key))
    }

    /// Writes a group snapshot record atomically. Blocking.
    pub fn write_group(&self, rec: &GroupSnapshotRecord) -> Result<()> {
        let key = ObjectId::parse_group(&rec.id)?
            .ok_or_else(|| Error::internal(format!("bad group snapshot id {}", rec.id)))?
            .key;
        fsutil::write_json(&self.group_path(&key), rec)
    }

    fn remove_group_record(&self, key: &str) -> Result<()> {
        fsutil::remove_durable(&self.group_path(key))
    }

    /// Every group record of the pool, any state (unreadable ones skipped, logged).
    pub(crate) fn all_groups(&self) -> Result<Vec<GroupSnapshotRecord>> {
        self.read_records(&self.groups_dir(), "group snapshot")
    }
}

/// A volume of the group, as planned.
struct Member {
    vol: VolumeRecord,
    /// The node writing it (attached read-write), if any.
    writer: Option<String>,
    snapshot_id: String,
}

/// Parameters as compared for idempotency: orchestrator metadata left out.
fn own_parameters(m: &BTreeMap<String, String>) -> BTreeMap<&String, &String> {
    m.iter()
        .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
        .collect()
}

fn now_parts(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

impl Pools {
    /// The guard keys of a CreateVolumeGroupSnapshot: the group's name and every volume.
    pub(crate) fn group_guard_keys(name: &str, volume_ids: &[String]) -> Result<Vec<String>> {
        let mut keys = vec![crate::guard::group_key(&ids::group_key_for_name(name))];
        for id in volume_ids {
            if ObjectId::parse_volume(id)?.is_some() {
                keys.push(crate::guard::volume_key(&key_of_volume(id)?));
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// The pool and key of a group snapshot id; `None` when it cannot be one of ours.
    fn locate_group(&self, id: &str) -> Result<Option<(std::sync::Arc<Pool>, String)>> {
        let Some(oid) = ObjectId::parse_group(id)? else {
            return Ok(None);
        };
        Ok(self.get(&oid.pool).map(|p| (p.clone(), oid.key)))
    }

    /// CreateVolumeGroupSnapshot. Idempotent by name: the same name, volumes (in any order)
    /// and parameters give the same group; the same name with other volumes or parameters is
    /// ALREADY_EXISTS. The caller holds the guards of `group_guard_keys`.
    pub async fn create_group_snapshot(&self, req: CreateGroupSnapshot) -> Result<GroupSnapshot> {
        let started = Instant::now();
        let key = ids::group_key_for_name(&req.name);
        if let Some(existing) = self.existing_group(&req, &key).await? {
            return Ok(existing);
        }
        let mut vols = Vec::with_capacity(req.source_volume_ids.len());
        for id in &req.source_volume_ids {
            let vol = self
                .volume(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
            if vol.format != ImageFormat::Qcow2 {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is raw and cannot be in a group snapshot: every member is a \
                     frozen qcow2 layer; create the volume with format=qcow2"
                )));
            }
            self.check_freezable(&vol)?;
            vols.push(vol);
        }
        // One read of every node decides who writes each volume now.
        let scan = self.layers.attachments.scan().await?;
        let mut members = Vec::with_capacity(vols.len());
        for vol in vols {
            let mut writers: Vec<String> = scan
                .of_volume(&vol.id)?
                .into_iter()
                .filter(|a| !a.readonly)
                .map(|a| a.node_id.clone())
                .collect();
            writers.sort();
            writers.dedup();
            if writers.len() > 1 {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is attached read-write to several nodes ({}); a consistent \
                     snapshot needs at most one writer: unpublish it first",
                    vol.id,
                    writers.join(", ")
                )));
            }
            let snapshot_id = ObjectId::new(&vol.pool, &ids::member_key(&key, &vol.id)).to_string();
            members.push(Member {
                writer: writers.pop(),
                vol,
                snapshot_id,
            });
        }

        let group_pool = self.pool_of(&members[0].vol.pool)?;
        let mut group = GroupSnapshotRecord {
            schema: SCHEMA,
            id: ObjectId::new(group_pool.name(), &key).to_string(),
            name: req.name.clone(),
            pool: group_pool.name().to_string(),
            state: RecordState::Creating,
            source_volume_ids: req.source_volume_ids.clone(),
            snapshot_ids: members.iter().map(|m| m.snapshot_id.clone()).collect(),
            parameters: req.parameters.clone(),
            created_at: 0,
            created_at_nanos: 0,
            consistency: None,
        };
        let (p, g) = (group_pool.clone(), group.clone());
        exec::blocking(move || p.write_group(&g)).await?;
        crate::failpoint!("group.intent");

        match self.cut_members(&group, &members).await {
            Ok((frozen, consistency, cut_at)) => {
                let (secs, nanos) = now_parts(cut_at);
                let records: Vec<SnapshotRecord> = members
                    .iter()
                    .zip(frozen)
                    .map(|(m, f)| SnapshotRecord {
                        schema: SCHEMA,
                        id: m.snapshot_id.clone(),
                        name: format!("{}/{}", req.name, m.vol.id),
                        pool: m.vol.pool.clone(),
                        state: RecordState::Ready,
                        source_volume_id: m.vol.id.clone(),
                        layer: f.layer,
                        backing: f.backing,
                        size_bytes: m.vol.capacity_bytes,
                        parameters: BTreeMap::new(),
                        created_at: secs,
                        created_at_nanos: nanos,
                        quiesced: f.quiesced,
                        group_snapshot_id: Some(group.id.clone()),
                    })
                    .collect();
                group.state = RecordState::Ready;
                group.created_at = secs;
                group.created_at_nanos = nanos;
                group.consistency = Some(consistency);
                let pools: Vec<_> = records
                    .iter()
                    .map(|r| self.pool_of(&r.pool))
                    .collect::<Result<_>>()?;
                let (rs, g, gp) = (records.clone(), group.clone(), group_pool.clone());
                exec::blocking(move || {
                    // The layers are in the volumes' chains already: nothing collects them.
                    for (p, r) in pools.iter().zip(&rs) {
                        p.write_snapshot(r)?;
                    }
                    crate::failpoint!("group.members-recorded");
                    gp.write_group(&g)
                })
                .await?;
                crate::failpoint!("group.ready");
                crate::metrics::observe_group_snapshot(consistency, started.elapsed());
                tracing::info!(group_snapshot = %group.id, name = %group.name,
                    members = records.len(), consistency = consistency.as_str(),
                    ms = started.elapsed().as_millis() as u64, "group snapshot created");
                Ok(GroupSnapshot {
                    record: group,
                    members: records,
                })
            }
            Err(e) => {
                let (p, k) = (group_pool.clone(), key.clone());
                if let Err(u) = exec::blocking(move || p.remove_group_record(&k)).await {
                    tracing::error!(group_snapshot = %group.id, error = %u,
                        "could not remove a failed group snapshot's record; the next start will");
                }
                tracing::warn!(group_snapshot = %group.id, error = %e, "group snapshot failed");
                Err(e)
            }
        }
    }

    /// A group of this name that answers the request (Ready, same volumes and parameters),
    /// ALREADY_EXISTS for another request; a leftover of an interrupted attempt is removed.
    async fn existing_group(
        &self,
        req: &CreateGroupSnapshot,
        key: &str,
    ) -> Result<Option<GroupSnapshot>> {
        for pool in self.all() {
            let (p, k) = (pool.clone(), key.to_string());
            let Some(existing) = exec::blocking(move || p.read_group(&k)).await? else {
                continue;
            };
            if existing.name != req.name {
                return Err(Error::AlreadyExists(format!(
                    "group snapshot id {} is taken by the group snapshot named {:?}; choose \
                     another name",
                    existing.id, existing.name
                )));
            }
            if existing.state != RecordState::Ready {
                self.discard_group(pool, &existing).await?;
                continue;
            }
            let want: BTreeSet<&String> = req.source_volume_ids.iter().collect();
            let have: BTreeSet<&String> = existing.source_volume_ids.iter().collect();
            if want != have {
                return Err(Error::AlreadyExists(format!(
                    "a group snapshot named {:?} already exists ({}) of other volumes ({}); use \
                     another name",
                    req.name,
                    existing.id,
                    existing.source_volume_ids.join(", ")
                )));
            }
            if own_parameters(&existing.parameters) != own_parameters(&req.parameters) {
                return Err(Error::AlreadyExists(format!(
                    "a group snapshot named {:?} already exists ({}) with other parameters; use \
                     another name or the same request",
                    req.name, existing.id
                )));
            }
            let members = self.members_of(&existing).await?;
            return Ok(Some(GroupSnapshot {
                record: existing,
                members,
            }));
        }
        Ok(None)
    }

    /// Freezes every member's layer at one point: prepares every overlay, cuts the live ones
    /// node by node in one go, then switches every record. Each member's frozen layer, the
    /// guarantee met, and when the cut was.
    async fn cut_members(
        &self,
        group: &GroupSnapshotRecord,
        members: &[Member],
    ) -> Result<(Vec<Frozen>, Consistency, SystemTime)> {
        let prepares = join_all(
            members
                .iter()
                .map(|m| self.prepare_freeze(m.vol.clone(), m.writer.is_some())),
        )
        .await;
        let mut prepared = Vec::with_capacity(members.len());
        let mut failed = None;
        for p in prepares {
            match p {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            self.undo_all(prepared).await;
            return Err(e);
        }

        // Live members, by node, in the order the nodes first appear.
        let mut plan: Vec<NodeMembers> = Vec::new();
        for (m, p) in members.iter().zip(&prepared) {
            let Some(node) = &m.writer else { continue };
            let member = LiveMember {
                volume_id: m.vol.id.clone(),
                overlay: p.overlay_path.clone(),
            };
            match plan.iter_mut().find(|n| n.node_id == *node) {
                Some(n) => n.members.push(member),
                None => plan.push(NodeMembers {
                    node_id: node.clone(),
                    members: vec![member],
                }),
            }
        }
        if plan.is_empty() {
            let cut_at = SystemTime::now();
            let frozen = self
                .commit_freezes(prepared.into_iter().map(|p| (p, None)).collect())
                .await?;
            tracing::info!(group_snapshot = %group.id, members = members.len(),
                "group snapshot of volumes nobody writes: layers frozen offline");
            return Ok((
                frozen.into_iter().map(|(f, _)| f).collect(),
                Consistency::Offline,
                cut_at,
            ));
        }

        let outcome = match self.layers.attachments.snapshot_live_together(plan).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing was switched anywhere.
                let e = match e {
                    Error::Unimplemented(why) => Error::FailedPrecondition(format!(
                        "volumes of group snapshot {:?} are attached read-write and {why}; \
                         unpublish them first",
                        group.name
                    )),
                    other => other,
                };
                self.undo_all(prepared).await;
                return Err(e);
            }
        };
        // Per node: whether it switched (Ok(quiesced)) or why not.
        let mut node_result: BTreeMap<String, Result<bool>> = outcome
            .nodes
            .into_iter()
            .map(|cut| (cut.node_id, cut.result.map(|()| cut.quiesced)))
            .collect();
        let switched = |node: &str| match node_result.get(node) {
            Some(Ok(q)) => Ok(*q),
            Some(Err(e)) => Err(matches!(
                e.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            )),
            None => Err(false),
        };
        let mut commit = Vec::new();
        let mut undo = Vec::new();
        let all_switched = members
            .iter()
            .all(|m| m.writer.as_deref().is_none_or(|n| switched(n).is_ok()));
        let together = all_switched && outcome.consistency.is_some();
        // Switched volumes are committed whatever happens to the group: their nodes write to
        // the new overlays now. The others are undone, or kept when the outcome is unknown.
        for (m, p) in members.iter().zip(prepared) {
            match m.writer.as_deref().map(switched) {
                Some(Ok(quiesced)) => commit.push((p, Some(quiesced))),
                Some(Err(unknown)) => undo.push((p, unknown)),
                None if together => commit.push((p, None)),
                None => undo.push((p, false)),
            }
        }
        for (p, unknown) in undo {
            self.undo_freeze(p, unknown).await;
        }
        let group_error = std::mem::take(&mut node_result)
            .into_iter()
            .find_map(|(_, r)| r.err())
            .map(|e| match e {
                Error::Unimplemented(why) => Error::FailedPrecondition(format!(
                    "volumes of group snapshot {:?} are attached read-write and {why}; \
                     unpublish them first",
                    group.name
                )),
                other => other,
            })
            .or_else(|| {
                outcome.consistency.is_none().then(|| {
                    Error::Timeout(format!(
                        "the volumes of group snapshot {:?} are on several nodes whose live \
                         snapshots did not all finish within the quiesce timeout, so they \
                         cannot be taken as one point of their writes; retry (or raise \
                         [snapshots] quiesce_timeout_secs)",
                        group.name
                    ))
                })
            });
        let frozen = self.commit_freezes(commit).await?;
        if let Some(e) = group_error {
            return Err(e);
        }
        let consistency = outcome.consistency.unwrap_or(Consistency::Crash);
        if !outcome.held.is_zero() {
            crate::metrics::observe_quiesce_window(outcome.held);
        }
        Ok((
            frozen.into_iter().map(|(f, _)| f).collect(),
            consistency,
            outcome.cut_at,
        ))
    }

    /// Undoes prepared freezes that no node was told to switch to.
    async fn undo_all(&self, prepared: Vec<PreparedFreeze>) {
        join_all(prepared.into_iter().map(|p| self.undo_freeze(p, false))).await;
    }

    /// The member records of a group, in its order; INTERNAL when one is missing.
    async fn members_of(&self, group: &GroupSnapshotRecord) -> Result<Vec<SnapshotRecord>> {
        let mut out = Vec::with_capacity(group.snapshot_ids.len());
        for id in &group.snapshot_ids {
            let oid = ObjectId::parse_snapshot(id)?
                .ok_or_else(|| Error::internal(format!("bad member snapshot id {id}")))?;
            let pool = self.pool_of(&oid.pool)?;
            let rec = exec::blocking(move || pool.read_snapshot(&oid.key))
                .await?
                .ok_or_else(|| {
                    Error::internal(format!(
                        "member snapshot {id} of group snapshot {} is missing from its pool",
                        group.id
                    ))
                })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// A Ready group snapshot and its members; `Ok(None)` when it does not exist.
    pub async fn group_snapshot(&self, id: &str) -> Result<Option<GroupSnapshot>> {
        let Some((pool, key)) = self.locate_group(id)? else {
            return Ok(None);
        };
        let Some(rec) = exec::blocking(move || pool.read_group(&key)).await? else {
            return Ok(None);
        };
        if rec.state != RecordState::Ready {
            return Ok(None);
        }
        let members = self.members_of(&rec).await?;
        Ok(Some(GroupSnapshot {
            record: rec,
            members,
        }))
    }

    /// DeleteVolumeGroupSnapshot: OK for unknown ids. The members' records go, then the
    /// group's; layers stay while volumes read through them. The caller holds the group's
    /// guard and checked `snapshot_ids`.
    pub async fn delete_group_snapshot(&self, id: &str) -> Result<()> {
        let Some((pool, key)) = self.locate_group(id)? else {
            return Ok(());
        };
        let (p, k) = (pool.clone(), key.clone());
        let Some(rec) = exec::blocking(move || p.read_group(&k)).await? else {
            return Ok(());
        };
        self.discard_group(&pool, &rec).await?;
        tracing::info!(group_snapshot = %id, members = rec.snapshot_ids.len(),
            "group snapshot deleted");
        Ok(())
    }

    /// Marks the group Deleting, removes its members' records, then its own; collects the
    /// layers nothing uses any more.
    async fn discard_group(
        &self,
        pool: &std::sync::Arc<Pool>,
        rec: &GroupSnapshotRecord,
    ) -> Result<()> {
        let mut members = Vec::new();
        for id in &rec.snapshot_ids {
            if let Some(oid) = ObjectId::parse_snapshot(id)? {
                if let Some(p) = self.get(&oid.pool) {
                    members.push((p.clone(), oid.key));
                }
            }
        }
        let key = ObjectId::parse_group(&rec.id)?
            .ok_or_else(|| Error::internal(format!("bad group snapshot id {}", rec.id)))?
            .key;
        let (pool, rec) = (pool.clone(), rec.clone());
        exec::blocking(move || {
            if rec.state == RecordState::Ready {
                let mut deleting = rec.clone();
                deleting.state = RecordState::Deleting;
                pool.write_group(&deleting)?;
            }
            for (p, k) in &members {
                p.with_layers_locked(|| p.remove_snapshot_record(k))?;
            }
            crate::failpoint!("group.members-deleted");
            pool.remove_group_record(&key)?;
            let mut pools: Vec<&std::sync::Arc<Pool>> = members.iter().map(|(p, _)| p).collect();
            pools.dedup_by(|a, b| std::sync::Arc::ptr_eq(a, b));
            for p in pools {
                if let Err(e) = p.collect_garbage() {
                    tracing::warn!(pool = %p.name(), error = %e, "layer cleanup deferred");
                }
            }
            Ok(())
        })
        .await
    }

    /// Pool open: removes what a group snapshot a crash interrupted (Creating or Deleting)
    /// names. Runs once every pool is open (members may live in other pools).
    pub(super) async fn recover_groups(&self) -> Result<()> {
        for pool in self.all() {
            let p = pool.clone();
            for rec in exec::blocking(move || p.all_groups()).await? {
                if rec.state != RecordState::Ready {
                    tracing::info!(pool = %pool.name(), group_snapshot = %rec.id, state = ?rec.state,
                        "removing a group snapshot a crash interrupted");
                    self.discard_group(pool, &rec).await?;
                }
            }
        }
        Ok(())
    }

    /// Whether `rec` is visible: not a member, or a member of a Ready group. Blocking.
    pub(super) fn member_visible(&self, rec: &SnapshotRecord) -> Result<bool> {
        if rec.group_snapshot_id.is_none() {
            return Ok(true);
        }
        Ok(self.group_state(rec)? == Some(RecordState::Ready))
    }

    /// The state of the group `rec` is a member of; `None` when it names none, or one that
    /// does not exist (any more). Blocking.
    pub(super) fn group_state(&self, rec: &SnapshotRecord) -> Result<Option<RecordState>> {
        let Some(gid) = &rec.group_snapshot_id else {
            return Ok(None);
        };
        let Some(oid) = ObjectId::parse_group(gid)? else {
            return Ok(None);
        };
        let Some(pool) = self.get(&oid.pool) else {
            return Ok(None);
        };
        Ok(pool.read_group(&oid.key)?.map(|g| g.state))
    }
}
