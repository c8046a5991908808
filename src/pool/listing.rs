//! Listings and lookups answered from the index: ListVolumes and ListSnapshots pages cost the
//! page (plus a log check), whatever the pool holds; ControllerGetVolume one entry.

use super::record::{RecordState, SnapshotRecord, VolumeRecord};
use super::store::{Index, Layer, VolumeEntry};
use super::volumes::LayerFault;
use super::{Pool, Pools};
use crate::error::{Error, Result};
use crate::exec;
use crate::ids::{ObjectId, VolumeId};
use crate::model::{ContentSource, ImageFormat};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a CSI `Volume` says of a volume.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VolumeSummary {
    pub(crate) id: String,
    pub(crate) pool: String,
    pub(crate) format: ImageFormat,
    pub(crate) capacity_bytes: u64,
    /// The file system of the first mount capability, if any.
    pub(crate) fs_type: Option<String>,
    pub(crate) content_source: Option<ContentSource>,
    pub(crate) accessible_topology: BTreeMap<String, String>,
    /// The parameters the node gets in the volume context (`params::ROOT_KEYS`).
    pub(crate) root: BTreeMap<String, String>,
}

impl VolumeRecord {
    pub(crate) fn summary(&self) -> VolumeSummary {
        VolumeSummary {
            id: self.id.clone(),
            pool: self.pool.clone(),
            format: self.format,
            capacity_bytes: self.capacity_bytes,
            fs_type: self.fs_type().map(str::to_string),
            content_source: self.content_source.clone(),
            accessible_topology: self.accessible_topology.clone(),
            root: crate::params::ROOT_KEYS
                .iter()
                .filter_map(|k| self.parameters.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
        }
    }
}

/// Whether a volume's image and backing layers can be used, as ListVolumes and
/// ControllerGetVolume report it (`Pool::first_fault`: the rule every operation on the volume
/// applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VolumeCondition {
    Healthy,
    /// A blank volume's empty image that a crash of the machine left without its blocks (no
    /// qcow2 header), of a volume never handed to a writer (`handed_to_writer`): not
    /// abnormal, its next use writes it again (`qcow2::repair_empty`).
    RewrittenAtNextUse {
        image: String,
        pool: String,
    },
    /// A layer is missing or damaged, or could not be read: what and what to do.
    Abnormal(String),
}

impl VolumeCondition {
    pub(crate) fn abnormal(&self) -> bool {
        matches!(self, VolumeCondition::Abnormal(_))
    }

    pub(crate) fn message(&self) -> String {
        match self {
            VolumeCondition::Healthy => "ok".into(),
            VolumeCondition::RewrittenAtNextUse { image, pool } => format!(
                "ok: the empty image {image} in pool {pool} lost its blocks in a crash of the \
                 machine before the volume was first published; the next operation on the \
                 volume writes it again"
            ),
            VolumeCondition::Abnormal(message) => message.clone(),
        }
    }
}

/// What a CSI `Snapshot` says of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotSummary {
    pub(crate) id: String,
    pub(crate) source_volume_id: String,
    pub(crate) size_bytes: u64,
    /// Seconds and nanoseconds since the Unix epoch.
    pub(crate) created_at: u64,
    pub(crate) created_at_nanos: u32,
    pub(crate) ready_to_use: bool,
    /// The group snapshot it is a member of.
    pub(crate) group_snapshot_id: Option<String>,
}

impl SnapshotRecord {
    pub(crate) fn summary(&self) -> SnapshotSummary {
        SnapshotSummary {
            id: self.id.clone(),
            source_volume_id: self.source_volume_id.clone(),
            size_bytes: self.size_bytes,
            created_at: self.created_at,
            created_at_nanos: self.created_at_nanos,
            // Records are written Ready only once the layer is durable.
            ready_to_use: self.state == RecordState::Ready,
            group_snapshot_id: self.group_snapshot_id.clone(),
        }
    }
}

/// Which snapshots ListSnapshots asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotFilter {
    pub(crate) snapshot_id: Option<String>,
    pub(crate) source_volume_id: Option<String>,
}

/// A volume's files to check for its condition.
struct Files {
    pool: Arc<Pool>,
    key: u64,
    id: String,
    format: ImageFormat,
    capacity: u64,
    image: String,
    backing: Vec<String>,
    /// The volume was handed to a writer: its image held data.
    handed_to_writer: bool,
}

impl Files {
    fn of(pool: &Arc<Pool>, key: u64, v: &VolumeEntry) -> Files {
        Files {
            pool: pool.clone(),
            key,
            id: pool.volume_id(key),
            format: v.format,
            capacity: v.capacity,
            image: v.image.to_string(),
            backing: v.backing.iter().map(Layer::to_string).collect(),
            handed_to_writer: v.handed_to_writer,
        }
    }

    /// Read-only, without the volume's lock: a `stat` and (qcow2) one small read per layer.
    /// A file that cannot be read makes the condition abnormal; the listing fails only for
    /// what says nothing about the volume (`Error::is_process_limit`). Blocking.
    ///
    /// The files were named by the index before they are looked at: a fault found is checked
    /// against the index as it is now, since a flattening switch or a delete may have changed
    /// the volume's layers in between (not a fault of the volume).
    fn condition(&self) -> Result<VolumeCondition> {
        let found = self.judge()?;
        if !found.abnormal() {
            return Ok(found);
        }
        let now = {
            let index = self.pool.store.index()?;
            index
                .volume(self.key)
                .filter(|v| v.state == RecordState::Ready)
                .map(|v| Files::of(&self.pool, self.key, v))
        };
        match now {
            Some(now) if (&now.image, &now.backing) != (&self.image, &self.backing) => now.judge(),
            _ => Ok(found),
        }
    }

    fn judge(&self) -> Result<VolumeCondition> {
        match self.inspect() {
            Err(e) if e.is_process_limit() => Err(e),
            Err(e) => Ok(VolumeCondition::Abnormal(format!(
                "unreadable: the images of volume {} in pool {} cannot be checked: {e}",
                self.id,
                self.pool.name()
            ))),
            found => found,
        }
    }

    fn inspect(&self) -> Result<VolumeCondition> {
        let owner = || format!("volume {}", self.id);
        let layers = std::iter::once(&self.image).chain(&self.backing);
        let broken = self
            .pool
            .first_fault(layers.map(String::as_str), self.format)?;
        // A blank image of a volume handed to a writer held data: one that lost its blocks
        // was emptied since, as `Pools::locked_volume` refuses it. Looked at again unless
        // `first_fault` found it missing or not a regular file: a qcow2 image with its magic
        // can still be an empty one made again (one more probe; no read once it has grown).
        let looked_again = match &broken {
            Some(b) => matches!(b.fault, LayerFault::Damaged(_)),
            None => true,
        };
        if self.backing.is_empty() && self.handed_to_writer && looked_again {
            if let Some(emptied) = self.pool.emptied(&self.image, self.format, self.capacity)? {
                return Ok(VolumeCondition::Abnormal(
                    emptied.message(&owner(), self.pool.name()),
                ));
            }
        }
        let Some(mut broken) = broken else {
            return Ok(VolumeCondition::Healthy);
        };
        // What `Pools::locked_volume` repairs before any use is not damaged (a header that
        // lost only its refcounts has its magic, and is healthy here); it repairs no image a
        // process holds open (`qcow2::repair_empty`), which the operations then refuse, nor one
        // of a volume handed to a writer.
        if let LayerFault::Damaged(found) = broken.fault {
            if self.backing.is_empty()
                && !self.handed_to_writer
                && found.lost_its_blocks(&broken.path, self.format, self.capacity)?
            {
                if !crate::pool::store::file_is_locked(&broken.path)? {
                    return Ok(VolumeCondition::RewrittenAtNextUse {
                        image: broken.path.display().to_string(),
                        pool: self.pool.name().to_string(),
                    });
                }
                broken.fault = LayerFault::HeldEmptied;
            }
        }
        Ok(VolumeCondition::Abnormal(
            broken.message(&owner(), self.pool.name()),
        ))
    }
}

fn summary_of(pool: &Pool, index: &Index, key: u64, v: &VolumeEntry) -> VolumeSummary {
    VolumeSummary {
        id: pool.volume_id(key),
        pool: pool.name().to_string(),
        format: v.format,
        capacity_bytes: v.capacity,
        fs_type: index.fs_type(v).map(str::to_string),
        content_source: v.content_source.as_deref().cloned(),
        accessible_topology: index.topology(v).clone(),
        root: index.root(v).clone(),
    }
}

/// The pools in id order (ids start with the pool name).
fn by_name(pools: &[Arc<Pool>]) -> Vec<Arc<Pool>> {
    let mut sorted = pools.to_vec();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    sorted
}

/// A page being filled: up to `max` entries, then the id of the first one that did not fit.
struct Page<E> {
    entries: Vec<E>,
    max: usize,
    next: String,
}

impl<E> Page<E> {
    fn new(max: usize) -> Self {
        Page {
            entries: Vec::new(),
            max,
            next: String::new(),
        }
    }

    /// Adds the entry with id `id`; false (and the id kept as the next token) when full.
    fn offer(&mut self, id: impl FnOnce() -> String, entry: impl FnOnce() -> E) -> bool {
        if self.entries.len() >= self.max {
            self.next = id();
            return false;
        }
        self.entries.push(entry());
        true
    }
}

/// Where a page starts in `pool`: `None` to skip the pool (it sorts before the token's).
fn start_in(pool: &Pool, token: Option<&(String, u64)>) -> Option<u64> {
    match token {
        None => Some(0),
        Some((p, k)) if p.as_str() == pool.name() => Some(*k),
        Some((p, _)) if pool.name() < p.as_str() => None,
        Some(_) => Some(0),
    }
}

impl Pools {
    /// One page of ListVolumes: up to `max` Ready volumes in id order from the first id at or
    /// after `start` ("" = the beginning), each with its condition, and the id to continue
    /// from ("" at the end). Reads the index and looks at the page's layers (a `stat` and a
    /// small read each, after the index is released): O(page).
    pub(crate) async fn list_page(
        &self,
        start: &str,
        max: usize,
    ) -> Result<(Vec<(VolumeSummary, VolumeCondition)>, String)> {
        let token = match start {
            "" => None,
            t => super::store::parse_id(super::store::Kind::Volume, t)?,
        };
        let pools = by_name(self.all());
        exec::blocking(move || {
            let mut page = Page::new(max);
            'pools: for pool in &pools {
                let Some(from) = start_in(pool, token.as_ref()) else {
                    continue;
                };
                let index = pool.store.index()?;
                for (key, v) in index.volumes_from(from) {
                    let fits = v.state != RecordState::Ready
                        || page.offer(
                            || pool.volume_id(key),
                            || (summary_of(pool, &index, key, v), Files::of(pool, key, v)),
                        );
                    if !fits {
                        break 'pools;
                    }
                }
            }
            let entries = page
                .entries
                .into_iter()
                .map(|(s, files)| Ok((s, files.condition()?)))
                .collect::<Result<_>>()?;
            Ok((entries, page.next))
        })
        .await
    }

    /// ControllerGetVolume: a Ready volume's summary and condition, from the index.
    pub(crate) async fn describe(&self, id: &VolumeId) -> Result<(VolumeSummary, VolumeCondition)> {
        let not_found = || Error::NotFound(format!("volume {id} does not exist"));
        let Some((pool, key)) = self.locate_volume(id) else {
            return Err(not_found());
        };
        let found = exec::blocking(move || {
            let index = pool.store.index()?;
            let Some(v) = index
                .find_volume(key)?
                .filter(|v| v.state == RecordState::Ready)
            else {
                return Ok(None);
            };
            let summary = summary_of(&pool, &index, key, v);
            let files = Files::of(&pool, key, v);
            drop(index);
            Ok(Some((summary, files.condition()?)))
        })
        .await?;
        found.ok_or_else(not_found)
    }

    /// One page of ListSnapshots: Ready snapshots in id order, filtered, from `start`.
    pub(crate) async fn snapshot_page(
        &self,
        filter: SnapshotFilter,
        start: &str,
        max: usize,
    ) -> Result<(Vec<SnapshotSummary>, String)> {
        let token = match start {
            "" => None,
            t => super::store::parse_id(super::store::Kind::Snapshot, t)?,
        };
        // Narrow the pools and keys the filter allows.
        let only_pool: Option<String>;
        let mut only_key: Option<u64> = None;
        let mut source_key: Option<u64> = None;
        if let Some(id) = &filter.snapshot_id {
            let Some(o) = ObjectId::parse_snapshot(id).ok().flatten() else {
                return Ok((Vec::new(), String::new()));
            };
            only_key = super::store::Kind::Snapshot.parse_file_key(&o.key);
            only_pool = Some(o.pool);
        } else if let Some(src) = &filter.source_volume_id {
            let Some(o) = ObjectId::parse_volume(src).ok().flatten() else {
                return Ok((Vec::new(), String::new()));
            };
            source_key = super::store::parse_key(&o.key);
            only_pool = Some(o.pool);
        } else {
            only_pool = None;
        }
        let pools: Vec<Arc<Pool>> = by_name(self.all())
            .into_iter()
            .filter(|p| only_pool.as_deref().is_none_or(|n| n == p.name()))
            .collect();
        let this = self.clone();
        exec::blocking(move || {
            let mut page = Page::new(max);
            // Members are listed once their group is Ready: one look per group.
            let mut groups: std::collections::HashMap<Box<str>, bool> = Default::default();
            'pools: for pool in &pools {
                let Some(from) = start_in(pool, token.as_ref()) else {
                    continue;
                };
                let index = pool.store.index()?;
                let keys: Box<dyn Iterator<Item = u64>> = match (only_key, source_key) {
                    (Some(k), _) => {
                        // An unreadable snapshot is not missing: no empty list for it.
                        index.readable(super::store::Kind::Snapshot, k)?;
                        Box::new(std::iter::once(k).filter(move |k| *k >= from))
                    }
                    (None, Some(src)) => {
                        Box::new(index.snapshots_of(src).filter(move |k| *k >= from))
                    }
                    (None, None) => Box::new(index.snapshots_from(from).map(|(k, _)| k)),
                };
                for key in keys {
                    let Some(s) = index.snapshot(key) else {
                        continue;
                    };
                    if s.state != RecordState::Ready
                        || filter
                            .source_volume_id
                            .as_deref()
                            .is_some_and(|src| *s.source != *src)
                    {
                        continue;
                    }
                    if let Some(g) = &s.group {
                        let visible = match groups.get(g) {
                            Some(v) => *v,
                            None => {
                                // A group of this pool is read from the index already held:
                                // taking its read lock again could deadlock behind a writer
                                // (a catch-up or a commit waiting for it).
                                let v = match this.locate_group(g)? {
                                    Some((gp, gk)) if Arc::ptr_eq(&gp, pool) => index
                                        .group(gk)
                                        .is_some_and(|e| e.state == RecordState::Ready),
                                    _ => this.member_visible(Some(g))?,
                                };
                                groups.insert(g.clone(), v);
                                v
                            }
                        };
                        if !visible {
                            continue;
                        }
                    }
                    let fits = page.offer(
                        || pool.snapshot_id(key),
                        || SnapshotSummary {
                            id: pool.snapshot_id(key),
                            source_volume_id: s.source.to_string(),
                            size_bytes: s.size,
                            created_at: s.created,
                            created_at_nanos: s.created_nanos,
                            ready_to_use: true,
                            group_snapshot_id: s.group.as_deref().map(str::to_string),
                        },
                    );
                    if !fits {
                        break 'pools;
                    }
                }
            }
            Ok((page.entries, page.next))
        })
        .await
    }

    /// Every Ready snapshot record of every pool, sorted by id, read from their files (for
    /// tools and tests; RPCs page through `snapshot_page`).
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let pools = by_name(self.all());
        let this = self.clone();
        exec::blocking(move || {
            let mut out = Vec::new();
            for pool in &pools {
                let keys: Vec<u64> = pool
                    .store
                    .index()?
                    .snapshots_from(0)
                    .filter(|(_, s)| s.state == RecordState::Ready)
                    .map(|(k, _)| k)
                    .collect();
                for key in keys {
                    let rec = pool
                        .store
                        .read::<SnapshotRecord>(key)?
                        .filter(|r| r.state == RecordState::Ready);
                    if let Some(r) = rec {
                        if this.member_visible(r.group_snapshot_id.as_deref())? {
                            out.push(r);
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
