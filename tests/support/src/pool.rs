//! A pool directory's on-disk truth, read behind the plugin's back: the records
//! (`volumes/`, `snapshots/`, `groups/`, `flatten/`), the layer files (`images/`), and the invariants a
//! pool at rest keeps ([`assert_pool_clean`]).
//!
//! ```ignore
//! let image = volume_image(&p.pool_dir(), &volume_id);     // the active layer, from the record
//! let depth = volume_depth(&p.pool_dir(), &volume_id);     // 1 + backing layers
//! assert_pool_clean(&p.pool_dir());
//! ```

use crate::plugin::Plugin;
use crate::qemu::{qemu_img_check, qemu_img_info};
use crate::rpc::ControllerExt;
use crate::{eventually, key_of};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything a pool directory holds.
#[derive(Debug)]
pub struct PoolView {
    pub volumes: Vec<Value>,
    pub snapshots: Vec<Value>,
    /// Group snapshot records.
    pub groups: Vec<Value>,
    pub flatten_jobs: Vec<Value>,
    /// File names in `images/`.
    pub images: BTreeSet<String>,
    /// Temp files (`.tmp-*`, `*.part`) anywhere in the pool.
    pub temp_files: Vec<String>,
    /// Spare inodes (`<dir>/<name>`) and their lengths.
    pub spares: Vec<(String, u64)>,
}

fn is_temp(name: &str) -> bool {
    name.starts_with(".tmp-") || name.ends_with(".part")
}

/// A spare inode a store keeps for its next new record or layer (`.spare-<owner>-<n>`).
fn is_spare(name: &str) -> bool {
    name.starts_with(".spare-")
}

fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn records(dir: &Path) -> Vec<Value> {
    names(dir)
        .iter()
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .map(|n| read_record(&dir.join(n)))
        .collect()
}

/// The record file at `path`, as JSON (panics naming the file when it is not).
pub fn read_record(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("record {} is not valid JSON: {e}", path.display()))
}

/// Writes `rec` as the record file at `path`, as an operator editing it by hand would (in
/// place, not atomically); the plugin should be stopped, or see it as a hand edit.
pub fn write_record(path: &Path, rec: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(rec).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Stages what a crash of the machine leaves of a create whose journaled line in the pool's
/// change log never reached the disk: the line of volume `volume_id` (`+v <key> ...`) is
/// overwritten in place by bytes that are not a line (the other lines keep their offsets).
/// The plugin should be stopped.
pub fn lose_journaled_line(pool: &Path, volume_id: &str) {
    let path = pool.join("changes");
    let mut log = std::fs::read(&path).unwrap();
    let start = format!("+v {} ", crate::key_of(volume_id));
    let mut at = 0;
    let mut found = false;
    while at < log.len() {
        let end = log[at..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(log.len(), |n| at + n);
        if log[at..end].starts_with(start.as_bytes()) {
            log[at..end].fill(b'#');
            found = true;
        }
        at = end + 1;
    }
    assert!(
        found,
        "no journaled line of {volume_id} in {}",
        path.display()
    );
    std::fs::write(&path, log).unwrap();
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl PoolView {
    pub fn read(pool: &Path) -> PoolView {
        let mut temp_files = Vec::new();
        let mut spares = Vec::new();
        for sub in ["volumes", "images", "snapshots", "groups", "flatten"] {
            for n in names(&pool.join(sub)) {
                if is_temp(&n) {
                    temp_files.push(format!("{sub}/{n}"));
                } else if is_spare(&n) {
                    let len = std::fs::metadata(pool.join(sub).join(&n)).map_or(0, |m| m.len());
                    spares.push((format!("{sub}/{n}"), len));
                }
            }
        }
        PoolView {
            volumes: records(&pool.join("volumes")),
            snapshots: records(&pool.join("snapshots")),
            groups: records(&pool.join("groups")),
            flatten_jobs: records(&pool.join("flatten")),
            images: names(&pool.join("images"))
                .into_iter()
                .filter(|n| !is_temp(n) && !is_spare(n))
                .collect(),
            temp_files,
            spares,
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

    pub fn volume(&self, id: &str) -> Option<&Value> {
        self.volumes.iter().find(|v| v["id"] == id)
    }
}

/// The pool's invariants at rest: no temp file, every spare inode empty (a removed volume's
/// bytes never wait in one), every record finished (Ready, no layer switch, no flattening job),
/// exactly the referenced layers on disk (no orphan, none missing), each image passes
/// `qemu-img check` and its qcow2 backing chain is the one its record names.
pub fn assert_pool_clean(pool: &Path) {
    let v = PoolView::read(pool);
    assert!(
        v.temp_files.is_empty(),
        "temp files left: {:?}",
        v.temp_files
    );
    let full: Vec<_> = v.spares.iter().filter(|(_, len)| *len > 0).collect();
    assert!(full.is_empty(), "spare inodes that are not empty: {full:?}");
    for r in v.volumes.iter().chain(&v.snapshots).chain(&v.groups) {
        assert_eq!(r["state"], "ready", "unfinished record: {r}");
    }
    // Every member names its group, and every group its members (within this pool).
    for s in v
        .snapshots
        .iter()
        .filter(|s| s["group_snapshot_id"].is_string())
    {
        let gid = &s["group_snapshot_id"];
        let names_it = |g: &&Value| {
            g["id"] == *gid
                && strings(&g["snapshot_ids"]).contains(&s["id"].as_str().unwrap().to_string())
        };
        let local = gid.as_str().unwrap().split('.').next() == s["pool"].as_str();
        assert!(
            !local || v.groups.iter().any(|g| names_it(&g)),
            "member {} names group {gid}, which does not list it",
            s["id"]
        );
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
    let chains = v
        .volumes
        .iter()
        .map(|r| (&r["image"], &r["chain"]["backing"]));
    let chains = chains.chain(v.snapshots.iter().map(|s| (&s["layer"], &s["backing"])));
    for (top, backing) in chains {
        let mut chain = vec![top.as_str().unwrap().to_string()];
        chain.extend(strings(backing));
        assert_backing_chain(&images, &chain);
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

/// Waits (up to 2 minutes) until background flattening has nothing left to do: no job in
/// progress, and no unattached volume deeper than `max_depth` (attached ones wait for their
/// unpublish).
pub async fn wait_flattening_settled(p: &Plugin, max_depth: usize) {
    eventually(Duration::from_secs(120), || async {
        let entries = p.controller().all_volumes().await;
        let attached: BTreeSet<String> = entries
            .into_iter()
            .filter(|e| {
                e.status
                    .as_ref()
                    .is_some_and(|s| !s.published_node_ids.is_empty())
            })
            .map(|e| e.volume.unwrap().volume_id)
            .collect();
        let view = PoolView::read(&p.pool_dir());
        let deep = view
            .volumes
            .iter()
            .any(|v| depth_of(v) > max_depth && !attached.contains(v["id"].as_str().unwrap()));
        if view.flatten_jobs.is_empty() && !deep {
            return Ok(());
        }
        Err(format!(
            "flattening did not settle: jobs {:?}",
            view.flatten_jobs
        ))
    })
    .await
}

/// [`wait_flattening_settled`] for a pool directory that several processes may share and
/// where no volume is attached: no job in progress and no volume deeper than `max_depth`.
/// Every process's flattener works in the background, so "at rest" comes after this.
pub async fn wait_pool_flattening_settled(pool: &Path, max_depth: usize) {
    eventually(Duration::from_secs(120), || async {
        let view = PoolView::read(pool);
        let deep: Vec<&str> = view
            .volumes
            .iter()
            .filter(|v| depth_of(v) > max_depth)
            .map(|v| v["id"].as_str().unwrap_or("?"))
            .collect();
        if view.flatten_jobs.is_empty() && deep.is_empty() {
            return Ok(());
        }
        Err(format!(
            "flattening did not settle: jobs {:?}, deeper than {max_depth}: {deep:?}",
            view.flatten_jobs
        ))
    })
    .await
}

/// A volume record's chain depth: its image plus its backing layers.
pub fn depth_of(record: &Value) -> usize {
    1 + record["chain"]["backing"].as_array().map_or(0, Vec::len)
}

/// A volume's record (`volumes/<key>.json`).
pub fn volume_record(pool: &Path, volume_id: &str) -> Value {
    read_record(&pool.join(format!("volumes/{}.json", key_of(volume_id))))
}

/// A group snapshot's record (`groups/<key>.json`).
pub fn group_record(pool: &Path, group_snapshot_id: &str) -> Value {
    read_record(&pool.join(format!("groups/{}.json", key_of(group_snapshot_id))))
}

/// A snapshot's record (`snapshots/<key>.json`).
pub fn snapshot_record(pool: &Path, snapshot_id: &str) -> Value {
    read_record(&pool.join(format!("snapshots/{}.json", key_of(snapshot_id))))
}

/// The active image of a volume, from its record.
pub fn volume_image(pool: &Path, volume_id: &str) -> PathBuf {
    let rec = volume_record(pool, volume_id);
    pool.join("images").join(rec["image"].as_str().unwrap())
}

/// A snapshot's frozen layer, from its record.
pub fn snapshot_layer(pool: &Path, snapshot_id: &str) -> PathBuf {
    let rec = snapshot_record(pool, snapshot_id);
    pool.join("images").join(rec["layer"].as_str().unwrap())
}

/// A volume's chain depth, from its record.
pub fn volume_depth(pool: &Path, volume_id: &str) -> usize {
    depth_of(&volume_record(pool, volume_id))
}

/// Every layer file in `images/` (not spare inodes), sorted.
pub fn layer_files(pool: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = names(&pool.join("images"))
        .iter()
        .filter(|n| !is_spare(n))
        .map(|n| pool.join("images").join(n))
        .collect();
    files.sort();
    files
}

/// `qemu-img check` on every file in `images/`; returns how many there are.
pub fn check_all_layers(pool: &Path) -> usize {
    let files = layer_files(pool);
    for f in &files {
        qemu_img_check(f);
    }
    files.len()
}

/// What the plugin answers (its in-memory index) is what the pool at `pool` holds: the volumes
/// and snapshots ListVolumes/ListSnapshots report are exactly the Ready records on disk, with
/// the records' sizes, and ControllerGetVolume finds each.
pub async fn assert_index_matches_pool(p: &Plugin, pool: &Path) {
    let view = PoolView::read(pool);
    let on_disk: std::collections::BTreeMap<String, i64> = view
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
        crate::calls::list_volumes(p).await,
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
        crate::calls::list_snapshots(p).await,
        snapshots,
        "ListSnapshots differs from the records"
    );
    for id in on_disk.keys() {
        p.controller()
            .controller_get_volume(crate::csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerGetVolume {id}: {e:?}"));
    }
}

/// Links per image file before [`seed_copies`] makes a fresh copy (ext4 allows 65 000).
const LINKS_PER_FILE: usize = 50_000;

/// Adds volumes to the pool at `pool_dir` offline, fast: for each `i` in `range`, a copy of
/// `template` (a record the plugin wrote) named `<prefix>-<i>` under a new random key, its
/// image a hard link to the template's (a fresh copy every 50 000 links). The plugin reads
/// them as its own at its next start; 100 000 cost seconds and no disk space.
pub fn seed_copies(
    pool_dir: &Path,
    template: &virtdisk_csi::pool::VolumeRecord,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    use virtdisk_csi::ids::{self, ObjectId};
    let images = pool_dir.join("images");
    let first = images.join(&template.image);
    let mut src = first.clone();
    for i in range {
        if i % LINKS_PER_FILE == 0 && i > 0 {
            src = images.join(format!("{}-copy-{i}", template.image));
            std::fs::copy(&first, &src).unwrap();
        }
        let key = format!("{:016x}", ids::random_u64());
        let mut rec = template.clone();
        rec.id = ObjectId::new(&rec.pool, &key).to_string();
        rec.name = format!("{prefix}-{i:05}");
        rec.image = format!("{key}.qcow2");
        std::fs::hard_link(&src, images.join(&rec.image)).unwrap();
        std::fs::write(
            pool_dir.join(format!("volumes/{key}.json")),
            serde_json::to_vec_pretty(&rec).unwrap(),
        )
        .unwrap();
    }
}
