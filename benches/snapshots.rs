//! Snapshot, restore and clone times at two volume sizes with the same data written: the
//! times must not grow with the size (nothing is copied). Not a test: run it with
//! `cargo bench --bench snapshots` (or `--profile dev` to skip a release build: the work is
//! qemu-img and fsync, not Rust). Needs qemu-img and qemu-io, and ~3 GiB free under $TMPDIR.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use virtdisk_csi::csi::proto as csi;

const DATA: u64 = 1 << 30;
const CHUNK: u64 = 64 << 20;
const ROUNDS: usize = 3;

fn image_of(p: &Plugin, id: &str) -> PathBuf {
    let key = id.rsplit_once('.').unwrap().1;
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.pool_dir().join(format!("volumes/{key}.json"))).unwrap(),
    )
    .unwrap();
    p.pool_dir()
        .join("images")
        .join(rec["image"].as_str().unwrap())
}

/// Writes DATA bytes of pattern 0xaa at the start of the image, in 64 MiB requests.
fn fill(image: &Path) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for off in (0..DATA).step_by(CHUNK as usize) {
        cmd.args(["-c", &format!("write -P 0xaa {off} {CHUNK}")]);
    }
    let out = cmd.arg(image).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reads(image: &Path, offset: u64) -> bool {
    Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0xaa {offset} 1M"),
        ])
        .arg(image)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:8.1} ms", d.as_secs_f64() * 1000.0)
}

struct Row {
    size_gib: u64,
    snapshot: Vec<Duration>,
    restore: Vec<Duration>,
    clone: Vec<Duration>,
    full_copy: Duration,
}

async fn measure(p: &Plugin, size_gib: u64) -> Row {
    let size = (size_gib << 30) as i64;
    let src = p
        .controller()
        .create_volume(create_req(&format!("bench-{size_gib}g"), size))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    fill(&image_of(p, &src.volume_id));

    let mut row = Row {
        size_gib,
        snapshot: vec![],
        restore: vec![],
        clone: vec![],
        full_copy: Duration::ZERO,
    };
    for round in 0..ROUNDS {
        let t = Instant::now();
        let snap = p
            .controller()
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: src.volume_id.clone(),
                name: format!("bench-{size_gib}g-s{round}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        row.snapshot.push(t.elapsed());

        let mut req = create_req(&format!("bench-{size_gib}g-r{round}"), 0);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        let t = Instant::now();
        let restored = p
            .controller()
            .create_volume(req)
            .await
            .unwrap()
            .into_inner();
        row.restore.push(t.elapsed());
        let restored = restored.volume.unwrap();
        assert_eq!(restored.capacity_bytes, size);
        assert!(reads(&image_of(p, &restored.volume_id), DATA - (1 << 20)));

        let mut req = create_req(&format!("bench-{size_gib}g-c{round}"), 0);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: src.volume_id.clone(),
                },
            )),
        });
        let t = Instant::now();
        let cloned = p
            .controller()
            .create_volume(req)
            .await
            .unwrap()
            .into_inner();
        row.clone.push(t.elapsed());
        assert!(reads(&image_of(p, &cloned.volume.unwrap().volume_id), 0));
    }

    // For scale: what copying the same volume would cost.
    let copy = p.dir.path().join(format!("copy-{size_gib}g.qcow2"));
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(image_of(p, &src.volume_id))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::File::open(&copy).unwrap().sync_all().unwrap();
    row.full_copy = t.elapsed();
    std::fs::remove_file(&copy).unwrap();
    row
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --all-targets` runs bench mains too: only `cargo bench` (which passes
    // --bench) does the heavy work.
    if !std::env::args().any(|a| a == "--bench") {
        println!("snapshots bench: run it with `cargo bench --bench snapshots`");
        return;
    }
    // A generous chain limit: background flattening would otherwise copy data while we time.
    let p =
        Plugin::start_with_config("controller", "[snapshots]\nmax_chain_depth = 64\n", &[]).await;
    let mut rows = Vec::new();
    for size_gib in [1, 100] {
        rows.push(measure(&p, size_gib).await);
    }
    println!(
        "\nvolume size | data written | snapshot (median of {ROUNDS}) | restore | clone | \
         full copy (qemu-img convert, for scale)"
    );
    for r in &rows {
        println!(
            "{:>7} GiB | {:>8} GiB | {} | {} | {} | {}",
            r.size_gib,
            DATA >> 30,
            ms(median(r.snapshot.clone())),
            ms(median(r.restore.clone())),
            ms(median(r.clone.clone())),
            ms(r.full_copy),
        );
    }
    for r in &rows {
        println!(
            "all rounds {:>3} GiB: snapshot {:?} restore {:?} clone {:?}",
            r.size_gib, r.snapshot, r.restore, r.clone
        );
    }
}
