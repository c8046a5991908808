//! The volume lifecycle across all configured pools: create (idempotent by name), delete,
//! offline expansion and capacity, and the per-volume lock every operation on a volume holds.

use super::layers::{LayerContext, Maintenance};
use super::record::{now_secs, Chain, RecordState, VolumeRecord, SCHEMA};
use super::store::{Index, Kind, Layer, ObjectLock, Record, Slot};
use super::{qcow2, qemu_img, Pool};
use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::ids::{self, VolumeId};
use crate::model::{Capability, ContentSource, ImageFormat};
use crate::params::VolumeParams;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How often a request waiting out a background step on its volume tries the lock again.
const MAINTENANCE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

pub(crate) const MIB: u64 = 1 << 20;
/// The largest volume: qcow2 with 64 KiB clusters stops at 2 PiB, and sizes near 2^63 overflow
/// QEMU's arithmetic, so anything above 1 PiB is OUT_OF_RANGE up front.
pub(super) const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// A topology: segment key → value.
pub(super) type Topology = BTreeMap<String, String>;

/// CSI accessibility requirements: which topology segments a new volume must or should be in.
#[derive(Debug, Clone, Default)]
pub struct TopologyRequirement {
    /// The volume must be accessible from one of these.
    pub requisite: Vec<Topology>,
    /// Prefer these, in order.
    pub preferred: Vec<Topology>,
}

/// A CreateVolume request, validated by the caller.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    /// The CSI volume name (idempotency key).
    pub name: String,
    /// At least this many bytes (0: the default size).
    pub required_bytes: u64,
    /// At most this many bytes (0: no limit).
    pub limit_bytes: u64,
    /// The capabilities the volume must support.
    pub capabilities: Vec<Capability>,
    /// The CreateVolume parameters (pool, bus, QoS, …).
    pub parameters: BTreeMap<String, String>,
    /// A snapshot or volume to start from.
    pub content_source: Option<ContentSource>,
    /// Where the volume must be accessible.
    pub topology: TopologyRequirement,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CapacityQuery {
    pub(crate) parameters: BTreeMap<String, String>,
    pub(crate) topology: Option<Topology>,
    /// The capabilities the volume would need (an xfs file system has a minimum size).
    pub(crate) capabilities: Vec<Capability>,
}

/// The lock of one volume (see `store`: it excludes every other operation on the volume, in
/// this process and in others sharing the pool). Operations that change a volume take it.
#[derive(Clone)]
pub(crate) struct VolumeLock {
    pub(super) pool: Arc<Pool>,
    pub(super) key: u64,
    id: VolumeId,
    pub(super) held: ObjectLock,
    existed: bool,
}

impl VolumeLock {
    /// Whether the volume existed (Ready) when the lock was taken; while the lock is held
    /// only its holder changes that.
    pub(crate) fn existed(&self) -> bool {
        self.existed
    }

    /// The id of the locked volume.
    pub(crate) fn id(&self) -> &VolumeId {
        &self.id
    }
}

impl std::fmt::Debug for VolumeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeLock({})", self.id)
    }
}

/// All pools of this controller.
#[derive(Debug, Clone)]
pub struct Pools {
    pools: Arc<Vec<Arc<Pool>>>,
    default_size: u64,
    /// Snapshots, clones and chain flattening (see `layers`).
    pub(super) layers: LayerContext,
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// The size a volume gets: the requirement (or the default) rounded up to 1 MiB, within limit.
pub(super) fn size_for(required: u64, limit: u64, default_size: u64) -> Result<u64> {
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let mut size = if required == 0 {
        if limit > 0 {
            default_size.min(limit)
        } else {
            default_size
        }
    } else {
        required
    };
    if size > MAX_VOLUME_BYTES {
        return Err(Error::OutOfRange(format!(
            "{size} bytes is more than the largest volume this plugin makes ({MAX_VOLUME_BYTES} \
             bytes, 1 PiB)"
        )));
    }
    size = round_up(size.max(1), MIB);
    if limit > 0 && size > limit {
        // Rounding overshot the limit: round down instead if that still meets the requirement.
        let down = limit / MIB * MIB;
        if down >= required.max(1) && down > 0 {
            size = down;
        } else {
            return Err(Error::OutOfRange(format!(
                "no size that is a multiple of 1 MiB lies between required_bytes {required} and \
                 limit_bytes {limit}"
            )));
        }
    }
    Ok(size)
}

/// What GetCapacity reports for the pools that match its query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Bytes a new volume may still take in the best pool (`Pools::available`).
    pub(crate) available: u64,
    /// The largest `required_bytes` a CreateVolume with the same parameters and capabilities
    /// would accept (a multiple of 1 MiB; 0: none fits).
    pub(crate) maximum_volume_size: u64,
    /// The smallest volume with those capabilities (1 MiB; an xfs file system's minimum).
    pub(crate) minimum_volume_size: u64,
}

/// Why a pool cannot take a new volume.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// More than the pool's cap: no pool state would make it fit (OUT_OF_RANGE).
    TooBig(String),
    /// No room now (RESOURCE_EXHAUSTED).
    NoRoom(String),
}

/// Whether a pool configured as `cfg`, with `free` bytes free on its file system and
/// `provisioned` bytes of volumes (read only when it has a cap), takes a new volume of `size`
/// bytes; `None`: it does.
pub(super) fn refusal(cfg: &PoolConfig, size: u64, free: u64, provisioned: u64) -> Option<Refusal> {
    let name = &cfg.name;
    if let Some(cap) = cfg.capacity_bytes {
        if size > cap {
            return Some(Refusal::TooBig(format!(
                "pool {name} is capped at {cap} bytes"
            )));
        }
        if provisioned.saturating_add(size) > cap {
            return Some(Refusal::NoRoom(format!(
                "pool {name} has {} of {cap} bytes left",
                cap.saturating_sub(provisioned)
            )));
        }
    }
    if free < MIB || (!cfg.overcommit && size > free) {
        return Some(Refusal::NoRoom(format!(
            "pool {name} has {free} bytes free"
        )));
    }
    None
}

/// The largest `required_bytes` that CreateVolume accepts in a pool configured as `cfg`, with
/// `free` bytes free on its file system and `provisioned` bytes of volumes: the rules of
/// `refusal` and `size_for` (no volume when less than 1 MiB is free; within the
/// pool's cap and what its volumes leave of it; within the free space without overcommit;
/// at most `MAX_VOLUME_BYTES`), rounded down to 1 MiB since a size is rounded up to it.
pub(super) fn largest_volume(cfg: &PoolConfig, free: u64, provisioned: u64) -> u64 {
    if free < MIB {
        return 0;
    }
    let mut max = MAX_VOLUME_BYTES;
    if let Some(cap) = cfg.capacity_bytes {
        max = max.min(cap.saturating_sub(provisioned));
    }
    if !cfg.overcommit {
        max = max.min(free);
    }
    max / MIB * MIB
}

/// The smallest size a new volume with these capabilities may have: what the file system of
/// its mount capabilities needs (xfs: 300 MiB, `node::fs::XFS_MIN_BYTES`; the node would
/// refuse to format anything smaller). A smaller `required_bytes` is rounded up to it (the
/// spec only asks for "at least" required_bytes); a `limit_bytes` below it is OUT_OF_RANGE.
/// Returns the minimum (0: none).
pub(super) fn fs_minimum(req: &CreateVolume) -> Result<u64> {
    let min = smallest_for(&req.capabilities);
    if min == 0 {
        return Ok(0);
    }
    if req.limit_bytes > 0 && req.limit_bytes < min {
        return Err(Error::OutOfRange(format!(
            "limit_bytes {} is below {} MiB, the smallest xfs file system; allow at least \
             {} bytes, or use ext4",
            req.limit_bytes,
            min >> 20,
            min
        )));
    }
    Ok(min)
}

/// The smallest volume that can carry `capabilities` (bytes; 0 when any size can): an xfs
/// file system needs `node::fs::XFS_MIN_BYTES`.
pub(super) fn smallest_for(capabilities: &[crate::model::Capability]) -> u64 {
    let xfs = capabilities.iter().any(|c| {
        matches!(&c.access_type, crate::model::AccessType::Mount { fs_type, .. } if fs_type == "xfs")
    });
    if xfs {
        crate::node::fs::XFS_MIN_BYTES
    } else {
        0
    }
}

impl Pools {
    /// Opens every pool (creating directories, reading the records, recovering from crashes).
    pub async fn open(configs: Vec<PoolConfig>, default_size: u64) -> Result<Pools> {
        let pools = exec::blocking(move || {
            let pools = configs
                .into_iter()
                .map(|c| Pool::open(c).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            super::store::release_free_memory();
            Ok(pools)
        })
        .await?;
        let pools = Pools {
            pools: Arc::new(pools),
            default_size,
            layers: LayerContext::default(),
        };
        pools.recover_groups().await?;
        Ok(pools)
    }

    pub(crate) fn all(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// The pool named `name`, if configured.
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name() == name)
    }

    /// The pool and key of volume `id`; `None` when its pool is not configured here.
    pub(super) fn locate_volume(&self, id: &VolumeId) -> Option<(Arc<Pool>, u64)> {
        let key = super::store::parse_key(id.key())?;
        self.get(id.pool()).map(|p| (p.clone(), key))
    }

    /// The pool and key of the object of `kind` that `id` names; `Ok(None)` when it cannot be
    /// one of ours or its pool is not configured here; INVALID_ARGUMENT for an unsafe id.
    pub(super) fn locate(&self, kind: Kind, id: &str) -> Result<Option<(Arc<Pool>, u64)>> {
        let Some((pool, key)) = super::store::parse_id(kind, id)? else {
            return Ok(None);
        };
        Ok(self.get(&pool).map(|p| (p.clone(), key)))
    }

    /// The volume id of a record or request field `field` that must name a volume of ours:
    /// INVALID_ARGUMENT when unsafe, NOT_FOUND (`missing`) when it cannot be one of ours.
    pub(super) fn own_volume_id(
        field: &str,
        id: &str,
        missing: impl FnOnce() -> Error,
    ) -> Result<VolumeId> {
        VolumeId::parse(field, id)?.ok_or_else(missing)
    }

    /// Takes the lock of a volume: ABORTED while another operation (of any process sharing
    /// the pool) holds it, `Ok(None)` when its pool is not configured here. Finishes or
    /// undoes a change to the volume that a crashed process left half done. A brief step of
    /// this process's background flattener on the volume is waited out (bounded), not
    /// answered ABORTED: no operation of the CO is pending on the volume.
    pub(crate) async fn lock_volume(&self, id: &VolumeId) -> Result<Option<VolumeLock>> {
        self.lock_volume_waiting(id, 0).await
    }

    /// `lock_volume` for a brief step that marked the volume itself (`Maintenance::mark`,
    /// before calling): it waits for the other marked steps, not for its own mark.
    pub(super) async fn lock_volume_marked(&self, id: &VolumeId) -> Result<Option<VolumeLock>> {
        self.lock_volume_waiting(id, 1).await
    }

    /// `lock_volume`, waiting while more than `own` brief steps have the volume marked.
    async fn lock_volume_waiting(&self, id: &VolumeId, own: usize) -> Result<Option<VolumeLock>> {
        let started = tokio::time::Instant::now();
        loop {
            let (pools, vid) = (self.clone(), id.clone());
            let res = exec::blocking(move || pools.lock_volume_blocking(&vid)).await;
            match res {
                Err(Error::Aborted(_))
                    if started.elapsed() < Maintenance::WAIT
                        && self.locate_volume(id).is_some_and(|(pool, key)| {
                            self.layers.maintenance.marks(&pool.volume_id(key)) > own
                        }) =>
                {
                    tokio::time::sleep(MAINTENANCE_POLL).await
                }
                res => return res,
            }
        }
    }

    /// `lock_volume`, blocking.
    pub(super) fn lock_volume_blocking(&self, id: &VolumeId) -> Result<Option<VolumeLock>> {
        let Some((pool, key)) = self.locate_volume(id) else {
            return Ok(None);
        };
        let held = pool
            .store
            .lock(Slot::Volume(key), &|| format!("volume {id}"))?;
        pool.settle_volume(key)?;
        let existed = pool
            .store
            .index()?
            .volume(key)
            .is_some_and(|v| v.state == RecordState::Ready);
        Ok(Some(VolumeLock {
            pool,
            key,
            id: id.clone(),
            held,
            existed,
        }))
    }

    /// Takes the lock of a name in every pool (a name is unique across pools).
    pub(super) async fn lock_name(&self, slot: Slot, what: String) -> Result<Vec<ObjectLock>> {
        let pools = self.clone();
        exec::blocking(move || pools.lock_name_blocking(slot, &what)).await
    }

    /// `lock_name`, blocking.
    fn lock_name_blocking(&self, slot: Slot, what: &str) -> Result<Vec<ObjectLock>> {
        self.pools
            .iter()
            .map(|p| p.store.lock(slot, &|| what.to_string()))
            .collect()
    }

    /// Looks a volume up by its id (index, then its record file). `Ok(None)` when it does
    /// not exist (or is not Ready); INVALID_ARGUMENT for an unsafe id.
    pub async fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        match VolumeId::parse("volume id", id)? {
            Some(id) => self.volume_by_id(&id).await,
            None => Ok(None),
        }
    }

    /// `volume`, for a parsed id.
    async fn volume_by_id(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        let Some((pool, key)) = self.locate_volume(id) else {
            return Ok(None);
        };
        exec::blocking(move || pool.ready_volume(key)).await
    }

    /// Like `volume`, but NOT_FOUND when absent.
    pub(crate) async fn require_volume(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.volume_by_id(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    /// `locked_volume` of a volume named as the source of another operation: its NOT_FOUND
    /// becomes `missing()` (which names the request's field); other errors pass unchanged.
    pub(super) async fn locked_source(
        &self,
        lock: &VolumeLock,
        missing: impl FnOnce() -> Error,
    ) -> Result<VolumeRecord> {
        self.locked_volume(lock).await.map_err(|e| match e {
            Error::NotFound(_) => missing(),
            e => e,
        })
    }

    /// The record of a locked volume; NOT_FOUND when it does not exist. A blank volume's
    /// image that a crash of the machine left without its blocks is written again first
    /// (`qcow2::repair_empty`), and an image that is missing or damaged (`check_images`) is
    /// FAILED_PRECONDITION before anything is done with it: every operation that uses a
    /// volume's image takes it here.
    pub(crate) async fn locked_volume(&self, lock: &VolumeLock) -> Result<VolumeRecord> {
        let (pool, key) = (lock.pool.clone(), lock.key);
        exec::blocking(move || {
            let Some(rec) = pool.ready_volume(key)? else {
                return Ok(None);
            };
            pool.check_images(&rec)?;
            Ok(Some(rec))
        })
        .await?
        .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", lock.id)))
    }

    /// The absolute path of a volume's active image.
    pub(crate) fn image_path(&self, rec: &VolumeRecord) -> Result<std::path::PathBuf> {
        let pool = self
            .get(&rec.pool)
            .ok_or_else(|| Error::internal(format!("pool {} is not configured", rec.pool)))?;
        Ok(pool.image_path(&rec.image))
    }

    /// Sum of the virtual sizes of a pool's volumes (from the index).
    fn provisioned(pool: &Pool) -> Result<u64> {
        Ok(pool.usage()?.1)
    }

    /// Bytes a new volume may still take in `pool`: what the cap leaves (thin provisioning)
    /// or the free space, and never more than the free space without overcommit.
    fn available(cfg: &PoolConfig, free: u64, provisioned: u64) -> u64 {
        let avail = match cfg.capacity_bytes {
            Some(cap) => cap.saturating_sub(provisioned),
            None => free,
        };
        if cfg.overcommit {
            avail
        } else {
            avail.min(free)
        }
    }

    /// GetCapacity: what the pools matching the query offer a new volume. The parameters are
    /// checked as CreateVolume checks them (an unknown `pool` is INVALID_ARGUMENT).
    pub(crate) async fn capacity(&self, q: CapacityQuery) -> Result<Capacity> {
        let params = VolumeParams::parse(&q.parameters)?;
        let named = params
            .pool
            .as_deref()
            .map(|n| self.named_pool(n))
            .transpose()?;
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .iter()
            .filter(|p| named.is_none_or(|n| Arc::ptr_eq(n, p)))
            .filter(|p| {
                q.topology
                    .as_ref()
                    .is_none_or(|t| p.config().accessible_from(t))
            })
            .cloned()
            .collect();
        // What CreateVolume would accept with these capabilities: an xfs volume is at least
        // its file system's minimum, so a largest size below it is none at all.
        let smallest = smallest_for(&q.capabilities).max(MIB);
        let found = exec::blocking(move || {
            candidates.iter().try_fold(Capacity::default(), |best, p| {
                let free = p.free_bytes()?;
                let provisioned = Self::provisioned(p)?;
                Ok(Capacity {
                    available: best
                        .available
                        .max(Self::available(p.config(), free, provisioned)),
                    maximum_volume_size: best.maximum_volume_size.max(largest_volume(
                        p.config(),
                        free,
                        provisioned,
                    )),
                    minimum_volume_size: smallest,
                })
            })
        })
        .await?;
        Ok(Capacity {
            maximum_volume_size: match found.maximum_volume_size {
                largest if largest < smallest => 0,
                largest => largest,
            },
            minimum_volume_size: smallest,
            ..found
        })
    }

    /// The pool named `name` (a request's `pool` parameter): INVALID_ARGUMENT naming the
    /// configured pools when there is none.
    fn named_pool(&self, name: &str) -> Result<&Arc<Pool>> {
        self.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.pools.iter().map(|p| p.name()).collect();
            Error::invalid(format!(
                "pool {name:?} is not configured; configured pools: {}",
                names.join(", ")
            ))
        })
    }

    /// CreateVolume. Idempotent by name: the name's lock (in every pool) is held while its
    /// volume is looked up and, if there is none, made under a new id. A new empty volume is
    /// made in one blocking call (no handoffs between threads on the hot path).
    pub async fn create(&self, req: CreateVolume) -> Result<VolumeRecord> {
        ids::check_name("volume name", &req.name)?;
        let params = VolumeParams::parse(&req.parameters)?;
        if req.capabilities.is_empty() {
            return Err(Error::invalid("volume_capabilities is required"));
        }
        // OUT_OF_RANGE before any lookup: a file system's minimum, and a range no volume can
        // satisfy, whether or not the name exists (not ALREADY_EXISTS for a repeat).
        fs_minimum(&req)?;
        size_for(req.required_bytes, req.limit_bytes, self.default_size)?;
        let hash = ids::name_hash(ids::VOLUME, &req.name);
        let what = format!("the volume named {:?}", req.name);
        let Some(source) = req.content_source.clone() else {
            let pools = self.clone();
            return exec::blocking(move || {
                let _name = pools.lock_name_blocking(Slot::VolumeName(hash), &what)?;
                if let Some(existing) = pools.existing_volume(&req, &params)? {
                    return Ok(existing);
                }
                pools.create_blank(&req, &params)
            })
            .await;
        };
        let _name = self.lock_name(Slot::VolumeName(hash), what).await?;
        let existing = {
            let (pools, r, p) = (self.clone(), req.clone(), params.clone());
            exec::blocking(move || pools.existing_volume(&r, &p)).await?
        };
        if let Some(existing) = existing {
            return Ok(existing);
        }
        self.create_from_source(&req, &params, &source).await
    }

    /// The volume a repeated CreateVolume names, if it exists and matches the request;
    /// ALREADY_EXISTS if it does not match. A half-made volume of an earlier version is
    /// discarded (then `None`). The caller holds the name's lock. Blocking.
    fn existing_volume(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
    ) -> Result<Option<VolumeRecord>> {
        let Some(existing) = self.find_by_name(&req.name)? else {
            return Ok(None);
        };
        let bad = || Error::internal(format!("volume id {} does not parse", existing.id));
        let id = Self::own_volume_id("volume id", &existing.id, bad)?;
        let lock = self.lock_volume_blocking(&id)?.ok_or_else(bad)?;
        // Locking settles the volume: read it again.
        let Some(existing) = lock.pool.read_volume(lock.key)? else {
            return Ok(None);
        };
        match existing.state {
            RecordState::Ready => {
                self.check_compatible(&existing, req, params)?;
                Ok(Some(existing))
            }
            RecordState::Creating | RecordState::Deleting => {
                discard(&lock)?;
                Ok(None)
            }
        }
    }

    /// The record (any state) of the volume named `name`, in any pool (a name is unique
    /// across pools). When no readable record has it but a volume record of some pool is
    /// unreadable, the name cannot be told free: `Error::UnreadableRecord` with that record's
    /// advice, not `None` (a second volume of the name would appear once it is mended).
    /// Blocking.
    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        let mut unknown = None;
        for pool in self.pools.iter() {
            match pool.volume_named(name)? {
                Named::Found(rec) => return Ok(Some(rec)),
                Named::Unknown(e) => unknown = unknown.or(Some(e)),
                Named::Free => {}
            }
        }
        unknown.map_or(Ok(None), Err)
    }

    /// A new empty volume: choose the pool, write the image header, commit the record.
    /// Blocking.
    fn create_blank(&self, req: &CreateVolume, params: &VolumeParams) -> Result<VolumeRecord> {
        let min = fs_minimum(req)?;
        // 0 asks for the default size, which is raised to the minimum instead.
        let required = match req.required_bytes {
            0 => 0,
            r => r.max(min),
        };
        let size = size_for(required, req.limit_bytes, self.default_size.max(min))?;
        let pool = self.choose_pool_blocking(req, params, size)?;
        let format = params.format.unwrap_or(pool.config().format);
        for cap in &req.capabilities {
            cap.check(format)?;
        }
        let (key, lock) = pool.new_volume_key()?;
        let image = pool.first_image_name(key, format)?;
        let rec = new_record(
            &pool,
            key,
            req,
            params,
            (format, size, image),
            Chain::default(),
        );
        let name_free = pool.name_free_check(&req.name);
        materialize(&pool, lock, rec, name_free)
    }

    /// `materialize`, from async code.
    pub(super) async fn materialize(
        &self,
        pool: &Arc<Pool>,
        lock: ObjectLock,
        rec: VolumeRecord,
        check: impl FnOnce(&Index) -> Result<()> + Send + 'static,
    ) -> Result<VolumeRecord> {
        let p = pool.clone();
        exec::blocking(move || materialize(&p, lock, rec, check)).await
    }

    /// The pool for a new volume: the one named in parameters, else the first that fits the
    /// topology (preferred first) and has room.
    pub(super) async fn choose_pool(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        size: u64,
    ) -> Result<Arc<Pool>> {
        let (pools, r, p) = (self.clone(), req.clone(), params.clone());
        exec::blocking(move || pools.choose_pool_blocking(&r, &p, size)).await
    }

    /// `choose_pool`, blocking (it reads the pools' free space).
    fn choose_pool_blocking(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        size: u64,
    ) -> Result<Arc<Pool>> {
        let mut candidates: Vec<Arc<Pool>> = match &params.pool {
            Some(name) => vec![self.named_pool(name)?.clone()],
            None => self.pools.to_vec(),
        };
        let req_topo = &req.topology;
        if !req_topo.requisite.is_empty() {
            candidates.retain(|p| {
                req_topo
                    .requisite
                    .iter()
                    .any(|t| p.config().accessible_from(t))
            });
        }
        if candidates.is_empty() {
            return Err(Error::ResourceExhausted(
                "no pool is accessible from the requisite topology; check the pools' topology \
                 segments in the config"
                    .into(),
            ));
        }
        // Preferred topologies first, in order; stable otherwise.
        let rank = |p: &Arc<Pool>| {
            req_topo
                .preferred
                .iter()
                .position(|t| p.config().has_topology() && p.config().accessible_from(t))
                .unwrap_or(usize::MAX)
        };
        candidates.sort_by_key(rank);

        let checked = {
            let mut out_of_range = 0;
            let mut reasons = Vec::new();
            for p in &candidates {
                let cfg = p.config();
                let provisioned = match cfg.capacity_bytes {
                    Some(_) => Self::provisioned(p)?,
                    None => 0,
                };
                match refusal(cfg, size, p.free_bytes()?, provisioned) {
                    None => return Ok(p.clone()),
                    Some(Refusal::TooBig(why)) => {
                        out_of_range += 1;
                        reasons.push(why);
                    }
                    Some(Refusal::NoRoom(why)) => reasons.push(why),
                }
            }
            Err((out_of_range == candidates.len(), reasons))
        };
        match checked {
            Ok(p) => Ok(p),
            Err((true, reasons)) => Err(Error::OutOfRange(format!(
                "{size} bytes is more than any pool can hold: {}",
                reasons.join("; ")
            ))),
            Err((false, reasons)) => Err(Error::ResourceExhausted(format!(
                "no pool has room for {size} bytes: {}",
                reasons.join("; ")
            ))),
        }
    }

    /// Whether an existing volume satisfies a repeated CreateVolume.
    fn check_compatible<'a>(
        &self,
        existing: &'a VolumeRecord,
        req: &CreateVolume,
        params: &VolumeParams,
    ) -> Result<&'a VolumeRecord> {
        let conflict = |what: String| {
            Err(Error::AlreadyExists(format!(
                "a volume named {:?} already exists ({}) with {what}; use another name or the \
                 same request",
                req.name, existing.id
            )))
        };
        let cap = existing.capacity_bytes;
        if cap < req.required_bytes || (req.limit_bytes > 0 && cap > req.limit_bytes) {
            return conflict(format!("{cap} bytes, outside the requested range"));
        }
        if crate::params::own_parameters(&existing.parameters)
            != crate::params::own_parameters(&req.parameters)
        {
            return conflict("other parameters".into());
        }
        if let Some(pool) = &params.pool {
            if pool != &existing.pool {
                return conflict(format!("pool {}", existing.pool));
            }
        }
        if existing.content_source != req.content_source {
            return conflict("another content source".into());
        }
        // The access type (and the file system a mount asks for) is part of what was made:
        // the answer's volume_context names the fsType, and a node formats by it.
        let kinds = |caps: &[crate::model::Capability]| {
            (
                caps.iter().any(|c| c.is_block()),
                caps.iter().any(|c| !c.is_block()),
            )
        };
        if !existing.capabilities.is_empty()
            && kinds(&req.capabilities) != kinds(&existing.capabilities)
        {
            return conflict("other access types (block and mount differ)".into());
        }
        let asked_fs = req.capabilities.iter().find_map(|c| match &c.access_type {
            crate::model::AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => {
                Some(fs_type.as_str())
            }
            _ => None,
        });
        if let (Some(asked), Some(made)) = (asked_fs, existing.fs_type()) {
            if asked != made {
                return conflict(format!("file system {made}"));
            }
        }
        for c in &req.capabilities {
            if c.check(existing.format).is_err() {
                return conflict(format!(
                    "format {} that cannot serve {c:?}",
                    existing.format.as_str()
                ));
            }
        }
        if !req.topology.requisite.is_empty()
            && !req.topology.requisite.iter().any(|t| {
                self.get(&existing.pool)
                    .is_some_and(|p| p.config().accessible_from(t))
            })
        {
            return conflict("a topology outside the requisite one".into());
        }
        Ok(existing)
    }

    /// DeleteVolume of a locked volume: one commit removes the record; the layers nobody else
    /// names go with it. OK when it is already gone. The caller checks it is not published.
    pub(crate) async fn delete(&self, lock: &VolumeLock) -> Result<()> {
        let lock = lock.clone();
        exec::blocking(move || discard(&lock)).await
    }

    /// Offline expansion with `qemu-img resize`. Returns the new record.
    pub(crate) async fn expand_offline(
        &self,
        lock: &VolumeLock,
        required: u64,
        limit: u64,
    ) -> Result<VolumeRecord> {
        let mut rec = self.locked_volume(lock).await?;
        let new_size = self.expansion_target(&rec, required, limit).await?;
        if new_size <= rec.capacity_bytes {
            return Ok(rec);
        }
        let path = self.image_path(&rec)?;
        qemu_img::resize(&path, rec.format, new_size).await?;
        crate::failpoint!("expand.resized");
        rec.capacity_bytes = new_size;
        self.save(lock, &rec).await?;
        tracing::info!(volume = %rec.id, size = new_size, "volume expanded offline");
        Ok(rec)
    }

    /// The size an expansion should reach (≥ current), checked against the pool cap.
    pub(crate) async fn expansion_target(
        &self,
        rec: &VolumeRecord,
        required: u64,
        limit: u64,
    ) -> Result<u64> {
        if required == 0 && limit == 0 {
            return Err(Error::invalid("capacity_range is required"));
        }
        if limit > 0 && limit < rec.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {limit} is below the current size {}; volumes cannot shrink",
                rec.capacity_bytes
            )));
        }
        if required <= rec.capacity_bytes {
            return Ok(rec.capacity_bytes);
        }
        let new_size = size_for(required, limit, required)?;
        let pool = self
            .get(&rec.pool)
            .cloned()
            .ok_or_else(|| Error::internal(format!("pool {} is not configured", rec.pool)))?;
        let grow = new_size - rec.capacity_bytes;
        if let Some(cap) = pool.config().capacity_bytes {
            let p = pool.clone();
            let used = exec::blocking(move || Self::provisioned(&p)).await?;
            if used.saturating_add(grow) > cap {
                return Err(Error::OutOfRange(format!(
                    "growing to {new_size} bytes would exceed the pool's cap of {cap} bytes \
                     ({used} provisioned)"
                )));
            }
        }
        // Without overcommit a volume must fit the free space, when it grows as when it is
        // created.
        if !pool.config().overcommit {
            let free = exec::blocking(move || pool.free_bytes()).await?;
            if grow > free {
                return Err(Error::ResourceExhausted(format!(
                    "growing volume {} by {grow} bytes needs more than the {free} bytes free in \
                     pool {} (overcommit is off); free some space first",
                    rec.id, rec.pool
                )));
            }
        }
        Ok(new_size)
    }

    /// Rewrites a locked volume's record (one commit).
    pub(crate) async fn save(&self, lock: &VolumeLock, rec: &VolumeRecord) -> Result<()> {
        if rec.id != lock.id.to_string() {
            return Err(Error::internal(format!(
                "saving volume {} under the lock of {}",
                rec.id, lock.id
            )));
        }
        let (pool, held) = (lock.pool.clone(), lock.held.clone());
        let r = rec.clone();
        exec::blocking(move || {
            let _held = held;
            pool.store.put(&r, |_| Ok(())).map(drop)
        })
        .await
    }

    /// Marks a locked volume as handed to a writer (`VolumeRecord::handed_to_writer`), in one
    /// durable record commit, before its image is given to one (a read-write attach, libvirt
    /// or local): from then on its blank image is never taken for an empty one a crash cut
    /// short (`Pool::check_images`). `rec` is its record as read under `lock`. Nothing to do
    /// (no commit) when it carries the mark already; a publish failing later keeps it.
    pub(crate) async fn hand_to_writer(&self, lock: &VolumeLock, rec: &VolumeRecord) -> Result<()> {
        if rec.handed_to_writer {
            return Ok(());
        }
        let mut marked = rec.clone();
        marked.handed_to_writer = true;
        self.save(lock, &marked).await?;
        tracing::debug!(volume = %rec.id, "volume handed to a writer for the first time");
        Ok(())
    }

    /// At shutdown: makes the files of every journaled create durable now and logs them so
    /// (`store::journal`), so the next start has nothing to replay. Errors are logged: what
    /// is left is replayed at the next start.
    pub(crate) async fn checkpoint(&self) {
        let pools = self.pools.clone();
        let done = exec::blocking(move || {
            for p in pools.iter() {
                if let Err(e) = p.store.checkpoint() {
                    tracing::warn!(pool = %p.name(), error = %e,
                        "could not checkpoint the pool's new records at shutdown; the next start \
                         settles them");
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not checkpoint the pools at shutdown");
        }
    }

    /// Readiness: every pool directory is writable.
    pub(crate) async fn check_writable(&self) -> Result<()> {
        let pools = self.pools.clone();
        exec::blocking(move || pools.iter().try_for_each(|p| p.check_writable())).await
    }
}

/// The record of new volume `key` in `pool` for `req`: its format, size and image file name,
/// and the chain under the image.
pub(super) fn new_record(
    pool: &Pool,
    key: u64,
    req: &CreateVolume,
    params: &VolumeParams,
    (format, size, image): (ImageFormat, u64, String),
    chain: Chain,
) -> VolumeRecord {
    VolumeRecord {
        schema: SCHEMA,
        id: pool.volume_id(key),
        name: req.name.clone(),
        pool: pool.name().to_string(),
        state: RecordState::Ready,
        format,
        capacity_bytes: size,
        image,
        capabilities: req.capabilities.clone(),
        parameters: req.parameters.clone(),
        mutable_parameters: BTreeMap::new(),
        disk: params.disk.clone(),
        content_source: req.content_source.clone(),
        accessible_topology: pool.topology().clone(),
        created_at: now_secs(),
        chain,
        handed_to_writer: false,
    }
}

/// Writes the volume's image (empty, or an overlay on its first backing layer) and commits
/// its record. `check` runs under the pool lock before the commit. On failure the image is
/// removed again. Blocking.
///
/// A blank volume (no backing layer) is one journaled commit (`Store::put_new_with`): one
/// fdatasync of the change log; the image, the record file and the directories are made
/// durable by the checkpointer soon after. An empty image can be written again from its
/// record if a crash loses it before then (`Pool::recover`) or loses its blocks
/// (`qcow2::repair_empty`, run by `Pools::locked_volume`). An overlay cannot be told from one that lost its blocks so
/// cheaply, so a restore or clone makes its image durable before the commit that names it.
fn materialize(
    pool: &Arc<Pool>,
    lock: ObjectLock,
    rec: VolumeRecord,
    check: impl FnOnce(&Index) -> Result<()>,
) -> Result<VolumeRecord> {
    let _held = lock;
    let image = pool.image_path(&rec.image);
    let backing = rec.chain.backing.first().map(String::as_str);
    qcow2::check(rec.format, backing)?;
    let file = pool.store.create_layer(&rec.image, |f| {
        qcow2::write(f, rec.format, rec.capacity_bytes, backing)
    })?;
    crate::failpoint!("create.image-made");
    let images = pool.images_dir();
    let committed = fsutil::open_dir(&images).and_then(|dir| {
        let alongside = [(&file, image.as_path()), (&dir, images.as_path())];
        match backing {
            None => pool.store.put_new_with(&rec, &alongside, check),
            Some(_) => pool.store.put_with(&rec, &alongside, check),
        }
    });
    if let Err(e) = committed {
        // Keep the image if the record made it to disk after all (a late failure).
        let named = matches!(pool.read_volume(rec.key_u64()?), Ok(Some(_)));
        if !named {
            let _ = std::fs::remove_file(&image);
        }
        return Err(e);
    }
    crate::failpoint!("create.committed");
    tracing::info!(volume = %rec.id, pool = %rec.pool, size = rec.capacity_bytes, "volume created");
    Ok(rec)
}

/// Removes a locked volume's record in one commit (the layers nobody else names go with it);
/// OK when it is already gone. Blocking.
fn discard(lock: &VolumeLock) -> Result<()> {
    let image = match lock.pool.store.index()?.find_volume(lock.key)? {
        None => return Ok(()),
        Some(v) => lock.pool.image_path(&v.image.to_string()),
    };
    // A process outside the plugin holds the volume's image open (QEMU and tools such as
    // qemu-io lock what they use; the plugin's own attachments were checked before): deleting
    // would forget a volume whose data that process still uses.
    if super::store::file_is_locked(&image)? {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is in use: a process holds its image {} open (QEMU or another tool \
             outside this plugin); stop it, then delete the volume",
            lock.id,
            image.display()
        )));
    }
    lock.pool
        .store
        .remove::<VolumeRecord>(lock.key, |_| Ok(()))?;
    tracing::info!(volume = %lock.id, "volume deleted");
    Ok(())
}

/// Whether a name no readable record has can be told free (`Index::names_known`).
pub(super) type NameKnown = Result<()>;

/// What a lookup of a name in one pool found (`Pool::volume_named`, `snapshot_named`).
#[derive(Debug)]
pub(super) enum Named<R> {
    /// The record that has the name.
    Found(R),
    /// No record of the pool has it.
    Free,
    /// No readable record has it, but an unreadable one of its kind may
    /// (`Error::UnreadableRecord`).
    Unknown(Error),
}

impl<R> Named<R> {
    /// `found`, else what `Index::names_known` answered.
    pub(super) fn of(found: Option<R>, known: Result<()>) -> Named<R> {
        match (found, known) {
            (Some(rec), _) => Named::Found(rec),
            (None, Ok(())) => Named::Free,
            (None, Err(e)) => Named::Unknown(e),
        }
    }
}

/// Why a layer file cannot be used (`Pool::first_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerFault {
    /// The file is not in the pool.
    Missing,
    /// Not a regular file (`Probe::not_regular`), or a qcow2 layer that does not start as a
    /// qcow2 image any more; what was found.
    Damaged(qcow2::Probe),
    /// A blank volume's empty image that a crash of the machine left without its blocks, which
    /// is written again before use (`qcow2::repair_empty`) but not while a process holds it
    /// open (`qcow2::Repair::Held`).
    HeldEmptied,
    /// The blank image of a volume that was handed to a writer, now what a crash leaves of
    /// an empty image (`qcow2::Probe::lost_its_blocks`): emptied or zeroed since it held
    /// data (`Pool::emptied`); what was found.
    Emptied(qcow2::Probe),
}

/// A layer that cannot be used, as `Pool::first_fault` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokenLayer {
    /// Its absolute path.
    pub(crate) path: std::path::PathBuf,
    /// Whether it is the top layer (a volume's own image, a snapshot's layer), not one under it.
    pub(crate) top: bool,
    pub(crate) fault: LayerFault,
}

impl BrokenLayer {
    /// What is wrong, naming the file, `owner` (e.g. "volume <id>") and `pool`, and what to do.
    /// It starts with a one-word status ("missing: ", "damaged: "), so that a client that cuts
    /// the volume condition short (Nomad's CLI keeps 20 characters) still says what it is.
    pub(crate) fn message(&self, owner: &str, pool: &str) -> String {
        let kind = if self.top { "image" } else { "backing layer" };
        let path = self.path.display();
        let restore = "restore the file from a backup, or delete what uses it (a layer under \
                       snapshots is shared by every volume made from them)";
        match self.fault {
            LayerFault::Missing => {
                format!("missing: {kind} {path} of {owner} in pool {pool} is missing; {restore}")
            }
            LayerFault::Damaged(found) => {
                let what = match found.not_regular {
                    Some(it) => format!("is not a regular file ({it})"),
                    None => "is not a qcow2 image any more".to_string(),
                };
                format!("damaged: {kind} {path} of {owner} in pool {pool} {what}; {restore}")
            }
            LayerFault::Emptied(found) => format!(
                "damaged: {kind} {path} of {owner} in pool {pool} was emptied or zeroed ({} \
                 bytes, {}) after the volume was handed to a writer: the data it held is lost; \
                 {restore}",
                found.len,
                if found.magic {
                    "no data"
                } else {
                    "no qcow2 header"
                }
            ),
            LayerFault::HeldEmptied => format!(
                "damaged: {kind} {path} of {owner} in pool {pool} lost its blocks in a crash of \
                 the machine before the volume was first published, and it is held open by a \
                 process, so it is not written again; detach it first (the next operation on \
                 the volume then writes it again)"
            ),
        }
    }
}

impl VolumeRecord {
    /// The record's key (from its id).
    pub(super) fn key_u64(&self) -> Result<u64> {
        super::store::Record::key(self)
    }
}

impl Pool {
    /// Makes sure the volume's images can be used, before anything is done with them (the
    /// caller holds the volume's lock): a blank active image (no backing file) that a crash
    /// of the machine left without its blocks is written again (`qcow2::repair_empty`), or,
    /// while a process holds it open, FAILED_PRECONDITION saying so, unless the volume was
    /// handed to a writer (`handed_to_writer`): then it held data, and is FAILED_PRECONDITION
    /// (`Pool::emptied`); then an image (the active layer or one under it) that is missing, not
    /// a regular file or (qcow2) does not start as a qcow2 image is FAILED_PRECONDITION:
    /// nothing can be done with the volume until it is restored or deleted. A `stat` and a
    /// small read per layer. Blocking.
    fn check_images(&self, rec: &VolumeRecord) -> Result<()> {
        let owner = || format!("volume {}", rec.id);
        if rec.chain.backing.is_empty() && rec.handed_to_writer {
            if let Some(broken) = self.emptied(&rec.image, rec.format, rec.capacity_bytes)? {
                return Err(Error::FailedPrecondition(
                    broken.message(&owner(), self.name()),
                ));
            }
            if rec.format == ImageFormat::Raw {
                // Short but holding data (see `emptied`): lengthened, bytes kept, unless held.
                let path = self.image_path(&rec.image);
                qcow2::repair_empty(&path, rec.format, rec.capacity_bytes)?;
            }
        } else if rec.chain.backing.is_empty() {
            let path = self.image_path(&rec.image);
            match qcow2::repair_empty(&path, rec.format, rec.capacity_bytes)? {
                qcow2::Repair::Intact => {}
                qcow2::Repair::Rewritten => {
                    tracing::warn!(pool = %self.name(), volume = %rec.id, image = %rec.image,
                        "wrote the empty image of the volume again: a crash of the machine had \
                         lost its blocks before the volume was first published")
                }
                // A short raw image stays usable, as the condition reports it (nothing to
                // refuse); a qcow2 one without its header cannot be used.
                qcow2::Repair::Held if rec.format == ImageFormat::Raw => {}
                qcow2::Repair::Held => {
                    let broken = BrokenLayer {
                        path,
                        top: true,
                        fault: LayerFault::HeldEmptied,
                    };
                    return Err(Error::FailedPrecondition(
                        broken.message(&owner(), self.name()),
                    ));
                }
            }
        }
        let layers = std::iter::once(&rec.image).chain(&rec.chain.backing);
        self.check_layers(layers, rec.format, &owner())
    }

    /// The active image `image` (of `format`, for `size` bytes) of a blank volume (no backing
    /// layers) that was handed to a writer, when it is now what a crash of the machine leaves
    /// of an empty image (`qcow2::Probe::lost_its_blocks`: no longer than an empty image and
    /// no whole qcow2 header, or a raw file shorter than the volume that holds no data): it
    /// held data, so it was emptied or zeroed since (by hand, by a tool), never cut short by a
    /// crash; `None` when
    /// it is not (a missing image is `first_fault`'s). A `stat` and up to three small reads.
    /// Blocking.
    pub(crate) fn emptied(
        &self,
        image: &str,
        format: ImageFormat,
        size: u64,
    ) -> Result<Option<BrokenLayer>> {
        let path = self.image_path(image);
        let Some(found) = qcow2::probe(&path, format)? else {
            return Ok(None);
        };
        if !found.lost_its_blocks(&path, format, size)? {
            return Ok(None);
        }
        // A raw file shorter than the volume that still holds data was cut short, not
        // emptied (a crash on a file system that does not keep the order of its writes, after
        // an online expansion): `check_images` lengthens it, bytes kept.
        if format == ImageFormat::Raw && !qcow2::holds_no_data(&path, format)? {
            return Ok(None);
        }
        Ok(Some(BrokenLayer {
            path,
            top: true,
            fault: LayerFault::Emptied(found),
        }))
    }

    /// FAILED_PRECONDITION when one of `layers` (of `owner`, e.g. "volume <id>") cannot be
    /// used (`first_fault`). A `stat` and a small read per layer. Blocking.
    pub(super) fn check_layers<'a>(
        &self,
        layers: impl Iterator<Item = &'a String>,
        format: ImageFormat,
        owner: &str,
    ) -> Result<()> {
        match self.first_fault(layers.map(String::as_str), format)? {
            Some(broken) => Err(Error::FailedPrecondition(
                broken.message(owner, self.name()),
            )),
            None => Ok(()),
        }
    }

    /// The first of `layers` (file names, the top one first) that cannot be used: missing, not
    /// a regular file (a FIFO, a directory: never opened in a way that blocks), or (qcow2) not
    /// starting as a qcow2 image any more (damaged); a raw layer only has to be a regular
    /// file. The one rule of a usable layer, for the operations (`check_layers`) and the
    /// volume condition ListVolumes and ControllerGetVolume report (`listing`). A `stat` and
    /// (qcow2) one small read per layer, up to the broken one. Blocking.
    pub(crate) fn first_fault<'a>(
        &self,
        layers: impl IntoIterator<Item = &'a str>,
        format: ImageFormat,
    ) -> Result<Option<BrokenLayer>> {
        for (n, layer) in layers.into_iter().enumerate() {
            let path = self.image_path(layer);
            let fault = match qcow2::probe(&path, format)? {
                None => LayerFault::Missing,
                Some(found) if found.damaged(format) => LayerFault::Damaged(found),
                Some(_) => continue,
            };
            return Ok(Some(BrokenLayer {
                path,
                top: n == 0,
                fault,
            }));
        }
        Ok(None)
    }

    /// A Ready volume record; `None` when absent or not Ready, `Error::UnreadableRecord`
    /// when its record exists but could not be read (`Index::find_volume`). Checks the index
    /// first, so an unknown id costs no file access.
    pub(super) fn ready_volume(&self, key: u64) -> Result<Option<VolumeRecord>> {
        let known = self
            .store
            .index()?
            .find_volume(key)?
            .is_some_and(|v| v.state == RecordState::Ready);
        if !known {
            return Ok(None);
        }
        Ok(self
            .read_volume(key)?
            .filter(|r| r.state == RecordState::Ready))
    }

    /// The record (any state) of the volume named `name` in this pool, or whether the name
    /// is free or cannot be told free (`record_named`).
    pub(super) fn volume_named(&self, name: &str) -> Result<Named<VolumeRecord>> {
        self.record_named(name, |r: &VolumeRecord| &r.name)
    }

    /// The record (any state) of kind `R` (volumes, snapshots) named `name` in this pool, or
    /// whether the name is free or cannot be told free (`Index::names_known`), from one look
    /// at the index. Two records of the name (what mending a record can leave) are
    /// `Error::UnreadableRecord` naming both: which one the CO means is the operator's call,
    /// not the lower key's.
    pub(super) fn record_named<R: Record>(
        &self,
        name: &str,
        name_of: fn(&R) -> &str,
    ) -> Result<Named<R>> {
        let (mut found, known) = self.records_named(name, name_of)?;
        if found.len() > 1 {
            let keys = [found[0].0, found[1].0];
            return Err(Error::UnreadableRecord(self.same_name(
                R::KIND,
                name,
                &keys,
            )));
        }
        Ok(Named::of(found.pop().map(|(_, rec)| rec), known))
    }

    /// Every record (any state) of kind `R` named `name` in this pool, with its key, from one
    /// look at the index (its name hash, confirmed against each record), and whether the name
    /// can be told free otherwise (`Index::names_known`). Blocking.
    pub(super) fn records_named<R: Record>(
        &self,
        name: &str,
        name_of: fn(&R) -> &str,
    ) -> Result<(Vec<(u64, R)>, NameKnown)> {
        let (keys, known) = {
            let index = self.store.index()?;
            let keys: Vec<u64> = match R::KIND {
                Kind::Snapshot => index
                    .snapshots_named(ids::name_hash(ids::SNAPSHOT, name))
                    .collect(),
                _ => index
                    .volumes_named(ids::name_hash(ids::VOLUME, name))
                    .collect(),
            };
            (keys, index.names_known(R::KIND, name))
        };
        let mut found = Vec::new();
        for key in keys {
            if let Some(rec) = self.store.read::<R>(key)?.filter(|r| name_of(r) == name) {
                found.push((key, rec));
            }
        }
        Ok((found, known))
    }

    /// What to say of the records `keys` of `kind` that all carry `name`: both ids and files,
    /// and what to do.
    pub(super) fn same_name(&self, kind: Kind, name: &str, keys: &[u64]) -> String {
        let id = |key: u64| match kind {
            Kind::Snapshot => self.snapshot_id(key),
            _ => self.volume_id(key),
        };
        let what = kind.noun();
        let records: Vec<String> = keys
            .iter()
            .map(|k| {
                let file = kind.record_path(self.dir(), *k);
                format!("{} ({})", id(*k), file.display())
            })
            .collect();
        format!(
            "{} {what} records carry the name {name:?}: {} (a mended record can repeat a name \
             that was taken meanwhile). A request by that name cannot tell which one is meant: \
             delete the one not wanted by its id, or give it another name in its record while \
             the plugin is stopped",
            keys.len(),
            records.join(", ")
        )
    }

    /// Start-up: warns of records of `kind` (volumes, snapshots) that carry the same name,
    /// naming both ids and files. Blocking.
    pub(super) fn warn_same_names(&self, kind: Kind) -> Result<()> {
        let groups = self.store.index()?.same_name_hash(kind);
        for keys in groups {
            let mut by_name: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for key in keys {
                let name = match kind {
                    Kind::Snapshot => self
                        .store
                        .read::<super::record::SnapshotRecord>(key)?
                        .map(|r| r.name),
                    _ => self.read_volume(key)?.map(|r| r.name),
                };
                if let Some(name) = name {
                    by_name.entry(name).or_default().push(key);
                }
            }
            for (name, keys) in by_name.into_iter().filter(|(_, k)| k.len() > 1) {
                tracing::warn!(pool = %self.name(), "{}", self.same_name(kind, &name, &keys));
            }
        }
        Ok(())
    }

    /// A commit check: no volume of this pool has the name (as the pool is at commit time),
    /// and no unreadable volume record may have it (`Index::names_known`).
    pub(super) fn name_free_check(
        self: &Arc<Self>,
        name: &str,
    ) -> impl FnOnce(&Index) -> Result<()> + Send + 'static {
        let (pool, name) = (self.clone(), name.to_string());
        move |index: &Index| {
            index.names_known(Kind::Volume, &name)?;
            for key in index.volumes_named(ids::name_hash(ids::VOLUME, &name)) {
                if pool.read_volume(key)?.is_some_and(|r| r.name == name) {
                    return Err(Error::AlreadyExists(format!(
                        "a volume named {name:?} was created meanwhile ({}); retry to get it",
                        pool.volume_id(key)
                    )));
                }
            }
            Ok(())
        }
    }

    /// A key no volume of this pool has, nor had while snapshots of it remain, locked.
    pub(super) fn new_volume_key(&self) -> Result<(u64, ObjectLock)> {
        loop {
            let key = ids::random_u64();
            let unused = {
                let index = self.store.index()?;
                index.volume(key).is_none() && index.snapshots_of(key).next().is_none()
            };
            if !unused {
                continue;
            }
            if let Some(lock) = self.store.try_lock(Slot::Volume(key))? {
                return Ok((key, lock));
            }
        }
    }

    /// The file name of a new volume's image: `<key>.<format>`, or a fresh layer name in the
    /// unlikely case that a file has it already.
    pub(super) fn first_image_name(&self, key: u64, format: ImageFormat) -> Result<String> {
        let plain = Layer::Std {
            key,
            stamp: None,
            raw: format == ImageFormat::Raw,
        }
        .to_string();
        if !self.image_path(&plain).exists() {
            return Ok(plain);
        }
        self.new_layer_name(key, format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_mib_within_limits() {
        assert_eq!(size_for(0, 0, 1 << 30).unwrap(), 1 << 30);
        assert_eq!(size_for(1, 0, 1 << 30).unwrap(), MIB);
        assert_eq!(size_for(MIB + 1, 0, 0).unwrap(), 2 * MIB);
        assert_eq!(size_for(0, 5 * MIB, 1 << 30).unwrap(), 5 * MIB);
        assert_eq!(
            size_for(MIB + 1, MIB + 100 * 1024, 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(3 * MIB + 1, 3 * MIB + 2 * MIB, 0).unwrap(),
            4 * MIB
        );
        assert!(matches!(size_for(10, 5, 0), Err(Error::OutOfRange(_))));
        assert_eq!(size_for(MAX_VOLUME_BYTES, 0, 0).unwrap(), MAX_VOLUME_BYTES);
        assert!(matches!(
            size_for(MAX_VOLUME_BYTES + 1, 0, 0),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(u64::MAX, 0, 0),
            Err(Error::OutOfRange(_))
        ));
    }

    fn pool_cfg(capacity_bytes: Option<u64>, overcommit: bool) -> PoolConfig {
        PoolConfig {
            name: "p".into(),
            path: "/p".into(),
            format: ImageFormat::Qcow2,
            topology: BTreeMap::new(),
            capacity_bytes,
            overcommit,
            hosts: Vec::new(),
        }
    }

    /// GetCapacity's maximum_volume_size is the largest required_bytes CreateVolume takes:
    /// that size is accepted, the next size (1 MiB more, or one byte more, which rounds up to
    /// it) is refused.
    #[test]
    fn largest_volume_is_what_create_accepts() {
        const GIB: u64 = 1 << 30;
        let cases = [
            // (cap, overcommit, free, provisioned, expected maximum)
            (None, true, 10 * GIB, 0, MAX_VOLUME_BYTES),
            (None, false, 10 * GIB, 0, 10 * GIB),
            (None, false, 10 * GIB + MIB / 2, 0, 10 * GIB),
            (Some(100 * MIB), true, 10 * GIB, 80 * MIB, 20 * MIB),
            (Some(100 * MIB), true, 10 * GIB, 0, 100 * MIB),
            (Some(100 * GIB), false, 10 * GIB, 0, 10 * GIB),
            (Some(100 * GIB), false, 10 * GIB, 95 * GIB, 5 * GIB),
            (Some(100 * MIB + 5), true, 10 * GIB, 0, 100 * MIB),
            (Some(100 * MIB), true, 10 * GIB, 100 * MIB, 0),
            (Some(100 * MIB), true, 10 * GIB, 200 * MIB, 0),
            (
                Some(4 * MAX_VOLUME_BYTES),
                true,
                10 * GIB,
                0,
                MAX_VOLUME_BYTES,
            ),
            (None, true, MIB - 1, 0, 0),
            (None, false, MIB - 1, 0, 0),
        ];
        for (cap, overcommit, free, provisioned, want) in cases {
            let cfg = pool_cfg(cap, overcommit);
            let max = largest_volume(&cfg, free, provisioned);
            let case =
                format!("cap {cap:?} overcommit {overcommit} free {free} used {provisioned}");
            assert_eq!(max, want, "{case}");
            let accepts = |required: u64| {
                size_for(required, 0, MIB)
                    .is_ok_and(|size| refusal(&cfg, size, free, provisioned).is_none())
            };
            if max > 0 {
                assert!(accepts(max), "{case}: {max} refused");
            }
            assert!(!accepts(max + 1), "{case}: {} accepted", max + 1);
            assert!(!accepts(max + MIB), "{case}: {} accepted", max + MIB);
        }
    }

    #[test]
    fn refusals_say_too_big_or_no_room() {
        let capped = pool_cfg(Some(100 * MIB), true);
        assert!(matches!(
            refusal(&capped, 101 * MIB, 1 << 40, 0),
            Some(Refusal::TooBig(_))
        ));
        assert!(matches!(
            refusal(&capped, 30 * MIB, 1 << 40, 80 * MIB),
            Some(Refusal::NoRoom(_))
        ));
        let strict = pool_cfg(None, false);
        assert!(matches!(
            refusal(&strict, 30 * MIB, 20 * MIB, 0),
            Some(Refusal::NoRoom(_))
        ));
        assert_eq!(refusal(&strict, 20 * MIB, 20 * MIB, 0), None);
    }
}
