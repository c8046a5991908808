//! Hot-plugging volumes into the libvirt domains that are the nodes.
//!
//! The node id is a domain UUID (the guest's DMI product_uuid) or a domain name. Publishing
//! attaches the volume's image as a disk with serial `vd-<key>`, LIVE (and CONFIG when the
//! volume has persist=true), and returns only once the disk is in the live XML. Unpublishing
//! detaches it and returns only once it is gone from the live XML; a guest that does not
//! release it within the detach timeout gets a retryable error, never OK. Which volume is
//! attached where is read back from the domains' XML every time: nothing is kept in memory,
//! so the truth survives a controller restart.
//!
//! Public API for other parts of the plugin (e.g. live snapshots):
//! - [`Hypervisor::new`] / [`HypervisorConfig::from_config`]; `Hypervisor` implements
//!   [`crate::attach::Attacher`].
//! - [`Hypervisor::with_domain`]: run blocking libvirt code on a node's domain while holding
//!   that domain's lock (attach/detach of the same domain wait meanwhile).
//! - [`Hypervisor::libvirt`]: the shared connection ([`Libvirt::read`] / [`Libvirt::write`]).
//! - `Attacher::snapshot_live` (module `snapshot`): one external disk-only snapshot of some
//!   attached disks of a domain onto overlays the pool created; `freeze_filesystems`,
//!   `thaw_filesystems`, `pause`, `resume` (`snapshot::quiesce`) around it.

pub mod conn;
pub mod diskxml;
pub mod domxml;
mod ffi;
mod plug;
mod snapshot;
mod tune;
mod unplug;
pub(crate) mod view;

pub(crate) use conn::{DomainLocks, Libvirt};
pub use view::{NodeIdKind, PoolImages};

use crate::attach::{Attacher, Attachment, DiskSpec, FsFreeze, LiveMember, CTX_BUS};
use crate::error::{Error, Result};
use crate::params::Qos;
use domxml::DiskXml;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use virt::domain::Domain;

/// One libvirt host the controller attaches to.
#[derive(Debug, Clone)]
pub struct HypervisorConfig {
    /// libvirt URI of the host.
    pub uri: String,
    /// How long an unpublish waits for the guest to release a disk.
    pub detach_timeout: Duration,
    /// The pools whose images this host may attach (source dir → pool of a disk).
    pub pools: Vec<PoolImages>,
    /// Whether node ids are domain UUIDs or names.
    pub node_id: NodeIdKind,
}

impl HypervisorConfig {
    /// The `[libvirt]` section and the pools of the effective configuration.
    pub(crate) fn from_config(cfg: &crate::config::Config) -> HypervisorConfig {
        HypervisorConfig {
            uri: cfg.libvirt.uri.clone(),
            detach_timeout: Duration::from_secs(cfg.libvirt.detach_timeout_secs),
            // Same layout as `pool::Pool::images_dir`.
            pools: cfg
                .pools
                .iter()
                .map(|p| PoolImages {
                    pool: p.name.clone(),
                    images_dir: p.path.join("images"),
                })
                .collect(),
            node_id: cfg.libvirt.node_id,
        }
    }
}

/// The libvirt attach backend.
#[derive(Clone)]
pub struct Hypervisor {
    lv: Libvirt,
    cfg: Arc<HypervisorConfig>,
    locks: DomainLocks,
}

impl Hypervisor {
    /// Does not connect yet (the first call does), so the plugin starts while libvirtd is down.
    pub fn new(cfg: HypervisorConfig) -> Hypervisor {
        Hypervisor {
            lv: Libvirt::new(&cfg.uri),
            cfg: Arc::new(cfg),
            locks: DomainLocks::default(),
        }
    }

    pub(crate) fn libvirt(&self) -> &Libvirt {
        &self.lv
    }

    pub(crate) fn config(&self) -> &HypervisorConfig {
        &self.cfg
    }

    /// Runs `f` on the domain of `node_id` on a blocking thread, holding that domain's lock.
    /// NotFound when there is no such domain. Map libvirt errors with [`Libvirt::error`].
    pub(crate) async fn with_domain<T, F>(&self, node_id: &str, f: F) -> Result<T>
    where
        F: FnOnce(&Domain, &Libvirt) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (uuid, _) = self.require_domain(node_id).await?;
        let guard = self.locks.lock(&uuid).await;
        self.lv
            .write(move |c, l| {
                // Held until the blocking work ends, even if the caller gives up first.
                let _guard = guard;
                let dom = plug::domain_by_uuid(c, l, &uuid)?;
                f(&dom, l)
            })
            .await
    }

    /// Runs `f` on the domain of `node_id` on a blocking thread WITHOUT the domain's lock: for
    /// calls that change nothing the lock guards (guest agent, pause) and may wait long.
    async fn with_domain_unlocked<T, F>(&self, node_id: &str, f: F) -> Result<T>
    where
        F: FnOnce(&Domain, &Libvirt) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (uuid, _) = self.require_domain(node_id).await?;
        self.lv
            .write(move |c, l| {
                let dom = plug::domain_by_uuid(c, l, &uuid)?;
                f(&dom, l)
            })
            .await
    }

    /// (UUID, name) of the domain that is `node_id`, if any.
    async fn resolve(&self, node_id: &str) -> Result<Option<(String, String)>> {
        let node = node_id.to_string();
        self.lv
            .read(move |c, l| {
                let Some(dom) = view::find_domain(c, l, &node)? else {
                    return Ok(None);
                };
                let uuid = dom
                    .uuid_string()
                    .map_err(|e| l.error("reading the domain UUID", e))?;
                let name = dom
                    .name()
                    .map_err(|e| l.error("reading the domain name", e))?;
                Ok(Some((uuid.to_ascii_lowercase(), name)))
            })
            .await
    }

    async fn require_domain(&self, node_id: &str) -> Result<(String, String)> {
        self.resolve(node_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "node {node_id} is not known: no libvirt domain at {} has that UUID or name",
                self.lv.uri()
            ))
        })
    }

    fn reported_id(&self, uuid: &str, name: &str) -> String {
        match self.cfg.node_id {
            NodeIdKind::Uuid => uuid.to_string(),
            NodeIdKind::Name => name.to_string(),
        }
    }
}

/// The attachment a plugin disk stands for.
fn attachment_of(node_id: &str, volume_id: &str, disk: &DiskXml) -> Attachment {
    let mut context = BTreeMap::new();
    let bus = diskxml::parse_bus(&disk.bus).unwrap_or_else(|| {
        // Not a bus we attach with (someone changed the disk): tell the node the truth.
        context.insert(CTX_BUS.to_string(), disk.bus.clone());
        crate::params::Bus::Scsi
    });
    Attachment {
        node_id: node_id.to_string(),
        volume_id: volume_id.to_string(),
        serial: disk.serial.clone().unwrap_or_default(),
        bus,
        readonly: disk.readonly,
        shareable: disk.shareable,
        context,
        abnormal: None,
    }
}

#[async_trait::async_trait]
impl Attacher for Hypervisor {
    async fn serves(&self, node_id: &str) -> Result<bool> {
        Ok(self.resolve(node_id).await?.is_some())
    }

    async fn canonical_node_id(&self, node_id: &str) -> Result<String> {
        Ok(match self.resolve(node_id).await? {
            Some((uuid, name)) => self.reported_id(&uuid, &name),
            None => node_id.to_string(),
        })
    }

    async fn attachments(&self) -> Result<Vec<Attachment>> {
        let cfg = self.cfg.clone();
        self.lv
            .read(move |c, l| {
                let mut out = Vec::new();
                for v in view::read_all_views(c, l)? {
                    let node = v.node_id(cfg.node_id);
                    for (vol, disk) in v.plugin_disks(&cfg.pools) {
                        out.push(attachment_of(node, &vol, disk));
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn attach(&self, node_id: &str, spec: &DiskSpec, max: u64) -> Result<Attachment> {
        let (uuid, name) = self.require_domain(node_id).await?;
        let guard = self.locks.lock(&uuid).await;
        let started = std::time::Instant::now();
        let cfg = self.cfg.clone();
        let spec = spec.clone();
        let node = self.reported_id(&uuid, &name);
        let att = self
            .lv
            .write(move |c, l| {
                // Held until the attach ends, even if the caller gives up first.
                let _guard = guard;
                plug::attach(c, l, &cfg, &uuid, &node, &spec, max)
            })
            .await?;
        tracing::debug!(node = %node_id, volume = %att.volume_id,
            ms = started.elapsed().as_millis() as u64, "disk attached and confirmed");
        Ok(att)
    }

    async fn detach(&self, node_id: &str, volume_id: &str) -> Result<()> {
        let Some((uuid, _)) = self.resolve(node_id).await? else {
            return Ok(());
        };
        let _g = self.locks.lock(&uuid).await;
        unplug::detach(self, &uuid, volume_id).await
    }

    async fn resize(&self, node_id: &str, volume_id: &str, size: u64) -> Result<()> {
        let (uuid, _) = self.require_domain(node_id).await?;
        let _g = self.locks.lock(&uuid).await;
        tune::resize(self, &uuid, volume_id, size).await
    }

    async fn set_qos(&self, node_id: &str, volume_id: &str, qos: &Qos) -> Result<()> {
        let (uuid, _) = self.require_domain(node_id).await?;
        let _g = self.locks.lock(&uuid).await;
        tune::set_qos(self, &uuid, volume_id, qos).await
    }

    async fn check_health(&self) -> Result<()> {
        self.lv.ping().await
    }

    fn ledger_name(&self) -> Option<&'static str> {
        Some("libvirt")
    }

    async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
        snapshot::snapshot_live(self, node_id, members).await
    }

    async fn guest_agent(&self, node_id: &str) -> Result<bool> {
        self.with_domain_unlocked(node_id, snapshot::quiesce::agent_connected)
            .await
    }

    async fn freeze_filesystems(&self, node_id: &str) -> Result<FsFreeze> {
        let frozen = self
            .with_domain_unlocked(node_id, snapshot::quiesce::freeze)
            .await?;
        Ok(frozen.map_or(FsFreeze::NoAgent, FsFreeze::Frozen))
    }

    async fn thaw_filesystems(&self, node_id: &str) -> Result<()> {
        let thawed = self
            .with_domain_unlocked(node_id, snapshot::quiesce::thaw)
            .await?;
        tracing::debug!(node = %node_id, filesystems = thawed, "guest file systems thawed");
        Ok(())
    }

    async fn pause(&self, node_id: &str) -> Result<bool> {
        self.with_domain_unlocked(node_id, snapshot::quiesce::pause)
            .await
    }

    async fn resume(&self, node_id: &str) -> Result<()> {
        self.with_domain_unlocked(node_id, snapshot::quiesce::resume)
            .await
    }
}
