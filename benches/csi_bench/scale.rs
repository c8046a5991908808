//! Scale: ListVolumes paging through 1 000 and 10 000 volumes, controller start-up with them
//! in the pool, and the plugin's memory idle and after listing them.
//!
//! The pool is seeded offline: one volume is made through CreateVolume, then its record is
//! copied under new names (keys derived from the names, as the plugin does) with the image
//! hard-linked, so 10 000 volumes cost seconds and no disk space. The plugin reads them as
//! its own; nothing here depends on how they were made.

use super::plugin::{memory, probe_ready};
use super::stats::{ms, LatencyRow, Samples, ValueRow};
use super::Settings;
use std::time::{Duration, Instant};
use virtdisk_csi::ids::{self, ObjectId};
use virtdisk_csi::pool::VolumeRecord;
use virtdisk_test_support::prelude::{create_req, csi, Plugin, GIB};

pub struct ScaleResult {
    pub latency: Vec<LatencyRow>,
    pub values: Vec<ValueRow>,
}

/// Adds volumes `from..to` to the pool by copying `template`'s record and linking its image.
fn seed(pool_dir: &std::path::Path, template: &VolumeRecord, from: usize, to: usize) {
    let images = pool_dir.join("images");
    let src = images.join(&template.image);
    for i in from..to {
        let name = format!("bench-list-{i:05}");
        let key = ids::volume_key_for_name(&name);
        let mut rec = template.clone();
        rec.id = ObjectId::new(&rec.pool, &key).to_string();
        rec.name = name;
        rec.image = format!("{key}.qcow2");
        std::fs::hard_link(&src, images.join(&rec.image)).unwrap();
        std::fs::write(
            pool_dir.join(format!("volumes/{key}.json")),
            serde_json::to_vec_pretty(&rec).unwrap(),
        )
        .unwrap();
    }
}

/// Pages through every volume with `page` entries per call; returns (per-call samples,
/// volumes seen).
async fn list_all(p: &Plugin, page: i32) -> (Samples, usize) {
    let mut c = p.controller();
    let mut s = Samples::default();
    let mut token = String::new();
    let mut seen = 0;
    let t = Instant::now();
    loop {
        let r = super::stats::timed(
            &mut s,
            c.list_volumes(csi::ListVolumesRequest {
                max_entries: page,
                starting_token: token.clone(),
            }),
        )
        .await
        .expect("ListVolumes");
        let r = r.into_inner();
        seen += r.entries.len();
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    s.wall = t.elapsed();
    (s, seen)
}

/// Median of a few start-ups (stop, start, first answer).
async fn startup(p: &mut Plugin, times: usize) -> (Duration, Duration) {
    let mut serving = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..times {
        let t0 = Instant::now();
        serving.push(p.restart().await);
        while !probe_ready(p).await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ready.push(t0.elapsed());
    }
    serving.sort();
    ready.sort();
    (serving[serving.len() / 2], ready[ready.len() / 2])
}

pub async fn run(s: &Settings) -> ScaleResult {
    let mut latency = Vec::new();
    let mut values = Vec::new();
    let mut p = super::plugin::start("controller", "", &[]).await;
    let template = {
        let id = p
            .controller()
            .create_volume(create_req("bench-list-template", GIB))
            .await
            .expect("create the template volume")
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let key = id.rsplit_once('.').unwrap().1.to_string();
        let bytes = std::fs::read(p.pool_dir().join(format!("volumes/{key}.json"))).unwrap();
        serde_json::from_slice::<VolumeRecord>(&bytes).unwrap()
    };
    let domains = virtdisk_test_support::domain::count_all();
    let mut have = 1;
    for &n in &s.list_scales {
        eprintln!("scale: seeding {n} volumes");
        seed(&p.pool_dir(), &template, have - 1, n - 1);
        have = n;
        let (serving, ready) = startup(&mut p, 3).await;
        values.push(ValueRow::new(
            format!("controller start-up, {n} volumes in the pool"),
            format!("{} serving, {} ready", ms(serving), ms(ready)),
        )
        .note("spawn → first GetPluginInfo answer; → first ready Probe (libvirt connected); median of 3"));
        let idle = memory(&p);
        // A first pass warms the page cache and the allocator; the second is reported.
        let (_, seen) = list_all(&p, s.list_page).await;
        assert_eq!(seen, n, "ListVolumes returned {seen} volumes, expected {n}");
        let mut passes = Samples::default();
        let mut last = Samples::default();
        for _ in 0..3 {
            let (calls, _) = list_all(&p, s.list_page).await;
            passes.push(calls.wall);
            last = calls;
        }
        let after = memory(&p);
        let total = passes.p50().unwrap();
        latency.push(LatencyRow::new(
            format!(
                "ListVolumes, {n} volumes, {} per page (per call)",
                s.list_page
            ),
            last,
        ));
        let mut total_row = ValueRow::new(
            format!(
                "ListVolumes, all {n} volumes, {} per page (total)",
                s.list_page
            ),
            ms(total),
        )
        .note(format!(
            "{} calls; median of 3 passes; {domains} libvirt domains on the host",
            n.div_ceil(s.list_page as usize)
        ));
        if n == 1000 {
            total_row = total_row.target("≤ 200 ms", total <= Duration::from_millis(200));
        }
        values.push(total_row);
        values.push(ValueRow::new(
            format!("RSS after start-up with {n} volumes (before listing)"),
            super::stats::mib(idle.rss),
        ));
        values.push(ValueRow::new(
            format!("RSS after listing {n} volumes (VmRSS / VmHWM)"),
            format!(
                "{} / {}",
                super::stats::mib(after.rss),
                super::stats::mib(after.hwm)
            ),
        ));
    }
    ScaleResult { latency, values }
}
