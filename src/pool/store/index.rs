//! The in-memory index of one pool: a compact entry per record, the secondary maps that make
//! every lookup O(1) or O(log n) (names, snapshots by source volume), layer reference counts
//! and the provisioned bytes. It holds what listings and decisions need, not whole records:
//! at 100 000 volumes it must stay within a few tens of MiB.

use super::kinds::Kind;
use crate::ids;
use crate::model::{AccessType, ContentSource, ImageFormat};
use crate::pool::record::{
    FlattenJob, GroupSnapshotRecord, RecordState, SnapshotRecord, VolumeRecord,
};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU64;

/// A topology: segment key → value.
pub(crate) type Topology = BTreeMap<String, String>;

/// A layer file name in `images/`. The names this plugin makes (`<16 hex>[-<hex>].<format>`)
/// are held as numbers; anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Layer {
    Std {
        /// The key of the volume that made the layer.
        key: u64,
        stamp: Option<NonZeroU64>,
        raw: bool,
    },
    Other(Box<str>),
}

impl Layer {
    pub(crate) fn parse(name: &str) -> Layer {
        Self::parse_std(name).unwrap_or_else(|| Layer::Other(name.into()))
    }

    fn parse_std(name: &str) -> Option<Layer> {
        let (stem, raw) = match name.strip_suffix(".qcow2") {
            Some(s) => (s, false),
            None => (name.strip_suffix(".raw")?, true),
        };
        let (key, stamp) = match stem.split_once('-') {
            Some((k, s)) => (k, Some(s)),
            None => (stem, None),
        };
        let key = super::kinds::parse_key(key)?;
        let stamp = match stamp {
            None => None,
            Some(s) => {
                let n = NonZeroU64::new(u64::from_str_radix(s, 16).ok()?)?;
                // Only the canonical spelling (no leading zeros, lower case) round-trips.
                if format!("{n:x}") != s {
                    return None;
                }
                Some(n)
            }
        };
        Some(Layer::Std { key, stamp, raw })
    }

    /// The key of the volume a layer file this plugin made is named after
    /// (`<16 hex>[-<up to 32 hex>].(qcow2|raw)`); `None` for any other file, which is never
    /// removed.
    pub(crate) fn volume_key(&self) -> Option<u64> {
        let name = match self {
            Layer::Std { key, .. } => return Some(*key),
            Layer::Other(name) => name,
        };
        let stem = name
            .strip_suffix(".qcow2")
            .or_else(|| name.strip_suffix(".raw"))?;
        let hex =
            |s: &str| !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let (key, stamp) = match stem.split_once('-') {
            Some((k, s)) => (k, Some(s)),
            None => (stem, None),
        };
        if !stamp.is_none_or(|s| s.len() <= 32 && hex(s)) {
            return None;
        }
        super::kinds::parse_key(key)
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Std { key, stamp, raw } => {
                write!(f, "{key:016x}")?;
                if let Some(s) = stamp {
                    write!(f, "-{s:x}")?;
                }
                f.write_str(if *raw { ".raw" } else { ".qcow2" })
            }
            Layer::Other(name) => f.write_str(name),
        }
    }
}

fn layers<S: AsRef<str>>(names: &[S]) -> Box<[Layer]> {
    names.iter().map(|n| Layer::parse(n.as_ref())).collect()
}

/// What the index reads of a volume record: the record file's JSON, with the fields the index
/// does not keep skipped and strings borrowed from the file's bytes (start-up reads 100 000s).
#[derive(Debug, Deserialize)]
pub(crate) struct VolumeHead<'a> {
    /// The volume id the record names (its key must be the file's).
    #[serde(borrow)]
    pub(crate) id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    state: RecordState,
    format: ImageFormat,
    capacity_bytes: u64,
    #[serde(borrow)]
    pub(crate) image: Cow<'a, str>,
    #[serde(default, borrow)]
    capabilities: Vec<CapabilityHead<'a>>,
    #[serde(default)]
    content_source: Option<ContentSource>,
    #[serde(default)]
    accessible_topology: Topology,
    #[serde(default, borrow)]
    chain: ChainHead<'a>,
    #[serde(default, borrow)]
    parameters: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
    #[serde(default)]
    handed_to_writer: bool,
}

#[derive(Debug, Deserialize)]
struct CapabilityHead<'a> {
    #[serde(borrow)]
    access_type: AccessTypeHead<'a>,
}

/// `AccessType` read as a plain map (its serde form is internally tagged, which buffers).
#[derive(Debug, Deserialize)]
struct AccessTypeHead<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    fs_type: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
struct ChainHead<'a> {
    #[serde(default, borrow)]
    backing: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    freezing: Option<FreezingHead<'a>>,
}

#[derive(Debug, Deserialize)]
struct FreezingHead<'a> {
    #[serde(borrow)]
    overlay: Cow<'a, str>,
}

impl VolumeHead<'_> {
    /// The parameters the volume context repeats to the node (`params::ROOT_KEYS`).
    fn root(&self) -> Topology {
        crate::params::ROOT_KEYS
            .iter()
            .filter_map(|k| {
                self.parameters
                    .get(*k)
                    .map(|v| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// The file system of the first mount capability, as `VolumeRecord::fs_type`.
    fn fs_type(&self) -> Option<&str> {
        self.capabilities.iter().find_map(|c| {
            let a = &c.access_type;
            (a.kind == "mount")
                .then_some(a.fs_type.as_deref())
                .flatten()
                .filter(|f| !f.is_empty())
        })
    }
}

impl VolumeRecord {
    /// The index's view of this record.
    pub(crate) fn head(&self) -> VolumeHead<'_> {
        VolumeHead {
            id: Cow::Borrowed(&self.id),
            name: Cow::Borrowed(&self.name),
            state: self.state,
            format: self.format,
            capacity_bytes: self.capacity_bytes,
            image: Cow::Borrowed(&self.image),
            capabilities: self
                .capabilities
                .iter()
                .map(|c| CapabilityHead {
                    access_type: match &c.access_type {
                        AccessType::Block => AccessTypeHead {
                            kind: Cow::Borrowed("block"),
                            fs_type: None,
                        },
                        AccessType::Mount { fs_type, .. } => AccessTypeHead {
                            kind: Cow::Borrowed("mount"),
                            fs_type: Some(Cow::Borrowed(fs_type)),
                        },
                    },
                })
                .collect(),
            content_source: self.content_source.clone(),
            accessible_topology: self.accessible_topology.clone(),
            chain: ChainHead {
                backing: self
                    .chain
                    .backing
                    .iter()
                    .map(|b| Cow::Borrowed(b.as_str()))
                    .collect(),
                freezing: self.chain.freezing.as_ref().map(|f| FreezingHead {
                    overlay: Cow::Borrowed(&f.overlay),
                }),
            },
            parameters: self
                .parameters
                .iter()
                .filter(|(k, _)| crate::params::ROOT_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                .collect(),
            handed_to_writer: self.handed_to_writer,
        }
    }
}

/// What the index reads of a snapshot record.
#[derive(Debug, Deserialize)]
pub(crate) struct SnapshotHead<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    state: RecordState,
    #[serde(borrow)]
    source_volume_id: Cow<'a, str>,
    #[serde(borrow)]
    layer: Cow<'a, str>,
    #[serde(default, borrow)]
    backing: Vec<Cow<'a, str>>,
    size_bytes: u64,
    created_at: u64,
    #[serde(default)]
    created_at_nanos: u32,
    #[serde(default, borrow)]
    group_snapshot_id: Option<Cow<'a, str>>,
}

impl SnapshotRecord {
    /// The index's view of this record.
    pub(crate) fn head(&self) -> SnapshotHead<'_> {
        SnapshotHead {
            name: Cow::Borrowed(&self.name),
            state: self.state,
            source_volume_id: Cow::Borrowed(&self.source_volume_id),
            layer: Cow::Borrowed(&self.layer),
            backing: self
                .backing
                .iter()
                .map(|b| Cow::Borrowed(b.as_str()))
                .collect(),
            size_bytes: self.size_bytes,
            created_at: self.created_at,
            created_at_nanos: self.created_at_nanos,
            group_snapshot_id: self.group_snapshot_id.as_deref().map(Cow::Borrowed),
        }
    }
}

/// What the index reads of a group snapshot record.
#[derive(Debug, Deserialize)]
pub(crate) struct GroupHead<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    state: RecordState,
}

impl GroupSnapshotRecord {
    /// The index's view of this record.
    pub(crate) fn head(&self) -> GroupHead<'_> {
        GroupHead {
            name: Cow::Borrowed(&self.name),
            state: self.state,
        }
    }
}

/// What the index keeps of a volume record.
#[derive(Debug)]
pub(crate) struct VolumeEntry {
    /// Hash of the name (`ids::name_hash`); the record holds the name itself.
    pub name: u64,
    pub state: RecordState,
    pub format: ImageFormat,
    /// Index (1-based, 0 = none) into `Index::fs_types` (a byte: the fs types a record can
    /// name are few, see `model::FS_TYPES`; it leaves room for `handed_to_writer`).
    fs_type: u8,
    /// Index into `Index::topologies`.
    topology: u16,
    /// Index into `Index::topologies` of the parameters the volume context repeats.
    root: u16,
    pub capacity: u64,
    pub image: Layer,
    pub backing: Box<[Layer]>,
    /// The overlay of a layer switch in flight.
    pub overlay: Option<Box<Layer>>,
    pub content_source: Option<Box<ContentSource>>,
    /// The record's `handed_to_writer`.
    pub handed_to_writer: bool,
}

impl VolumeEntry {
    /// At rest: Ready, and no layer switch in flight.
    pub(crate) fn settled(&self) -> bool {
        self.state == RecordState::Ready && self.overlay.is_none()
    }

    pub(crate) fn depth(&self) -> usize {
        1 + self.backing.len()
    }

    fn layers(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.image)
            .chain(self.backing.iter())
            .chain(self.overlay.as_deref())
    }
}

/// What the index keeps of a snapshot record.
#[derive(Debug)]
pub(crate) struct SnapshotEntry {
    pub name: u64,
    pub state: RecordState,
    pub source: Box<str>,
    /// The key of the source volume, when `source` is one of our ids.
    source_key: Option<u64>,
    pub layer: Layer,
    pub backing: Box<[Layer]>,
    pub size: u64,
    pub created: u64,
    pub created_nanos: u32,
    /// The group snapshot this one is a member of (its id: the group may be in another pool).
    pub group: Option<Box<str>>,
}

impl SnapshotEntry {
    fn layers(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.layer).chain(self.backing.iter())
    }
}

/// What the index keeps of a group snapshot record (its members are snapshot entries).
#[derive(Debug)]
pub(crate) struct GroupEntry {
    pub name: u64,
    pub state: RecordState,
}

/// What the index keeps of a flattening job: the layers it holds.
#[derive(Debug)]
pub(crate) struct JobEntry {
    layers: Box<[Layer]>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    volumes: BTreeMap<u64, VolumeEntry>,
    snapshots: BTreeMap<u64, SnapshotEntry>,
    jobs: BTreeMap<u64, JobEntry>,
    groups: BTreeMap<u64, GroupEntry>,
    /// (name hash, key).
    volume_names: BTreeSet<(u64, u64)>,
    snapshot_names: BTreeSet<(u64, u64)>,
    group_names: BTreeSet<(u64, u64)>,
    /// (source volume key, snapshot key).
    by_source: BTreeSet<(u64, u64)>,
    /// How many times records name each layer.
    refs: HashMap<Layer, u32>,
    /// Sum of the sizes of volumes not being deleted.
    provisioned: u64,
    /// Records that exist but could not be read, with why (the error naming the file and
    /// what to do).
    unreadable: HashMap<(Kind, u64), Box<str>>,
    /// Layers whose count fell to zero in the last change.
    freed: Vec<Layer>,
    fs_types: Vec<Box<str>>,
    topologies: Vec<Topology>,
}

impl Index {
    fn add_refs<'a>(&mut self, layers: impl Iterator<Item = &'a Layer>) {
        for l in layers {
            *self.refs.entry(l.clone()).or_insert(0) += 1;
        }
    }

    fn drop_refs<'a>(&mut self, layers: impl Iterator<Item = &'a Layer>) {
        for l in layers {
            if let Some(n) = self.refs.get_mut(l) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(l);
                    self.freed.push(l.clone());
                }
            }
        }
    }

    /// The layers that no record names since the last call (names this plugin makes only).
    pub(crate) fn take_freed(&mut self) -> Vec<Layer> {
        let freed = std::mem::take(&mut self.freed);
        freed
            .into_iter()
            .filter(|l| l.volume_key().is_some() && !self.refs.contains_key(l))
            .collect()
    }

    fn intern_fs_type(&mut self, fs: Option<&str>) -> u8 {
        let Some(fs) = fs else { return 0 };
        let pos = match self.fs_types.iter().position(|f| &**f == fs) {
            Some(p) => p,
            None => {
                self.fs_types.push(fs.into());
                self.fs_types.len() - 1
            }
        };
        u8::try_from(pos + 1).unwrap_or(0)
    }

    fn intern_topology(&mut self, t: &Topology) -> u16 {
        let pos = match self.topologies.iter().position(|x| x == t) {
            Some(p) => p,
            None => {
                self.topologies.push(t.clone());
                self.topologies.len() - 1
            }
        };
        u16::try_from(pos).unwrap_or(0)
    }

    pub(crate) fn insert_volume(&mut self, key: u64, rec: &VolumeHead<'_>) {
        let fs_type = self.intern_fs_type(rec.fs_type());
        let topology = self.intern_topology(&rec.accessible_topology);
        let root = self.intern_topology(&rec.root());
        let entry = VolumeEntry {
            name: ids::name_hash(ids::VOLUME, &rec.name),
            state: rec.state,
            format: rec.format,
            fs_type,
            topology,
            root,
            capacity: rec.capacity_bytes,
            image: Layer::parse(&rec.image),
            backing: layers(&rec.chain.backing),
            overlay: rec
                .chain
                .freezing
                .as_ref()
                .map(|f| Box::new(Layer::parse(&f.overlay))),
            content_source: rec.content_source.clone().map(Box::new),
            handed_to_writer: rec.handed_to_writer,
        };
        // New references first: a layer the old entry named and the new one still names must
        // not pass through zero.
        self.add_refs(entry.layers());
        if self.volumes.contains_key(&key) {
            self.remove_volume(key);
        }
        self.volume_names.insert((entry.name, key));
        if entry.state != RecordState::Deleting {
            self.provisioned = self.provisioned.saturating_add(entry.capacity);
        }
        if !self.unreadable.is_empty() {
            self.unreadable.remove(&(Kind::Volume, key));
        }
        self.volumes.insert(key, entry);
    }

    pub(crate) fn remove_volume(&mut self, key: u64) {
        self.unreadable.remove(&(Kind::Volume, key));
        let Some(old) = self.volumes.remove(&key) else {
            return;
        };
        self.drop_refs(old.layers());
        self.volume_names.remove(&(old.name, key));
        if old.state != RecordState::Deleting {
            self.provisioned = self.provisioned.saturating_sub(old.capacity);
        }
    }

    pub(crate) fn insert_snapshot(&mut self, key: u64, rec: &SnapshotHead<'_>) {
        let source_key = ids::ObjectId::parse_volume(&rec.source_volume_id)
            .ok()
            .flatten()
            .and_then(|o| super::kinds::parse_key(&o.key));
        let entry = SnapshotEntry {
            name: ids::name_hash(ids::SNAPSHOT, &rec.name),
            state: rec.state,
            source: rec.source_volume_id.as_ref().into(),
            source_key,
            layer: Layer::parse(&rec.layer),
            backing: layers(&rec.backing),
            size: rec.size_bytes,
            created: rec.created_at,
            created_nanos: rec.created_at_nanos,
            group: rec.group_snapshot_id.as_deref().map(Into::into),
        };
        self.add_refs(entry.layers());
        if self.snapshots.contains_key(&key) {
            self.remove_snapshot(key);
        }
        self.snapshot_names.insert((entry.name, key));
        if let Some(src) = entry.source_key {
            self.by_source.insert((src, key));
        }
        if !self.unreadable.is_empty() {
            self.unreadable.remove(&(Kind::Snapshot, key));
        }
        self.snapshots.insert(key, entry);
    }

    pub(crate) fn remove_snapshot(&mut self, key: u64) {
        self.unreadable.remove(&(Kind::Snapshot, key));
        let Some(old) = self.snapshots.remove(&key) else {
            return;
        };
        self.drop_refs(old.layers());
        self.snapshot_names.remove(&(old.name, key));
        if let Some(src) = old.source_key {
            self.by_source.remove(&(src, key));
        }
    }

    pub(crate) fn insert_group(&mut self, key: u64, rec: &GroupHead<'_>) {
        self.remove_group(key);
        let entry = GroupEntry {
            name: ids::name_hash(ids::GROUP, &rec.name),
            state: rec.state,
        };
        self.group_names.insert((entry.name, key));
        self.groups.insert(key, entry);
    }

    pub(crate) fn remove_group(&mut self, key: u64) {
        self.unreadable.remove(&(Kind::Group, key));
        if let Some(old) = self.groups.remove(&key) {
            self.group_names.remove(&(old.name, key));
        }
    }

    pub(crate) fn insert_job(&mut self, key: u64, job: &FlattenJob) {
        let mut names = vec![job.image.clone(), job.layer.clone()];
        names.extend(job.source.iter().cloned());
        let entry = JobEntry {
            layers: layers(&names),
        };
        self.add_refs(entry.layers.iter());
        self.remove_job(key);
        self.unreadable.remove(&(Kind::Flatten, key));
        self.jobs.insert(key, entry);
    }

    pub(crate) fn remove_job(&mut self, key: u64) {
        self.unreadable.remove(&(Kind::Flatten, key));
        if let Some(old) = self.jobs.remove(&key) {
            self.drop_refs(old.layers.iter());
        }
    }

    /// Marks a record as existing but unreadable, for the reason `why` (its message names the
    /// file and what to do): lookups of it answer that ([`Index::readable`]) until it is
    /// read again.
    pub(crate) fn set_unreadable(&mut self, kind: Kind, key: u64, why: &crate::error::Error) {
        self.unreadable
            .insert((kind, key), why.to_string().into_boxed_str());
    }

    /// `Ok` unless the record `key` of `kind` exists but could not be read: then
    /// [`Error::UnreadableRecord`] with why and what to do. Free while every record is readable.
    ///
    /// [`Error::UnreadableRecord`]: crate::error::Error::UnreadableRecord
    pub(crate) fn readable(&self, kind: Kind, key: u64) -> crate::error::Result<()> {
        if self.unreadable.is_empty() {
            return Ok(());
        }
        match self.unreadable.get(&(kind, key)) {
            Some(why) => Err(crate::error::Error::UnreadableRecord(why.to_string())),
            None => Ok(()),
        }
    }

    /// The entry of volume `key`: `Ok(None)` when there is no such record,
    /// `Error::UnreadableRecord` when its record exists but could not be read. The lookup every
    /// operation naming a volume id goes through, so none answers "does not exist" (or a
    /// delete OK) for a volume whose record is only unreadable.
    pub(crate) fn find_volume(&self, key: u64) -> crate::error::Result<Option<&VolumeEntry>> {
        self.readable(Kind::Volume, key)?;
        Ok(self.volume(key))
    }

    /// `find_volume` for snapshot `key`.
    pub(crate) fn find_snapshot(&self, key: u64) -> crate::error::Result<Option<&SnapshotEntry>> {
        self.readable(Kind::Snapshot, key)?;
        Ok(self.snapshot(key))
    }

    /// `Ok` unless a record of `kind` is unreadable: then whether `name` is free cannot be told
    /// (the unreadable record may hold it), and the answer is `Error::UnreadableRecord` saying
    /// so, with the advice of the unreadable record with the lowest key. Free while every
    /// record is readable.
    pub(crate) fn names_known(&self, kind: Kind, name: &str) -> crate::error::Result<()> {
        if self.unreadable.is_empty() {
            return Ok(());
        }
        let mut of_kind = self.unreadable.iter().filter(|((k, _), _)| *k == kind);
        let Some(first) = of_kind.clone().min_by_key(|((_, key), _)| *key) else {
            return Ok(());
        };
        let more = of_kind.by_ref().count() - 1;
        let others = match more {
            0 => String::new(),
            n => format!(" (and {n} other unreadable {} record(s))", kind.noun()),
        };
        let noun = kind.noun();
        Err(crate::error::Error::UnreadableRecord(format!(
            "cannot tell whether a {noun} named {name:?} exists while a {noun} record of the \
             pool is unreadable: it may hold that name{others}. {}",
            first.1
        )))
    }

    /// Groups of keys of `kind` (volumes or snapshots) whose names hash alike: records that
    /// may carry the same name (what mending a record can leave). Empty for other kinds.
    pub(crate) fn same_name_hash(&self, kind: Kind) -> Vec<Vec<u64>> {
        let names = match kind {
            Kind::Volume => &self.volume_names,
            Kind::Snapshot => &self.snapshot_names,
            Kind::Flatten | Kind::Group => return Vec::new(),
        };
        let (mut out, mut run, mut run_hash) = (Vec::new(), Vec::new(), None);
        for &(hash, key) in names {
            if run_hash != Some(hash) {
                if run.len() > 1 {
                    out.push(std::mem::take(&mut run));
                }
                run.clear();
                run_hash = Some(hash);
            }
            run.push(key);
        }
        if run.len() > 1 {
            out.push(run);
        }
        out
    }

    /// How many records exist but could not be read.
    pub(crate) fn unreadable(&self) -> usize {
        self.unreadable.len()
    }

    /// Every record that exists but could not be read (kind and key).
    pub(crate) fn unreadable_keys(&self) -> Vec<(Kind, u64)> {
        self.unreadable.keys().copied().collect()
    }

    /// Keys of the records of `kind` that exist but could not be read.
    pub(crate) fn unreadable_of(&self, kind: Kind) -> Vec<u64> {
        self.unreadable
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| *key)
            .collect()
    }

    /// Frees what start-up growth left over.
    pub(crate) fn shrink(&mut self) {
        self.refs.shrink_to_fit();
        self.freed.shrink_to_fit();
    }

    // ---- queries ----

    pub(crate) fn volume(&self, key: u64) -> Option<&VolumeEntry> {
        self.volumes.get(&key)
    }

    pub(crate) fn snapshot(&self, key: u64) -> Option<&SnapshotEntry> {
        self.snapshots.get(&key)
    }

    pub(crate) fn job(&self, key: u64) -> Option<&JobEntry> {
        self.jobs.get(&key)
    }

    pub(crate) fn group(&self, key: u64) -> Option<&GroupEntry> {
        self.groups.get(&key)
    }

    /// Keys of the group snapshots whose name has this hash.
    pub(crate) fn groups_named(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        self.group_names
            .range((hash, 0)..=(hash, u64::MAX))
            .map(|(_, k)| *k)
    }

    /// Group snapshots in key order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (u64, &GroupEntry)> {
        self.groups.iter().map(|(k, v)| (*k, v))
    }

    /// Keys of the volumes whose name has this hash (almost always at most one).
    pub(crate) fn volumes_named(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        self.volume_names
            .range((hash, 0)..=(hash, u64::MAX))
            .map(|(_, k)| *k)
    }

    pub(crate) fn snapshots_named(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        self.snapshot_names
            .range((hash, 0)..=(hash, u64::MAX))
            .map(|(_, k)| *k)
    }

    /// Keys of the snapshots taken of the volume with key `source`, in key order.
    pub(crate) fn snapshots_of(&self, source: u64) -> impl Iterator<Item = u64> + '_ {
        self.by_source
            .range((source, 0)..=(source, u64::MAX))
            .map(|(_, k)| *k)
    }

    /// Volumes in key order, from `start` on.
    pub(crate) fn volumes_from(&self, start: u64) -> impl Iterator<Item = (u64, &VolumeEntry)> {
        self.volumes.range(start..).map(|(k, v)| (*k, v))
    }

    /// Snapshots in key order, from `start` on.
    pub(crate) fn snapshots_from(&self, start: u64) -> impl Iterator<Item = (u64, &SnapshotEntry)> {
        self.snapshots.range(start..).map(|(k, v)| (*k, v))
    }

    pub(crate) fn jobs(&self) -> impl Iterator<Item = (u64, &JobEntry)> {
        self.jobs.iter().map(|(k, v)| (*k, v))
    }

    pub(crate) fn is_referenced(&self, layer: &Layer) -> bool {
        self.refs.contains_key(layer)
    }

    /// Sum of the sizes of the volumes not being deleted.
    pub(crate) fn provisioned(&self) -> u64 {
        self.provisioned
    }

    /// How many volumes are not being deleted.
    pub(crate) fn volume_count(&self) -> usize {
        self.volumes
            .values()
            .filter(|v| v.state != RecordState::Deleting)
            .count()
    }

    pub(crate) fn fs_type(&self, v: &VolumeEntry) -> Option<&str> {
        (v.fs_type as usize)
            .checked_sub(1)
            .and_then(|i| self.fs_types.get(i))
            .map(|s| &**s)
    }

    pub(crate) fn topology(&self, v: &VolumeEntry) -> &Topology {
        static EMPTY: Topology = BTreeMap::new();
        self.topologies.get(v.topology as usize).unwrap_or(&EMPTY)
    }

    /// The parameters of `v` the volume context repeats (`params::ROOT_KEYS`).
    pub(crate) fn root(&self, v: &VolumeEntry) -> &Topology {
        static EMPTY: Topology = BTreeMap::new();
        self.topologies.get(v.root as usize).unwrap_or(&EMPTY)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::pool::record::{Chain, SCHEMA};

    pub(in crate::pool::store) fn vol(
        key: u64,
        name: &str,
        image: &str,
        backing: &[&str],
    ) -> VolumeRecord {
        VolumeRecord {
            schema: SCHEMA,
            id: format!("p.{key:016x}"),
            name: name.into(),
            pool: "p".into(),
            state: RecordState::Ready,
            format: ImageFormat::Qcow2,
            capacity_bytes: 1 << 20,
            image: image.into(),
            capabilities: vec![],
            parameters: Default::default(),
            mutable_parameters: Default::default(),
            disk: Default::default(),
            content_source: None,
            accessible_topology: Default::default(),
            created_at: 0,
            chain: Chain {
                backing: backing.iter().map(|s| s.to_string()).collect(),
                freezing: None,
            },
            handed_to_writer: false,
        }
    }

    #[test]
    fn an_unreadable_record_answers_its_advice_and_blocks_names_of_its_kind() {
        let mut index = Index::default();
        index.insert_volume(1, &vol(1, "a", "a.qcow2", &[]).head());
        assert!(index.names_known(Kind::Volume, "x").is_ok());
        assert!(index.find_volume(2).unwrap().is_none());
        let why = crate::error::Error::UnreadableRecord("record /p/volumes/2.json: mend".into());
        index.set_unreadable(Kind::Volume, 2, &why);
        let err = index.find_volume(2).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("/p/volumes/2.json"), "{err}");
        assert!(index.find_volume(1).unwrap().is_some());
        assert!(index.find_snapshot(2).unwrap().is_none(), "another kind");
        let err = index.names_known(Kind::Volume, "b").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("/p/volumes/2.json"), "{err}");
        assert!(index.names_known(Kind::Snapshot, "x").is_ok());
        // Read again (mended): known, names free again.
        index.insert_volume(2, &vol(2, "b", "b.qcow2", &[]).head());
        assert!(index.find_volume(2).unwrap().is_some());
        assert!(index.names_known(Kind::Volume, "x").is_ok());
    }

    #[test]
    fn records_whose_names_hash_alike_are_grouped() {
        let mut index = Index::default();
        for (key, name) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a"), (6, "c")] {
            index.insert_volume(key, &vol(key, name, &format!("{key}.qcow2"), &[]).head());
        }
        let mut groups = index.same_name_hash(Kind::Volume);
        groups.sort();
        assert_eq!(groups, vec![vec![1, 3, 5], vec![4, 6]]);
        assert!(index.same_name_hash(Kind::Snapshot).is_empty());
    }

    #[test]
    fn layer_names_round_trip_and_only_ours_are_std() {
        for name in [
            "0123456789abcdef.qcow2",
            "0123456789abcdef.raw",
            "0123456789abcdef-17f3a2b4c5d6e7f8.qcow2",
            "0123456789abcdef-1.qcow2",
        ] {
            let l = Layer::parse(name);
            assert!(matches!(l, Layer::Std { .. }), "{name}");
            assert_eq!(l.to_string(), name);
        }
        for name in [
            "notes.txt",
            "0123456789abcdef-01.qcow2",
            "0123456789abcdef-0.qcow2",
            "0123456789ABCDEF.qcow2",
            "0123456789abcdef-123456789abcdef0123.qcow2",
        ] {
            let l = Layer::parse(name);
            assert!(matches!(l, Layer::Other(_)), "{name}");
            assert_eq!(l.to_string(), name);
        }
    }

    #[test]
    fn references_are_counted_and_freed_once() {
        let mut ix = Index::default();
        let a = "000000000000000a.qcow2";
        let b = "000000000000000b.qcow2";
        ix.insert_volume(1, &vol(1, "one", a, &[]).head());
        // A freeze: the volume continues in b, backed by a. Nothing is freed on the way.
        ix.insert_volume(1, &vol(1, "one", b, &[a]).head());
        assert!(ix.take_freed().is_empty());
        ix.insert_volume(2, &vol(2, "two", "000000000000000c.qcow2", &[a]).head());
        ix.remove_volume(1);
        assert_eq!(ix.take_freed(), vec![Layer::parse(b)]);
        ix.remove_volume(2);
        let mut freed: Vec<String> = ix.take_freed().iter().map(|l| l.to_string()).collect();
        freed.sort();
        assert_eq!(freed, vec![a.to_string(), "000000000000000c.qcow2".into()]);
        assert_eq!(ix.provisioned(), 0);
    }

    #[test]
    fn names_find_keys_and_follow_renames_of_state() {
        let mut ix = Index::default();
        ix.insert_volume(7, &vol(7, "data", "0000000000000007.qcow2", &[]).head());
        let h = ids::name_hash(ids::VOLUME, "data");
        assert_eq!(ix.volumes_named(h).collect::<Vec<_>>(), vec![7]);
        ix.remove_volume(7);
        assert_eq!(ix.volumes_named(h).count(), 0);
    }

    #[test]
    fn the_writer_mark_reaches_the_entry_and_old_records_lack_it() {
        let mut ix = Index::default();
        let mut rec = vol(7, "data", "0000000000000007.qcow2", &[]);
        let old = serde_json::to_vec(&rec).unwrap();
        assert!(!String::from_utf8_lossy(&old).contains("handed_to_writer"));
        Kind::Volume
            .insert_bytes(&mut ix, std::path::Path::new("/p"), 7, &old)
            .unwrap();
        assert!(!ix.volume(7).unwrap().handed_to_writer);
        rec.handed_to_writer = true;
        let marked = serde_json::to_vec(&rec).unwrap();
        Kind::Volume
            .insert_bytes(&mut ix, std::path::Path::new("/p"), 7, &marked)
            .unwrap();
        assert!(ix.volume(7).unwrap().handed_to_writer);
        let back: VolumeRecord = serde_json::from_slice(&marked).unwrap();
        assert_eq!(back, rec);
        ix.insert_volume(8, &vol(8, "other", "0000000000000008.qcow2", &[]).head());
        assert!(!ix.volume(8).unwrap().handed_to_writer);
    }
}
