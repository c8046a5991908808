//! The node path on this host (a monolith with local attach): ControllerPublish (storage
//! daemon + loop device), NodeStage (find + mkfs + mount, 1 GiB), NodePublish (bind), and
//! back, for ext4 and xfs, beside bare mkfs + mount and a bare storage daemon + losetup.

use super::floors;
use super::stats::{timed, LatencyRow, Samples, Target};
use super::Settings;
use std::time::Duration;
use virtdisk_test_support::local_attach::cleanup;
use virtdisk_test_support::prelude::*;

#[derive(Default)]
struct FsSamples {
    publish: Samples,
    stage: Samples,
    node_publish: Samples,
    publish_and_stage: Samples,
    node_unpublish: Samples,
    unstage: Samples,
    unpublish: Samples,
}

pub fn can_run() -> bool {
    nix::unistd::geteuid().is_root()
        && std::path::Path::new("/dev/fuse").exists()
        && std::path::Path::new("/dev/loop-control").exists()
}

pub async fn run(s: &Settings) -> Vec<LatencyRow> {
    if !can_run() {
        eprintln!("node: SKIPPED (needs root, /dev/fuse and /dev/loop-control)");
        return Vec::new();
    }
    let p = super::plugin::start("monolith", "[node]\ndevice_wait_secs = 30\n", &[]).await;
    let rows = measure(s, &p).await;
    cleanup(p.dir.path());
    rows
}

async fn measure(s: &Settings, p: &Plugin) -> Vec<LatencyRow> {
    let node_id = p.node().node_id().await;
    let floor_dir = p.dir.path().join("floor");
    std::fs::create_dir_all(&floor_dir).unwrap();
    let mut rows = Vec::new();
    let (mut c, mut n) = (p.controller(), p.node());
    for fs in ["ext4", "xfs"] {
        eprintln!("node: {fs}, {} rounds", s.node_rounds);
        let cap = mount_cap(fs, Mode::SingleNodeWriter);
        let mut m = FsSamples::default();
        for round in 0..s.node_rounds {
            let req = csi::CreateVolumeRequest {
                volume_capabilities: vec![cap.clone()],
                ..create_req(&format!("bench-n-{fs}-{round}"), GIB)
            };
            let vol = c.create(req).await.expect("create volume");
            let id = vol.volume_id.clone();
            let mut pr = publish_req(&id, &node_id);
            pr.volume_capability = Some(cap.clone());
            let Ok(ctx) = timed(&mut m.publish, c.controller_publish_volume(pr)).await else {
                continue;
            };
            let ctx = ctx.into_inner().publish_context;
            let staging = p.dir.path().join(format!("staging/{fs}-{round}"));
            let target = p.dir.path().join(format!("target/{fs}-{round}/mount"));
            std::fs::create_dir_all(&staging).unwrap();
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            let (staging, target) = (staging.display().to_string(), target.display().to_string());
            let stage = csi::NodeStageVolumeRequest {
                publish_context: ctx,
                volume_context: vol.volume_context.clone(),
                ..stage_req(&id, &staging, cap.clone())
            };
            let staged = timed(&mut m.stage, n.node_stage_volume(stage)).await;
            if staged.is_ok() {
                let pub_ms = *m.publish.ok.last().unwrap();
                let stage_ms = *m.stage.ok.last().unwrap();
                m.publish_and_stage.push(pub_ms + stage_ms);
                let publish = csi::NodePublishVolumeRequest {
                    volume_context: vol.volume_context.clone(),
                    ..node_publish_req(&id, &staging, &target, cap.clone())
                };
                let _ = timed(&mut m.node_publish, n.node_publish_volume(publish)).await;
                let unpublish = node_unpublish_req(&id, &target);
                let _ = timed(&mut m.node_unpublish, n.node_unpublish_volume(unpublish)).await;
                let _ = timed(
                    &mut m.unstage,
                    n.node_unstage_volume(unstage_req(&id, &staging)),
                )
                .await;
            }
            let _ = timed(
                &mut m.unpublish,
                c.controller_unpublish_volume(unpublish_req(&id, &node_id)),
            )
            .await;
            let _ = c.delete_volume(delete_req(&id)).await;
        }
        let (qsd, mkfs) = tokio::task::spawn_blocking({
            let (dir, rounds) = (floor_dir.clone(), s.node_rounds.min(5));
            move || floors::local_attach(&dir, fs, rounds)
        })
        .await
        .unwrap();
        if fs == "ext4" {
            let mut both = Samples::default();
            for (a, b) in qsd.ok.iter().zip(&mkfs.ok) {
                both.push(*a + *b);
            }
            rows.push(
                LatencyRow::new("ControllerPublish (local attach)", m.publish.clone())
                    .floor("qemu-storage-daemon + losetup", &qsd),
            );
            rows.push(
                LatencyRow::new(
                    "publish + stage, 1 GiB ext4 (local attach)",
                    m.publish_and_stage.clone(),
                )
                .target(Target::P50AtMost(Duration::from_secs(1)))
                .floor("storage daemon + losetup + mkfs + mount", &both),
            );
        }
        rows.push(
            LatencyRow::new(
                format!("NodeStage (find + mkfs + mount, 1 GiB {fs})"),
                m.stage,
            )
            .floor(format!("mkfs.{fs} + mount, same device stack"), &mkfs),
        );
        if fs == "ext4" {
            rows.push(LatencyRow::new("NodePublish (bind mount)", m.node_publish));
            rows.push(LatencyRow::new("NodeUnpublish", m.node_unpublish));
            rows.push(LatencyRow::new("NodeUnstage", m.unstage));
            rows.push(LatencyRow::new(
                "ControllerUnpublish (local attach)",
                m.unpublish,
            ));
        }
    }
    rows
}
