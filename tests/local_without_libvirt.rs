//! Operations that do not need libvirt never depend on it (issue 13): a monolith whose libvirt
//! URI leads nowhere (libvirtd restarting, or a bare host without one) serves every controller
//! and node RPC of this host's volumes, while RPCs that need libvirt answer UNAVAILABLE. The
//! shared libvirtd is never touched: the plugin is pointed at a socket that does not exist.
//! Needs root (local attach: FUSE, loop devices, mounts).

#![cfg(feature = "libvirt")]

use std::path::Path;
use virtdisk_test_support::local_attach::*;
use virtdisk_test_support::prelude::*;

fn config() -> String {
    "[node]\ndevice_wait_secs = 2\n\
     [libvirt]\nuri = \"qemu:///system?socket={dir}/no-libvirtd.sock\"\n"
        .to_string()
}

async fn listed(env: &Env, volume_id: &str) -> csi::list_volumes_response::Entry {
    let all = env.plugin.controller().all_volumes().await;
    all.into_iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == volume_id)
        .expect("listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_volumes_need_no_libvirtd() {
    if !can_run() {
        return;
    }
    let mut env = Env::start(&config()).await;
    env.plugin
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .expect("ready: local attach works without libvirtd");
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let vol = env.create(&unique("nolv"), 32 * MIB, cap.clone()).await;

    // A node that is not this host can only be a VM: that needs libvirtd.
    let err = env
        .plugin
        .controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "some-vm".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());

    // This host's volume: publish, list, get, stage, write, grow, modify, unpublish.
    let ctx = env.controller_publish(&vol, &cap, false).await;
    let e = listed(&env, &vol.volume_id).await;
    let status = e.status.unwrap();
    assert_eq!(status.published_node_ids, vec![env.node_id.clone()]);
    assert!(!status.volume_condition.unwrap().abnormal);
    let nodes = env
        .plugin
        .controller()
        .published_nodes(&vol.volume_id)
        .await;
    assert_eq!(nodes, vec![env.node_id.clone()]);
    let s = env.staging("nolv");
    let t = env.target("nolv-alloc");
    env.stage(&vol, &ctx, &s, &cap).await.unwrap();
    env.publish(&vol, &s, &t, &cap, false).await.unwrap();
    write_file(&t, "data", b"no libvirtd needed");
    let grown = env
        .plugin
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 48 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("online ControllerExpandVolume without libvirtd")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 48 * MIB);
    env.plugin
        .controller()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.volume_id.clone(),
            mutable_parameters: params(&[("totalIopsSec", "500")]),
            ..Default::default()
        })
        .await
        .expect("ControllerModifyVolume without libvirtd");
    env.unpublish_twice(&vol, &t).await;
    env.unstage_twice(&vol, &s).await;
    env.controller_unpublish(&vol).await.unwrap();

    // Snapshots and the volume's end.
    let snap = env
        .plugin
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: unique("nolv-snap"),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot without libvirtd")
        .into_inner()
        .snapshot
        .unwrap();
    env.plugin
        .controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot without libvirtd");
    env.finish(&vol).await;

    // A volume from before the attach ledger existed (an upgrade): libvirtd may hold it, so
    // deciding about it waits for libvirtd, and listings say why.
    let old = env.create(&unique("nolv-old"), 16 * MIB, cap.clone()).await;
    env.plugin.stop();
    std::fs::remove_dir_all(env.plugin.pool_dir().join("attach-ledger")).unwrap();
    env.plugin.restart().await;
    let c = listed(&env, &old.volume_id)
        .await
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(c.abnormal && c.message.contains("unknown"), "{}", c.message);
    let err = env
        .plugin
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: old.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains(&old.volume_id), "{}", err.message());
    assert!(Path::new(&env.plugin.pool_dir())
        .join("attach-ledger/libvirt")
        .is_dir());
    env.plugin.stop();
    std::fs::remove_dir_all(env.plugin.pool_dir().join("attach-ledger")).unwrap();
    env.plugin.restart().await;
}
