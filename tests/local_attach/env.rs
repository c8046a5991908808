//! A monolith with local attach on a temp socket and data dir, plus what a test needs to prove
//! nothing leaks: every mount, loop device and storage daemon under the temp dir is found (and
//! removed on drop, even when the test failed).

use crate::common::*;
use std::path::{Path, PathBuf};
use tonic::Code;
use virtdisk_csi::csi::proto as csi;
use virtdisk_csi::node::mountinfo::MountTable;
use virtdisk_csi::node::Sysfs;

pub struct Env {
    pub plugin: Plugin,
    pub node_id: String,
}

/// Root, /dev/fuse, loop devices and qemu-storage-daemon are needed; without them the test is
/// skipped loudly (CI runs as root with fuse3 and qemu-utils installed).
pub fn can_run() -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Path::new("/dev/fuse").exists()
        && Path::new("/dev/loop-control").exists()
        && std::process::Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_ok();
    if !ok {
        eprintln!("SKIPPED: needs root, /dev/fuse, /dev/loop-control and qemu-storage-daemon");
    }
    ok
}

/// A name no other test (or concurrent run) uses.
pub fn unique(tag: &str) -> String {
    format!("vdt-node-{tag}-{}", std::process::id())
}

impl Env {
    pub async fn start(config: &str) -> Env {
        let plugin = Plugin::start_with_config("monolith", config, &[]).await;
        let node_id = plugin
            .node()
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id;
        assert!(!node_id.is_empty());
        Env { plugin, node_id }
    }

    pub fn dir(&self) -> &Path {
        self.plugin.dir.path()
    }

    /// Nomad-like paths: `<dir>/csi/staging/<vol>/<usage>`, `<dir>/csi/per-alloc/<alloc>/…`.
    pub fn staging(&self, name: &str) -> String {
        let p = self.dir().join("csi/staging").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p.display().to_string()
    }

    pub fn target(&self, name: &str) -> String {
        let p = self.dir().join("csi/per-alloc").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p.join("vol").display().to_string()
    }

    pub async fn create(&self, name: &str, size: i64, cap: csi::VolumeCapability) -> csi::Volume {
        let mut req = create_req(name, size);
        req.volume_capabilities = vec![cap];
        self.plugin
            .controller()
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    pub async fn controller_publish(
        &self,
        vol: &csi::Volume,
        cap: &csi::VolumeCapability,
        readonly: bool,
    ) -> std::collections::BTreeMap<String, String> {
        self.plugin
            .controller()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(cap.clone()),
                readonly,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context
    }

    pub async fn controller_unpublish(&self, vol: &csi::Volume) -> Result<(), tonic::Status> {
        self.plugin
            .controller()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                node_id: self.node_id.clone(),
                secrets: Default::default(),
            })
            .await
            .map(drop)
    }

    pub async fn stage(
        &self,
        vol: &csi::Volume,
        ctx: &std::collections::BTreeMap<String, String>,
        staging: &str,
        cap: &csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.plugin
            .node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.to_string(),
                volume_capability: Some(cap.clone()),
                secrets: Default::default(),
                volume_context: vol.volume_context.clone(),
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&self, vol: &csi::Volume, staging: &str) -> Result<(), tonic::Status> {
        self.plugin
            .node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.to_string(),
            })
            .await
            .map(drop)
    }

    pub async fn publish(
        &self,
        vol: &csi::Volume,
        staging: &str,
        target: &str,
        cap: &csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.plugin
            .node()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                publish_context: Default::default(),
                staging_target_path: staging.to_string(),
                target_path: target.to_string(),
                volume_capability: Some(cap.clone()),
                readonly,
                secrets: Default::default(),
                volume_context: vol.volume_context.clone(),
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&self, vol: &csi::Volume, target: &str) -> Result<(), tonic::Status> {
        self.plugin
            .node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.to_string(),
            })
            .await
            .map(drop)
    }

    /// Unpublish and unstage, each twice (the second must be OK too).
    pub async fn unpublish_twice(&self, vol: &csi::Volume, target: &str) {
        self.unpublish(vol, target).await.unwrap();
        self.unpublish(vol, target).await.unwrap();
        assert!(
            !Path::new(target).exists(),
            "target leaf {target} was not removed"
        );
    }

    pub async fn unstage_twice(&self, vol: &csi::Volume, staging: &str) {
        self.unstage(vol, staging).await.unwrap();
        self.unstage(vol, staging).await.unwrap();
        assert!(!is_mount(staging), "{staging} is still mounted");
    }

    pub async fn stats(
        &self,
        vol: &csi::Volume,
        path: &str,
        staging: &str,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        self.plugin
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: path.to_string(),
                staging_target_path: staging.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn delete(&self, vol: &csi::Volume) {
        self.plugin
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    /// ControllerUnpublish twice, delete, and nothing left on the host.
    pub async fn finish(&self, vol: &csi::Volume) {
        self.controller_unpublish(vol).await.unwrap();
        self.controller_unpublish(vol).await.unwrap();
        self.delete(vol).await;
        assert_no_leftovers(self.dir());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        cleanup(self.plugin.dir.path());
    }
}

pub fn is_mount(path: &str) -> bool {
    MountTable::read().unwrap().at(Path::new(path)).is_some()
}

pub fn expect_code(r: Result<(), tonic::Status>, code: Code, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {}", e.message());
    e.message().to_string()
}

/// Mounts, loop devices and storage daemons that belong to `dir`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut out: Vec<String> = MountTable::read()
        .unwrap()
        .under(&dir)
        .iter()
        .map(|m| format!("mount {}", m.mount_point.display()))
        .collect();
    for (name, backing) in Sysfs::host().loop_devices().unwrap() {
        if backing.starts_with(&dir) {
            out.push(format!("loop device {name} on {}", backing.display()));
        }
    }
    for pid in daemons_of(&dir) {
        out.push(format!("qemu-storage-daemon pid {pid}"));
    }
    out
}

pub fn assert_no_leftovers(dir: &Path) {
    let left = leftovers(dir);
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn daemons_of(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat.contains(") Z") {
            continue;
        }
        if cmd.windows(19).any(|w| w == b"qemu-storage-daemon")
            && cmd.windows(needle.len()).any(|w| w == needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Best-effort removal of everything under `dir` (after a failed test).
pub fn cleanup(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let left = leftovers(&dir);
    if left.is_empty() {
        return;
    }
    eprintln!("cleaning up after the test: {left:?}");
    let unmount_all = || {
        for m in MountTable::read().unwrap().under(&dir) {
            if m.fs_type != "fuse" {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    };
    unmount_all();
    for (name, backing) in Sysfs::host().loop_devices().unwrap() {
        if backing.starts_with(&dir) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &format!("/dev/{name}")])
                .status();
        }
    }
    for pid in daemons_of(&dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for m in MountTable::read().unwrap().under(&dir) {
        let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn write_file(dir: &str, name: &str, data: &[u8]) {
    let p = PathBuf::from(dir).join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::File::open(&p).unwrap().sync_all().unwrap();
}
