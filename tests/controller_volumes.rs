//! Issue 2: the controller volume lifecycle on real qcow2 images, driven through the real binary.

mod common;

use common::*;
use std::collections::HashSet;
use tonic::Code;
use virtdisk_csi::csi::proto as csi;

fn image_of(p: &Plugin, volume_id: &str) -> std::path::PathBuf {
    let key = volume_id.rsplit_once('.').unwrap().1;
    p.pool_dir().join("images").join(format!("{key}.qcow2"))
}

#[tokio::test]
async fn identity_answers() {
    let p = Plugin::start("controller", &[]).await;
    let info = p
        .identity()
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "virtdisk.csi.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = p
        .identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let has_controller = caps.capabilities.iter().any(|c| {
        matches!(
            c.r#type,
            Some(csi::plugin_capability::Type::Service(s))
                if s.r#type == csi::plugin_capability::service::Type::ControllerService as i32
        )
    });
    assert!(has_controller);
    let ready = p
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready.ready, Some(true));
}

#[tokio::test]
async fn create_is_idempotent_and_makes_a_real_qcow2() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v1 = c
        .create_volume(create_req("vol-a", 10 * MIB + 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v1.capacity_bytes, 11 * MIB, "rounded up to 1 MiB");
    let v2 = c
        .create_volume(create_req("vol-a", 10 * MIB + 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
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
    let err = c
        .create_volume(create_req("vol-a", 100 * MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let mut other = create_req("vol-a", 10 * MIB + 1);
    other.parameters = params(&[("bus", "virtio")]);
    assert_eq!(
        c.create_volume(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    // Default size without capacity_range (as Nomad sends it), empty topology requirement.
    let mut nomad = create_req("vol-default", 0);
    nomad.accessibility_requirements = Some(csi::TopologyRequirement::default());
    let v = c
        .create_volume(nomad)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, GIB);
}

#[tokio::test]
async fn names_of_any_utf8_are_stored_not_used_as_paths() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    for name in [
        "../../etc/passwd",
        "tëst/ün icode ✓",
        "<disk>&'\"",
        &"n".repeat(128),
    ] {
        let v = c
            .create_volume(create_req(name, MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(image_of(&p, &v.volume_id).exists());
    }
    assert!(!p.dir.path().join("etc").exists());
    let err = c
        .create_volume(create_req(&"n".repeat(129), MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.create_volume(create_req("", MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn capacity_limits_give_the_right_codes() {
    let config = r#"
        [[pool]]
        name = "small"
        path = "{dir}/small"
        capacity_bytes = 104857600
    "#;
    let p = Plugin::start_with_config("controller", config, &[]).await;
    let mut c = p.controller();
    let mut r = create_req("range", 10 * MIB);
    r.capacity_range.as_mut().unwrap().limit_bytes = 5 * MIB;
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::OutOfRange
    );

    // Bigger than the pool's cap can ever hold.
    let err = c
        .create_volume(create_req("huge", 200 * MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Fits the cap, but the pool is already mostly provisioned.
    c.create_volume(create_req("first", 80 * MIB))
        .await
        .unwrap();
    let err = c
        .create_volume(create_req("second", 30 * MIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, 20 * MIB);

    // Unknown pool parameter → INVALID_ARGUMENT; negative sizes → OUT_OF_RANGE.
    let mut r = create_req("nopool", MIB);
    r.parameters = params(&[("pool", "missing")]);
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut r = create_req("neg", MIB);
    r.capacity_range.as_mut().unwrap().required_bytes = -1;
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::OutOfRange
    );
}

#[tokio::test]
async fn capabilities_and_parameters_are_validated() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let mut r = create_req("btrfs", MIB);
    r.volume_capabilities = vec![mount_cap("btrfs", Mode::SingleNodeWriter)];
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut r = create_req("mnmw-qcow2", MIB);
    r.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut r = create_req("mnmw-raw", MIB);
    r.volume_capabilities = vec![block_cap(Mode::MultiNodeMultiWriter)];
    r.parameters = params(&[("format", "raw")]);
    let v = c
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_context["format"], "raw");
    let raw = p
        .pool_dir()
        .join("images")
        .join(format!("{}.raw", v.volume_id.rsplit_once('.').unwrap().1));
    assert_eq!(qemu_img_info(&raw)["format"], "raw");

    let mut r = create_req("badparam", MIB);
    r.parameters = params(&[("cache", "turbo")]);
    let err = c.create_volume(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("cache"), "{}", err.message());

    let mut r = create_req("nocap", MIB);
    r.volume_capabilities.clear();
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn validate_confirms_a_bare_mount_and_rejects_what_cannot_work() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v = c
        .create_volume(create_req("val", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let bare = mount_cap("", Mode::SingleNodeWriter);
    let resp = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![bare.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.confirmed.unwrap().volume_capabilities, vec![bare]);

    let resp = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![block_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.confirmed.is_none());
    assert!(!resp.message.is_empty());

    let err = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "default.0000000000000000".into(),
            volume_capabilities: vec![mount_cap("", Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn delete_is_ok_for_unknown_and_twice() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v = c
        .create_volume(create_req("del", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let image = image_of(&p, &v.volume_id);
    assert!(image.exists());
    for _ in 0..2 {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(!image.exists());
    assert_eq!(
        std::fs::read_dir(p.pool_dir().join("volumes"))
            .unwrap()
            .count(),
        0
    );
    for unknown in [
        "default.0123456789abcdef",
        "nope",
        "other-pool.0123456789abcdef",
    ] {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: unknown.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // The name is free again.
    c.create_volume(create_req("del", 2 * MIB)).await.unwrap();
}

#[tokio::test]
async fn bad_ids_are_invalid_argument_everywhere() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    for bad in ["../x", "a/b", "a\0b", "..", &"x".repeat(129), ""] {
        let code = c
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code();
        assert_eq!(code, Code::InvalidArgument, "delete {bad:?}");
        let code = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: bad.into(),
            })
            .await
            .unwrap_err()
            .code();
        assert_eq!(code, Code::InvalidArgument, "get {bad:?}");
        let code = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: bad.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code();
        assert_eq!(code, Code::InvalidArgument, "expand {bad:?}");
        let code = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: bad.into(),
                volume_capabilities: vec![mount_cap("", Mode::SingleNodeWriter)],
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code();
        assert_eq!(code, Code::InvalidArgument, "validate {bad:?}");
    }
}

#[tokio::test]
async fn list_pages_through_every_volume_in_stable_order() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let mut ids = Vec::new();
    for i in 0..7 {
        let v = c
            .create_volume(create_req(&format!("list-{i}"), MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.push(v.volume_id);
    }
    ids.sort();
    for max in 1..=8 {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: max,
                    starting_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.entries.len() <= max as usize);
            for e in &page.entries {
                let status = e.status.as_ref().expect("status is set");
                let cond = status.volume_condition.as_ref().expect("condition is set");
                assert!(!cond.abnormal);
                seen.push(e.volume.as_ref().expect("volume is set").volume_id.clone());
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(seen, ids, "max_entries {max}");
    }
    let err = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: "garbage!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A missing image shows as an abnormal condition.
    std::fs::remove_file(image_of(&p, &ids[0])).unwrap();
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
}

#[tokio::test]
async fn offline_expansion_grows_the_image() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let v = c
        .create_volume(create_req("grow", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
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
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 20 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 64 * MIB);
    assert!(!r.node_expansion_required);

    let err = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "default.0123456789abcdef".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_every_volume_and_cleans_half_made_ones() {
    let mut p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let mut ids = HashSet::new();
    for i in 0..5 {
        let v = c
            .create_volume(create_req(&format!("keep-{i}"), MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.insert(v.volume_id);
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
    std::fs::write(
        p.pool_dir().join(format!("volumes/{key}.json")),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    std::fs::write(
        p.pool_dir().join(format!("images/{key}.qcow2.part")),
        b"junk",
    )
    .unwrap();
    std::fs::write(p.pool_dir().join(format!("images/{key}.qcow2")), b"junk").unwrap();
    p.restart().await;
    let listed: HashSet<String> = p
        .controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert_eq!(listed, ids);
    assert!(!p.pool_dir().join(format!("volumes/{key}.json")).exists());
    assert!(!p.pool_dir().join(format!("images/{key}.qcow2")).exists());
    assert!(!p
        .pool_dir()
        .join(format!("images/{key}.qcow2.part"))
        .exists());
}

#[tokio::test]
async fn fifty_concurrent_creates_of_one_name_make_one_image() {
    let p = Plugin::start("controller", &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = p.controller();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req("same-name", 4 * MIB)).await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same volume");
    let images = std::fs::read_dir(p.pool_dir().join("images"))
        .unwrap()
        .count();
    assert_eq!(images, 1);
    let id = ids.into_iter().next().unwrap();
    // Once the storm is over the same name still resolves to that volume.
    let again = p
        .controller()
        .create_volume(create_req("same-name", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
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
    let caps = p
        .identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        c.r#type,
        Some(csi::plugin_capability::Type::Service(s))
            if s.r#type == csi::plugin_capability::service::Type::VolumeAccessibilityConstraints as i32
    )));
    let topo = |host: &str| csi::Topology {
        segments: params(&[("topology.virtdisk.csi.io/host", host)]),
    };
    let mut c = p.controller();
    let mut r = create_req("on-hv2", MIB);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topo("hv1"), topo("hv2")],
        preferred: vec![topo("hv2")],
    });
    let v = c
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.volume_id.starts_with("hv2."));
    assert_eq!(v.accessible_topology, vec![topo("hv2")]);

    let mut r = create_req("nowhere", MIB);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topo("hv9")],
        preferred: vec![],
    });
    assert_eq!(
        c.create_volume(r).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    let cap = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topo("hv9")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, 0);
    let cap = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topo("hv1")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
}

#[tokio::test]
async fn probe_is_not_ready_when_a_pool_is_unusable() {
    let p = Plugin::start("controller", &[]).await;
    p.identity().probe(csi::ProbeRequest {}).await.unwrap();
    // Root ignores permissions, so make the pool unusable by taking its directory away.
    let volumes = p.pool_dir().join("volumes");
    let aside = p.pool_dir().join("volumes-aside");
    std::fs::rename(&volumes, &aside).unwrap();
    let err = p.identity().probe(csi::ProbeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not writable"), "{}", err.message());
    std::fs::rename(&aside, &volumes).unwrap();
    let ready = p
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready.ready, Some(true));
}

/// ListVolumes reads only the page's records: a half-made record (a create in flight, or one a
/// crash left) is skipped without shortening the page, and a page token whose volume is
/// deleted meanwhile still continues after it.
#[tokio::test]
async fn list_pages_skip_half_made_records_and_survive_deletes() {
    let p = Plugin::start("controller", &[]).await;
    let mut c = p.controller();
    let mut ids = Vec::new();
    for i in 0..6 {
        let v = c
            .create_volume(create_req(&format!("page-{i}"), MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.push(v.volume_id);
    }
    ids.sort();
    // A record in state `creating`, sorted between the others.
    let key = ids[2].rsplit_once('.').unwrap().1;
    let records = p.pool_dir().join("volumes");
    let mut half: serde_json::Value =
        serde_json::from_slice(&std::fs::read(records.join(format!("{key}.json"))).unwrap())
            .unwrap();
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

    let lister = c.clone();
    let page = |token: String| {
        let mut c = lister.clone();
        async move {
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = page(String::new()).await;
    let mut seen: Vec<String> = first
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(seen, ids[..2]);
    // The volume the token names goes away before the next page.
    let token = first.next_token;
    let deleted = token.clone();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut token = token;
    loop {
        let next = page(token).await;
        assert!(next.entries.len() <= 2);
        seen.extend(
            next.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if next.next_token.is_empty() {
            break;
        }
        token = next.next_token;
    }
    let mut want: Vec<String> = ids.clone();
    want.retain(|id| *id != deleted);
    assert_eq!(seen, want);
    assert!(!seen.iter().any(|id| id.ends_with(&half_key)));
}
