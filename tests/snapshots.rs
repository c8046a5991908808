//! Snapshots, restores and clones against the real binary and real qemu-img/qemu-io: data is
//! written into volume images with qemu-io (volumes are unattached) and read back by pattern.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtdisk_test_support::pool::{check_all_layers, layer_files, volume_depth, volume_image};
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::{assert_reads as reads, Read};

const VOL: i64 = 64 * MIB;
const M: u64 = MIB as u64;

fn image_of(p: &Plugin, id: &str) -> PathBuf {
    volume_image(&p.pool_dir(), id)
}

/// Reads take the image's lock (no force-share): the background flattener may hold it for a
/// moment while it switches a volume, and then the read waits.
fn assert_reads(image: &Path, pattern: u8, offset: u64, len: u64) {
    reads(image, pattern, offset, len, Read::Locked);
}

async fn create(p: &Plugin, name: &str, size: i64) -> csi::Volume {
    p.controller()
        .create(create_req(name, size))
        .await
        .expect("create volume")
}

/// A plugin and a volume whose first MiB is all `byte`.
async fn plugin_with_volume(name: &str, byte: u8) -> (Plugin, csi::Volume) {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, name, VOL).await;
    write_pattern(&image_of(&p, &vol.volume_id), byte, 0, M);
    (p, vol)
}

async fn create_from(
    p: &Plugin,
    name: &str,
    size: i64,
    source: Source,
) -> Result<csi::Volume, Status> {
    p.controller()
        .create(create_from_req(name, size, source))
        .await
}

async fn snapshot(p: &Plugin, name: &str, source: &str) -> Result<csi::Snapshot, Status> {
    p.controller().snapshot(snapshot_req(name, source)).await
}

async fn delete_volume(p: &Plugin, id: &str) {
    p.controller().delete(id).await.expect("delete volume");
}

async fn list_snapshots(
    p: &Plugin,
    req: csi::ListSnapshotsRequest,
) -> Result<csi::ListSnapshotsResponse, Status> {
    p.controller()
        .list_snapshots(req)
        .await
        .map(|r| r.into_inner())
}

/// ListSnapshots of the snapshots of volume `id`.
fn of_volume(id: &str) -> csi::ListSnapshotsRequest {
    csi::ListSnapshotsRequest {
        source_volume_id: id.to_string(),
        ..Default::default()
    }
}

/// Every snapshot id of a ListSnapshots answer, in order.
fn snapshot_ids(list: &csi::ListSnapshotsResponse) -> Vec<String> {
    list.entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect()
}

/// Waits (up to `secs`) until `done`; the plugin's log goes into the failure.
async fn wait_until(p: &Plugin, secs: u64, what: &str, done: impl Fn() -> bool) {
    let check = || async {
        done()
            .then_some(())
            .ok_or_else(|| format!("{what}: {}", p.log()))
    };
    eventually(Duration::from_secs(secs), check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_keeps_the_point_in_time() {
    let (p, vol) = plugin_with_volume("snap-src", 0xaa).await;

    let snap = snapshot(&p, "snap-1", &vol.volume_id).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, VOL);
    assert_eq!(snap.source_volume_id, vol.volume_id);
    assert!(snap.creation_time.unwrap().seconds > 1_600_000_000);
    assert!(snap.snapshot_id.starts_with("default.s"));

    // The source continues in an overlay on the frozen layer.
    let src_image = image_of(&p, &vol.volume_id);
    let info = qemu_img_info(&src_image);
    assert!(info["backing-filename"].as_str().is_some(), "{info}");
    assert!(
        !info["backing-filename"].as_str().unwrap().contains('/'),
        "backing names are relative so pools can move: {info}"
    );
    write_pattern(&src_image, 0xbb, 0, M);

    let restored = create_from(&p, "snap-restored", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, VOL);
    assert_eq!(
        restored.content_source,
        content(from_snapshot(&snap.snapshot_id))
    );
    assert_reads(&image_of(&p, &restored.volume_id), 0xaa, 0, M);
    assert_reads(&src_image, 0xbb, 0, M);

    // Writes to the restore stay there.
    write_pattern(&image_of(&p, &restored.volume_id), 0xcc, 0, M);
    assert_reads(&src_image, 0xbb, 0, M);
    let again = create_from(&p, "snap-restored-2", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_reads(&image_of(&p, &again.volume_id), 0xaa, 0, M);

    // Idempotent restore.
    let same = create_from(&p, "snap-restored", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(same.volume_id, restored.volume_id);
    assert_reads(&image_of(&p, &restored.volume_id), 0xcc, 0, M);

    // GetSnapshot.
    let got = p.controller().snapshot_by_id(&snap.snapshot_id).await;
    assert_eq!(got.unwrap(), snap);
    assert!(check_all_layers(&p.pool_dir()) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_sizes() {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, "size-src", VOL).await;
    write_pattern(&image_of(&p, &vol.volume_id), 0x11, VOL as u64 - M, M);
    let snap = snapshot(&p, "size-snap", &vol.volume_id).await.unwrap();

    // Larger: the overlay grows, the old data is there and the new tail reads zeros.
    let big = create_from(&p, "size-big", 4 * VOL, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(big.capacity_bytes, 4 * VOL);
    let big_image = image_of(&p, &big.volume_id);
    assert_eq!(qemu_img_info(&big_image)["virtual-size"], 4 * VOL);
    assert_reads(&big_image, 0x11, VOL as u64 - M, M);
    assert_reads(&big_image, 0x00, VOL as u64, M);

    // A request below the snapshot's size but without a limit gets the snapshot's size.
    let small_ok = create_from(&p, "size-small", MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(small_ok.capacity_bytes, VOL);

    // A limit below the snapshot's size cannot be met; for a clone neither.
    for (name, source) in [
        ("size-too-small", from_snapshot(&snap.snapshot_id)),
        ("clone-too-small", from_volume(&vol.volume_id)),
    ] {
        let mut req = create_from_req(name, MIB, source);
        req.capacity_range.as_mut().unwrap().limit_bytes = 2 * MIB;
        expect_code(p.controller().create(req).await, Code::OutOfRange, name);
    }

    // A restore is qcow2: format=raw cannot be honoured.
    let req = csi::CreateVolumeRequest {
        parameters: params(&[("format", "raw")]),
        ..create_from_req("size-raw", 0, from_snapshot(&snap.snapshot_id))
    };
    expect_code(
        p.controller().create(req).await,
        Code::InvalidArgument,
        "raw restore",
    );
    check_all_layers(&p.pool_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_is_independent_of_its_source() {
    let (p, vol) = plugin_with_volume("clone-src", 0xaa).await;

    let clone = create_from(&p, "clone-1", 0, from_volume(&vol.volume_id))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, VOL);
    let clone_image = image_of(&p, &clone.volume_id);
    let src_image = image_of(&p, &vol.volume_id);
    assert_ne!(clone_image, src_image);
    assert_reads(&clone_image, 0xaa, 0, M);

    write_pattern(&src_image, 0xbb, 0, M);
    write_pattern(&clone_image, 0xcc, M, M);
    assert_reads(&clone_image, 0xaa, 0, M);
    assert_reads(&clone_image, 0xcc, M, M);
    assert_reads(&src_image, 0xbb, 0, M);
    assert_reads(&src_image, 0x00, M, M);

    // Idempotent; the clone's frozen layer is hidden: no snapshot appears.
    let same = create_from(&p, "clone-1", 0, from_volume(&vol.volume_id))
        .await
        .unwrap();
    assert_eq!(same.volume_id, clone.volume_id);
    let listed = list_snapshots(&p, Default::default()).await.unwrap();
    assert!(listed.entries.is_empty());

    // Deleting the source keeps the clone readable.
    delete_volume(&p, &vol.volume_id).await;
    assert_reads(&clone_image, 0xaa, 0, M);
    check_all_layers(&p.pool_dir());

    // A missing source.
    let err = create_from(&p, "clone-2", 0, from_volume(&vol.volume_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = create_from(&p, "clone-3", 0, from_snapshot("default.s0123456789abcdef"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Deleting the clone leaves no layer behind.
    delete_volume(&p, &clone.volume_id).await;
    assert_eq!(layer_files(&p.pool_dir()), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_restores_outlive_their_sources() {
    let (p, vol) = plugin_with_volume("indep-src", 0x5a).await;
    let snap = snapshot(&p, "indep-snap", &vol.volume_id).await.unwrap();
    let r1 = create_from(&p, "indep-r1", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();

    // Delete the source volume: the snapshot and the restore are intact.
    delete_volume(&p, &vol.volume_id).await;
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, M);
    let r2 = create_from(&p, "indep-r2", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, M);

    // A new volume with the source's old name does not clobber the frozen layer. It is a new
    // volume: a new id (ids are unique over time), and the old volume's snapshots are not its.
    let reborn = create(&p, "indep-src", VOL).await;
    assert_ne!(reborn.volume_id, vol.volume_id);
    let of_reborn = list_snapshots(&p, of_volume(&reborn.volume_id))
        .await
        .unwrap();
    assert!(of_reborn.entries.is_empty(), "{of_reborn:?}");
    let of_old = list_snapshots(&p, of_volume(&vol.volume_id)).await.unwrap();
    assert_eq!(snapshot_ids(&of_old), vec![snap.snapshot_id.clone()]);
    assert_reads(&image_of(&p, &reborn.volume_id), 0x00, 0, M);
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, M);
    delete_volume(&p, &reborn.volume_id).await;

    // Delete the snapshot while restores use its layer: OK, and they still read.
    let mut c = p.controller();
    c.remove_snapshot(&snap.snapshot_id).await.unwrap();
    c.remove_snapshot(&snap.snapshot_id).await.unwrap();
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, M);
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, M);
    let err = c.snapshot_by_id(&snap.snapshot_id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = create_from(&p, "indep-r3", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    check_all_layers(&p.pool_dir());

    // The layer goes with the last volume that reads through it.
    delete_volume(&p, &r1.volume_id).await;
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, M);
    delete_volume(&p, &r2.volume_id).await;
    assert_eq!(layer_files(&p.pool_dir()), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rules_paging_and_restart() {
    let mut p = Plugin::start("controller", &[]).await;
    let rpcs = p.controller().rpc_types().await;
    use csi::controller_service_capability::rpc::Type;
    for t in [
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::CloneVolume,
    ] {
        assert!(rpcs.contains(&(t as i32)), "{t:?} missing");
    }
    // GET_SNAPSHOT is alpha and known to no CO: advertised only when configured (GetSnapshot
    // answers either way, below).
    assert!(!rpcs.contains(&(Type::GetSnapshot as i32)));
    let alpha = Plugin::start_with_config(
        "controller",
        "[snapshots]\nget_snapshot_capability = true\n",
        &[],
    )
    .await;
    assert!(alpha
        .controller()
        .rpc_types()
        .await
        .contains(&(Type::GetSnapshot as i32)));
    drop(alpha);

    let a = create(&p, "rules-a", VOL).await;
    let b = create(&p, "rules-b", VOL).await;

    // Idempotent by name; another source is ALREADY_EXISTS; a missing source NOT_FOUND.
    let s1 = snapshot(&p, "rules-s1", &a.volume_id).await.unwrap();
    let again = snapshot(&p, "rules-s1", &a.volume_id).await.unwrap();
    assert_eq!(s1, again);
    assert_eq!(
        volume_depth(&p.pool_dir(), &a.volume_id),
        2,
        "a repeat must not freeze again"
    );
    for (name, source, code) in [
        ("rules-s1", b.volume_id.as_str(), Code::AlreadyExists),
        ("rules-x", "default.0123456789abcdef", Code::NotFound),
        ("rules-x", "not-ours", Code::NotFound),
        ("", a.volume_id.as_str(), Code::InvalidArgument),
        ("rules-x", "", Code::InvalidArgument),
    ] {
        expect_code(
            snapshot(&p, name, source).await,
            code,
            &format!("{name} of {source}"),
        );
    }

    // Nomad passes the volume's parameters and secrets along: accepted as they are.
    let with_params = csi::CreateSnapshotRequest {
        parameters: params(&[("nomad-param", "x")]),
        secrets: params(&[("token", "s3cr3t")]),
        ..snapshot_req("rules-s2", &a.volume_id)
    };
    let with_params = p.controller().snapshot(with_params).await.unwrap();
    assert!(with_params.ready_to_use);
    let mut ids = vec![s1.snapshot_id.clone(), with_params.snapshot_id];
    for (name, vol) in [("rules-s3", &b), ("rules-s4", &b)] {
        ids.push(
            snapshot(&p, name, &vol.volume_id)
                .await
                .unwrap()
                .snapshot_id,
        );
    }
    ids.sort();

    // Paging without filters, the way Nomad's CLI does it.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let req = csi::ListSnapshotsRequest {
            max_entries: 3,
            starting_token: token.clone(),
            ..Default::default()
        };
        let page = list_snapshots(&p, req).await.unwrap();
        assert!(page.entries.len() <= 3);
        seen.extend(snapshot_ids(&page));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids, "every snapshot once, in a stable order");

    // Filters; unknown ids give an empty list, a bad token ABORTED.
    let filtered = |snapshot_id: &str, source_volume_id: &str| csi::ListSnapshotsRequest {
        snapshot_id: snapshot_id.into(),
        source_volume_id: source_volume_id.into(),
        ..Default::default()
    };
    let only_b = list_snapshots(&p, filtered("", &b.volume_id)).await;
    assert_eq!(only_b.unwrap().entries.len(), 2);
    let one = list_snapshots(&p, filtered(&s1.snapshot_id, ""))
        .await
        .unwrap();
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].snapshot.as_ref().unwrap(), &s1);
    for (snapshot_id, source_volume_id) in [
        ("default.s0000000000000000", ""),
        ("nope", ""),
        ("", "default.0000000000000000"),
        ("", "nope"),
    ] {
        let none = list_snapshots(&p, filtered(snapshot_id, source_volume_id)).await;
        let none = none.unwrap();
        assert!(none.entries.is_empty(), "{snapshot_id} {source_volume_id}");
    }
    let garbage = csi::ListSnapshotsRequest {
        starting_token: "garbage token".into(),
        ..Default::default()
    };
    expect_code(
        list_snapshots(&p, garbage).await,
        Code::Aborted,
        "garbage token",
    );

    // Unknown ids: DeleteSnapshot OK, GetSnapshot NOT_FOUND.
    let mut c = p.controller();
    c.remove_snapshot("default.s0000000000000000")
        .await
        .unwrap();
    c.remove_snapshot("nope").await.unwrap();
    let err = c.snapshot_by_id("default.s0000000000000000").await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);

    // A restart keeps everything.
    p.restart().await;
    let after = list_snapshots(&p, Default::default()).await.unwrap();
    assert_eq!(snapshot_ids(&after), ids);
    assert_eq!(
        snapshot(&p, "rules-s1", &a.volume_id).await.unwrap(),
        s1,
        "idempotent across restarts"
    );

    // Nomad deletes by id.
    let mut c = p.controller();
    for id in &ids {
        c.remove_snapshot(id).await.unwrap();
    }
    assert!(list_snapshots(&p, Default::default())
        .await
        .unwrap()
        .entries
        .is_empty());
    check_all_layers(&p.pool_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_volumes_cannot_be_snapshotted() {
    let p = Plugin::start("controller", &[]).await;
    let req = csi::CreateVolumeRequest {
        parameters: params(&[("format", "raw")]),
        ..create_req("raw-src", VOL)
    };
    let raw = p.controller().create(req).await.unwrap();
    let err = snapshot(&p, "raw-snap", &raw.volume_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("qcow2"), "{}", err.message());
    let err = create_from(&p, "raw-clone", 0, from_volume(&raw.volume_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(layer_files(&p.pool_dir()).len(), 1);
}

/// A request on a volume whose lock the background flattener holds for a step waits for the
/// step instead of answering ABORTED: the CO has no operation pending on the volume, and Nomad
/// takes ABORTED from CreateSnapshot (and ControllerPublishVolume) as final. The debug build's
/// pause failpoint holds the flattener at its job record, with the volume's lock, for 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_out_a_flattening_step_instead_of_aborted() {
    use virtdisk_csi::failpoint::{ENV, PAUSE_ENV};
    let config = "[libvirt]\nenabled = false\n[snapshots]\nmax_chain_depth = 2\n";
    let env = [(ENV, "flatten.job-written"), (PAUSE_ENV, "3000")];
    let p = Plugin::start_with_env("controller", config, &[], &env).await;
    let vol = create(&p, "busy-src", VOL).await;
    for name in ["busy-s1", "busy-s2"] {
        snapshot(&p, name, &vol.volume_id).await.expect(name);
    }
    // Depth 3 > 2: the flattener writes its job (with the volume's lock) and pauses there.
    let pool = p.pool_dir();
    wait_until(&p, 30, "no flattening job", || {
        !virtdisk_test_support::pool::PoolView::read(&pool)
            .flatten_jobs
            .is_empty()
    })
    .await;
    let started = Instant::now();
    let snap = snapshot(&p, "busy-s3", &vol.volume_id)
        .await
        .unwrap_or_else(|e| panic!("a flattening step is waited out, not {e:?}"));
    assert!(snap.ready_to_use);
    eprintln!(
        "CreateSnapshot waited {} ms for the flattening step",
        started.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_chains_are_flattened_in_the_background_and_read_right() {
    let config = "[snapshots]\nmax_chain_depth = 3\n";
    let p = Plugin::start_with_config("controller", config, &[]).await;
    let pool = p.pool_dir();
    let vol = create(&p, "deep-src", VOL).await;

    // Each generation writes its own MiB, then is snapshotted.
    let mut snaps = Vec::new();
    for gen in 0..6u64 {
        write_pattern(&image_of(&p, &vol.volume_id), 0x10 + gen as u8, gen * M, M);
        // A snapshot waits out a flattening step on the volume (never ABORTED), but a chain at
        // twice the limit waits for the flattener (UNAVAILABLE): retry, as a CO does.
        let snap = loop {
            match snapshot(&p, &format!("deep-s{gen}"), &vol.volume_id).await {
                Ok(s) => break s,
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("snapshot: {e:?}"),
            }
        };
        snaps.push(snap);
    }
    // Overwrite generation 0 in the live volume.
    write_pattern(&image_of(&p, &vol.volume_id), 0xee, 0, M);

    // The flattener brings the chain back within the limit.
    wait_until(&p, 120, "chain not flattened", || {
        volume_depth(&pool, &vol.volume_id) <= 3
    })
    .await;
    let image = image_of(&p, &vol.volume_id);
    assert_reads(&image, 0xee, 0, M);
    for gen in 1..6u64 {
        assert_reads(&image, 0x10 + gen as u8, gen * M, M);
    }
    let chain = run_ok(
        "qemu-img",
        &[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            image.to_str().unwrap(),
        ],
    );
    let chain: Value = serde_json::from_str(&chain).unwrap();
    assert!(chain.as_array().unwrap().len() <= 3, "{chain}");

    // Every snapshot still shows its own point in time, at every depth; restores of deep
    // snapshots are flattened too.
    let mut restores = Vec::new();
    for (gen, snap) in snaps.iter().enumerate() {
        let name = format!("deep-r{gen}");
        let r = create_from(&p, &name, 0, from_snapshot(&snap.snapshot_id))
            .await
            .unwrap();
        let img = image_of(&p, &r.volume_id);
        for g in 0..=gen as u64 {
            assert_reads(&img, 0x10 + g as u8, g * M, M);
        }
        assert_reads(&img, 0x00, (gen as u64 + 1) * M, M);
        restores.push((gen, r));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for (gen, r) in &restores {
        while volume_depth(&pool, &r.volume_id) > 3 {
            assert!(
                Instant::now() < deadline,
                "restore not flattened: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let img = image_of(&p, &r.volume_id);
        for g in 0..=*gen as u64 {
            assert_reads(&img, 0x10 + g as u8, g * M, M);
        }
    }
    check_all_layers(&pool);

    // Delete everything: no layer is left behind.
    for (_, r) in &restores {
        delete_volume(&p, &r.volume_id).await;
    }
    for s in &snaps {
        p.controller()
            .remove_snapshot(&s.snapshot_id)
            .await
            .unwrap();
    }
    delete_volume(&p, &vol.volume_id).await;
    wait_until(&p, 30, "layers left behind", || {
        layer_files(&pool).is_empty()
    })
    .await;
}

/// The scenario of a new user: create "n", snapshot it, delete "n", create "n" again. The new
/// volume is a new volume (ids are unique over time), it reads empty, and the old volume's
/// snapshot does not list under it; a snapshot name used again gets a new id too. The same
/// answers after a restart (the index is rebuilt from the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_used_again_gets_a_new_id_and_no_foreign_snapshots() {
    let (mut p, first) = plugin_with_volume("n", 0x3c).await;
    let s = snapshot(&p, "s", &first.volume_id).await.unwrap();
    delete_volume(&p, &first.volume_id).await;
    let again = create(&p, "n", VOL).await;
    assert_ne!(again.volume_id, first.volume_id);
    assert_reads(&image_of(&p, &again.volume_id), 0x00, 0, M);
    // Idempotent under the name: the same new volume.
    assert_eq!(create(&p, "n", VOL).await.volume_id, again.volume_id);

    for round in 0..2 {
        let mine = list_snapshots(&p, of_volume(&again.volume_id))
            .await
            .unwrap();
        assert!(mine.entries.is_empty(), "round {round}: {mine:?}");
        let old = list_snapshots(&p, of_volume(&first.volume_id))
            .await
            .unwrap();
        assert_eq!(
            snapshot_ids(&old),
            vec![s.snapshot_id.clone()],
            "round {round}"
        );
        p.restart().await;
    }

    // The snapshot name: deleted and taken again, it is a new snapshot of the new volume.
    p.controller()
        .remove_snapshot(&s.snapshot_id)
        .await
        .unwrap();
    let s2 = snapshot(&p, "s", &again.volume_id).await.unwrap();
    assert_ne!(s2.snapshot_id, s.snapshot_id);
    assert_eq!(s2.source_volume_id, again.volume_id);
    let err = p
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Moves a record of the running version to the key an earlier version gave the same name
/// (keys were derived from names): the record file, its `id`, and for a volume its image.
fn make_legacy(pool: &Path, dir: &str, id: &str, legacy_key: &str) -> String {
    let key = key_of(id);
    let legacy_id = format!("{}.{legacy_key}", id.rsplit_once('.').unwrap().0);
    let path = pool.join(format!("{dir}/{key}.json"));
    let mut rec = virtdisk_test_support::pool::read_record(&path);
    rec["id"] = legacy_id.clone().into();
    if dir == "volumes" {
        let image = format!("{legacy_key}.qcow2");
        std::fs::rename(
            pool.join("images").join(rec["image"].as_str().unwrap()),
            pool.join("images").join(&image),
        )
        .unwrap();
        rec["image"] = image.into();
    }
    std::fs::remove_file(&path).unwrap();
    let legacy = pool.join(format!("{dir}/{legacy_key}.json"));
    virtdisk_test_support::pool::write_record(&legacy, &rec);
    legacy_id
}

/// A pool an earlier version made (ids derived from names) keeps working: its volumes and
/// snapshots list and answer under their old ids, a repeated CreateVolume/CreateSnapshot of an
/// old name returns the old id, and an old name used again after delete gets a new id with no
/// foreign snapshots. The same after a restart (the index rebuilt from the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_an_earlier_version_keeps_its_ids() {
    use virtdisk_csi::ids::{legacy_snapshot_key, legacy_volume_key};
    let (mut p, old) = plugin_with_volume("old", 0x5a).await;
    let other = create(&p, "other", VOL).await;
    let old_snap = snapshot(&p, "old-s", &other.volume_id).await.unwrap();
    p.kill();
    let pool = p.pool_dir();
    let old_id = make_legacy(&pool, "volumes", &old.volume_id, &legacy_volume_key("old"));
    let snap_id = make_legacy(
        &pool,
        "snapshots",
        &old_snap.snapshot_id,
        &legacy_snapshot_key("old-s"),
    );
    p.restart().await;

    let mut c = p.controller();
    assert_eq!(create(&p, "old", VOL).await.volume_id, old_id);
    assert_eq!(
        c.volume(&old_id).await.unwrap().volume.unwrap().volume_id,
        old_id
    );
    assert_reads(&image_of(&p, &old_id), 0x5a, 0, M);
    let again = snapshot(&p, "old-s", &other.volume_id).await.unwrap();
    assert_eq!(again.snapshot_id, snap_id);
    assert_eq!(
        c.snapshot_by_id(&snap_id).await.unwrap().snapshot_id,
        snap_id
    );
    let listed: Vec<String> = ids_of_volumes(&c.all_volumes().await);
    assert!(listed.contains(&old_id), "{listed:?}");

    // A snapshot of the old volume, the old volume deleted, its name used again.
    let s = snapshot(&p, "of-old", &old_id).await.unwrap();
    assert_eq!(s.source_volume_id, old_id);
    delete_volume(&p, &old_id).await;
    let new = create(&p, "old", VOL).await;
    assert_ne!(new.volume_id, old_id);
    for round in 0..2 {
        let mine = list_snapshots(&p, of_volume(&new.volume_id)).await.unwrap();
        assert!(mine.entries.is_empty(), "round {round}: {mine:?}");
        let gone = list_snapshots(&p, of_volume(&old_id)).await.unwrap();
        assert_eq!(
            snapshot_ids(&gone),
            vec![s.snapshot_id.clone()],
            "round {round}"
        );
        let by_old = list_snapshots(&p, of_volume(&other.volume_id))
            .await
            .unwrap();
        assert_eq!(
            snapshot_ids(&by_old),
            vec![snap_id.clone()],
            "round {round}"
        );
        p.restart().await;
    }
    virtdisk_test_support::pool::assert_pool_clean(&pool);
}

fn ids_of_volumes(entries: &[csi::list_volumes_response::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect()
}

/// Clones and snapshots of one volume asked for at once (several PVCs cloned from one, a
/// backup tool's burst) follow one another instead of answering ABORTED: each cut holds the
/// source's lock for a few ms, and the others wait for it. Every clone reads the source's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_and_snapshots_of_one_volume_at_once_all_succeed() {
    let (p, vol) = plugin_with_volume("busy-source", 0x6b).await;
    // Each cut deepens the source's chain by one layer: 6 stay under the default depth limit.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..3 {
        let mut c = p.controller();
        let req = create_from_req(
            &format!("at-once-clone-{i}"),
            VOL,
            from_volume(&vol.volume_id),
        );
        calls.spawn(async move { ("clone", c.create(req).await.map(|v| v.volume_id)) });
        let mut c = p.controller();
        let req = snapshot_req(&format!("at-once-snap-{i}"), &vol.volume_id);
        calls.spawn(async move { ("snapshot", c.snapshot(req).await.map(|s| s.snapshot_id)) });
    }
    let (mut clones, mut snaps) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    while let Some(done) = calls.join_next().await {
        let (kind, got) = done.unwrap();
        let id = got.unwrap_or_else(|e| panic!("a {kind} asked for at once: {e:?}"));
        let fresh = if kind == "clone" {
            clones.insert(id)
        } else {
            snaps.insert(id)
        };
        assert!(fresh);
    }
    assert_eq!((clones.len(), snaps.len()), (3, 3));
    for id in &clones {
        assert_reads(&image_of(&p, id), 0x6b, 0, M);
    }
}
