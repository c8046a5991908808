//! CreateVolumeGroupSnapshot of 1, 4 and 8 volumes of 1 GiB and of 100 GiB (the same data
//! written in each): unattached (every layer frozen offline) and attached read-write to one
//! running KVM domain (one live external snapshot of all of them, no guest agent: crash-
//! consistent). Nothing is copied, so the size must not show; the member count may (one
//! overlay and a few record writes each). The members of the last group are restored and
//! read back.

use super::floors;
use super::stats::{timed, LatencyRow, Samples, Target, ValueRow};
use super::Settings;
use std::path::Path;
use std::time::Duration;
use virtdisk_test_support::pool::volume_image;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::qemu::{qemu_io, reads_pattern, Read};

/// Writes `bytes` of 0xaa at the start of the image.
fn fill(image: &Path, bytes: u64) {
    let (ok, text) = qemu_io(image, &[&format!("write -P 0xaa 0 {bytes}")], Read::Locked);
    assert!(ok, "{text}");
}

/// The latency rows, and per state and member count the ratio of the p50 at 100 GiB to the
/// p50 at 1 GiB (size independence: about 1).
pub async fn run(s: &Settings, p: &Plugin, dom: &TestDomain) -> (Vec<LatencyRow>, Vec<ValueRow>) {
    let mut c = p.controller();
    let mut values = Vec::new();
    let mut p50s: std::collections::BTreeMap<(bool, usize, i64), Duration> = Default::default();
    let mut g = p.group_controller();
    let mut rows = Vec::new();
    let data = s.snapshot_data / 4;
    let floor_dir = p.dir.path().join("group-floor");
    std::fs::create_dir_all(&floor_dir).unwrap();
    let mut floor = None;
    for attached in [false, true] {
        for size_gib in [1i64, 100] {
            for members in [1usize, 4, 8] {
                let tag = format!(
                    "bench-g-{}-{size_gib}g-{members}",
                    if attached { "live" } else { "idle" }
                );
                eprintln!(
                    "group snapshots: {members} × {size_gib} GiB, {}, {} MiB written each, {} rounds",
                    if attached { "attached to one domain" } else { "unattached" },
                    data >> 20,
                    s.snapshot_rounds
                );
                let mut vols = Vec::new();
                for i in 0..members {
                    let v = c
                        .create(create_req(&format!("{tag}-v{i}"), size_gib * GIB))
                        .await
                        .expect("create a member volume")
                        .volume_id;
                    fill(&volume_image(&p.pool_dir(), &v), data);
                    if attached {
                        c.publish(publish_req(&v, &dom.uuid))
                            .await
                            .expect("publish a member volume");
                    }
                    vols.push(v);
                }
                if floor.is_none() {
                    let base = volume_image(&p.pool_dir(), &vols[0]);
                    floor = Some(floors::qemu_img_overlay(&floor_dir, &base, 3));
                }
                let ids: Vec<&str> = vols.iter().map(String::as_str).collect();
                let mut samples = Samples::default();
                let mut groups = Vec::new();
                for round in 0..s.snapshot_rounds {
                    let req = group_snapshot_req(&format!("{tag}-r{round}"), &ids);
                    let r = timed(&mut samples, g.create_volume_group_snapshot(req)).await;
                    if let Ok(r) = r {
                        groups.push(r.into_inner().group_snapshot.unwrap());
                    }
                }
                // The last group's members hold the data.
                if let Some(last) = groups.last() {
                    for (i, m) in last.snapshots.iter().enumerate() {
                        let name = format!("{tag}-check{i}");
                        let req = create_from_req(&name, 0, from_snapshot(&m.snapshot_id));
                        let v = c.create(req).await.expect("restore a member").volume_id;
                        let img = volume_image(&p.pool_dir(), &v);
                        let read =
                            reads_pattern(&img, 0xaa, data - (64 << 10), 64 << 10, Read::Locked);
                        assert!(read.is_ok(), "{v}: the member's data does not read back");
                        let _ = c.delete(&v).await;
                    }
                }
                for grp in &groups {
                    let _ = g.delete_group(&grp.group_snapshot_id, &[]).await;
                }
                for v in &vols {
                    if attached {
                        let _ = c.unpublish(unpublish_req(v, &dom.uuid)).await;
                    }
                    let _ = c.delete(v).await;
                }
                if let Some(p50) = samples.p50() {
                    p50s.insert((attached, members, size_gib), p50);
                }
                let state = if attached {
                    "attached, one domain"
                } else {
                    "unattached"
                };
                // One overlay and a few record writes per member, one libvirt operation for all.
                let mut row = LatencyRow::new(
                    format!("CreateVolumeGroupSnapshot, {members} × {size_gib} GiB ({state})"),
                    samples,
                )
                .target(Target::P50AtMost(Duration::from_millis(
                    if attached { 100 } else { 30 } + 30 * members as u64,
                )));
                if let Some(f) = &floor {
                    row = row.floor("qemu-img create -b (one overlay)", f);
                }
                rows.push(row);
            }
        }
        for members in [1usize, 4, 8] {
            let (Some(small), Some(big)) = (
                p50s.get(&(attached, members, 1)),
                p50s.get(&(attached, members, 100)),
            ) else {
                continue;
            };
            let ratio = big.as_secs_f64() / small.as_secs_f64().max(1e-6);
            let state = if attached { "attached" } else { "unattached" };
            values.push(
                ValueRow::new(
                    format!("group snapshot of {members} ({state}): p50 at 100 GiB / at 1 GiB"),
                    format!("{ratio:.2}"),
                )
                .target("≤ 1.5 (size independent)", ratio <= 1.5),
            );
        }
    }
    (rows, values)
}
