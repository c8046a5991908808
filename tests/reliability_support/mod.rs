//! What the reliability tests share: a pool's on-disk truth (records, layers, temp files) and
//! the invariants it must keep, data patterns written and read with qemu-io, and short gRPC
//! helpers for the controller calls the scenarios make.
#![allow(dead_code)]

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use virtdisk_csi::csi::proto as csi;

/// Everything a pool directory holds.
#[derive(Debug)]
pub struct PoolView {
    pub volumes: Vec<Value>,
    pub snapshots: Vec<Value>,
    pub flatten_jobs: Vec<Value>,
    /// File names in `images/`.
    pub images: BTreeSet<String>,
    /// Temp files (`.tmp-*`, `*.part`) anywhere in the pool.
    pub temp_files: Vec<String>,
}

fn records(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !name.starts_with('.') {
            let bytes = std::fs::read(e.path()).unwrap();
            out.push(serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                panic!("record {} is not valid JSON: {err}", e.path().display())
            }));
        }
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl PoolView {
    pub fn read(pool: &Path) -> PoolView {
        let mut temp_files = Vec::new();
        for sub in ["volumes", "images", "snapshots", "flatten"] {
            if let Ok(rd) = std::fs::read_dir(pool.join(sub)) {
                for e in rd.filter_map(|e| e.ok()) {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(".tmp-") || n.ends_with(".part") {
                        temp_files.push(format!("{sub}/{n}"));
                    }
                }
            }
        }
        let images = std::fs::read_dir(pool.join("images"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with(".tmp-") && !n.ends_with(".part"))
                    .collect()
            })
            .unwrap_or_default();
        PoolView {
            volumes: records(&pool.join("volumes")),
            snapshots: records(&pool.join("snapshots")),
            flatten_jobs: records(&pool.join("flatten")),
            images,
            temp_files,
        }
    }

    /// Every layer file some record names.
    pub fn referenced(&self) -> BTreeSet<String> {
        let mut live = BTreeSet::new();
        for v in &self.volumes {
            live.insert(v["image"].as_str().unwrap().to_string());
            live.extend(strings(&v["chain"]["backing"]));
            if let Some(o) = v["chain"]["freezing"]["overlay"].as_str() {
                live.insert(o.to_string());
            }
        }
        for s in &self.snapshots {
            live.insert(s["layer"].as_str().unwrap().to_string());
            live.extend(strings(&s["backing"]));
        }
        for j in &self.flatten_jobs {
            live.insert(j["image"].as_str().unwrap().to_string());
            live.insert(j["layer"].as_str().unwrap().to_string());
            live.extend(strings(&j["source"]));
        }
        live
    }

    pub fn volume_names(&self) -> BTreeSet<String> {
        self.volumes
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn snapshot_names(&self) -> BTreeSet<String> {
        self.snapshots
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn volume(&self, id: &str) -> Option<&Value> {
        self.volumes.iter().find(|v| v["id"] == id)
    }
}

/// The pool's invariants at rest: no temp file, every record finished (Ready, no layer switch,
/// no flattening job), exactly the referenced layers on disk (no orphan, none missing), each
/// image passes `qemu-img check` and its qcow2 backing chain is the one its record names.
pub fn assert_pool_clean(pool: &Path) {
    let v = PoolView::read(pool);
    assert!(
        v.temp_files.is_empty(),
        "temp files left: {:?}",
        v.temp_files
    );
    for r in v.volumes.iter().chain(&v.snapshots) {
        assert_eq!(r["state"], "ready", "unfinished record: {r}");
    }
    for r in &v.volumes {
        assert!(
            r["chain"]["freezing"].is_null(),
            "unfinished layer switch: {r}"
        );
    }
    assert!(
        v.flatten_jobs.is_empty(),
        "flattening jobs left: {:?}",
        v.flatten_jobs
    );
    let live = v.referenced();
    assert_eq!(
        v.images, live,
        "images on disk differ from the layers records name (orphans or missing files)"
    );
    let images = pool.join("images");
    for file in v.images.iter().filter(|f| f.ends_with(".qcow2")) {
        qemu_img_check(&images.join(file));
    }
    for r in &v.volumes {
        let mut chain = vec![r["image"].as_str().unwrap().to_string()];
        chain.extend(strings(&r["chain"]["backing"]));
        assert_backing_chain(&images, &chain);
    }
    for s in &v.snapshots {
        let mut chain = vec![s["layer"].as_str().unwrap().to_string()];
        chain.extend(strings(&s["backing"]));
        assert_backing_chain(&images, &chain);
    }
}

/// Waits (up to 2 minutes) until background flattening has nothing left to do: no job in
/// progress, and no unattached volume deeper than `max_depth` (attached ones wait for their
/// unpublish).
pub async fn wait_flattening_settled(p: &Plugin, max_depth: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let attached: BTreeSet<String> = p
            .controller()
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("list volumes")
            .into_inner()
            .entries
            .into_iter()
            .filter(|e| {
                e.status
                    .as_ref()
                    .is_some_and(|s| !s.published_node_ids.is_empty())
            })
            .map(|e| e.volume.unwrap().volume_id)
            .collect();
        let view = PoolView::read(&p.pool_dir());
        let deep = view.volumes.iter().any(|v| {
            let depth = 1 + v["chain"]["backing"].as_array().map_or(0, Vec::len);
            depth > max_depth && !attached.contains(v["id"].as_str().unwrap())
        });
        if view.flatten_jobs.is_empty() && !deep {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flattening did not settle: jobs {:?}",
            view.flatten_jobs
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Each layer's qcow2 header names the next one as its backing file; the last has none.
pub fn assert_backing_chain(images: &Path, chain: &[String]) {
    for (i, layer) in chain.iter().enumerate() {
        if !layer.ends_with(".qcow2") {
            assert_eq!(chain.len(), 1, "a raw image has no backing: {chain:?}");
            continue;
        }
        let info = qemu_img_info(&images.join(layer));
        let backing = info["backing-filename"].as_str().map(str::to_string);
        assert_eq!(
            backing.as_ref(),
            chain.get(i + 1),
            "backing file of {layer} (chain {chain:?})"
        );
    }
}

/// The active image of a volume, from its record.
pub fn volume_image(pool: &Path, volume_id: &str) -> PathBuf {
    let key = volume_id.rsplit_once('.').unwrap().1;
    let rec: Value = serde_json::from_slice(
        &std::fs::read(pool.join("volumes").join(format!("{key}.json"))).unwrap(),
    )
    .unwrap();
    pool.join("images").join(rec["image"].as_str().unwrap())
}

fn qemu_io(path: &Path, format: &str, readonly: bool, cmd: &str) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    if readonly {
        c.args(["-r", "-U"]);
    }
    let out = c.args(["-c", cmd]).arg(path).output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

fn format_of(path: &Path) -> String {
    qemu_img_info(path)["format"].as_str().unwrap().to_string()
}

/// Writes `len` bytes of `byte` at `offset` into an image (not attached anywhere).
pub fn write_pattern(path: &Path, byte: u8, offset: u64, len: u64) {
    let (ok, text) = qemu_io(
        path,
        &format_of(path),
        false,
        &format!("write -P {byte:#x} {offset} {len}"),
    );
    assert!(ok, "qemu-io write into {}: {text}", path.display());
}

/// Whether `len` bytes at `offset` all read as `byte`.
pub fn has_pattern(path: &Path, byte: u8, offset: u64, len: u64) -> bool {
    qemu_io(
        path,
        &format_of(path),
        true,
        &format!("read -P {byte:#x} {offset} {len}"),
    )
    .0
}

pub fn assert_pattern(path: &Path, byte: u8, offset: u64, len: u64) {
    assert!(
        has_pattern(path, byte, offset, len),
        "{} does not read {byte:#x} at {offset}+{len}",
        path.display()
    );
}

// ---- gRPC helpers ----

pub async fn create_volume(
    p: &Plugin,
    name: &str,
    size: i64,
    kv: &[(&str, &str)],
) -> Result<String, tonic::Status> {
    let mut req = create_req(name, size);
    req.parameters = params(kv);
    p.controller()
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

pub async fn create_from(
    p: &Plugin,
    name: &str,
    source: csi::volume_content_source::Type,
) -> Result<String, tonic::Status> {
    let mut req = create_req(name, 0);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    p.controller()
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

pub fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

pub fn from_volume(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

pub async fn snapshot(p: &Plugin, name: &str, source: &str) -> Result<String, tonic::Status> {
    p.controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: name.to_string(),
            source_volume_id: source.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap().snapshot_id)
}

pub async fn delete_volume(p: &Plugin, id: &str) -> Result<(), tonic::Status> {
    p.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(drop)
}

pub async fn delete_snapshot(p: &Plugin, id: &str) -> Result<(), tonic::Status> {
    p.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(drop)
}

pub async fn expand(p: &Plugin, id: &str, size: i64) -> Result<i64, tonic::Status> {
    p.controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

/// ListVolumes: volume id → capacity.
pub async fn list_volumes(p: &Plugin) -> BTreeMap<String, i64> {
    p.controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list volumes")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| {
            let v = e.volume.unwrap();
            (v.volume_id, v.capacity_bytes)
        })
        .collect()
}

pub async fn list_snapshots(p: &Plugin) -> BTreeSet<String> {
    p.controller()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("list snapshots")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect()
}

/// What the plugin answers (its in-memory index) is what the pool holds: the volumes and
/// snapshots ListVolumes/ListSnapshots report are exactly the Ready records on disk, with the
/// records' sizes, and ControllerGetVolume finds each.
pub async fn assert_index_matches_pool(p: &Plugin) {
    assert_index_matches_pool_at(p, &p.pool_dir()).await
}

/// `assert_index_matches_pool` for a plugin whose pool is at `pool`.
pub async fn assert_index_matches_pool_at(p: &Plugin, pool: &Path) {
    let view = PoolView::read(pool);
    let on_disk: BTreeMap<String, i64> = view
        .volumes
        .iter()
        .filter(|v| v["state"] == "ready")
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["capacity_bytes"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        list_volumes(p).await,
        on_disk,
        "ListVolumes differs from the records"
    );
    let snapshots: BTreeSet<String> = view
        .snapshots
        .iter()
        .filter(|s| s["state"] == "ready")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        list_snapshots(p).await,
        snapshots,
        "ListSnapshots differs from the records"
    );
    for id in on_disk.keys() {
        p.controller()
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerGetVolume {id}: {e:?}"));
    }
}
