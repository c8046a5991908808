//! A monolith with local attach (qemu-storage-daemon FUSE export + loop device) on a temp
//! socket and data dir, plus what a test needs to prove nothing leaks: every mount, loop
//! device and storage daemon under the temp dir is found ([`leftovers`]) and removed when the
//! [`Env`] is dropped, even when the test failed.
//!
//! ```ignore
//! // Root, /dev/fuse, loop devices and qemu-storage-daemon, or SKIPPED:
//! let Some(env) = Env::try_start("[node]\ndevice_wait_secs = 2\n").await else { return };
//! let (vol, ctx) = env.attached("ext4", 64 * MIB, &ext4_cap()).await;  // created, published
//! let (s, t) = (env.staging("a"), env.target("alloc1"));   // Nomad-like paths
//! env.stage(&vol, &ctx, &s, &ext4_cap()).await?;
//! env.publish(&vol, &s, &t, &ext4_cap(), false).await?;
//! env.unpublish_twice(&vol, &t).await; env.unstage_twice(&vol, &s).await;
//! env.finish(&vol).await;                          // unpublish twice, delete, nothing left
//! ```

use crate::plugin::Plugin;
use crate::rpc::*;
use crate::{csi, MIB};
use std::path::{Path, PathBuf};
use virtdisk_csi::node::mountinfo::MountTable;
use virtdisk_csi::node::Sysfs;

/// The plugin and the node id it reports.
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

/// A volume name no other test (or concurrent run) uses.
pub fn unique(tag: &str) -> String {
    format!("vdt-node-{tag}-{}", std::process::id())
}

impl Env {
    /// A monolith with `config` (TOML, `{dir}` = the temp dir).
    pub async fn start(config: &str) -> Env {
        Env::start_with_args(config, &[]).await
    }

    /// [`Env::start`] with more `serve` arguments (e.g. `--metrics-addr 127.0.0.1:0`).
    pub async fn start_with_args(config: &str, args: &[&str]) -> Env {
        let plugin = Plugin::start_with_config("monolith", config, args).await;
        let node_id = plugin.node().node_id().await;
        assert!(!node_id.is_empty());
        Env { plugin, node_id }
    }

    /// [`Env::start`] where [`can_run`] (else `None`, SKIPPED printed).
    pub async fn try_start(config: &str) -> Option<Env> {
        Env::try_start_with_args(config, &[]).await
    }

    /// [`Env::start_with_args`] where [`can_run`] (else `None`, SKIPPED printed).
    pub async fn try_start_with_args(config: &str, args: &[&str]) -> Option<Env> {
        if !can_run() {
            return None;
        }
        Some(Env::start_with_args(config, args).await)
    }

    /// A new volume named [`unique`]`(tag)`, published to this host: (volume, publish_context).
    pub async fn attached(
        &self,
        tag: &str,
        size: i64,
        cap: &csi::VolumeCapability,
    ) -> (csi::Volume, Map) {
        let vol = self.create(&unique(tag), size, cap.clone()).await;
        let ctx = self.controller_publish(&vol, cap, false).await;
        (vol, ctx)
    }

    pub fn dir(&self) -> &Path {
        self.plugin.dir.path()
    }

    /// A Nomad-like staging path, created: `<dir>/csi/staging/<name>`.
    pub fn staging(&self, name: &str) -> String {
        let p = self.dir().join("csi/staging").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p.display().to_string()
    }

    /// A Nomad-like target path, its parent created: `<dir>/csi/per-alloc/<name>/vol`.
    pub fn target(&self, name: &str) -> String {
        let p = self.dir().join("csi/per-alloc").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p.join("vol").display().to_string()
    }

    pub async fn create(&self, name: &str, size: i64, cap: csi::VolumeCapability) -> csi::Volume {
        let req = csi::CreateVolumeRequest {
            volume_capabilities: vec![cap],
            ..create_req(name, size)
        };
        self.plugin.controller().create(req).await.unwrap()
    }

    /// A new volume named [`unique`]`(tag)` restored from snapshot `snapshot_id`, published to
    /// this host: (volume, publish_context).
    pub async fn restored(
        &self,
        tag: &str,
        snapshot_id: &str,
        cap: &csi::VolumeCapability,
    ) -> (csi::Volume, Map) {
        let req = csi::CreateVolumeRequest {
            volume_capabilities: vec![cap.clone()],
            ..create_from_req(&unique(tag), 0, from_snapshot(snapshot_id))
        };
        let vol = self.plugin.controller().create(req).await.unwrap();
        let ctx = self.controller_publish(&vol, cap, false).await;
        (vol, ctx)
    }

    /// ControllerPublish to this host, which must succeed: the publish_context.
    pub async fn controller_publish(
        &self,
        vol: &csi::Volume,
        cap: &csi::VolumeCapability,
        readonly: bool,
    ) -> Map {
        let req = csi::ControllerPublishVolumeRequest {
            volume_capability: Some(cap.clone()),
            readonly,
            ..publish_req(&vol.volume_id, &self.node_id)
        };
        self.plugin.controller().publish(req).await.unwrap()
    }

    pub async fn controller_unpublish(&self, vol: &csi::Volume) -> Result<(), Status> {
        let req = unpublish_req(&vol.volume_id, &self.node_id);
        self.plugin.controller().unpublish(req).await
    }

    pub async fn stage(
        &self,
        vol: &csi::Volume,
        ctx: &Map,
        staging: &str,
        cap: &csi::VolumeCapability,
    ) -> Result<(), Status> {
        let req = csi::NodeStageVolumeRequest {
            publish_context: ctx.clone(),
            volume_context: vol.volume_context.clone(),
            ..stage_req(&vol.volume_id, staging, cap.clone())
        };
        self.plugin.node().stage(req).await
    }

    pub async fn unstage(&self, vol: &csi::Volume, staging: &str) -> Result<(), Status> {
        let req = unstage_req(&vol.volume_id, staging);
        self.plugin.node().unstage(req).await
    }

    pub async fn publish(
        &self,
        vol: &csi::Volume,
        staging: &str,
        target: &str,
        cap: &csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), Status> {
        let req = csi::NodePublishVolumeRequest {
            readonly,
            volume_context: vol.volume_context.clone(),
            ..node_publish_req(&vol.volume_id, staging, target, cap.clone())
        };
        self.plugin.node().publish(req).await
    }

    pub async fn unpublish(&self, vol: &csi::Volume, target: &str) -> Result<(), Status> {
        let req = node_unpublish_req(&vol.volume_id, target);
        self.plugin.node().unpublish(req).await
    }

    /// Unpublish twice (the second must be OK too); the target leaf is gone.
    pub async fn unpublish_twice(&self, vol: &csi::Volume, target: &str) {
        self.unpublish(vol, target).await.unwrap();
        self.unpublish(vol, target).await.unwrap();
        assert!(
            !Path::new(target).exists(),
            "target leaf {target} was not removed"
        );
    }

    /// Unstage twice (the second must be OK too); nothing is mounted there any more.
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
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        let req = stats_req(&vol.volume_id, path, staging);
        self.plugin.node().stats(req).await
    }

    /// DeleteVolume, which must succeed.
    pub async fn delete(&self, vol: &csi::Volume) {
        self.plugin
            .controller()
            .delete(&vol.volume_id)
            .await
            .unwrap();
    }

    /// The pid of `vol`'s storage daemon (from its pid file), while that process lives.
    pub fn daemon_pid(&self, vol: &csi::Volume) -> Option<i32> {
        let pid_file = self
            .plugin
            .data_dir()
            .join("localattach")
            .join(crate::key_of(&vol.volume_id))
            .join("qsd.pid");
        let pid: i32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        (!stat.contains(") Z")).then_some(pid)
    }

    /// SIGKILLs the storage daemon serving `vol`: its FUSE export disconnects, and the
    /// volume's loop device fails every read once FUSE stops answering from its cache (about a
    /// second later).
    pub fn kill_daemon(&self, vol: &csi::Volume) {
        let pid = self.daemon_pid(vol).expect("a live storage daemon");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// SIGSTOPs the storage daemon serving `vol` (a hung daemon: the kernel's FUSE requests to
    /// it wait); the guard SIGCONTs it when dropped, on every path (a failed assertion too).
    pub fn stop_daemon(&self, vol: &csi::Volume) -> StoppedDaemon {
        let pid = self.daemon_pid(vol).expect("a live storage daemon");
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        StoppedDaemon(Some(pid))
    }

    /// ControllerUnpublish twice, delete, and nothing left on the host.
    pub async fn finish(&self, vol: &csi::Volume) {
        self.controller_unpublish(vol).await.unwrap();
        self.controller_unpublish(vol).await.unwrap();
        self.delete(vol).await;
        assert_no_leftovers(self.dir());
    }
}

/// A storage daemon stopped by [`Env::stop_daemon`], continued by [`StoppedDaemon::resume`]
/// or when dropped.
pub struct StoppedDaemon(Option<nix::unistd::Pid>);

impl StoppedDaemon {
    /// SIGCONT: the daemon answers again.
    pub fn resume(mut self) {
        self.cont();
    }

    fn cont(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

impl Drop for StoppedDaemon {
    fn drop(&mut self) {
        self.cont();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        cleanup(self.plugin.dir.path());
    }
}

/// Whether something is mounted at `path`.
pub fn is_mount(path: &str) -> bool {
    MountTable::read().unwrap().at(Path::new(path)).is_some()
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
    for (name, backing) in loops_under(&dir) {
        out.push(format!("loop device {name} on {}", backing.display()));
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

/// Loop devices whose backing file is under `dir`: (name, backing file).
fn loops_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let all = Sysfs::host().loop_devices().unwrap();
    all.into_iter()
        .filter(|(_, b)| b.starts_with(dir))
        .collect()
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

/// Best-effort removal of every mount, loop device and storage daemon under `dir` (after a
/// failed test, or a benchmark).
pub fn cleanup(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let left = leftovers(&dir);
    if left.is_empty() {
        return;
    }
    eprintln!("cleaning up after the test: {left:?}");
    let unmount = |fuse_too: bool| {
        for m in MountTable::read().unwrap().under(&dir) {
            if fuse_too || m.fs_type != "fuse" {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    };
    unmount(false);
    for (name, _) in loops_under(&dir) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &format!("/dev/{name}")])
            .status();
    }
    for pid in daemons_of(&dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    unmount(true);
}

/// Writes a file into a mounted volume and syncs it.
pub fn write_file(dir: &str, name: &str, data: &[u8]) {
    let p = PathBuf::from(dir).join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::File::open(&p).unwrap().sync_all().unwrap();
}

/// `e2fsck -fn` exits 0: the ext4 file system on `device` is clean (no journal to replay).
pub fn assert_fsck_clean(device: &str) {
    let out = std::process::Command::new("e2fsck")
        .args(["-fn", device])
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {device}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A MiB of `byte` written at the start of a block device (or file), synced.
pub fn block_write(path: &str, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&vec![byte; MIB as usize]).unwrap();
    f.sync_all().unwrap();
}

/// Whether the first MiB of a block device (or file) is all `byte`.
pub fn block_reads(path: &str, byte: u8) -> bool {
    use std::io::Read;
    let mut buf = vec![0u8; MIB as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf.iter().all(|b| *b == byte)
}
