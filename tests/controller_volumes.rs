//! Issue 2: the controller volume lifecycle on real qcow2 images, driven through the real binary.

use std::collections::HashSet;
use virtdisk_test_support::pool::volume_record;
use virtdisk_test_support::prelude::*;

fn image_of(p: &Plugin, volume_id: &str) -> std::path::PathBuf {
    let key = key_of(volume_id);
    p.pool_dir().join("images").join(format!("{key}.qcow2"))
}

/// CreateVolume, which must succeed.
async fn create(p: &Plugin, req: csi::CreateVolumeRequest) -> csi::Volume {
    p.controller().create(req).await.unwrap()
}

/// Volumes `<prefix>-0` … `<prefix>-<n-1>` of 1 MiB: their ids, sorted.
async fn create_many(p: &Plugin, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let req = create_req(&format!("{prefix}-{i}"), MIB);
        ids.push(create(p, req).await.volume_id);
    }
    ids.sort();
    ids
}

/// Asserts CreateVolume of `req` fails with `code`.
async fn create_fails(p: &Plugin, req: csi::CreateVolumeRequest, code: Code) {
    let what = format!("CreateVolume {}", req.name);
    expect_code(p.controller().create(req).await, code, &what);
}

/// Every page of ListVolumes with `max` entries per page; each page holds at most `max`.
async fn list_pages(
    c: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    max: i32,
    mut token: String,
) -> Vec<csi::list_volumes_response::Entry> {
    let mut seen = Vec::new();
    loop {
        let req = csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token,
        };
        let page = c.list_volumes(req).await.unwrap().into_inner();
        assert!(page.entries.len() <= max as usize);
        seen.extend(page.entries);
        if page.next_token.is_empty() {
            return seen;
        }
        token = page.next_token;
    }
}

fn ids_of(entries: &[csi::list_volumes_response::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.volume.as_ref().expect("volume is set").volume_id.clone())
        .collect()
}

#[tokio::test]
async fn identity_answers() {
    let p = Plugin::start("controller", &[]).await;
    let info = p.identity().info().await;
    assert_eq!(info.name, "virtdisk.csi.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = p.identity().capabilities().await;
    use csi::plugin_capability::service::Type as Service;
    assert!(has_service(&caps, Service::ControllerService));
    assert_eq!(p.identity().ready().await.unwrap(), Some(true));
}

#[tokio::test]
async fn create_is_idempotent_and_makes_a_real_qcow2() {
    let p = Plugin::start("controller", &[]).await;
    let v1 = create(&p, create_req("vol-a", 10 * MIB + 1)).await;
    assert_eq!(v1.capacity_bytes, 11 * MIB, "rounded up to 1 MiB");
    let v2 = create(&p, create_req("vol-a", 10 * MIB + 1)).await;
    assert_eq!(v1, v2);
    let image = image_of(&p, &v1.volume_id);
    let info = qemu_img_info(&image);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_i64().unwrap(), 11 * MIB);
    qemu_img_check(&image);
    assert_eq!(
        v1.volume_context.get("format").map(String::as_str),
        Some("qcow2")
    );
    assert_eq!(
        v1.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );

    // Same name, incompatible request → ALREADY_EXISTS.
    create_fails(&p, create_req("vol-a", 100 * MIB), Code::AlreadyExists).await;
    let other = csi::CreateVolumeRequest {
        parameters: params(&[("bus", "virtio")]),
        ..create_req("vol-a", 10 * MIB + 1)
    };
    create_fails(&p, other, Code::AlreadyExists).await;
    // Another access type or file system is another volume (its context names its fsType).
    for cap in [
        block_cap(Mode::SingleNodeWriter),
        mount_cap("xfs", Mode::SingleNodeWriter),
    ] {
        let other = csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            ..create_req("vol-a", 10 * MIB + 1)
        };
        create_fails(&p, other, Code::AlreadyExists).await;
    }
    // A mount without fs_type asks for no particular file system: the same volume.
    let any_fs = csi::CreateVolumeRequest {
        volume_capabilities: vec![mount_cap("", Mode::SingleNodeWriter)],
        ..create_req("vol-a", 10 * MIB + 1)
    };
    assert_eq!(create(&p, any_fs).await, v1);

    // Default size without capacity_range (as Nomad sends it), empty topology requirement.
    let nomad = csi::CreateVolumeRequest {
        accessibility_requirements: Some(csi::TopologyRequirement::default()),
        ..create_req("vol-default", 0)
    };
    assert_eq!(create(&p, nomad).await.capacity_bytes, GIB);
}

/// The CreateVolume a CO retries (external-provisioner, Nomad) is the original one, also after
/// ControllerModifyVolume changed a mutable parameter: it must answer the same volume, and the
/// volume must keep its modified QoS.
#[tokio::test]
async fn a_repeated_create_after_modify_is_the_same_volume() {
    let p = Plugin::start("controller", &[]).await;
    let original = csi::CreateVolumeRequest {
        parameters: params(&[("totalIopsSec", "100")]),
        mutable_parameters: params(&[("readBytesSec", "1048576")]),
        ..create_req("vol-modified", 8 * MIB)
    };
    let v1 = create(&p, original.clone()).await;
    let got_before = p.controller().volume(&v1.volume_id).await.unwrap();
    let listed_before = p.controller().all_volumes().await;

    p.controller()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: v1.volume_id.clone(),
            mutable_parameters: params(&[("totalIopsSec", "500"), ("readBytesSec", "2097152")]),
            ..Default::default()
        })
        .await
        .expect("modify");

    // The retried original answers the same volume; GetVolume and ListVolumes report it as
    // before (the volume context carries no QoS).
    assert_eq!(create(&p, original.clone()).await, v1);
    assert_eq!(
        p.controller().volume(&v1.volume_id).await.unwrap(),
        got_before
    );
    assert_eq!(p.controller().all_volumes().await, listed_before);
    // A create that names the modified values asks for another volume than this one was
    // created as: ALREADY_EXISTS.
    let as_modified = csi::CreateVolumeRequest {
        parameters: params(&[("totalIopsSec", "500")]),
        ..original.clone()
    };
    create_fails(&p, as_modified, Code::AlreadyExists).await;

    // The record keeps both: what the volume was created with, and the current QoS.
    let rec = volume_record(&p.pool_dir(), &v1.volume_id);
    assert_eq!(rec["parameters"]["totalIopsSec"], "100");
    assert_eq!(rec["parameters"]["readBytesSec"], "1048576");
    assert_eq!(rec["mutable_parameters"]["totalIopsSec"], "500");
    assert_eq!(rec["disk"]["qos"]["total_iops_sec"], 500, "{rec}");
    assert_eq!(rec["disk"]["qos"]["read_bytes_sec"], 2097152, "{rec}");
}

/// xfs needs 300 MiB: a smaller xfs volume is made 300 MiB when limit_bytes allows it (the
/// spec asks for at least required_bytes), OUT_OF_RANGE when it does not; at CreateVolume, not
/// at the node's NodeStageVolume.
#[tokio::test]
async fn xfs_volumes_are_at_least_the_xfs_minimum() {
    let p = Plugin::start("controller", &[]).await;
    let xfs = |name: &str, required: i64, limit: i64| csi::CreateVolumeRequest {
        volume_capabilities: vec![mount_cap("xfs", Mode::SingleNodeWriter)],
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..create_req(name, required)
    };
    let small = create(&p, xfs("xfs-small", 64 * MIB, 0)).await;
    assert_eq!(small.capacity_bytes, 300 * MIB);
    assert_eq!(
        qemu_img_info(&image_of(&p, &small.volume_id))["virtual-size"],
        300 * MIB
    );
    // The same request again is the same volume.
    assert_eq!(create(&p, xfs("xfs-small", 64 * MIB, 0)).await, small);
    let within = create(&p, xfs("xfs-within", 100 * MIB, 400 * MIB)).await;
    assert_eq!(within.capacity_bytes, 300 * MIB);
    // No size asked for, a limit that leaves room: the default size within the limit.
    let unsized_ = create(&p, xfs("xfs-unsized", 0, 512 * MIB)).await;
    assert_eq!(unsized_.capacity_bytes, 512 * MIB);
    let err = p
        .controller()
        .create(xfs("xfs-capped", 64 * MIB, 200 * MIB))
        .await;
    let msg = expect_code(err, Code::OutOfRange, "xfs limited below its minimum");
    assert!(msg.contains("xfs"), "{msg}");
    // ext4 and block volumes keep their small sizes.
    assert_eq!(
        create(&p, create_req("ext4-small", 64 * MIB))
            .await
            .capacity_bytes,
        64 * MIB
    );
    let block = csi::CreateVolumeRequest {
        volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
        ..create_req("block-small", 64 * MIB)
    };
    assert_eq!(create(&p, block).await.capacity_bytes, 64 * MIB);
}

#[tokio::test]
async fn names_of_any_utf8_are_stored_not_used_as_paths() {
    let p = Plugin::start("controller", &[]).await;
    for name in [
        "../../etc/passwd",
        "tëst/ün icode ✓",
        "<disk>&'\"",
        &"n".repeat(128),
    ] {
        let v = create(&p, create_req(name, MIB)).await;
        assert!(image_of(&p, &v.volume_id).exists());
    }
    assert!(!p.dir.path().join("etc").exists());
    create_fails(&p, create_req(&"n".repeat(129), MIB), Code::InvalidArgument).await;
    create_fails(&p, create_req("", MIB), Code::InvalidArgument).await;
}

/// CreateVolume's codes at a pool's limits, and GetCapacity agreeing with CreateVolume: its
/// maximum_volume_size is accepted and the next size is refused, in a capped pool and in an
/// overcommitting one (1 PiB, the plugin's largest volume); an unknown pool is
/// INVALID_ARGUMENT for both, with one message.
#[tokio::test]
async fn capacity_limits_give_the_right_codes() {
    let config = r#"
        [[pool]]
        name = "small"
        path = "{dir}/small"
        capacity_bytes = 104857600
        [[pool]]
        name = "thin"
        path = "{dir}/thin"
    "#;
    let p = Plugin::start_with_config("controller", config, &[]).await;
    let in_pool = |name: &str, size: i64, pool: &str| csi::CreateVolumeRequest {
        parameters: params(&[("pool", pool)]),
        ..create_req(name, size)
    };
    let mut r = in_pool("range", 10 * MIB, "small");
    r.capacity_range.as_mut().unwrap().limit_bytes = 5 * MIB;
    create_fails(&p, r, Code::OutOfRange).await;

    // Bigger than the pool's cap can ever hold.
    create_fails(&p, in_pool("huge", 200 * MIB, "small"), Code::OutOfRange).await;

    // Fits the cap, but the pool is already mostly provisioned.
    create(&p, in_pool("first", 80 * MIB, "small")).await;
    create_fails(
        &p,
        in_pool("second", 30 * MIB, "small"),
        Code::ResourceExhausted,
    )
    .await;

    let capacity = |pool: &str| {
        let (mut c, parameters) = (p.controller(), params(&[("pool", pool)]));
        async move {
            c.get_capacity(csi::GetCapacityRequest {
                parameters,
                ..Default::default()
            })
            .await
        }
    };
    let small = capacity("small").await.unwrap().into_inner();
    assert_eq!(small.available_capacity, 20 * MIB);
    let max = small.maximum_volume_size.unwrap();
    assert_eq!(max, 20 * MIB);
    assert_eq!(small.minimum_volume_size, Some(MIB));
    // For xfs (300 MiB at least) the 20 MiB left is no room at all.
    let xfs = p
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            parameters: params(&[("pool", "small")]),
            volume_capabilities: vec![mount_cap("xfs", Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(xfs.minimum_volume_size, Some(300 * MIB));
    assert_eq!(xfs.maximum_volume_size, Some(0), "{xfs:?}");
    // A file system CreateVolume refuses is refused here too.
    let btrfs = p
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![mount_cap("btrfs", Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(btrfs.code(), Code::InvalidArgument, "{btrfs:?}");
    assert!(btrfs.message().contains("btrfs"), "{btrfs:?}");
    // One byte more rounds up to the next MiB, which the cap no longer holds.
    create_fails(
        &p,
        in_pool("max+1", max + 1, "small"),
        Code::ResourceExhausted,
    )
    .await;
    create(&p, in_pool("max", max, "small")).await;
    let full = capacity("small").await.unwrap().into_inner();
    assert_eq!(full.maximum_volume_size, Some(0));

    // Overcommit: the largest volume is the plugin's, not the free space.
    let thin = capacity("thin").await.unwrap().into_inner();
    let max = thin.maximum_volume_size.unwrap();
    assert_eq!(max, 1 << 50);
    assert!(thin.available_capacity < max, "{thin:?}");
    create_fails(&p, in_pool("thin-max+1", max + 1, "thin"), Code::OutOfRange).await;
    let v = create(&p, in_pool("thin-max", max, "thin")).await;
    assert_eq!(v.capacity_bytes, max);
    p.controller().delete(&v.volume_id).await.unwrap();

    // Unknown pool parameter → INVALID_ARGUMENT, from GetCapacity as from CreateVolume, with
    // the same message; negative sizes → OUT_OF_RANGE.
    let created = p
        .controller()
        .create(in_pool("nopool", MIB, "missing"))
        .await;
    let create_err = created.unwrap_err();
    assert_eq!(create_err.code(), Code::InvalidArgument, "{create_err:?}");
    let capacity_err = capacity("missing").await.unwrap_err();
    assert_eq!(
        capacity_err.code(),
        Code::InvalidArgument,
        "{capacity_err:?}"
    );
    assert_eq!(capacity_err.message(), create_err.message());
    assert!(
        capacity_err.message().contains("\"missing\"")
            && capacity_err.message().contains("small, thin"),
        "{capacity_err:?}"
    );
    let mut r = create_req("neg", MIB);
    r.capacity_range.as_mut().unwrap().required_bytes = -1;
    create_fails(&p, r, Code::OutOfRange).await;
}

#[tokio::test]
async fn capabilities_and_parameters_are_validated() {
    let p = Plugin::start("controller", &[]).await;
    let with =
        |name: &str, cap: csi::VolumeCapability, kv: &[(&str, &str)]| csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            parameters: params(kv),
            ..create_req(name, MIB)
        };
    let btrfs = with("btrfs", mount_cap("btrfs", Mode::SingleNodeWriter), &[]);
    create_fails(&p, btrfs, Code::InvalidArgument).await;
    let mnmw = block_cap(Mode::MultiNodeMultiWriter);
    create_fails(
        &p,
        with("mnmw-qcow2", mnmw.clone(), &[]),
        Code::InvalidArgument,
    )
    .await;

    let v = create(&p, with("mnmw-raw", mnmw, &[("format", "raw")])).await;
    assert_eq!(v.volume_context["format"], "raw");
    let raw = p
        .pool_dir()
        .join("images")
        .join(format!("{}.raw", key_of(&v.volume_id)));
    assert_eq!(qemu_img_info(&raw)["format"], "raw");

    let r = with("badparam", ext4_cap(), &[("cache", "turbo")]);
    let err = p.controller().create(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("cache"), "{}", err.message());

    let mut r = create_req("nocap", MIB);
    r.volume_capabilities.clear();
    create_fails(&p, r, Code::InvalidArgument).await;
}

#[tokio::test]
async fn validate_confirms_a_bare_mount_and_rejects_what_cannot_work() {
    let p = Plugin::start("controller", &[]).await;
    let c = p.controller();
    let v = create(&p, create_req("val", MIB)).await;
    let bare = mount_cap("", Mode::SingleNodeWriter);
    let validate = |id: &str, cap: csi::VolumeCapability| {
        let (mut c, req) = (c.clone(), validate_req(id, cap));
        async move {
            c.validate_volume_capabilities(req)
                .await
                .map(|r| r.into_inner())
        }
    };
    let resp = validate(&v.volume_id, bare.clone()).await.unwrap();
    assert_eq!(resp.confirmed.unwrap().volume_capabilities, vec![bare]);

    let resp = validate(&v.volume_id, block_cap(Mode::MultiNodeMultiWriter)).await;
    let resp = resp.unwrap();
    assert!(resp.confirmed.is_none());
    assert!(!resp.message.is_empty());

    let err = validate(
        "default.0000000000000000",
        mount_cap("", Mode::SingleNodeWriter),
    )
    .await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn delete_is_ok_for_unknown_and_twice() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v = create(&p, create_req("del", MIB)).await;
    let image = image_of(&p, &v.volume_id);
    assert!(image.exists());
    for _ in 0..2 {
        c.delete(&v.volume_id).await.unwrap();
    }
    assert!(!image.exists());
    // No record is left; the removed files' inodes wait, empty, as spares.
    let view = virtdisk_test_support::pool::PoolView::read(&p.pool_dir());
    assert!(view.volumes.is_empty() && view.images.is_empty());
    assert!(view.spares.iter().all(|(_, len)| *len == 0));
    for unknown in [
        "default.0123456789abcdef",
        "nope",
        "other-pool.0123456789abcdef",
    ] {
        c.delete(unknown).await.unwrap();
    }
    // The name is free again.
    create(&p, create_req("del", 2 * MIB)).await;
}

#[tokio::test]
async fn bad_ids_are_invalid_argument_everywhere() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    for bad in ["../x", "a/b", "a\0b", "..", &"x".repeat(129), ""] {
        let what = |rpc: &str| format!("{rpc} {bad:?}");
        expect_code(c.delete(bad).await, Code::InvalidArgument, &what("delete"));
        expect_code(c.volume(bad).await, Code::InvalidArgument, &what("get"));
        let expand = c.expand(expand_req(bad, MIB)).await;
        expect_code(expand, Code::InvalidArgument, &what("expand"));
        let req = validate_req(bad, mount_cap("", Mode::SingleNodeWriter));
        let validate = c.validate_volume_capabilities(req).await;
        expect_code(validate, Code::InvalidArgument, &what("validate"));
    }
}

#[tokio::test]
async fn list_pages_through_every_volume_in_stable_order() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let ids = create_many(&p, "list", 7).await;
    for max in 1..=8 {
        let entries = list_pages(&mut c, max, String::new()).await;
        for e in &entries {
            let status = e.status.as_ref().expect("status is set");
            let cond = status.volume_condition.as_ref().expect("condition is set");
            assert!(!cond.abnormal);
        }
        assert_eq!(ids_of(&entries), ids, "max_entries {max}");
    }
    let list = |max_entries: i32, starting_token: &str| csi::ListVolumesRequest {
        max_entries,
        starting_token: starting_token.into(),
    };
    let err = c.list_volumes(list(2, "garbage!")).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = c.list_volumes(list(-1, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A missing image shows as an abnormal condition.
    std::fs::remove_file(image_of(&p, &ids[0])).unwrap();
    let got = c.volume(&ids[0]).await.unwrap();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
}

/// A token is an id of the listing's own kind in a configured pool: a snapshot id given to
/// ListVolumes, a volume id given to ListSnapshots or an id of a pool that is not configured
/// is ABORTED (the error tables), never a silent restart from the first page.
#[tokio::test]
async fn list_tokens_of_another_kind_or_pool_are_aborted() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let ids = create_many(&p, "tok", 3).await;
    let snap = c.snapshot(snapshot_req("tok-s", &ids[0])).await.unwrap();
    let volumes = |token: &str| csi::ListVolumesRequest {
        max_entries: 1,
        starting_token: token.into(),
    };
    let snapshots = |token: &str| csi::ListSnapshotsRequest {
        max_entries: 1,
        starting_token: token.into(),
        ..Default::default()
    };
    // Tokens we hand out work; a stale one (its volume deleted) continues after it.
    let first = c.list_volumes(volumes("")).await.unwrap().into_inner();
    assert_eq!(first.next_token, ids[1]);
    c.delete(&ids[1]).await.unwrap();
    let next = c.list_volumes(volumes(&ids[1])).await.unwrap().into_inner();
    assert_eq!(ids_of(&next.entries), [ids[2].clone()]);
    let key = key_of(&ids[0]);
    for token in [
        snap.snapshot_id.clone(),
        format!("elsewhere.{key}"),
        "default.s0000000000000000".into(),
    ] {
        let err = c.list_volumes(volumes(&token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "ListVolumes token {token}");
    }
    for token in [
        ids[0].clone(),
        format!("elsewhere.s{key}"),
        "default.0000000000000000".into(),
    ] {
        let err = c.list_snapshots(snapshots(&token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "ListSnapshots token {token}");
    }
    let page = c.list_snapshots(snapshots("")).await.unwrap().into_inner();
    assert_eq!(page.entries.len(), 1);
}

/// A capacity range no volume can satisfy is OUT_OF_RANGE for a name that exists too, as for
/// a new one (not ALREADY_EXISTS: the request is wrong whatever the pool holds).
#[tokio::test]
async fn impossible_ranges_are_out_of_range_for_an_existing_name_too() {
    let p = Plugin::start("controller", &[]).await;
    create(&p, create_req("range", MIB)).await;
    for (required, limit) in [
        (2 * MIB, MIB),
        (0, 100),
        (MIB + 1, MIB + 1000),
        (1 << 51, 0),
    ] {
        let mut r = create_req("range", 0);
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        });
        create_fails(&p, r, Code::OutOfRange).await;
    }
    // A range the volume is outside of, but that another volume could fit, is a conflict.
    create_fails(&p, create_req("range", 2 * MIB), Code::AlreadyExists).await;
    create(&p, create_req("range", MIB)).await;
}

#[tokio::test]
async fn offline_expansion_grows_the_image() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v = create(&p, create_req("grow", 10 * MIB)).await;
    let r = c.expand(expand_req(&v.volume_id, 64 * MIB)).await.unwrap();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    assert!(
        r.node_expansion_required,
        "mount volumes need the node to grow the fs"
    );
    let image = image_of(&p, &v.volume_id);
    assert_eq!(
        qemu_img_info(&image)["virtual-size"].as_i64().unwrap(),
        64 * MIB
    );
    qemu_img_check(&image);

    // Smaller request: nothing to do, current size reported.
    let smaller = csi::ControllerExpandVolumeRequest {
        volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
        ..expand_req(&v.volume_id, 20 * MIB)
    };
    let r = c.expand(smaller).await.unwrap();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    assert!(!r.node_expansion_required);

    let err = c.expand(expand_req("default.0123456789abcdef", MIB)).await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);

    let got = c.volume(&v.volume_id).await.unwrap();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_every_volume_and_cleans_half_made_ones() {
    let mut p = Plugin::start("controller", &[]).await;
    let mut ids = HashSet::new();
    for i in 0..5 {
        ids.insert(
            create(&p, create_req(&format!("keep-{i}"), MIB))
                .await
                .volume_id,
        );
    }
    p.kill();
    // Simulate a crash in the middle of a create: a Creating record and a partial image.
    let key = "00000000000000aa";
    let rec = serde_json::json!({
        "schema": 1, "id": format!("default.{key}"), "name": "half", "pool": "default",
        "state": "creating", "format": "qcow2", "capacity_bytes": 1048576,
        "image": format!("{key}.qcow2"), "capabilities": [], "parameters": {},
        "disk": {"bus": "scsi", "persist": true, "qos": {}}, "created_at": 0
    });
    let pool = p.pool_dir();
    let record = pool.join(format!("volumes/{key}.json"));
    let (image, part) = (
        pool.join(format!("images/{key}.qcow2")),
        pool.join(format!("images/{key}.qcow2.part")),
    );
    std::fs::write(&record, serde_json::to_vec(&rec).unwrap()).unwrap();
    std::fs::write(&part, b"junk").unwrap();
    std::fs::write(&image, b"junk").unwrap();
    p.restart().await;
    let listed = p.controller().all_volumes().await;
    let listed: HashSet<String> = ids_of(&listed).into_iter().collect();
    assert_eq!(listed, ids);
    assert!(!record.exists());
    assert!(!image.exists());
    assert!(!part.exists());
}

#[tokio::test]
async fn fifty_concurrent_creates_of_one_name_make_one_image() {
    let p = Plugin::start("controller", &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = p.controller();
        tasks.push(tokio::spawn(async move {
            c.create(create_req("same-name", 4 * MIB)).await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => {
                ids.insert(v.volume_id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same volume");
    let images = virtdisk_test_support::pool::layer_files(&p.pool_dir()).len();
    assert_eq!(images, 1);
    let id = ids.into_iter().next().unwrap();
    // Once the storm is over the same name still resolves to that volume.
    let again = create(&p, create_req("same-name", 4 * MIB)).await;
    assert_eq!(again.volume_id, id);
    qemu_img_check(&image_of(&p, &id));
}

#[tokio::test]
async fn topology_chooses_the_pool_and_fills_accessible_topology() {
    let config = r#"
        [[pool]]
        name = "hv1"
        path = "{dir}/hv1"
        topology = { "topology.virtdisk.csi.io/host" = "hv1" }
        [[pool]]
        name = "hv2"
        path = "{dir}/hv2"
        topology = { "topology.virtdisk.csi.io/host" = "hv2" }
    "#;
    let p = Plugin::start_with_config("controller", config, &[]).await;
    let caps = p.identity().capabilities().await;
    use csi::plugin_capability::service::Type as Service;
    assert!(has_service(&caps, Service::VolumeAccessibilityConstraints));
    let topo = |host: &str| csi::Topology {
        segments: params(&[("topology.virtdisk.csi.io/host", host)]),
    };
    let on = |name: &str, requisite: Vec<csi::Topology>, preferred: Vec<csi::Topology>| {
        csi::CreateVolumeRequest {
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite,
                preferred,
            }),
            ..create_req(name, MIB)
        }
    };
    let v = create(
        &p,
        on("on-hv2", vec![topo("hv1"), topo("hv2")], vec![topo("hv2")]),
    )
    .await;
    assert!(v.volume_id.starts_with("hv2."));
    assert_eq!(v.accessible_topology, vec![topo("hv2")]);
    create_fails(
        &p,
        on("nowhere", vec![topo("hv9")], vec![]),
        Code::ResourceExhausted,
    )
    .await;

    let capacity = |host: &str| {
        let (mut c, t) = (p.controller(), topo(host));
        async move {
            let req = csi::GetCapacityRequest {
                accessible_topology: Some(t),
                ..Default::default()
            };
            c.get_capacity(req)
                .await
                .unwrap()
                .into_inner()
                .available_capacity
        }
    };
    assert_eq!(capacity("hv9").await, 0);
    assert!(capacity("hv1").await > 0);
}

#[tokio::test]
async fn probe_is_not_ready_when_a_pool_is_unusable() {
    let p = Plugin::start("controller", &[]).await;
    p.identity().ready().await.unwrap();
    // Root ignores permissions, so make the pool unusable by taking its directory away.
    let volumes = p.pool_dir().join("volumes");
    let aside = p.pool_dir().join("volumes-aside");
    std::fs::rename(&volumes, &aside).unwrap();
    let err = p.identity().ready().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not writable"), "{}", err.message());
    std::fs::rename(&aside, &volumes).unwrap();
    assert_eq!(p.identity().ready().await.unwrap(), Some(true));
}

/// ListVolumes reads only the page's records: a half-made record (a create in flight, or one a
/// crash left) is skipped without shortening the page, and a page token whose volume is
/// deleted meanwhile still continues after it.
#[tokio::test]
async fn list_pages_skip_half_made_records_and_survive_deletes() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let ids = create_many(&p, "page", 6).await;
    // A record in state `creating`, sorted between the others.
    let key = key_of(&ids[2]);
    let records = p.pool_dir().join("volumes");
    let mut half = virtdisk_test_support::pool::volume_record(&p.pool_dir(), &ids[2]);
    let last = if key.ends_with('0') { '1' } else { '0' };
    let half_key = format!("{}{last}", &key[..15]);
    half["id"] = format!("default.{half_key}").into();
    half["name"] = "half-made".into();
    half["state"] = "creating".into();
    std::fs::write(
        records.join(format!("{half_key}.json")),
        serde_json::to_vec(&half).unwrap(),
    )
    .unwrap();

    let first = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = ids_of(&first.entries);
    assert_eq!(seen, ids[..2]);
    // The volume the token names goes away before the next page.
    let deleted = first.next_token.clone();
    c.delete(&deleted).await.unwrap();
    seen.extend(ids_of(&list_pages(&mut c, 2, first.next_token).await));
    let mut want: Vec<String> = ids.clone();
    want.retain(|id| *id != deleted);
    assert_eq!(seen, want);
    assert!(!seen.iter().any(|id| id.ends_with(&half_key)));
}

/// A page never carries more than the plugin's page size (5 000 entries), whatever
/// `max_entries` asks (0 lets the plugin choose): an answer stays far below the 4 MiB a grpc-go
/// client (Nomad, the Kubernetes sidecars) accepts, with however many volumes; the walk by
/// `next_token` still sees every volume once.
#[tokio::test]
async fn a_page_holds_at_most_the_plugin_page_size() {
    use virtdisk_test_support::pool::seed_copies;
    const PAGE: usize = 5_000;
    let mut p = Plugin::start("controller", &[]).await;
    let template = create(&p, create_req("page-template", MIB)).await;
    let record = std::fs::read(
        p.pool_dir()
            .join(format!("volumes/{}.json", key_of(&template.volume_id))),
    )
    .unwrap();
    let template: virtdisk_csi::pool::VolumeRecord = serde_json::from_slice(&record).unwrap();
    p.stop();
    seed_copies(&p.pool_dir(), &template, "page", 0..PAGE + 1);
    p.restart().await;
    let mut c = p.controller();
    for max_entries in [0, 1_000_000] {
        let req = csi::ListVolumesRequest {
            max_entries,
            ..Default::default()
        };
        let first = c.list_volumes(req).await.unwrap().into_inner();
        assert_eq!(first.entries.len(), PAGE, "max_entries {max_entries}");
        assert!(!first.next_token.is_empty());
        let rest = csi::ListVolumesRequest {
            max_entries,
            starting_token: first.next_token,
        };
        let second = c.list_volumes(rest).await.unwrap().into_inner();
        assert_eq!(second.entries.len(), 2, "max_entries {max_entries}");
        assert!(second.next_token.is_empty());
    }
}
