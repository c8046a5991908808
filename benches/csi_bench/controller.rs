//! Controller RPCs one after the other: CreateVolume, ControllerPublish, ControllerUnpublish
//! (confirmed), DeleteVolume, beside the bare qemu-img and libvirt calls they wrap.

use super::floors;
use super::stats::{timed, LatencyRow, Samples, Target};
use super::Settings;
use std::time::{Duration, Instant};
use virtdisk_test_support::domain::count_all;
use virtdisk_test_support::prelude::*;

pub async fn run(s: &Settings, p: &Plugin, domains: &[TestDomain]) -> Vec<LatencyRow> {
    let mut c = p.controller();
    let floor_dir = p.dir.path().join("floor");
    std::fs::create_dir_all(&floor_dir).unwrap();

    eprintln!("controller: bare qemu-img create ×{}", s.creates);
    let qemu_img = floors::qemu_img_create(&floor_dir, "1G", s.creates);
    let durable = floors::durable_write(&floor_dir, s.creates);

    eprintln!("controller: CreateVolume ×{}", s.creates);
    let mut create = Samples::default();
    let mut ids = Vec::new();
    let t = Instant::now();
    for i in 0..s.creates {
        let r = timed(
            &mut create,
            c.create_volume(create_req(&format!("bench-c-{i}"), GIB)),
        )
        .await;
        if let Ok(r) = r {
            ids.push(r.into_inner().volume.unwrap().volume_id);
        }
    }
    create.wall = t.elapsed();

    // Bare hot-plug of images outside the pool in the plugin's pattern (image i to domain
    // i mod 8), one bare round before each plugin round.
    let n = s.publishes.min(ids.len());
    let plan: Vec<(String, std::path::PathBuf)> = (0..n)
        .map(|i| {
            let img = floor_dir.join(format!("attach-{i}.qcow2"));
            floors::run_ok(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1G"],
            );
            (domains[i % domains.len()].name.clone(), img)
        })
        .collect();
    let (mut bare_attach, mut bare_detach) = (Samples::default(), Samples::default());
    let mut publish = Samples::default();
    let mut unpublish = Samples::default();
    for round in 0..s.publish_rounds {
        eprintln!(
            "controller: bare libvirt attach/detach ×{n}, round {}",
            round + 1
        );
        let p = plan.clone();
        let (a, d) = tokio::task::spawn_blocking(move || floors::libvirt_attach_detach(&p))
            .await
            .unwrap();
        bare_attach.merge(a);
        bare_detach.merge(d);

        eprintln!(
            "controller: ControllerPublish/Unpublish ×{n} over {} domains, round {}",
            domains.len(),
            round + 1
        );
        let node = |i: usize| domains[i % domains.len()].uuid.clone();
        let t = Instant::now();
        for (i, id) in ids.iter().take(n).enumerate() {
            let req = publish_req(id, &node(i));
            let _ = timed(&mut publish, c.controller_publish_volume(req)).await;
        }
        publish.wall += t.elapsed();
        let t = Instant::now();
        for (i, id) in ids.iter().take(n).enumerate() {
            let req = unpublish_req(id, &node(i));
            let _ = timed(&mut unpublish, c.controller_unpublish_volume(req)).await;
        }
        unpublish.wall += t.elapsed();
    }

    // ControllerGetVolume reads every domain (which nodes hold the volume?): the scan that
    // ControllerPublish also makes before attaching.
    eprintln!("controller: ControllerGetVolume ×{}", s.publishes);
    let mut get = Samples::default();
    let t = Instant::now();
    for id in ids.iter().cycle().take(s.publishes) {
        let _ = timed(
            &mut get,
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            }),
        )
        .await;
    }
    get.wall = t.elapsed();

    eprintln!("controller: DeleteVolume ×{}", ids.len());
    let mut delete = Samples::default();
    let t = Instant::now();
    for id in &ids {
        let _ = timed(&mut delete, c.delete_volume(delete_req(id))).await;
    }
    delete.wall = t.elapsed();

    vec![
        LatencyRow::new(
            "(floor) durable record write: write, fsync, rename, fsync dir",
            durable.clone(),
        ),
        LatencyRow::new(
            "(for comparison) qemu-img create -f qcow2 1G: the process CreateVolume no longer runs",
            qemu_img,
        ),
        LatencyRow::new("CreateVolume (1 GiB qcow2)", create)
            .floor("durable record write", &durable),
        LatencyRow::new("DeleteVolume", delete).floor("durable record write", &durable),
        LatencyRow::new(
            format!("ControllerPublish (scsi, {} domains)", domains.len()),
            publish,
        )
        .target(Target::P50AtMost(Duration::from_millis(50)))
        .floor("libvirt attach + XML read", &bare_attach),
        LatencyRow::new(
            format!(
                "ControllerGetVolume (reads all {} domains on the host)",
                count_all()
            ),
            get,
        ),
        LatencyRow::new("ControllerUnpublish (confirmed)", unpublish)
            .floor("libvirt detach until gone", &bare_detach),
    ]
}
