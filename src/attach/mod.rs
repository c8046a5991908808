//! Attaching volumes to nodes. A node is either a libvirt domain (hot-plug, `hypervisor`) or
//! this host itself (local attach). `Attachments` holds the rules every backend shares:
//! idempotent publish, single-node exclusivity, per-node limits, confirmed detach.

mod ledger;
mod live;

pub(crate) use live::NodeMembers;
pub use live::{FsFreeze, LiveMember, DEFAULT_QUIESCE_TIMEOUT};

use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::model::Capability;
use crate::params::{Bus, DiskOptions};
use crate::pool::VolumeRecord;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// publish_context keys the node plugin reads.
pub(crate) const CTX_SERIAL: &str = "serial";
pub(crate) const CTX_BUS: &str = "bus";
/// Local attach: the host block device path.
pub(crate) const CTX_DEVICE: &str = "devicePath";

/// What to attach.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The CSI volume id (`<pool>.<key>`).
    pub volume_id: VolumeId,
    /// The disk serial the guest sees (`vd-<key>`): how the node finds the device.
    pub serial: String,
    /// Absolute path of the image to attach (the volume's active layer).
    pub image: PathBuf,
    /// The image format (`<driver type>`).
    pub format: crate::model::ImageFormat,
    /// Bus, cache, I/O mode and QoS from the volume's parameters.
    pub options: DiskOptions,
    /// Attach read-only.
    pub readonly: bool,
    /// Several domains may hold it at once (raw images only).
    pub shareable: bool,
}

/// A volume attached to a node, as read back from the node's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The node (domain UUID or name, or the local host's id).
    pub node_id: String,
    /// The CSI volume id (`<pool>.<key>`).
    pub volume_id: String,
    /// The disk serial (`vd-<key>`).
    pub serial: String,
    /// The bus the disk is on.
    pub bus: Bus,
    /// Attached read-only.
    pub readonly: bool,
    /// Attached shareable (several nodes may write it: multi-node writer modes).
    pub shareable: bool,
    /// Extra publish_context entries (e.g. a local device path).
    pub context: BTreeMap<String, String>,
    /// Why the attachment cannot serve I/O (e.g. the local storage daemon died); None when it
    /// is healthy. Reported as an abnormal volume condition; a publish repairs it or says why
    /// it cannot.
    pub abnormal: Option<String>,
}

impl Attachment {
    /// serial and bus, then the backend's own entries (which win, e.g. `bus=local`).
    pub(crate) fn publish_context(&self) -> BTreeMap<String, String> {
        let mut ctx = BTreeMap::new();
        ctx.insert(CTX_SERIAL.into(), self.serial.clone());
        ctx.insert(
            CTX_BUS.into(),
            serde_json::to_value(self.bus)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
        ctx.extend(self.context.clone());
        ctx
    }
}

/// A hypervisor host whose nodes could not be read (its libvirtd is down): which pools'
/// attachments are missing from a [`HostScan`], and why.
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// The host's name.
    pub host: String,
    /// The pools its domains may hold volumes of.
    pub pools: Vec<String>,
    /// Why it could not be read.
    pub error: String,
}

/// What a backend of several hosts could read: the attachments of the hosts that answered,
/// and the hosts that did not (their volumes' attachments are unknown, not absent).
#[derive(Debug, Clone, Default)]
pub struct HostScan {
    /// The attachments read.
    pub known: Vec<Attachment>,
    /// The hosts that could not be read.
    pub unreachable: Vec<Unreachable>,
}

/// What a live snapshot did on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveSnapshot {
    /// The guest's file systems were frozen around the switch (a guest agent answered).
    pub quiesced: bool,
}

/// Whether an error of a change (`Attacher::snapshot_live`, a pause) leaves its outcome
/// unknown (UNAVAILABLE, DEADLINE_EXCEEDED) rather than definite.
pub(crate) fn outcome_unknown(e: &Error) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    )
}

/// One way of attaching disks to nodes.
#[async_trait::async_trait]
pub trait Attacher: Send + Sync {
    /// Whether this backend serves `node_id` (a libvirt domain UUID or name, or this host).
    async fn serves(&self, node_id: &str) -> Result<bool>;
    /// Asked before the other backends: its node ids can name nothing another backend
    /// serves (e.g. this host's own id on a host that is no VM), so a node of its own never
    /// waits for, or fails with, another backend (libvirtd down).
    fn serves_first(&self) -> bool {
        false
    }
    /// The id `attachments()` reports for `node_id` (e.g. a domain name → its UUID), so a
    /// publish by another id of the same node is recognized.
    async fn canonical_node_id(&self, node_id: &str) -> Result<String> {
        Ok(node_id.to_string())
    }
    /// Every attachment of a plugin volume on every node this backend serves.
    async fn attachments(&self) -> Result<Vec<Attachment>>;
    /// Every attachment that can be read now, and the hosts that cannot be read: one host
    /// down leaves the others' attachments known. UNAVAILABLE when no host can be read.
    async fn scan_hosts(&self) -> Result<HostScan> {
        Ok(HostScan {
            known: self.attachments().await?,
            unreachable: Vec::new(),
        })
    }
    /// Attaches and confirms the disk is there. `max` > 0 bounds the node's disk count.
    async fn attach(&self, node_id: &str, spec: &DiskSpec, max: u64) -> Result<Attachment>;
    /// Detaches and confirms the disk is gone; OK when it was not attached.
    async fn detach(&self, node_id: &str, volume_id: &VolumeId) -> Result<()>;
    /// Grows an attached disk so the node sees the new size now.
    async fn resize(&self, node_id: &str, volume_id: &VolumeId, size: u64) -> Result<()>;
    /// Applies QoS to an attached disk.
    async fn set_qos(
        &self,
        node_id: &str,
        volume_id: &VolumeId,
        qos: &crate::params::Qos,
    ) -> Result<()>;
    /// Ready to serve (e.g. libvirtd reachable).
    async fn check_health(&self) -> Result<()>;
    /// A backend that can be unreachable (libvirtd restarting, a remote host down) names the
    /// ledger that records what it may hold, so RPCs about other volumes never need it.
    fn ledger_name(&self) -> Option<&'static str> {
        None
    }
    /// Live snapshot of attached disks of one node, in ONE operation: the node stops writing
    /// each member's current image and continues in its overlay, all at the same point of its
    /// write stream (libvirt: one external disk-only snapshot with REUSE_EXT | NO_METADATA |
    /// ATOMIC, which QEMU applies as one transaction). File systems are frozen by the caller
    /// (`freeze_filesystems`), not here.
    /// Ok only once the node writes to every overlay; an error must mean it still writes to
    /// every old image (the caller then deletes the overlays), except UNAVAILABLE and
    /// DEADLINE_EXCEEDED, whose outcome is unknown.
    async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
        let _ = (node_id, members);
        Err(Error::Unimplemented(
            "this attach backend cannot snapshot attached volumes".into(),
        ))
    }
    /// Who freezes the node's file systems, for messages ("the guest agent").
    fn freezer(&self) -> &'static str {
        "the guest agent"
    }
    /// Whether something can freeze file systems of `members` on the node (a guest agent
    /// (qemu-guest-agent) connected to it), so that `freeze_filesystems` can freeze anything.
    /// Quick: no guest round trip.
    async fn guest_agent(&self, node_id: &str, members: &[VolumeId]) -> Result<bool> {
        let _ = (node_id, members);
        Ok(false)
    }
    /// Freezes the file systems holding `members` on the node: a guest agent (qemu-guest-agent)
    /// freezes all of its guest's, a host only those on the members' devices. May take as
    /// long as the guest does: the caller bounds the wait.
    async fn freeze_filesystems(&self, node_id: &str, members: &[VolumeId]) -> Result<FsFreeze> {
        let _ = (node_id, members);
        Ok(FsFreeze::NoAgent)
    }
    /// Thaws what `freeze_filesystems` froze for `members` (nothing to do when nothing is
    /// frozen); no members: everything this plugin may have left frozen on the node (a
    /// restart).
    async fn thaw_filesystems(&self, node_id: &str, members: &[VolumeId]) -> Result<()> {
        let _ = (node_id, members);
        Ok(())
    }
    /// Pauses the node (its vCPUs) if it runs; whether this call paused it.
    async fn pause(&self, node_id: &str) -> Result<bool> {
        let _ = node_id;
        Err(Error::Unimplemented(
            "this attach backend cannot pause its nodes".into(),
        ))
    }
    /// Resumes a node `pause` paused.
    async fn resume(&self, node_id: &str) -> Result<()> {
        let _ = node_id;
        Ok(())
    }
}

/// How a disk is attached, in words.
fn describe_disk(readonly: bool, shareable: bool) -> &'static str {
    match (readonly, shareable) {
        (true, _) => "read-only",
        (false, true) => "read-write and shareable (multi-node)",
        (false, false) => "read-write (single node)",
    }
}

/// The publish request, in domain terms.
#[derive(Debug, Clone)]
pub(crate) struct Publish {
    pub(crate) node_id: String,
    pub(crate) capability: Capability,
    pub(crate) readonly: bool,
}

/// Every attach backend of this process (libvirt hot-plug, local attach), in order: the first that knows a node id attaches there.
#[derive(Clone, Default)]
pub struct Attachments {
    backends: Vec<Arc<dyn Attacher>>,
    /// Per backend (same order): the ledger of a backend that can be unreachable.
    ledgers: Vec<Option<ledger::Ledger>>,
    max_per_node: u64,
    /// One recent read of every node, shared by listings (see `recent`).
    recent: Arc<RecentScan>,
    /// Freezing and pausing nodes around live snapshots (see `live`).
    quiesce: live::QuiesceSettings,
}

/// The last full read of the nodes, and a counter of the attach changes made by this process,
/// so a read is never reused across a change made here.
#[derive(Default)]
struct RecentScan {
    last: std::sync::Mutex<Option<Kept>>,
    changes: AtomicU64,
}

struct Kept {
    /// When the read began.
    at: Instant,
    /// `RecentScan::changes` when the read began.
    changes: u64,
    scan: Arc<Scan>,
}

/// One read of every backend: the attachments they report, and for each backend that could
/// not be asked, why and what its ledger says it may hold.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) known: Vec<Attachment>,
    gaps: Vec<Gap>,
}

#[derive(Debug)]
struct Gap {
    reason: String,
    may_hold: std::collections::BTreeMap<String, ledger::Entry>,
    /// A host that could not be read and keeps no ledger: it may hold any volume of these
    /// pools (nodes unknown).
    pools: Vec<String>,
}

/// The pool of a volume id (`<pool>.<key>`).
fn pool_of(volume_id: &str) -> &str {
    volume_id.split_once('.').map_or("", |(pool, _)| pool)
}

impl Scan {
    /// The volume's attachments; UNAVAILABLE when a backend that could not be asked may hold
    /// the volume (its ledger says so).
    pub(crate) fn of_volume(&self, volume_id: &str) -> Result<Vec<&Attachment>> {
        if let Some((nodes, reason)) = self.unconfirmed(volume_id) {
            return Err(Error::Unavailable(format!(
                "{reason}; volume {volume_id} may be attached through it{}, so this cannot be \
                 decided until it is back",
                if nodes.is_empty() {
                    String::new()
                } else {
                    format!(" (to {})", nodes.join(", "))
                }
            )));
        }
        Ok(self
            .known
            .iter()
            .filter(|a| a.volume_id == volume_id)
            .collect())
    }

    /// Nodes a backend that could not be asked may hold the volume on (empty: unknown), and
    /// why it could not be asked; None when every backend that may hold it answered.
    pub(crate) fn unconfirmed(&self, volume_id: &str) -> Option<(Vec<String>, String)> {
        self.gaps.iter().find_map(|g| {
            let by_ledger = g.may_hold.get(volume_id).map(|e| e.nodes.iter().cloned());
            let by_pool = g.pools.iter().any(|p| p == pool_of(volume_id));
            match by_ledger {
                Some(nodes) => Some((nodes.collect(), g.reason.clone())),
                None if by_pool => Some((Vec::new(), g.reason.clone())),
                None => None,
            }
        })
    }
}

/// How long ListVolumes pages may share one read of the nodes.
pub(crate) const LISTING_MAX_AGE: Duration = Duration::from_secs(2);

impl Attachments {
    /// Backends in the order they are asked; `max_per_node` caps the volumes on one node (0: no cap).
    pub fn new(backends: Vec<Arc<dyn Attacher>>, max_per_node: u64) -> Self {
        Attachments {
            ledgers: vec![None; backends.len()],
            backends,
            max_per_node,
            recent: Arc::default(),
            quiesce: live::QuiesceSettings::default(),
        }
    }

    /// How long a guest agent may take to freeze, and the longest guests stay frozen or
    /// paused for a live snapshot.
    pub fn with_quiesce_timeout(mut self, timeout: Duration) -> Self {
        self.quiesce.timeout = timeout;
        self
    }

    /// Notes the nodes held (frozen or paused) for a live snapshot in `dir` (the controller's
    /// own, not the pools': only the process that held a node releases it), so that a
    /// restarted controller releases them (`release_left_quiesced`).
    pub fn with_quiesce_markers(mut self, dir: &Path) -> Self {
        self.quiesce.markers = Some(dir.to_path_buf());
        self
    }

    /// Keeps a ledger in `<pool dir>/attach-ledger/<name>` of every pool (name, directory)
    /// for every backend that names one (`Attacher::ledger_name`); `init_ledgers` starts
    /// them. Every process sharing a pool shares its ledger.
    pub fn with_ledgers(mut self, pools: &[(String, PathBuf)]) -> Self {
        self.ledgers = self
            .backends
            .iter()
            .map(|b| b.ledger_name().map(|n| ledger::Ledger::new(n, pools)))
            .collect();
        self
    }

    /// Starts the ledgers once (at server start): `existing` (every volume the pools hold now)
    /// may be attached from before the ledger existed, until a read of the backend says.
    pub(crate) async fn init_ledgers(&self, existing: Vec<String>) -> Result<()> {
        if existing.is_empty() && !self.ledgers_need_init() {
            return Ok(());
        }
        for l in self.ledgers.iter().flatten() {
            let (l, existing) = (l.clone(), existing.clone());
            crate::exec::blocking(move || l.init(&existing)).await?;
        }
        Ok(())
    }

    /// Some ledger has not started yet (`init_ledgers` needs the pools' volumes). Blocking but
    /// quick (one stat per ledger).
    pub(crate) fn ledgers_need_init(&self) -> bool {
        self.ledgers.iter().flatten().any(|l| !l.ready())
    }

    /// Every attachment, as read from the nodes at most `max_age` ago and after the last
    /// publish or unpublish made by this process. For listings only (the pages of one
    /// ListVolumes walk then cost one read of every domain instead of one each): decisions
    /// (publish, unpublish, delete, snapshots) read the nodes now with `scan`. Nothing
    /// outlives the process, and a change made elsewhere shows within `max_age`.
    pub(crate) async fn recent(&self, max_age: Duration) -> Result<Arc<Scan>> {
        let changes = self.recent.changes.load(Ordering::SeqCst);
        {
            let last = self.recent.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(kept) = &*last {
                if kept.changes == changes && kept.at.elapsed() <= max_age {
                    return Ok(kept.scan.clone());
                }
            }
        }
        let started = Instant::now();
        let scan = Arc::new(self.scan().await?);
        let mut last = self.recent.last.lock().unwrap_or_else(|p| p.into_inner());
        // A change made while reading may be missing from `scan`: then do not keep it.
        if self.recent.changes.load(Ordering::SeqCst) == changes {
            *last = Some(Kept {
                at: started,
                changes,
                scan: scan.clone(),
            });
        }
        Ok(scan)
    }

    /// Called around every attach change made here: reads kept by `recent` are stale.
    fn changed(&self) {
        self.recent.changes.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn is_enabled(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The index of the backend serving `node_id`: first those that serve their own ids first
    /// (this host), then the others in order. A backend that cannot tell (its host is down)
    /// does not stop the others from claiming the node; its error is returned only when none
    /// does.
    async fn backend_index(&self, node_id: &str) -> Result<Option<usize>> {
        let order = (0..self.backends.len())
            .filter(|i| self.backends[*i].serves_first())
            .chain((0..self.backends.len()).filter(|i| !self.backends[*i].serves_first()));
        let mut failed = None;
        for i in order {
            match self.backends[i].serves(node_id).await {
                Ok(true) => return Ok(Some(i)),
                Ok(false) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn backend_for(&self, node_id: &str) -> Result<Option<&Arc<dyn Attacher>>> {
        Ok(self
            .backend_index(node_id)
            .await?
            .map(|i| &self.backends[i]))
    }

    /// Reads every backend now. A backend that cannot be asked (UNAVAILABLE) but keeps a
    /// ready ledger leaves a gap instead of failing the read: decisions about the volumes it
    /// may hold fail (`Scan::of_volume`), the others go on. A host of a backend that cannot be
    /// read leaves a gap too: the volumes its ledger places there, or (without a ledger) any
    /// volume of the pools that host attaches. A complete read of a backend brings its ledger
    /// in line.
    pub(crate) async fn scan(&self) -> Result<Scan> {
        let mut scan = Scan::default();
        for (b, l) in self.backends.iter().zip(&self.ledgers) {
            // Where the ledger stood when the read began, to bring it in line after.
            let marks = match l.clone() {
                Some(l) => match crate::exec::blocking(move || l.marks()).await {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the attach ledger");
                        None
                    }
                },
                None => None,
            };
            match b.scan_hosts().await {
                Ok(read) if read.unreachable.is_empty() => {
                    if let (Some(l), Some(marks)) = (l, marks) {
                        let (l, found) = (l.clone(), read.known.clone());
                        if let Err(e) =
                            crate::exec::blocking(move || l.reconcile(&found, &marks)).await
                        {
                            tracing::warn!(error = %e, "cannot update the attach ledger");
                        }
                    }
                    scan.known.extend(read.known);
                }
                Ok(read) => {
                    // Part of the backend answered: its ledger stays as it is (it may only
                    // claim too much), and each host that did not answer leaves a gap.
                    let entries = match l.clone() {
                        Some(l) => crate::exec::blocking(move || l.entries()).await?,
                        None => None,
                    };
                    for u in read.unreachable {
                        let reason = format!("host {} cannot be read: {}", u.host, u.error);
                        scan.gaps.push(match &entries {
                            Some(all) => Gap {
                                reason,
                                may_hold: all
                                    .iter()
                                    .filter(|(v, _)| u.pools.iter().any(|p| p == pool_of(v)))
                                    .map(|(v, e)| (v.clone(), e.clone()))
                                    .collect(),
                                pools: Vec::new(),
                            },
                            None => Gap {
                                reason,
                                may_hold: Default::default(),
                                pools: u.pools,
                            },
                        });
                    }
                    scan.known.extend(read.known);
                }
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    let Some(l) = l.clone() else {
                        return Err(e);
                    };
                    let Some(may_hold) = crate::exec::blocking(move || l.entries()).await? else {
                        return Err(e);
                    };
                    scan.gaps.push(Gap {
                        reason: e.to_string(),
                        may_hold,
                        pools: Vec::new(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(scan)
    }

    /// Nodes a volume is attached to, read from the nodes themselves.
    pub(crate) async fn nodes_of(&self, volume_id: &str) -> Result<Vec<String>> {
        let scan = self.scan().await?;
        let mut nodes: Vec<String> = scan
            .of_volume(volume_id)?
            .into_iter()
            .map(|a| a.node_id.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    /// Nodes holding the volume writable, i.e. that may be writing its active image now.
    pub(crate) async fn writers_of(&self, volume_id: &str) -> Result<Vec<String>> {
        let scan = self.scan().await?;
        let mut nodes: Vec<String> = scan
            .of_volume(volume_id)?
            .into_iter()
            .filter(|a| !a.readonly)
            .map(|a| a.node_id.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    /// Live snapshot of one volume on the node holding it (see `live`): the guest's file
    /// systems are frozen around it when an agent is connected.
    pub(crate) async fn snapshot_live(
        &self,
        node_id: &str,
        volume_id: &VolumeId,
        new_overlay: &Path,
    ) -> Result<LiveSnapshot> {
        let plan = vec![NodeMembers {
            node_id: node_id.to_string(),
            members: vec![LiveMember {
                volume_id: volume_id.clone(),
                overlay: new_overlay.to_path_buf(),
            }],
        }];
        let outcome = self.snapshot_live_together(plan).await?;
        let cut = outcome
            .nodes
            .into_iter()
            .next()
            .ok_or_else(|| Error::internal("a live snapshot reported no node"))?;
        cut.result?;
        Ok(LiveSnapshot {
            quiesced: cut.quiesced,
        })
    }

    /// Ready when every backend is, or when at least one is and the others can only be
    /// unreachable for now (each keeps a ledger): a monolith serves this host's volumes while
    /// libvirtd restarts, and its libvirt RPCs answer UNAVAILABLE meanwhile.
    pub(crate) async fn check_health(&self) -> Result<()> {
        let mut first_err = None;
        let mut healthy = 0;
        for (b, l) in self.backends.iter().zip(&self.ledgers) {
            match b.check_health().await {
                Ok(()) => healthy += 1,
                Err(e) if l.is_some() && e.code() == tonic::Code::Unavailable => {
                    tracing::warn!(error = %e, "an attach backend is unreachable; serving the others");
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match first_err {
            Some(e) if healthy == 0 => Err(e),
            _ => Ok(()),
        }
    }

    /// ControllerPublishVolume of volume `id` (`vol` is its record). `before_write` runs
    /// (once) before the volume's image is given to a writer: before a read-write attach, and
    /// before a read-write attachment already there is answered (one an earlier version made);
    /// never for a read-only disk, nor when the publish is refused. Its error fails the
    /// publish before anything is attached.
    pub(crate) async fn publish(
        &self,
        id: &VolumeId,
        vol: &VolumeRecord,
        image: PathBuf,
        req: &Publish,
        before_write: impl std::future::Future<Output = Result<()>>,
    ) -> Result<BTreeMap<String, String>> {
        req.capability.check(vol.format)?;
        let index = self.backend_index(&req.node_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "node {} is not known: no libvirt domain has that UUID or name, and it is not \
                 this host",
                req.node_id
            ))
        })?;
        let backend = &self.backends[index];
        let readonly = req.readonly || req.capability.access_mode.is_read_only();
        let shareable = req.capability.access_mode.is_multi_node() && !readonly;
        let node = backend.canonical_node_id(&req.node_id).await?;
        let scan = self.scan().await?;
        let mine: Vec<&Attachment> = scan.of_volume(&vol.id)?;
        let here = mine.iter().find(|a| a.node_id == node);
        if let Some(here) = here {
            // Idempotent only for the same disk: a publish that would attach it otherwise
            // (read-only vs read-write, shared vs exclusive) is incompatible, as the spec says;
            // a dead attachment too (its repair would change the disk under the node's mounts).
            if here.readonly != readonly || here.shareable != shareable {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published to node {} {}; this publish asks for it \
                     {} ({:?}, readonly={}): ControllerUnpublishVolume it there first, or \
                     publish it as it is",
                    vol.id,
                    req.node_id,
                    describe_disk(here.readonly, here.shareable),
                    describe_disk(readonly, shareable),
                    req.capability.access_mode,
                    req.readonly
                )));
            }
            if here.abnormal.is_none() {
                if !readonly {
                    before_write.await?;
                }
                return Ok(here.publish_context());
            }
        }
        if !req.capability.access_mode.is_multi_node() {
            // A dead attachment on this very node is the backend's to repair.
            if let Some(other) = mine.iter().find(|a| a.node_id != node) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is attached to node {}; its access mode allows one node at a \
                     time, so unpublish it there first",
                    vol.id, other.node_id
                )));
            }
        }
        let spec = DiskSpec {
            volume_id: id.clone(),
            serial: id.serial(),
            image,
            format: vol.format,
            options: vol.disk.clone(),
            readonly,
            shareable,
        };
        if !readonly {
            before_write.await?;
        }
        if let Some(l) = self.ledgers[index].clone() {
            // Durably before the attach: the ledger must never miss an attachment.
            let (v, n) = (vol.id.clone(), node.clone());
            crate::exec::blocking(move || l.add(&v, &n)).await?;
        }
        self.changed();
        let att = backend.attach(&req.node_id, &spec, self.max_per_node).await;
        self.changed();
        let att = att?;
        crate::failpoint!("publish.attached");
        tracing::info!(volume = %vol.id, node = %req.node_id, serial = %att.serial, "volume published");
        Ok(att.publish_context())
    }

    /// ControllerUnpublishVolume: OK when not attached or when the node is gone.
    pub(crate) async fn unpublish(&self, volume_id: &VolumeId, node_id: &str) -> Result<()> {
        let Some(index) = self.backend_index(node_id).await? else {
            return Ok(());
        };
        let backend = &self.backends[index];
        self.changed();
        let detached = backend.detach(node_id, volume_id).await;
        self.changed();
        detached?;
        if let Some(l) = self.ledgers[index].clone() {
            // Under either id of the node; a failure only keeps the entry (too much, never
            // too little) until the next full read.
            let mut ids = vec![node_id.to_string()];
            if let Ok(canonical) = backend.canonical_node_id(node_id).await {
                ids.push(canonical);
            }
            let v = volume_id.to_string();
            let res =
                crate::exec::blocking(move || ids.iter().try_for_each(|n| l.remove(&v, n))).await;
            if let Err(e) = res {
                tracing::warn!(volume = %volume_id, error = %e, "cannot update the attach ledger");
            }
        }
        tracing::info!(volume = %volume_id, node = %node_id, "volume unpublished");
        Ok(())
    }

    /// Online expansion on every node holding the volume; false when it is attached nowhere.
    pub(crate) async fn resize_online(&self, volume_id: &VolumeId, size: u64) -> Result<bool> {
        let nodes = self.nodes_of(&volume_id.to_string()).await?;
        for node in &nodes {
            if let Some(b) = self.backend_for(node).await? {
                b.resize(node, volume_id, size).await?;
            }
        }
        Ok(!nodes.is_empty())
    }

    /// Applies QoS on every node holding the volume.
    pub(crate) async fn set_qos(
        &self,
        volume_id: &VolumeId,
        qos: &crate::params::Qos,
    ) -> Result<()> {
        for node in self.nodes_of(&volume_id.to_string()).await? {
            if let Some(b) = self.backend_for(&node).await? {
                b.set_qos(&node, volume_id, qos).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessMode, AccessType, ImageFormat};
    use crate::pool::record::{Chain, SCHEMA};
    use crate::pool::RecordState;
    use std::sync::Mutex;

    use std::sync::atomic::AtomicUsize;

    /// The id of `vol`, as the gRPC edge parses it.
    fn vid(vol: &VolumeRecord) -> VolumeId {
        VolumeId::parse("volume id", &vol.id).unwrap().unwrap()
    }

    /// One node, attachments in memory.
    #[derive(Default)]
    struct FakeNode {
        attached: Mutex<Vec<Attachment>>,
    }

    #[async_trait::async_trait]
    impl Attacher for FakeNode {
        async fn serves(&self, node_id: &str) -> Result<bool> {
            Ok(node_id == "n1")
        }
        async fn attachments(&self) -> Result<Vec<Attachment>> {
            Ok(self.attached.lock().unwrap().clone())
        }
        async fn attach(&self, node_id: &str, spec: &DiskSpec, _max: u64) -> Result<Attachment> {
            let att = Attachment {
                node_id: node_id.into(),
                volume_id: spec.volume_id.to_string(),
                serial: spec.serial.clone(),
                bus: Bus::default(),
                readonly: spec.readonly,
                shareable: spec.shareable,
                context: BTreeMap::new(),
                abnormal: None,
            };
            self.attached.lock().unwrap().push(att.clone());
            Ok(att)
        }
        async fn detach(&self, _node_id: &str, volume_id: &VolumeId) -> Result<()> {
            let id = volume_id.to_string();
            self.attached.lock().unwrap().retain(|a| a.volume_id != id);
            Ok(())
        }
        async fn resize(&self, _: &str, _: &VolumeId, _: u64) -> Result<()> {
            Ok(())
        }
        async fn set_qos(&self, _: &str, _: &VolumeId, _: &crate::params::Qos) -> Result<()> {
            Ok(())
        }
        async fn check_health(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A backend that counts how often its nodes are read. `half_down`: two hosts, one of them
    /// down (it attaches pools `a` and `shared`; `b` is on the other), with a ledger.
    #[derive(Default)]
    struct Counting {
        reads: AtomicUsize,
        half_down: bool,
    }

    #[async_trait::async_trait]
    impl Attacher for Counting {
        async fn serves(&self, _: &str) -> Result<bool> {
            Ok(true)
        }
        async fn attachments(&self) -> Result<Vec<Attachment>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
        async fn scan_hosts(&self) -> Result<HostScan> {
            if !self.half_down {
                return Ok(HostScan {
                    known: self.attachments().await?,
                    unreachable: Vec::new(),
                });
            }
            let mut on_b = FakeNode::default().attach_now("b.0123456789abcdef");
            on_b.node_id = "vm-b".into();
            Ok(HostScan {
                known: vec![on_b],
                unreachable: vec![Unreachable {
                    host: "hv1".into(),
                    pools: vec!["a".into(), "shared".into()],
                    error: "connection refused".into(),
                }],
            })
        }
        fn ledger_name(&self) -> Option<&'static str> {
            self.half_down.then_some("libvirt")
        }
        async fn attach(&self, _: &str, _: &DiskSpec, _: u64) -> Result<Attachment> {
            Err(Error::internal("not in this test"))
        }
        async fn detach(&self, _: &str, _: &VolumeId) -> Result<()> {
            Ok(())
        }
        async fn resize(&self, _: &str, _: &VolumeId, _: u64) -> Result<()> {
            Ok(())
        }
        async fn set_qos(&self, _: &str, _: &VolumeId, _: &crate::params::Qos) -> Result<()> {
            Ok(())
        }
        async fn check_health(&self) -> Result<()> {
            Ok(())
        }
    }

    fn volume() -> VolumeRecord {
        VolumeRecord {
            schema: SCHEMA,
            id: "default.0123456789abcdef".into(),
            name: "v".into(),
            pool: "default".into(),
            state: RecordState::Ready,
            format: ImageFormat::Qcow2,
            capacity_bytes: 1 << 20,
            image: "v.qcow2".into(),
            capabilities: vec![],
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            disk: DiskOptions::default(),
            content_source: None,
            accessible_topology: BTreeMap::new(),
            created_at: 0,
            chain: Chain::default(),
            handed_to_writer: false,
        }
    }

    fn publish(mode: AccessMode, readonly: bool) -> Publish {
        Publish {
            node_id: "n1".into(),
            capability: Capability {
                access_type: AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: vec![],
                },
                access_mode: mode,
            },
            readonly,
        }
    }

    /// A repeated publish to the same node is OK only when it would attach the same disk
    /// (read-only or not, shared or not); any other is ALREADY_EXISTS, whichever came first.
    #[tokio::test]
    async fn republish_to_a_node_is_ok_only_for_the_same_disk() {
        use AccessMode::*;
        // (mode, readonly) → the disk it attaches: (read-only, shareable).
        let cases = [
            (SingleNodeWriter, false),
            (SingleNodeWriter, true),
            (SingleNodeReaderOnly, false),
            (MultiNodeReaderOnly, true),
            (MultiNodeMultiWriter, false),
            (MultiNodeSingleWriter, false),
            (SingleNodeMultiWriter, false),
        ];
        let disk = |(mode, ro): (AccessMode, bool)| {
            let ro = ro || mode.is_read_only();
            (ro, mode.is_multi_node() && !ro)
        };
        // Multi-node writers need a raw block volume.
        let vol = VolumeRecord {
            format: ImageFormat::Raw,
            ..volume()
        };
        let publish = |mode, readonly| Publish {
            capability: Capability {
                access_type: AccessType::Block,
                access_mode: mode,
            },
            ..publish(mode, readonly)
        };
        let img = PathBuf::from("/nonexistent/v.raw");
        // Runs of the hook before a writer gets the image.
        let writes = AtomicUsize::new(0);
        let hook = || async {
            writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        for first in cases {
            let att = Attachments::new(vec![Arc::new(FakeNode::default())], 0);
            writes.store(0, Ordering::SeqCst);
            let ctx = att
                .publish(
                    &vid(&vol),
                    &vol,
                    img.clone(),
                    &publish(first.0, first.1),
                    hook(),
                )
                .await
                .unwrap();
            let writer = usize::from(!disk(first).0);
            assert_eq!(writes.load(Ordering::SeqCst), writer, "{first:?}");
            for again in cases {
                let res = att
                    .publish(
                        &vid(&vol),
                        &vol,
                        img.clone(),
                        &publish(again.0, again.1),
                        hook(),
                    )
                    .await;
                if disk(again) == disk(first) {
                    assert_eq!(res.unwrap(), ctx, "{first:?} then {again:?}");
                } else {
                    let err = res.unwrap_err();
                    assert!(
                        matches!(err, Error::AlreadyExists(_)),
                        "{first:?} then {again:?}: {err:?}"
                    );
                }
            }
            assert_eq!(att.scan().await.unwrap().known.len(), 1, "attached once");
            // Refused publishes never ran it; repeated ones of a writer did.
            let repeats = cases.iter().filter(|c| disk(**c) == disk(first)).count();
            assert_eq!(
                writes.load(Ordering::SeqCst),
                writer * (1 + repeats),
                "{first:?}"
            );
        }
    }

    #[tokio::test]
    async fn recent_reads_are_shared_until_a_change_or_their_age() {
        let backend = Arc::new(Counting::default());
        let a = Attachments::new(vec![backend.clone()], 0);
        let reads = || backend.reads.load(Ordering::SeqCst);
        a.recent(Duration::from_secs(60)).await.unwrap();
        a.recent(Duration::from_secs(60)).await.unwrap();
        assert_eq!(reads(), 1, "a second listing reuses the read");
        // An unpublish made here (a no-op detach) makes the read stale.
        let id = VolumeId::parse("volume id", "default.0123456789abcdef")
            .unwrap()
            .unwrap();
        a.unpublish(&id, "node").await.unwrap();
        a.recent(Duration::from_secs(60)).await.unwrap();
        assert_eq!(reads(), 2, "read again after a change");
        a.recent(Duration::ZERO).await.unwrap();
        assert_eq!(reads(), 3, "read again when too old");
        // Decisions never reuse a read.
        a.scan().await.unwrap();
        assert_eq!(reads(), 4);
    }

    impl FakeNode {
        fn attach_now(&self, volume_id: &str) -> Attachment {
            Attachment {
                node_id: "n1".into(),
                volume_id: volume_id.into(),
                serial: String::new(),
                bus: Bus::default(),
                readonly: false,
                shareable: false,
                context: BTreeMap::new(),
                abnormal: None,
            }
        }
    }

    /// A host that is down makes decisions fail only for the volumes it may hold: by its
    /// ledger when there is one, else every volume of its pools.
    #[tokio::test]
    async fn a_host_down_leaves_a_gap_for_its_own_volumes_only() {
        // Without a ledger: every volume of hv1's pools is unknown, the rest decidable.
        let half_down = || {
            Arc::new(Counting {
                half_down: true,
                ..Default::default()
            })
        };
        let a = Attachments::new(vec![half_down()], 0);
        let scan = a.scan().await.unwrap();
        assert_eq!(scan.of_volume("b.0123456789abcdef").unwrap().len(), 1);
        for v in ["a.0123456789abcdef", "shared.0123456789abcdef"] {
            let e = scan.of_volume(v).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
            assert!(e.to_string().contains("host hv1 cannot be read"), "{e}");
        }
        // With a ledger: only what it places on hv1's pools.
        let dir = tempfile::tempdir().unwrap();
        let pools: Vec<(String, PathBuf)> = ["a", "b", "shared"]
            .iter()
            .map(|p| (p.to_string(), dir.path().join(p)))
            .collect();
        let a = Attachments::new(vec![half_down()], 0).with_ledgers(&pools);
        a.init_ledgers(vec![]).await.unwrap();
        let l = a.ledgers[0].clone().unwrap();
        l.add("shared.0123456789abcdef", "vm-a").unwrap();
        l.add("b.1123456789abcdef", "vm-b").unwrap();
        let scan = a.scan().await.unwrap();
        assert!(scan.of_volume("a.0123456789abcdef").unwrap().is_empty());
        assert!(scan.of_volume("b.1123456789abcdef").unwrap().is_empty());
        let (nodes, _) = scan.unconfirmed("shared.0123456789abcdef").unwrap();
        assert_eq!(nodes, ["vm-a"]);
        // A partial read leaves the ledger as it was.
        assert_eq!(l.entries().unwrap().unwrap().len(), 2);
    }
}
