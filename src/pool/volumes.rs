//! The volume lifecycle across all configured pools: create (idempotent by name), delete,
//! offline expansion, listing and capacity.

use super::layers::LayerContext;
use super::qemu_img;
use super::record::{now_secs, RecordState, VolumeRecord, SCHEMA};
use super::Pool;
use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::exec;
use crate::fsutil;
use crate::ids::{self, ObjectId};
use crate::model::{Capability, ContentSource};
use crate::params::VolumeParams;
use std::collections::BTreeMap;
use std::sync::Arc;

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

impl Pools {
    /// Opens every pool (creating directories, recovering from crashes).
    pub async fn open(configs: Vec<PoolConfig>, default_size: u64) -> Result<Pools> {
        let pools = exec::blocking(move || {
            configs
                .into_iter()
                .map(|c| Pool::open(c).map(Arc::new))
                .collect::<Result<Vec<_>>>()
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

    /// Looks a volume up by id. `Ok(None)` when it does not exist (or is not Ready).
    pub async fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let Some(oid) = ObjectId::parse_volume(id)? else {
            return Ok(None);
        };
        let Some(pool) = self.get(&oid.pool).cloned() else {
            return Ok(None);
        };
        let rec = exec::blocking(move || pool.read_volume(&oid.key)).await?;
        Ok(rec.filter(|r| r.state == RecordState::Ready))
    }

    /// Like `volume`, but NOT_FOUND when absent.
    pub(crate) async fn require_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.volume(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    /// The absolute path of a volume's active image.
    pub(crate) fn image_path(&self, rec: &VolumeRecord) -> Result<std::path::PathBuf> {
        let pool = self
            .get(&rec.pool)
            .ok_or_else(|| Error::internal(format!("pool {} is not configured", rec.pool)))?;
        Ok(pool.image_path(&rec.image))
    }

    /// One page of ListVolumes: up to `max` Ready volumes in id order, from the first id at or
    /// after `start` ("" = the beginning), and the id to continue from ("" at the end). Only
    /// the directory listings are read in full; records are read for the page alone, so paging
    /// through N volumes reads each record once instead of N/page times.
    pub(crate) async fn list_page(
        &self,
        start: &str,
        max: usize,
    ) -> Result<(Vec<VolumeRecord>, String)> {
        let pools = self.pools.clone();
        let start = start.to_string();
        exec::blocking(move || {
            let mut ids: Vec<(String, usize, String)> = Vec::new();
            for (i, p) in pools.iter().enumerate() {
                for key in p.volume_keys()? {
                    ids.push((p.volume_id(&key), i, key));
                }
            }
            ids.sort_unstable();
            let from = ids.partition_point(|(id, _, _)| id.as_str() < start.as_str());
            let mut page = Vec::new();
            let mut rest = ids[from..].iter();
            for (_, i, key) in rest.by_ref() {
                let ready = pools[*i]
                    .read_volume_for_listing(key)
                    .filter(|r| r.state == RecordState::Ready);
                page.extend(ready);
                if page.len() >= max {
                    break;
                }
            }
            let next = rest.next().map(|(id, _, _)| id.clone()).unwrap_or_default();
            Ok((page, next))
        })
        .await
    }

    /// Sum of the virtual sizes of a pool's volumes.
    fn provisioned(pool: &Pool) -> Result<u64> {
        Ok(pool
            .all_volumes()?
            .iter()
            .filter(|r| r.state != RecordState::Deleting)
            .map(|r| r.capacity_bytes)
            .sum())
    }

    /// Bytes a new volume may still take in `pool`: what the cap leaves (thin provisioning)
    /// or the free space, and never more than the free space without overcommit.
    fn available(pool: &Pool) -> Result<u64> {
        let free = pool.free_bytes()?;
        let mut avail = match pool.config().capacity_bytes {
            Some(cap) => cap.saturating_sub(Self::provisioned(pool)?),
            None => free,
        };
        if !pool.config().overcommit {
            avail = avail.min(free);
        }
        Ok(avail)
    }

    /// GetCapacity: the most a single new volume matching the query could get.
    pub(crate) async fn capacity(&self, q: CapacityQuery) -> Result<u64> {
        let params = VolumeParams::parse(&q.parameters)?;
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .iter()
            .filter(|p| params.pool.as_deref().is_none_or(|n| n == p.name()))
            .filter(|p| {
                q.topology
                    .as_ref()
                    .is_none_or(|t| p.config().accessible_from(t))
            })
            .cloned()
            .collect();
        exec::blocking(move || {
            candidates
                .iter()
                .try_fold(0u64, |best, p| Ok(best.max(Self::available(p)?)))
        })
        .await
    }

    /// CreateVolume. Idempotent by name: the volume's key is derived from its name.
    pub async fn create(&self, req: CreateVolume) -> Result<VolumeRecord> {
        ids::check_name("volume name", &req.name)?;
        let params = VolumeParams::parse(&req.parameters)?;
        if req.capabilities.is_empty() {
            return Err(Error::invalid("volume_capabilities is required"));
        }
        let key = ids::volume_key_for_name(&req.name);

        // An existing volume of that name, in any pool?
        for pool in self.pools.iter() {
            let p = pool.clone();
            let k = key.clone();
            let Some(existing) = exec::blocking(move || p.read_volume(&k)).await? else {
                continue;
            };
            if existing.name != req.name {
                return Err(Error::AlreadyExists(format!(
                    "volume id {} is taken by the volume named {:?}; choose another name",
                    existing.id, existing.name
                )));
            }
            match existing.state {
                RecordState::Ready => {
                    self.check_compatible(&existing, &req, &params)?;
                    return Ok(existing);
                }
                // A crash (or a failed attempt) left it half-made or half-deleted: start over.
                RecordState::Creating | RecordState::Deleting => {
                    let p = pool.clone();
                    exec::blocking(move || p.discard_volume(&existing)).await?;
                }
            }
        }

        if let Some(source) = &req.content_source {
            return self.create_from_source(&req, &params, &key, source).await;
        }
        let size = size_for(req.required_bytes, req.limit_bytes, self.default_size)?;
        let pool = self.choose_pool(&req, &params, size).await?;
        let format = params.format.unwrap_or(pool.config().format);
        for cap in &req.capabilities {
            cap.check(format)?;
        }
        let (p, k) = (pool.clone(), key.clone());
        let image = exec::blocking(move || p.fresh_image_name(&k, format)).await?;
        let rec = VolumeRecord {
            schema: SCHEMA,
            id: pool.volume_id(&key),
            name: req.name.clone(),
            pool: pool.name().to_string(),
            state: RecordState::Creating,
            format,
            capacity_bytes: size,
            image,
            capabilities: req.capabilities.clone(),
            parameters: req.parameters.clone(),
            disk: params.disk.clone(),
            content_source: req.content_source.clone(),
            accessible_topology: pool.topology().clone(),
            created_at: now_secs(),
            chain: Default::default(),
        };
        self.materialize(&pool, rec).await
    }

    /// Writes the Creating record, creates the image, then marks the record Ready. On failure
    /// everything made so far is removed.
    pub(super) async fn materialize(
        &self,
        pool: &Arc<Pool>,
        mut rec: VolumeRecord,
    ) -> Result<VolumeRecord> {
        let p = pool.clone();
        let r = rec.clone();
        exec::blocking(move || p.write_volume(&r)).await?;
        crate::failpoint!("create.record-written");
        let image = pool.image_path(&rec.image);
        let part = pool.image_path(&format!("{}.part", rec.image));
        let made = async {
            // Restores and clones are overlays on their source's layer (always qcow2).
            let backing = rec
                .chain
                .backing
                .first()
                .map(|b| (b.as_str(), crate::model::ImageFormat::Qcow2));
            qemu_img::create(&part, rec.format, rec.capacity_bytes, backing).await?;
            crate::failpoint!("create.image-made");
            let (part, image) = (part.clone(), image.clone());
            exec::blocking(move || fsutil::rename_durable(&part, &image)).await?;
            crate::failpoint!("create.image-renamed");
            Ok(())
        }
        .await;
        if let Err(e) = made {
            let p = pool.clone();
            let r = rec.clone();
            if let Err(cleanup) = exec::blocking(move || p.discard_volume(&r)).await {
                tracing::error!(volume = %rec.id, error = %cleanup, "cleanup after failed create");
            }
            return Err(e);
        }
        rec.state = RecordState::Ready;
        let p = pool.clone();
        let r = rec.clone();
        exec::blocking(move || p.write_volume(&r)).await?;
        crate::failpoint!("create.ready");
        tracing::info!(volume = %rec.id, pool = %rec.pool, size = rec.capacity_bytes, "volume created");
        Ok(rec)
    }

    /// The pool for a new volume: the one named in parameters, else the first that fits the
    /// topology (preferred first) and has room.
    pub(super) async fn choose_pool(
        &self,
        req: &CreateVolume,
        params: &VolumeParams,
        size: u64,
    ) -> Result<Arc<Pool>> {
        let mut candidates: Vec<Arc<Pool>> = match &params.pool {
            Some(name) => vec![self.get(name).cloned().ok_or_else(|| {
                let names: Vec<&str> = self.pools.iter().map(|p| p.name()).collect();
                Error::invalid(format!(
                    "pool {name:?} is not configured; configured pools: {}",
                    names.join(", ")
                ))
            })?],
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

        let checked = exec::blocking(move || {
            let mut out_of_range = 0;
            let mut reasons = Vec::new();
            for p in &candidates {
                let cfg = p.config();
                if let Some(cap) = cfg.capacity_bytes {
                    if size > cap {
                        out_of_range += 1;
                        reasons.push(format!("pool {} is capped at {cap} bytes", p.name()));
                        continue;
                    }
                    let used = Self::provisioned(p)?;
                    if used.saturating_add(size) > cap {
                        reasons.push(format!(
                            "pool {} has {} of {cap} bytes left",
                            p.name(),
                            cap.saturating_sub(used)
                        ));
                        continue;
                    }
                }
                let free = p.free_bytes()?;
                if free < MIB || (!cfg.overcommit && size > free) {
                    reasons.push(format!("pool {} has {free} bytes free", p.name()));
                    continue;
                }
                return Ok(Ok(p.clone()));
            }
            Ok(Err((out_of_range == candidates.len(), reasons)))
        })
        .await?;
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
        let strip = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter()
                .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if strip(&existing.parameters) != strip(&req.parameters) {
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

    /// DeleteVolume: OK for unknown ids. The caller checks that the volume is not published.
    pub(crate) async fn delete(&self, id: &str) -> Result<()> {
        let Some(oid) = ObjectId::parse_volume(id)? else {
            return Ok(());
        };
        let Some(pool) = self.get(&oid.pool).cloned() else {
            return Ok(());
        };
        exec::blocking(move || {
            let Some(mut rec) = pool.read_volume(&oid.key)? else {
                return Ok(());
            };
            if rec.state == RecordState::Ready {
                rec.state = RecordState::Deleting;
                pool.write_volume(&rec)?;
                crate::failpoint!("delete.marked");
            }
            pool.discard_volume(&rec)?;
            crate::failpoint!("delete.record-removed");
            tracing::info!(volume = %rec.id, "volume deleted");
            // Backing layers nobody else needs go now; a failure only delays that.
            if let Err(e) = pool.collect_garbage() {
                tracing::warn!(pool = %pool.name(), error = %e, "layer cleanup deferred");
            }
            Ok(())
        })
        .await
    }

    /// Offline expansion with `qemu-img resize`. Returns the new record.
    pub(crate) async fn expand_offline(
        &self,
        id: &str,
        required: u64,
        limit: u64,
    ) -> Result<VolumeRecord> {
        let mut rec = self.require_volume(id).await?;
        let new_size = self.expansion_target(&rec, required, limit).await?;
        if new_size <= rec.capacity_bytes {
            return Ok(rec);
        }
        let path = self.image_path(&rec)?;
        qemu_img::resize(&path, rec.format, new_size).await?;
        crate::failpoint!("expand.resized");
        rec.capacity_bytes = new_size;
        self.save(&rec).await?;
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

    /// Rewrites a volume's record.
    pub(crate) async fn save(&self, rec: &VolumeRecord) -> Result<()> {
        let pool = self
            .get(&rec.pool)
            .cloned()
            .ok_or_else(|| Error::internal(format!("pool {} is not configured", rec.pool)))?;
        let r = rec.clone();
        exec::blocking(move || pool.write_volume(&r)).await
    }

    /// Readiness: every pool directory is writable.
    pub(crate) async fn check_writable(&self) -> Result<()> {
        let pools = self.pools.clone();
        exec::blocking(move || pools.iter().try_for_each(|p| p.check_writable())).await
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
}
