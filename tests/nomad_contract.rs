//! The Nomad contract (shared/reference/nomad-contract.md), proved by playing Nomad: `nomad::Nomad`
//! makes exactly the calls Nomad's servers and clients make, with Nomad's paths, fields,
//! deadlines and error handling, against the real monolith (libvirt + local attach: qemu-storage-
//! daemon, loop devices, real mkfs and mounts). Needs root, /dev/fuse and loop devices; the last
//! test also a KVM domain as a second node.

mod nomad;

use nomad::{Attachment, ClaimError, JobVolume, MountOptions, Nomad, Volume, VolumeSpec};
use std::path::Path;
use virtdisk_test_support::local_attach as env;
use virtdisk_test_support::prelude::*;

use csi::controller_service_capability::rpc::Type as CtrlCap;

/// Short device wait: the failure path with a serial that does not exist waits this long.
const CONFIG: &str = "[node]\ndevice_wait_secs = 2\n";
/// A secret Nomad sends with volumes: it must never show up in the plugin's log.
const SECRET: &str = "nomad-secret-3f9c2e1d";

/// A monolith plugin with Nomad in front of it; everything under the temp dir is cleaned up
/// on drop (mounts, loop devices, storage daemons), also when the test failed.
struct Bed {
    plugin: Plugin,
    nomad: Nomad,
}

impl Bed {
    async fn start() -> Option<Bed> {
        if !env::can_run() {
            return None;
        }
        let plugin = Plugin::start_with_config("monolith", CONFIG, &[]).await;
        // Nomad's layout: <client state_dir = data_dir/client>/csi/monolith/<plugin id>/
        // {staging,per-alloc}.
        let base = plugin.dir.path().join("nomad/client/csi/monolith/virtdisk");
        let nomad = Nomad::start(&plugin.socket, &base)
            .await
            .expect("plugin start");
        Some(Bed { plugin, nomad })
    }

    fn dir(&self) -> &Path {
        self.plugin.dir.path()
    }

    fn assert_secret_never_logged(&self) {
        assert!(
            !self.plugin.log().contains(SECRET),
            "a secret reached the plugin's log"
        );
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        env::cleanup(self.plugin.dir.path());
    }
}

/// A volume name no other test or concurrent run uses (names key the volume ids).
fn unique(tag: &str) -> String {
    format!("vdt-nomad-{tag}-{}", std::process::id())
}

fn spec(tag: &str, caps: &[(Mode, Attachment)], fs: &str) -> VolumeSpec {
    VolumeSpec {
        id: tag.to_string(),
        name: unique(tag),
        capabilities: caps.to_vec(),
        mount_options: (!fs.is_empty()).then(|| MountOptions {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
        }),
        parameters: params(&[("cache", "none")]),
        secrets: params(&[("token", SECRET)]),
        ..Default::default()
    }
}

/// A file-system volume for one writer node, ext4.
fn rw_spec(tag: &str) -> VolumeSpec {
    spec(
        tag,
        &[(Mode::SingleNodeWriter, Attachment::FileSystem)],
        "ext4",
    )
}

fn rw() -> JobVolume {
    JobVolume::rw(Attachment::FileSystem)
}

async fn claim_ok(nomad: &mut Nomad, vol: &Volume, job: &JobVolume) -> nomad::Alloc {
    match nomad.claim(vol, job).await {
        Ok(a) => a,
        Err((_, e)) => panic!("claim failed: {e:?}"),
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    env::write_file(dir.to_str().unwrap(), name, data);
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// (0) Plugin start: Probe and GetPluginInfo within Nomad's 1 s, the capabilities Nomad gates
/// on, a node id, and the same node id and capabilities after a restart and after a crash
/// (which leaves a stale socket behind, as Nomad's plugin dir does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_start_fingerprint_and_stable_node_id() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let fp = bed.nomad.fp.clone();
    assert_eq!(fp.provider, "virtdisk.csi.io");
    assert_eq!(fp.version, env!("CARGO_PKG_VERSION"));
    assert!(fp.controller_required);
    for cap in [
        CtrlCap::CreateDeleteVolume,
        CtrlCap::PublishUnpublishVolume,
        CtrlCap::ListVolumes,
        CtrlCap::ListVolumesPublishedNodes,
        CtrlCap::VolumeCondition,
        CtrlCap::CreateDeleteSnapshot,
        CtrlCap::ListSnapshots,
        CtrlCap::ExpandVolume,
    ] {
        assert!(fp.has(cap), "controller lacks {cap:?}");
    }
    assert!(fp.requires_staging, "STAGE_UNSTAGE_VOLUME");
    assert!(!fp.node_id.is_empty());
    // Local attach: this host's own limit (`localattach::limit`), never "unlimited".
    assert!(
        (1..i64::MAX).contains(&fp.max_volumes),
        "{}",
        fp.max_volumes
    );
    bed.nomad.fingerprint_again().await.unwrap();

    bed.plugin.restart().await;
    let again = Nomad::start(&bed.plugin.socket, &bed.nomad.base)
        .await
        .unwrap();
    assert_eq!(
        again.fp.node_id, fp.node_id,
        "node id changed across a restart"
    );
    assert_eq!(again.fp.controller_caps, fp.controller_caps);

    bed.plugin.kill();
    assert!(
        bed.plugin.socket.exists(),
        "a crash leaves the socket behind"
    );
    bed.plugin.restart().await;
    let after_crash = Nomad::start(&bed.plugin.socket, &bed.nomad.base)
        .await
        .unwrap();
    assert_eq!(after_crash.fp.node_id, fp.node_id);
}

/// (a) create and register, (b) claim, (c) stop, each repeated as Nomad repeats them, plus
/// ControllerUnpublish arriving while the node still has the volume mounted (§3.2.4) and
/// (e) DeleteVolume while published and of unknown ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_register_claim_stop_and_repeat() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let n = &mut bed.nomad;
    // (a) No capacity_range, empty accessibility_requirements, parameters and secrets.
    let spec = rw_spec("web-data");
    let vol = n.volume_create(&spec).await.unwrap();
    assert!(
        vol.external_id.starts_with("default."),
        "{}",
        vol.external_id
    );
    assert_eq!(vol.capacity, GIB, "the default size");
    assert_eq!(vol.context.get("fsType").map(String::as_str), Some("ext4"));
    assert!(vol.topologies.is_empty(), "no topology configured");
    // Registration can fail after CreateVolume succeeded: the user re-runs create.
    let again = n.volume_create(&spec).await.unwrap();
    assert_eq!(again.external_id, vol.external_id);
    assert_eq!(again.capacity, vol.capacity);
    assert_eq!(again.context, vol.context);
    // `nomad volume register` of the same external volume: mount{} without fs_type, and the
    // echoed capabilities pass Nomad's comparison (inside volume_register).
    let mut reg = spec.clone();
    reg.id = "web-data-registered".into();
    reg.context = vol.context.clone();
    n.volume_register(&reg, &vol.external_id)
        .await
        .expect("Nomad accepts the registration");
    // A capability the volume cannot serve (multi-writer on a file system) is not confirmed
    // (the CSI way: `confirmed` unset plus a message). Nomad accepts an unset `confirmed`:
    // the registration passes and the claim fails later at ControllerPublish (see the
    // failure path test). Only a gRPC error would make Nomad refuse here.
    let mut bad = reg.clone();
    bad.id = "web-data-multi-writer".into();
    bad.capabilities = vec![(Mode::MultiNodeMultiWriter, Attachment::FileSystem)];
    n.volume_register(&bad, &vol.external_id)
        .await
        .expect("Nomad accepts an unset `confirmed`");
    let calls = n.take_calls();
    assert_eq!(
        calls[..4],
        [
            "CreateVolume",
            "CreateVolume",
            "ValidateVolumeCapabilities",
            "ValidateVolumeCapabilities"
        ]
    );
    assert!(
        calls.len() == 5 && calls[4].starts_with("(not confirmed") && calls[4].contains("block"),
        "{calls:?}"
    );

    // (b) claim → ControllerPublish → NodeStage → NodePublish.
    let a1 = claim_ok(n, &vol, &rw()).await;
    assert_eq!(
        n.take_calls(),
        [
            "ControllerPublishVolume",
            "NodeStageVolume",
            "NodePublishVolume"
        ]
    );
    assert!(a1
        .staging
        .ends_with("staging/default/web-data/rw-file-system-single-node-writer"));
    assert!(nomad::is_mount_point(&a1.target));
    // A retried claim publishes again: same publish_context.
    let ctx = n
        .controller_publish(&vol, &rw(), &a1.node_id)
        .await
        .unwrap();
    assert_eq!(ctx, a1.publish_context);
    // Mounting again (a client restart's restore): both steps skipped, mount points exist.
    n.mount_volume(&a1).await.unwrap();
    assert_eq!(
        n.take_calls(),
        [
            "ControllerPublishVolume",
            "NodeStageVolume skipped: staging is a mount",
            "NodePublishVolume skipped: target is a mount"
        ]
    );
    write(&a1.target, "hello", b"from alloc 1");

    // (c) stop → NodeUnpublish → NodeUnstage → ControllerUnpublish without secrets.
    let report = n.stop(&a1).await;
    report.assert_all_ok("stop");
    assert_eq!(
        n.take_calls(),
        [
            "NodeUnpublishVolume",
            "NodeUnstageVolume",
            "ControllerUnpublishVolume"
        ]
    );
    assert!(!a1.target.exists());
    assert!(!nomad::is_mount_point(&a1.staging));
    env::assert_no_leftovers(bed.dir());
    // Each repeated, as the unmount retry loop, volumewatcher and GC do; then an unknown node.
    let n = &mut bed.nomad;
    n.stop(&a1).await.assert_all_ok("second stop");
    n.controller_unpublish(&vol, &a1.node_id).await.unwrap();
    n.controller_unpublish(&vol, "nomad-client-that-is-gone")
        .await
        .unwrap();
    env::assert_no_leftovers(bed.dir());

    // The data survived; now the failure path of §3.2.4: the node did not unmount (node RPC
    // failed or node lost) and the server sends ControllerUnpublish anyway.
    let n = &mut bed.nomad;
    let a2 = claim_ok(n, &vol, &rw()).await;
    assert_eq!(read(&a2.target, "hello"), b"from alloc 1");
    // (e) DeleteVolume while published: FailedPrecondition, "volume is in use" for Nomad.
    let e = n.volume_delete(&vol).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    n.take_calls();
    let early = n
        .server_unpublish(&a2)
        .await
        .expect("ControllerUnpublish sent");
    let e = early.unwrap_err();
    // Not NotFound (that would free the claim while the disk is in use): an error Nomad keeps
    // the claim for and retries (volumewatcher / GC), naming what to do.
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("NodeUnpublishVolume"),
        "{}",
        e.message()
    );
    assert!(n.has_claim(&a2), "the claim must stay for a later retry");
    assert_eq!(read(&a2.target, "hello"), b"from alloc 1", "still usable");
    // The client's unmount retry succeeds, then volumewatcher's retry.
    let (unpub, unstage) = n.unmount_volume(&a2).await;
    unpub.unwrap();
    unstage.expect("unstage sent").unwrap();
    n.server_unpublish(&a2).await.unwrap().unwrap();
    assert!(!n.has_claim(&a2));
    env::assert_no_leftovers(bed.dir());

    // (e) DeleteVolume: OK, again OK, and OK for ids that never existed.
    let n = &mut bed.nomad;
    n.volume_delete(&vol).await.unwrap();
    n.volume_delete(&vol).await.unwrap();
    let mut ghost = vol.clone();
    ghost.external_id = "default.0123456789abcdef".into();
    n.volume_delete(&ghost).await.unwrap();
    ghost.external_id = "ebs-vol-0abc123".into();
    n.volume_delete(&ghost).await.unwrap();
    bed.assert_secret_never_logged();
}

/// The same volume wanted by two allocs on one node with different usages (ro and rw, which
/// Nomad would stage at two staging paths, §2.1): the disk is attached read-write or read-only,
/// so the second usage's ControllerPublish is incompatible and rejected cleanly (CSI:
/// ALREADY_EXISTS; the alloc fails, nothing else changes), while a third alloc sharing the
/// first usage joins it (its NodeStage skipped). Unstaging happens with the last alloc of a
/// usage, ControllerUnpublish with the last claim on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ro_and_rw_usages_on_one_node() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let n = &mut bed.nomad;
    let spec = spec(
        "shared",
        &[
            (Mode::SingleNodeWriter, Attachment::FileSystem),
            (Mode::SingleNodeReaderOnly, Attachment::FileSystem),
        ],
        "ext4",
    );
    let vol = n.volume_create(&spec).await.unwrap();
    let writer = rw();
    let reader = JobVolume {
        access_mode: Mode::SingleNodeReaderOnly,
        attachment: Attachment::FileSystem,
        read_only: true,
        mount_options: None,
    };
    assert_eq!(reader.usage(), "ro-file-system-single-node-reader-only");

    let a = claim_ok(n, &vol, &writer).await;
    write(&a.target, "data", b"written by the writer");
    // The reader's claim: a read-only publish to a node holding the disk read-write.
    let refused = |n: &mut Nomad, err: ClaimError, alloc: &nomad::Alloc, held: &str| {
        let ClaimError::Publish(status) = err else {
            panic!("expected a terminal ControllerPublish error, got {err:?}");
        };
        assert_eq!(status.code(), Code::AlreadyExists, "{}", status.message());
        assert!(status.message().contains(held), "{}", status.message());
        assert!(n.has_claim(alloc));
    };
    let (b, err) = n.claim(&vol, &reader).await.unwrap_err();
    refused(n, err, &b, "read-write");
    let r = n.stop(&b).await;
    r.assert_all_ok("cleanup of the refused reader");
    assert!(
        r.controller_unpublish.is_none(),
        "the writer claims it here"
    );
    assert_eq!(read(&a.target, "data"), b"written by the writer");
    // A second writer alloc shares the rw usage: staging is a mount, NodeStage is skipped.
    n.take_calls();
    let c = claim_ok(n, &vol, &writer).await;
    assert_eq!(
        n.take_calls(),
        [
            "ControllerPublishVolume",
            "NodeStageVolume skipped: staging is a mount",
            "NodePublishVolume"
        ]
    );

    // Stop a: another alloc holds the rw usage (no unstage), and claims it here (no
    // ControllerUnpublish).
    let r = n.stop(&a).await;
    r.assert_all_ok("stop a");
    assert!(
        r.node_unstage.is_none() && r.controller_unpublish.is_none(),
        "{r:?}"
    );
    // Stop c: the rw usage is released and unstaged, the last claim here unpublished.
    let r = n.stop(&c).await;
    r.assert_all_ok("stop c");
    assert!(
        r.node_unstage.is_some() && r.controller_unpublish.is_some(),
        "{r:?}"
    );
    assert!(!nomad::is_mount_point(&a.staging));
    env::assert_no_leftovers(bed.dir());

    // The other way round: a reader holds the disk read-only; a writer is refused.
    let n = &mut bed.nomad;
    let b = claim_ok(n, &vol, &reader).await;
    assert_ne!(a.staging, b.staging);
    assert_eq!(read(&b.target, "data"), b"written by the writer");
    let ro = std::fs::write(b.target.join("nope"), b"x").unwrap_err();
    assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");
    let (w, err) = n.claim(&vol, &writer).await.unwrap_err();
    refused(n, err, &w, "read-only");
    let r = n.stop(&w).await;
    r.assert_all_ok("cleanup of the refused writer");
    assert!(
        r.controller_unpublish.is_none(),
        "the reader claims it here"
    );
    assert_eq!(read(&b.target, "data"), b"written by the writer");
    let r = n.stop(&b).await;
    r.assert_all_ok("stop the reader");
    assert!(
        r.node_unstage.is_some() && r.controller_unpublish.is_some(),
        "{r:?}"
    );
    env::assert_no_leftovers(bed.dir());
    bed.nomad.volume_delete(&vol).await.unwrap();
}

/// The failure path (§3.2.6): NodeStage fails → the alloc fails → NodeUnpublish of a target
/// never created → NodeUnstage → ControllerUnpublish, all OK, nothing left behind, and the
/// volume can be claimed again. Two causes: a file system the volume does not hold, and a
/// publish_context whose serial names no disk. Also a ControllerPublish Nomad cannot retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_path_leaves_nothing_behind() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let n = &mut bed.nomad;
    let spec = rw_spec("fails");
    let vol = n.volume_create(&spec).await.unwrap();
    // Format it (ext4) once.
    let first = claim_ok(n, &vol, &rw()).await;
    write(&first.target, "keep", b"kept");
    n.stop(&first).await.assert_all_ok("first stop");

    // 1. The job asks for xfs: NodeStage refuses (never reformats).
    let xfs = JobVolume {
        mount_options: MountOptions::fs("xfs"),
        ..rw()
    };
    n.take_calls();
    let (alloc, err) = n.claim(&vol, &xfs).await.unwrap_err();
    let ClaimError::Mount(status) = err else {
        panic!("expected a NodeStage error, got {err:?}");
    };
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(status.message().contains("ext4"), "{}", status.message());
    assert_eq!(
        n.take_calls(),
        [
            "ControllerPublishVolume",
            "NodeStageVolume: FailedPrecondition"
        ]
    );
    assert!(!alloc.target.exists(), "NodePublish never ran");
    n.stop(&alloc)
        .await
        .assert_all_ok("cleanup after the NodeStage error");
    assert_eq!(
        n.take_calls(),
        [
            "NodeUnpublishVolume",
            "NodeUnstageVolume",
            "ControllerUnpublishVolume"
        ]
    );
    env::assert_no_leftovers(bed.dir());
    assert!(!bed.nomad.has_claim(&alloc));

    // 2. A publish_context whose serial names another disk than the volume's (the device
    // path is a real one, of this volume: it must not be trusted blindly either): an invalid
    // field, refused before any disk is looked for.
    let n = &mut bed.nomad;
    let mut alloc = n.begin_claim(&vol, &rw(), &n.fp.node_id.clone());
    alloc.publish_context = n
        .controller_publish(&vol, &rw(), &alloc.node_id)
        .await
        .unwrap();
    alloc
        .publish_context
        .insert("serial".into(), "vd-0000000000000000".into());
    let status = n.mount_volume(&alloc).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("vd-0000000000000000")
            && status.message().contains(&serial_of(&vol.external_id)),
        "{}",
        status.message()
    );
    n.stop(&alloc)
        .await
        .assert_all_ok("cleanup after the missing disk");
    env::assert_no_leftovers(bed.dir());

    // 3. ControllerPublish with a capability the volume cannot serve (multi-node-multi-writer
    // on a file system): terminal for Nomad, and its cleanup is OK too.
    let n = &mut bed.nomad;
    let mmw = JobVolume {
        access_mode: Mode::MultiNodeMultiWriter,
        ..rw()
    };
    let (alloc, err) = n.claim(&vol, &mmw).await.unwrap_err();
    let ClaimError::Publish(status) = err else {
        panic!("expected a terminal ControllerPublish error, got {err:?}");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    n.stop(&alloc)
        .await
        .assert_all_ok("cleanup after the publish error");
    env::assert_no_leftovers(bed.dir());

    // The volume can be claimed again, its data intact.
    let n = &mut bed.nomad;
    let again = claim_ok(n, &vol, &rw()).await;
    assert_eq!(read(&again.target, "keep"), b"kept");
    n.stop(&again).await.assert_all_ok("final stop");
    env::assert_no_leftovers(bed.dir());
    bed.nomad.volume_delete(&vol).await.unwrap();
    bed.assert_secret_never_logged();
}

/// (d) Snapshots as Nomad makes and reads them: create with name and parameters, list paged
/// with per_page and next_token (no filters) until the token is "", delete by id, delete of
/// unknown ids OK; and a volume restored from a snapshot (`snapshot_id` in the spec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_create_list_paged_delete_restore() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let n = &mut bed.nomad;
    let mut spec = rw_spec("snapped");
    spec.capacity_min = 64 * MIB;
    let vol = n.volume_create(&spec).await.unwrap();
    let a = claim_ok(n, &vol, &rw()).await;
    write(&a.target, "v", b"version 1");
    // Attached read-write on this host: local attach switches the layer live (the volume's
    // storage daemon moves its export onto a new overlay), the claim goes on.
    let live = n
        .snapshot_create(&vol, &unique("live"), Default::default())
        .await
        .unwrap();
    assert!(live.is_ready);
    assert_eq!(live.external_source_volume_id, vol.external_id);
    write(&a.target, "after", b"written after the live snapshot");
    n.stop(&a).await.assert_all_ok("stop");
    n.snapshot_delete(&live.id).await.unwrap();

    let first = n
        .snapshot_create(&vol, &unique("s0"), params(&[("note", "nightly")]))
        .await
        .unwrap();
    assert!(!first.id.is_empty());
    assert_eq!(first.external_source_volume_id, vol.external_id);
    assert_eq!(first.size_bytes, 64 * MIB);
    assert!(first.create_time > 1_600_000_000, "{}", first.create_time);
    assert!(first.is_ready);
    // Idempotent by name.
    let same = n
        .snapshot_create(&vol, &unique("s0"), params(&[("note", "nightly")]))
        .await
        .unwrap();
    assert_eq!(same, first);
    let mut ids = vec![first.id.clone()];
    for i in 1..5 {
        let s = n
            .snapshot_create(&vol, &unique(&format!("s{i}")), Default::default())
            .await
            .unwrap();
        ids.push(s.id);
    }
    ids.sort();

    for per_page in 0..=6 {
        let all = n.snapshot_list_all(per_page).await.unwrap();
        let mut got: Vec<String> = all.iter().map(|s| s.id.clone()).collect();
        let listed = got.len();
        got.sort();
        got.dedup();
        assert_eq!(listed, got.len(), "duplicates with per_page {per_page}");
        assert_eq!(got, ids, "per_page {per_page}");
        assert!(all
            .iter()
            .all(|s| s.is_ready && s.external_source_volume_id == vol.external_id));
    }
    let (page, token) = n.snapshot_list_page(2, "").await.unwrap();
    assert_eq!(page.len(), 2);
    assert!(!token.is_empty());
    let e = n.snapshot_list_page(2, "not-a-token").await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());

    // `nomad volume create` with snapshot_id: the data of the snapshot.
    let mut restored = spec.clone();
    restored.id = "restored".into();
    restored.name = unique("restored");
    restored.snapshot_id = first.id.clone();
    let rvol = n.volume_create(&restored).await.unwrap();
    let r = claim_ok(n, &rvol, &rw()).await;
    assert_eq!(read(&r.target, "v"), b"version 1");
    n.stop(&r).await.assert_all_ok("stop restored");
    let listed = n.external_all(30).await.unwrap();
    let entry = listed
        .iter()
        .find(|v| v.external_id == rvol.external_id)
        .unwrap();
    assert_eq!(
        entry.snapshot_id, first.id,
        "SnapshotID from content_source"
    );

    // Delete by id, again, and ids that never existed.
    for id in &ids {
        n.snapshot_delete(id).await.unwrap();
    }
    n.snapshot_delete(&ids[0]).await.unwrap();
    n.snapshot_delete("default.s0123456789abcdef")
        .await
        .unwrap();
    n.snapshot_delete("snap-0abc123").await.unwrap();
    assert!(n.snapshot_list_all(3).await.unwrap().is_empty());
    n.volume_delete(&rvol).await.unwrap();
    n.volume_delete(&vol).await.unwrap();
    env::assert_no_leftovers(bed.dir());
    bed.assert_secret_never_logged();
}

/// (f) `nomad volume status -verbose` / `/v1/volumes/external`: ListVolumes paged with
/// max_entries 1..N and Nomad's loop, every entry with `volume` set, published node ids,
/// IsAbnormal/Status from volume_condition (a volume whose image is gone), garbage token →
/// ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_volumes_paging_and_condition() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    let n = &mut bed.nomad;
    let mut vols = Vec::new();
    for i in 0..5 {
        let mut s = spec(
            &format!("ext-{i}"),
            &[(Mode::SingleNodeWriter, Attachment::BlockDevice)],
            "",
        );
        s.capacity_min = 16 * MIB;
        s.capacity_max = 32 * MIB;
        vols.push(n.volume_create(&s).await.unwrap());
    }
    let mut want: Vec<String> = vols.iter().map(|v| v.external_id.clone()).collect();
    want.sort();
    let block = JobVolume::rw(Attachment::BlockDevice);
    let published = claim_ok(n, &vols[0], &block).await;
    {
        use std::os::unix::fs::FileTypeExt;
        let m = published.target.metadata().unwrap();
        assert!(
            m.file_type().is_block_device(),
            "the plugin creates the block target leaf itself"
        );
    }

    for per_page in 0..=6 {
        let all = n.external_all(per_page).await.unwrap();
        let mut got: Vec<String> = all.iter().map(|v| v.external_id.clone()).collect();
        got.sort();
        assert_eq!(got, want, "per_page {per_page}");
        for v in &all {
            assert!(!v.is_abnormal, "{v:?}");
            assert_eq!(v.capacity_bytes, 16 * MIB);
            let nodes = if v.external_id == vols[0].external_id {
                vec![n.fp.node_id.clone()]
            } else {
                vec![]
            };
            assert_eq!(v.published_external_node_ids, nodes, "{v:?}");
        }
    }
    let (page, token) = n.external_page(2, "").await.unwrap();
    assert_eq!(page.len(), 2);
    let (rest, _) = n.external_page(30, &token).await.unwrap();
    assert_eq!(rest.len(), 3);
    let e = n.external_page(2, "garbage-token").await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());

    // Volume 4's image disappears behind the plugin's back: abnormal, with a reason.
    let key = vols[4].external_id.rsplit_once('.').unwrap().1.to_string();
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bed.plugin.pool_dir().join(format!("volumes/{key}.json"))).unwrap(),
    )
    .unwrap();
    let image = bed
        .plugin
        .pool_dir()
        .join("images")
        .join(record["image"].as_str().unwrap());
    std::fs::remove_file(&image).unwrap();
    let n = &mut bed.nomad;
    let all = n.external_all(30).await.unwrap();
    for v in &all {
        let broken = v.external_id == vols[4].external_id;
        assert_eq!(v.is_abnormal, broken, "{v:?}");
        if broken {
            assert!(v.status.contains("missing"), "{}", v.status);
        }
    }

    // (e) The published one: in use until stopped; the broken one deletes fine.
    let e = n.volume_delete(&vols[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    n.stop(&published).await.assert_all_ok("stop");
    for v in &vols {
        n.volume_delete(v).await.unwrap();
    }
    assert!(n.external_all(2).await.unwrap().is_empty());
    env::assert_no_leftovers(bed.dir());
}

/// A libvirt domain as a second Nomad client node (its UUID is its node plugin's node id):
/// ControllerPublish to it, a single-node volume claimed on this node meanwhile gets
/// FAILED_PRECONDITION naming the domain (Nomad's claim loop retries that), ListVolumes shows
/// the domain, ControllerUnpublish twice, then the retried claim here succeeds.
#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_is_a_libvirt_domain() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    open_for_qemu(bed.dir());
    let dom = TestDomain::start("node2", 2);
    let n = &mut bed.nomad;
    let mut spec = rw_spec("roaming");
    spec.capacity_min = 64 * MIB;
    spec.parameters = params(&[("bus", "scsi")]);
    let vol = n.volume_create(&spec).await.unwrap();

    let there = n.begin_claim(&vol, &rw(), &dom.uuid);
    let ctx = n.controller_publish(&vol, &rw(), &dom.uuid).await.unwrap();
    let serial = ctx
        .get("serial")
        .cloned()
        .expect("serial in publish_context");
    assert_eq!(ctx.get("bus").map(String::as_str), Some("scsi"));
    assert!(dom.has_disk(&serial), "disk in the domain's live XML");
    assert_eq!(
        n.controller_publish(&vol, &rw(), &dom.uuid).await.unwrap(),
        ctx
    );
    let listed = n.external_all(30).await.unwrap();
    assert_eq!(
        listed[0].published_external_node_ids,
        vec![dom.uuid.clone()]
    );

    // Claimed here meanwhile: retryable, naming the node that holds it.
    let (here, err) = n.claim(&vol, &rw()).await.unwrap_err();
    let ClaimError::Retryable(status) = err else {
        panic!("expected FailedPrecondition, got {err:?}");
    };
    assert!(status.message().contains(&dom.uuid), "{}", status.message());
    assert!(n.has_claim(&here), "a retrying claim stays");

    // The alloc on the domain stops (its node steps ran in the guest): ControllerUnpublish,
    // repeated.
    n.server_unpublish(&there).await.unwrap().unwrap();
    n.controller_unpublish(&vol, &dom.uuid).await.unwrap();
    assert!(!dom.has_disk(&serial), "disk gone from the live XML");
    assert!(n.external_all(30).await.unwrap()[0]
        .published_external_node_ids
        .is_empty());

    // The claim loop's next try succeeds here.
    let here = match n.retry_claim(here).await {
        Ok(a) => a,
        Err((_, e)) => panic!("retried claim failed: {e:?}"),
    };
    write(&here.target, "moved", b"here now");
    n.stop(&here).await.assert_all_ok("stop here");
    n.volume_delete(&vol).await.unwrap();
    env::assert_no_leftovers(bed.dir());
}

/// `virtdisk-csi client` as an operator uses it against a monolith: volume create/publish,
/// node stage/publish/stats/unpublish/unstage, snapshot create/list/get/delete, JSON output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_client_node_and_snapshot_verbs() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let run = |args: &[&str]| bed.plugin.client_json(args);
    let node_id = run(&["node", "info"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(node_id, bed.nomad.fp.node_id);
    let name = unique("cli");
    let created = run(&[
        "volume", "create", "--name", &name, "--size", "32MiB", "--fs", "ext4",
    ]);
    let id = created["volume"]["volume_id"].as_str().unwrap().to_string();
    let published = run(&["volume", "publish", &id, "--node", &node_id, "--fs", "ext4"]);
    let ctx: Vec<String> = published["publish_context"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let staging = bed.dir().join("cli/staging");
    let target = bed.dir().join("cli/target");
    std::fs::create_dir_all(&staging).unwrap();
    let (staging, target) = (staging.display().to_string(), target.display().to_string());
    let mut stage = vec![
        "node",
        "stage",
        &id,
        "--staging-path",
        &staging,
        "--fs",
        "ext4",
    ];
    for kv in &ctx {
        stage.extend(["--publish-context", kv.as_str()]);
    }
    assert_eq!(run(&stage)["staged"], id.as_str());
    assert!(env::is_mount(&staging));
    run(&[
        "node",
        "publish",
        &id,
        "--target-path",
        &target,
        "--staging-path",
        &staging,
    ]);
    write(Path::new(&target), "f", b"through the client");
    let stats = run(&[
        "node",
        "stats",
        &id,
        "--path",
        &target,
        "--staging-path",
        &staging,
    ]);
    assert_eq!(stats["volume_condition"]["abnormal"], false);
    for _ in 0..2 {
        run(&["node", "unpublish", &id, "--target-path", &target]);
    }
    for _ in 0..2 {
        assert_eq!(
            run(&["node", "unstage", &id, "--staging-path", &staging])["unstaged"],
            id.as_str()
        );
    }
    assert!(!env::is_mount(&staging));
    run(&["volume", "unpublish", &id, "--node", &node_id]);
    env::assert_no_leftovers(bed.dir());

    let snap = run(&[
        "snapshot",
        "create",
        "--name",
        &unique("cli-snap"),
        "--source",
        &id,
    ]);
    let snap_id = snap["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(snap["snapshot"]["ready_to_use"], true);
    assert_eq!(snap["snapshot"]["source_volume_id"], id.as_str());
    run(&[
        "snapshot",
        "create",
        "--name",
        &unique("cli-snap2"),
        "--source",
        &id,
    ]);
    let listed = run(&["snapshot", "list", "--max-entries", "1", "--all"]);
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2);
    assert_eq!(listed["next_token"], "");
    assert_eq!(
        run(&["snapshot", "get", &snap_id])["snapshot"]["snapshot_id"],
        snap_id.as_str()
    );
    for _ in 0..2 {
        run(&["snapshot", "delete", &snap_id]);
    }
    let left = run(&["snapshot", "list", "--source", &id]);
    assert_eq!(left["entries"].as_array().unwrap().len(), 1);
    let other = left["entries"][0]["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    run(&["snapshot", "delete", &other]);
    run(&["volume", "delete", &id]);
}
