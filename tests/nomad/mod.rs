//! "Nomad" for the contract tests: makes exactly the calls HashiCorp Nomad's servers and
//! clients make to a CSI plugin, with Nomad's paths, field choices, deadlines, connections and
//! error handling (shared/reference/nomad-contract.md; the § numbers below refer to it).
//!
//! What it keeps in memory is what Nomad keeps: the fingerprint of the plugin (frozen at the
//! first pass), registered volumes (ExternalID, capacity, context), the server's claims per
//! volume and node, and the client's usage tracker per (volume, usage).

pub mod caps;
#[cfg(feature = "libvirt")]
pub mod domain;

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
        let probe = within(
            PROBE_DEADLINE,
            identity.probe(request(csi::ProbeRequest {}, Some(PROBE_DEADLINE))),
        )
        .await?;
        // An unset `ready` counts as ready.
        if probe.ready == Some(false) {
            return Err(Status::unavailable("plugin says it is not ready"));
        }
        let info = within(
            PLUGIN_INFO_DEADLINE,
            identity.get_plugin_info(request(
                csi::GetPluginInfoRequest {},
                Some(PLUGIN_INFO_DEADLINE),
            )),
        )
        .await?;
        if info.name.is_empty() {
            return Err(Status::internal("plugin returned empty name field"));
        }

        // csimanager: each role its own connection; GetPluginCapabilities first.
        let ctrl_channel = dial(socket).await?;
        let node_channel = dial(socket).await?;
        let plugin_caps = within(
            FINGERPRINT_DEADLINE,
            IdentityClient::new(ctrl_channel.clone()).get_plugin_capabilities(request(
                csi::GetPluginCapabilitiesRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
        )
        .await?;
        use csi::plugin_capability::{service::Type as Svc, Type};
        let controller_required = plugin_caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == Svc::ControllerService as i32)
        });
        let ctrl = within(
            FINGERPRINT_DEADLINE,
            ControllerClient::new(ctrl_channel).controller_get_capabilities(request(
                csi::ControllerGetCapabilitiesRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
        )
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
        let node_caps = within(
            FINGERPRINT_DEADLINE,
            node.node_get_capabilities(request(
                csi::NodeGetCapabilitiesRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
        )
        .await?;
        use csi::node_service_capability::{rpc::Type as NodeCap, Type as NType};
        let requires_staging = node_caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(NType::Rpc(r)) if r.r#type == NodeCap::StageUnstageVolume as i32)
        });
        let node_info = within(
            FINGERPRINT_DEADLINE,
            node.node_get_info(request(
                csi::NodeGetInfoRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
        )
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
        within(
            FINGERPRINT_DEADLINE,
            IdentityClient::new(ch.clone())
                .probe(request(csi::ProbeRequest {}, Some(FINGERPRINT_DEADLINE))),
        )
        .await?;
        within(
            FINGERPRINT_DEADLINE,
            ControllerClient::new(ch).controller_get_capabilities(request(
                csi::ControllerGetCapabilitiesRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
        )
        .await?;
        within(
            FINGERPRINT_DEADLINE,
            self.node.node_get_capabilities(request(
                csi::NodeGetCapabilitiesRequest {},
                Some(FINGERPRINT_DEADLINE),
            )),
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

    fn require(&self, cap: CtrlCap) {
        assert!(self.fp.controller_required, "plugin has no controller");
        assert!(
            self.fp.has(cap),
            "Nomad would not send this: the controller lacks {cap:?}"
        );
    }

    // ---------------------------------------------------------------- (a) create / register

    /// `nomad volume create` (§3.6): CreateVolume with accessibility_requirements always
    /// present (empty lists without a topology_request) and capacity_range only when set.
    pub async fn volume_create(&mut self, spec: &VolumeSpec) -> Result<Volume, Status> {
        self.require(CtrlCap::CreateDeleteVolume);
        assert!(!spec.name.is_empty(), "missing Name");
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let source = if !spec.snapshot_id.is_empty() {
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: spec.snapshot_id.clone(),
            }))
        } else if !spec.clone_id.is_empty() {
            Some(Type::Volume(VolumeSource {
                volume_id: spec.clone_id.clone(),
            }))
        } else {
            None
        };
        let req = csi::CreateVolumeRequest {
            name: spec.name.clone(),
            capacity_range: (spec.capacity_min != 0 || spec.capacity_max != 0).then_some(
                csi::CapacityRange {
                    required_bytes: spec.capacity_min,
                    limit_bytes: spec.capacity_max,
                },
            ),
            volume_capabilities: spec
                .capabilities
                .iter()
                .map(|(m, a)| capability(*m, *a, spec.mount_options.as_ref()))
                .collect(),
            parameters: spec.parameters.clone(),
            secrets: spec.secrets.clone(),
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: vec![],
                preferred: vec![],
            }),
            mutable_parameters: Default::default(),
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.create_volume(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("CreateVolume", &r);
        let v = r?
            .volume
            .ok_or_else(|| Status::internal("CreateVolume answered without a volume"))?;
        Ok(Volume {
            spec: spec.clone(),
            external_id: v.volume_id,
            capacity: v.capacity_bytes,
            context: v.volume_context,
            topologies: v.accessible_topology,
        })
    }

    /// `nomad volume register` of an existing external volume (§3.7): ValidateVolumeCapabilities
    /// with `mount{}` capabilities (the server drops mount_options), then Nomad's comparison.
    /// Err(text) is Nomad refusing the registration.
    pub async fn volume_register(
        &mut self,
        spec: &VolumeSpec,
        external_id: &str,
    ) -> Result<Volume, String> {
        let vol = Volume {
            spec: spec.clone(),
            external_id: external_id.to_string(),
            capacity: 0,
            context: spec.context.clone(),
            topologies: vec![],
        };
        if !self.fp.controller_required {
            return Ok(vol);
        }
        let requested: Vec<csi::VolumeCapability> = spec
            .capabilities
            .iter()
            .map(|(m, a)| capability(*m, *a, None))
            .collect();
        let req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: vol.remote_id().to_string(),
            volume_context: spec.context.clone(),
            volume_capabilities: requested.clone(),
            parameters: spec.parameters.clone(),
            secrets: spec.secrets.clone(),
            mutable_parameters: Default::default(),
        };
        let mut c = self.controller().await.map_err(|e| e.to_string())?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.validate_volume_capabilities(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("ValidateVolumeCapabilities", &r);
        let r = r.map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
        // An unset `confirmed` is accepted (the message is only debug-logged).
        if r.confirmed.is_none() {
            self.calls
                .push(format!("(not confirmed, accepted anyway: {})", r.message));
        }
        if let Some(confirmed) = r.confirmed {
            if !confirmed.volume_capabilities.is_empty() {
                caps::compare(&requested, &confirmed.volume_capabilities)?;
            }
        }
        Ok(vol)
    }

    // ---------------------------------------------------------------- (b) claim

    /// The server's ControllerPublishVolume for a claim on `node_id` (§3.1): job modes, the
    /// volume's mount_options only, readonly = a read claim.
    pub async fn controller_publish(
        &mut self,
        vol: &Volume,
        job: &JobVolume,
        node_id: &str,
    ) -> Result<Map, ClaimError> {
        if !(self.fp.controller_required && self.fp.has(CtrlCap::PublishUnpublishVolume)) {
            return Ok(Map::new());
        }
        assert!(
            !node_id.is_empty(),
            "Nomad never publishes to an empty node id"
        );
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: vol.remote_id().to_string(),
            node_id: node_id.to_string(),
            volume_capability: Some(capability(
                job.access_mode,
                job.attachment,
                vol.spec.mount_options.as_ref(),
            )),
            readonly: job.read_only,
            secrets: vol.spec.secrets.clone(),
            volume_context: vol.context.clone(),
        };
        let mut c = self.controller().await.map_err(ClaimError::Publish)?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.controller_publish_volume(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("ControllerPublishVolume", &r);
        match r {
            Ok(r) => Ok(r.publish_context),
            Err(e) if e.code() == Code::FailedPrecondition => Err(ClaimError::Retryable(e)),
            Err(e) => Err(ClaimError::Publish(e)),
        }
    }

    pub fn new_alloc_id(&mut self) -> String {
        self.allocs += 1;
        format!("a{:07}-{}", self.allocs, std::process::id())
    }

    /// Host paths of an alloc's use of a volume (§2.1).
    pub fn staging_path(&self, vol: &Volume, job: &JobVolume) -> PathBuf {
        self.base
            .join("staging")
            .join(&self.namespace)
            .join(&vol.spec.id)
            .join(job.usage())
    }

    pub fn target_path(&self, alloc_id: &str, vol: &Volume, job: &JobVolume) -> PathBuf {
        self.base
            .join("per-alloc")
            .join(alloc_id)
            .join(&vol.spec.id)
            .join(job.usage())
    }

    /// The raft side of `CSIVolume.Claim` for a new alloc on `node_id`: the claim is recorded
    /// before any plugin call and stays until the alloc's Unpublish releases it.
    pub fn begin_claim(&mut self, vol: &Volume, job: &JobVolume, node_id: &str) -> Alloc {
        let id = self.new_alloc_id();
        self.claims
            .entry(vol.spec.id.clone())
            .or_default()
            .insert(id.clone(), node_id.to_string());
        Alloc {
            staging: self.staging_path(vol, job),
            target: self.target_path(&id, vol, job),
            id,
            volume: vol.clone(),
            job: job.clone(),
            node_id: node_id.to_string(),
            publish_context: Map::new(),
        }
    }

    /// Allocation start on this node (b): claim (ControllerPublish), then MountVolume. On any
    /// error the alloc has failed (or waits, for `Retryable`); Nomad's Postrun still runs, so
    /// the caller runs `stop` (or `retry_claim`).
    pub async fn claim(
        &mut self,
        vol: &Volume,
        job: &JobVolume,
    ) -> Result<Alloc, (Alloc, ClaimError)> {
        let node_id = self.fp.node_id.clone();
        let alloc = self.begin_claim(vol, job, &node_id);
        self.retry_claim(alloc).await
    }

    /// ControllerPublish then MountVolume for an alloc holding its raft claim; also Nomad's
    /// claim loop retrying after a FailedPrecondition.
    pub async fn retry_claim(&mut self, mut alloc: Alloc) -> Result<Alloc, (Alloc, ClaimError)> {
        assert_eq!(
            alloc.node_id, self.fp.node_id,
            "node RPCs go to this node only"
        );
        match self
            .controller_publish(&alloc.volume, &alloc.job, &alloc.node_id.clone())
            .await
        {
            Ok(ctx) => alloc.publish_context = ctx,
            Err(e) => return Err((alloc, e)),
        }
        match self.mount_volume(&alloc).await {
            Ok(()) => Ok(alloc),
            Err(e) => Err((alloc, ClaimError::Mount(e))),
        }
    }

    /// Node capability: the volume's mount_options overlaid by the job's (job fs_type wins
    /// when set, job flags replace when set); the job's modes.
    fn node_capability(&self, alloc: &Alloc) -> csi::VolumeCapability {
        let opts = match (&alloc.volume.spec.mount_options, &alloc.job.mount_options) {
            (None, job) => job.clone(),
            (Some(v), None) => Some(v.clone()),
            (Some(v), Some(j)) => {
                let mut o = v.clone();
                if !j.fs_type.is_empty() {
                    o.fs_type = j.fs_type.clone();
                }
                if !j.mount_flags.is_empty() {
                    o.mount_flags = j.mount_flags.clone();
                }
                Some(o)
            }
        };
        capability(alloc.job.access_mode, alloc.job.attachment, opts.as_ref())
    }

    /// csimanager `MountVolume` (§2.2): stage unless the staging dir is a mount point, publish
    /// unless the target is; the usage is tracked only on success. No deadlines.
    pub async fn mount_volume(&mut self, alloc: &Alloc) -> Result<(), Status> {
        let cap = self.node_capability(alloc);
        if self.fp.requires_staging {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&alloc.staging)
                .unwrap();
            if is_mount_point(&alloc.staging) {
                self.calls
                    .push("NodeStageVolume skipped: staging is a mount".into());
            } else {
                let req = csi::NodeStageVolumeRequest {
                    volume_id: alloc.volume.remote_id().to_string(),
                    publish_context: alloc.publish_context.clone(),
                    staging_target_path: alloc.staging.display().to_string(),
                    volume_capability: Some(cap.clone()),
                    secrets: alloc.volume.spec.secrets.clone(),
                    volume_context: alloc.volume.context.clone(),
                };
                let r = self.node.node_stage_volume(request(req, None)).await;
                self.log("NodeStageVolume", &r);
                r?;
            }
        }
        let parent = alloc.target.parent().unwrap();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .unwrap();
        if alloc.target.exists() && is_mount_point(&alloc.target) {
            self.calls
                .push("NodePublishVolume skipped: target is a mount".into());
        } else {
            let req = csi::NodePublishVolumeRequest {
                volume_id: alloc.volume.remote_id().to_string(),
                publish_context: alloc.publish_context.clone(),
                staging_target_path: if self.fp.requires_staging {
                    alloc.staging.display().to_string()
                } else {
                    String::new()
                },
                target_path: alloc.target.display().to_string(),
                volume_capability: Some(cap),
                readonly: alloc.job.read_only,
                secrets: alloc.volume.spec.secrets.clone(),
                volume_context: alloc.volume.context.clone(),
            };
            let r = self.node.node_publish_volume(request(req, None)).await;
            self.log("NodePublishVolume", &r);
            r?;
        }
        self.usage
            .entry((alloc.volume.spec.id.clone(), alloc.job.usage()))
            .or_default()
            .insert(alloc.id.clone());
        Ok(())
    }

    // ---------------------------------------------------------------- (c) stop

    /// csimanager `UnmountVolume` (§2.2): NodeUnpublish with Nomad's host-path cleanup, then
    /// NodeUnstage when no other alloc here holds the same volume and usage.
    /// Returns (NodeUnpublish as Nomad judged it, NodeUnstage if sent).
    pub async fn unmount_volume(
        &mut self,
        alloc: &Alloc,
    ) -> (Result<(), Status>, Option<Result<(), Status>>) {
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: alloc.volume.remote_id().to_string(),
            target_path: alloc.target.display().to_string(),
        };
        let r = self
            .node
            .node_unpublish_volume(request(req, None))
            .await
            .map(drop);
        self.log("NodeUnpublishVolume", &r);
        let raw = r.clone();
        // Nomad's judgement: NotFound is ignorable; a leftover target that `os.Remove` takes
        // away makes any error ignorable, one it cannot remove is an error of its own.
        let mut judged = match r {
            Err(e) if e.code() == Code::NotFound => Ok(()),
            other => other,
        };
        match std::fs::symlink_metadata(&alloc.target) {
            Ok(m) => {
                let removed = if m.is_dir() {
                    std::fs::remove_dir(&alloc.target)
                } else {
                    std::fs::remove_file(&alloc.target)
                };
                judged = match removed {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Status::internal(format!(
                        "removing {}: {e}",
                        alloc.target.display()
                    ))),
                };
            }
            Err(_) => {
                if matches!(&judged, Err(e) if e.message().contains("no mount point")) {
                    judged = Ok(());
                }
            }
        }
        if judged.is_err() {
            return (raw.and(judged), None);
        }
        let key = (alloc.volume.spec.id.clone(), alloc.job.usage());
        let can_release = match self.usage.get_mut(&key) {
            Some(set) => {
                set.remove(&alloc.id);
                set.is_empty()
            }
            None => true,
        };
        if !(self.fp.requires_staging && can_release) {
            return (raw, None);
        }
        self.usage.remove(&key);
        // COMPAT (pre-1.7 layout): when the namespaced host path is gone (the plugin removed
        // it at an earlier unstage), Nomad unstages `staging/<vol>/<usage>` instead.
        let staging = if alloc.staging.exists() {
            alloc.staging.clone()
        } else {
            self.base
                .join("staging")
                .join(&alloc.volume.spec.id)
                .join(alloc.job.usage())
        };
        let req = csi::NodeUnstageVolumeRequest {
            volume_id: alloc.volume.remote_id().to_string(),
            staging_target_path: staging.display().to_string(),
        };
        let u = self
            .node
            .node_unstage_volume(request(req, None))
            .await
            .map(drop);
        self.log("NodeUnstageVolume", &u);
        (raw, Some(u))
    }

    /// The server's ControllerUnpublishVolume: volume and node id only, never secrets (§1.2).
    pub async fn controller_unpublish(
        &mut self,
        vol: &Volume,
        node_id: &str,
    ) -> Result<(), Status> {
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.remote_id().to_string(),
            node_id: node_id.to_string(),
            secrets: Map::new(),
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.controller_unpublish_volume(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await
        .map(drop);
        self.log("ControllerUnpublishVolume", &r);
        r
    }

    /// Allocation stop (c), also the cleanup of a failed start: node steps, then the server's
    /// Unpublish (sent even if the node steps failed), which calls ControllerUnpublish unless
    /// another live alloc on this node claims the volume. A ControllerUnpublish error keeps
    /// the claim (volumewatcher retries it later: `release_past_claim`).
    pub async fn stop(&mut self, alloc: &Alloc) -> StopReport {
        let (node_unpublish, node_unstage) = self.unmount_volume(alloc).await;
        let controller_unpublish = self.server_unpublish(alloc).await;
        StopReport {
            node_unpublish,
            node_unstage,
            controller_unpublish,
        }
    }

    /// The server's `CSIVolume.Unpublish` for a claim (§3.2 step 3); also what volumewatcher
    /// sends again for a past claim whose ControllerUnpublish failed.
    pub async fn server_unpublish(&mut self, alloc: &Alloc) -> Option<Result<(), Status>> {
        let others_here = self
            .claims
            .get(&alloc.volume.spec.id)
            .map(|c| c.iter().any(|(a, n)| *a != alloc.id && *n == alloc.node_id))
            .unwrap_or(false);
        if others_here
            || !(self.fp.controller_required && self.fp.has(CtrlCap::PublishUnpublishVolume))
        {
            self.release(alloc);
            return None;
        }
        let r = self
            .controller_unpublish(&alloc.volume, &alloc.node_id)
            .await;
        // NotFound is ignorable: the claim is freed.
        if r.is_ok() || matches!(&r, Err(e) if e.code() == Code::NotFound) {
            self.release(alloc);
        }
        Some(r)
    }

    fn release(&mut self, alloc: &Alloc) {
        if let Some(c) = self.claims.get_mut(&alloc.volume.spec.id) {
            c.remove(&alloc.id);
        }
    }

    /// Whether the server still holds a claim of this alloc (a past claim awaiting release).
    pub fn has_claim(&self, alloc: &Alloc) -> bool {
        self.claims
            .get(&alloc.volume.spec.id)
            .is_some_and(|c| c.contains_key(&alloc.id))
    }

    // ---------------------------------------------------------------- (d) snapshots

    /// `nomad volume snapshot create <vol> <name> -parameter k=v`.
    pub async fn snapshot_create(
        &mut self,
        vol: &Volume,
        name: &str,
        parameters: Map,
    ) -> Result<Snapshot, Status> {
        self.require(CtrlCap::CreateDeleteSnapshot);
        let req = csi::CreateSnapshotRequest {
            source_volume_id: vol.external_id.clone(),
            name: name.to_string(),
            secrets: vol.spec.secrets.clone(),
            parameters,
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.create_snapshot(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("CreateSnapshot", &r);
        let s = r?
            .snapshot
            .ok_or_else(|| Status::internal("CreateSnapshot answered without a snapshot"))?;
        Ok(snapshot_of(s))
    }

    /// `nomad volume snapshot delete <plugin> <id>`.
    pub async fn snapshot_delete(&mut self, id: &str) -> Result<(), Status> {
        self.require(CtrlCap::CreateDeleteSnapshot);
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            secrets: Map::new(),
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.delete_snapshot(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await
        .map(drop);
        self.log("DeleteSnapshot", &r);
        r
    }

    /// One page of `GET /v1/volumes/snapshot?per_page=N&next_token=T`, truncated to N.
    pub async fn snapshot_list_page(
        &mut self,
        per_page: i32,
        next_token: &str,
    ) -> Result<(Vec<Snapshot>, String), Status> {
        self.require(CtrlCap::ListSnapshots);
        let req = csi::ListSnapshotsRequest {
            max_entries: per_page,
            starting_token: next_token.to_string(),
            ..Default::default()
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.list_snapshots(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("ListSnapshots", &r);
        let r = r?;
        let mut out: Vec<Snapshot> = r
            .entries
            .into_iter()
            .map(|e| snapshot_of(e.snapshot.expect("every snapshot entry has a snapshot")))
            .collect();
        if per_page > 0 {
            out.truncate(per_page as usize);
        }
        Ok((out, r.next_token))
    }

    /// `nomad volume snapshot list -per-page N`, following next_token until it is "".
    pub async fn snapshot_list_all(&mut self, per_page: i32) -> Result<Vec<Snapshot>, Status> {
        let (mut all, mut token) = self.snapshot_list_page(per_page, "").await?;
        let mut pages = 1;
        while !token.is_empty() {
            let (page, next) = self.snapshot_list_page(per_page, &token).await?;
            assert!(
                !page.is_empty() || next.is_empty(),
                "empty page with a next_token"
            );
            all.extend(page);
            token = next;
            pages += 1;
            assert!(pages < 1000, "ListSnapshots paging does not end");
        }
        Ok(all)
    }

    // ---------------------------------------------------------------- (e) delete

    /// `nomad volume delete` (§3.7): DeleteVolume with the ExternalID and the secrets.
    pub async fn volume_delete(&mut self, vol: &Volume) -> Result<(), Status> {
        assert!(self.fp.controller_required);
        let req = csi::DeleteVolumeRequest {
            volume_id: vol.external_id.clone(),
            secrets: vol.spec.secrets.clone(),
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.delete_volume(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await
        .map(drop);
        self.log("DeleteVolume", &r);
        r
    }

    // ---------------------------------------------------------------- (f) external volumes

    /// One page of `GET /v1/volumes/external?per_page=N&next_token=T` (§3.8).
    pub async fn external_page(
        &mut self,
        per_page: i32,
        next_token: &str,
    ) -> Result<(Vec<ExternalVolume>, String), Status> {
        self.require(CtrlCap::ListVolumes);
        let req = csi::ListVolumesRequest {
            max_entries: per_page,
            starting_token: next_token.to_string(),
        };
        let mut c = self.controller().await?;
        let r = within(
            CONTROLLER_DEADLINE,
            c.list_volumes(request(req, Some(CONTROLLER_DEADLINE))),
        )
        .await;
        self.log("ListVolumes", &r);
        let r = r?;
        let mut out = Vec::new();
        for e in r.entries {
            // Nomad dereferences entry.volume: a missing one would panic the client.
            let v = e
                .volume
                .expect("every ListVolumes entry must have `volume` set");
            use csi::volume_content_source::Type;
            let (mut snapshot_id, mut clone_id) = (String::new(), String::new());
            match v.content_source.and_then(|s| s.r#type) {
                Some(Type::Snapshot(s)) => snapshot_id = s.snapshot_id,
                Some(Type::Volume(s)) => clone_id = s.volume_id,
                None => {}
            }
            let status = e.status.unwrap_or_default();
            let cond = status.volume_condition.unwrap_or_default();
            out.push(ExternalVolume {
                external_id: v.volume_id,
                capacity_bytes: v.capacity_bytes,
                volume_context: v.volume_context,
                snapshot_id,
                clone_id,
                published_external_node_ids: status.published_node_ids,
                is_abnormal: cond.abnormal,
                status: cond.message,
            });
        }
        if per_page > 0 {
            out.truncate(per_page as usize);
        }
        Ok((out, r.next_token))
    }

    /// `nomad volume status -verbose`: pages of `per_page` until next_token is "" (or a page
    /// comes back empty).
    pub async fn external_all(&mut self, per_page: i32) -> Result<Vec<ExternalVolume>, Status> {
        let mut all = Vec::new();
        let mut token = String::new();
        for _ in 0..1000 {
            let (page, next) = self.external_page(per_page, &token).await?;
            let empty = page.is_empty();
            all.extend(page);
            if next.is_empty() || empty {
                return Ok(all);
            }
            token = next;
        }
        panic!("ListVolumes paging does not end");
    }
}
