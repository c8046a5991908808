//! Snapshots, restores and clones against the real binary and real qemu-img/qemu-io: data is
//! written into volume images with qemu-io (volumes are unattached) and read back by pattern.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use virtdisk_csi::csi::proto as csi;

const VOL: i64 = 64 * MIB;

fn key_of(id: &str) -> &str {
    id.rsplit_once('.').unwrap().1
}

fn volume_record(p: &Plugin, id: &str) -> Value {
    let path = p.pool_dir().join(format!("volumes/{}.json", key_of(id)));
    serde_json::from_slice(&std::fs::read(&path).expect("volume record")).unwrap()
}

fn image_of(p: &Plugin, id: &str) -> PathBuf {
    let rec = volume_record(p, id);
    p.pool_dir()
        .join("images")
        .join(rec["image"].as_str().unwrap())
}

fn depth_of(p: &Plugin, id: &str) -> usize {
    let rec = volume_record(p, id);
    1 + rec["chain"]["backing"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

/// Runs one qemu-io command (reads open the image read-only). The background flattener may
/// hold an image's lock for a moment while it switches a volume: then try again.
fn qemu_io(image: &Path, cmd: &str) -> (bool, String) {
    let mut tries = 0;
    loop {
        let mut c = Command::new("qemu-io");
        if cmd.starts_with("read") {
            c.arg("-r");
        }
        let out = c
            .args(["-f", "qcow2", "-c", cmd])
            .arg(image)
            .output()
            .expect("qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("lock") && tries < 50 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        return (out.status.success() && !text.contains("failed"), text);
    }
}

/// Writes `pattern` over [offset, offset+len) of an unattached volume's image.
fn write_pattern(image: &Path, pattern: u8, offset: u64, len: u64) {
    let (ok, text) = qemu_io(image, &format!("write -P {pattern:#x} {offset} {len}"));
    assert!(ok, "qemu-io write into {}: {text}", image.display());
}

/// Whether [offset, offset+len) of the image reads back as `pattern`.
fn reads_pattern(image: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    qemu_io(image, &format!("read -P {pattern:#x} {offset} {len}")).0
}

fn assert_reads(image: &Path, pattern: u8, offset: u64, len: u64) {
    let (ok, text) = qemu_io(image, &format!("read -P {pattern:#x} {offset} {len}"));
    assert!(
        ok,
        "{} should read {pattern:#x} at {offset}: {text}",
        image.display()
    );
}

/// `qemu-img check` on every layer file of the pool.
fn check_all_layers(p: &Plugin) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(p.pool_dir().join("images")).unwrap() {
        let path = entry.unwrap().path();
        qemu_img_check(&path);
        n += 1;
    }
    n
}

fn layer_files(p: &Plugin) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p.pool_dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn create(p: &Plugin, name: &str, size: i64) -> csi::Volume {
    p.controller()
        .create_volume(create_req(name, size))
        .await
        .expect("create volume")
        .into_inner()
        .volume
        .unwrap()
}

async fn create_from(
    p: &Plugin,
    name: &str,
    size: i64,
    source: csi::volume_content_source::Type,
) -> Result<csi::Volume, tonic::Status> {
    let mut req = create_req(name, size);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    p.controller()
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

fn from_volume(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

async fn snapshot(p: &Plugin, name: &str, source: &str) -> Result<csi::Snapshot, tonic::Status> {
    p.controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: source.to_string(),
            name: name.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap())
}

async fn delete_volume(p: &Plugin, id: &str) {
    p.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("delete volume");
}

async fn delete_snapshot(p: &Plugin, id: &str) -> Result<(), tonic::Status> {
    p.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn list_snapshots(
    p: &Plugin,
    req: csi::ListSnapshotsRequest,
) -> Result<csi::ListSnapshotsResponse, tonic::Status> {
    p.controller()
        .list_snapshots(req)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_keeps_the_point_in_time() {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, "snap-src", VOL).await;
    write_pattern(&image_of(&p, &vol.volume_id), 0xaa, 0, MIB as u64);

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
    write_pattern(&src_image, 0xbb, 0, MIB as u64);

    let restored = create_from(&p, "snap-restored", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, VOL);
    assert_eq!(
        restored.content_source,
        Some(csi::VolumeContentSource {
            r#type: Some(from_snapshot(&snap.snapshot_id))
        })
    );
    assert_reads(&image_of(&p, &restored.volume_id), 0xaa, 0, MIB as u64);
    assert_reads(&src_image, 0xbb, 0, MIB as u64);

    // Writes to the restore stay there.
    write_pattern(&image_of(&p, &restored.volume_id), 0xcc, 0, MIB as u64);
    assert_reads(&src_image, 0xbb, 0, MIB as u64);
    let again = create_from(&p, "snap-restored-2", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_reads(&image_of(&p, &again.volume_id), 0xaa, 0, MIB as u64);

    // Idempotent restore.
    let same = create_from(&p, "snap-restored", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(same.volume_id, restored.volume_id);
    assert_reads(&image_of(&p, &restored.volume_id), 0xcc, 0, MIB as u64);

    // GetSnapshot.
    let got = p
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, snap);
    assert!(check_all_layers(&p) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_sizes() {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, "size-src", VOL).await;
    write_pattern(
        &image_of(&p, &vol.volume_id),
        0x11,
        VOL as u64 - MIB as u64,
        MIB as u64,
    );
    let snap = snapshot(&p, "size-snap", &vol.volume_id).await.unwrap();

    // Larger: the overlay grows, the old data is there and the new tail reads zeros.
    let big = create_from(&p, "size-big", 4 * VOL, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(big.capacity_bytes, 4 * VOL);
    let big_image = image_of(&p, &big.volume_id);
    assert_eq!(qemu_img_info(&big_image)["virtual-size"], 4 * VOL);
    assert_reads(&big_image, 0x11, VOL as u64 - MIB as u64, MIB as u64);
    assert_reads(&big_image, 0x00, VOL as u64, MIB as u64);

    // A request below the snapshot's size but without a limit gets the snapshot's size.
    let small_ok = create_from(&p, "size-small", MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(small_ok.capacity_bytes, VOL);

    // A limit below the snapshot's size cannot be met.
    let mut req = create_req("size-too-small", MIB);
    req.capacity_range.as_mut().unwrap().limit_bytes = 2 * MIB;
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(from_snapshot(&snap.snapshot_id)),
    });
    let err = p.controller().create_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Clone too.
    let mut req = create_req("clone-too-small", MIB);
    req.capacity_range.as_mut().unwrap().limit_bytes = 2 * MIB;
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(from_volume(&vol.volume_id)),
    });
    let err = p.controller().create_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // A restore is qcow2: format=raw cannot be honoured.
    let mut req = create_req("size-raw", 0);
    req.parameters = params(&[("format", "raw")]);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(from_snapshot(&snap.snapshot_id)),
    });
    let err = p.controller().create_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    check_all_layers(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_is_independent_of_its_source() {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, "clone-src", VOL).await;
    write_pattern(&image_of(&p, &vol.volume_id), 0xaa, 0, MIB as u64);

    let clone = create_from(&p, "clone-1", 0, from_volume(&vol.volume_id))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, VOL);
    let clone_image = image_of(&p, &clone.volume_id);
    let src_image = image_of(&p, &vol.volume_id);
    assert_ne!(clone_image, src_image);
    assert_reads(&clone_image, 0xaa, 0, MIB as u64);

    write_pattern(&src_image, 0xbb, 0, MIB as u64);
    write_pattern(&clone_image, 0xcc, MIB as u64, MIB as u64);
    assert_reads(&clone_image, 0xaa, 0, MIB as u64);
    assert_reads(&clone_image, 0xcc, MIB as u64, MIB as u64);
    assert_reads(&src_image, 0xbb, 0, MIB as u64);
    assert_reads(&src_image, 0x00, MIB as u64, MIB as u64);

    // Idempotent; the clone's frozen layer is hidden: no snapshot appears.
    let same = create_from(&p, "clone-1", 0, from_volume(&vol.volume_id))
        .await
        .unwrap();
    assert_eq!(same.volume_id, clone.volume_id);
    let listed = list_snapshots(&p, Default::default()).await.unwrap();
    assert!(listed.entries.is_empty());

    // Deleting the source keeps the clone readable.
    delete_volume(&p, &vol.volume_id).await;
    assert_reads(&clone_image, 0xaa, 0, MIB as u64);
    check_all_layers(&p);

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
    assert_eq!(layer_files(&p), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_restores_outlive_their_sources() {
    let p = Plugin::start("controller", &[]).await;
    let vol = create(&p, "indep-src", VOL).await;
    write_pattern(&image_of(&p, &vol.volume_id), 0x5a, 0, MIB as u64);
    let snap = snapshot(&p, "indep-snap", &vol.volume_id).await.unwrap();
    let r1 = create_from(&p, "indep-r1", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();

    // Delete the source volume: the snapshot and the restore are intact.
    delete_volume(&p, &vol.volume_id).await;
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, MIB as u64);
    let r2 = create_from(&p, "indep-r2", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, MIB as u64);

    // A new volume with the source's old name does not clobber the frozen layer.
    let reborn = create(&p, "indep-src", VOL).await;
    assert_eq!(reborn.volume_id, vol.volume_id);
    assert_reads(&image_of(&p, &reborn.volume_id), 0x00, 0, MIB as u64);
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, MIB as u64);
    delete_volume(&p, &reborn.volume_id).await;

    // Delete the snapshot while restores use its layer: OK, and they still read.
    delete_snapshot(&p, &snap.snapshot_id).await.unwrap();
    delete_snapshot(&p, &snap.snapshot_id).await.unwrap();
    assert_reads(&image_of(&p, &r1.volume_id), 0x5a, 0, MIB as u64);
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, MIB as u64);
    let err = p
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = create_from(&p, "indep-r3", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    check_all_layers(&p);

    // The layer goes with the last volume that reads through it.
    delete_volume(&p, &r1.volume_id).await;
    assert_reads(&image_of(&p, &r2.volume_id), 0x5a, 0, MIB as u64);
    delete_volume(&p, &r2.volume_id).await;
    assert_eq!(layer_files(&p), Vec::<String>::new());
}

/// The controller's RPC capabilities.
async fn controller_rpcs(p: &Plugin) -> Vec<i32> {
    p.controller()
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rules_paging_and_restart() {
    let mut p = Plugin::start("controller", &[]).await;
    use csi::controller_service_capability::rpc::Type;
    let rpcs = controller_rpcs(&p).await;
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
    assert!(controller_rpcs(&alpha)
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
        depth_of(&p, &a.volume_id),
        2,
        "a repeat must not freeze again"
    );
    let err = snapshot(&p, "rules-s1", &b.volume_id).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = snapshot(&p, "rules-x", "default.0123456789abcdef")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = snapshot(&p, "rules-x", "not-ours").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = snapshot(&p, "", &a.volume_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = snapshot(&p, "rules-x", "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Nomad passes the volume's parameters and secrets along: accepted as they are.
    let with_params = p
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: "rules-s2".into(),
            parameters: params(&[("nomad-param", "x")]),
            secrets: params(&[("token", "s3cr3t")]),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
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
        let page = list_snapshots(
            &p,
            csi::ListSnapshotsRequest {
                max_entries: 3,
                starting_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids, "every snapshot once, in a stable order");

    // Filters; unknown ids give an empty list, a bad token ABORTED.
    let only_b = list_snapshots(
        &p,
        csi::ListSnapshotsRequest {
            source_volume_id: b.volume_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(only_b.entries.len(), 2);
    let one = list_snapshots(
        &p,
        csi::ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        },
    )
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
        let none = list_snapshots(
            &p,
            csi::ListSnapshotsRequest {
                snapshot_id: snapshot_id.into(),
                source_volume_id: source_volume_id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(none.entries.is_empty(), "{snapshot_id} {source_volume_id}");
    }
    let err = list_snapshots(
        &p,
        csi::ListSnapshotsRequest {
            starting_token: "garbage token".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");

    // Unknown ids: DeleteSnapshot OK, GetSnapshot NOT_FOUND.
    delete_snapshot(&p, "default.s0000000000000000")
        .await
        .unwrap();
    delete_snapshot(&p, "nope").await.unwrap();
    let err = p
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "default.s0000000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A restart keeps everything.
    p.restart().await;
    let after = list_snapshots(&p, Default::default()).await.unwrap();
    let after_ids: Vec<String> = after
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    assert_eq!(after_ids, ids);
    assert_eq!(
        snapshot(&p, "rules-s1", &a.volume_id).await.unwrap(),
        s1,
        "idempotent across restarts"
    );

    // Nomad deletes by id.
    for id in &ids {
        delete_snapshot(&p, id).await.unwrap();
    }
    assert!(list_snapshots(&p, Default::default())
        .await
        .unwrap()
        .entries
        .is_empty());
    check_all_layers(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_volumes_cannot_be_snapshotted() {
    let p = Plugin::start("controller", &[]).await;
    let mut req = create_req("raw-src", VOL);
    req.parameters = params(&[("format", "raw")]);
    let raw = p
        .controller()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let err = snapshot(&p, "raw-snap", &raw.volume_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("qcow2"), "{}", err.message());
    let err = create_from(&p, "raw-clone", 0, from_volume(&raw.volume_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(layer_files(&p).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_chains_are_flattened_in_the_background_and_read_right() {
    let config = "[snapshots]\nmax_chain_depth = 3\n";
    let p = Plugin::start_with_config("controller", config, &[]).await;
    let vol = create(&p, "deep-src", VOL).await;

    // Each generation writes its own MiB, then is snapshotted.
    let mut snaps = Vec::new();
    for gen in 0..6u64 {
        write_pattern(
            &image_of(&p, &vol.volume_id),
            0x10 + gen as u8,
            gen * MIB as u64,
            MIB as u64,
        );
        // Snapshots may meet an in-flight flattening switch on the volume (ABORTED), or a chain
        // at twice the limit waiting for the flattener (UNAVAILABLE): retry, as a CO does.
        let snap = loop {
            match snapshot(&p, &format!("deep-s{gen}"), &vol.volume_id).await {
                Ok(s) => break s,
                Err(e) if matches!(e.code(), Code::Aborted | Code::Unavailable) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("snapshot: {e:?}"),
            }
        };
        snaps.push(snap);
    }
    // Overwrite generation 0 in the live volume.
    write_pattern(&image_of(&p, &vol.volume_id), 0xee, 0, MIB as u64);

    // The flattener brings the chain back within the limit.
    let deadline = Instant::now() + Duration::from_secs(120);
    while depth_of(&p, &vol.volume_id) > 3 {
        assert!(
            Instant::now() < deadline,
            "chain not flattened: {}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let image = image_of(&p, &vol.volume_id);
    assert_reads(&image, 0xee, 0, MIB as u64);
    for gen in 1..6u64 {
        assert_reads(&image, 0x10 + gen as u8, gen * MIB as u64, MIB as u64);
    }
    let chain = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(&image)
        .output()
        .unwrap();
    let chain: Value = serde_json::from_slice(&chain.stdout).unwrap();
    assert!(chain.as_array().unwrap().len() <= 3, "{chain}");

    // Every snapshot still shows its own point in time, at every depth; restores of deep
    // snapshots are flattened too.
    let mut restores = Vec::new();
    for (gen, snap) in snaps.iter().enumerate() {
        let r = create_from(
            &p,
            &format!("deep-r{gen}"),
            0,
            from_snapshot(&snap.snapshot_id),
        )
        .await
        .unwrap();
        let img = image_of(&p, &r.volume_id);
        for g in 0..=gen as u64 {
            assert_reads(&img, 0x10 + g as u8, g * MIB as u64, MIB as u64);
        }
        assert_reads(&img, 0x00, (gen as u64 + 1) * MIB as u64, MIB as u64);
        restores.push((gen, r));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for (gen, r) in &restores {
        while depth_of(&p, &r.volume_id) > 3 {
            assert!(
                Instant::now() < deadline,
                "restore not flattened: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let img = image_of(&p, &r.volume_id);
        for g in 0..=*gen as u64 {
            assert_reads(&img, 0x10 + g as u8, g * MIB as u64, MIB as u64);
        }
    }
    check_all_layers(&p);

    // Delete everything: no layer is left behind.
    for (_, r) in &restores {
        delete_volume(&p, &r.volume_id).await;
    }
    for s in &snaps {
        delete_snapshot(&p, &s.snapshot_id).await.unwrap();
    }
    delete_volume(&p, &vol.volume_id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !layer_files(&p).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            layer_files(&p)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = reads_pattern;
}
