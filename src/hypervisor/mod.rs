//! Hot-plugging volumes into the libvirt domains that are the nodes, on one or many
//! hypervisor hosts.
//!
//! The node id is a domain UUID (the guest's DMI product_uuid) or a domain name, looked up on
//! every host (`hosts`: one connection per host, the host of each node remembered and
//! re-checked). Publishing attaches the volume's image as a disk with serial `vd-<key>`, LIVE
//! (and CONFIG when the volume has persist=true), and returns only once the disk is in the
//! live XML; a volume whose pool the node's host does not reach is refused. Unpublishing
//! detaches it from the running domain and returns only once it is gone from the live XML (a
//! guest that does not release it within the detach timeout gets a retryable error, never OK),
//! and also from the shut-off definitions a live migration left on other hosts. Which volume
//! is attached where is read back from the domains' XML every time: nothing is kept in memory,
//! so the truth survives a controller restart and a migration.
//!
//! Public API for other parts of the plugin (e.g. live snapshots):
//! - [`Hypervisor::new`] / [`HypervisorConfig::from_config`]; `Hypervisor` implements
//!   [`crate::attach::Attacher`].
//! - [`Hypervisor::with_domain`]: run blocking libvirt code on a node's domain, on its host,
//!   while holding that domain's lock (attach/detach of the same domain wait meanwhile).
//! - `Attacher::snapshot_live` (module `snapshot`): one external disk-only snapshot of some
//!   attached disks of a domain onto overlays the pool created; `freeze_filesystems`,
//!   `thaw_filesystems`, `pause`, `resume` (`snapshot::quiesce`) around it.

pub mod conn;
pub mod diskxml;
pub mod domxml;
mod ffi;
pub(crate) mod hosts;
mod plug;
mod snapshot;
mod tune;
mod unplug;
pub(crate) mod view;

pub(crate) use conn::{DomainLocks, Libvirt};
pub use hosts::HostSpec;
pub use view::{NodeIdKind, PoolImages};

use crate::attach::{
    Attacher, Attachment, DiskSpec, FsFreeze, HostScan, LiveMember, Unreachable, CTX_BUS,
};
use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::params::Qos;
use domxml::DiskXml;
use hosts::{Host, Hosts, Located};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;
use tracing::Instrument;
use virt::domain::Domain;

/// The hypervisor hosts the controller attaches to, and how.
#[derive(Debug, Clone)]
pub struct HypervisorConfig {
    /// The hosts (`[[host]]`, else the one implicit host).
    pub hosts: Vec<HostSpec>,
    /// How long an unpublish waits for the guest to release a disk.
    pub detach_timeout: Duration,
    /// Whether node ids are domain UUIDs or names.
    pub node_id: NodeIdKind,
}

impl HypervisorConfig {
    /// One host at `uri` that attaches `pools` (what a config without `[[host]]` means).
    pub fn single(
        uri: &str,
        pools: Vec<PoolImages>,
        detach_timeout: Duration,
        node_id: NodeIdKind,
    ) -> HypervisorConfig {
        HypervisorConfig {
            hosts: vec![HostSpec {
                name: crate::config::IMPLICIT_HOST.to_string(),
                uri: uri.to_string(),
                pools,
            }],
            detach_timeout,
            node_id,
        }
    }

    /// The hosts, `[libvirt]` settings and pools of the effective configuration.
    pub(crate) fn from_config(cfg: &crate::config::Config) -> HypervisorConfig {
        // Same layout as `pool::Pool::images_dir`.
        let images = |name: &str| {
            cfg.pools
                .iter()
                .find(|p| p.name == name)
                .map(|p| PoolImages {
                    pool: p.name.clone(),
                    images_dir: p.path.join("images"),
                })
        };
        HypervisorConfig {
            hosts: cfg
                .hosts
                .iter()
                .map(|h| HostSpec {
                    name: h.name.clone(),
                    uri: h.uri.clone(),
                    pools: h.pools.iter().filter_map(|p| images(p)).collect(),
                })
                .collect(),
            detach_timeout: Duration::from_secs(cfg.libvirt.detach_timeout_secs),
            node_id: cfg.libvirt.node_id,
        }
    }

    /// Every pool of every host, once: a disk whose source lies in one of these is a plugin
    /// volume, whichever host holds it.
    pub(crate) fn pools(&self) -> Vec<PoolImages> {
        let mut all: Vec<PoolImages> = Vec::new();
        for p in self.hosts.iter().flat_map(|h| &h.pools) {
            if !all.iter().any(|q| q.pool == p.pool) {
                all.push(p.clone());
            }
        }
        all
    }
}

/// The libvirt attach backend.
#[derive(Clone)]
pub struct Hypervisor {
    hosts: Arc<Hosts>,
    cfg: Arc<HypervisorConfig>,
    /// [`HypervisorConfig::pools`].
    pools: Arc<Vec<PoolImages>>,
    locks: DomainLocks,
}

impl Hypervisor {
    /// Does not connect yet (the first call does), so the plugin starts while libvirtd is down.
    pub fn new(cfg: HypervisorConfig) -> Hypervisor {
        Hypervisor {
            hosts: Arc::new(Hosts::new(&cfg.hosts)),
            pools: Arc::new(cfg.pools()),
            cfg: Arc::new(cfg),
            locks: DomainLocks::default(),
        }
    }

    /// Every pool any host attaches.
    pub(crate) fn pools(&self) -> &[PoolImages] {
        &self.pools
    }

    /// The copy of `node_id` to act on; NotFound when no host has it.
    async fn require(&self, node_id: &str) -> Result<Located> {
        self.hosts.locate(node_id).await?.ok_or_else(|| {
            let hosts: Vec<String> = self.hosts.all().iter().map(|h| h.name.clone()).collect();
            Error::NotFound(format!(
                "node {node_id} is not known: no libvirt domain on host(s) {} has that UUID or \
                 name",
                hosts.join(", ")
            ))
        })
    }

    /// `result` of an operation on `node_id`: when the node was not found or its host not
    /// reached, the host it was remembered on is forgotten, so a retry looks everywhere.
    fn settle<T>(&self, node_id: &str, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if matches!(e.code(), Code::NotFound | Code::Unavailable) {
                self.hosts.forget(node_id);
            }
        }
        result
    }

    /// Runs `f` on the domain of `node_id` on its host's blocking pool, holding that domain's
    /// lock until `f` returns (even if the caller gives up first). NotFound when there is no
    /// such domain. Map libvirt errors with [`Libvirt::error`].
    pub(crate) async fn with_domain<T, F>(&self, node_id: &str, f: F) -> Result<T>
    where
        F: FnOnce(&Domain, &Libvirt) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let at = self.require(node_id).await?;
        let guard = self.locks.lock(&at.copy.uuid).await;
        let uuid = at.copy.uuid.clone();
        let result = at
            .host
            .lv
            .write(move |c, l| {
                let _guard = guard;
                let dom = plug::domain_by_uuid(c, l, &uuid)?;
                f(&dom, l)
            })
            .await;
        self.settle(node_id, result)
    }

    /// Runs `f` on the domain of `node_id`, on its host, on a blocking thread WITHOUT the
    /// domain's lock: for calls that change nothing the lock guards (guest agent, pause) and
    /// may wait long.
    async fn with_domain_unlocked<T, F>(&self, node_id: &str, f: F) -> Result<T>
    where
        F: FnOnce(&Domain, &Libvirt) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let at = self.require(node_id).await?;
        let uuid = at.copy.uuid.clone();
        let result = at
            .host
            .lv
            .write(move |c, l| {
                let dom = plug::domain_by_uuid(c, l, &uuid)?;
                f(&dom, l)
            })
            .await;
        self.settle(node_id, result)
    }

    fn reported_id(&self, uuid: &str, name: &str) -> String {
        match self.cfg.node_id {
            NodeIdKind::Uuid => uuid.to_string(),
            NodeIdKind::Name => name.to_string(),
        }
    }

    /// Every plugin disk of every domain of `host`.
    async fn host_attachments(&self, host: &Arc<Host>) -> Result<Vec<Attachment>> {
        let (pools, kind) = (self.pools.clone(), self.cfg.node_id);
        host.lv
            .read(move |c, l| {
                let mut out = Vec::new();
                for v in view::read_all_views(c, l)? {
                    let node = v.node_id(kind);
                    for (vol, disk) in v.plugin_disks(&pools) {
                        out.push(attachment_of(node, &vol, disk));
                    }
                }
                Ok(out)
            })
            .await
    }

    /// The attachments of `hosts`, read at once; the hosts that could not be read (or did not
    /// answer within [`READ_TIMEOUT`]) apart.
    async fn read_hosts(&self, hosts: Vec<Arc<Host>>) -> HostScan {
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let this = self.clone();
            tasks.spawn(
                async move {
                    let read = host
                        .lv
                        .bounded(READ_TIMEOUT, this.host_attachments(&host))
                        .await;
                    (host, read)
                }
                .in_current_span(),
            );
        }
        let mut scan = HostScan::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(list))) => scan.known.extend(list),
                Ok((host, Err(e))) => scan.unreachable.push(Unreachable {
                    host: host.name.clone(),
                    pools: host.pool_names(),
                    error: e.to_string(),
                }),
                Err(e) => tracing::warn!(error = %e, "a host read task failed"),
            }
        }
        scan.unreachable.sort_by(|a, b| a.host.cmp(&b.host));
        scan
    }

    /// Refuses a volume whose pool the host of `at` cannot reach (a local pool of another host).
    fn check_reach(&self, node_id: &str, at: &Located, volume_id: &VolumeId) -> Result<()> {
        let pool = volume_id.pool();
        if at.host.attaches(pool) {
            return Ok(());
        }
        let owners: Vec<String> = self
            .hosts
            .attaching(pool)
            .iter()
            .map(|h| h.name.clone())
            .collect();
        Err(Error::FailedPrecondition(format!(
            "volume {volume_id} is in pool {pool}, which only host(s) {} can attach, but node \
             {node_id} runs on host {}; publish it to a node on {}, or list pool {pool} among \
             host {}'s pools if that host reaches the same files",
            if owners.is_empty() {
                "(none)".to_string()
            } else {
                owners.join(", ")
            },
            at.host.name,
            owners.join(" or "),
            at.host.name
        )))
    }
}

/// How long reading one host's domains may take before the host counts as unreachable for
/// that read (its call goes on, on its own permits).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// "host NAME: why; …" of the hosts a scan could not read.
fn unreachable_hosts(scan: &HostScan) -> String {
    let why: Vec<String> = scan
        .unreachable
        .iter()
        .map(|u| format!("host {}: {}", u.host, u.error))
        .collect();
    why.join("; ")
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
        match self.hosts.locate(node_id).await {
            Ok(found) => Ok(found.is_some()),
            // Shut off on several hosts: ours, and the operation says what is wrong.
            Err(e) if e.code() == Code::FailedPrecondition => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn canonical_node_id(&self, node_id: &str) -> Result<String> {
        Ok(match self.hosts.locate(node_id).await? {
            Some(at) => self.reported_id(&at.copy.uuid, &at.copy.name),
            None => node_id.to_string(),
        })
    }

    async fn attachments(&self) -> Result<Vec<Attachment>> {
        let scan = self.scan_hosts().await?;
        match scan.unreachable.into_iter().next() {
            None => Ok(scan.known),
            Some(u) => Err(Error::Unavailable(format!(
                "cannot read the domains of host {}: {}",
                u.host, u.error
            ))),
        }
    }

    /// Every host that answers; when none does, nothing is known: UNAVAILABLE.
    async fn scan_hosts(&self) -> Result<HostScan> {
        let scan = self.read_hosts(self.hosts.all().to_vec()).await;
        if scan.unreachable.len() == self.hosts.all().len() {
            return Err(Error::Unavailable(format!(
                "no hypervisor host can be read: {}",
                unreachable_hosts(&scan)
            )));
        }
        Ok(scan)
    }

    async fn attach(&self, node_id: &str, spec: &DiskSpec, max: u64) -> Result<Attachment> {
        let at = self.require(node_id).await?;
        self.check_reach(node_id, &at, &spec.volume_id)?;
        let guard = self.locks.lock(&at.copy.uuid).await;
        let started = Instant::now();
        let pools = self.pools.clone();
        let spec = spec.clone();
        let uuid = at.copy.uuid.clone();
        let node = self.reported_id(&at.copy.uuid, &at.copy.name);
        let attached = at
            .host
            .lv
            .write(move |c, l| {
                // Held until the attach ends, even if the caller gives up first.
                let _guard = guard;
                plug::attach(c, l, &pools, &uuid, &node, &spec, max)
            })
            .await;
        let att = self.settle(node_id, attached)?;
        crate::metrics::observe_attach(&at.host.name, started.elapsed());
        tracing::debug!(node = %node_id, host = %at.host.name, volume = %att.volume_id,
            ms = started.elapsed().as_millis() as u64, "disk attached and confirmed");
        Ok(att)
    }

    async fn detach(&self, node_id: &str, volume_id: &VolumeId) -> Result<()> {
        // Every copy: the running domain, and the definitions a migration left elsewhere.
        let placement = self.hosts.placement(node_id).await;
        let placement = self.settle(node_id, placement)?;
        let Some(uuid) = placement
            .primary
            .iter()
            .chain(&placement.others)
            .map(|c| c.uuid.clone())
            .next()
        else {
            return Ok(());
        };
        let guard = self.locks.lock(&uuid).await;
        let started = Instant::now();
        if let Some(primary) = &placement.primary {
            let host = self.hosts.host(primary.host);
            let detached =
                unplug::detach(&host.lv, &guard, &uuid, volume_id, self.cfg.detach_timeout).await;
            if self.settle(node_id, detached)? {
                crate::metrics::observe_detach(&host.name, started.elapsed());
            }
        }
        for stale in &placement.others {
            let host = self.hosts.host(stale.host);
            let removed = unplug::remove_stale(&host.lv, &guard, &uuid, volume_id).await;
            self.settle(node_id, removed)?;
        }
        if !placement.unreachable.is_empty() {
            tracing::warn!(node = %node_id, volume = %volume_id, hosts = ?placement.unreachable,
                "detached from the running domain; definitions on unreachable hosts not checked");
        }
        Ok(())
    }

    async fn resize(&self, node_id: &str, volume_id: &VolumeId, size: u64) -> Result<()> {
        let at = self.require(node_id).await?;
        let guard = self.locks.lock(&at.copy.uuid).await;
        let resized = tune::resize(&at.host.lv, &guard, &at.copy.uuid, volume_id, size).await;
        self.settle(node_id, resized)
    }

    async fn set_qos(&self, node_id: &str, volume_id: &VolumeId, qos: &Qos) -> Result<()> {
        let at = self.require(node_id).await?;
        let guard = self.locks.lock(&at.copy.uuid).await;
        let set = tune::set_qos(&at.host.lv, &guard, &at.copy.uuid, volume_id, qos).await;
        self.settle(node_id, set)
    }

    /// Ready when at least one host answers: a host that is down fails only its own nodes'
    /// operations (`virtdisk_csi_host_up` shows which).
    async fn check_health(&self) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for host in self.hosts.all() {
            let lv = host.lv.clone();
            tasks.spawn(async move { lv.ping().await }.in_current_span());
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::internal(format!("health check task: {e}")));
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::internal("no hypervisor host is configured")))
    }

    fn ledger_name(&self) -> Option<&'static str> {
        Some("libvirt")
    }

    async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
        snapshot::snapshot_live(self, node_id, members).await
    }

    async fn guest_agent(&self, node_id: &str, _members: &[VolumeId]) -> Result<bool> {
        self.with_domain_unlocked(node_id, snapshot::quiesce::agent_connected)
            .await
    }

    /// The guest agent freezes every file system of the guest, whatever the members.
    async fn freeze_filesystems(&self, node_id: &str, _members: &[VolumeId]) -> Result<FsFreeze> {
        let frozen = self
            .with_domain_unlocked(node_id, snapshot::quiesce::freeze)
            .await?;
        Ok(frozen.map_or(FsFreeze::NoAgent, FsFreeze::Frozen))
    }

    async fn thaw_filesystems(&self, node_id: &str, _members: &[VolumeId]) -> Result<()> {
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
