//! CreateSnapshot, restore (CreateVolume from a snapshot) and clone (CreateVolume from a
//! volume) at 1 GiB and 100 GiB with the same data written: nothing is copied, so the times
//! must not grow with the size. The data is read back from the last restore and clone.

use super::floors;
use super::stats::{timed, LatencyRow, Samples, Target};
use super::Settings;
use std::path::{Path, PathBuf};
use std::time::Duration;
use virtdisk_test_support::pool::volume_image;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::{qemu_io, reads_pattern, Read};

const CHUNK: u64 = 64 << 20;

pub fn image_of(p: &Plugin, id: &str) -> PathBuf {
    volume_image(&p.pool_dir(), id)
}

/// Writes `bytes` of pattern 0xaa at the start of the image.
pub fn fill(image: &Path, bytes: u64) {
    let writes: Vec<String> = (0..bytes)
        .step_by(CHUNK as usize)
        .map(|off| format!("write -P 0xaa {off} {}", CHUNK.min(bytes - off)))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    let (ok, text) = qemu_io(image, &writes, Read::Locked);
    assert!(ok, "{text}");
}

pub fn reads_back(image: &Path, offset: u64) -> bool {
    reads_pattern(image, 0xaa, offset, 64 << 10, Read::LockedNow).is_ok()
}

pub async fn run(s: &Settings, p: &Plugin) -> Vec<LatencyRow> {
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
            .create(create_req(&format!("bench-s-{size_gib}g"), size_gib * GIB))
            .await
            .expect("create the source volume")
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
            let name = format!("bench-s-{size_gib}g-s{round}");
            let r = timed(&mut snap, c.create_snapshot(snapshot_req(&name, &src))).await;
            let Ok(r) = r else { continue };
            let snap_id = r.into_inner().snapshot.unwrap().snapshot_id;
            snaps.push(snap_id.clone());
            for (samples, what, source) in [
                (&mut restore, "r", from_snapshot(&snap_id)),
                (&mut clone, "c", from_volume(&src)),
            ] {
                let name = format!("bench-s-{size_gib}g-{what}{round}");
                let req = create_from_req(&name, 0, source);
                if let Ok(v) = timed(samples, c.create_volume(req)).await {
                    made.push(v.into_inner().volume.unwrap().volume_id);
                }
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
            let _ = c.delete(id).await;
        }
        for id in snaps {
            let _ = c.remove_snapshot(&id).await;
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
