//! CreateSnapshot, restore (CreateVolume from a snapshot) and clone (CreateVolume from a
//! volume) at 1 GiB and 100 GiB with the same data written: nothing is copied, so the times
//! must not grow with the size. The data is read back from the last restore and clone.

use super::floors;
use super::plugin::BenchPlugin;
use super::stats::{timed, LatencyRow, Samples, Target};
use super::Settings;
use crate::common::{create_req, GIB};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use virtdisk_csi::csi::proto as csi;

const CHUNK: u64 = 64 << 20;

pub fn image_of(p: &BenchPlugin, id: &str) -> PathBuf {
    let key = id.rsplit_once('.').unwrap().1;
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.pool_dir().join(format!("volumes/{key}.json"))).unwrap(),
    )
    .unwrap();
    p.pool_dir()
        .join("images")
        .join(rec["image"].as_str().unwrap())
}

/// Writes `bytes` of pattern 0xaa at the start of the image.
pub fn fill(image: &Path, bytes: u64) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    let mut off = 0;
    while off < bytes {
        let len = CHUNK.min(bytes - off);
        cmd.args(["-c", &format!("write -P 0xaa {off} {len}")]);
        off += len;
    }
    let out = cmd.arg(image).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn reads_back(image: &Path, offset: u64) -> bool {
    Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0xaa {offset} 64k"),
        ])
        .arg(image)
        .output()
        .map(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"))
        .unwrap_or(false)
}

pub fn from_source(
    name: &str,
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, 0);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

pub async fn run(s: &Settings, p: &BenchPlugin) -> Vec<LatencyRow> {
    let mut c = p.controller();
    let mut rows = Vec::new();
    let target = Target::P50AtMost(Duration::from_millis(50));
    for size_gib in [1i64, 100] {
        eprintln!(
            "snapshots: {size_gib} GiB volume, {} MiB written, {} rounds",
            s.snapshot_data >> 20,
            s.snapshot_rounds
        );
        let src = c
            .create_volume(create_req(&format!("bench-s-{size_gib}g"), size_gib * GIB))
            .await
            .expect("create the source volume")
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let src_image = image_of(p, &src);
        fill(&src_image, s.snapshot_data);
        let floor_dir = p.dir.path().join("floor");
        std::fs::create_dir_all(&floor_dir).unwrap();
        let floor = floors::qemu_img_overlay(&floor_dir, &src_image, 3);
        let (mut snap, mut restore, mut clone) =
            (Samples::default(), Samples::default(), Samples::default());
        let mut made = Vec::new();
        let mut snaps = Vec::new();
        for round in 0..s.snapshot_rounds {
            let r = timed(
                &mut snap,
                c.create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: src.clone(),
                    name: format!("bench-s-{size_gib}g-s{round}"),
                    ..Default::default()
                }),
            )
            .await;
            let Ok(r) = r else { continue };
            let snap_id = r.into_inner().snapshot.unwrap().snapshot_id;
            snaps.push(snap_id.clone());
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            if let Ok(v) = timed(
                &mut restore,
                c.create_volume(from_source(
                    &format!("bench-s-{size_gib}g-r{round}"),
                    Type::Snapshot(SnapshotSource {
                        snapshot_id: snap_id,
                    }),
                )),
            )
            .await
            {
                made.push(v.into_inner().volume.unwrap().volume_id);
            }
            if let Ok(v) = timed(
                &mut clone,
                c.create_volume(from_source(
                    &format!("bench-s-{size_gib}g-c{round}"),
                    Type::Volume(VolumeSource {
                        volume_id: src.clone(),
                    }),
                )),
            )
            .await
            {
                made.push(v.into_inner().volume.unwrap().volume_id);
            }
        }
        // The last restore and clone hold the data (a wrong backing chain would not).
        for id in made.iter().rev().take(2) {
            let img = image_of(p, id);
            assert!(
                reads_back(&img, s.snapshot_data - (64 << 10)),
                "{id}: the data written before the snapshot does not read back"
            );
        }
        for id in made.iter().chain([&src]) {
            let _ = c.delete_volume(super::controller::delete_req(id)).await;
        }
        for id in snaps {
            let _ = c
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await;
        }
        rows.push(
            LatencyRow::new(format!("CreateSnapshot ({size_gib} GiB)"), snap)
                .target(target)
                .floor("qemu-img create -b (overlay)", &floor),
        );
        rows.push(
            LatencyRow::new(
                format!("restore: CreateVolume from snapshot ({size_gib} GiB)"),
                restore,
            )
            .target(target)
            .floor("qemu-img create -b (overlay)", &floor),
        );
        rows.push(
            LatencyRow::new(
                format!("clone: CreateVolume from volume ({size_gib} GiB)"),
                clone,
            )
            .target(target)
            .floor("qemu-img create -b (overlay)", &floor),
        );
    }
    rows
}
