//! Scale: ListVolumes paging through 1 000, 10 000 and 100 000 volumes, controller start-up
//! with them in the pool, CreateVolume and DeleteVolume among them, and the plugin's memory
//! (RSS, RssAnon, Pss) after start-up and after listing them.
//!
//! The pool is seeded offline: one volume is made through CreateVolume, then its record is
//! copied under new names and random keys (as the plugin makes them) with the image
//! hard-linked (a new copy every 50 000 links, below ext4's link limit), so 100 000 volumes
//! cost seconds and no disk space. The plugin reads them as its own; nothing here depends on
//! how they were made.

use super::plugin::{memory, probe_ready};
use super::stats::{ms, LatencyRow, Samples, ValueRow};
use super::Settings;
use std::time::{Duration, Instant};
use virtdisk_csi::pool::VolumeRecord;
use virtdisk_test_support::pool::seed_copies;
use virtdisk_test_support::prelude::{create_req, csi, Plugin, GIB};

pub struct ScaleResult {
    pub latency: Vec<LatencyRow>,
    pub values: Vec<ValueRow>,
}

/// `n` CreateVolume calls and then DeleteVolume of each, one at a time.
async fn create_delete(p: &Plugin, scale: usize, n: usize) -> (Samples, Samples) {
    let mut c = p.controller();
    let (mut creates, mut deletes) = (Samples::default(), Samples::default());
    let mut ids = Vec::new();
    for i in 0..n {
        let r = super::stats::timed(
            &mut creates,
            c.create_volume(create_req(&format!("bench-scale-{scale}-{i}"), GIB)),
        )
        .await
        .expect("CreateVolume");
        ids.push(r.into_inner().volume.unwrap().volume_id);
    }
    for id in ids {
        super::stats::timed(
            &mut deletes,
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            }),
        )
        .await
        .expect("DeleteVolume");
    }
    (creates, deletes)
}

/// "RSS / RssAnon / Pss" of the plugin now, and its RssAnon.
fn memory_text(p: &Plugin) -> (String, u64) {
    let rss = memory(p).rss;
    let (anon, _, pss) = super::footprint::breakdown(p.pid().expect("plugin is running"));
    (
        format!(
            "{} / {} / {}",
            super::stats::mib(rss),
            super::stats::mib(anon),
            super::stats::mib(pss)
        ),
        anon,
    )
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
    // CreateVolume and DeleteVolume p50 at the first scale, for the later ones to compare.
    let mut base: Option<(Duration, Duration)> = None;
    let last = *s.list_scales.last().unwrap();
    for &n in &s.list_scales {
        eprintln!("scale: seeding {n} volumes");
        seed_copies(&p.pool_dir(), &template, "bench-list", have - 1..n - 1);
        have = n;
        // The seeding's writeback (up to 100 000 new files) is flushed first: left to the
        // kernel's flusher, it would run during the timed calls below and weigh on the larger
        // sizes only.
        super::floors::run_ok("sync", &["-f", &p.pool_dir().to_string_lossy()]);
        let (serving, ready) = startup(&mut p, 3).await;
        let mut row = ValueRow::new(
            format!("controller start-up, {n} volumes in the pool"),
            format!("{} serving, {} ready", ms(serving), ms(ready)),
        )
        .note("spawn → first GetPluginInfo answer; → first ready Probe (libvirt connected); median of 3");
        if n == last && n >= 100_000 {
            row = row.target("ready ≤ 1 s", ready <= Duration::from_secs(1));
        }
        values.push(row);
        let (idle, idle_anon) = memory_text(&p);
        // A first pass warms the page cache and the allocator; the second is reported.
        let (_, seen) = list_all(&p, s.list_page).await;
        assert_eq!(seen, n, "ListVolumes returned {seen} volumes, expected {n}");
        let mut passes = Samples::default();
        let mut last_walk = Samples::default();
        for _ in 0..3 {
            let (calls, _) = list_all(&p, s.list_page).await;
            passes.push(calls.wall);
            last_walk = calls;
        }
        let (after, after_anon) = memory_text(&p);
        let total = passes.p50().unwrap();
        let page = last_walk.p50().unwrap_or_default();
        let mut page_row = LatencyRow::new(
            format!(
                "ListVolumes, {n} volumes, {} per page (per call)",
                s.list_page
            ),
            last_walk,
        );
        if n >= 100_000 {
            page_row = page_row.target(super::stats::Target::P50AtMost(Duration::from_millis(2)));
        }
        latency.push(page_row);
        let mut total_row = ValueRow::new(
            format!(
                "ListVolumes, all {n} volumes, {} per page (total)",
                s.list_page
            ),
            ms(total),
        )
        .note(format!(
            "{} calls, p50 {} each; median of 3 passes; {domains} libvirt domains on the host",
            n.div_ceil(s.list_page as usize),
            ms(page)
        ));
        if n == 1000 {
            total_row = total_row.target("≤ 200 ms", total <= Duration::from_millis(200));
        }
        values.push(total_row);
        let mut idle_row = ValueRow::new(
            format!("memory after start-up with {n} volumes: RSS / RssAnon / Pss"),
            idle,
        );
        let mut after_row = ValueRow::new(
            format!("memory after listing {n} volumes: RSS / RssAnon / Pss"),
            after,
        );
        if n >= 100_000 {
            let cap = 40 << 20;
            idle_row = idle_row.target("RssAnon ≤ 40 MiB", idle_anon <= cap);
            after_row = after_row.target("RssAnon ≤ 40 MiB", after_anon <= cap);
        }
        values.push(idle_row);
        values.push(after_row);

        let calls = if s.quick { 10 } else { 50 };
        eprintln!("scale: {calls} CreateVolume and DeleteVolume among {n} volumes");
        let (creates, deletes) = create_delete(&p, n, calls).await;
        let (cp, dp) = (
            creates.p50().unwrap_or_default(),
            deletes.p50().unwrap_or_default(),
        );
        let mut crow = LatencyRow::new(format!("CreateVolume among {n} volumes"), creates);
        let mut drow = LatencyRow::new(format!("DeleteVolume among {n} volumes"), deletes);
        match base {
            None => base = Some((cp, dp)),
            // Within 20 % of the figure among the first scale's volumes.
            Some((c0, d0)) => {
                crow = crow.target(super::stats::Target::P50AtMost(Duration::from_secs_f64(
                    c0.as_secs_f64() * 1.2,
                )));
                drow = drow.target(super::stats::Target::P50AtMost(Duration::from_secs_f64(
                    d0.as_secs_f64() * 1.2,
                )));
            }
        }
        latency.push(crow);
        latency.push(drow);
    }
    ScaleResult { latency, values }
}
