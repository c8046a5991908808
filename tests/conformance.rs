//! CSI conformance against the monolith with local attach (the real binary, qemu-storage-daemon,
//! loop devices, mkfs, mounts; root needed):
//! - the community's suite, csi-sanity (kubernetes-csi/csi-test v5.4.0), passes;
//! - every RPC answers a request with several faults with the code the CSI error tables put
//!   first (arguments, then what the request names, then the state);
//! - node RPCs act only on the volume they name, told by its disk's serial, never by the path;
//! - a disk that cannot be read is never formatted.
//!
//! Required in CI (`CI` set) and wherever csi-sanity is found: no SKIP there.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;
use virtdisk_test_support::local_attach::*;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::shared_tool;

/// The per-host volume limit the tests configure: csi-sanity publishes that many, then one more.
const LIMIT: i64 = 4;
const CONFIG: &str = "[node]\ndevice_wait_secs = 2\nmax_volumes_per_node = 4\n";

/// True when these tests must run: in CI, or wherever csi-sanity is there.
fn required() -> bool {
    std::env::var_os("CI").is_some() || csi_sanity().is_some()
}

/// Root, FUSE, loop devices and qemu-storage-daemon (`env::can_run`); a failure where the
/// tests are required.
fn ready() -> bool {
    if can_run() {
        return true;
    }
    assert!(
        !required(),
        "conformance tests are required here (CI, or csi-sanity present) but the host lacks \
         root, /dev/fuse, /dev/loop-control or qemu-storage-daemon"
    );
    false
}

/// csi-sanity: `$VIRTDISK_CSI_SANITY`, `../shared/tools/csi-sanity` or PATH.
fn csi_sanity() -> Option<PathBuf> {
    shared_tool("csi-sanity", "VIRTDISK_CSI_SANITY")
}

/// csi-sanity, every spec (`-ginkgo.v`), with the attach-limit and mutable-parameter specs on.
/// Its summary line is printed. Every spec must run and pass, the GroupController ones
/// (VolumeGroupSnapshot) included: none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes() {
    let Some(tool) = csi_sanity() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "csi-sanity is required in CI: ../shared/tools/csi-sanity, $VIRTDISK_CSI_SANITY or PATH"
        );
        eprintln!("SKIPPED: csi-sanity not found (../shared/tools, $VIRTDISK_CSI_SANITY, PATH)");
        return;
    };
    if !ready() {
        return;
    }
    let env = Env::start(CONFIG).await;
    let max = env.plugin.node().max_volumes().await;
    assert_eq!(max, LIMIT, "the configured limit");
    let dir = env.dir().join("sanity");
    std::fs::create_dir_all(&dir).unwrap();
    // Valid QoS keys, applied at CreateVolume and by ControllerModifyVolume.
    let mutable = dir.join("mutable.yaml");
    std::fs::write(
        &mutable,
        "readIopsSec: \"100\"\nwriteBytesSec: \"1048576\"\n",
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(&tool);
    cmd.arg(format!(
        "-csi.endpoint=unix://{}",
        env.plugin.socket.display()
    ))
    .arg(format!("-csi.mountdir={}", dir.join("target").display()))
    .arg(format!("-csi.stagingdir={}", dir.join("staging").display()))
    .arg(format!("-csi.testvolumesize={}", 64 * MIB))
    .arg("-csi.testnodevolumeattachlimit")
    .arg(format!(
        "-csi.testvolumemutableparameters={}",
        mutable.display()
    ))
    .args(["-ginkgo.v", "-ginkgo.no-color"])
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("csi-sanity finishes within 10 minutes")
        .expect("run csi-sanity");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(dir.join("csi-sanity.log"), &text).unwrap();
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Ran ") || l.contains(" Passed | "))
        .collect();
    eprintln!("csi-sanity: {}", summary.join(" — "));
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("[FAIL]"))
        .collect();
    assert!(
        out.status.success()
            && failed.is_empty()
            && summary.iter().any(|l| l.contains(" 0 Failed")),
        "csi-sanity failed:\n{}\n{}\n(full output: {})",
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr),
        text
    );
    // Each skipped spec is named on the line after its "S [SKIPPED]" marker.
    let lines: Vec<&str> = text.lines().collect();
    let skipped: Vec<&str> = lines
        .windows(2)
        .filter(|w| w[0].starts_with("S [SKIPPED]"))
        .map(|w| w[1])
        .collect();
    assert!(skipped.is_empty(), "skipped specs: {skipped:?}");
    for group_spec in [
        "[GroupController Server] GroupControllerGetCapabilities",
        "[GroupController VolumeGroupSnapshots] CreateVolumeGroupSnapshot",
        "[GroupController VolumeGroupSnapshots] GetVolumeGroupSnapshot",
        "[GroupController VolumeGroupSnapshots] DeleteVolumeGroupSnapshot",
    ] {
        assert!(
            text.contains(group_spec),
            "csi-sanity ran no {group_spec} spec:\n{text}"
        );
    }
    drop(env);
}

/// Without `max_volumes_per_node`, NodeGetInfo reports this host's own limit (loop minors,
/// mounts, tasks: `localattach::limit`), which ControllerPublish then enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reports_the_hosts_attach_limit() {
    if !ready() {
        return;
    }
    let env = Env::start("").await;
    let max = env.plugin.node().max_volumes().await;
    eprintln!("this host holds at most {max} locally attached volumes");
    assert!((1..=1 << 20).contains(&max), "{max}");
}

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// One row: a request with one or more faults, and the answer the CSI error tables give
/// (None: OK).
struct Case {
    what: &'static str,
    want: Option<Code>,
    call: Call,
}

fn case<F>(what: &'static str, want: Option<Code>, call: F) -> Case
where
    F: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    Case {
        what,
        want,
        call: Box::pin(call),
    }
}

/// A valid volume id of this plugin that names no volume.
const UNKNOWN: &str = "default.0123456789abcdef";

/// Every RPC, requests with several faults at once: the code is the one of the fault the CSI
/// error tables check first — a malformed or missing field (INVALID_ARGUMENT) before what the
/// request names (NOT_FOUND), before the state of things (ALREADY_EXISTS, FAILED_PRECONDITION,
/// RESOURCE_EXHAUSTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_in_the_order_of_the_csi_error_tables() {
    if !ready() {
        return;
    }
    let env = Env::start(CONFIG).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    // X is published at tx; Y at ty; a plain directory holds nothing.
    let x_name = unique("order-x");
    let x = env.create(&x_name, 32 * MIB, cap.clone()).await;
    let y = env.create(&unique("order-y"), 32 * MIB, cap.clone()).await;
    let (sx, tx) = (env.staging("order-x"), env.target("order-x"));
    let (sy, ty) = (env.staging("order-y"), env.target("order-y"));
    for (v, s, t) in [(&x, &sx, &tx), (&y, &sy, &ty)] {
        let ctx = env.controller_publish(v, &cap, false).await;
        env.stage(v, &ctx, s, &cap).await.unwrap();
        env.publish(v, s, t, &cap, false).await.unwrap();
    }
    let plain = env.staging("order-plain");
    let (c, n) = (env.plugin.controller(), env.plugin.node());
    let node_id = env.node_id.clone();
    let xid = x.volume_id.clone();
    let no_cap = csi::VolumeCapability::default();
    use Code::*;
    macro_rules! ctl {
        ($rpc:ident, $req:expr) => {{
            let mut c = c.clone();
            let req = $req;
            async move { c.$rpc(req).await.map(drop) }
        }};
    }
    macro_rules! node {
        ($rpc:ident, $req:expr) => {{
            let mut n = n.clone();
            let req = $req;
            async move { n.$rpc(req).await.map(drop) }
        }};
    }
    let publish = |vol: &str, node: &str, cap: Option<csi::VolumeCapability>, ro: bool| {
        csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.into(),
            volume_capability: cap,
            readonly: ro,
            ..Default::default()
        }
    };
    // A mount capability with one flag: flags that make mount(8) do something else than
    // mount the volume's disk (loop another device over it, bind, move or remount what is at
    // the path, create paths) are invalid fields.
    let flagged = |flag: &str| csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into(), flag.into()],
                volume_mount_group: String::new(),
            },
        )),
        ..cap.clone()
    };
    // NodeExpandVolume of X at its target, to more than the limit it gives.
    let over_limit = csi::NodeExpandVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 * MIB,
            limit_bytes: 32 * MIB,
        }),
        ..node_expand_req(&xid, &tx, 64 * MIB)
    };
    let cases = vec![
        // ---- Controller ----
        case(
            "CreateVolume: no name, no capabilities",
            Some(InvalidArgument),
            ctl!(create_volume, csi::CreateVolumeRequest::default()),
        ),
        case(
            "CreateVolume: no capabilities, negative capacity",
            Some(InvalidArgument),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![],
                    ..create_req("order-neg", -1)
                }
            ),
        ),
        case(
            "CreateVolume: unknown mutable parameter, negative capacity",
            Some(InvalidArgument),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    mutable_parameters: params(&[("XXX_FakeKey", "x")]),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: -1,
                        limit_bytes: 0
                    }),
                    ..create_req("order-mut", 0)
                }
            ),
        ),
        case(
            "CreateVolume: negative capacity",
            Some(OutOfRange),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: -1,
                        limit_bytes: 0
                    }),
                    ..create_req("order-range", 0)
                }
            ),
        ),
        case(
            "CreateVolume: from a snapshot that does not exist",
            Some(NotFound),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    volume_content_source: Some(csi::VolumeContentSource {
                        r#type: Some(csi::volume_content_source::Type::Snapshot(
                            csi::volume_content_source::SnapshotSource {
                                snapshot_id: "default.s0123456789abcdef".into()
                            },
                        )),
                    }),
                    ..create_req("order-src", 32 * MIB)
                }
            ),
        ),
        case(
            "CreateVolume: X's name, another size",
            Some(AlreadyExists),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![cap.clone()],
                    ..create_req(&x_name, 64 * MIB)
                }
            ),
        ),
        case(
            "DeleteVolume: no id",
            Some(InvalidArgument),
            ctl!(delete_volume, csi::DeleteVolumeRequest::default()),
        ),
        case(
            "DeleteVolume: X, published",
            Some(FailedPrecondition),
            ctl!(
                delete_volume,
                csi::DeleteVolumeRequest {
                    volume_id: xid.clone(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerPublish: unknown volume, no capability",
            Some(InvalidArgument),
            ctl!(
                controller_publish_volume,
                publish(UNKNOWN, &node_id, None, false)
            ),
        ),
        case(
            "ControllerPublish: unknown volume, unknown node",
            Some(NotFound),
            ctl!(
                controller_publish_volume,
                publish(UNKNOWN, "no-such-node", Some(cap.clone()), false)
            ),
        ),
        case(
            "ControllerPublish: X to an unknown node",
            Some(NotFound),
            ctl!(
                controller_publish_volume,
                publish(&xid, "no-such-node", Some(cap.clone()), false)
            ),
        ),
        case(
            "ControllerPublish: X again, read-only",
            Some(AlreadyExists),
            ctl!(
                controller_publish_volume,
                publish(&xid, &node_id, Some(cap.clone()), true)
            ),
        ),
        case(
            "ControllerPublish: X again, the same",
            None,
            ctl!(
                controller_publish_volume,
                publish(&xid, &node_id, Some(cap.clone()), false)
            ),
        ),
        case(
            "ControllerUnpublish: no volume id",
            Some(InvalidArgument),
            ctl!(
                controller_unpublish_volume,
                csi::ControllerUnpublishVolumeRequest {
                    node_id: node_id.clone(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerUnpublish: unknown volume",
            None,
            ctl!(
                controller_unpublish_volume,
                csi::ControllerUnpublishVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    node_id: node_id.clone(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ValidateVolumeCapabilities: unknown volume, no capabilities",
            Some(InvalidArgument),
            ctl!(
                validate_volume_capabilities,
                csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: UNKNOWN.into(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ValidateVolumeCapabilities: unknown volume",
            Some(NotFound),
            ctl!(
                validate_volume_capabilities,
                csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: UNKNOWN.into(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                }
            ),
        ),
        case(
            "ListVolumes: negative max_entries, bad token",
            Some(InvalidArgument),
            ctl!(
                list_volumes,
                csi::ListVolumesRequest {
                    max_entries: -1,
                    starting_token: "garbage".into()
                }
            ),
        ),
        case(
            "ListVolumes: bad token",
            Some(Aborted),
            ctl!(
                list_volumes,
                csi::ListVolumesRequest {
                    max_entries: 1,
                    starting_token: "garbage".into()
                }
            ),
        ),
        case(
            "ControllerGetVolume: no id",
            Some(InvalidArgument),
            ctl!(
                controller_get_volume,
                csi::ControllerGetVolumeRequest::default()
            ),
        ),
        case(
            "ControllerGetVolume: unknown volume",
            Some(NotFound),
            ctl!(
                controller_get_volume,
                csi::ControllerGetVolumeRequest {
                    volume_id: UNKNOWN.into()
                }
            ),
        ),
        case(
            "ControllerExpandVolume: unknown volume, bad capability, negative capacity",
            Some(InvalidArgument),
            ctl!(
                controller_expand_volume,
                csi::ControllerExpandVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: -1,
                        limit_bytes: 0
                    }),
                    volume_capability: Some(no_cap.clone()),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerExpandVolume: unknown volume, negative capacity",
            Some(OutOfRange),
            ctl!(
                controller_expand_volume,
                csi::ControllerExpandVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: -1,
                        limit_bytes: 0
                    }),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerExpandVolume: unknown volume",
            Some(NotFound),
            ctl!(
                controller_expand_volume,
                csi::ControllerExpandVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 64 * MIB,
                        limit_bytes: 0
                    }),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerModifyVolume: unknown volume, unknown key",
            Some(InvalidArgument),
            ctl!(
                controller_modify_volume,
                csi::ControllerModifyVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    mutable_parameters: params(&[("bus", "virtio")]),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerModifyVolume: unknown volume, bad value",
            Some(InvalidArgument),
            ctl!(
                controller_modify_volume,
                csi::ControllerModifyVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    mutable_parameters: params(&[("readIopsSec", "lots")]),
                    ..Default::default()
                }
            ),
        ),
        case(
            "ControllerModifyVolume: unknown volume",
            Some(NotFound),
            ctl!(
                controller_modify_volume,
                csi::ControllerModifyVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    mutable_parameters: params(&[("readIopsSec", "100")]),
                    ..Default::default()
                }
            ),
        ),
        case(
            "CreateSnapshot: no name, unknown source",
            Some(InvalidArgument),
            ctl!(
                create_snapshot,
                csi::CreateSnapshotRequest {
                    source_volume_id: UNKNOWN.into(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "CreateSnapshot: unknown source",
            Some(NotFound),
            ctl!(
                create_snapshot,
                csi::CreateSnapshotRequest {
                    source_volume_id: UNKNOWN.into(),
                    name: "order-snap".into(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "GetSnapshot: no id",
            Some(InvalidArgument),
            ctl!(get_snapshot, csi::GetSnapshotRequest::default()),
        ),
        case(
            "GetSnapshot: unknown snapshot",
            Some(NotFound),
            ctl!(
                get_snapshot,
                csi::GetSnapshotRequest {
                    snapshot_id: "default.s0123456789abcdef".into(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "DeleteSnapshot: no id",
            Some(InvalidArgument),
            ctl!(delete_snapshot, csi::DeleteSnapshotRequest::default()),
        ),
        case(
            "ListSnapshots: negative max_entries, bad token",
            Some(InvalidArgument),
            ctl!(
                list_snapshots,
                csi::ListSnapshotsRequest {
                    max_entries: -1,
                    starting_token: "garbage".into(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "GetCapacity: unknown parameter, bad capability",
            Some(InvalidArgument),
            ctl!(
                get_capacity,
                csi::GetCapacityRequest {
                    parameters: params(&[("XXX_FakeKey", "x")]),
                    volume_capabilities: vec![no_cap.clone()],
                    ..Default::default()
                }
            ),
        ),
        case(
            "ListSnapshots: bad token",
            Some(Aborted),
            ctl!(
                list_snapshots,
                csi::ListSnapshotsRequest {
                    starting_token: "garbage".into(),
                    ..Default::default()
                }
            ),
        ),
        // ---- Node ----
        case(
            "NodeStage: no volume id, relative staging path",
            Some(InvalidArgument),
            node!(node_stage_volume, stage_req("", "rel/path", cap.clone())),
        ),
        case(
            "NodeStage: unknown volume, no capability",
            Some(InvalidArgument),
            node!(
                node_stage_volume,
                csi::NodeStageVolumeRequest {
                    volume_capability: None,
                    ..stage_req(UNKNOWN, &plain, cap.clone())
                }
            ),
        ),
        case(
            "NodeStage: X with mount flag `loop` at a plain directory",
            Some(InvalidArgument),
            node!(node_stage_volume, stage_req(&xid, &plain, flagged("loop"))),
        ),
        case(
            "NodeStage: X with mount flag `X-mount.mkdir` at Y's staging path",
            Some(InvalidArgument),
            node!(
                node_stage_volume,
                stage_req(&xid, &sy, flagged("X-mount.mkdir"))
            ),
        ),
        case(
            "NodePublish: X with mount flag `remount`",
            Some(InvalidArgument),
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sx, &tx, flagged("remount"))
            ),
        ),
        case(
            "CreateVolume: mount flag `bind`",
            Some(InvalidArgument),
            ctl!(
                create_volume,
                csi::CreateVolumeRequest {
                    volume_capabilities: vec![flagged("bind")],
                    ..create_req("order-bind", 32 * MIB)
                }
            ),
        ),
        case(
            "NodeStage: X with a mount option the file system does not know",
            Some(InvalidArgument),
            node!(
                node_stage_volume,
                stage_req(&xid, &plain, flagged("no_such_option"))
            ),
        ),
        case(
            "NodeStage: X with a mount option value the file system refuses",
            Some(InvalidArgument),
            node!(
                node_stage_volume,
                stage_req(&xid, &plain, flagged("commit=soon"))
            ),
        ),
        case(
            "NodeStage: X at Y's staging path",
            Some(AlreadyExists),
            node!(node_stage_volume, stage_req(&xid, &sy, cap.clone())),
        ),
        case(
            "NodeStage: unknown volume at Y's staging path",
            Some(NotFound),
            node!(node_stage_volume, stage_req(UNKNOWN, &sy, cap.clone())),
        ),
        case(
            "NodeStage: unknown volume inside Y's target",
            Some(NotFound),
            node!(
                node_stage_volume,
                stage_req(UNKNOWN, &format!("{ty}/inner"), cap.clone())
            ),
        ),
        case(
            "NodeStage: not a volume of this plugin, publish_context with a serial",
            Some(NotFound),
            node!(
                node_stage_volume,
                csi::NodeStageVolumeRequest {
                    publish_context: params(&[("serial", "vd-0123456789abcdef")]),
                    ..stage_req("not-ours", &plain, cap.clone())
                }
            ),
        ),
        case(
            "NodeStage: X at its staging path, the same",
            None,
            node!(node_stage_volume, stage_req(&xid, &sx, cap.clone())),
        ),
        case(
            "NodeStage: X at its staging path, fs_type xfs",
            Some(AlreadyExists),
            node!(
                node_stage_volume,
                stage_req(&xid, &sx, mount_cap("xfs", Mode::SingleNodeWriter))
            ),
        ),
        case(
            "NodeStage: X at its staging path, read-only",
            Some(AlreadyExists),
            node!(
                node_stage_volume,
                stage_req(&xid, &sx, mount_cap("ext4", Mode::SingleNodeReaderOnly))
            ),
        ),
        case(
            "NodeStage: X at its staging path, mount flag noatime",
            Some(AlreadyExists),
            node!(
                node_stage_volume,
                stage_req(&xid, &sx, with_flags(&cap, &["noatime"]))
            ),
        ),
        case(
            "NodeStage: X at its staging path, mount flag discard",
            Some(AlreadyExists),
            node!(
                node_stage_volume,
                stage_req(&xid, &sx, with_flags(&cap, &["discard"]))
            ),
        ),
        case(
            "NodeStage: X at its staging path as a block volume",
            Some(AlreadyExists),
            node!(
                node_stage_volume,
                stage_req(&xid, &sx, block_cap(Mode::SingleNodeWriter))
            ),
        ),
        case(
            "NodeUnstage: no volume id",
            Some(InvalidArgument),
            node!(
                node_unstage_volume,
                csi::NodeUnstageVolumeRequest {
                    staging_target_path: sx.clone(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "NodeUnstage: unknown volume at X's staging path",
            None,
            node!(
                node_unstage_volume,
                csi::NodeUnstageVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    staging_target_path: sx.clone()
                }
            ),
        ),
        case(
            "NodePublish: no capability, no staging path",
            Some(InvalidArgument),
            node!(
                node_publish_volume,
                csi::NodePublishVolumeRequest {
                    volume_capability: None,
                    ..node_publish_req(&xid, "", &env.target("order-p1"), cap.clone())
                }
            ),
        ),
        case(
            "NodePublish: bad capability, no staging path",
            Some(InvalidArgument),
            node!(
                node_publish_volume,
                node_publish_req(&xid, "", &env.target("order-p2"), no_cap.clone())
            ),
        ),
        case(
            "NodePublish: no staging path",
            Some(FailedPrecondition),
            node!(
                node_publish_volume,
                node_publish_req(&xid, "", &env.target("order-p3"), cap.clone())
            ),
        ),
        case(
            "NodePublish: not a volume of this plugin",
            Some(NotFound),
            node!(
                node_publish_volume,
                node_publish_req("not-ours", &sx, &env.target("order-p4"), cap.clone())
            ),
        ),
        case(
            "NodePublish: X from Y's staging path",
            Some(FailedPrecondition),
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sy, &env.target("order-p5"), cap.clone())
            ),
        ),
        case(
            "NodePublish: unknown volume from Y's staging path",
            Some(NotFound),
            node!(
                node_publish_volume,
                node_publish_req(UNKNOWN, &sy, &env.target("order-p6"), cap.clone())
            ),
        ),
        case(
            "NodePublish: unknown volume, no staging path",
            Some(NotFound),
            node!(
                node_publish_volume,
                node_publish_req(UNKNOWN, "", &env.target("order-p7"), cap.clone())
            ),
        ),
        case(
            "NodePublish: unknown volume at X's target",
            Some(NotFound),
            node!(
                node_publish_volume,
                node_publish_req(UNKNOWN, &sx, &tx, cap.clone())
            ),
        ),
        case(
            "NodePublish: unknown volume, target inside Y's target",
            Some(NotFound),
            node!(
                node_publish_volume,
                node_publish_req(UNKNOWN, &sy, &format!("{ty}/inner"), cap.clone())
            ),
        ),
        case(
            "NodePublish: X at its target, the same",
            None,
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sx, &tx, cap.clone())
            ),
        ),
        case(
            "NodePublish: X at its target, fs_type xfs",
            Some(AlreadyExists),
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sx, &tx, mount_cap("xfs", Mode::SingleNodeWriter))
            ),
        ),
        case(
            "NodePublish: X at its target, mount flag noatime",
            Some(AlreadyExists),
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sx, &tx, with_flags(&cap, &["noatime"]))
            ),
        ),
        case(
            "NodePublish: X at its target as a block volume",
            Some(AlreadyExists),
            node!(
                node_publish_volume,
                node_publish_req(&xid, &sx, &tx, block_cap(Mode::SingleNodeWriter))
            ),
        ),
        case(
            "NodePublish: X at its target, read-only",
            Some(AlreadyExists),
            node!(
                node_publish_volume,
                csi::NodePublishVolumeRequest {
                    readonly: true,
                    ..node_publish_req(&xid, &sx, &tx, cap.clone())
                }
            ),
        ),
        case(
            "NodeUnpublish: no target",
            Some(InvalidArgument),
            node!(
                node_unpublish_volume,
                csi::NodeUnpublishVolumeRequest {
                    volume_id: xid.clone(),
                    ..Default::default()
                }
            ),
        ),
        case(
            "NodeUnpublish: unknown volume at X's target",
            None,
            node!(
                node_unpublish_volume,
                csi::NodeUnpublishVolumeRequest {
                    volume_id: UNKNOWN.into(),
                    target_path: tx.clone()
                }
            ),
        ),
        case(
            "NodeGetVolumeStats: no volume path",
            Some(InvalidArgument),
            node!(node_get_volume_stats, stats_req(UNKNOWN, "", "")),
        ),
        case(
            "NodeGetVolumeStats: unknown volume, relative path",
            Some(NotFound),
            node!(node_get_volume_stats, stats_req(UNKNOWN, "some/path", "")),
        ),
        case(
            "NodeGetVolumeStats: X, relative path",
            Some(NotFound),
            node!(node_get_volume_stats, stats_req(&xid, "some/path", "")),
        ),
        case(
            "NodeGetVolumeStats: X, a path that does not exist",
            Some(NotFound),
            node!(
                node_get_volume_stats,
                stats_req(&xid, &env.target("order-none"), "")
            ),
        ),
        case(
            "NodeGetVolumeStats: X, a directory with nothing mounted",
            Some(NotFound),
            node!(node_get_volume_stats, stats_req(&xid, &plain, "")),
        ),
        case(
            "NodeGetVolumeStats: X at Y's target",
            Some(NotFound),
            node!(node_get_volume_stats, stats_req(&xid, &ty, "")),
        ),
        case(
            "NodeGetVolumeStats: unknown volume at X's target",
            Some(NotFound),
            node!(node_get_volume_stats, stats_req(UNKNOWN, &tx, "")),
        ),
        case(
            "NodeGetVolumeStats: X at its target",
            None,
            node!(node_get_volume_stats, stats_req(&xid, &tx, "")),
        ),
        case(
            "NodeExpandVolume: no volume path",
            Some(InvalidArgument),
            node!(node_expand_volume, node_expand_req(UNKNOWN, "", 64 * MIB)),
        ),
        case(
            "NodeExpandVolume: bad capability, required > limit",
            Some(InvalidArgument),
            node!(
                node_expand_volume,
                csi::NodeExpandVolumeRequest {
                    volume_capability: Some(no_cap.clone()),
                    ..over_limit.clone()
                }
            ),
        ),
        case(
            "NodeExpandVolume: unknown volume, relative path",
            Some(NotFound),
            node!(
                node_expand_volume,
                node_expand_req(UNKNOWN, "some/path", 64 * MIB)
            ),
        ),
        case(
            "NodeExpandVolume: X, required > limit",
            Some(OutOfRange),
            node!(node_expand_volume, over_limit.clone()),
        ),
        case(
            "NodeExpandVolume: X, a directory with nothing mounted",
            Some(NotFound),
            node!(node_expand_volume, node_expand_req(&xid, &plain, 32 * MIB)),
        ),
        case(
            "NodeExpandVolume: X at Y's target",
            Some(NotFound),
            node!(node_expand_volume, node_expand_req(&xid, &ty, 32 * MIB)),
        ),
        case(
            "NodeExpandVolume: unknown volume at X's target",
            Some(NotFound),
            node!(node_expand_volume, node_expand_req(UNKNOWN, &tx, 32 * MIB)),
        ),
    ];
    let mut wrong = Vec::new();
    for Case { what, want, call } in cases {
        let got = call.await;
        let got_code = got.as_ref().err().map(|s| s.code());
        if got_code != want {
            wrong.push(format!(
                "{what}: want {want:?}, got {got_code:?} {}",
                got.err()
                    .map(|s| s.message().to_string())
                    .unwrap_or_default()
            ));
        }
    }
    assert!(wrong.is_empty(), "wrong codes:\n{}", wrong.join("\n"));
    // Nothing above touched X or Y.
    for (v, s, t) in [(&x, &sx, &tx), (&y, &sy, &ty)] {
        assert!(is_mount(s) && is_mount(t), "{} lost a mount", v.volume_id);
        env.unpublish_twice(v, t).await;
        env.unstage_twice(v, s).await;
    }
    finish_all(&env, &[&x, &y]).await;
}

/// ControllerUnpublish and delete every volume; nothing is left on the host.
async fn finish_all(env: &Env, vols: &[&csi::Volume]) {
    for v in vols {
        env.controller_unpublish(v).await.unwrap();
        env.delete(v).await;
    }
    assert_no_leftovers(env.dir());
}

/// Y's data, written through its target (a file, or a pattern on the block device).
fn write_data(target: &str, block: bool) {
    if block {
        block_write(target, 0x5a);
    } else {
        write_file(target, "y.txt", b"volume Y");
    }
}

fn data_intact(target: &str, block: bool) -> bool {
    if block {
        block_reads(target, 0x5a)
    } else {
        std::fs::read(Path::new(target).join("y.txt"))
            .ok()
            .as_deref()
            == Some(&b"volume Y"[..])
    }
}

/// Two tests that run `$body` (an async fn taking the capability): `$mount` with an ext4
/// mount volume, `$block` with a block volume; both single-node-writer.
macro_rules! mount_and_block {
    ($(#[$doc:meta])* $mount:ident, $block:ident, $body:ident) => {
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mount() {
            $body(mount_cap("ext4", Mode::SingleNodeWriter)).await;
        }

        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $block() {
            $body(block_cap(Mode::SingleNodeWriter)).await;
        }
    };
}

mount_and_block! {
    /// Issue 12 §3: Nomad skips NodeStage when the staging directory is already a mount
    /// point, so a path mix-up reaches the plugin. With X and Y published to this node and
    /// only Y staged, X's NodePublish from Y's staging path is refused, naming what is there;
    /// X's NodeUnpublish and NodeUnstage of Y's paths answer OK and leave Y mounted; and the
    /// reverse. For block volumes, device nodes are bound onto the staging file and targets.
    node_rpcs_act_only_on_the_volume_they_name_mount,
    node_rpcs_act_only_on_the_volume_they_name_block,
    only_the_named_volume
}

/// The environment of a test run for a mount and a block capability (None: SKIPPED), whether
/// `cap` is the block one, and a tag for the paths and names: `<base>-block` or `<base>-mount`.
async fn env_for(cap: &csi::VolumeCapability, base: &str) -> Option<(Env, bool, String)> {
    if !ready() {
        return None;
    }
    let block = is_block(cap);
    let tag = format!("{base}-{}", if block { "block" } else { "mount" });
    Some((Env::start(CONFIG).await, block, tag))
}

async fn only_the_named_volume(cap: csi::VolumeCapability) {
    let Some((env, block, tag)) = env_for(&cap, "named").await else {
        return;
    };
    let x = env
        .create(&unique(&format!("{tag}-x")), 32 * MIB, cap.clone())
        .await;
    let y = env
        .create(&unique(&format!("{tag}-y")), 32 * MIB, cap.clone())
        .await;
    let ctx_x = env.controller_publish(&x, &cap, false).await;
    let ctx_y = env.controller_publish(&y, &cap, false).await;
    let (sx, tx) = (
        env.staging(&format!("{tag}-x")),
        env.target(&format!("{tag}-x")),
    );
    let (sy, ty) = (
        env.staging(&format!("{tag}-y")),
        env.target(&format!("{tag}-y")),
    );
    let staged = |s: &str| {
        if block {
            format!("{s}/virtdisk-block-device")
        } else {
            s.to_string()
        }
    };
    env.stage(&y, &ctx_y, &sy, &cap).await.unwrap();
    env.publish(&y, &sy, &ty, &cap, false).await.unwrap();
    write_data(&ty, block);

    // X staged with Y's publish_context (a CO that mixed up its records): refused before
    // anything is mounted, naming both disks. Taking the publish_context's serial would mount
    // Y's disk at X's staging path, under X's name.
    let s_mixed = env.staging(&format!("{tag}-x-ctx-y"));
    let msg = expect_code(
        env.stage(&x, &ctx_y, &s_mixed, &cap).await,
        Code::InvalidArgument,
        "NodeStage(X) with Y's publish_context",
    );
    assert!(
        msg.contains(&serial_of(&y.volume_id)) && msg.contains(&serial_of(&x.volume_id)),
        "{msg}"
    );
    assert!(!is_mount(&staged(&s_mixed)), "X's staging path got a mount");

    // X from Y's staging path: refused, naming Y's disk; nothing mounted at X's target.
    let msg = expect_code(
        env.publish(&x, &sy, &tx, &cap, false).await,
        Code::FailedPrecondition,
        "NodePublish(X) from Y's staging path",
    );
    assert!(msg.contains(&serial_of(&y.volume_id)), "{msg}");
    assert!(!is_mount(&tx), "X's target got a mount");
    // X's unpublish of Y's target and unstage of Y's staging path: OK, Y untouched.
    env.unpublish(&x, &ty).await.unwrap();
    env.unstage(&x, &sy).await.unwrap();
    assert!(is_mount(&ty) && is_mount(&staged(&sy)), "Y lost a mount");
    assert!(data_intact(&ty, block), "Y's data");

    // The other way round, with both staged and published at their own paths.
    env.stage(&x, &ctx_x, &sx, &cap).await.unwrap();
    env.publish(&x, &sx, &tx, &cap, false).await.unwrap();
    let msg = expect_code(
        env.publish(&y, &sx, &env.target(&format!("{tag}-y2")), &cap, false)
            .await,
        Code::FailedPrecondition,
        "NodePublish(Y) from X's staging path",
    );
    assert!(msg.contains(&serial_of(&x.volume_id)), "{msg}");
    env.unpublish(&y, &tx).await.unwrap();
    env.unstage(&y, &sx).await.unwrap();
    assert!(is_mount(&tx) && is_mount(&staged(&sx)), "X lost a mount");
    assert!(data_intact(&ty, block), "Y's data");

    for (v, s, t) in [(&x, &sx, &tx), (&y, &sy, &ty)] {
        env.unpublish_twice(v, t).await;
        env.unstage_twice(v, s).await;
    }
    finish_all(&env, &[&x, &y]).await;
}

/// Where a volume's staging mount is: the staging directory (mount) or the device file in it
/// (block).
fn staged_at(staging: &str, block: bool) -> String {
    if block {
        format!("{staging}/virtdisk-block-device")
    } else {
        staging.to_string()
    }
}

mount_and_block! {
    /// Issue 12 §3, the kind "a path of the wrong role": a path mix-up on ONE volume never
    /// takes the consumer's mount away. NodeUnpublish takes down only a publish (a bind of the
    /// volume at a target), NodeUnstage only a staging mount (for a block volume, the device
    /// file in the staging directory); which one a path holds is told from what is mounted
    /// there, not from which RPC names it.
    unpublish_and_unstage_take_down_only_their_own_kind_of_mount_mount,
    unpublish_and_unstage_take_down_only_their_own_kind_of_mount_block,
    own_kind_of_mount
}

async fn own_kind_of_mount(cap: csi::VolumeCapability) {
    let Some((env, block, tag)) = env_for(&cap, "roles").await else {
        return;
    };
    let (x, ctx) = env.attached(&tag, 32 * MIB, &cap).await;
    let (s, t) = (env.staging(&tag), env.target(&tag));
    env.stage(&x, &ctx, &s, &cap).await.unwrap();
    env.publish(&x, &s, &t, &cap, false).await.unwrap();
    write_data(&t, block);
    let staged = staged_at(&s, block);
    if !block {
        // The publish is a bind the staging mount propagates to, not a peer of it: a mount
        // made inside the consumer's target stays there, out of the staging mount (and so out
        // of every other target of the volume).
        let sub = format!("{t}/sub");
        std::fs::create_dir(&sub).unwrap();
        run_ok("mount", &["-t", "tmpfs", "vdt-inside-target", &sub]);
        let seen_in_stage = is_mount(&format!("{s}/sub"));
        nix::mount::umount(Path::new(&sub)).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        assert!(
            !seen_in_stage,
            "a mount inside the target showed in the staging mount"
        );
    }
    let intact = |what: &str| {
        assert!(
            is_mount(&staged),
            "{what}: the staging mount {staged} is gone"
        );
        assert!(is_mount(&t), "{what}: the consumer's mount {t} is gone");
        assert!(data_intact(&t, block), "{what}: the consumer's data");
    };

    // NodeUnpublish of the staging mount: it is no publish; refused, saying what it is.
    let msg = expect_code(
        env.unpublish(&x, &staged).await,
        Code::FailedPrecondition,
        "NodeUnpublish(X, its staging mount)",
    );
    assert!(msg.contains("staging") && msg.contains(&staged), "{msg}");
    intact("NodeUnpublish(X, its staging mount)");
    if block {
        // The staging directory itself holds no mount: nothing is published there.
        env.unpublish(&x, &s).await.unwrap();
        intact("NodeUnpublish(X, its staging directory)");
    }

    // NodeUnstage of the target: X is published there, not staged; refused, and the message
    // calls the target a publish (never the staging path).
    let msg = expect_code(
        env.unstage(&x, &t).await,
        Code::FailedPrecondition,
        "NodeUnstage(X, its target)",
    );
    assert!(
        msg.contains(&format!("published at {t}")) && msg.contains("NodeUnpublishVolume"),
        "{msg}"
    );
    assert!(
        !msg.contains(&format!("published at {staged}")),
        "the staging mount called a publish: {msg}"
    );
    intact("NodeUnstage(X, its target)");

    // NodeStage at the target (it holds a publish, not a staging mount): refused.
    expect_code(
        env.stage(&x, &ctx, &t, &cap).await,
        Code::AlreadyExists,
        "NodeStage(X, its target)",
    );
    intact("NodeStage(X, its target)");
    // NodePublish from the target as if it were the staging path: refused.
    let t2 = env.target(&format!("{tag}-2"));
    expect_code(
        env.publish(&x, &t, &t2, &cap, false).await,
        Code::FailedPrecondition,
        "NodePublish(X) from its target",
    );
    assert!(!is_mount(&t2), "a publish from a publish");

    // A second staging path of X: a publish onto it is refused (it holds X's staging mount,
    // not a publish); unpublishing it is refused; unstaging it works and leaves X's first
    // staging mount and the consumer alone.
    let s2 = env.staging(&format!("{tag}-2"));
    env.stage(&x, &ctx, &s2, &cap).await.unwrap();
    let staged2 = staged_at(&s2, block);
    expect_code(
        env.publish(&x, &s, &staged2, &cap, false).await,
        Code::AlreadyExists,
        "NodePublish(X) onto its second staging mount",
    );
    expect_code(
        env.unpublish(&x, &staged2).await,
        Code::FailedPrecondition,
        "NodeUnpublish(X, its second staging mount)",
    );
    env.unstage_twice(&x, &s2).await;
    intact("NodeUnstage(X, its second staging path)");

    // The CO's order: the target, then the staging path.
    env.unpublish_twice(&x, &t).await;
    env.unstage_twice(&x, &s).await;
    finish_all(&env, &[&x]).await;
}

/// A staging mount and a publish whose records are lost (a crash between the mount and its
/// record, or mounts an older version made): the first repeat the kernel's view matches is
/// OK and becomes the record, so a later repeat with other mount flags (which the kernel does
/// not show) is ALREADY_EXISTS, as it is for a mount made with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_without_its_record_takes_the_first_matching_repeat_as_its_record() {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let Some((env, _, tag)) = env_for(&cap, "adopt").await else {
        return;
    };
    let (x, ctx) = env.attached(&tag, 32 * MIB, &cap).await;
    let (s, t) = (env.staging(&tag), env.target(&tag));
    env.stage(&x, &ctx, &s, &cap).await.unwrap();
    env.publish(&x, &s, &t, &cap, false).await.unwrap();
    let records = env.plugin.data_dir().join("node");
    let lose_records = || {
        for e in std::fs::read_dir(&records).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    };
    lose_records();
    let other = with_flags(&cap, &["discard"]);
    // Without a record, the first repeat is compared with what the kernel shows only: the
    // flags cannot be told, so it is OK, and from now on it stands for the request.
    env.stage(&x, &ctx, &s, &cap).await.unwrap();
    env.publish(&x, &s, &t, &cap, false).await.unwrap();
    expect_code(
        env.stage(&x, &ctx, &s, &other).await,
        Code::AlreadyExists,
        "NodeStage(X) again with other flags, its record taken from a repeat",
    );
    expect_code(
        env.publish(&x, &s, &t, &other, false).await,
        Code::AlreadyExists,
        "NodePublish(X) again with other flags, its record taken from a repeat",
    );
    // A repeat the kernel's view tells apart (read-only) is refused and records nothing.
    lose_records();
    expect_code(
        env.publish(&x, &s, &t, &cap, true).await,
        Code::AlreadyExists,
        "NodePublish(X) again read-only, no record",
    );
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
    env.unpublish_twice(&x, &t).await;
    env.unstage_twice(&x, &s).await;
    finish_all(&env, &[&x]).await;
}

mount_and_block! {
    /// Issue 12 §3, the kind "a path inside a volume": a staging or target path whose
    /// containing mount is one of this plugin's disks (any volume's, this volume's own too)
    /// is refused with FAILED_PRECONDITION, before anything is created there. X as a mount
    /// volume, then as a block volume (its target a device file inside Y's file system).
    paths_inside_a_volume_are_refused_mount,
    paths_inside_a_volume_are_refused_block,
    paths_inside_a_volume
}

async fn paths_inside_a_volume(cap: csi::VolumeCapability) {
    let Some((env, block, tag)) = env_for(&cap, "inside").await else {
        return;
    };
    let ycap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (x, ctx) = env.attached(&format!("{tag}-x"), 32 * MIB, &cap).await;
    let (y, ctx_y) = env.attached(&format!("{tag}-y"), 32 * MIB, &ycap).await;
    let (sx, tx) = (
        env.staging(&format!("{tag}-x")),
        env.target(&format!("{tag}-x")),
    );
    let (sy, ty) = (
        env.staging(&format!("{tag}-y")),
        env.target(&format!("{tag}-y")),
    );
    env.stage(&x, &ctx, &sx, &cap).await.unwrap();
    env.publish(&x, &sx, &tx, &cap, false).await.unwrap();
    env.stage(&y, &ctx_y, &sy, &ycap).await.unwrap();
    env.publish(&y, &sy, &ty, &ycap, false).await.unwrap();
    write_data(&ty, false);
    let listing = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let y_before = listing(&ty);

    let mut inside = vec![
        (format!("{ty}/inner"), &y, "Y's target"),
        (
            format!("{ty}/a/b/inner"),
            &y,
            "a new directory in Y's target",
        ),
        (format!("{sy}/inner"), &y, "Y's staging mount"),
    ];
    if !block {
        inside.push((format!("{tx}/inner"), &x, "X's own target"));
        inside.push((format!("{sx}/inner"), &x, "X's own staging mount"));
    }
    for (path, holder, what) in &inside {
        let msg = expect_code(
            env.publish(&x, &sx, path, &cap, false).await,
            Code::FailedPrecondition,
            &format!("NodePublish(X) at a target inside {what}"),
        );
        assert!(msg.contains(&serial_of(&holder.volume_id)), "{msg}");
        assert!(!Path::new(path).exists(), "{path} was created");
        let msg = expect_code(
            env.stage(&x, &ctx, path, &cap).await,
            Code::FailedPrecondition,
            &format!("NodeStage(X) at a staging path inside {what}"),
        );
        assert!(msg.contains(&serial_of(&holder.volume_id)), "{msg}");
        assert!(!Path::new(path).exists(), "{path} was created");
    }
    assert_eq!(listing(&ty), y_before, "Y's file system changed");
    assert_eq!(
        listing(&sy),
        y_before,
        "Y's file system, seen from its staging path"
    );
    assert!(data_intact(&ty, false), "Y's data");

    for (v, s, t) in [(&x, &sx, &tx), (&y, &sy, &ty)] {
        env.unpublish_twice(v, t).await;
        env.unstage_twice(v, s).await;
    }
    finish_all(&env, &[&x, &y]).await;
}

/// Issue 12, "answer at once": NodeStage of a volume this node can know is not attached
/// answers NOT_FOUND without waiting for a disk to appear — a local-attach publish_context
/// (the loop device is there when ControllerPublishVolume returns, or never), none at all on a
/// host that attaches locally, an id that is not this plugin's — and rescans no SCSI bus. The
/// plugin runs with the default 30 s device wait: an answer in a fraction of it shows that no
/// wait happened (the figures are printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_of_a_volume_not_on_this_node_answers_at_once() {
    if !ready() {
        return;
    }
    let env = Env::start("[node]\nmax_volumes_per_node = 4\n").await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    // A volume that was attached here and no longer is: its real publish_context.
    let (gone, gone_ctx) = env.attached("at-once", 32 * MIB, &cap).await;
    env.controller_unpublish(&gone).await.unwrap();
    let local_ctx = |serial: &str| {
        params(&[
            ("serial", serial),
            ("bus", "local"),
            ("devicePath", "/dev/loop0"),
        ])
    };
    let unknown = csi::Volume {
        volume_id: UNKNOWN.into(),
        ..Default::default()
    };
    let foreign = csi::Volume {
        volume_id: "not-ours".into(),
        ..Default::default()
    };
    let cases: Vec<(&str, &csi::Volume, Map)> = vec![
        (
            "detached volume, its publish_context",
            &gone,
            gone_ctx.clone(),
        ),
        ("detached volume, no publish_context", &gone, Map::new()),
        (
            "unknown volume, a local publish_context",
            &unknown,
            local_ctx(&serial_of(UNKNOWN)),
        ),
        ("unknown volume, no publish_context", &unknown, Map::new()),
        (
            "not a volume of this plugin, a serial",
            &foreign,
            local_ctx("vd-0123456789abcdef"),
        ),
    ];
    for (i, (what, vol, ctx)) in cases.into_iter().enumerate() {
        let s = env.staging(&format!("at-once-{i}"));
        let start = std::time::Instant::now();
        let msg = expect_code(
            env.stage(vol, &ctx, &s, &cap).await,
            Code::NotFound,
            &format!("NodeStage: {what}"),
        );
        let took = start.elapsed();
        eprintln!(
            "NodeStage, {what}: NOT_FOUND in {} ms: {msg}",
            took.as_millis()
        );
        assert!(
            took < Duration::from_secs(10),
            "NodeStage, {what}: {took:?}, as if it waited for the disk"
        );
        assert!(!is_mount(&s));
    }
    assert!(
        !env.plugin.log().contains("rescanned SCSI hosts"),
        "the host's SCSI buses were rescanned"
    );
    env.delete(&gone).await;
    assert_no_leftovers(env.dir());
}

/// Issue 12 §3, mounts with no disk behind them: a tmpfs (and a bind of one of its
/// directories) that some other user mounted where a node RPC points. Their device is the
/// kernel's unnamed one (major 0), never found in sysfs, so they must not pass for a volume
/// "whose disk is gone": NodeUnpublish and NodeUnstage answer OK and leave them mounted with
/// their data (unmounting a tmpfs destroys it); NodePublish from one is refused; stats and
/// expand answer NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rpcs_never_take_down_a_mount_with_no_disk_behind_it() {
    if !ready() {
        return;
    }
    let env = Env::start(CONFIG).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (x, _ctx) = env.attached("nodisk-x", 32 * MIB, &cap).await;
    // Someone else's tmpfs, and a bind of a directory of it (a subPath-like mount), both
    // where a Nomad staging path and target would be.
    let tmpfs = env.staging("someone-elses-tmpfs");
    let bind = env.target("someone-elses-bind");
    let mount = |args: &[&str]| {
        let st = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "mount {args:?}");
    };
    mount(&["-t", "tmpfs", "vdt-tmpfs", &tmpfs]);
    write_file(&tmpfs, "precious.txt", b"only in memory");
    std::fs::create_dir(Path::new(&tmpfs).join("sub")).unwrap();
    std::fs::create_dir_all(&bind).unwrap();
    mount(&["--bind", &format!("{tmpfs}/sub"), &bind]);
    for path in [&tmpfs, &bind] {
        env.unpublish(&x, path).await.unwrap();
        env.unstage(&x, path).await.unwrap();
        assert!(
            is_mount(path),
            "{path} was unmounted for volume {}",
            x.volume_id
        );
        expect_code(
            env.stats(&x, path, "").await,
            Code::NotFound,
            "NodeGetVolumeStats(X) of a tmpfs",
        );
    }
    let msg = expect_code(
        env.publish(&x, &tmpfs, &env.target("nodisk-x"), &cap, false)
            .await,
        Code::FailedPrecondition,
        "NodePublish(X) from a tmpfs",
    );
    assert!(msg.contains("tmpfs"), "{msg}");
    assert_eq!(
        std::fs::read(Path::new(&tmpfs).join("precious.txt")).unwrap(),
        b"only in memory"
    );
    for path in [&bind, &tmpfs] {
        nix::mount::umount(Path::new(path)).unwrap();
    }
    finish_all(&env, &[&x]).await;
}

/// Issue 12 §4: an ext4 volume was staged, written and unstaged; then its storage daemon dies,
/// so the disk answers every read with EIO — and `blkid` then reports no signature, as for a
/// blank disk. NodeStage must fail without formatting (the disk holds data: here the node
/// sees the dead export and says so); once attached afresh the data reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_disk_is_never_formatted() {
    if !ready() {
        return;
    }
    let env = Env::start(CONFIG).await;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = env.create(&unique("eio"), 32 * MIB, cap.clone()).await;
    let ctx = env.controller_publish(&vol, &cap, false).await;
    let (s, t) = (env.staging("eio"), env.target("eio"));
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    write_file(&t, "kept.txt", b"data that must survive");
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;

    let formats_before = env.plugin.log().matches("formatting blank disk").count();
    assert_eq!(formats_before, 1, "the first stage formats the new disk");
    // Kill the storage daemon: the loop device's backing FUSE file is disconnected.
    env.kill_daemon(&vol);
    // Cached pages keep answering until FUSE revalidates (about a second): wait for EIO.
    let dev = ctx["devicePath"].clone();
    let reads = || {
        std::process::Command::new("dd")
            .args([
                &format!("if={dev}"),
                "of=/dev/null",
                "bs=4096",
                "count=1",
                "iflag=direct",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    let mut waited = 0;
    while reads() {
        assert!(waited < 100, "{dev} still reads 10 s after its daemon died");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let blkid = std::process::Command::new("blkid")
        .args(["-p", &dev])
        .output()
        .unwrap();
    eprintln!(
        "blkid -p on the unreadable disk: exit {:?} (2 = \"nothing found\")",
        blkid.status.code()
    );

    for (fs, path) in [("ext4", "eio-2"), ("", "eio-3"), ("xfs", "eio-4")] {
        let s2 = env.staging(path);
        let err = env
            .stage(&vol, &ctx, &s2, &mount_cap(fs, Mode::SingleNodeWriter))
            .await
            .expect_err("NodeStage of an unreadable disk");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(!is_mount(&s2));
        env.unstage_twice(&vol, &s2).await;
    }
    let formats = env.plugin.log().matches("formatting blank disk").count();
    assert_eq!(formats, formats_before, "mkfs ran on the unreadable disk");

    // Attached afresh, the filesystem and its file are there.
    env.controller_unpublish(&vol).await.unwrap();
    let ctx = env.controller_publish(&vol, &cap, false).await;
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    assert_eq!(
        std::fs::read(Path::new(&t).join("kept.txt")).unwrap(),
        b"data that must survive"
    );
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    finish_all(&env, &[&vol]).await;
}

/// Issue 12 §4, the whole kind: a disk whose every read fails while nothing says it is dead
/// (its storage daemon lives and injects EIO: QEMU's blkdebug), so `blkid` reports no
/// signature. NodeStage must not take it for blank: an error that says it may hold data, no
/// mkfs, and the image unchanged to the byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_whose_reads_fail_is_not_blank() {
    if !ready() {
        return;
    }
    let env = Env::start(CONFIG).await;
    // An ext4 image served read-write by a daemon that fails every data read.
    let dir = env.dir().join("faulty");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.raw");
    let key = "00000000deadbeef";
    let export = dir.join(format!("vd-{key}"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let before = std::fs::read(&image).unwrap();
    std::fs::write(&export, b"").unwrap();
    let blockdev = |v: serde_json::Value| v.to_string();
    run_ok(
        "qemu-storage-daemon",
        &[
            "--daemonize",
            "--pidfile",
            dir.join("qsd.pid").to_str().unwrap(),
            "--blockdev",
            &blockdev(serde_json::json!({"driver": "file", "node-name": "f",
                "filename": image})),
            "--blockdev",
            &blockdev(serde_json::json!({"driver": "blkdebug", "node-name": "eio",
                "image": "f", "inject-error": [{"event": "read_aio", "errno": 5}]})),
            "--blockdev",
            &blockdev(serde_json::json!({"driver": "raw", "node-name": "d", "file": "eio"})),
            "--export",
            &blockdev(
                serde_json::json!({"type": "fuse", "id": "e", "node-name": "d",
                "mountpoint": export, "writable": true}),
            ),
        ],
    );
    let dev = run_ok(
        "losetup",
        &["-f", "--show", "--direct-io=off", export.to_str().unwrap()],
    );
    let dev = dev.trim().to_string();
    let blkid = std::process::Command::new("blkid")
        .args(["-p", &dev])
        .output()
        .unwrap();
    eprintln!(
        "blkid -p on a disk whose reads fail: exit {:?} (2 = \"nothing found\")",
        blkid.status.code()
    );

    // What a local-attach publish_context says about such a disk.
    let ctx: Map = [
        ("serial", format!("vd-{key}")),
        ("bus", "local".into()),
        ("devicePath", dev.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let vol = csi::Volume {
        volume_id: format!("default.{key}"),
        ..Default::default()
    };
    for (fs, path) in [("ext4", "faulty-1"), ("", "faulty-2"), ("xfs", "faulty-3")] {
        let s = env.staging(path);
        let err = env
            .stage(&vol, &ctx, &s, &mount_cap(fs, Mode::SingleNodeWriter))
            .await
            .expect_err("NodeStage of a disk whose reads fail");
        assert!(
            err.message().contains("may hold data"),
            "fs {fs:?}: {:?} {}",
            err.code(),
            err.message()
        );
        assert!(!is_mount(&s));
        env.unstage_twice(&vol, &s).await;
    }
    assert!(
        !env.plugin.log().contains("formatting blank disk"),
        "mkfs ran on a disk whose reads fail"
    );
    run_ok("losetup", &["-d", &dev]);
    let pid: i32 = std::fs::read_to_string(dir.join("qsd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), || async {
        let _ = nix::mount::umount2(&export, nix::mount::MntFlags::MNT_DETACH);
        let left = leftovers(env.dir());
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left behind: {left:?}"))
        }
    })
    .await;
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
}
