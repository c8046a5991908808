//! Group snapshots (CSI VolumeGroupSnapshot): a snapshot of each of several volumes, all at
//! one point of the writes to them, each an ordinary snapshot too (restorable, listed with its
//! group's id) that is deleted only with its group.
//!
//! Every member is a frozen layer, as a single snapshot is: constant time whatever the sizes.
//! How the members are cut at one point:
//! - members nobody writes (not attached read-write): their layers are frozen offline, their
//!   records switched in one batch under one hold of each pool's lock;
//! - members attached read-write: per node ONE live operation switches all of them (one QEMU
//!   transaction); the guests' file systems are frozen around it where an agent answers, and
//!   several nodes are paused together while theirs are cut (`attach::live`).
//!
//! The guarantee met (`Consistency`) is logged, counted and kept in the group's record.
//!
//! Records: `groups/g<key>.json` in the pool of the first volume (a new random key each time;
//! the name is the idempotency key, found through the index), members `snapshots/s<key>.json`
//! in their volumes' pools. The group record is written Creating (naming every member) before
//! anything is made, the members are recorded once every volume is switched, and the group
//! turns Ready last: a member is listed only once its group is Ready, and whoever next holds
//! the group's lock (an open of the pool, a retry) removes what a Creating or Deleting group
//! names. The operation holds the group name's lock, the group's lock and every volume's lock.

use super::layers::{Frozen, PreparedFreeze};
use super::record::{epoch_parts, GroupSnapshotRecord, RecordState, SnapshotRecord, SCHEMA};
use super::store::{Kind, Slot, Staged};
use super::volumes::VolumeLock;
use super::{Pool, Pools};
use crate::attach::{LiveMember, NodeMembers};
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::{self, VolumeId};
use crate::model::{Consistency, ImageFormat};
use crate::params::own_parameters;
use futures_util::future::join_all;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The most volumes one group snapshot may hold.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// A CreateVolumeGroupSnapshot request, validated by the caller.
#[derive(Debug, Clone)]
pub struct CreateGroupSnapshot {
    /// The CSI group snapshot name.
    pub name: String,
    /// The volumes to snapshot together (parsed at the edge: each can be one of ours).
    pub source_volume_ids: Vec<VolumeId>,
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
    /// The id of the group snapshot with `key` in this pool.
    pub fn group_id(&self, key: u64) -> String {
        format!("{}.{}", self.name(), Kind::Group.file_key(key))
    }

    /// The record (any state) of the group snapshot named `name` in this pool.
    fn group_named(&self, name: &str) -> Result<Option<(u64, GroupSnapshotRecord)>> {
        let keys: Vec<u64> = self
            .store
            .index()?
            .groups_named(ids::name_hash(ids::GROUP, name))
            .collect();
        for key in keys {
            if let Some(rec) = self
                .store
                .read::<GroupSnapshotRecord>(key)?
                .filter(|r| r.name == name)
            {
                return Ok(Some((key, rec)));
            }
        }
        Ok(None)
    }

    /// A key no group snapshot of this pool has.
    fn new_group_key(&self) -> Result<u64> {
        loop {
            let key = ids::random_u64();
            if self.store.index()?.group(key).is_none() {
                return Ok(key);
            }
        }
    }
}

/// A volume of the group, as planned.
struct Member {
    lock: VolumeLock,
    vol: super::record::VolumeRecord,
    /// The node writing it (attached read-write), if any.
    writer: Option<String>,
    snapshot_id: String,
}

impl Pools {
    /// The pool and key of a group snapshot id; `None` when it cannot be one of ours.
    pub(super) fn locate_group(&self, id: &str) -> Result<Option<(Arc<Pool>, u64)>> {
        self.locate(Kind::Group, id)
    }

    /// CreateVolumeGroupSnapshot. Idempotent by name: the same name, volumes (in any order)
    /// and parameters give the same group; the same name with other volumes or parameters is
    /// ALREADY_EXISTS. ABORTED while another operation holds the name or a volume.
    pub async fn create_group_snapshot(&self, req: CreateGroupSnapshot) -> Result<GroupSnapshot> {
        let started = Instant::now();
        let hash = ids::name_hash(ids::GROUP, &req.name);
        let _name = self
            .lock_name(
                Slot::GroupName(hash),
                format!("the group snapshot named {:?}", req.name),
            )
            .await?;
        if let Some(existing) = self.existing_group(&req).await? {
            return Ok(existing);
        }
        let mut members = Vec::with_capacity(req.source_volume_ids.len());
        for id in &req.source_volume_ids {
            let missing = || Error::NotFound(format!("source volume {id} does not exist"));
            let lock = self.lock_volume(id).await?.ok_or_else(missing)?;
            let vol = self.locked_source(&lock, missing).await?;
            if vol.format != ImageFormat::Qcow2 {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is raw and cannot be in a group snapshot: every member is a \
                     frozen qcow2 layer; create the volume with format=qcow2"
                )));
            }
            self.check_freezable(&vol)?;
            members.push((lock, vol));
        }
        // One read of every node decides who writes each volume now.
        let scan = self.layers.attachments.scan().await?;
        let mut planned = Vec::with_capacity(members.len());
        let mut taken: BTreeSet<(String, u64)> = BTreeSet::new();
        for (lock, vol) in members {
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
            let pool = lock.pool.clone();
            let key = loop {
                let p = pool.clone();
                let key = exec::blocking(move || p.new_snapshot_key()).await?;
                if taken.insert((pool.name().to_string(), key)) {
                    break key;
                }
            };
            planned.push(Member {
                snapshot_id: pool.snapshot_id(key),
                writer: writers.pop(),
                lock,
                vol,
            });
        }

        let group_pool = planned[0].lock.pool.clone();
        let gp = group_pool.clone();
        let key = exec::blocking(move || gp.new_group_key()).await?;
        let id = group_pool.group_id(key);
        let (gp, gid) = (group_pool.clone(), id.clone());
        let _group = exec::blocking(move || {
            gp.store
                .lock(Slot::Group(key), &|| format!("group snapshot {gid}"))
        })
        .await?;
        let mut group = GroupSnapshotRecord {
            schema: SCHEMA,
            id,
            name: req.name.clone(),
            pool: group_pool.name().to_string(),
            state: RecordState::Creating,
            source_volume_ids: req
                .source_volume_ids
                .iter()
                .map(ToString::to_string)
                .collect(),
            snapshot_ids: planned.iter().map(|m| m.snapshot_id.clone()).collect(),
            parameters: req.parameters.clone(),
            created_at: 0,
            created_at_nanos: 0,
            consistency: None,
        };
        let (gp, g) = (group_pool.clone(), group.clone());
        exec::blocking(move || gp.store.put(&g, |_| Ok(())).map(drop)).await?;
        crate::failpoint!("group.intent");

        let cut = self.cut_members(&group, &planned).await;
        let (frozen, consistency, cut_at) = match cut {
            Ok(c) => c,
            Err(e) => {
                let (gp, g) = (group_pool.clone(), group.id.clone());
                let removed = exec::blocking(move || {
                    gp.store
                        .remove::<GroupSnapshotRecord>(key, |_| Ok(()))
                        .map(drop)
                })
                .await;
                if let Err(u) = removed {
                    tracing::error!(group_snapshot = %g, error = %u,
                        "could not remove a failed group snapshot's record; the next start will");
                }
                tracing::warn!(group_snapshot = %group.id, error = %e, "group snapshot failed");
                return Err(e);
            }
        };
        let (secs, nanos) = epoch_parts(cut_at);
        let records: Vec<SnapshotRecord> = planned
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
        let pools: Vec<Arc<Pool>> = planned.iter().map(|m| m.lock.pool.clone()).collect();
        let (rs, g, gp) = (records.clone(), group.clone(), group_pool.clone());
        exec::blocking(move || {
            // Each pool's members in one batch. Their layers are in the volumes' chains
            // already: nothing collects them meanwhile.
            let mut done: Vec<&Arc<Pool>> = Vec::new();
            for pool in &pools {
                if done.iter().any(|p| Arc::ptr_eq(p, pool)) {
                    continue;
                }
                done.push(pool);
                let staged = rs
                    .iter()
                    .zip(&pools)
                    .filter(|(_, p)| Arc::ptr_eq(p, pool))
                    .map(|(r, _)| Staged::of(r))
                    .collect::<Result<Vec<_>>>()?;
                pool.store.put_batch(staged, &[], |_| Ok(()))?;
            }
            crate::failpoint!("group.members-recorded");
            gp.store.put(&g, |_| Ok(())).map(drop)
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

    /// A group of this name that answers the request (Ready, same volumes and parameters),
    /// ALREADY_EXISTS for another request; a leftover of an interrupted attempt is removed.
    /// The caller holds the name's lock.
    async fn existing_group(&self, req: &CreateGroupSnapshot) -> Result<Option<GroupSnapshot>> {
        let pools = self.all().to_vec();
        let name = req.name.clone();
        let found = exec::blocking(move || {
            for pool in &pools {
                if let Some((key, rec)) = pool.group_named(&name)? {
                    return Ok(Some((pool.clone(), key, rec)));
                }
            }
            // Not found, but an unreadable group record may hold the name.
            for pool in &pools {
                pool.store.index()?.names_known(Kind::Group, &name)?;
            }
            Ok(None)
        })
        .await?;
        let Some((pool, key, existing)) = found else {
            return Ok(None);
        };
        if existing.state != RecordState::Ready {
            let this = self.clone();
            exec::blocking(move || {
                let id = existing.id.clone();
                let _held = pool
                    .store
                    .lock(Slot::Group(key), &|| format!("group snapshot {id}"))?;
                this.discard_group(&pool, key, &existing)
            })
            .await?;
            return Ok(None);
        }
        let want: BTreeSet<String> = req
            .source_volume_ids
            .iter()
            .map(ToString::to_string)
            .collect();
        let have: BTreeSet<String> = existing.source_volume_ids.iter().cloned().collect();
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
        Ok(Some(GroupSnapshot {
            record: existing,
            members,
        }))
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
                .map(|m| self.prepare_freeze(&m.lock, m.vol.clone(), m.writer.is_some())),
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
                volume_id: m.lock.id().clone(),
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
        let all_switched = members
            .iter()
            .all(|m| m.writer.as_deref().is_none_or(|n| switched(n).is_ok()));
        let together = all_switched && outcome.consistency.is_some();
        // Switched volumes are committed whatever happens to the group: their nodes write to
        // the new overlays now. The others are undone, or kept when the outcome is unknown.
        let mut commit = Vec::new();
        let mut undo = Vec::new();
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
        if !outcome.held.is_zero() {
            crate::metrics::observe_quiesce_window(outcome.held);
        }
        Ok((
            frozen.into_iter().map(|(f, _)| f).collect(),
            outcome.consistency.unwrap_or(Consistency::Crash),
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
            let missing = || {
                Error::internal(format!(
                    "member snapshot {id} of group snapshot {} is missing from its pool",
                    group.id
                ))
            };
            let (pool, key) = self.locate_snapshot(id)?.ok_or_else(missing)?;
            let rec = exec::blocking(move || pool.store.read::<SnapshotRecord>(key))
                .await?
                .ok_or_else(missing)?;
            out.push(rec);
        }
        Ok(out)
    }

    /// A Ready group snapshot and its members; `Ok(None)` when it does not exist.
    pub async fn group_snapshot(&self, id: &str) -> Result<Option<GroupSnapshot>> {
        let Some((pool, key)) = self.locate_group(id)? else {
            return Ok(None);
        };
        let rec = exec::blocking(move || {
            let index = pool.store.index()?;
            index.readable(Kind::Group, key)?;
            let ready = index
                .group(key)
                .is_some_and(|g| g.state == RecordState::Ready);
            drop(index);
            if !ready {
                return Ok(None);
            }
            pool.store.read::<GroupSnapshotRecord>(key)
        })
        .await?;
        let Some(rec) = rec.filter(|r| r.state == RecordState::Ready) else {
            return Ok(None);
        };
        let members = self.members_of(&rec).await?;
        Ok(Some(GroupSnapshot {
            record: rec,
            members,
        }))
    }

    /// DeleteVolumeGroupSnapshot: OK for unknown ids; ABORTED while another operation holds
    /// the group. The members' records go, then the group's; layers stay while volumes read
    /// through them. `check` sees the group (Ready) first and may refuse (a snapshot list
    /// mismatch).
    pub async fn delete_group_snapshot(
        &self,
        id: &str,
        check: impl FnOnce(&GroupSnapshotRecord) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let Some((pool, key)) = self.locate_group(id)? else {
            return Ok(());
        };
        let (this, id) = (self.clone(), id.to_string());
        exec::blocking(move || {
            let _held = pool
                .store
                .lock(Slot::Group(key), &|| format!("group snapshot {id}"))?;
            let Some(rec) = pool.store.read::<GroupSnapshotRecord>(key)? else {
                return Ok(());
            };
            if rec.state == RecordState::Ready {
                check(&rec)?;
            }
            this.discard_group(&pool, key, &rec)?;
            tracing::info!(group_snapshot = %id, members = rec.snapshot_ids.len(),
                "group snapshot deleted");
            Ok(())
        })
        .await
    }

    /// Marks the group Deleting, removes its members' records (each under its lock), then
    /// its own. The caller holds the group's lock. Blocking.
    fn discard_group(&self, pool: &Arc<Pool>, key: u64, rec: &GroupSnapshotRecord) -> Result<()> {
        // A member whose record is unreadable would outlive its group unseen: refused first.
        for id in &rec.snapshot_ids {
            if let Some((p, k)) = self.locate_snapshot(id)? {
                p.store.index()?.readable(Kind::Snapshot, k)?;
            }
        }
        if rec.state == RecordState::Ready {
            let mut deleting = rec.clone();
            deleting.state = RecordState::Deleting;
            pool.store.put(&deleting, |_| Ok(()))?;
        }
        for id in &rec.snapshot_ids {
            let Some((p, k)) = self.locate_snapshot(id)? else {
                continue;
            };
            let _held = p
                .store
                .lock(Slot::Snapshot(k), &|| format!("snapshot {id}"))?;
            if p.store.index()?.snapshot(k).is_some() {
                p.store.remove::<SnapshotRecord>(k, |_| Ok(()))?;
            }
        }
        crate::failpoint!("group.members-deleted");
        pool.store
            .remove::<GroupSnapshotRecord>(key, |_| Ok(()))
            .map(drop)
    }

    /// Pool open: removes what a group snapshot a crash interrupted (Creating or Deleting)
    /// names, unless a live process holds the group. Runs once every pool is open (members
    /// may live in other pools).
    pub(super) async fn recover_groups(&self) -> Result<()> {
        let this = self.clone();
        exec::blocking(move || {
            for pool in this.all() {
                let unsettled: Vec<u64> = pool
                    .store
                    .index()?
                    .groups()
                    .filter(|(_, g)| g.state != RecordState::Ready)
                    .map(|(k, _)| k)
                    .collect();
                for key in unsettled {
                    let Some(_held) = pool.store.try_lock(Slot::Group(key))? else {
                        tracing::info!(pool = %pool.name(), group_snapshot = %pool.group_id(key),
                            "a live process is working on this group snapshot; leaving it");
                        continue;
                    };
                    let Some(rec) = pool.store.read::<GroupSnapshotRecord>(key)? else {
                        continue;
                    };
                    tracing::info!(pool = %pool.name(), group_snapshot = %rec.id,
                        state = ?rec.state, "removing a group snapshot a crash interrupted");
                    this.discard_group(pool, key, &rec)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Whether a snapshot that is a member of `group` (none: not a member) is visible: its
    /// group is Ready. Blocking.
    pub(super) fn member_visible(&self, group: Option<&str>) -> Result<bool> {
        match group {
            None => Ok(true),
            Some(g) => Ok(self.group_state(g)? == Some(RecordState::Ready)),
        }
    }

    /// The state of the group snapshot `id`; `None` when it does not exist. Blocking.
    pub(super) fn group_state(&self, id: &str) -> Result<Option<RecordState>> {
        let Some((pool, key)) = self.locate_group(id)? else {
            return Ok(None);
        };
        let state = pool.store.index()?.group(key).map(|g| g.state);
        Ok(state)
    }

    /// `Error::UnreadableRecord` when the record of group snapshot `id` exists but cannot be
    /// read (its members must not then be taken for standalone snapshots). Blocking.
    pub(super) fn group_readable(&self, id: &str) -> Result<()> {
        match self.locate_group(id)? {
            Some((pool, key)) => pool.store.index()?.readable(Kind::Group, key),
            None => Ok(()),
        }
    }
}
