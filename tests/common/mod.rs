//! Test harness: runs the real `virtdisk-csi` binary on a temp socket and data dir and talks to
//! it over gRPC, as a CO would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use virtdisk_csi::csi::proto as csi;
use virtdisk_csi::csi::proto::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};

pub use csi::volume_capability::access_mode::Mode;

pub const BIN: &str = env!("CARGO_BIN_EXE_virtdisk-csi");
pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

pub struct Plugin {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub args: Vec<String>,
    pub channel: Channel,
}

impl Plugin {
    /// Starts `virtdisk-csi serve --mode <mode>` with a temp data dir and socket, plus `args`.
    pub async fn start(mode: &str, args: &[&str]) -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, mode, args).await
    }

    /// Like `start`, with `config` written to `<dir>/config.toml` (use `{dir}` for the dir).
    pub async fn start_with_config(mode: &str, config: &str, args: &[&str]) -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config.replace("{dir}", dir.path().to_str().unwrap());
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let mut all = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Self::start_in(dir, mode, &all).await
    }

    async fn start_in(dir: tempfile::TempDir, mode: &str, args: &[&str]) -> Plugin {
        let socket = dir.path().join("csi.sock");
        let mut full = vec![
            "serve".to_string(),
            "--mode".to_string(),
            mode.to_string(),
            "--endpoint".to_string(),
            format!("unix://{}", socket.display()),
            "--data-dir".to_string(),
            dir.path().join("data").display().to_string(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let child = spawn(&full, dir.path());
        let channel = wait_for_socket(&socket).await;
        Plugin {
            child: Some(child),
            dir,
            socket,
            args: full,
            channel,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir().join("pools/default")
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("plugin is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// SIGKILL (a crash) and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same command line again (after `stop` or `kill`).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.child = Some(spawn(&self.args, self.dir.path()));
        self.channel = wait_for_socket(&self.socket).await;
    }

    /// The plugin's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String], dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("plugin.log"))
        .unwrap();
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "debug")
        .env_remove("CSI_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start virtdisk-csi")
}

async fn wait_for_socket(socket: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if socket.exists() {
            if let Ok(ch) = virtdisk_csi::csi::channel::connect(socket).await {
                let mut id = IdentityClient::new(ch.clone());
                if id
                    .get_plugin_info(csi::GetPluginInfoRequest {})
                    .await
                    .is_ok()
                {
                    return ch;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "plugin did not start listening on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn mount_cap(fs_type: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs_type.to_string(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn create_req(name: &str, required: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: (required > 0).then_some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

pub fn params(kv: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `qemu-img info --output=json` of a file.
pub fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `qemu-img check` passes.
pub fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---- Extra environment and crash helpers (reliability tests) ----

/// `spawn` with extra environment variables (e.g. `VIRTDISK_FAILPOINT`, `RUST_LOG`).
fn spawn_with_env(args: &[String], dir: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("plugin.log"))
        .unwrap();
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .env_remove("CSI_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start virtdisk-csi")
}

impl Plugin {
    /// Like `start_with_config` (no config file when `config` is empty), with extra
    /// environment variables for this first process only.
    pub async fn start_with_env(
        mode: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Plugin {
        let mut p = if config.is_empty() {
            Plugin::start(mode, args).await
        } else {
            Plugin::start_with_config(mode, config, args).await
        };
        if !env.is_empty() {
            p.restart_with_env(env).await;
        }
        p
    }

    /// Stops the plugin (if running) and starts the same command line with extra environment
    /// variables; a later `restart()` goes back to the plain environment.
    pub async fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        if self.child.is_some() {
            self.stop();
        }
        self.child = Some(spawn_with_env(&self.args, self.dir.path(), env));
        self.channel = wait_for_socket(&self.socket).await;
    }

    /// Waits up to `timeout` for the plugin process to exit by itself (e.g. at a failpoint);
    /// returns its exit status, or None if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pid of the running plugin process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

// ---- Process-group helpers (tests/local_attach_survival.rs) ----

impl Plugin {
    /// Starts the same command line again with the plugin leading a process group of its own
    /// (as a CO's executor starts a task), so a test can kill that whole group.
    pub async fn restart_in_own_group(&mut self) {
        use std::os::unix::process::CommandExt;
        if self.child.is_some() {
            self.stop();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("plugin.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .env_remove("CSI_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start virtdisk-csi");
        self.child = Some(child);
        self.channel = wait_for_socket(&self.socket).await;
    }

    /// Reaps the plugin after something else killed it; returns how it ended.
    pub fn reap(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().map(|mut c| c.wait().unwrap())
    }
}
