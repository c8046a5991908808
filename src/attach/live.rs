//! Live snapshots of volumes attached read-write to running nodes, on one node or on several
//! at once, all at one point of the guests' write stream:
//!
//! 1. every node's file systems are frozen through its guest agent, where one is connected;
//!    a freeze that has not answered within the quiesce timeout is given up (the node is cut
//!    without it, and thawed as soon as the late freeze completes);
//! 2. several nodes: every node is paused, so that none issues a write while the others are
//!    cut (a pause that fails fails the snapshot before anything was switched);
//! 3. each node switches all its members in ONE operation (libvirt: one external snapshot,
//!    one QEMU transaction), the nodes in parallel;
//! 4. the nodes are resumed and thawed on every path, and at the latest once the quiesce
//!    timeout has passed since the cut began (a cut still running then no longer counts as
//!    quiesced, and the cuts of several nodes no longer as taken together).
//!
//! It runs as a task of its own, so a cancelled RPC cannot cut it short. Before a node is
//! frozen or paused a marker naming it is written durably (`<ledger dir>/quiesced/`); it goes
//! once the node is thawed and resumed, and a restarted controller releases every node a
//! marker names ([`Attachments::release_left_quiesced`]): a crash never leaves a guest frozen or
//! paused for longer than the next start.

use super::{outcome_unknown, Attacher, Attachments};
use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::model::Consistency;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a guest agent may take to freeze, and the longest the guests stay frozen or
/// paused for a cut (`[snapshots] quiesce_timeout_secs`).
pub const DEFAULT_QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a thaw or resume that failed is retried in the background.
const RELEASE_RETRY_FOR: Duration = Duration::from_secs(120);
const RELEASE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A volume's part in a live snapshot: the node stops writing its current image and continues
/// in `overlay`, which the pool created (qcow2, backed by the current image under a relative
/// name) and made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMember {
    /// The CSI volume id.
    pub volume_id: VolumeId,
    /// Absolute path of the new overlay, in the volume's pool.
    pub overlay: PathBuf,
}

/// What a node's guest agent did to its file systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsFreeze {
    /// No guest agent is connected: nothing was frozen.
    NoAgent,
    /// The agent froze this many file systems.
    Frozen(u32),
}

/// The members a live snapshot switches on one node.
#[derive(Debug, Clone)]
pub(crate) struct NodeMembers {
    pub(crate) node_id: String,
    pub(crate) members: Vec<LiveMember>,
}

/// How one node's cut went.
#[derive(Debug)]
pub(crate) struct NodeCut {
    pub(crate) node_id: String,
    /// Ok once the node writes to every overlay of its members. An error means it still
    /// writes every old image, except UNAVAILABLE and DEADLINE_EXCEEDED, whose outcome is
    /// unknown (the node may write to the overlays).
    pub(crate) result: Result<()>,
    /// The node's file systems were frozen across its cut.
    pub(crate) quiesced: bool,
}

/// What a live snapshot of one or several nodes did.
#[derive(Debug)]
pub(crate) struct LiveOutcome {
    /// One per node of the plan, in its order.
    pub(crate) nodes: Vec<NodeCut>,
    /// The guarantee met when every cut succeeded; `None` when the cuts of several nodes
    /// could not be held at one point (the quiesce timeout passed before they all ended).
    pub(crate) consistency: Option<Consistency>,
    /// When the cut began (every node frozen and paused as far as it would be).
    pub(crate) cut_at: SystemTime,
    /// How long the guests were held (frozen or paused); zero when none was.
    pub(crate) held: Duration,
}

/// Where a node's file systems stand during a cut.
#[derive(Debug, Clone)]
enum Freeze {
    NoAgent,
    Frozen(u32),
    /// The agent answered with an error (a thaw was still sent: it may have frozen some).
    Failed(String),
    /// The agent did not answer in time; the late freeze is thawed when it completes.
    Late,
}

impl std::fmt::Display for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Freeze::NoAgent => write!(f, "nothing to freeze"),
            Freeze::Frozen(n) => write!(f, "{n} file systems frozen"),
            Freeze::Failed(why) => write!(f, "freeze failed ({why})"),
            Freeze::Late => write!(f, "freeze too late"),
        }
    }
}

/// A node being held for a cut.
struct Held {
    node_id: String,
    /// The volumes cut on this node: a host freezes only their file systems.
    members: Vec<VolumeId>,
    backend: Arc<dyn Attacher>,
    freeze: Freeze,
    paused: bool,
}

/// The durable note that a node may be left frozen or paused by this plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    node_id: String,
    #[serde(default)]
    frozen: bool,
    #[serde(default)]
    paused: bool,
}

/// Settings of the quiesce step, shared by the clones of one `Attachments`.
#[derive(Debug, Clone)]
pub(crate) struct QuiesceSettings {
    pub(crate) timeout: Duration,
    /// Where the markers live; none: no markers (unit tests).
    pub(crate) markers: Option<PathBuf>,
}

impl Default for QuiesceSettings {
    fn default() -> Self {
        QuiesceSettings {
            timeout: DEFAULT_QUIESCE_TIMEOUT,
            markers: None,
        }
    }
}

fn marker_path(dir: &Path, node_id: &str) -> PathBuf {
    let digest = Sha256::digest(node_id.as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{name}.json"))
}

impl QuiesceSettings {
    /// Writes (or clears, when it holds nothing) the marker of a node. Blocking.
    fn note(&self, marker: &Marker) -> Result<()> {
        let Some(dir) = &self.markers else {
            return Ok(());
        };
        let path = marker_path(dir, &marker.node_id);
        if !marker.frozen && !marker.paused {
            return crate::fsutil::remove_durable(&path);
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        crate::fsutil::write_json(&path, marker)
    }

    async fn note_async(&self, marker: Marker) -> Result<()> {
        let this = self.clone();
        crate::exec::blocking(move || this.note(&marker)).await
    }

    /// Every marker left (a crash between a freeze or pause and its release). Blocking.
    fn left(&self) -> Result<Vec<Marker>> {
        let Some(dir) = &self.markers else {
            return Ok(Vec::new());
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".json") {
                if let Some(m) = crate::fsutil::read_json::<Marker>(&entry.path())? {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }
}

impl Attachments {
    /// Live snapshot of the members of every node of `plan` at one point of the guests'
    /// write stream (see the module documentation). `Err` when nothing was switched anywhere
    /// (a node no backend serves, a pause that failed); otherwise the outcome per node.
    pub(crate) async fn snapshot_live_together(
        &self,
        plan: Vec<NodeMembers>,
    ) -> Result<LiveOutcome> {
        let this = self.clone();
        tokio::spawn(async move { this.cut_together(plan).await })
            .await
            .map_err(|e| Error::internal(format!("the live snapshot task ended: {e}")))?
    }

    async fn cut_together(&self, plan: Vec<NodeMembers>) -> Result<LiveOutcome> {
        let timeout = self.quiesce.timeout;
        let mut held = Vec::with_capacity(plan.len());
        for n in &plan {
            let backend = self.backend_for(&n.node_id).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "volume(s) {} are attached to node {}, which no attach backend serves any \
                     more; unpublish them first",
                    n.members
                        .iter()
                        .map(|m| m.volume_id.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    n.node_id
                ))
            })?;
            held.push(Held {
                node_id: n.node_id.clone(),
                members: n.members.iter().map(|m| m.volume_id.clone()).collect(),
                backend: backend.clone(),
                freeze: Freeze::NoAgent,
                paused: false,
            });
        }

        // 1. Freeze every node's file systems, in parallel.
        let freezes = join_all(held.iter().map(|h| self.freeze_bounded(h, timeout))).await;
        for (h, f) in held.iter_mut().zip(freezes) {
            h.freeze = f;
        }
        // tokio's clock (the system's, outside tests): the unit tests run on a paused one.
        let frozen_at = tokio::time::Instant::now();

        // 2. Several nodes: pause them all, so that none writes while the others are cut.
        if held.len() > 1 {
            let pauses = join_all(held.iter().map(|h| self.pause_noted(h))).await;
            let mut failed = None;
            for (h, p) in held.iter_mut().zip(pauses) {
                match p {
                    Ok(paused) => h.paused = paused,
                    Err(e) => {
                        // An unknown outcome may have paused it: resume it to be sure.
                        h.paused = outcome_unknown(&e);
                        failed.get_or_insert((h.node_id.clone(), e));
                    }
                }
            }
            if let Some((node, e)) = failed {
                self.release(&held).await;
                return Err(match e {
                    e if outcome_unknown(&e) => e,
                    e => Error::FailedPrecondition(format!(
                        "node {node} could not be paused ({e}), so the volumes of several nodes \
                         cannot be snapshotted at one point of their writes; retry, or \
                         snapshot the volumes of each node in a group of their own"
                    )),
                });
            }
        }

        // 3. Cut every node, in parallel, each in one operation; held at most `timeout`.
        let cut_at = SystemTime::now();
        let cut_started = tokio::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, (n, h)) in plan.iter().zip(&held).enumerate() {
            let (backend, node, members) =
                (h.backend.clone(), n.node_id.clone(), n.members.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let done = backend.snapshot_live(&node, &members).await;
                let _ = tx.send((i, done, tokio::time::Instant::now()));
            });
        }
        drop(tx);
        let mut results: Vec<Option<(Result<()>, tokio::time::Instant)>> =
            std::iter::repeat_with(|| None).take(plan.len()).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = plan.len();
        while pending > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((i, done, ended))) => {
                    results[i] = Some((done, ended));
                    pending -= 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        if pending > 0 {
            tracing::warn!(
                timeout_s = timeout.as_secs(),
                nodes = held.len(),
                pending,
                "a live snapshot did not finish within the quiesce timeout; releasing the \
                 guests before it ends"
            );
        }
        let released_at = tokio::time::Instant::now();
        self.release(&held).await;
        while pending > 0 {
            let Some((i, done, ended)) = rx.recv().await else {
                break;
            };
            results[i] = Some((done, ended));
            pending -= 1;
        }
        let held_any = held
            .iter()
            .any(|h| h.paused || !matches!(h.freeze, Freeze::NoAgent));
        let held_for = if held_any {
            released_at.duration_since(frozen_at)
        } else {
            Duration::ZERO
        };

        // 4. What each node got, and the guarantee across them.
        let mut nodes = Vec::with_capacity(plan.len());
        let mut all_in_time = true;
        for (h, r) in held.iter().zip(results) {
            let (result, ended) = r.unwrap_or_else(|| {
                (
                    Err(Error::Unavailable(format!(
                        "the live snapshot of node {} ended abnormally; its outcome is read \
                         back when the volumes are next used",
                        h.node_id
                    ))),
                    tokio::time::Instant::now(),
                )
            });
            let in_window = ended <= released_at;
            all_in_time &= in_window;
            nodes.push(NodeCut {
                node_id: h.node_id.clone(),
                quiesced: matches!(h.freeze, Freeze::Frozen(_)) && in_window,
                result,
            });
        }
        let consistency = if held.len() > 1 && !all_in_time {
            None
        } else if nodes.iter().all(|n| n.quiesced) {
            Some(Consistency::Application)
        } else {
            Some(Consistency::Crash)
        };
        let summary: Vec<String> = held
            .iter()
            .map(|h| {
                let paused = if h.paused { ", paused" } else { "" };
                format!("{}: {}{paused}", h.node_id, h.freeze)
            })
            .collect();
        tracing::info!(nodes = held.len(), consistency = consistency.map(|c| c.as_str()).unwrap_or("none"),
            held_ms = held_for.as_millis() as u64, cut_ms = cut_started.elapsed().as_millis() as u64,
            quiesce = %summary.join("; "), "live snapshot cut");
        Ok(LiveOutcome {
            nodes,
            consistency,
            cut_at,
            held: held_for,
        })
    }

    /// Freezes one node's file systems, waiting at most `timeout`. A late freeze is thawed in
    /// the background once it completes; a failed one is thawed too (it may have frozen some).
    async fn freeze_bounded(&self, h: &Held, timeout: Duration) -> Freeze {
        let node = h.node_id.clone();
        let freezer = h.backend.freezer();
        match h.backend.guest_agent(&node, &h.members).await {
            Ok(false) => {
                tracing::debug!(node = %node, freezer, "nothing to freeze: crash-consistent");
                return Freeze::NoAgent;
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(node = %node, error = %e, freezer,
                    "cannot tell whether the file systems can be frozen; taking a \
                     crash-consistent snapshot");
                return Freeze::Failed(e.to_string());
            }
        }
        let marker = Marker {
            node_id: node.clone(),
            frozen: true,
            paused: false,
        };
        if let Err(e) = self.quiesce.note_async(marker).await {
            tracing::warn!(node = %node, error = %e,
                "cannot note the freeze durably; taking a crash-consistent snapshot");
            return Freeze::Failed(e.to_string());
        }
        let (backend, n, members) = (h.backend.clone(), node.clone(), h.members.clone());
        let mut call = tokio::spawn(async move { backend.freeze_filesystems(&n, &members).await });
        let answered = tokio::time::timeout(timeout, &mut call).await;
        let outcome = match answered {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Error::internal(format!("the freeze task ended: {e}"))),
            Err(_) => {
                tracing::warn!(node = %node, timeout_s = timeout.as_secs(), freezer,
                    "the file systems were not frozen in time; taking a crash-consistent \
                     snapshot, and thawing once the freeze completes");
                let (this, backend, node) = (self.clone(), h.backend.clone(), node.clone());
                let members = h.members.clone();
                tokio::spawn(async move {
                    let _ = call.await;
                    this.release_node(&backend, &node, &members, true, false)
                        .await;
                });
                return Freeze::Late;
            }
        };
        match outcome {
            Ok(FsFreeze::Frozen(n)) => {
                tracing::debug!(node = %node, filesystems = n, freezer, "file systems frozen");
                Freeze::Frozen(n)
            }
            Ok(FsFreeze::NoAgent) => {
                if let Err(e) = self
                    .quiesce
                    .note_async(Marker {
                        node_id: node.clone(),
                        ..Marker::default()
                    })
                    .await
                {
                    tracing::warn!(node = %node, error = %e, "cannot clear a quiesce marker");
                }
                tracing::debug!(node = %node, freezer, "nothing to freeze: crash-consistent");
                Freeze::NoAgent
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %e, freezer,
                    "the file systems could not be frozen; taking a crash-consistent \
                     snapshot");
                Freeze::Failed(e.to_string())
            }
        }
    }

    /// Pauses a node, noting it durably first. Whether it was paused by this call.
    async fn pause_noted(&self, h: &Held) -> Result<bool> {
        let marker = Marker {
            node_id: h.node_id.clone(),
            frozen: !matches!(h.freeze, Freeze::NoAgent),
            paused: true,
        };
        self.quiesce.note_async(marker).await?;
        h.backend.pause(&h.node_id).await
    }

    /// Resumes and thaws every held node (in parallel).
    async fn release(&self, held: &[Held]) {
        join_all(held.iter().map(|h| {
            // A late freeze is thawed by its own task.
            let thaw = matches!(h.freeze, Freeze::Frozen(_) | Freeze::Failed(_));
            self.release_node(&h.backend, &h.node_id, &h.members, thaw, h.paused)
        }))
        .await;
    }

    /// Resumes (if `resume`) and thaws (if `thaw`) one node, then clears its marker. What
    /// fails is retried in the background for a while, the marker kept until it succeeds.
    async fn release_node(
        &self,
        backend: &Arc<dyn Attacher>,
        node: &str,
        members: &[VolumeId],
        thaw: bool,
        resume: bool,
    ) {
        if self.try_release(backend, node, members, thaw, resume).await {
            return;
        }
        let (this, backend, node) = (self.clone(), backend.clone(), node.to_string());
        let members = members.to_vec();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < RELEASE_RETRY_FOR {
                tokio::time::sleep(RELEASE_RETRY_PAUSE).await;
                if this
                    .try_release(&backend, &node, &members, thaw, resume)
                    .await
                {
                    return;
                }
            }
            tracing::error!(node = %node, thaw, resume,
                "the node is still frozen or paused; the next controller start retries");
        });
    }

    async fn try_release(
        &self,
        backend: &Arc<dyn Attacher>,
        node: &str,
        members: &[VolumeId],
        thaw: bool,
        resume: bool,
    ) -> bool {
        if resume {
            if let Err(e) = backend.resume(node).await {
                tracing::error!(node = %node, error = %e, "resuming the paused node failed");
                return false;
            }
        }
        if thaw {
            if let Err(e) = backend.thaw_filesystems(node, members).await {
                tracing::error!(node = %node, error = %e, freezer = backend.freezer(),
                    "thawing the file systems failed");
                return false;
            }
        }
        let cleared = Marker {
            node_id: node.to_string(),
            ..Marker::default()
        };
        if let Err(e) = self.quiesce.note_async(cleared).await {
            tracing::warn!(node = %node, error = %e, "cannot clear a quiesce marker");
        }
        true
    }

    /// Thaws and resumes every node a marker names: the guests a crashed controller left
    /// frozen or paused. Runs in the background until each is released (the backend may be
    /// unreachable for a while).
    pub(crate) async fn release_left_quiesced(&self) {
        let settings = self.quiesce.clone();
        let left = match crate::exec::blocking(move || settings.left()).await {
            Ok(left) => left,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the quiesce markers");
                return;
            }
        };
        for m in left {
            tracing::warn!(node = %m.node_id, frozen = m.frozen, paused = m.paused,
                "a live snapshot was interrupted with this node held; releasing it");
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    match this.backend_for(&m.node_id).await {
                        Ok(Some(b)) => {
                            // Which volumes it held is not noted: everything.
                            if this
                                .try_release(b, &m.node_id, &[], m.frozen, m.paused)
                                .await
                            {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::info!(node = %m.node_id, "the held node is gone");
                            let cleared = Marker {
                                node_id: m.node_id.clone(),
                                ..Marker::default()
                            };
                            let _ = this.quiesce.note_async(cleared).await;
                            return;
                        }
                        Err(e) => tracing::debug!(node = %m.node_id, error = %e,
                            "cannot release the held node yet"),
                    }
                    tokio::time::sleep(RELEASE_RETRY_PAUSE * 5).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::{Attachment, DiskSpec};
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tonic::Code;

    /// Nodes in memory that log every call; each node's behaviour is set per test.
    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        /// node → how its calls behave
        nodes: BTreeMap<String, Behaviour>,
    }

    #[derive(Default, Clone)]
    struct Behaviour {
        agent: bool,
        freeze_takes: Duration,
        snapshot_takes: Duration,
        snapshot_fails: bool,
        pause_fails: bool,
    }

    impl Fake {
        fn with(nodes: &[(&str, Behaviour)]) -> Arc<Fake> {
            Arc::new(Fake {
                log: Mutex::default(),
                nodes: nodes
                    .iter()
                    .map(|(n, b)| (n.to_string(), b.clone()))
                    .collect(),
            })
        }
        fn note(&self, what: String) {
            self.log.lock().unwrap().push(what);
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        fn index(&self, entry: &str) -> usize {
            self.log()
                .iter()
                .position(|e| e == entry)
                .unwrap_or_else(|| panic!("{entry} not in {:?}", self.log()))
        }
        fn behaviour(&self, node: &str) -> Behaviour {
            self.nodes.get(node).cloned().unwrap_or_default()
        }
    }

    #[async_trait::async_trait]
    impl Attacher for Fake {
        async fn serves(&self, node_id: &str) -> Result<bool> {
            Ok(self.nodes.contains_key(node_id))
        }
        async fn attachments(&self) -> Result<Vec<Attachment>> {
            Ok(Vec::new())
        }
        async fn attach(&self, _: &str, _: &DiskSpec, _: u64) -> Result<Attachment> {
            Err(Error::internal("not in these tests"))
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
        async fn snapshot_live(&self, node_id: &str, members: &[LiveMember]) -> Result<()> {
            let b = self.behaviour(node_id);
            self.note(format!("snapshot {node_id} {}", members.len()));
            tokio::time::sleep(b.snapshot_takes).await;
            self.note(format!("snapshot done {node_id}"));
            if b.snapshot_fails {
                return Err(Error::FailedPrecondition("the domain refused".into()));
            }
            Ok(())
        }
        async fn guest_agent(&self, node_id: &str, _: &[VolumeId]) -> Result<bool> {
            Ok(self.behaviour(node_id).agent)
        }
        async fn freeze_filesystems(&self, node_id: &str, _: &[VolumeId]) -> Result<FsFreeze> {
            let b = self.behaviour(node_id);
            if !b.agent {
                return Ok(FsFreeze::NoAgent);
            }
            tokio::time::sleep(b.freeze_takes).await;
            self.note(format!("frozen {node_id}"));
            Ok(FsFreeze::Frozen(2))
        }
        async fn thaw_filesystems(&self, node_id: &str, _: &[VolumeId]) -> Result<()> {
            self.note(format!("thaw {node_id}"));
            Ok(())
        }
        async fn pause(&self, node_id: &str) -> Result<bool> {
            if self.behaviour(node_id).pause_fails {
                return Err(Error::internal("cannot pause"));
            }
            self.note(format!("pause {node_id}"));
            Ok(true)
        }
        async fn resume(&self, node_id: &str) -> Result<()> {
            self.note(format!("resume {node_id}"));
            Ok(())
        }
    }

    fn attachments(fake: &Arc<Fake>, timeout: Duration, markers: Option<&Path>) -> Attachments {
        let mut a = Attachments::new(vec![fake.clone() as Arc<dyn Attacher>], 0)
            .with_quiesce_timeout(timeout);
        a.quiesce.markers = markers.map(Path::to_path_buf);
        a
    }

    /// Volume `i` of node `n` (a one-letter name, which is a hex digit): `p.<n>00…0<i>`.
    fn volume(n: &str, i: u8) -> VolumeId {
        let id = format!("p.{n}{i:015x}");
        VolumeId::parse("volume id", &id).unwrap().unwrap()
    }

    fn plan(nodes: &[&str]) -> Vec<NodeMembers> {
        nodes
            .iter()
            .map(|n| NodeMembers {
                node_id: n.to_string(),
                members: vec![
                    LiveMember {
                        volume_id: volume(n, 1),
                        overlay: PathBuf::from(format!("/p/images/{n}1.qcow2")),
                    },
                    LiveMember {
                        volume_id: volume(n, 2),
                        overlay: PathBuf::from(format!("/p/images/{n}2.qcow2")),
                    },
                ],
            })
            .collect()
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn one_node_with_an_agent_is_frozen_around_one_cut() {
        let agent = Behaviour {
            agent: true,
            ..Default::default()
        };
        let fake = Fake::with(&[("a", agent)]);
        let dir = tempfile::tempdir().unwrap();
        let a = attachments(&fake, SHORT, Some(dir.path()));
        let out = a.snapshot_live_together(plan(&["a"])).await.unwrap();
        assert_eq!(
            fake.log(),
            ["frozen a", "snapshot a 2", "snapshot done a", "thaw a"],
            "both disks in one call, no pause for one node"
        );
        assert_eq!(out.consistency, Some(Consistency::Application));
        assert!(out.nodes[0].quiesced && out.nodes[0].result.is_ok());
        assert!(a.quiesce.left().unwrap().is_empty(), "markers cleared");
    }

    #[tokio::test]
    async fn without_an_agent_the_cut_is_crash_consistent() {
        let fake = Fake::with(&[("a", Behaviour::default())]);
        let a = attachments(&fake, SHORT, None);
        let out = a.snapshot_live_together(plan(&["a"])).await.unwrap();
        assert_eq!(fake.log(), ["snapshot a 2", "snapshot done a"]);
        assert_eq!(out.consistency, Some(Consistency::Crash));
        assert!(!out.nodes[0].quiesced);
    }

    #[tokio::test]
    async fn several_nodes_are_frozen_and_paused_before_any_cut_and_released_after() {
        let agent = Behaviour {
            agent: true,
            ..Default::default()
        };
        let fake = Fake::with(&[
            ("a", agent.clone()),
            ("b", agent),
            ("c", Behaviour::default()),
        ]);
        let a = attachments(&fake, SHORT, None);
        let out = a
            .snapshot_live_together(plan(&["a", "b", "c"]))
            .await
            .unwrap();
        let first_cut = ["snapshot a 2", "snapshot b 2", "snapshot c 2"]
            .iter()
            .map(|e| fake.index(e))
            .min()
            .unwrap();
        let last_done = ["snapshot done a", "snapshot done b", "snapshot done c"]
            .iter()
            .map(|e| fake.index(e))
            .max()
            .unwrap();
        for before in ["frozen a", "frozen b", "pause a", "pause b", "pause c"] {
            assert!(fake.index(before) < first_cut, "{before}: {:?}", fake.log());
        }
        for after in ["resume a", "resume b", "resume c", "thaw a", "thaw b"] {
            assert!(fake.index(after) > last_done, "{after}: {:?}", fake.log());
        }
        assert!(
            !fake.log().contains(&"thaw c".to_string()),
            "c had no agent"
        );
        // c had no agent: the write order holds (paused together), the file systems of c were
        // not frozen.
        assert_eq!(out.consistency, Some(Consistency::Crash));
        assert_eq!(
            out.nodes.iter().map(|n| n.quiesced).collect::<Vec<_>>(),
            [true, true, false]
        );
    }

    // On tokio's paused clock: the fake's delays and the timeouts are exact, whatever the load.
    #[tokio::test(start_paused = true)]
    async fn a_freeze_that_hangs_is_given_up_and_thawed_when_it_completes() {
        let slow = Behaviour {
            agent: true,
            freeze_takes: Duration::from_millis(800),
            ..Default::default()
        };
        let fake = Fake::with(&[("a", slow)]);
        let a = attachments(&fake, SHORT, None);
        let t = tokio::time::Instant::now();
        let out = a.snapshot_live_together(plan(&["a"])).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(out.consistency, Some(Consistency::Crash));
        assert!(!out.nodes[0].quiesced);
        assert_eq!(fake.log(), ["snapshot a 2", "snapshot done a"]);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            fake.log(),
            ["snapshot a 2", "snapshot done a", "frozen a", "thaw a"],
            "the late freeze is thawed at once"
        );
    }

    #[tokio::test]
    async fn a_failed_cut_still_thaws_and_resumes() {
        let bad = Behaviour {
            agent: true,
            snapshot_fails: true,
            ..Default::default()
        };
        let fake = Fake::with(&[("a", Behaviour::default()), ("b", bad)]);
        let a = attachments(&fake, SHORT, None);
        let out = a.snapshot_live_together(plan(&["a", "b"])).await.unwrap();
        assert!(out.nodes[0].result.is_ok());
        assert_eq!(
            out.nodes[1].result.as_ref().unwrap_err().code(),
            Code::FailedPrecondition
        );
        for e in ["resume a", "resume b", "thaw b"] {
            assert!(fake.index(e) > fake.index("snapshot done b"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_pause_that_fails_cuts_nothing_and_releases_the_others() {
        let agent = Behaviour {
            agent: true,
            ..Default::default()
        };
        let stuck = Behaviour {
            pause_fails: true,
            ..Default::default()
        };
        let fake = Fake::with(&[("a", agent), ("b", stuck)]);
        let a = attachments(&fake, SHORT, None);
        let err = a
            .snapshot_live_together(plan(&["a", "b"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(
            err.to_string().contains("node b could not be paused"),
            "{err}"
        );
        let log = fake.log();
        assert!(!log.iter().any(|e| e.starts_with("snapshot")), "{log:?}");
        assert!(fake.index("resume a") > fake.index("pause a"));
        assert!(fake.index("thaw a") > fake.index("frozen a"));
    }

    // On tokio's paused clock: the fake's delays and the timeouts are exact, whatever the load.
    #[tokio::test(start_paused = true)]
    async fn cuts_of_several_nodes_past_the_timeout_are_not_together() {
        let slow = Behaviour {
            snapshot_takes: Duration::from_millis(600),
            ..Default::default()
        };
        let fake = Fake::with(&[("a", Behaviour::default()), ("b", slow)]);
        let a = attachments(&fake, SHORT, None);
        let out = a.snapshot_live_together(plan(&["a", "b"])).await.unwrap();
        assert_eq!(out.consistency, None);
        assert!(out.nodes.iter().all(|n| n.result.is_ok()));
        assert!(
            fake.index("resume b") < fake.index("snapshot done b"),
            "released at the timeout: {:?}",
            fake.log()
        );
        assert!(
            out.held >= SHORT && out.held < Duration::from_millis(550),
            "{:?}",
            out.held
        );
    }

    // On tokio's paused clock: the fake's delays and the timeouts are exact, whatever the load.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_caller_does_not_leave_the_guest_frozen() {
        let slow_cut = Behaviour {
            agent: true,
            snapshot_takes: Duration::from_millis(200),
            ..Default::default()
        };
        let fake = Fake::with(&[("a", slow_cut)]);
        let a = attachments(&fake, Duration::from_secs(5), None);
        let call = a.snapshot_live_together(plan(&["a"]));
        assert!(tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            fake.log(),
            ["frozen a", "snapshot a 2", "snapshot done a", "thaw a"]
        );
    }

    // On tokio's paused clock: the fake's delays and the timeouts are exact, whatever the load.
    #[tokio::test(start_paused = true)]
    async fn a_restarted_controller_releases_what_a_marker_names() {
        let fake = Fake::with(&[("a", Behaviour::default()), ("b", Behaviour::default())]);
        let dir = tempfile::tempdir().unwrap();
        let a = attachments(&fake, SHORT, Some(dir.path()));
        for (node, frozen, paused) in [("a", true, true), ("b", true, false), ("gone", true, true)]
        {
            a.quiesce
                .note(&Marker {
                    node_id: node.into(),
                    frozen,
                    paused,
                })
                .unwrap();
        }
        a.release_left_quiesced().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut log = fake.log();
        log.sort();
        assert_eq!(log, ["resume a", "thaw a", "thaw b"]);
        assert!(a.quiesce.left().unwrap().is_empty());
    }

    #[test]
    fn markers_round_trip_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let s = QuiesceSettings {
            timeout: Duration::from_secs(1),
            markers: Some(dir.path().join("quiesced")),
        };
        assert!(s.left().unwrap().is_empty(), "no directory yet");
        let m = Marker {
            node_id: "node/../x".into(),
            frozen: true,
            paused: true,
        };
        s.note(&m).unwrap();
        assert_eq!(s.left().unwrap(), vec![m.clone()]);
        let name = marker_path(dir.path(), &m.node_id);
        assert!(
            name.file_name().unwrap().to_str().unwrap().len() == 21,
            "a hash names the file, whatever the node id: {}",
            name.display()
        );
        s.note(&Marker {
            node_id: m.node_id.clone(),
            ..Marker::default()
        })
        .unwrap();
        assert!(s.left().unwrap().is_empty());
    }
}
