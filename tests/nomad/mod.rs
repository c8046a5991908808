//! "Nomad" for the contract tests: makes exactly the calls HashiCorp Nomad's servers and
//! clients make to a CSI plugin, with Nomad's paths, field choices, deadlines, connections and
//! error handling (shared/reference/nomad-contract.md; the § numbers below refer to it).
//!
//! What it keeps in memory is what Nomad keeps: the fingerprint of the plugin (frozen at the
//! first pass), registered volumes (ExternalID, capacity, context), the server's claims per
//! volume and node, and the client's usage tracker per (volume, usage).

mod allocs;
pub mod caps;
mod snapshots;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use virtdisk_csi::csi::proto as csi;
use virtdisk_csi::node::mountinfo::MountTable;

use csi::controller_service_capability::rpc::Type as CtrlCap;
use csi::volume_capability::access_mode::Mode;
use csi::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};

pub type Map = BTreeMap<String, String>;

/// Deadlines Nomad puts on its calls (§0). Probe: Nomad allows 5 s; the plugin is asked for
/// the 1 s it must meet for GetPluginInfo anyway.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
pub const PLUGIN_INFO_DEADLINE: Duration = Duration::from_secs(1);
pub const FINGERPRINT_DEADLINE: Duration = Duration::from_secs(30);
pub const CONTROLLER_DEADLINE: Duration = Duration::from_secs(120);
/// Nomad dials with a 1 s timeout (WithBlock).
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// `attachment_mode` of a volume capability or job volume block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    FileSystem,
    BlockDevice,
}

impl Attachment {
    pub fn name(self) -> &'static str {
        match self {
            Attachment::FileSystem => "file-system",
            Attachment::BlockDevice => "block-device",
        }
    }
}

/// Nomad's names of the five access modes it sends (§1.3).
pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::SingleNodeWriter => "single-node-writer",
        Mode::SingleNodeReaderOnly => "single-node-reader-only",
        Mode::MultiNodeReaderOnly => "multi-node-reader-only",
        Mode::MultiNodeSingleWriter => "multi-node-single-writer",
        Mode::MultiNodeMultiWriter => "multi-node-multi-writer",
        other => panic!("Nomad never sends access mode {other:?}"),
    }
}

/// A `mount_options { fs_type, mount_flags }` block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountOptions {
    pub fs_type: String,
    pub mount_flags: Vec<String>,
}

impl MountOptions {
    pub fn fs(fs_type: &str) -> Option<MountOptions> {
        Some(MountOptions {
            fs_type: fs_type.into(),
            mount_flags: vec![],
        })
    }
}

/// Nomad's `VolumeCapabilityFromStructs`: file-system → mount{fs_type, flags}, block → block{}.
pub fn capability(
    mode: Mode,
    attachment: Attachment,
    opts: Option<&MountOptions>,
) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    let access_type = match attachment {
        Attachment::BlockDevice => AccessType::Block(BlockVolume {}),
        Attachment::FileSystem => {
            let o = opts.cloned().unwrap_or_default();
            AccessType::Mount(MountVolume {
                fs_type: o.fs_type,
                mount_flags: o.mount_flags,
                volume_mount_group: String::new(),
            })
        }
    };
    csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// A volume specification file (`nomad volume create|register`, §4.2).
#[derive(Debug, Clone, Default)]
pub struct VolumeSpec {
    pub id: String,
    pub name: String,
    pub capacity_min: i64,
    pub capacity_max: i64,
    pub capabilities: Vec<(Mode, Attachment)>,
    pub mount_options: Option<MountOptions>,
    pub parameters: Map,
    pub secrets: Map,
    /// Register only.
    pub context: Map,
    pub snapshot_id: String,
    pub clone_id: String,
}

/// A volume as Nomad's state store holds it after create or register (§3.6).
#[derive(Debug, Clone)]
pub struct Volume {
    pub spec: VolumeSpec,
    pub external_id: String,
    pub capacity: i64,
    pub context: Map,
    pub topologies: Vec<csi::Topology>,
}

impl Volume {
    /// `RemoteID()`: the ExternalID, or Nomad's own id when there is none.
    pub fn remote_id(&self) -> &str {
        if self.external_id.is_empty() {
            &self.spec.id
        } else {
            &self.external_id
        }
    }
}

/// A job's `volume "x" { type = "csi" … }` block.
#[derive(Debug, Clone)]
pub struct JobVolume {
    pub access_mode: Mode,
    pub attachment: Attachment,
    pub read_only: bool,
    pub mount_options: Option<MountOptions>,
}

impl JobVolume {
    pub fn rw(attachment: Attachment) -> JobVolume {
        JobVolume {
            access_mode: Mode::SingleNodeWriter,
            attachment,
            read_only: false,
            mount_options: None,
        }
    }

    /// `UsageOptions.ToFS()`: `rw-file-system-single-node-writer` and the like.
    pub fn usage(&self) -> String {
        format!(
            "{}-{}-{}",
            if self.read_only { "ro" } else { "rw" },
            self.attachment.name(),
            mode_name(self.access_mode)
        )
    }
}

/// The plugin as Nomad fingerprinted it: frozen at the first pass (§2.4).
#[derive(Debug, Clone)]
pub struct Fingerprint {
    pub provider: String,
    pub version: String,
    pub controller_required: bool,
    pub controller_caps: BTreeSet<i32>,
    pub requires_staging: bool,
    pub node_id: String,
    /// 0 from the plugin becomes unlimited.
    pub max_volumes: i64,
}

impl Fingerprint {
    pub fn has(&self, cap: CtrlCap) -> bool {
        self.controller_caps.contains(&(cap as i32))
    }
}

/// Why an allocation's claim failed, as Nomad's claim loop sees it (§1.5).
#[derive(Debug)]
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub enum ClaimError {
    /// ControllerPublish said FailedPrecondition: the client retries the claim with backoff.
    Retryable(Status),
    /// Any other ControllerPublish error: the alloc fails (no node RPC was sent).
    Publish(Status),
    /// NodeStage or NodePublish failed: the alloc fails; `stop` cleans up.
    Mount(Status),
}

/// An allocation using a volume on this node.
#[derive(Debug, Clone)]
pub struct Alloc {
    pub id: String,
    pub volume: Volume,
    pub job: JobVolume,
    pub node_id: String,
    /// What ControllerPublish answered (Nomad keeps it in memory only).
    pub publish_context: Map,
    /// Plugin-side paths (no container here: host paths equal plugin paths).
    pub staging: PathBuf,
    pub target: PathBuf,
}

/// What the stop sequence (c) did, step by step, with the plugin's raw answers.
#[derive(Debug)]
pub struct StopReport {
    /// NodeUnpublishVolume, after Nomad's own host-path cleanup.
    pub node_unpublish: Result<(), Status>,
    /// NodeUnstageVolume, when sent.
    pub node_unstage: Option<Result<(), Status>>,
    /// ControllerUnpublishVolume, when sent.
    pub controller_unpublish: Option<Result<(), Status>>,
}

impl StopReport {
    /// Every RPC that was sent answered OK (better than NotFound, which Nomad tolerates).
    pub fn assert_all_ok(&self, what: &str) {
        let check = |rpc: &str, r: &Result<(), Status>| {
            if let Err(e) = r {
                panic!("{what}: {rpc} failed: {:?}: {}", e.code(), e.message());
            }
        };
        check("NodeUnpublishVolume", &self.node_unpublish);
        if let Some(r) = &self.node_unstage {
            check("NodeUnstageVolume", r);
        }
        if let Some(r) = &self.controller_unpublish {
            check("ControllerUnpublishVolume", r);
        }
    }
}

/// A registered plugin's external volume, as `/v1/volumes/external` shows it (§3.8).
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalVolume {
    pub external_id: String,
    pub capacity_bytes: i64,
    pub volume_context: Map,
    pub snapshot_id: String,
    pub clone_id: String,
    pub published_external_node_ids: Vec<String>,
    pub is_abnormal: bool,
    pub status: String,
}

/// A snapshot as Nomad reads it (§1.2 CreateSnapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub external_source_volume_id: String,
    pub size_bytes: i64,
    pub create_time: i64,
    pub is_ready: bool,
}

fn snapshot_of(s: csi::Snapshot) -> Snapshot {
    Snapshot {
        id: s.snapshot_id,
        external_source_volume_id: s.source_volume_id,
        size_bytes: s.size_bytes,
        create_time: s.creation_time.map(|t| t.seconds).unwrap_or_default(),
        is_ready: s.ready_to_use,
    }
}

fn request<T>(msg: T, deadline: Option<Duration>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(d) = deadline {
        r.set_timeout(d);
    }
    r
}

/// A call with `deadline` set on the request and kept on this side too.
async fn call_within<M, T, Fut>(
    deadline: Duration,
    msg: M,
    call: impl FnOnce(Request<M>) -> Fut,
) -> Result<T, Status>
where
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    within(deadline, call(request(msg, Some(deadline)))).await
}

/// A controller request with Nomad's controller deadline.
fn deadlined<T>(msg: T) -> Request<T> {
    request(msg, Some(CONTROLLER_DEADLINE))
}

/// The call, bounded by `deadline` on this side too (a deadline is a promise both ways).
async fn within<T>(
    deadline: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {deadline:?}"
        ))),
    }
}

/// Nomad's "is it a mount point" check (mount-utils `IsNotAMountPoint`).
pub fn is_mount_point(path: &Path) -> bool {
    MountTable::read().unwrap().at(path).is_some()
}

async fn dial(socket: &Path) -> Result<Channel, Status> {
    match tokio::time::timeout(DIAL_TIMEOUT, virtdisk_csi::csi::channel::connect(socket)).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
        Err(_) => Err(Status::unavailable("dial timed out")),
    }
}

pub struct Nomad {
    socket: PathBuf,
    /// `stage_publish_base_dir` on the host (the plugin sees the same paths here).
    pub base: PathBuf,
    pub namespace: String,
    /// The csimanager's node instance connection (one per role, long-lived).
    node: NodeClient<Channel>,
    pub fp: Fingerprint,
    /// Server: live claims per volume (Nomad id): alloc id → node id.
    claims: BTreeMap<String, BTreeMap<String, String>>,
    /// Client: allocs per (volume id, usage) on this node.
    usage: BTreeMap<(String, String), BTreeSet<String>>,
    /// Every RPC sent, in order: `Name` or `Name: Code`.
    pub calls: Vec<String>,
    allocs: u32,
}

impl Nomad {
    /// The plugin start sequence (0): probe until ready, plugin info with Nomad's 1 s deadline,
    /// then the csimanager's first fingerprint pass of both roles of a monolith.
    pub async fn start(socket: &Path, base: &Path) -> Result<Nomad, Status> {
        assert!(socket.exists(), "Nomad stats the socket before dialing");
        let mut identity = IdentityClient::new(dial(socket).await?);
        let probe =
            call_within(PROBE_DEADLINE, csi::ProbeRequest {}, |r| identity.probe(r)).await?;
        // An unset `ready` counts as ready.
        if probe.ready == Some(false) {
            return Err(Status::unavailable("plugin says it is not ready"));
        }
        let info = call_within(PLUGIN_INFO_DEADLINE, csi::GetPluginInfoRequest {}, |r| {
            identity.get_plugin_info(r)
        })
        .await?;
        if info.name.is_empty() {
            return Err(Status::internal("plugin returned empty name field"));
        }

        // csimanager: each role its own connection; GetPluginCapabilities first.
        let ctrl_channel = dial(socket).await?;
        let node_channel = dial(socket).await?;
        let mut ctrl_identity = IdentityClient::new(ctrl_channel.clone());
        let caps_req = csi::GetPluginCapabilitiesRequest {};
        let plugin_caps = call_within(FINGERPRINT_DEADLINE, caps_req, |r| {
            ctrl_identity.get_plugin_capabilities(r)
        })
        .await?;
        use csi::plugin_capability::{service::Type as Svc, Type};
        let controller_required = plugin_caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == Svc::ControllerService as i32)
        });
        let mut controller = ControllerClient::new(ctrl_channel);
        let caps_req = csi::ControllerGetCapabilitiesRequest {};
        let ctrl = call_within(FINGERPRINT_DEADLINE, caps_req, |r| {
            controller.controller_get_capabilities(r)
        })
        .await?;
        let controller_caps = ctrl
            .capabilities
            .iter()
            .filter_map(|c| {
                let csi::controller_service_capability::Type::Rpc(r) = c.r#type.as_ref()?;
                Some(r.r#type)
            })
            .collect();
        let mut node = NodeClient::new(node_channel);
        let node_caps = call_within(
            FINGERPRINT_DEADLINE,
            csi::NodeGetCapabilitiesRequest {},
            |r| node.node_get_capabilities(r),
        )
        .await?;
        use csi::node_service_capability::{rpc::Type as NodeCap, Type as NType};
        let requires_staging = node_caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(NType::Rpc(r)) if r.r#type == NodeCap::StageUnstageVolume as i32)
        });
        let node_info = call_within(FINGERPRINT_DEADLINE, csi::NodeGetInfoRequest {}, |r| {
            node.node_get_info(r)
        })
        .await?;
        if node_info.node_id.is_empty() {
            return Err(Status::internal("plugin returned an empty node_id"));
        }
        let fp = Fingerprint {
            provider: info.name,
            version: info.vendor_version,
            controller_required,
            controller_caps,
            requires_staging,
            node_id: node_info.node_id,
            max_volumes: if node_info.max_volumes_per_node == 0 {
                i64::MAX
            } else {
                node_info.max_volumes_per_node
            },
        };
        Ok(Nomad {
            socket: socket.to_path_buf(),
            base: base.to_path_buf(),
            namespace: "default".into(),
            node,
            fp,
            claims: BTreeMap::new(),
            usage: BTreeMap::new(),
            calls: Vec::new(),
            allocs: 0,
        })
    }

    /// The periodic fingerprint pass (every 30 s): Probe plus both capability calls.
    pub async fn fingerprint_again(&mut self) -> Result<(), Status> {
        let ch = dial(&self.socket).await?;
        let (mut identity, mut controller) =
            (IdentityClient::new(ch.clone()), ControllerClient::new(ch));
        let probe = csi::ProbeRequest {};
        call_within(FINGERPRINT_DEADLINE, probe, |r| identity.probe(r)).await?;
        let caps_req = csi::ControllerGetCapabilitiesRequest {};
        call_within(FINGERPRINT_DEADLINE, caps_req, |r| {
            controller.controller_get_capabilities(r)
        })
        .await?;
        call_within(
            FINGERPRINT_DEADLINE,
            csi::NodeGetCapabilitiesRequest {},
            |r| self.node.node_get_capabilities(r),
        )
        .await?;
        Ok(())
    }

    /// The RPCs sent since the last call (see `calls`).
    pub fn take_calls(&mut self) -> Vec<String> {
        std::mem::take(&mut self.calls)
    }

    fn log<T>(&mut self, rpc: &str, r: &Result<T, Status>) {
        self.calls.push(match r {
            Ok(_) => rpc.to_string(),
            Err(e) => format!("{rpc}: {:?}", e.code()),
        });
    }

    /// A fresh connection for every controller RPC, closed afterwards (§0).
    async fn controller(&self) -> Result<ControllerClient<Channel>, Status> {
        Ok(ControllerClient::new(dial(&self.socket).await?))
    }

    /// One controller RPC as Nomad's server makes it: a fresh connection (a dial error is
    /// returned as is), the call bounded by the controller deadline, logged as `rpc`.
    async fn controller_call<T, F, Fut>(&mut self, rpc: &str, call: F) -> Result<T, Status>
    where
        F: FnOnce(ControllerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let c = self.controller().await?;
        let r = within(CONTROLLER_DEADLINE, call(c)).await;
        self.log(rpc, &r);
        r
    }

    fn require(&self, cap: CtrlCap) {
        assert!(self.fp.controller_required, "plugin has no controller");
        assert!(
            self.fp.has(cap),
            "Nomad would not send this: the controller lacks {cap:?}"
        );
    }
}
